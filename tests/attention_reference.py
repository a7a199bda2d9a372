"""The float64 attention reference shared by the xla and Pallas attention tests."""

from __future__ import annotations

import numpy as np


def reference_probs(q, k, *, causal, slopes, q_seg, kv_seg, scale) -> np.ndarray:
    """Softmax probabilities [B, H, S, T] in float64 for q [B, S, H, D] and k [B, T, H, D] (kv heads
    already repeated): scaled scores, ALiBi -slope*|i - j| with queries aligned to the last keys,
    causal and segment masks."""
    s_len, t_len = q.shape[1], k.shape[1]
    scores = np.einsum("bshd,bthd->bhst", q, k) * scale
    q_pos = np.arange(s_len)[:, None] + (t_len - s_len)
    kv_pos = np.arange(t_len)[None, :]
    if slopes is not None:
        scores = scores - np.asarray(slopes, np.float64)[None, :, None, None] * np.abs(q_pos - kv_pos)
    allowed = np.ones((1, 1, s_len, t_len), bool)
    if causal:
        allowed = allowed & (kv_pos <= q_pos)
    if q_seg is not None:
        allowed = allowed & (np.asarray(q_seg)[:, None, :, None] == np.asarray(kv_seg)[:, None, None, :])
    assert allowed.any(-1).all(), "test setup: every query must see at least one key"
    scores = np.where(allowed, scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)
