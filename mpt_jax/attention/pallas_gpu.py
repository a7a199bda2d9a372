"""Flash attention (FlashAttention-2) as Pallas kernels for the Triton GPU lowering.

``flash_attention(q, k, v, ...)`` computes exactly what ``attend_xla`` computes (causal mask with
queries aligned to the end of the keys, ALiBi, sliding window, attention-logit softcapping,
packed-sequence segment ids, MQA/GQA, any softmax scale) without materializing a
[heads, q_len, kv_len] score, bias or mask tensor:

* forward: one program per (query block, batch, head) walks the key blocks with an online softmax
  in float32 and writes the output and the row logsumexp (kept for the backward);
* backward (``jax.custom_vjp``): ``delta = rowsum(o * do)`` in XLA, then two kernels that recompute
  the probabilities blockwise from the saved logsumexp: one per (query block, batch, head) for dq,
  one per (key block, batch, kv head) for dk and dv, which loops over the query heads of its GQA
  group so the group sum happens in registers (no repeated k/v, no [B, T, H, D] partials);
* block skipping: the forward and dq kernels visit only the key blocks that hold a visible key
  for some query of the tile (causal: none above the diagonal; sliding window w: none entirely
  before ``i_pos - w`` or, non-causal, after ``i_pos + w``), the dk/dv kernel only the query
  blocks that see some key of its block; the mask is evaluated only on blocks that straddle an
  edge (diagonal, window edge, padded keys), every other visited block is fully visible;
* ALiBi is computed in the kernel from the head's slope and the positions,
  ``bias = -slope_h * |i_pos - j_pos|`` with ``i_pos = i + kv_len - q_len``;
* the sliding window keeps key j for query i iff ``|i_pos - j| <= w``; the softcap c turns the
  scaled score u into ``c * tanh(u / c)`` before ALiBi is added, and its backward multiplies
  ds by ``1 - tanh(u / c)^2``;
* any length: the wrapper pads q and k/v along the sequence to block multiples and the kernels
  mask padded keys; any head dim: blocks span the next power of two and loads/stores are masked
  (e.g. 112 -> 128 for MPT-30B; the padded columns are zeros and are never written);
* float32 accumulation whatever the input dtype (bf16, fp16, fp32); fp32 inputs use IEEE-precision
  dots (not TF32) so fp32 results match XLA's.

Scores are kept in the log2 domain (``exp2`` is the native instruction): the scale (or, with a
softcap, the cap c) and the slopes are multiplied by log2(e) once and the saved logsumexp is
base 2; the tanh of the softcap is taken of the natural-domain score.

Kernels run on GPU through the Triton lowering (``jax.experimental.pallas.triton.CompilerParams``
selects it explicitly; JAX 0.11 deprecates but still ships that backend) and anywhere with
``interpret=True`` (CPU tests). Inside ``jax.shard_map`` a ``pallas_call`` needs
``check_vma=False``; with heads sharded, pass each shard the slopes of its *global* heads.

Gradients flow to q, k and v; segment ids and ALiBi slopes are constants (no gradient).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from mpt_jax.attention.xla import check_options

try:  # The Triton-specific API (CompilerParams, masked load/store); present in jax 0.10 and 0.11.
    from jax.experimental.pallas import triton as pltriton
except ImportError:  # pragma: no cover - a jax without the Triton backend
    pltriton = None

# A large finite negative (as attend_xla): exp2 underflows to exactly 0 and no inf - inf appears.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
LOG2E = math.log2(math.e)
SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
MIN_BLOCK = 16  # Triton's tl.dot needs every matrix dimension >= 16


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes (powers of two, >= 16) and Triton launch parameters; None picks a default.

    block_q / block_k: forward tiles; block_q_dq / block_k_dq: the dq kernel's; block_q_dkv /
    block_k_dkv: the dk/dv kernel's. Tiles larger than the (power-of-two rounded) sequence are
    shrunk to it, so small inputs never pad to a big tile.
    """

    block_q: int | None = None
    block_k: int | None = None
    block_q_dq: int | None = None
    block_k_dq: int | None = None
    block_q_dkv: int | None = None
    block_k_dkv: int | None = None
    num_warps: int | None = None
    num_warps_bwd: int | None = None
    num_stages: int = 2

    @staticmethod
    def default(head_dim: int) -> BlockSizes:
        """128x128 forward tiles for head_dim <= 64, 64x64 above; 64x64 backward tiles."""
        fwd = 128 if head_dim <= 64 else 64
        return BlockSizes(
            block_q=fwd,
            block_k=fwd,
            block_q_dq=64,
            block_k_dq=64,
            block_q_dkv=64,
            block_k_dkv=64,
            num_warps=4 if head_dim <= 64 else 8,
            num_warps_bwd=4 if head_dim <= 64 else 8,
            num_stages=2,
        )

    def resolve(self, head_dim: int) -> BlockSizes:
        """These sizes with every None replaced by the default for ``head_dim``."""
        base = BlockSizes.default(head_dim)
        merged = {
            f.name: getattr(self, f.name) if getattr(self, f.name) is not None else getattr(base, f.name)
            for f in dataclasses.fields(self)
        }
        out = BlockSizes(**merged)
        for name in ("block_q", "block_k", "block_q_dq", "block_k_dq", "block_q_dkv", "block_k_dkv"):
            b = getattr(out, name)
            if b < MIN_BLOCK or b & (b - 1):
                raise ValueError(f"flash_attention: {name}={b} must be a power of two >= {MIN_BLOCK}")
        return out


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


