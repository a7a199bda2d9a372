"""The MPT decoder in Flax linen, top to bottom as in llm-foundry's ``modeling_mpt.py``.

    x = wte(tokens) [+ wpe(positions)]             # no position embedding with ALiBi or RoPE
    for each block:                                   # nn.scan: one compiled block, stacked params
        x = x + attn(norm_1(x))                       # Wqkv, clip, qk-norm, RoPE, ALiBi, causal,
                                                      # segment ids, sliding window, softcap
        x = x + ffn(norm_2(x))                        # up -> exact GELU -> down (or GLU)
    logits = norm_f(x) @ wte.T  [* logit_scale]       # tied head [then final softcap]

Parameters live in ``cfg.param_dtype`` and every one carries logical axis names (``vocab``,
``embed``, ``heads``, ``kv_heads``, ``head_dim``, ``qkv``, ``mlp``, ``layers``) for sharding.
Matmuls run in ``cfg.dtype``; norms, attention scores, softmax and logits are float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from mpt_jax import ops
from mpt_jax.attention import SAVED_NAMES as ATTENTION_SAVED
from mpt_jax.attention import alibi_slopes, attend
from mpt_jax.config import QK_NORM_EPS, MPTConfig
from mpt_jax.initializers import embedding_init, weight_init
from mpt_jax.rope import apply_rope

# Logical names of activations; sharding rules map them to mesh axes.
BATCH, LENGTH, EMBED_ACT, MLP_ACT = "activation_batch", "activation_length", "activation_embed", "activation_mlp"


# The name remat policies save the linear layers' outputs by (``remat_policy``).
LINEAR_OUT = "linear_out"


def remat_policy(name: str):
    """The jax checkpoint policy of ``model.remat_policy`` (config.REMAT_POLICIES says what each
    keeps), or None for "none"."""
    if name == "none":
        return None
    if name == "full":
        return jax.checkpoint_policies.nothing_saveable
    saved = (LINEAR_OUT,) if name == "dots_no_batch" else (LINEAR_OUT, *ATTENTION_SAVED)
    return jax.checkpoint_policies.save_only_these_names(*saved)


def _param(module: nn.Module, name: str, init, shape: Sequence[int], axes: Sequence[str]) -> jax.Array:
    return module.param(
        name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), jnp.dtype(module.cfg.param_dtype)
    )


# The feed-forward activations by their torch.nn.functional names (config.FFN_ACT_FNS), with torch's
# default arguments. "gelu" is the exact (erf) one; JAX's default gelu is the tanh approximation.
ACTIVATIONS = {
    "gelu": ops.gelu,
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "leaky_relu": lambda x: jax.nn.leaky_relu(x, 0.01),
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "softplus": lambda x: jnp.where(x > 20.0, x, jax.nn.softplus(x)),  # torch's threshold=20
    "elu": jax.nn.elu,
    "selu": jax.nn.selu,
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
    "relu6": jax.nn.relu6,
}


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """cap * tanh(x / cap) (Gemma's logit softcapping); the identity when cap is None."""
    return x if cap is None else cap * jnp.tanh(x / cap)


def final_logits(z: jax.Array, cfg: MPTConfig) -> jax.Array:
    """The logits from the head's float32 product z: times logit_multiplier, then softcapped."""
    if cfg.logit_multiplier is not None:
        z = z * cfg.logit_multiplier
    return softcap(z, cfg.final_logit_softcapping)


# Weight-only int8 (mpt_jax/quantize.py): an int8 "kernel" / "embedding" comes with a float scale
# per output channel (per row of a table) under this suffix; the matmul dequantizes as it goes.
SCALE_SUFFIX = "_scale"


def _scale_of(module: nn.Module, name: str) -> jax.Array | None:
    """The int8 scale stored beside param ``name``, or None for a float param."""
    key = name + SCALE_SUFFIX
    return module.get_variable("params", key) if module.has_variable("params", key) else None


class Linear(nn.Module):
    """y = x @ kernel (+ bias), contracting the last ``n_in`` axes of x; kernel is (in..., out...).

    An int8 kernel (with its per-output scales) is converted to the compute dtype inside the matmul
    and the product scaled: ``(x @ q) * scale`` equals ``x @ (q * scale)`` exactly in real numbers.
    """

    cfg: MPTConfig
    features: tuple[int, ...]
    axes: tuple[str, ...]  # logical names of the kernel axes, inputs then outputs
    n_in: int = 1
    bias: bool = False
    residual: bool = False  # residual projections get llm-foundry's scaled-down init
    fused: bool = False  # the last output axis is one slice of a fused weight (per-head Wqkv init)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        shape = x.shape[x.ndim - self.n_in :] + tuple(self.features)
        slices = (-1,) if self.fused else None
        init = weight_init(cfg, in_axes=tuple(range(self.n_in)), residual=self.residual, slice_axes=slices)
        kernel = _param(self, "kernel", init, shape, self.axes)
        dtype = jnp.dtype(cfg.dtype)
        # One 2-D matmul: [tokens, in] @ [in, out] (XLA's CPU backend is fastest on plain 2-D dots).
        n_in = math.prod(shape[: self.n_in])
        x2 = x.reshape(-1, n_in)
        if jnp.issubdtype(kernel.dtype, jnp.floating):  # ops.matmul reshapes the kernel itself
            y = checkpoint_name(ops.matmul(x2, kernel, dtype), LINEAR_OUT)
        else:  # int8 weights (inference only): no gradient to shape
            y = x2.astype(dtype) @ kernel.reshape(n_in, -1).astype(dtype)
        y = y.reshape(*x.shape[: x.ndim - self.n_in], *self.features)
        scale = _scale_of(self, "kernel")
        if scale is not None:
            y = y * scale.astype(dtype)
        if self.bias:
            bias = _param(self, "bias", nn.initializers.zeros, self.features, self.axes[self.n_in :])
            y = y + bias.astype(dtype)
        return y


class Norm(nn.Module):
    """A norm in float32 over the trailing ``len(shape)`` axes: cfg.norm_type's LayerNorm (biased
    variance; a bias unless no_bias) or RMSNorm (no mean, no bias), with cfg.norm_eps.

    ``qk=True`` is llm-foundry's q_ln/k_ln, which its attention layer builds without being handed
    norm_type or norm_eps: always a LayerNorm with eps 1e-5 (a bias unless no_bias).
    """

    cfg: MPTConfig
    shape: tuple[int, ...]
    axes: tuple[str, ...]
    qk: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        rms = cfg.rms_norm and not self.qk
        eps = QK_NORM_EPS if self.qk else cfg.norm_eps
        scale = _param(self, "scale", nn.initializers.ones, self.shape, self.axes)
        bias = None
        if not cfg.no_bias and not rms:
            bias = _param(self, "bias", nn.initializers.zeros, self.shape, self.axes)
        return ops.norm(x, scale, bias, len(self.shape), eps, rms, jnp.dtype(cfg.dtype))


def lookup(table: jax.Array, ids: jax.Array, dtype, scale: jax.Array | None = None) -> jax.Array:
    """Rows ``ids`` of an embedding table in ``dtype``, an int8 table's times its per-row
    ``scale``. ``Embedding`` looks up with it, and so does ``steps.loss_and_grads``, which
    differentiates with respect to the rows rather than the table."""
    rows = jnp.take(table, ids, axis=0).astype(dtype)
    return rows if scale is None else rows * jnp.take(scale, ids, axis=0)[..., None].astype(dtype)


class Embedding(nn.Module):
    """A [rows, d_model] table: lookup, and (for the tied head) float32 logits against it."""

    cfg: MPTConfig
    rows: int
    axes: tuple[str, str]

    def setup(self):
        self.embedding = _param(self, "embedding", embedding_init(self.cfg), (self.rows, self.cfg.d_model), self.axes)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return lookup(self.embedding, ids, self.cfg.dtype, _scale_of(self, "embedding"))

    def attend(self, h: jax.Array) -> jax.Array:
        dtype = jnp.dtype(self.cfg.dtype)
        logits = jnp.einsum(
            "btd,vd->btv", h.astype(dtype), self.embedding.astype(dtype), preferred_element_type=jnp.float32
        )
        scale = _scale_of(self, "embedding")
        return logits if scale is None else logits * scale.astype(jnp.float32)


class Attention(nn.Module):
    """llm-foundry's attention: MHA/MQA/GQA, clip_qkv, qk_ln/qk_gn, temperature tuning, RoPE,
    then scaled scores with softcap, ALiBi, causal/segment/sliding-window masks.

    Projections: MHA keeps llm-foundry's fused Wqkv as one kernel [d, 3, heads, head_dim] (one
    matmul, shardable over heads); MQA/GQA split it into Wq [d, heads, hd] and Wkv [d, 2, kv_heads,
    hd]; ``fused_qkv=False`` has separate Wq, Wk, Wv as llm-foundry does.
    """

    cfg: MPTConfig
    deterministic: bool = True

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        segment_ids: jax.Array | None,
        positions: jax.Array | None,
        cache: Cache | None = None,
        cache_positions: jax.Array | None = None,
        prefill: bool = False,
        attention_mask: jax.Array | None = None,
    ) -> tuple[jax.Array, Cache | None]:
        """(output, updated cache). Without a cache: self-attention over x. With one (this layer's
        k, v [B, T, Hkv, hd]) the new keys and values are written at ``cache_positions`` [B]
        onwards; ``prefill`` attends among the new tokens only (they start their rows), otherwise
        the new queries attend to the whole cache, each row up to its own position. With an
        ``attention_mask`` [B, T, T] (no cache), ``positions`` are every token's own position, for
        RoPE and ALiBi too."""
        cfg = self.cfg
        n_heads, n_kv, head_dim = cfg.n_heads, cfg.num_kv_heads, cfg.head_dim

        def proj(features, axes, name):
            return clip(Linear(cfg, features, axes, bias=cfg.qkv_bias, fused=True, name=name)(x))

        def clip(t: jax.Array) -> jax.Array:
            return t if cfg.clip_qkv is None else jnp.clip(t, -cfg.clip_qkv, cfg.clip_qkv)

        if not cfg.fused_qkv:
            q = proj((n_heads, head_dim), ("embed", "heads", "head_dim"), "Wq")
            k = proj((n_kv, head_dim), ("embed", "kv_heads", "head_dim"), "Wk")
            v = proj((n_kv, head_dim), ("embed", "kv_heads", "head_dim"), "Wv")
        elif cfg.attn_type == "multihead_attention":
            qkv = proj((3, n_heads, head_dim), ("embed", "qkv", "heads", "head_dim"), "Wqkv")
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        else:
            q = proj((n_heads, head_dim), ("embed", "heads", "head_dim"), "Wq")
            kv = proj((2, n_kv, head_dim), ("embed", "qkv", "kv_heads", "head_dim"), "Wkv")
            k, v = kv[:, :, 0], kv[:, :, 1]
        if cfg.qk_ln:  # one norm over all heads' features of a token (q_ln / k_ln)
            q = Norm(cfg, (n_heads, head_dim), ("heads", "head_dim"), qk=True, name="q_ln")(q)
            k = Norm(cfg, (n_kv, head_dim), ("kv_heads", "head_dim"), qk=True, name="k_ln")(k)
        elif cfg.qk_gn:  # one norm per head over head_dim, its weights shared by the heads
            q = Norm(cfg, (head_dim,), ("head_dim",), qk=True, name="q_ln")(q)
            k = Norm(cfg, (head_dim,), ("head_dim",), qk=True, name="k_ln")(k)

        length = x.shape[1]
        row_positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), x.shape[:2])
        total: int | jax.Array = length  # the length the forward covers, cached keys included
        if cache is not None:
            row_positions = row_positions + cache_positions[:, None].astype(jnp.int32)
            total = cache_positions.astype(jnp.int32) + length
        elif attention_mask is not None:  # a tree of sequences: positions are not the row index
            row_positions = positions.astype(jnp.int32)
            total = jnp.max(row_positions, axis=1) + 1
        if cfg.uses_temperature_tuning:  # Llama 4's attention temperature, by position in the document
            pos = (row_positions if positions is None else positions).astype(jnp.float32)
            floor = jnp.floor((pos + 1.0) / cfg.attn_temperature_floor_scale)
            temperature = jnp.log(floor + 1.0) * cfg.attn_temperature_attn_scale + 1.0
            q = (q.astype(jnp.float32) * temperature[:, :, None, None]).astype(q.dtype)
        if cfg.rope:  # by position in the row (not restarted for packed documents), or in the tree
            q, k = apply_rope(q, k, row_positions, cfg, seq_len=total)

        q_positions = kv_positions = None
        if attention_mask is not None:
            q_positions = kv_positions = row_positions
        if cache is not None:
            new_cache = {
                name: nn.with_logical_constraint(write_cache(cache[name], t, cache_positions), CACHE_AXES[1:])
                for name, t in (("k", k), ("v", v))
            }
            if not prefill:  # attend to everything this row holds, up to each query's position
                k, v, q_positions = new_cache["k"], new_cache["v"], row_positions
        else:
            new_cache = None
        slopes = jnp.asarray(alibi_slopes(n_heads, cfg.alibi_bias_max)) if cfg.alibi else None
        use_dropout = cfg.attn_pdrop > 0.0 and not self.deterministic
        out = attend(
            q,
            k,
            v,
            q_positions=q_positions,
            kv_positions=kv_positions,
            mask=attention_mask,
            causal=True,
            alibi_slopes=slopes,
            segment_ids=segment_ids,
            softmax_scale=cfg.attn_scale,
            sliding_window=cfg.sliding_window_size if cfg.sliding_window_size >= 0 else None,
            logit_softcap=cfg.attn_logit_softcapping,
            dropout_rate=cfg.attn_pdrop if use_dropout else 0.0,
            dropout_rng=self.make_rng("dropout") if use_dropout else None,
            impl=cfg.attn_impl,
        )
        out_axes = ("heads", "head_dim", "embed")
        out = Linear(cfg, (cfg.d_model,), out_axes, n_in=2, bias=not cfg.no_bias, residual=True, name="out_proj")(out)
        return out, new_cache


