"""The whole MPT forward against a float64 numpy reference written from the spec (section 1), plus the model's
structural properties: GQA/MQA as MHA with repeated kv heads, causality, packing, ALiBi extrapolation,
embedding_fraction, dropout, remat and bfloat16 compute.

Params are random (not init_params: compiling init costs seconds per config), with every norm scale, bias
and kernel perturbed so that a wrong mapping or a skipped term cannot pass.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mpt_jax import MPT, MPTConfig
from mpt_jax.model import param_shapes

BASE = dict(d_model=48, n_heads=4, n_layers=2, vocab_size=64, max_seq_len=16, expansion_ratio=2.0)
GQA = dict(attn_type="grouped_query_attention", kv_n_heads=2)
MQA = dict(attn_type="multiquery_attention")
LEARNED_POS = dict(alibi=False, learned_pos_emb=True)


def make_cfg(**overrides) -> MPTConfig:
    return MPTConfig(**{**BASE, **overrides}).validate()


def random_params(cfg: MPTConfig, seed: int = 0):
    """Random float32 params with the model's tree: scales 1+0.3n, biases 0.2n, kernels n/sqrt(fan_in)."""
    rng = np.random.default_rng(seed)
    shapes = nn.meta.unbox(param_shapes(cfg))

    def make(path, leaf):
        names = [p.key for p in path]
        if names[-1] == "scale":
            value = 1.0 + 0.3 * rng.standard_normal(leaf.shape)
        elif names[-1] == "bias":
            value = 0.2 * rng.standard_normal(leaf.shape)
        elif names[-1] == "embedding":
            value = 0.3 * rng.standard_normal(leaf.shape)
        else:
            fan_in = cfg.ffn_dim if "down_proj" in names else cfg.d_model
            value = rng.standard_normal(leaf.shape) / math.sqrt(fan_in)
        return jnp.asarray(value.astype(np.float32))

    return jax.tree_util.tree_map_with_path(make, shapes)


def random_tokens(cfg: MPTConfig, shape, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, shape).astype(np.int32)


@functools.cache
def _apply_fn(cfg: MPTConfig):
    def fn(params, tokens, segment_ids, positions):
        return MPT(cfg).apply({"params": params}, tokens, segment_ids=segment_ids, positions=positions)

    return jax.jit(fn)


def logits_of(cfg, params, tokens, segment_ids=None, positions=None) -> np.ndarray:
    """The model's logits, through one jitted function per config."""

    def as_array(a):
        return None if a is None else jnp.asarray(a, jnp.int32)

    out = _apply_fn(cfg)(params, as_array(tokens), as_array(segment_ids), as_array(positions))
    assert out.dtype == jnp.float32
    return np.asarray(out)


@functools.cache
def _grad_fn(cfg: MPTConfig):
    def loss(params, tokens, targets):
        logits = MPT(cfg).apply({"params": params}, tokens)
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.take_along_axis(logp, targets[..., None], axis=-1).mean(), logits

    return jax.jit(jax.value_and_grad(loss, has_aux=True))


def loss_grad(cfg, params, tokens, targets):
    """((cross-entropy loss, logits), grads) through one jitted function per config."""
    return _grad_fn(cfg)(params, jnp.asarray(tokens), jnp.asarray(targets))


# ------------------------------------------------------------------------------------------------
# The float64 numpy reference.


def ref_slopes(n_heads: int, bias_max: float) -> np.ndarray:
    n2 = 2 ** math.ceil(math.log2(n_heads))
    slopes = [1.0 / 2 ** (k * bias_max / n2) for k in range(1, n2 + 1)]
    if n2 != n_heads:
        slopes = (slopes[1::2] + slopes[0::2])[:n_heads]
    return np.asarray(slopes)


def ref_layernorm(x, p, cfg):
    """LayerNorm over the last axis (biased variance), weight, and bias unless no_bias."""
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    y = (x - mean) / np.sqrt(var + cfg.norm_eps) * p["scale"]
    return y if cfg.no_bias else y + p["bias"]