@dataclasses.dataclass(frozen=True)
class _Cfg:
    """Everything static about one call (hashable: the custom_vjp's non-differentiable argument)."""

    batch: int
    n_heads: int
    n_kv: int
    q_len: int
    kv_len: int
    q_pad: int
    kv_pad: int
    head_dim: int
    hd_pad: int
    causal: bool
    scale: float
    window: int | None  # sliding window w >= 0, or None
    softcap: float | None  # attention-logit softcap c > 0, or None
    has_seg: bool
    has_alibi: bool
    bq: int
    bk: int
    bq_dq: int
    bk_dq: int
    bq_dkv: int
    bk_dkv: int
    num_warps: int
    num_warps_bwd: int
    num_stages: int
    interpret: bool
    poison: bool  # test hook: outputs start as NaN (input_output_aliases) so unwritten elements show

    @property
    def group(self) -> int:
        return self.n_heads // self.n_kv

    @property
    def offset(self) -> int:
        """Position of query 0 among the keys (queries are aligned to the last keys)."""
        return self.kv_len - self.q_len

    @property
    def scale_log2(self) -> float:
        return self.scale * LOG2E


def _compiler_params(num_warps: int, num_stages: int):
    if pltriton is None:  # pragma: no cover
        return None
    cls = getattr(pltriton, "CompilerParams", None) or pltriton.TritonCompilerParams
    return cls(num_warps=num_warps, num_stages=num_stages)


# ------------------------------------------------------------------------------------------------
# Kernel helpers (traced inside the kernels).


def _head_mask(cfg: _Cfg):
    """[1, hd_pad] bool mask of the real head-dim columns, or None when head_dim is a power of two."""
    if cfg.hd_pad == cfg.head_dim:
        return None
    return (jnp.arange(cfg.hd_pad, dtype=jnp.int32) < cfg.head_dim)[None, :]


def _load(ref, head_mask):
    """A [rows, hd_pad] tile; the columns past head_dim (outside the array) read as 0."""
    if head_mask is None:
        return ref[...]
    return pltriton.load(ref, mask=head_mask, other=0.0)


def _store(ref, value, head_mask):
    if head_mask is None:
        ref[...] = value.astype(ref.dtype)
    else:
        pltriton.store(ref, value.astype(ref.dtype), mask=head_mask)


