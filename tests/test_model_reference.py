"""The whole MPT forward against a float64 numpy reference written from llm-foundry's definitions, plus the model's
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


def ref_layernorm(x, p, cfg, eps=None):
    """LayerNorm over the last axis (biased variance), weight, and bias unless no_bias."""
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    y = (x - mean) / np.sqrt(var + (cfg.norm_eps if eps is None else eps)) * p["scale"]
    return y if cfg.no_bias else y + p["bias"]


def ref_norm(x, p, cfg):
    """The block norms: torch.nn.RMSNorm (no mean, no bias) for the rms norm types, else LayerNorm."""
    if cfg.norm_type in ("rmsnorm", "low_precision_rmsnorm", "triton_rmsnorm"):
        return x / np.sqrt((x**2).mean(-1, keepdims=True) + cfg.norm_eps) * p["scale"]
    return ref_layernorm(x, p, cfg)


def ref_linear(x, p, cfg, bias=None):
    y = x @ p["kernel"]
    with_bias = (not cfg.no_bias) if bias is None else bias
    return y + p["bias"] if with_bias else y


_erf = np.vectorize(math.erf)


def _softplus(x):
    return np.log1p(np.exp(-np.abs(x))) + np.maximum(x, 0.0)


REF_ACTS = {  # torch.nn.functional's definitions, in float64
    "gelu": lambda x: 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0))),
    "gelu_tanh": lambda x: 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3))),
    "silu": lambda x: x / (1.0 + np.exp(-x)),
    "relu": lambda x: np.maximum(x, 0.0),
    "quick_gelu": lambda x: x / (1.0 + np.exp(-1.702 * x)),
    "leaky_relu": lambda x: np.where(x > 0, x, 0.01 * x),
    "tanh": np.tanh,
    "sigmoid": lambda x: 1.0 / (1.0 + np.exp(-x)),
    "softplus": lambda x: np.where(x > 20.0, x, _softplus(x)),
    "elu": lambda x: np.where(x > 0, x, np.expm1(x)),
    "selu": lambda x: 1.0507009873554805 * np.where(x > 0, x, 1.6732632423543772 * np.expm1(x)),
    "mish": lambda x: x * np.tanh(_softplus(x)),
    "relu6": lambda x: np.clip(x, 0.0, 6.0),
}


def ref_act(x, name):
    return REF_ACTS[name](x)


def ref_inv_freq(cfg, seq_len: int) -> np.ndarray:
    """RoPE frequencies theta^(-2i/d), with transformers' rope_hf_config scalings, in float64."""
    d = cfg.head_dim
    theta = cfg.rope_theta
    kind = cfg.rope_hf_type if cfg.rope_impl == "hf" else "no_scaling"
    if kind == "dynamic" and seq_len > cfg.max_seq_len:  # NTK-aware base, past the trained length
        theta *= (cfg.rope_hf_factor * seq_len / cfg.max_seq_len - (cfg.rope_hf_factor - 1)) ** (d / (d - 2))
    inv = np.array([theta ** (-2.0 * i / d) for i in range(d // 2)])
    if kind == "linear":
        inv = inv / cfg.rope_hf_factor
    if kind == "llama3":
        out = []
        for f in inv:
            wavelen, ctx = 2 * math.pi / f, cfg.rope_hf_original_max_position_embeddings
            lo, hi = cfg.rope_hf_low_freq_factor, cfg.rope_hf_high_freq_factor
            if wavelen < ctx / hi:
                out.append(f)
            elif wavelen > ctx / lo:
                out.append(f / cfg.rope_hf_factor)
            else:
                smooth = (ctx / wavelen - lo) / (hi - lo)
                out.append((1 - smooth) * f / cfg.rope_hf_factor + smooth * f)
        inv = np.array(out)
    return inv


def ref_rope(x, cfg, positions, seq_len: int, *, key: bool):
    """x [b, t, h, d] rotated GPT-NeoX style (HF's rotate_half form), float64; xpos scales q up and k down."""
    inv = ref_inv_freq(cfg, seq_len)
    angles = positions[:, :, None, None] * np.concatenate([inv, inv])  # [b, t, 1, d]
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    out = x * np.cos(angles) + rotated * np.sin(angles)
    if cfg.rope_impl == "dail" and cfg.rope_dail_type == "xpos":
        d = cfg.head_dim
        zeta = np.array([(2 * i + 0.4 * d) / (1.4 * d) for i in range(d // 2)])
        power = (positions - seq_len // 2)[:, :, None, None] / cfg.rope_dail_xpos_scale_base
        scale = np.concatenate([zeta, zeta]) ** power
        out = out / scale if key else out * scale
    return out


def ref_attention(x, p, cfg, positions=None, segment_ids=None):
    """llm-foundry's attention: [q|k|v] projection (fused or Wq/Wk/Wv), clip, q_ln/k_ln (LayerNorms with
    eps 1e-5 over the whole H*hd vector) or qk_gn (per head), temperature, RoPE, repeated kv heads, scaled
    scores, softcap, ALiBi in the causal form slope*(j - i), causal/segment/sliding-window masks, out_proj."""
    b, t, d = x.shape
    h, hkv, hd = cfg.n_heads, cfg.num_kv_heads, cfg.head_dim
    bias = cfg.qkv_bias
    if not cfg.fused_qkv:
        ws = [p[n]["kernel"].reshape(d, -1) for n in ("Wq", "Wk", "Wv")]
        bs = [
            p[n]["bias"].ravel() if bias else np.zeros(w.shape[1]) for n, w in zip(("Wq", "Wk", "Wv"), ws, strict=True)
        ]
        w, bvec = np.concatenate(ws, 1), np.concatenate(bs)
    elif cfg.attn_type == "multihead_attention":
        w = p["Wqkv"]["kernel"].reshape(d, 3 * h * hd)  # columns [q | k | v], head-major within each
        bvec = p["Wqkv"]["bias"].reshape(3 * h * hd) if bias else 0.0
    else:
        w = np.concatenate([p["Wq"]["kernel"].reshape(d, h * hd), p["Wkv"]["kernel"].reshape(d, 2 * hkv * hd)], 1)
        bvec = np.concatenate([p["Wq"]["bias"].ravel(), p["Wkv"]["bias"].ravel()]) if bias else 0.0
    qkv = x @ w + bvec
    if cfg.clip_qkv is not None:
        qkv = np.clip(qkv, -cfg.clip_qkv, cfg.clip_qkv)
    q, k, v = np.split(qkv, [h * hd, h * hd + hkv * hd], axis=-1)
    if cfg.qk_ln:  # one norm over the whole H*hd (resp. Hkv*hd) vector of each token
        q = ref_layernorm(q, {key: a.reshape(-1) for key, a in p["q_ln"].items()}, cfg, eps=1e-5)
        k = ref_layernorm(k, {key: a.reshape(-1) for key, a in p["k_ln"].items()}, cfg, eps=1e-5)
    q = q.reshape(b, t, h, hd)
    k = k.reshape(b, t, hkv, hd)
    if cfg.qk_gn:  # per head, one weight vector for all heads
        q = ref_layernorm(q, p["q_ln"], cfg, eps=1e-5)
        k = ref_layernorm(k, p["k_ln"], cfg, eps=1e-5)
    rows = np.broadcast_to(np.arange(t, dtype=np.float64), (b, t))
    if cfg.attn_temperature_attn_scale:
        pos = rows if positions is None else np.asarray(positions, np.float64)
        factor = (
            np.log(np.floor((pos + 1) / cfg.attn_temperature_floor_scale) + 1) * cfg.attn_temperature_attn_scale + 1
        )
        q = q * factor[:, :, None, None]
    if cfg.rope:
        q, k = ref_rope(q, cfg, rows, t, key=False), ref_rope(k, cfg, rows, t, key=True)
    k = np.repeat(k, h // hkv, axis=2)
    v = np.repeat(v.reshape(b, t, hkv, hd), h // hkv, axis=2)
    scale = cfg.softmax_scale if cfg.softmax_scale is not None else 1.0 / math.sqrt(cfg.d_model / cfg.n_heads)
    scores = np.einsum("bihd,bjhd->bhij", q, k) * scale
    if cfg.attn_logit_softcapping is not None:
        scores = cfg.attn_logit_softcapping * np.tanh(scores / cfg.attn_logit_softcapping)
    i, j = np.arange(t)[:, None], np.arange(t)[None, :]
    if cfg.alibi:
        scores = scores + ref_slopes(h, cfg.alibi_bias_max)[:, None, None] * (j - i)
    visible = np.broadcast_to(j <= i, (b, 1, t, t))
    if cfg.sliding_window_size >= 0:
        visible = visible & (np.abs(i - j) <= cfg.sliding_window_size)
    if segment_ids is not None:
        visible = visible & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    scores = np.where(visible, scores, -np.inf)
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


def ref_forward(cfg: MPTConfig, params, tokens, positions=None, segment_ids=None) -> np.ndarray:
    """MPT forward in float64: embedding, pre-norm blocks, final norm, head, logit_scale, final softcap."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    tokens = np.asarray(tokens)
    x = p["wte"]["embedding"][tokens]
    if cfg.learned_pos_emb and not cfg.alibi and not cfg.rope:
        pos = np.arange(tokens.shape[1])[None] if positions is None else np.asarray(positions)
        x = x + p["wpe"]["embedding"][pos]
    for layer in range(cfg.n_layers):
        blk = jax.tree.map(lambda a, i=layer: a[i], p["blocks"])
        x = x + ref_attention(ref_norm(x, blk["norm_1"], cfg), blk["attn"], cfg, positions, segment_ids)
        x = x + ref_ffn(ref_norm(x, blk["norm_2"], cfg), blk["ffn"], cfg)
    h = ref_norm(x, p["norm_f"], cfg)
    logits = h @ (p["wte"]["embedding"].T if cfg.tie_word_embeddings else p["lm_head"]["kernel"])
    if cfg.logit_scale == "inv_sqrt_d_model":
        logits = logits / math.sqrt(cfg.d_model)
    elif cfg.logit_scale is not None:
        logits = logits * cfg.logit_scale
    if cfg.final_logit_softcapping is not None:
        logits = cfg.final_logit_softcapping * np.tanh(logits / cfg.final_logit_softcapping)
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
    # llm-foundry 0.22's options beyond the released models.
    "qk_ln_eps_1e-2": (dict(qk_ln=True, norm_eps=1e-2), [dict(qk_ln=False)]),  # q_ln/k_ln keep eps 1e-5
    "rmsnorm": (dict(norm_type="rmsnorm", norm_eps=1e-2), [dict(norm_type="layernorm")]),
    "low_precision_rmsnorm_biases_qk_gn": (
        dict(norm_type="low_precision_rmsnorm", no_bias=False, qk_gn=True),
        [dict(norm_type="layernorm", no_bias=True), dict(qk_gn=False)],
    ),
    "qk_gn_gqa": (dict(qk_gn=True, **GQA), [dict(qk_gn=False)]),
    "attention_bias_only": (dict(attention_bias=True), [dict(attention_bias=False)]),
    "biases_but_no_attention_bias": (dict(no_bias=False, attention_bias=False), [dict(no_bias=True)]),
    "unfused_qkv_mha_clip_bias": (
        dict(fused_qkv=False, clip_qkv=0.4, attention_bias=True),
        [dict(clip_qkv=None), dict(attention_bias=False)],
    ),
    "unfused_qkv_gqa_qk_ln": (dict(fused_qkv=False, qk_ln=True, **GQA), [dict(qk_ln=False)]),
    "sliding_window_2": (dict(sliding_window_size=2), [dict(sliding_window_size=-1)]),
    "sliding_window_0_mqa": (dict(sliding_window_size=0, **MQA), [dict(sliding_window_size=-1)]),
    "attn_logit_softcapping": (dict(attn_logit_softcapping=0.3), [dict(attn_logit_softcapping=None)]),
    "final_logit_softcapping": (dict(final_logit_softcapping=1.0), [dict(final_logit_softcapping=None)]),
    "rope_dail": (dict(alibi=False, rope=True, rope_theta=100.0), [dict(rope=False), dict(rope_theta=10000.0)]),
    "rope_dail_xpos": (
        dict(alibi=False, rope=True, rope_dail_type="xpos", rope_dail_xpos_scale_base=4.0),
        [dict(rope_dail_type="original")],
    ),
    "rope_hf_linear": (
        dict(alibi=False, rope=True, rope_impl="hf", rope_hf_type="linear", rope_hf_factor=3.0),
        [dict(rope_hf_type="no_scaling")],
    ),
    "rope_hf_dynamic_past_max_seq_len": (  # 13 tokens > max_seq_len 8: the NTK base applies
        dict(alibi=False, rope=True, rope_impl="hf", rope_hf_type="dynamic", rope_hf_factor=4.0, max_seq_len=8),
        [dict(rope_hf_type="no_scaling")],
    ),
    "rope_hf_llama3_gqa_alibi": (
        dict(
            rope=True,
            rope_impl="hf",
            rope_theta=50.0,
            rope_hf_type="llama3",
            rope_hf_factor=8.0,
            rope_hf_low_freq_factor=1.0,
            rope_hf_high_freq_factor=4.0,
            rope_hf_original_max_position_embeddings=16,
            **GQA,
        ),
        [dict(rope_hf_type="no_scaling"), dict(alibi=False)],
    ),
    "attn_temperature_tuning": (
        dict(attn_temperature_attn_scale=0.5, attn_temperature_floor_scale=3.0),
        [dict(attn_temperature_attn_scale=0.0)],
    ),
    "gelu_tanh": (dict(ffn_act_fn="gelu_tanh", ffn_type="mptglu"), [dict(ffn_act_fn="gelu")]),
}

ACTIVATION_NAMES = ("relu", "quick_gelu", "leaky_relu", "tanh", "sigmoid", "softplus", "elu", "selu", "mish", "relu6")


@pytest.mark.parametrize("name", list(REFERENCE_CASES))
def test_forward_matches_numpy_reference(name):
    """JAX logits equal the float64 reference within 1e-4; switching any of the options off changes the
    reference, so the comparison is sensitive to each of them."""
    overrides, off = REFERENCE_CASES[name]
    cfg = make_cfg(**overrides)
    params = random_params(cfg, seed=len(name))
    biases = {
        "/".join(p.key for p in path)
        for path, _ in jax.tree_util.tree_leaves_with_path(params)
        if path[-1].key == "bias"
    }
    attn_biases = {b for b in biases if "/W" in b}  # Wqkv, Wq, Wkv, Wk, Wv
    assert bool(attn_biases) == cfg.qkv_bias
    assert bool(biases - attn_biases) == (not cfg.no_bias)
    tokens = random_tokens(cfg, (2, 13), seed=1)
    want = ref_forward(cfg, params, tokens)
    np.testing.assert_allclose(logits_of(cfg, params, tokens), want, atol=1e-4, rtol=1e-4)
    for changes in off:
        assert np.abs(ref_forward(cfg.replace(**changes), params, tokens) - want).max() > 1e-3, changes


@pytest.mark.parametrize("name", ACTIVATION_NAMES)
def test_activation_matches_numpy_reference(name):
    """Each supported ffn_act_fn (torch.nn.functional's definition) through a one-layer model."""
    cfg = make_cfg(ffn_act_fn=name, n_layers=1)
    params = random_params(cfg, seed=3)
    tokens = random_tokens(cfg, (2, 13), seed=1)
    want = ref_forward(cfg, params, tokens)
    np.testing.assert_allclose(logits_of(cfg, params, tokens), want, atol=1e-4, rtol=1e-4)
    assert np.abs(ref_forward(cfg.replace(ffn_act_fn="gelu"), params, tokens) - want).max() > 1e-3


def test_temperature_tuning_uses_document_positions():
    """With positions given (packed documents), the attention temperature follows them, as llm-foundry's
    pos_id_within_seq; the float64 reference with the same positions agrees."""
    cfg = make_cfg(attn_temperature_attn_scale=0.5, attn_temperature_floor_scale=2.0, attn_uses_sequence_id=True)
    params = random_params(cfg, seed=4)
    tokens = random_tokens(cfg, (2, 13), seed=2)
    positions = np.stack([np.arange(13), np.concatenate([np.arange(6), np.arange(7)])])
    segments = np.stack([np.ones(13, int), np.repeat([1, 2], [6, 7])])
    want = ref_forward(cfg, params, tokens, positions=positions, segment_ids=segments)
    np.testing.assert_allclose(logits_of(cfg, params, tokens, segments, positions), want, atol=1e-4, rtol=1e-4)
    assert np.abs(ref_forward(cfg, params, tokens, segment_ids=segments) - want).max() > 1e-3


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


def test_pallas_model_matches_xla_with_new_options():
    """The whole model through the Pallas kernels (interpret mode on CPU) equals the xla path with a
    sliding window, attention softcap, RoPE, qk_gn and GQA together."""
    cfg = make_cfg(
        sliding_window_size=3, attn_logit_softcapping=0.5, rope=True, alibi=False, qk_gn=True, n_layers=1, **GQA
    )
    params = random_params(cfg, seed=30)
    tokens = random_tokens(cfg, (2, 13), seed=31)
    want = ref_forward(cfg, params, tokens)
    np.testing.assert_allclose(logits_of(cfg.replace(attn_impl="pallas"), params, tokens), want, atol=1e-4, rtol=1e-4)