class FeedForward(nn.Module):
    """mptmlp: down(act(up(x))); mptglu: down(act(gate(x)) * up(x))."""

    cfg: MPTConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        act, bias = ACTIVATIONS[cfg.ffn_act_fn], not cfg.no_bias
        h = Linear(cfg, (cfg.ffn_dim,), ("embed", "mlp"), bias=bias, name="up_proj")(x)
        if cfg.ffn_type == "mptglu":
            h = act(Linear(cfg, (cfg.ffn_dim,), ("embed", "mlp"), bias=bias, name="gate_proj")(x)) * h
        else:
            h = act(h)
        h = nn.with_logical_constraint(h, (BATCH, LENGTH, MLP_ACT))
        return Linear(cfg, (cfg.d_model,), ("mlp", "embed"), bias=bias, residual=True, name="down_proj")(h)


class Block(nn.Module):
    """Pre-LN transformer block; the scan body (carry: the residual stream; scanned: the layer's cache)."""

    cfg: MPTConfig
    deterministic: bool = True

    prefill: bool = False

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        segment_ids: jax.Array | None,
        positions: jax.Array | None,
        cache: Cache | None,
        cache_positions: jax.Array | None,
        attention_mask: jax.Array | None = None,
    ) -> tuple[jax.Array, Cache | None]:
        cfg = self.cfg
        dropout = nn.Dropout(cfg.resid_pdrop, deterministic=self.deterministic)
        norm = (cfg.d_model,), ("embed",)
        h = Norm(cfg, *norm, name="norm_1")(x)
        attn = Attention(cfg, self.deterministic, name="attn")
        h, cache = attn(h, segment_ids, positions, cache, cache_positions, self.prefill, attention_mask)
        x = x + dropout(h)
        h = Norm(cfg, *norm, name="norm_2")(x)
        x = x + dropout(FeedForward(cfg, name="ffn")(h))
        return nn.with_logical_constraint(x, (BATCH, LENGTH, EMBED_ACT)), cache