def _dot(a, b, a_dim: int, b_dim: int, precision):
    """float32 a @ b contracting a's axis a_dim with b's axis b_dim (2-D tiles)."""
    return lax.dot_general(
        a, b, (((a_dim,), (b_dim,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
    )


def _precision(dtype):
    # For float32 inputs Triton's default dot is TF32; HIGHEST lowers to an IEEE float32 dot.
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _scores(cfg: _Cfg, q, k, q_pos, k_pos, q_seg, k_seg, slope, *, masked: bool, precision, softcap_grad=False):
    """([bq, bk] float32 log2-domain logits with softcap, ALiBi and masks applied, softcap factor).

    ``masked``: the tile may hold keys outside a query's causal range or window, or padded keys;
    tiles known to be fully visible skip the mask arithmetic (segments are always checked). The
    softcap factor ``1 - tanh(u / c)^2`` (for the backward, ``softcap_grad``) is None without one.
    """
    dots = _dot(q, k, 1, 1, precision)
    factor = None
    if cfg.softcap is None:
        s = dots * cfg.scale_log2
    else:
        t = jnp.tanh(dots * (cfg.scale / cfg.softcap))
        s = t * (cfg.softcap * LOG2E)
        if softcap_grad:
            factor = 1.0 - t * t
    if cfg.has_alibi:
        dist = q_pos.astype(jnp.float32)[:, None] - k_pos.astype(jnp.float32)[None, :]
        s = s - slope * jnp.abs(dist)
    mask = _edge_mask(cfg, q_pos, k_pos) if masked else None
    if cfg.has_seg:
        same = q_seg[:, None] == k_seg[None, :]
        mask = same if mask is None else mask & same
    if mask is not None:
        s = jnp.where(mask, s, MASK_VALUE)
    return s, factor


def _edge_mask(cfg: _Cfg, q_pos, k_pos):
    """[bq, bk] bool: causal, sliding window and (non-causal) padded keys; None if nothing to mask."""
    mask = None
    if cfg.causal:  # (padded keys are after every real query: masked too)
        mask = k_pos[None, :] <= q_pos[:, None]
    elif cfg.kv_pad != cfg.kv_len:
        mask = jnp.broadcast_to(k_pos[None, :] < cfg.kv_len, (q_pos.shape[0], k_pos.shape[0]))
    if cfg.window is not None:
        near = q_pos[:, None] - k_pos[None, :] <= cfg.window
        if not cfg.causal:
            near = near & (k_pos[None, :] - q_pos[:, None] <= cfg.window)
        mask = near if mask is None else mask & near
    return mask


def _kv_blocks(cfg: _Cfg, q_start, bq: int, bk: int, nk: int):
    """Key blocks a query tile visits: (first, clean_lo, clean_hi, end).

    Blocks [first, clean_lo) and [clean_hi, end) evaluate the mask; [clean_lo, clean_hi) are fully
    visible to every query of the tile (padded ones included); blocks outside [first, end) hold no
    key any query of the tile may see, and are skipped. Every tile visits at least one block, so
    even a padded query that sees nothing gets a nonzero softmax denominator.
    """
    w = cfg.window
    lo = q_start + cfg.offset  # the tile's query positions are [lo, hi]
    hi = lo + bq - 1
    n_real = -(-cfg.kv_len // bk)  # blocks holding at least one real key
    if cfg.causal:  # keys j <= hi (with a window also j >= lo - w)
        end = jnp.minimum(lax.div(hi, bk) + 1, nk)
    elif w is not None:  # real keys j <= hi + w
        end = jnp.minimum(lax.div(hi + w, bk) + 1, n_real)
    else:
        end = jnp.asarray(n_real, jnp.int32)
    first = 0 if w is None else lax.div(jnp.maximum(lo - w, 0), bk)
    first = jnp.minimum(first, end - 1)
    # Fully visible blocks: every key j >= hi - w and j <= lo (causal), <= lo + w and real (not).
    clean_lo = 0 if w is None else lax.div(jnp.maximum(hi - w, 0) + bk - 1, bk)
    if cfg.causal:
        last_key = lo
    else:
        last_key = cfg.kv_len - 1 if w is None else jnp.minimum(lo + w, cfg.kv_len - 1)
    clean_hi = lax.div(last_key + 1, bk)
    clean_lo = jnp.clip(clean_lo, first, end)
    return first, clean_lo, jnp.clip(clean_hi, clean_lo, end), end


def _q_blocks(cfg: _Cfg, k_start, bq: int, bk: int, nq: int):
    """Query blocks the dk/dv kernel visits for one key block: (first, clean_lo, clean_hi, end).

    As ``_kv_blocks`` from the key side: query blocks outside [first, end) see no key of the block
    (causal: they end before it; window: they start after ``last key + w``, or, non-causal, end
    before ``first key - w``) and are skipped; [clean_lo, clean_hi) see every key of it.
    """
    w, off = cfg.window, cfg.offset
    a, b = k_start, k_start + bk - 1  # the block's key positions
    first_pos = a if cfg.causal else (None if w is None else a - w)  # first query position that sees a key
    first = 0 if first_pos is None else lax.div(jnp.maximum(first_pos - off, 0), bq)
    # Query blocks whose first position is <= b + w: ceil((b + w - off + 1) / bq) of them.
    end = jnp.asarray(nq, jnp.int32) if w is None else jnp.minimum(lax.div(jnp.maximum(b + w - off + bq, 0), bq), nq)
    first = jnp.minimum(first, end)
    # Fully visible: every query position >= b (causal) or >= b - w, and <= a + w.
    clean_pos = b if cfg.causal else (None if w is None else b - w)
    clean_lo = 0 if clean_pos is None else lax.div(jnp.maximum(clean_pos - off, 0) + bq - 1, bq)
    clean_hi = end if w is None else lax.div(jnp.maximum(a + w - off + 1, 0), bq)
    if not cfg.causal and cfg.kv_pad != cfg.kv_len:  # a block with padded keys needs the mask
        clean_hi = jnp.where(b < cfg.kv_len, clean_hi, 0)
    clean_lo = jnp.clip(clean_lo, first, end)
    return first, clean_lo, jnp.clip(clean_hi, clean_lo, end), end


def _visit(body, carry, blocks):
    """Runs ``body(index, carry, masked)`` over the (first, clean_lo, clean_hi, end) block ranges."""
    first, clean_lo, clean_hi, end = blocks
    masked, clean = functools.partial(body, masked=True), functools.partial(body, masked=False)
    carry = lax.fori_loop(first, clean_lo, masked, carry)
    carry = lax.fori_loop(clean_lo, clean_hi, clean, carry)
    return lax.fori_loop(clean_hi, end, masked, carry)


def _split_refs(refs, cfg: _Cfg, n_in: int, n_out: int):
    """(core inputs, segment refs, slope ref, outputs); drops the NaN-poison inputs if present."""
    refs = list(refs)
    core, refs = refs[:n_in], refs[n_in:]
    seg = (None, None)
    if cfg.has_seg:
        seg, refs = tuple(refs[:2]), refs[2:]
    slope = None
    if cfg.has_alibi:
        slope, refs = refs[0], refs[1:]
    if cfg.poison:
        refs = refs[n_out:]
    assert len(refs) == n_out, (len(refs), n_out)
    return core, seg, slope, refs


# ------------------------------------------------------------------------------------------------
# Forward kernel: grid (query blocks, batch, heads).


def _fwd_kernel(*refs, cfg: _Cfg, precision):
    (q_ref, k_ref, v_ref), (qseg_ref, kseg_ref), slope_ref, (o_ref, lse_ref) = _split_refs(refs, cfg, 3, 2)
    bq, bk = cfg.bq, cfg.bk
    nq, nk = cfg.q_pad // bq, cfg.kv_pad // bk
    hmask = _head_mask(cfg)
    q_start = (nq - 1 - pl.program_id(0)) * bq  # last (most expensive causal) blocks launch first
    q = _load(q_ref, hmask)
    q_pos = q_start + cfg.offset + jnp.arange(bq, dtype=jnp.int32)
    q_seg = qseg_ref[...] if cfg.has_seg else None
    slope = slope_ref[...] if cfg.has_alibi else None

    def body(kb, carry, masked):
        o, m, denom = carry
        k_start = pl.multiple_of(kb * bk, bk)
        k = _load(k_ref.at[pl.ds(k_start, bk), :], hmask)
        v = _load(v_ref.at[pl.ds(k_start, bk), :], hmask)
        k_pos = k_start + jnp.arange(bk, dtype=jnp.int32)
        k_seg = kseg_ref[pl.ds(k_start, bk)] if cfg.has_seg else None
        s, _ = _scores(cfg, q, k, q_pos, k_pos, q_seg, k_seg, slope, masked=masked, precision=precision)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        denom = denom * alpha + jnp.sum(p, axis=1)
        o = o * alpha[:, None] + _dot(p.astype(v.dtype), v, 1, 0, precision)
        return o, m_new, denom

    carry = (
        jnp.zeros((bq, cfg.hd_pad), jnp.float32),
        jnp.full((bq,), MASK_VALUE, jnp.float32),
        jnp.zeros((bq,), jnp.float32),
    )
    o, m, denom = _visit(body, carry, _kv_blocks(cfg, q_start, bq, bk, nk))
    # Every row visited >= 1 key block, so denom >= 1 (its largest term is exp2(0)).
    _store(o_ref, o / denom[:, None], hmask)
    lse_ref[...] = m + jnp.log2(denom)


def _specs_seg_alibi(cfg: _Cfg, q_map, q_block: int | None, k_map, k_block: int | None, slope_spec):
    specs = []
    if cfg.has_seg:
        specs.append(pl.BlockSpec((None, q_block or cfg.q_pad), q_map))
        specs.append(pl.BlockSpec((None, k_block or cfg.kv_pad), k_map))
    if cfg.has_alibi:
        specs.append(slope_spec)
    return specs


def _call(kernel, cfg: _Cfg, grid, in_specs, out_specs, out_shapes, args, num_warps: int, name: str):
    """pallas_call with the Triton compiler params; with cfg.poison, outputs start as NaN."""
    aliases = {}
    if cfg.poison:
        n = len(args)
        args = (*args, *(jnp.full(s.shape, jnp.nan, s.dtype) for s in out_shapes))
        in_specs = (*in_specs, *out_specs)
        aliases = {n + i: i for i in range(len(out_shapes))}
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=list(in_specs),
        out_specs=list(out_specs),
        out_shape=list(out_shapes),
        input_output_aliases=aliases,
        compiler_params=_compiler_params(num_warps, cfg.num_stages),
        interpret=cfg.interpret,
        name=name,
    )(*args)


def _forward(cfg: _Cfg, q, k, v, q_seg, kv_seg, slopes):
    """Padded inputs -> (padded output [B, q_pad, H, D], logsumexp [B, H, q_pad] float32, base 2)."""
    bq, hd = cfg.bq, cfg.hd_pad
    nq = cfg.q_pad // bq
    group = cfg.group

    def q_map(i, b, h):
        return (b, nq - 1 - i, h, 0)

    def kv_map(i, b, h):
        return (b, 0, lax.div(h, group), 0)

    in_specs = [
        pl.BlockSpec((None, bq, None, hd), q_map),
        pl.BlockSpec((None, cfg.kv_pad, None, hd), kv_map),
        pl.BlockSpec((None, cfg.kv_pad, None, hd), kv_map),
        *_specs_seg_alibi(
            cfg,
            lambda i, b, h: (b, nq - 1 - i),
            bq,
            lambda i, b, h: (b, 0),
            None,
            pl.BlockSpec((None,), lambda i, b, h: (h,)),
        ),
    ]
    args = [q, k, v] + ([q_seg, kv_seg] if cfg.has_seg else []) + ([slopes] if cfg.has_alibi else [])
    out_specs = [
        pl.BlockSpec((None, bq, None, hd), q_map),
        pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, nq - 1 - i)),
    ]
    out_shapes = [
        jax.ShapeDtypeStruct(q.shape, q.dtype),
        jax.ShapeDtypeStruct((cfg.batch, cfg.n_heads, cfg.q_pad), jnp.float32),
    ]
    kernel = functools.partial(_fwd_kernel, cfg=cfg, precision=_precision(q.dtype))
    o, lse = _call(
        kernel, cfg, (nq, cfg.batch, cfg.n_heads), in_specs, out_specs, out_shapes, args, cfg.num_warps, "mpt_flash_fwd"
    )
    return o, lse


# ------------------------------------------------------------------------------------------------
# Backward kernels.


def _dq_kernel(*refs, cfg: _Cfg, precision):
    core, (qseg_ref, kseg_ref), slope_ref, (dq_ref,) = _split_refs(refs, cfg, 6, 1)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = core
    bq, bk = cfg.bq_dq, cfg.bk_dq
    nq, nk = cfg.q_pad // bq, cfg.kv_pad // bk
    hmask = _head_mask(cfg)
    q_start = (nq - 1 - pl.program_id(0)) * bq
    q = _load(q_ref, hmask)
    do = _load(do_ref, hmask)
    lse = lse_ref[...]
    delta = delta_ref[...]
    q_pos = q_start + cfg.offset + jnp.arange(bq, dtype=jnp.int32)
    q_seg = qseg_ref[...] if cfg.has_seg else None
    slope = slope_ref[...] if cfg.has_alibi else None

    def body(kb, dq, masked):
        k_start = pl.multiple_of(kb * bk, bk)
        k = _load(k_ref.at[pl.ds(k_start, bk), :], hmask)
        v = _load(v_ref.at[pl.ds(k_start, bk), :], hmask)
        k_pos = k_start + jnp.arange(bk, dtype=jnp.int32)
        k_seg = kseg_ref[pl.ds(k_start, bk)] if cfg.has_seg else None
        s, factor = _scores(
            cfg, q, k, q_pos, k_pos, q_seg, k_seg, slope, masked=masked, precision=precision, softcap_grad=True
        )
        p = jnp.exp2(s - lse[:, None])
        dp = _dot(do, v, 1, 1, precision)
        ds = _dscores(p, dp, delta, factor)
        return dq + _dot(ds.astype(k.dtype), k, 1, 0, precision)

    dq = jnp.zeros((bq, cfg.hd_pad), jnp.float32)
    dq = _visit(body, dq, _kv_blocks(cfg, q_start, bq, bk, nk))
    _store(dq_ref, dq * cfg.scale, hmask)


def _dscores(p, dp, delta, factor):
    """Gradient of the loss w.r.t. the scaled score q.k * scale: softmax backward, then the softcap's."""
    ds = p * (dp - delta[:, None])
    return ds if factor is None else ds * factor


def _dkv_kernel(*refs, cfg: _Cfg, precision):
    core, (qseg_ref, kseg_ref), slope_ref, (dk_ref, dv_ref) = _split_refs(refs, cfg, 6, 2)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = core
    bq, bk = cfg.bq_dkv, cfg.bk_dkv
    nq = cfg.q_pad // bq
    hmask = _head_mask(cfg)
    k_start = pl.program_id(0) * bk
    k = _load(k_ref, hmask)
    v = _load(v_ref, hmask)
    k_pos = k_start + jnp.arange(bk, dtype=jnp.int32)
    k_seg = kseg_ref[...] if cfg.has_seg else None

    blocks = _q_blocks(cfg, k_start, bq, bk, nq)

    def body(qb, carry, g, slope, masked):
        dk, dv = carry
        q_start = pl.multiple_of(qb * bq, bq)
        rows = pl.ds(q_start, bq)
        # With one query head per kv head the blocks have no head axis (g is None).
        head = () if g is None else (g,)
        q = _load(q_ref.at[(rows, *head, slice(None))], hmask)
        do = _load(do_ref.at[(rows, *head, slice(None))], hmask)
        lse = lse_ref[(*head, rows)]
        delta = delta_ref[(*head, rows)]
        q_pos = q_start + cfg.offset + jnp.arange(bq, dtype=jnp.int32)
        q_seg = qseg_ref[rows] if cfg.has_seg else None
        s, factor = _scores(
            cfg, q, k, q_pos, k_pos, q_seg, k_seg, slope, masked=masked, precision=precision, softcap_grad=True
        )
        p = jnp.exp2(s - lse[:, None])
        dv = dv + _dot(p.astype(do.dtype), do, 0, 0, precision)
        dp = _dot(do, v, 1, 1, precision)
        ds = _dscores(p, dp, delta, factor)
        dk = dk + _dot(ds.astype(q.dtype), q, 0, 0, precision)
        return dk, dv

    def head(g, carry):
        slope = (slope_ref[...] if g is None else slope_ref[g]) if cfg.has_alibi else None
        return _visit(functools.partial(body, g=g, slope=slope), carry, blocks)

    carry = (jnp.zeros((bk, cfg.hd_pad), jnp.float32), jnp.zeros((bk, cfg.hd_pad), jnp.float32))
    if cfg.group == 1:
        dk, dv = head(None, carry)
    else:
        dk, dv = lax.fori_loop(0, cfg.group, head, carry)
    _store(dk_ref, dk * cfg.scale, hmask)
    _store(dv_ref, dv, hmask)


def _backward(cfg: _Cfg, q, k, v, q_seg, kv_seg, slopes, o, lse, do):
    """Padded tensors -> padded (dq, dk, dv) in the input dtype."""
    hd, group = cfg.hd_pad, cfg.group
    delta = jnp.einsum("bshd,bshd->bhs", o.astype(jnp.float32), do.astype(jnp.float32))
    precision = _precision(q.dtype)
    seg_args = [q_seg, kv_seg] if cfg.has_seg else []
    slope_args = [slopes] if cfg.has_alibi else []

    # dq: grid (query blocks, batch, heads).
    bq, nq = cfg.bq_dq, cfg.q_pad // cfg.bq_dq

    def q_map(i, b, h):
        return (b, nq - 1 - i, h, 0)

    def kv_map(i, b, h):
        return (b, 0, lax.div(h, group), 0)

    def row_map(i, b, h):
        return (b, h, nq - 1 - i)

    in_specs = [
        pl.BlockSpec((None, bq, None, hd), q_map),
        pl.BlockSpec((None, cfg.kv_pad, None, hd), kv_map),
        pl.BlockSpec((None, cfg.kv_pad, None, hd), kv_map),
        pl.BlockSpec((None, bq, None, hd), q_map),
        pl.BlockSpec((None, None, bq), row_map),
        pl.BlockSpec((None, None, bq), row_map),
        *_specs_seg_alibi(
            cfg,
            lambda i, b, h: (b, nq - 1 - i),
            bq,
            lambda i, b, h: (b, 0),
            None,
            pl.BlockSpec((None,), lambda i, b, h: (h,)),
        ),
    ]
    (dq,) = _call(
        functools.partial(_dq_kernel, cfg=cfg, precision=precision),
        cfg,
        (nq, cfg.batch, cfg.n_heads),
        in_specs,
        [pl.BlockSpec((None, bq, None, hd), q_map)],
        [jax.ShapeDtypeStruct(q.shape, q.dtype)],
        [q, k, v, do, lse, delta, *seg_args, *slope_args],
        cfg.num_warps_bwd,
        "mpt_flash_bwd_dq",
    )

    # dk, dv: grid (key blocks, batch, kv heads); each program reads its group's query heads.
    bk, nk = cfg.bk_dkv, cfg.kv_pad // cfg.bk_dkv

    def group_q_map(j, b, g):
        return (b, 0, g, 0)

    def kv_block_map(j, b, g):
        return (b, j, g, 0)

    heads = None if group == 1 else group  # a block of the group's query heads (squeezed if one)
    in_specs = [
        pl.BlockSpec((None, cfg.q_pad, heads, hd), group_q_map),
        pl.BlockSpec((None, bk, None, hd), kv_block_map),
        pl.BlockSpec((None, bk, None, hd), kv_block_map),
        pl.BlockSpec((None, cfg.q_pad, heads, hd), group_q_map),
        pl.BlockSpec((None, heads, cfg.q_pad), lambda j, b, g: (b, g, 0)),
        pl.BlockSpec((None, heads, cfg.q_pad), lambda j, b, g: (b, g, 0)),
        *_specs_seg_alibi(
            cfg,
            lambda j, b, g: (b, 0),
            None,
            lambda j, b, g: (b, j),
            bk,
            pl.BlockSpec((heads,), lambda j, b, g: (g,)),
        ),
    ]
    dk, dv = _call(
        functools.partial(_dkv_kernel, cfg=cfg, precision=precision),
        cfg,
        (nk, cfg.batch, cfg.n_kv),
        in_specs,
        [pl.BlockSpec((None, bk, None, hd), kv_block_map)] * 2,
        [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        [q, k, v, do, lse, delta, *seg_args, *slope_args],
        cfg.num_warps_bwd,
        "mpt_flash_bwd_dkv",
    )
    return dq, dk, dv


# ------------------------------------------------------------------------------------------------
# custom_vjp plumbing: padding happens inside, so the backward slices its own gradients.


def _pad_seq(x, length: int, value=0):
    if x is None or x.shape[1] == length:
        return x
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, length - x.shape[1])
    return jnp.pad(x, widths, constant_values=value)


def _pad_all(cfg: _Cfg, q, k, v, q_seg, kv_seg, slopes):
    q, k, v = _pad_seq(q, cfg.q_pad), _pad_seq(k, cfg.kv_pad), _pad_seq(v, cfg.kv_pad)
    if cfg.has_seg:  # padded queries and keys get ids no real token has (and differ from each other)
        q_seg = _pad_seq(q_seg.astype(jnp.int32), cfg.q_pad, jnp.iinfo(jnp.int32).min)
        kv_seg = _pad_seq(kv_seg.astype(jnp.int32), cfg.kv_pad, jnp.iinfo(jnp.int32).min + 1)
    if cfg.has_alibi:
        slopes = lax.stop_gradient(slopes).astype(jnp.float32) * LOG2E
    return q, k, v, q_seg, kv_seg, slopes


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _flash(q, k, v, q_seg, kv_seg, slopes, cfg: _Cfg):
    o, _ = _forward(cfg, *_pad_all(cfg, q, k, v, q_seg, kv_seg, slopes))
    return o[:, : cfg.q_len]


def _flash_fwd(q, k, v, q_seg, kv_seg, slopes, cfg: _Cfg):
    padded = _pad_all(cfg, q, k, v, q_seg, kv_seg, slopes)
    o, lse = _forward(cfg, *padded)
    return o[:, : cfg.q_len], (*padded, o, lse)


def _flash_bwd(cfg: _Cfg, res, do):
    *padded, o, lse = res
    dq, dk, dv = _backward(cfg, *padded, o, lse, _pad_seq(do, cfg.q_pad))
    return dq[:, : cfg.q_len], dk[:, : cfg.kv_len], dv[:, : cfg.kv_len], None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _make_cfg(
    q, k, v, *, causal, has_seg, has_alibi, softmax_scale, block_sizes, interpret, window, softcap, poison=False
) -> _Cfg:
    batch, q_len, n_heads, head_dim = q.shape
    kv_len, n_kv = k.shape[1], k.shape[2]
    bs = (block_sizes or BlockSizes()).resolve(head_dim)

    def fit(block: int, length: int) -> int:  # never a tile larger than the rounded-up sequence
        return min(block, max(MIN_BLOCK, _next_pow2(length)))

    bq, bq_dq, bq_dkv = (fit(b, q_len) for b in (bs.block_q, bs.block_q_dq, bs.block_q_dkv))
    bk, bk_dq, bk_dkv = (fit(b, kv_len) for b in (bs.block_k, bs.block_k_dq, bs.block_k_dkv))
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    return _Cfg(
        batch=batch,
        n_heads=n_heads,
        n_kv=n_kv,
        q_len=q_len,
        kv_len=kv_len,
        q_pad=_round_up(q_len, max(bq, bq_dq, bq_dkv)),  # powers of two: the max is the lcm
        kv_pad=_round_up(kv_len, max(bk, bk_dq, bk_dkv)),
        head_dim=head_dim,
        hd_pad=max(MIN_BLOCK, _next_pow2(head_dim)),
        causal=bool(causal),
        scale=float(softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)),
        window=window,
        softcap=softcap,
        has_seg=has_seg,
        has_alibi=has_alibi,
        bq=bq,
        bk=bk,
        bq_dq=bq_dq,
        bk_dq=bk_dq,
        bq_dkv=bq_dkv,
        bk_dkv=bk_dkv,
        num_warps=bs.num_warps,
        num_warps_bwd=bs.num_warps_bwd,
        num_stages=bs.num_stages,
        interpret=bool(interpret),
        poison=poison,
    )


