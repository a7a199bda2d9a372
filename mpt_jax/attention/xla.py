"""Attention in plain jnp: the reference path and the CPU/TPU default.

Scores, logit softcapping, ALiBi bias, masks and softmax are float32 whatever the input dtype;
grouped kv heads are broadcast by reshaping the queries (no repeated k/v in memory). The order is
llm-foundry's: ``s = softmax_scale * q.k``, then ``s = c * tanh(s / c)`` (softcap c), then the
ALiBi bias, then the causal, sliding-window and segment masks.

This module also holds ``check_options``, the one validation of the sliding-window and softcap
arguments that every backend shares.
"""

from __future__ import annotations

import functools
import math
import numbers

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from mpt_jax import ops

# A large finite negative: exp() underflows to exactly 0, and a fully masked row stays finite.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def check_options(sliding_window, logit_softcap, *, caller: str) -> tuple[int | None, float | None]:
    """(window, softcap) normalized: None when off, else a Python int w >= 0 / float c > 0.

    ``sliding_window`` None or -1 is off (llm-foundry's ``sliding_window_size=-1``); ``logit_softcap``
    None is off. Both are compiled into the kernels, so they must be Python numbers, not arrays.
    """
    window = None
    if sliding_window is not None:
        if isinstance(sliding_window, bool) or not isinstance(sliding_window, numbers.Integral):
            raise ValueError(f"{caller}: sliding_window={sliding_window!r} must be an int (-1 or None: off)")
        if sliding_window < -1:
            raise ValueError(f"{caller}: sliding_window={sliding_window} must be -1 (off) or >= 0")
        window = None if sliding_window == -1 else int(sliding_window)
    softcap = None
    if logit_softcap is not None:
        if isinstance(logit_softcap, bool) or not isinstance(logit_softcap, numbers.Real):
            raise ValueError(f"{caller}: logit_softcap={logit_softcap!r} must be a Python number (None: off)")
        if not (math.isfinite(logit_softcap) and logit_softcap > 0):
            raise ValueError(f"{caller}: logit_softcap={logit_softcap} must be a finite number > 0 (None: off)")
        softcap = float(logit_softcap)
    return window, softcap