class MPT(nn.Module):
    """MPT causal language model: tokens [batch, length] -> float32 logits [batch, length, vocab].

    ``segment_ids`` (int [batch, length]) restricts attention to tokens of the same packed
    document; ``positions`` (positions within each document) feed the learned position embedding
    and the attention temperature, and default to 0..length-1 (RoPE always uses the row index, as
    llm-foundry does). ``deterministic=False`` turns dropout on and needs a 'dropout' rng.

    Decoding: with ``cache`` (``init_cache``: k and v [layers, batch, cache_len, kv_heads,
    head_dim]) and ``cache_positions`` [batch] (how many tokens each row already holds), the
    tokens are written to the cache from that position on and ``(logits, cache)`` is returned.
    Each row is independent (rows are slots that can hold different requests). ``prefill=True``
    means the tokens start their rows: they attend among themselves with the training attention
    (any ``attn_impl``); otherwise they attend to each row's cache up to their own position.
    Positions (RoPE, ALiBi, learned) count from the start of the row, so an ALiBi model decodes
    past ``max_seq_len`` when the cache is longer. ``logit_positions`` (int [batch, k]) computes
    logits only there (a prefill needs the last prompt position's, not a [length, vocab] block);
    a flat [k] gives indices into all batch x length positions and logits [1, k, vocab].

    Trees: ``attention_mask`` (bool [batch, length, length], True where query t may see key s;
    no cache, no segment ids) with ``positions`` lays out sequences that share a beginning in one
    row (a context, then each continuation positioned right after it and seeing only the context
    and itself): every position-dependent term (learned embedding, RoPE, ALiBi, sliding window)
    follows ``positions``. Scoring many continuations of one context runs the context once.

    ``head=False`` returns the final-normed hidden states [batch, length, d_model] (compute dtype)
    instead of logits: the training loss (loss.py) applies the head itself, chunk by chunk.
    ``embeddings`` ([batch, length, d_model], ``wte(tokens)`` looked up by the caller) replace the
    lookup: the train step takes them outside the differentiated function (``steps.loss_fn``).
    """

    cfg: MPTConfig
    scan_layers: bool = True

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        deterministic: bool = True,
        cache: Cache | None = None,
        cache_positions: jax.Array | None = None,
        prefill: bool = False,
        logit_positions: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        head: bool = True,
        embeddings: jax.Array | None = None,
    ) -> jax.Array | tuple[jax.Array, Cache]:
        cfg = self.cfg
        if tokens.ndim != 2:
            raise ValueError(f"MPT: tokens must be [batch, length], got shape {tokens.shape}")
        if (cache is None) != (cache_positions is None):
            raise ValueError("MPT: cache and cache_positions go together")
        if attention_mask is not None:
            if cache is not None or segment_ids is not None or positions is None:
                raise ValueError("MPT: an attention_mask needs positions, and takes no cache or segment_ids")
            if attention_mask.shape != (tokens.shape[0], tokens.shape[1], tokens.shape[1]):
                raise ValueError(
                    f"MPT: attention_mask {attention_mask.shape} is not [batch, length, length] {tokens.shape}"
                )
        batch, length = tokens.shape
        if cache is not None:
            shape = cache_shape(cache)
            if shape[:2] != (cfg.n_layers, batch) or length > shape[2] or isinstance(cache, dict) != self.scan_layers:
                layout = "stacked (a dict)" if self.scan_layers else "per layer (a list)"
                raise ValueError(
                    f"MPT: cache {shape} does not fit {cfg.n_layers} layers x {batch} rows of {length} tokens, {layout}"
                )
            if positions is None:
                positions = cache_positions[:, None].astype(jnp.int32) + jnp.arange(length, dtype=jnp.int32)
        wte = Embedding(cfg, cfg.vocab_size, ("vocab", "embed"), name="wte")
        x = wte(tokens) if embeddings is None else embeddings.astype(cfg.dtype)
        if cfg.uses_learned_pos_emb:
            if length > cfg.max_seq_len:
                raise ValueError(
                    f"MPT: length {length} exceeds max_seq_len={cfg.max_seq_len} of the learned position embedding"
                )
            wpe_positions = jnp.broadcast_to(jnp.arange(length), tokens.shape) if positions is None else positions
            x = x + Embedding(cfg, cfg.max_seq_len, ("length", "embed"), name="wpe")(wpe_positions)
        if cfg.embedding_fraction < 1.0:  # forward unchanged; the embedding's gradient scaled
            x = cfg.embedding_fraction * x + (1.0 - cfg.embedding_fraction) * jax.lax.stop_gradient(x)
        x = nn.Dropout(cfg.emb_pdrop, deterministic=deterministic)(x)
        x = nn.with_logical_constraint(x, (BATCH, LENGTH, EMBED_ACT))

        block = Block
        if cfg.remat_policy != "none":
            block = nn.remat(Block, policy=remat_policy(cfg.remat_policy), prevent_cse=False)
        if self.scan_layers:
            blocks = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast, nn.broadcast),
                length=cfg.n_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x, cache = blocks(cfg, deterministic, prefill, name="blocks")(
                x, segment_ids, positions, cache, cache_positions, attention_mask
            )
        else:  # one module per layer: each layer's weights (and cache) are arrays of their own
            caches = []
            for i in range(cfg.n_layers):
                layer = block(cfg, deterministic, prefill, name=f"{LAYERS}_{i}")
                layer_cache = None if cache is None else cache[i]
                x, c = layer(x, segment_ids, positions, layer_cache, cache_positions, attention_mask)
                caches.append(c)
            cache = None if cache is None else caches

        if logit_positions is not None and logit_positions.ndim == 1:  # flat indices: [1, k, vocab]
            x = jnp.take(x.reshape(-1, x.shape[-1]), logit_positions.astype(jnp.int32), axis=0)[None]
        elif logit_positions is not None:  # only the rows' positions whose next token is wanted
            x = jnp.take_along_axis(x, logit_positions.astype(jnp.int32)[..., None], axis=1)
        h = Norm(cfg, (cfg.d_model,), ("embed",), name="norm_f")(x)
        if not head and not self.is_initializing():  # (init still creates the head's params)
            return h  # the training loss (loss.py) multiplies by the head weights itself
        if cfg.tie_word_embeddings:
            logits = wte.attend(h)
        else:
            logits = Linear(cfg, (cfg.vocab_size,), ("embed", "vocab"), name="lm_head")(h).astype(jnp.float32)
        logits = final_logits(logits, cfg)
        return logits if cache is None else (logits, cache)


