"""One attention function, several backends.

``attend(q, k, v, causal=..., alibi_slopes=..., segment_ids=..., impl=...)`` is all the model
knows of attention; backends live in their own modules and know nothing of the model.
"""

from __future__ import annotations

import math

import jax

from mpt_jax.attention.alibi import alibi_slopes
from mpt_jax.attention.xla import attend_xla

IMPLS = ("xla",)

__all__ = ["IMPLS", "alibi_slopes", "attend"]


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = True,
    alibi_slopes: jax.Array | None = None,
    segment_ids: jax.Array | tuple[jax.Array, jax.Array] | None = None,
    softmax_scale: float | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    impl: str = "xla",
) -> jax.Array:
    """Multi-head attention with optional ALiBi, causal mask and packed-sequence segments.

    Args:
      q: [batch, q_len, heads, head_dim].
      k, v: [batch, kv_len, kv_heads, head_dim]; heads must be a multiple of kv_heads (MQA/GQA:
        query head h reads kv head h // (heads // kv_heads)).
      causal: mask keys after the query; queries are aligned to the last keys.
      alibi_slopes: [heads] float32 slopes (see ``alibi_slopes``), or None for no ALiBi.
      segment_ids: int [batch, len] ids for self-attention (q_len == kv_len), or a pair
        (q_segment_ids, kv_segment_ids); a query attends only to keys of its own segment.
      softmax_scale: defaults to 1/sqrt(head_dim).
      dropout_rate, dropout_rng: dropout on the attention probabilities (training only).
      impl: backend name, one of IMPLS.

    Returns:
      [batch, q_len, heads, head_dim] in q's dtype.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"attend: q, k, v must be 4-D [batch, len, heads, head_dim]; got {q.shape}, {k.shape}, {v.shape}"
        )
    if k.shape != v.shape:
        raise ValueError(f"attend: k {k.shape} and v {v.shape} must have the same shape")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"attend: q {q.shape} and k {k.shape} differ in batch or head_dim")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"attend: {q.shape[2]} query heads are not a multiple of {k.shape[2]} kv heads")
    if q.shape[1] > k.shape[1]:
        raise ValueError(f"attend: q_len {q.shape[1]} exceeds kv_len {k.shape[1]}")
    if alibi_slopes is not None and alibi_slopes.shape != (q.shape[2],):
        raise ValueError(f"attend: alibi_slopes shape {alibi_slopes.shape} != ({q.shape[2]},)")
    q_seg = kv_seg = None
    if segment_ids is not None:
        if isinstance(segment_ids, tuple):
            q_seg, kv_seg = segment_ids
        else:
            if q.shape[1] != k.shape[1]:
                raise ValueError("attend: a single segment_ids array needs q_len == kv_len; pass a (q, kv) pair")
            q_seg = kv_seg = segment_ids
        if q_seg.shape != q.shape[:2] or kv_seg.shape != k.shape[:2]:
            raise ValueError(
                f"attend: segment ids {q_seg.shape}/{kv_seg.shape} do not match q {q.shape[:2]} / kv {k.shape[:2]}"
            )
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if impl == "xla":
        return attend_xla(
            q,
            k,
            v,
            causal=causal,
            alibi_slopes=alibi_slopes,
            q_segment_ids=q_seg,
            kv_segment_ids=kv_seg,
            softmax_scale=scale,
            dropout_rate=dropout_rate,
            dropout_rng=dropout_rng,
        )
    raise ValueError(f"attend: unknown impl={impl!r}; expected one of {IMPLS}")
