"""The MPT decoder in Flax linen, top to bottom as in llm-foundry's ``modeling_mpt.py``.

    x = wte(tokens) [+ wpe(positions)]             # no position embedding with ALiBi
    for each block:                                   # nn.scan: one compiled block, stacked params
        x = x + attn(norm_1(x))                       # fused Wqkv, ALiBi, causal, segment ids
        x = x + ffn(norm_2(x))                        # up -> exact GELU -> down (or GLU)
    logits = norm_f(x) @ wte.T  [* logit_scale]       # tied head

Parameters live in ``cfg.param_dtype`` and every one carries logical axis names (``vocab``,
``embed``, ``heads``, ``kv_heads``, ``head_dim``, ``qkv``, ``mlp``, ``layers``) for sharding.
Matmuls run in ``cfg.dtype``; LayerNorm, attention scores, softmax and logits are float32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mpt_jax.attention import alibi_slopes, attend
from mpt_jax.config import REMAT_POLICIES, MPTConfig
from mpt_jax.initializers import embedding_init, weight_init

# Logical names of activations; sharding rules map them to mesh axes.
BATCH, LENGTH, EMBED_ACT, MLP_ACT = "activation_batch", "activation_length", "activation_embed", "activation_mlp"


def _param(module: nn.Module, name: str, init, shape: Sequence[int], axes: Sequence[str]) -> jax.Array:
    return module.param(
        name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), jnp.dtype(module.cfg.param_dtype)
    )


def _activation(name: str):
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    if name == "gelu_tanh":
        return lambda x: jax.nn.gelu(x, approximate=True)
    if name == "quick_gelu":
        return lambda x: x * jax.nn.sigmoid(1.702 * x)
    return {"silu": jax.nn.silu, "relu": jax.nn.relu}[name]


class Linear(nn.Module):
    """y = x @ kernel (+ bias), contracting the last ``n_in`` axes of x; kernel is (in..., out...)."""

    cfg: MPTConfig
    features: tuple[int, ...]
    axes: tuple[str, ...]  # logical names of the kernel axes, inputs then outputs
    n_in: int = 1
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
        n_in, n_out = math.prod(shape[: self.n_in]), math.prod(self.features)
        y = (x.astype(dtype).reshape(-1, n_in) @ kernel.astype(dtype).reshape(n_in, n_out)).reshape(
            *x.shape[: x.ndim - self.n_in], *self.features
        )
        if not cfg.no_bias:
            bias = _param(self, "bias", nn.initializers.zeros, self.features, self.axes[self.n_in :])
            y = y + bias.astype(dtype)
        return y


class LayerNorm(nn.Module):
    """LayerNorm in float32 over the trailing ``len(shape)`` axes; the bias exists only if not no_bias."""

    cfg: MPTConfig
    shape: tuple[int, ...]
    axes: tuple[str, ...]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        reduce = tuple(range(x.ndim - len(self.shape), x.ndim))
        x32 = x.astype(jnp.float32)
        mean = x32.mean(reduce, keepdims=True)
        var = jnp.square(x32 - mean).mean(reduce, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.cfg.norm_eps)
        y = y * _param(self, "scale", nn.initializers.ones, self.shape, self.axes).astype(jnp.float32)
        if not self.cfg.no_bias:
            y = y + _param(self, "bias", nn.initializers.zeros, self.shape, self.axes).astype(jnp.float32)
        return y.astype(self.cfg.dtype)


class Embedding(nn.Module):
    """A [rows, d_model] table: lookup, and (for the tied head) float32 logits against it."""

    cfg: MPTConfig
    rows: int
    axes: tuple[str, str]

    def setup(self):
        self.embedding = _param(self, "embedding", embedding_init(self.cfg), (self.rows, self.cfg.d_model), self.axes)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding, ids, axis=0).astype(self.cfg.dtype)

    def attend(self, h: jax.Array) -> jax.Array:
        dtype = jnp.dtype(self.cfg.dtype)
        return jnp.einsum(
            "btd,vd->btv", h.astype(dtype), self.embedding.astype(dtype), preferred_element_type=jnp.float32
        )


class Attention(nn.Module):
    """Fused-QKV attention with MHA/MQA/GQA, clip_qkv, qk_ln and ALiBi.

    MHA keeps llm-foundry's single fused Wqkv as one kernel [d, 3, heads, head_dim] (one matmul,
    shardable over heads); MQA/GQA split it into Wq [d, heads, hd] and Wkv [d, 2, kv_heads, hd].
    """

    cfg: MPTConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
        cfg = self.cfg
        n_heads, n_kv, head_dim = cfg.n_heads, cfg.num_kv_heads, cfg.head_dim

        def clip(t: jax.Array) -> jax.Array:
            return t if cfg.clip_qkv is None else jnp.clip(t, -cfg.clip_qkv, cfg.clip_qkv)

        if cfg.attn_type == "multihead_attention":
            qkv_axes = ("embed", "qkv", "heads", "head_dim")
            qkv = clip(Linear(cfg, (3, n_heads, head_dim), qkv_axes, fused=True, name="Wqkv")(x))
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        else:
            q = clip(Linear(cfg, (n_heads, head_dim), ("embed", "heads", "head_dim"), fused=True, name="Wq")(x))
            kv_axes = ("embed", "qkv", "kv_heads", "head_dim")
            kv = clip(Linear(cfg, (2, n_kv, head_dim), kv_axes, fused=True, name="Wkv")(x))
            k, v = kv[:, :, 0], kv[:, :, 1]
        if cfg.qk_ln:  # one LayerNorm over all heads' features, as llm-foundry's q_ln / k_ln
            q = LayerNorm(cfg, (n_heads, head_dim), ("heads", "head_dim"), name="q_ln")(q)
            k = LayerNorm(cfg, (n_kv, head_dim), ("kv_heads", "head_dim"), name="k_ln")(k)

        slopes = jnp.asarray(alibi_slopes(n_heads, cfg.alibi_bias_max)) if cfg.alibi else None
        use_dropout = cfg.attn_pdrop > 0.0 and not self.deterministic
        out = attend(
            q,
            k,
            v,
            causal=True,
            alibi_slopes=slopes,
            segment_ids=segment_ids,
            softmax_scale=cfg.attn_scale,
            dropout_rate=cfg.attn_pdrop if use_dropout else 0.0,
            dropout_rng=self.make_rng("dropout") if use_dropout else None,
            impl=cfg.attn_impl,
        )
        return Linear(cfg, (cfg.d_model,), ("heads", "head_dim", "embed"), n_in=2, residual=True, name="out_proj")(out)


class FeedForward(nn.Module):
    """mptmlp: down(act(up(x))); mptglu: down(act(gate(x)) * up(x))."""

    cfg: MPTConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        act = _activation(cfg.ffn_act_fn)
        h = Linear(cfg, (cfg.ffn_dim,), ("embed", "mlp"), name="up_proj")(x)
        if cfg.ffn_type == "mptglu":
            h = act(Linear(cfg, (cfg.ffn_dim,), ("embed", "mlp"), name="gate_proj")(x)) * h
        else:
            h = act(h)
        h = nn.with_logical_constraint(h, (BATCH, LENGTH, MLP_ACT))
        return Linear(cfg, (cfg.d_model,), ("mlp", "embed"), residual=True, name="down_proj")(h)


class Block(nn.Module):
    """Pre-LN transformer block; the scan body (carry: the residual stream)."""

    cfg: MPTConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, segment_ids: jax.Array | None) -> tuple[jax.Array, None]:
        cfg = self.cfg
        dropout = nn.Dropout(cfg.resid_pdrop, deterministic=self.deterministic)
        norm = (cfg.d_model,), ("embed",)
        h = LayerNorm(cfg, *norm, name="norm_1")(x)
        x = x + dropout(Attention(cfg, self.deterministic, name="attn")(h, segment_ids))
        h = LayerNorm(cfg, *norm, name="norm_2")(x)
        x = x + dropout(FeedForward(cfg, name="ffn")(h))
        return nn.with_logical_constraint(x, (BATCH, LENGTH, EMBED_ACT)), None


class MPT(nn.Module):
    """MPT causal language model: tokens [batch, length] -> float32 logits [batch, length, vocab].

    ``segment_ids`` (int [batch, length]) restricts attention to tokens of the same packed
    document; ``positions`` feed the learned position embedding (models without ALiBi) and default
    to 0..length-1. ``deterministic=False`` turns dropout on and needs a 'dropout' rng.
    """

    cfg: MPTConfig

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        cfg = self.cfg
        if tokens.ndim != 2:
            raise ValueError(f"MPT: tokens must be [batch, length], got shape {tokens.shape}")
        length = tokens.shape[1]
        wte = Embedding(cfg, cfg.vocab_size, ("vocab", "embed"), name="wte")
        x = wte(tokens)
        if cfg.uses_learned_pos_emb:
            if length > cfg.max_seq_len:
                raise ValueError(
                    f"MPT: length {length} exceeds max_seq_len={cfg.max_seq_len} of the learned position embedding"
                )
            if positions is None:
                positions = jnp.broadcast_to(jnp.arange(length), tokens.shape)
            x = x + Embedding(cfg, cfg.max_seq_len, ("length", "embed"), name="wpe")(positions)
        if cfg.embedding_fraction < 1.0:  # forward unchanged; the embedding's gradient scaled
            x = cfg.embedding_fraction * x + (1.0 - cfg.embedding_fraction) * jax.lax.stop_gradient(x)
        x = nn.Dropout(cfg.emb_pdrop, deterministic=deterministic)(x)
        x = nn.with_logical_constraint(x, (BATCH, LENGTH, EMBED_ACT))

        block = Block
        if cfg.remat_policy != "none":
            block = nn.remat(
                Block, policy=getattr(jax.checkpoint_policies, REMAT_POLICIES[cfg.remat_policy]), prevent_cse=False
            )
        blocks = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast,),
            length=cfg.n_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        x, _ = blocks(cfg, deterministic, name="blocks")(x, segment_ids)

        h = LayerNorm(cfg, (cfg.d_model,), ("embed",), name="norm_f")(x)
        if cfg.tie_word_embeddings:
            logits = wte.attend(h)
        else:
            logits = Linear(cfg.replace(no_bias=True), (cfg.vocab_size,), ("embed", "vocab"), name="lm_head")(h)
            logits = logits.astype(jnp.float32)
        if cfg.logit_multiplier is not None:
            logits = logits * cfg.logit_multiplier
        return logits


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