# ------------------------------------------------------------------------------------------------
# The KV cache: per layer k and v, stacked over layers like the params, or a list of layers.

Cache = dict[str, jax.Array]  # {"k": [L, B, T, Hkv, hd], "v": [L, B, T, Hkv, hd]} (one layer: no L)
CACHE_AXES = ("layers", "cache_batch", "cache_length", "kv_heads", "head_dim")


def init_cache(
    cfg: MPTConfig, batch: int, length: int, dtype: str | None = None, *, scan_layers: bool = True
) -> Cache | list[Cache]:
    """Zeros for ``batch`` rows of ``length`` positions; ``dtype`` defaults to the compute dtype.
    ``scan_layers=False``: a list of one cache per layer, for ``MPT(cfg, scan_layers=False)``."""
    shape = (batch, length, cfg.num_kv_heads, cfg.head_dim)
    dt = jnp.dtype(dtype or cfg.dtype)
    if not scan_layers:
        return [{"k": jnp.zeros(shape, dt), "v": jnp.zeros(shape, dt)} for _ in range(cfg.n_layers)]
    return {"k": jnp.zeros((cfg.n_layers, *shape), dt), "v": jnp.zeros((cfg.n_layers, *shape), dt)}


def cache_shape(cache: Cache | list[Cache]) -> tuple[int, ...]:
    """(layers, batch, length, kv_heads, head_dim) of a stacked or per-layer cache."""
    if isinstance(cache, dict):
        return tuple(cache["k"].shape)
    return (len(cache), *cache[0]["k"].shape)