def ref_linear(x, p, cfg):
    y = x @ p["kernel"]
    return y if cfg.no_bias else y + p["bias"]


_erf = np.vectorize(math.erf)


def ref_act(x, name):
    if name == "gelu":
        return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))
    if name == "silu":
        return x / (1.0 + np.exp(-x))
    raise NotImplementedError(name)


def ref_attention(x, p, cfg):
    """llm-foundry's attention: fused [q|k|v] projection, clip, whole-vector q_ln/k_ln, repeated kv heads,
    ALiBi in the causal form slope*(j - i) (spec 1.5), causal softmax, out_proj."""
    b, t, d = x.shape
    h, hkv, hd = cfg.n_heads, cfg.num_kv_heads, cfg.head_dim
    if cfg.attn_type == "multihead_attention":
        w = p["Wqkv"]["kernel"].reshape(d, 3 * h * hd)  # columns [q | k | v], head-major within each
        bias = 0.0 if cfg.no_bias else p["Wqkv"]["bias"].reshape(3 * h * hd)
    else:
        w = np.concatenate([p["Wq"]["kernel"].reshape(d, h * hd), p["Wkv"]["kernel"].reshape(d, 2 * hkv * hd)], 1)
        bias = 0.0 if cfg.no_bias else np.concatenate([p["Wq"]["bias"].ravel(), p["Wkv"]["bias"].ravel()])
    qkv = x @ w + bias
    if cfg.clip_qkv is not None:
        qkv = np.clip(qkv, -cfg.clip_qkv, cfg.clip_qkv)
    q, k, v = np.split(qkv, [h * hd, h * hd + hkv * hd], axis=-1)
    if cfg.qk_ln:  # one norm over the whole H*hd (resp. Hkv*hd) vector of each token
        q = ref_layernorm(q, {key: a.reshape(-1) for key, a in p["q_ln"].items()}, cfg)
        k = ref_layernorm(k, {key: a.reshape(-1) for key, a in p["k_ln"].items()}, cfg)
    q = q.reshape(b, t, h, hd)
    k = np.repeat(k.reshape(b, t, hkv, hd), h // hkv, axis=2)
    v = np.repeat(v.reshape(b, t, hkv, hd), h // hkv, axis=2)
    scale = cfg.softmax_scale if cfg.softmax_scale is not None else 1.0 / math.sqrt(cfg.d_model / cfg.n_heads)
    scores = np.einsum("bihd,bjhd->bhij", q, k) * scale
    i, j = np.arange(t)[:, None], np.arange(t)[None, :]
    if cfg.alibi:
        scores = scores + ref_slopes(h, cfg.alibi_bias_max)[:, None, None] * (j - i)
    scores = np.where(j <= i, scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.einsum("bhij,bjhd->bihd", probs, v).reshape(b, t, h * hd)
    w_out = p["out_proj"]["kernel"].reshape(h * hd, d)
    return out @ w_out + (0.0 if cfg.no_bias else p["out_proj"]["bias"])


def ref_ffn(x, p, cfg):
    up = ref_linear(x, p["up_proj"], cfg)
    if cfg.ffn_type == "mptglu":
        hidden = ref_act(ref_linear(x, p["gate_proj"], cfg), cfg.ffn_act_fn) * up
    else:
        hidden = ref_act(up, cfg.ffn_act_fn)
    return ref_linear(hidden, p["down_proj"], cfg)


def ref_forward(cfg: MPTConfig, params, tokens) -> np.ndarray:
    """MPT forward in float64 (spec 1.2-1.7): embedding, pre-LN blocks, final LN, head, logit_scale."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    tokens = np.asarray(tokens)
    x = p["wte"]["embedding"][tokens]
    if cfg.learned_pos_emb and not cfg.alibi:
        x = x + p["wpe"]["embedding"][np.arange(tokens.shape[1])][None]
    for layer in range(cfg.n_layers):
        blk = jax.tree.map(lambda a, i=layer: a[i], p["blocks"])
        x = x + ref_attention(ref_layernorm(x, blk["norm_1"], cfg), blk["attn"], cfg)
        x = x + ref_ffn(ref_layernorm(x, blk["norm_2"], cfg), blk["ffn"], cfg)
    h = ref_layernorm(x, p["norm_f"], cfg)
    logits = h @ (p["wte"]["embedding"].T if cfg.tie_word_embeddings else p["lm_head"]["kernel"])
    if cfg.logit_scale == "inv_sqrt_d_model":
        logits = logits / math.sqrt(cfg.d_model)
    elif cfg.logit_scale is not None:
        logits = logits * cfg.logit_scale
    return logits


# name: (config overrides, overrides that each switch one option off again)
REFERENCE_CASES = {
    "default": ({}, []),
    "qk_ln": (dict(qk_ln=True), [dict(qk_ln=False)]),
    "qk_ln_mqa": (dict(qk_ln=True, **MQA), [dict(qk_ln=False)]),
    "logit_scale_0.5_untied_head": (
        dict(logit_scale=0.5, tie_word_embeddings=False),
        [dict(logit_scale=None), dict(tie_word_embeddings=True)],
    ),
    "biases": (dict(no_bias=False), [dict(no_bias=True)]),
    "biases_qk_ln_gqa_glu": (
        dict(no_bias=False, qk_ln=True, ffn_type="mptglu", **GQA),
        [dict(no_bias=True), dict(qk_ln=False), dict(ffn_type="mptmlp")],
    ),
    "clip_qkv_softmax_scale": (dict(clip_qkv=0.5, softmax_scale=0.7), [dict(clip_qkv=None), dict(softmax_scale=None)]),
    "mptglu_silu": (dict(ffn_type="mptglu", ffn_act_fn="silu"), [dict(ffn_act_fn="gelu"), dict(ffn_type="mptmlp")]),
    "learned_pos_emb": (LEARNED_POS, [dict(learned_pos_emb=False)]),
    "6_heads_bias_max_4_logit_scale_inv_sqrt_d_model": (
        dict(n_heads=6, alibi_bias_max=4, logit_scale="inv_sqrt_d_model"),
        [dict(alibi_bias_max=8), dict(logit_scale=None)],
    ),
    "ffn_hidden_size_norm_eps": (dict(ffn_hidden_size=72, norm_eps=1e-2), [dict(norm_eps=1e-5)]),
}


@pytest.mark.parametrize("name", list(REFERENCE_CASES))
def test_forward_matches_numpy_reference(name):
    """JAX logits equal the float64 reference within 1e-4; switching any of the options off changes the
    reference, so the comparison is sensitive to each of them."""
    overrides, off = REFERENCE_CASES[name]
    cfg = make_cfg(**overrides)
    params = random_params(cfg, seed=len(name))
    if cfg.no_bias:
        assert not any(path[-1].key == "bias" for path, _ in jax.tree_util.tree_leaves_with_path(params))
    tokens = random_tokens(cfg, (2, 13), seed=1)
    want = ref_forward(cfg, params, tokens)
    np.testing.assert_allclose(logits_of(cfg, params, tokens), want, atol=1e-4, rtol=1e-4)
    for changes in off:
        assert np.abs(ref_forward(cfg.replace(**changes), params, tokens) - want).max() > 1e-2, changes


# ------------------------------------------------------------------------------------------------
# MQA / GQA = MHA with repeated kv heads.


def mha_params_from_grouped(params, n_heads: int, n_kv: int, *, tile: bool = False):
    """MHA params whose query head h reads kv head h // (n_heads // n_kv) (np.tile instead: the wrong map)."""
    rep = n_heads // n_kv

    def expand(a, axis):
        return jnp.tile(a, [rep if i == axis else 1 for i in range(a.ndim)]) if tile else jnp.repeat(a, rep, axis)

    attn = dict(params["blocks"]["attn"])
    wq, wkv = attn.pop("Wq"), attn.pop("Wkv")
    fused = {"kernel": jnp.concatenate([wq["kernel"][:, :, None], expand(wkv["kernel"], 3)], axis=2)}
    if "bias" in wq:
        fused["bias"] = jnp.concatenate([wq["bias"][:, None], expand(wkv["bias"], 2)], axis=1)
    attn["Wqkv"] = fused
    if "k_ln" in attn:  # LayerNorm statistics of a repeated vector equal those of the original
        attn["k_ln"] = {key: expand(value, 1) for key, value in attn["k_ln"].items()}
    return {**params, "blocks": {**params["blocks"], "attn": attn}}


@pytest.mark.parametrize(
    "grouped",
    [GQA, MQA, dict(qk_ln=True, no_bias=False, **GQA)],
    ids=["gqa", "mqa", "gqa_qk_ln_biases"],
)
def test_grouped_attention_equals_mha_with_repeated_kv(grouped):
    """A GQA/MQA model equals the MHA model whose k/v weights repeat each kv head for its query group."""
    g_cfg = make_cfg(**grouped)
    m_cfg = make_cfg(**{k: v for k, v in grouped.items() if k not in ("attn_type", "kv_n_heads")})
    g_params = random_params(g_cfg, seed=3)
    m_params = mha_params_from_grouped(g_params, g_cfg.n_heads, g_cfg.num_kv_heads)
    expected = nn.meta.unbox(param_shapes(m_cfg))
    assert jax.tree.structure(m_params) == jax.tree.structure(expected)
    assert jax.tree.map(lambda a: a.shape, m_params) == jax.tree.map(lambda a: a.shape, expected)
    tokens = random_tokens(g_cfg, (2, 13), seed=4)
    g_logits = logits_of(g_cfg, g_params, tokens)
    np.testing.assert_allclose(logits_of(m_cfg, m_params, tokens), g_logits, atol=1e-5, rtol=1e-5)
    if g_cfg.num_kv_heads > 1:  # the other head map (h % n_kv) gives other logits
        wrong = mha_params_from_grouped(g_params, g_cfg.n_heads, g_cfg.num_kv_heads, tile=True)
        assert np.abs(logits_of(m_cfg, wrong, tokens) - g_logits).max() > 1e-3


# ------------------------------------------------------------------------------------------------
# Causality, packing, length.


def test_causality():
    """Changing token t changes no logit before t, and changes the logits at t and at every later position."""
    cfg = make_cfg(**GQA)
    params = random_params(cfg, seed=5)
    base = random_tokens(cfg, (13,), seed=6)
    for t in (0, 4, 9, 12):
        changed = base.copy()
        changed[t] = (changed[t] + 1) % cfg.vocab_size
        logits = logits_of(cfg, params, np.stack([base, changed]))  # the (2, 13) shape compiled once
        np.testing.assert_allclose(logits[1, :t], logits[0, :t], atol=1e-6, rtol=0)
        assert np.abs(logits[1, t:] - logits[0, t:]).max(-1).min() > 1e-4


@pytest.mark.parametrize("overrides", [{}, LEARNED_POS], ids=["alibi", "learned_pos_emb"])
def test_packed_documents_match_documents_alone(overrides):
    """Three documents packed in one row with segment ids 1,2,3 (and positions restarting at 0) give each
    document's logits as when it is run alone (alone = at the start of a row; causality makes what
    follows irrelevant). With one segment for the whole row the later documents' logits differ."""
    cfg = make_cfg(**overrides)
    params = random_params(cfg, seed=7)
    lengths = (5, 7, 4)
    length = sum(lengths)
    docs = [random_tokens(cfg, (n,), seed=10 + i) for i, n in enumerate(lengths)]
    filler = random_tokens(cfg, (length,), seed=20)
    tokens = np.stack([np.concatenate([doc, filler[: length - len(doc)]]) for doc in docs] + [np.concatenate(docs)])
    positions = np.stack([np.arange(length)] * 3 + [np.concatenate([np.arange(n) for n in lengths])])
    segment_ids = np.ones_like(tokens)
    segment_ids[3] = np.repeat([1, 2, 3], lengths)
    packed = logits_of(cfg, params, tokens, segment_ids, positions)
    unmasked = logits_of(cfg, params, tokens, np.ones_like(tokens), positions)  # same compiled function
    np.testing.assert_allclose(packed[:3], unmasked[:3], atol=1e-5, rtol=1e-5)
    starts = np.cumsum((0,) + lengths)
    for i, n in enumerate(lengths):
        np.testing.assert_allclose(packed[3, starts[i] : starts[i] + n], packed[i, :n], atol=1e-5, rtol=1e-5)
        if i > 0:
            assert np.abs(unmasked[3, starts[i] : starts[i] + n] - packed[i, :n]).max() > 1e-3


def test_alibi_runs_past_max_seq_len():
    """ALiBi needs no position table: a max_seq_len 16 model runs on 40 tokens and matches the float64
    reference there too."""
    cfg = make_cfg()
    params = random_params(cfg, seed=8)
    tokens = random_tokens(cfg, (1, 40), seed=9)
    logits = logits_of(cfg, params, tokens)
    assert logits.shape == (1, 40, cfg.vocab_size) and np.isfinite(logits).all()
    np.testing.assert_allclose(logits, ref_forward(cfg, params, tokens), atol=1e-4, rtol=1e-4)


def test_learned_pos_emb_rejects_length_past_max_seq_len():
    """Without ALiBi the learned position table bounds the length: 17 tokens with max_seq_len 16 is an error."""
    cfg = make_cfg(**LEARNED_POS)
    params = random_params(cfg, seed=8)
    tokens = jnp.asarray(random_tokens(cfg, (1, 17), seed=9))
    with pytest.raises(ValueError, match="max_seq_len"):
        MPT(cfg).apply({"params": params}, tokens)


# ------------------------------------------------------------------------------------------------
# embedding_fraction and remat: gradients. Compiling a gradient costs seconds on a CPU, so these tests
# share GRAD_CFG: one layer (the stacking of layers is checked by the forward tests), an untied head and a
# learned position table, so that every embedding gradient is visible.

GRAD_CFG = make_cfg(n_layers=1, tie_word_embeddings=False, **LEARNED_POS)


def _grad_inputs(seed: int):
    params = random_params(GRAD_CFG, seed=seed)
    tokens = random_tokens(GRAD_CFG, (2, 12), seed=seed + 1)
    targets = random_tokens(GRAD_CFG, (2, 12), seed=seed + 2)
    return params, tokens, targets


def test_embedding_fraction_scales_embedding_gradient_untied():
    """Untied head: embedding_fraction=0.25 leaves the forward unchanged and scales the wte and wpe gradients
    by exactly 0.25; every other gradient is unchanged."""
    params, tokens, targets = _grad_inputs(seed=11)
    (loss1, logits1), g1 = loss_grad(GRAD_CFG, params, tokens, targets)
    (loss_f, logits_f), g_f = loss_grad(GRAD_CFG.replace(embedding_fraction=0.25), params, tokens, targets)
    np.testing.assert_allclose(logits_f, logits1, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(loss_f, loss1, rtol=1e-6)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g1), jax.tree.leaves(g_f), strict=True):
        factor = 0.25 if path[0].key in ("wte", "wpe") else 1.0
        atol = 1e-5 * float(jnp.abs(a).max())
        np.testing.assert_allclose(b, factor * a, atol=atol, rtol=1e-5, err_msg=jax.tree_util.keystr(path))


def test_embedding_fraction_tied_head():
    """Tied head: wte's gradient is head_part + f * lookup_part. The two parts come from the untied model
    with lm_head = wte.T (the same function), whose wte gradient is the lookup part and lm_head's the head
    part; the head part is not scaled by f."""
    params, tokens, targets = _grad_inputs(seed=14)
    params["lm_head"]["kernel"] = params["wte"]["embedding"].T
    (_, logits_u), g_u = loss_grad(GRAD_CFG, params, tokens, targets)
    lookup, head = np.asarray(g_u["wte"]["embedding"]), np.asarray(g_u["lm_head"]["kernel"]).T
    assert np.abs(lookup).max() > 1e-4 and np.abs(head).max() > 1e-4
    f = 0.25
    tied = GRAD_CFG.replace(tie_word_embeddings=True, embedding_fraction=f)
    tied_params = {k: v for k, v in params.items() if k != "lm_head"}
    (_, logits_t), g_t = loss_grad(tied, tied_params, tokens, targets)
    np.testing.assert_allclose(logits_t, logits_u, atol=1e-5, rtol=1e-5)
    for got, want in [
        (g_t["wte"]["embedding"], head + f * lookup),
        (g_t["wpe"]["embedding"], f * g_u["wpe"]["embedding"]),
    ]:
        np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max(), rtol=1e-5)
    assert np.abs(g_t["wte"]["embedding"] - f * (head + lookup)).max() > 1e-4  # the head part is not scaled


def test_remat_policies_match_no_remat():
    """remat_policy 'full' and 'dots' change memory, not math: same logits and gradients as 'none' (1e-6)."""
    params, tokens, targets = _grad_inputs(seed=19)
    (loss0, logits0), g0 = loss_grad(GRAD_CFG, params, tokens, targets)
    for policy in ("full", "dots"):
        (loss, logits), g = loss_grad(GRAD_CFG.replace(remat_policy=policy), params, tokens, targets)
        np.testing.assert_allclose(logits, logits0, atol=1e-6, rtol=1e-6)
        np.testing.assert_allclose(loss, loss0, atol=1e-6, rtol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-6), g, g0)