def _check_inputs(q, k, v, alibi_slopes, q_segment_ids, kv_segment_ids):
    if q.ndim != 4 or k.shape != v.shape or k.ndim != 4:
        raise ValueError(f"flash_attention: q [B,S,H,D], k and v [B,T,Hkv,D]; got {q.shape}, {k.shape}, {v.shape}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] or q.shape[2] % k.shape[2]:
        raise ValueError(f"flash_attention: q {q.shape} and k {k.shape} do not fit (batch, head_dim, head groups)")
    if q.shape[1] > k.shape[1]:
        raise ValueError(f"flash_attention: q_len {q.shape[1]} exceeds kv_len {k.shape[1]}")
    if jnp.dtype(q.dtype) not in SUPPORTED_DTYPES:
        raise ValueError(f"flash_attention: dtype {q.dtype} not supported; use float32, bfloat16 or float16")
    if alibi_slopes is not None and alibi_slopes.shape != (q.shape[2],):
        raise ValueError(f"flash_attention: alibi_slopes shape {alibi_slopes.shape} != ({q.shape[2]},)")
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("flash_attention: pass both q_segment_ids and kv_segment_ids, or neither")
    if q_segment_ids is not None and (q_segment_ids.shape != q.shape[:2] or kv_segment_ids.shape != k.shape[:2]):
        raise ValueError(
            f"flash_attention: segment ids {q_segment_ids.shape}/{kv_segment_ids.shape} "
            f"do not match q {q.shape[:2]} / kv {k.shape[:2]}"
        )


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = True,
    alibi_slopes: jax.Array | None = None,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    softmax_scale: float | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: bool | None = None,
    sliding_window: int | None = None,
    logit_softcap: float | None = None,
) -> jax.Array:
    """Flash attention: q [B, S, H, D], k and v [B, T, Hkv, D] (H % Hkv == 0, S <= T) -> [B, S, H, D].

    Same semantics as ``attend_xla``: query i sits at key position ``i + T - S``; causal hides keys
    after it; ``sliding_window`` w (None or -1: off) hides keys j with ``|i_pos - j| > w``;
    ``logit_softcap`` c (None: off) maps the scaled score u to ``c * tanh(u / c)``; then ALiBi
    adds ``-slope_h * |i_pos - j|`` (``alibi_slopes`` [H], the slopes of *these*
    heads: under a head-sharded ``shard_map`` pass each shard the slopes of its global head indices,
    and give shard_map ``check_vma=False``); with segment ids a query sees only keys of its own
    segment. A query that sees no key at all gets an unspecified finite value. Differentiable in
    q, k, v. ``interpret`` defaults to True on a CPU backend. ``softmax_scale`` must be a Python
    number (it is compiled into the kernel); default 1/sqrt(D).
    """
    k, v, cfg = _setup(
        q,
        k,
        v,
        causal=causal,
        alibi_slopes=alibi_slopes,
        q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids,
        softmax_scale=softmax_scale,
        block_sizes=block_sizes,
        interpret=interpret,
        sliding_window=sliding_window,
        logit_softcap=logit_softcap,
    )
    return _flash(q, k, v, q_segment_ids, kv_segment_ids, alibi_slopes, cfg)