def write_cache(layer: jax.Array, new: jax.Array, positions: jax.Array) -> jax.Array:
    """Row b of ``layer`` [B, T, Hkv, hd] gets ``new[b]`` [S, Hkv, hd] at positions[b] .. + S - 1.

    The caller keeps positions[b] + S <= T (XLA would clamp the start and overwrite earlier keys)."""

    def one(row, update, start):
        return jax.lax.dynamic_update_slice(row, update.astype(row.dtype), (start, 0, 0))

    return jax.vmap(one)(layer, new, positions.astype(jnp.int32))


# ------------------------------------------------------------------------------------------------
# Params layouts: ``blocks`` stacked over layers (training, checkpoints) or ``blocks_0`` ..
# ``blocks_{L-1}`` (``scan_layers=False``). XLA:CPU copies a layer's weights out of the stacked
# arrays on every scan step; arrays of their own are read in place, which is what decoding (one
# token, bound by reading the weights) needs on a CPU.

LAYERS = "blocks"


def unstack_layers(params: dict, n_layers: int, take: Callable[[Any, int], Any] | None = None) -> dict:
    """The per-layer layout of a stacked params tree (a new tree; the stacked one is untouched);
    a per-layer tree is returned as it is. ``take(leaf, i)`` gives layer i of a leaf (default
    ``leaf[i]``; a tree of shardings passes its own)."""
    if LAYERS not in params:
        return params
    take = take or (lambda x, i: x[i])
    out = {k: v for k, v in params.items() if k != LAYERS}
    for i in range(n_layers):
        out[f"{LAYERS}_{i}"] = jax.tree.map(lambda x, i=i: take(x, i), params[LAYERS])
    return out