# ------------------------------------------------------------------------------------------------
# Dropout, bfloat16.


def test_deterministic_forward_has_no_dropout():
    """deterministic=True (the default) ignores the dropout rates: it is the float64 reference's forward."""
    cfg = make_cfg(emb_pdrop=0.2, attn_pdrop=0.2, resid_pdrop=0.2)
    params = random_params(cfg, seed=17)
    tokens = random_tokens(cfg, (2, 13), seed=18)
    np.testing.assert_allclose(logits_of(cfg, params, tokens), ref_forward(cfg, params, tokens), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("field", ["emb_pdrop", "attn_pdrop", "resid_pdrop"])
def test_dropout(field):
    """Each dropout alone is active with deterministic=False (other logits than the no-dropout forward),
    reproducible for one 'dropout' rng and different for another."""
    cfg = make_cfg(**{field: 0.2})
    params = random_params(cfg, seed=17)
    tokens = random_tokens(cfg, (2, 13), seed=18)

    @jax.jit
    def train_logits(params, tokens, rng):
        return MPT(cfg).apply({"params": params}, tokens, deterministic=False, rngs={"dropout": rng})

    # rbg keys: XLA's RngBitGenerator compiles in a fraction of threefry's time; the dropout code is the same.
    a, b, c = (np.asarray(train_logits(params, tokens, jax.random.key(s, impl="rbg"))) for s in (1, 1, 2))
    assert np.isfinite(a).all()
    assert np.abs(a - ref_forward(cfg, params, tokens)).max() > 1e-2
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-2


def test_bfloat16_compute_close_to_float32():
    """dtype='bfloat16' (params float32) gives finite float32 logits within 5e-2 of max |float32 logits|."""
    cfg = make_cfg()
    params = random_params(cfg, seed=22)
    tokens = random_tokens(cfg, (2, 13), seed=23)
    full = logits_of(cfg, params, tokens)
    half = logits_of(cfg.replace(dtype="bfloat16"), params, tokens)
    assert np.isfinite(half).all()
    assert np.abs(half - full).max() <= 5e-2 * np.abs(full).max()
    assert np.abs(half - full).max() > 0  # it did compute in bfloat16