def attention_bias(
    q_len: int,
    kv_len: int,
    *,
    causal: bool,
    alibi_slopes: jax.Array | None,
    q_segment_ids: jax.Array | None,
    kv_segment_ids: jax.Array | None,
    sliding_window: int | None = None,
    q_positions: jax.Array | None = None,
    kv_positions: jax.Array | None = None,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Additive float32 bias of shape [batch or 1, heads or 1, q_len, kv_len].

    Queries are aligned to the end of the keys (query i sits at key position i + kv_len - q_len),
    unless ``q_positions`` [batch, q_len] gives each query's key position (a KV cache whose rows
    hold different lengths). Keys sit at 0..kv_len-1 unless ``kv_positions`` [batch, kv_len] says
    otherwise, and ``mask`` [batch, q_len, kv_len] (True: visible) masks further: together they lay
    out any tree of sequences in one row (continuations sharing one context, each placed after the
    previous one but positioned right after the context). ALiBi is ``-slope * |i - j|`` (for causal attention this equals
    MPT's ``slope * (j - i)``; row constants do not change the softmax). A sliding window w keeps
    key j for the query at position i iff ``|i - j| <= w`` (flash-attn's ``window_size=(w, w)``);
    None is no window.
    """
    if q_positions is None:
        q_pos = (jnp.arange(q_len, dtype=jnp.int32) + (kv_len - q_len))[None, None, :, None]
    else:
        q_pos = q_positions.astype(jnp.int32)[:, None, :, None]
    if kv_positions is None:
        kv_pos = jnp.arange(kv_len, dtype=jnp.int32)[None, None, None, :]
    else:
        kv_pos = kv_positions.astype(jnp.int32)[:, None, None, :]
    bias = jnp.zeros((1, 1, q_len, kv_len), jnp.float32)
    if alibi_slopes is not None:
        distance = jnp.abs(q_pos - kv_pos).astype(jnp.float32)
        bias = bias - alibi_slopes.astype(jnp.float32)[None, :, None, None] * distance
    allowed = jnp.ones((1, 1, q_len, kv_len), bool)
    if causal:
        allowed = allowed & (kv_pos <= q_pos)
    if sliding_window is not None:
        allowed = allowed & (jnp.abs(q_pos - kv_pos) <= sliding_window)
    if q_segment_ids is not None:
        same = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
        allowed = allowed & same[:, None]
    if mask is not None:
        allowed = allowed & mask.astype(bool)[:, None]
    return jnp.where(allowed, bias, MASK_VALUE)


def attend_xla(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool,
    alibi_slopes: jax.Array | None,
    q_segment_ids: jax.Array | None,
    kv_segment_ids: jax.Array | None,
    softmax_scale: float,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    sliding_window: int | None = None,
    logit_softcap: float | None = None,
    q_positions: jax.Array | None = None,
    kv_positions: jax.Array | None = None,
    mask: jax.Array | None = None,
) -> jax.Array:
    """q [B, S, H, D], k and v [B, T, Hkv, D] -> [B, S, H, D] in q's dtype.

    ``sliding_window`` and ``logit_softcap`` as checked by ``check_options`` (None: off);
    ``q_positions``, ``kv_positions`` and ``mask`` as in ``attention_bias``.
    """
    batch, q_len, n_heads, head_dim = q.shape
    kv_len, n_kv = k.shape[1], k.shape[2]
    group = n_heads // n_kv
    # The bias is rebuilt from these small inputs in the backward rather than kept ([H, S, T]).
    bias_inputs = dict(
        alibi_slopes=alibi_slopes,
        q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids,
        q_positions=q_positions,
        kv_positions=kv_positions,
        mask=mask,
    )
    make_bias = functools.partial(attention_bias, causal=causal, sliding_window=sliding_window)
    # Heads first, then each kv head's query heads as extra query rows ([B, Hkv, group * S, D]):
    # both products are plain batched matmuls (on a CPU several times faster than contracting in
    # the [B, S, H, D] layout). Head h reads kv head h // group.
    q = q.reshape(batch, q_len, n_kv, group, head_dim).transpose(0, 2, 3, 1, 4)
    q = q.reshape(batch, n_kv, group * q_len, head_dim)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    if dropout_rate > 0.0:
        if dropout_rng is None:
            raise ValueError("attend: dropout_rate > 0 needs a dropout_rng")
        bias = make_bias(q_len, kv_len, **bias_inputs)
        out = _attention_with_dropout(q, k, v, bias, softmax_scale, logit_softcap, dropout_rate, dropout_rng)
    else:
        # Causal attention with the default positions never looks past the query's own position:
        # a block of queries stops at its last query's key.
        cut = causal and q_positions is None and kv_positions is None
        blocks = query_blocks(q_len, kv_len, cut)
        out = _attention(q, k, v, bias_inputs, softmax_scale, logit_softcap, make_bias, blocks)
    return out.reshape(batch, n_heads, q_len, head_dim).transpose(0, 2, 1, 3)


# Under a remat policy that saves them (model.remat_policy "dots"), the attention's output and
# log-sum-exp are kept by these names and the backward recomputes nothing else of the forward.
OUT_NAME, LSE_NAME = "attention_out", "attention_lse"
SAVED_NAMES = (OUT_NAME, LSE_NAME)


def _logits(q, k, bias, scale, softcap):
    """Scores [B, Hkv, G*S, T] (float32): scale * q.k, softcapped, plus the bias; and the capped
    tanh (for the backward) or None."""
    batch, n_kv, rows, _ = q.shape
    kv_len = k.shape[2]
    s = jnp.einsum("bkqd,bktd->bkqt", q, k, preferred_element_type=jnp.float32) * scale
    tanh = None
    if softcap is not None:  # before the bias: ALiBi is not capped
        tanh = jnp.tanh(s / softcap)
        s = softcap * tanh
    # The bias is [B or 1, H or 1, S, T]; the rows here are (group, S) of each kv head, so a
    # per-head bias is the same memory as [B or 1, Hkv, G*S, T]; a head-less one repeats per group.
    b_batch, b_heads, q_len, _ = bias.shape
    group = rows // q_len
    if b_heads > 1:
        s = s + bias.reshape(b_batch, n_kv, rows, kv_len)
    elif group == 1:
        s = s + bias
    else:
        s = (s.reshape(batch, n_kv, group, q_len, kv_len) + bias[:, :, None]).reshape(s.shape)
    return s, tanh


# Queries per block of the blocked attention below: the float32 scores of a block are
# [batch, heads, QUERY_BLOCK, keys], a quarter of the whole at 512 tokens.
QUERY_BLOCK = 128
MAX_QUERY_BLOCKS = 16


def query_blocks(q_len: int, kv_len: int, causal_cut: bool) -> tuple[tuple[int, int, int], ...]:
    """(first query, end query, end key) of each block of queries: at most MAX_QUERY_BLOCKS blocks of
    about QUERY_BLOCK queries. With ``causal_cut`` (queries aligned to the end of the keys, keys
    at their own index) a block's keys end after its last query's position; else all keys."""
    n = max(1, min(MAX_QUERY_BLOCKS, q_len // QUERY_BLOCK))
    edges = [round(i * q_len / n) for i in range(n + 1)]
    offset = kv_len - q_len
    return tuple(
        (s0, s1, min(kv_len, s1 + offset) if causal_cut else kv_len)
        for s0, s1 in zip(edges[:-1], edges[1:], strict=True)
    )


def _block_bias(make_bias, bias_inputs, q_len, kv_len, block):
    """The bias [B or 1, H or 1, s1 - s0, kend] of one block: its queries at their positions (the
    default ones made explicit), the first kend keys."""
    s0, s1, kend = block
    inputs = dict(bias_inputs)
    q_positions = inputs["q_positions"]
    if q_positions is None:
        inputs["q_positions"] = (jnp.arange(s0, s1, dtype=jnp.int32) + (kv_len - q_len))[None]
    else:
        inputs["q_positions"] = q_positions[:, s0:s1]
    if inputs["q_segment_ids"] is not None:
        inputs["q_segment_ids"] = inputs["q_segment_ids"][:, s0:s1]
    for name in ("kv_segment_ids", "kv_positions"):
        if inputs[name] is not None:
            inputs[name] = inputs[name][:, :kend]
    if inputs["mask"] is not None:
        inputs["mask"] = inputs["mask"][:, s0:s1, :kend]
    return make_bias(s1 - s0, kend, **inputs)


def _rows(x: jax.Array, q_len: int, s0: int, s1: int) -> jax.Array:
    """Queries s0..s1 of every group of x [B, Hkv, G*S, ...] -> [B, Hkv, G*(s1 - s0), ...]."""
    if s0 == 0 and s1 == q_len:
        return x
    b, h, rows = x.shape[:3]
    grouped = x.reshape(b, h, rows // q_len, q_len, *x.shape[3:])[:, :, :, s0:s1]
    return grouped.reshape(b, h, -1, *x.shape[3:])


def _join(parts: list[jax.Array], q_len: int) -> jax.Array:
    """Blocks [B, Hkv, G*bq_i, ...] back to [B, Hkv, G*S, ...] (the inverse of ``_rows``)."""
    if len(parts) == 1:
        return parts[0]
    b, h = parts[0].shape[:2]
    tail = parts[0].shape[3:]
    group = sum(p.shape[2] for p in parts) // q_len
    grouped = [p.reshape(b, h, group, p.shape[2] // group, *tail) for p in parts]
    return jnp.concatenate(grouped, axis=3).reshape(b, h, group * q_len, *tail)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _attention(q, k, v, bias_inputs, scale, softcap, make_bias, blocks):
    """softmax(logits) @ v in the [B, Hkv, G*S, D] layout, in v's dtype, one block of queries at a
    time (``query_blocks``); a flash-style backward that recomputes each block's probabilities
    from q, k and the log-sum-exp instead of keeping [S, T] tensors (the bias too is rebuilt from
    its small inputs)."""
    return _attention_fwd(q, k, v, bias_inputs, scale, softcap, make_bias, blocks)[0]


def _attention_fwd(q, k, v, bias_inputs, scale, softcap, make_bias, blocks):
    q_len, kv_len = blocks[-1][1], k.shape[2]
    outs, lses = [], []
    for block in blocks:
        s0, s1, kend = block
        bias = _block_bias(make_bias, bias_inputs, q_len, kv_len, block)
        s, _ = _logits(_rows(q, q_len, s0, s1), k[:, :, :kend], bias, scale, softcap)
        m = jnp.max(s, axis=-1, keepdims=True)
        p = jnp.exp(s - m)
        total = jnp.sum(p, axis=-1, keepdims=True)
        lses.append((m + jnp.log(total))[..., 0])
        probs = (p / total).astype(v.dtype)
        out = jnp.einsum("bkqt,bktd->bkqd", probs, v[:, :, :kend], preferred_element_type=jnp.float32)
        outs.append(out.astype(v.dtype))
    lse = checkpoint_name(_join(lses, q_len), LSE_NAME)
    out = checkpoint_name(_join(outs, q_len), OUT_NAME)
    return out, (tuple(ops.keep(x) for x in (q, k, v, out)), bias_inputs, lse)


def _attention_bwd(scale, softcap, make_bias, blocks, residuals, g):
    kept, bias_inputs, lse = residuals
    q, k, v, out = (ops.restore(x) for x in kept)
    acc = jnp.promote_types(v.dtype, jnp.float32)
    q_len, kv_len = blocks[-1][1], k.shape[2]
    g = g.astype(v.dtype)
    dqs = []
    dk = jnp.zeros(k.shape, acc)
    dv = jnp.zeros(v.shape, acc)
    for block in blocks:
        s0, s1, kend = block
        qb, gb = _rows(q, q_len, s0, s1), _rows(g, q_len, s0, s1)
        kb, vb = k[:, :, :kend], v[:, :, :kend]
        bias = _block_bias(make_bias, bias_inputs, q_len, kv_len, block)
        s, tanh = _logits(qb, kb, bias, scale, softcap)
        p = jnp.exp(s - _rows(lse, q_len, s0, s1)[..., None])
        dv = dv.at[:, :, :kend].add(jnp.einsum("bkqt,bkqd->bktd", p.astype(v.dtype), gb, preferred_element_type=acc))
        dp = jnp.einsum("bkqd,bktd->bkqt", gb, vb, preferred_element_type=acc)
        delta = jnp.sum(gb.astype(acc) * _rows(out, q_len, s0, s1).astype(acc), axis=-1, keepdims=True)
        ds = p * (dp - delta)
        if tanh is not None:
            ds = ds * (1.0 - tanh * tanh)
        ds = (ds * scale).astype(q.dtype)
        dqs.append(jnp.einsum("bkqt,bktd->bkqd", ds, kb, preferred_element_type=acc).astype(q.dtype))
        dk = dk.at[:, :, :kend].add(jnp.einsum("bkqt,bkqd->bktd", ds, qb, preferred_element_type=acc))
    dq = _join(dqs, q_len)
    return dq, dk.astype(k.dtype), dv.astype(v.dtype), jax.tree.map(lambda _: None, bias_inputs)


_attention.defvjp(_attention_fwd, _attention_bwd)


def _attention_with_dropout(q, k, v, bias, scale, softcap, rate, rng):
    """The same attention with dropout on the probabilities, differentiated by jax (training with
    attn_pdrop > 0 is rare; its backward keeps the probabilities)."""
    s, _ = _logits(q, k, bias, scale, softcap)
    probs = jax.nn.softmax(s, axis=-1)
    keep = jax.random.bernoulli(rng, 1.0 - rate, probs.shape)
    probs = jnp.where(keep, probs / (1.0 - rate), 0.0).astype(v.dtype)
    return jnp.einsum("bkqt,bktd->bkqd", probs, v, preferred_element_type=jnp.float32).astype(v.dtype)