def is_stacked(params: dict) -> bool:
    """Whether a params tree has the stacked layout (``MPT(cfg)``) rather than the per-layer one."""
    return LAYERS in params


def param_shapes(cfg: MPTConfig, length: int = 8):
    """The abstract params tree (ShapeDtypeStructs, with logical-axis boxes): nothing is allocated."""
    model = MPT(cfg)
    tokens = jax.ShapeDtypeStruct((1, min(length, cfg.max_seq_len)), jnp.int32)
    return jax.eval_shape(lambda t: model.init(jax.random.key(0), t), tokens)["params"]


def count_params(cfg: MPTConfig) -> int:
    """Number of parameters, computed from the model's abstract shapes."""
    leaves = jax.tree.leaves(nn.meta.unbox(param_shapes(cfg)))
    return sum(int(leaf.size) for leaf in leaves)


def init_params(cfg: MPTConfig, rng: jax.Array, length: int = 8):
    """Concrete, unboxed float params for ``cfg`` (on the default device)."""
    tokens = jnp.zeros((1, min(length, cfg.max_seq_len)), jnp.int32)
    return nn.meta.unbox(jax.jit(MPT(cfg).init)(rng, tokens)["params"])


def flat_params(tree) -> list[tuple[tuple[str, ...], Any]]:
    """(path of dict keys, leaf) for every leaf of a params tree: the one way paths are spelled."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [(tuple(str(getattr(k, "key", k)) for k in path), leaf) for path, leaf in flat]
