"""The float64 attention reference shared by the xla and Pallas attention tests.

Written from llm-foundry's MPT attention (``scaled_multihead_dot_product_attention`` and the
flash-attn path): ``u = scale * q.k``; softcap c: ``z = c * tanh(u / c)`` (else ``z = u``); plus
ALiBi ``-slope * |i - j|``; masks (causal, sliding window, segments); softmax; times v. Query i
sits at key position ``i + kv_len - q_len``.
"""

from __future__ import annotations

import numpy as np


def _allowed(s_len, t_len, *, causal, window, q_seg, kv_seg) -> np.ndarray:
    """[B or 1, 1, S, T] bool: which keys each query may see."""
    q_pos = np.arange(s_len)[:, None] + (t_len - s_len)
    kv_pos = np.arange(t_len)[None, :]
    allowed = np.ones((1, 1, s_len, t_len), bool)
    if causal:
        allowed = allowed & (kv_pos <= q_pos)
    if window is not None:  # keys from w before to w after the query's position, both inclusive
        allowed = allowed & (kv_pos >= q_pos - window) & (kv_pos <= q_pos + window)
    if q_seg is not None:
        allowed = allowed & (np.asarray(q_seg)[:, None, :, None] == np.asarray(kv_seg)[:, None, None, :])
    assert allowed.any(-1).all(), "test setup: every query must see at least one key"
    return allowed


def _probs_and_cap_grad(q, k, *, causal, slopes, q_seg, kv_seg, scale, window, softcap):
    """(probs [B, H, S, T], d z / d u [B, H, S, T]) in float64; kv heads already repeated."""
    s_len, t_len = q.shape[1], k.shape[1]
    u = np.einsum("bshd,bthd->bhst", q, k) * scale
    if softcap is None:
        z, dz_du = u, np.ones_like(u)
    else:
        z = softcap * np.tanh(u / softcap)
        dz_du = 1.0 - np.tanh(u / softcap) ** 2
    if slopes is not None:
        q_pos = np.arange(s_len)[:, None] + (t_len - s_len)
        kv_pos = np.arange(t_len)[None, :]
        z = z - np.asarray(slopes, np.float64)[None, :, None, None] * np.abs(q_pos - kv_pos)
    allowed = _allowed(s_len, t_len, causal=causal, window=window, q_seg=q_seg, kv_seg=kv_seg)
    z = np.where(allowed, z, -np.inf)
    p = np.exp(z - z.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True), dz_du


def reference_probs(q, k, *, causal, slopes, q_seg, kv_seg, scale, window=None, softcap=None) -> np.ndarray:
    """Softmax probabilities [B, H, S, T] in float64 for q [B, S, H, D] and k [B, T, H, D] (kv heads
    already repeated): scaled scores, softcap, ALiBi -slope*|i - j| with queries aligned to the last
    keys, causal, sliding-window and segment masks."""
    p, _ = _probs_and_cap_grad(
        q, k, causal=causal, slopes=slopes, q_seg=q_seg, kv_seg=kv_seg, scale=scale, window=window, softcap=softcap
    )
    return p


def reference_attention(q, k, v, w, *, causal, slopes, q_seg, kv_seg, scale, window=None, softcap=None):
    """(out, dq, dk, dv) in float64 for loss = sum(w * out); q [B, S, H, D], k and v [B, T, Hkv, D].

    Kv heads are repeated for the math and their gradients summed back over each group.
    """
    q, k, v, w = (np.asarray(a, np.float64) for a in (q, k, v, w))
    batch, _, n_heads, _ = q.shape
    t_len, n_kv = k.shape[1], k.shape[2]
    group = n_heads // n_kv
    kr, vr = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    p, dz_du = _probs_and_cap_grad(
        q, kr, causal=causal, slopes=slopes, q_seg=q_seg, kv_seg=kv_seg, scale=scale, window=window, softcap=softcap
    )
    out = np.einsum("bhst,bthd->bshd", p, vr)
    dp = np.einsum("bshd,bthd->bhst", w, vr)
    dz = p * (dp - (dp * p).sum(-1, keepdims=True))  # softmax backward
    du = dz * dz_du  # through the softcap (the bias and masks do not depend on q, k)
    dq = np.einsum("bhst,bthd->bshd", du, kr) * scale
    dkr = np.einsum("bhst,bshd->bthd", du, q) * scale
    dvr = np.einsum("bhst,bshd->bthd", p, w)
    dk = dkr.reshape(batch, t_len, n_kv, group, -1).sum(3)
    dv = dvr.reshape(batch, t_len, n_kv, group, -1).sum(3)
    return out, dq, dk, dv