def _setup(
    q,
    k,
    v,
    *,
    causal=True,
    alibi_slopes=None,
    q_segment_ids=None,
    kv_segment_ids=None,
    softmax_scale=None,
    block_sizes=None,
    interpret=None,
    sliding_window=None,
    logit_softcap=None,
    poison=False,
):
    """k and v in q's dtype, the inputs checked, and the static kernel config."""
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    _check_inputs(q, k, v, alibi_slopes, q_segment_ids, kv_segment_ids)
    window, softcap = check_options(sliding_window, logit_softcap, caller="flash_attention")
    cfg = _make_cfg(
        q,
        k,
        v,
        causal=causal,
        has_seg=q_segment_ids is not None,
        has_alibi=alibi_slopes is not None,
        softmax_scale=softmax_scale,
        block_sizes=block_sizes,
        interpret=interpret,
        window=window,
        softcap=softcap,
        poison=poison,
    )
    return k, v, cfg


def _raw_kernels(q, k, v, do, **options):
    """Test hook: the padded kernel outputs (o, lse, dq, dk, dv) of one forward and backward;
    ``options`` are ``flash_attention``'s keywords, plus ``poison``: every output buffer starts as
    NaN (aliased NaN inputs), so an element the kernels never write comes back NaN, padding rows
    included."""
    k, v, cfg = _setup(q, k, v, **options)
    q_seg, kv_seg, slopes = (options.get(n) for n in ("q_segment_ids", "kv_segment_ids", "alibi_slopes"))
    padded = _pad_all(cfg, q, k, v, q_seg, kv_seg, slopes)
    o, lse = _forward(cfg, *padded)
    dq, dk, dv = _backward(cfg, *padded, o, lse, _pad_seq(do, cfg.q_pad))
    return cfg, (o, lse, dq, dk, dv)
