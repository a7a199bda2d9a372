"""One attention function, several backends.

``attend(q, k, v, causal=..., alibi_slopes=..., segment_ids=..., sliding_window=...,
logit_softcap=..., impl=...)`` is all the model knows of attention; backends live in their own
modules and know nothing of the model.

The math is llm-foundry's MPT attention: ``s = softmax_scale * q.k``; with a softcap c,
``s = c * tanh(s / c)``; then the ALiBi bias; then the masks (causal, sliding window
``|i - j| <= w``, packed-sequence segments); softmax; times v.

Backends (``IMPLS``):
  xla     plain jnp (``xla.py``): the reference, the CPU/TPU default, the only one with dropout.
  pallas  flash attention kernels (``pallas_gpu.py``, Triton lowering on GPU, interpret mode on
          CPU): ALiBi, causal, sliding window, softcap and segments computed in the kernel,
          nothing [T, T] in memory; key blocks outside the window are never visited.
  cudnn   ``jax.nn.dot_product_attention(implementation="cudnn")`` with a materialized ALiBi bias
          and mask (the sliding window included): a GPU-only comparison point; no softcap.
  auto    pallas on GPU (when it applies: no dropout, q_len > 1), xla elsewhere; both support
          every option but dropout (xla only).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from mpt_jax.attention.alibi import alibi_slopes
from mpt_jax.attention.names import IMPLS
from mpt_jax.attention.pallas_gpu import BlockSizes, flash_attention
from mpt_jax.attention.xla import SAVED_NAMES, attend_xla, attention_bias, check_options

__all__ = ["IMPLS", "SAVED_NAMES", "BlockSizes", "alibi_slopes", "attend"]


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
    interpret: bool | None = None,
    block_sizes: BlockSizes | None = None,
    sliding_window: int | None = None,
    logit_softcap: float | None = None,
    q_positions: jax.Array | None = None,
    kv_positions: jax.Array | None = None,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Multi-head attention with optional ALiBi, causal mask, sliding window, logit softcapping and
    packed-sequence segments.

    Args:
      q: [batch, q_len, heads, head_dim].
      k, v: [batch, kv_len, kv_heads, head_dim]; heads must be a multiple of kv_heads (MQA/GQA:
        query head h reads kv head h // (heads // kv_heads)).
      causal: mask keys after the query; queries are aligned to the last keys unless q_positions
        says otherwise.
      alibi_slopes: [heads] float32 slopes (see ``alibi_slopes``) of the heads in q, or None for no
        ALiBi. Under ``jax.shard_map`` with heads sharded (q [B, S, H/n, D] per shard), pass each
        shard the slopes of its *global* head indices, i.e. shard the full [H] slopes array like
        the heads (``P("tensor")``), not ``alibi_slopes(H/n)``. A shard_map around impl="pallas"
        needs ``check_vma=False`` (pallas_call does not annotate varying manual axes).
      segment_ids: int [batch, len] ids for self-attention (q_len == kv_len), or a pair
        (q_segment_ids, kv_segment_ids); a query attends only to keys of its own segment.
      softmax_scale: defaults to 1/sqrt(head_dim).
      sliding_window: None or -1: off (llm-foundry's ``sliding_window_size=-1``); w >= 0: the query
        at key position i sees only keys j with ``|i - j| <= w`` (flash-attn's ``window_size=(w, w)``;
        causal: ``i - w <= j <= i``; a single decode query sees the last w + 1 keys).
      logit_softcap: None: off; c > 0: scaled scores become ``c * tanh(s / c)`` before the ALiBi
        bias is added (llm-foundry's ``attn_logit_softcapping``). impl="cudnn" has none (ValueError).
      dropout_rate, dropout_rng: dropout on the attention probabilities (training only; impl="xla"
        only: "pallas" and "cudnn" raise ValueError, "auto" falls back to xla).
      impl: backend name, one of IMPLS (see the module docstring). "pallas" runs q_len == 1
        (decoding) through xla (with every option above).
      interpret: impl="pallas" only: run the kernels in Pallas interpret mode; default: when the
        default backend is CPU.
      block_sizes: impl="pallas" only: tile sizes (``BlockSizes``); default per head_dim.
      q_positions: int [batch, q_len]: the key position of each query (a KV cache whose rows hold
        different lengths; keys are positions 0..kv_len-1, masked causally past each query). Runs
        through xla whatever ``impl`` is (decoding: a few queries against the cache).
      kv_positions: int [batch, kv_len]: each key's position (default 0..kv_len-1), and
      mask: bool [batch, q_len, kv_len] (True: the query may see the key): with q_positions they
        lay out a tree of sequences in one row, e.g. continuations that share one context, each
        positioned right after it (ALiBi, causality and the window follow the positions given).
        Run through xla whatever ``impl`` is.

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
    if q_positions is not None and q_positions.shape != q.shape[:2]:
        raise ValueError(f"attend: q_positions shape {q_positions.shape} != (batch, q_len) {q.shape[:2]}")
    if kv_positions is not None and kv_positions.shape != k.shape[:2]:
        raise ValueError(f"attend: kv_positions shape {kv_positions.shape} != (batch, kv_len) {k.shape[:2]}")
    if mask is not None and mask.shape != (q.shape[0], q.shape[1], k.shape[1]):
        raise ValueError(
            f"attend: mask shape {mask.shape} != (batch, q_len, kv_len) {(q.shape[0], q.shape[1], k.shape[1])}"
        )
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
    window, softcap = check_options(sliding_window, logit_softcap, caller="attend")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if impl not in IMPLS:
        raise ValueError(f"attend: unknown impl={impl!r}; expected one of {IMPLS}")
    on_gpu = jax.default_backend() == "gpu"
    if impl == "auto":  # both choices support the window and the softcap
        impl = "pallas" if on_gpu and dropout_rate == 0.0 and q.shape[1] > 1 else "xla"
    if impl in ("pallas", "cudnn") and dropout_rate > 0.0:
        raise ValueError(
            f"attend: impl={impl!r} has no attention dropout (dropout_rate={dropout_rate}); use impl='xla'"
        )
    if q_positions is not None or kv_positions is not None or mask is not None:  # per-row positions: xla
        impl = "xla"
    if impl == "pallas" and q.shape[1] > 1:
        kernel = functools.partial(
            flash_attention,
            causal=causal,
            softmax_scale=scale,
            block_sizes=block_sizes,
            interpret=interpret,
            sliding_window=window,
            logit_softcap=softcap,
        )
        return _on_mesh(kernel, q, k, v, alibi_slopes, q_seg, kv_seg)
    if impl == "cudnn":
        if softcap is not None:
            raise ValueError(
                f"attend: impl='cudnn' has no attention logit softcapping (logit_softcap={softcap}); "
                "use impl='pallas', 'xla' or 'auto'"
            )
        if not on_gpu:
            raise ValueError(
                f"attend: impl='cudnn' needs a GPU (cuDNN flash attention); the default backend is "
                f"{jax.default_backend()!r}. Use impl='xla' or 'auto'."
            )
        return _attend_cudnn(
            q, k, v, causal=causal, alibi_slopes=alibi_slopes, q_seg=q_seg, kv_seg=kv_seg, scale=scale, window=window
        )
    if impl in ("xla", "pallas"):  # pallas with q_len == 1: one query row, nothing to tile
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
            sliding_window=window,
            logit_softcap=softcap,
            q_positions=q_positions,
            kv_positions=kv_positions,
            mask=mask,
        )
    raise AssertionError(impl)  # unreachable: every name in IMPLS is handled above


def _attend_cudnn(q, k, v, *, causal, alibi_slopes, q_seg, kv_seg, scale, window) -> jax.Array:
    """cuDNN flash attention with ALiBi materialized as a [1, H, S, T] bias (the comparison point).

    cuDNN's causal mask is top-left aligned, so for q_len < kv_len the (bottom-right) causal mask
    goes into the boolean mask instead of ``is_causal``. The sliding window goes into the boolean
    mask too: cuDNN's own (``local_window_size``) is top-left aligned and left-sided only.
    """
    q_len, kv_len = q.shape[1], k.shape[1]
    bias = None
    if alibi_slopes is not None:
        bias = attention_bias(
            q_len, kv_len, causal=False, alibi_slopes=alibi_slopes, q_segment_ids=None, kv_segment_ids=None
        ).astype(q.dtype)
    mask = None
    if q_seg is not None:
        mask = (q_seg[:, :, None] == kv_seg[:, None, :])[:, None]
    use_is_causal = causal and q_len == kv_len
    if causal and not use_is_causal:
        q_pos = jnp.arange(q_len)[:, None] + (kv_len - q_len)
        tri = (jnp.arange(kv_len)[None, :] <= q_pos)[None, None]
        mask = tri if mask is None else mask & tri
    if window is not None:
        q_pos = jnp.arange(q_len)[:, None] + (kv_len - q_len)
        near = (jnp.abs(jnp.arange(kv_len)[None, :] - q_pos) <= window)[None, None]
        mask = near if mask is None else mask & near
    return jax.nn.dot_product_attention(
        q,
        k.astype(q.dtype),
        v.astype(q.dtype),
        bias=bias,
        mask=mask,
        scale=scale,
        is_causal=use_is_causal,
        implementation="cudnn",
    )


def _on_mesh(kernel, q, k, v, slopes, q_seg, kv_seg) -> jax.Array:
    """Runs a kernel per shard when a (data, fsdp, tensor) mesh is active (``jax.set_mesh``).

    XLA cannot split a custom kernel itself (it would gather every input onto each device), so
    under a mesh the kernel runs in ``jax.shard_map``: rows split over data x fsdp, heads over
    tensor when both query and kv heads divide (each shard then takes the ALiBi slopes of its
    global head indices). Without a mesh, or on one device, the kernel runs as is.
    """
    mesh = jax.sharding.get_abstract_mesh()
    names = getattr(mesh, "axis_names", ()) or ()
    inside_shard_map = bool(getattr(mesh, "manual_axes", ()))  # the caller already split the work
    if not names or inside_shard_map or math.prod(mesh.shape[a] for a in names) == 1:
        return kernel(q, k, v, alibi_slopes=slopes, q_segment_ids=q_seg, kv_segment_ids=kv_seg)
    from jax.sharding import PartitionSpec as P

    rows = tuple(a for a in ("data", "fsdp") if a in names and mesh.shape[a] > 1)
    rows_size = math.prod(mesh.shape[a] for a in rows)
    if not rows or q.shape[0] % rows_size:
        rows = ()
    t = mesh.shape["tensor"] if "tensor" in names else 1
    heads = "tensor" if t > 1 and q.shape[2] % t == 0 and k.shape[2] % t == 0 else None
    row_spec = rows if rows else None
    qkv_spec = P(row_spec, None, heads, None)
    seg_spec = P(row_spec, None)
    n_local = q.shape[2] // (t if heads else 1)

    def local(q, k, v, slopes, q_seg, kv_seg):
        if slopes is not None and heads:
            slopes = jax.lax.dynamic_slice(slopes, (jax.lax.axis_index("tensor") * n_local,), (n_local,))
        return kernel(q, k, v, alibi_slopes=slopes, q_segment_ids=q_seg, kv_segment_ids=kv_seg)

    specs = (
        qkv_spec,
        qkv_spec,
        qkv_spec,
        None if slopes is None else P(),
        None if q_seg is None else seg_spec,
        None if kv_seg is None else seg_spec,
    )
    return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=qkv_spec, check_vma=False)(
        q, k, v, slopes, q_seg, kv_seg
    )
