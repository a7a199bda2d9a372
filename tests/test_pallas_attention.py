"""The Pallas flash-attention kernels (mpt_jax/attention/pallas_gpu.py) in interpret mode on CPU.

Outputs and gradients against float64 numpy references; every output element written (NaN-poisoned
buffers); attend(impl="pallas") against impl="xla" through the whole MPT model; head-sharded
shard_map; the Triton lowering itself (lowered for "cuda" on this CPU-only machine).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_reference import reference_attention

from mpt_jax.attention import IMPLS, alibi_slopes, attend
from mpt_jax.attention.pallas_gpu import BlockSizes, _raw_kernels, flash_attention

# Small tiles so that short sequences still span several blocks (and padded ones).
SMALL = BlockSizes(block_q=32, block_k=32, block_q_dq=32, block_k_dq=64, block_q_dkv=64, block_k_dkv=32)

# ------------------------------------------------------------------------------------------------
# Float64 reference (numpy): forward and the gradients of sum(w * out).


def ref_attention(q, k, v, w, **kwargs):
    """(out, dq, dk, dv) in float64 for loss = sum(w * out), from the inputs as float32 values."""
    return reference_attention(*(np.asarray(jnp.asarray(a, jnp.float32), np.float64) for a in (q, k, v, w)), **kwargs)


def segments(rng, batch: int, length: int, n_segments: int) -> np.ndarray:
    """Sorted ids 1..n_segments per row with random boundaries (every segment non-empty)."""
    out = np.empty((batch, length), np.int32)
    for b in range(batch):
        cuts = np.sort(rng.choice(np.arange(1, length), n_segments - 1, replace=False))
        out[b] = np.searchsorted(cuts, np.arange(length), side="right") + 1
    return out


def make_case(seed, batch, s_len, t_len, n_heads, n_kv, head_dim, n_seg, dtype):
    rng = np.random.default_rng(seed)
    q, k, v = (
        jnp.asarray(rng.standard_normal(shape), dtype)
        for shape in ((batch, s_len, n_heads, head_dim), (batch, t_len, n_kv, head_dim), (batch, t_len, n_kv, head_dim))
    )
    w = jnp.asarray(rng.standard_normal((batch, s_len, n_heads, head_dim)), jnp.float32)
    q_seg = kv_seg = None
    if n_seg:
        kv_seg = segments(rng, batch, t_len, n_seg)
        q_seg = kv_seg[:, t_len - s_len :]  # queries are the last key positions
    return q, k, v, w, q_seg, kv_seg


def run_flash(q, k, v, w, *, causal, slopes, q_seg, kv_seg, scale, block_sizes=SMALL, window=None, softcap=None):
    """(out, (dq, dk, dv)) of flash_attention, gradients of sum(w * out) via jax.grad."""

    def loss(q, k, v):
        out = flash_attention(
            q,
            k,
            v,
            causal=causal,
            alibi_slopes=slopes,
            q_segment_ids=q_seg,
            kv_segment_ids=kv_seg,
            softmax_scale=scale,
            block_sizes=block_sizes,
            interpret=True,
            sliding_window=window,
            logit_softcap=softcap,
        )
        return jnp.sum(out.astype(jnp.float32) * w), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


# (batch, q_len, kv_len, heads, kv_heads, head_dim, causal, alibi, n_segments, softmax_scale)
CASES = [
    (2, 77, 77, 4, 4, 64, True, True, 3, None),  # MHA, odd length, packed segments
    (1, 150, 150, 8, 2, 112, True, True, 0, None),  # GQA group 4, MPT-30B head dim (112 -> 128 tiles)
    (1, 45, 301, 8, 1, 128, True, True, 2, None),  # MQA (group 8), q shorter than kv, segment pair
    (2, 60, 60, 8, 1, 64, False, True, 3, 0.3),  # non-causal ALiBi (-slope*|i-j|), group 8, custom scale
    (1, 70, 100, 4, 4, 112, False, False, 0, None),  # non-causal, no ALiBi, q shorter, padded keys
    (1, 1, 37, 4, 2, 64, True, True, 0, None),  # one query (decode step) straight through the kernel
]


@pytest.mark.parametrize("batch,s_len,t_len,n_heads,n_kv,head_dim,causal,alibi,n_seg,scale", CASES)
def test_flash_float32_matches_float64(batch, s_len, t_len, n_heads, n_kv, head_dim, causal, alibi, n_seg, scale):
    """fp32: output and dq, dk, dv of sum(w * out) equal the float64 reference within 1e-5."""
    q, k, v, w, q_seg, kv_seg = make_case(
        s_len * 7 + t_len, batch, s_len, t_len, n_heads, n_kv, head_dim, n_seg, jnp.float32
    )
    slopes = alibi_slopes(n_heads) if alibi else None
    out, grads = run_flash(
        q,
        k,
        v,
        w,
        causal=causal,
        slopes=None if slopes is None else jnp.asarray(slopes),
        q_seg=None if q_seg is None else jnp.asarray(q_seg),
        kv_seg=None if kv_seg is None else jnp.asarray(kv_seg),
        scale=scale,
    )
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    refs = ref_attention(q, k, v, w, causal=causal, slopes=slopes, q_seg=q_seg, kv_seg=kv_seg, scale=scale)
    assert out.shape == q.shape and out.dtype == jnp.float32
    for name, got, ref in zip(("out", "dq", "dk", "dv"), (out, *grads), refs, strict=True):
        err = np.abs(np.asarray(got, np.float64) - ref).max()
        print(f"fp32 {name}: max abs error {err:.2e} (max |ref| {np.abs(ref).max():.2f})")
        np.testing.assert_allclose(np.asarray(got), ref, atol=1e-5, rtol=1e-5, err_msg=name)


@pytest.mark.parametrize(
    "dtype,batch,s_len,t_len,n_heads,n_kv,head_dim,causal,n_seg",
    [
        (jnp.bfloat16, 2, 93, 93, 8, 2, 112, True, 3),  # GQA 4, hd 112, segments
        (jnp.bfloat16, 1, 40, 130, 8, 1, 128, False, 0),  # MQA, non-causal, q shorter
        (jnp.float16, 1, 50, 50, 4, 4, 64, True, 2),
    ],
)
def test_flash_half_precision(dtype, batch, s_len, t_len, n_heads, n_kv, head_dim, causal, n_seg):
    """bf16/fp16 inputs: output in the input dtype; output and gradients within 2e-2 of max |ref|."""
    q, k, v, w, q_seg, kv_seg = make_case(s_len + t_len, batch, s_len, t_len, n_heads, n_kv, head_dim, n_seg, dtype)
    slopes = alibi_slopes(n_heads)
    out, grads = run_flash(
        q,
        k,
        v,
        w,
        causal=causal,
        slopes=jnp.asarray(slopes),
        q_seg=None if q_seg is None else jnp.asarray(q_seg),
        kv_seg=None if kv_seg is None else jnp.asarray(kv_seg),
        scale=None,
    )
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    refs = ref_attention(
        q, k, v, w, causal=causal, slopes=slopes, q_seg=q_seg, kv_seg=kv_seg, scale=1.0 / math.sqrt(head_dim)
    )
    for name, got, ref in zip(("out", "dq", "dk", "dv"), (out, *grads), refs, strict=True):
        err = np.abs(np.asarray(got, np.float64) - ref).max() / np.abs(ref).max()
        print(f"{jnp.dtype(dtype).name} {name}: max error / max |ref| = {err:.2e}")
        assert err <= 2e-2, (name, err)


def test_every_output_element_is_written():
    """Kernel outputs start as NaN and come back finite: every element, padding included, is written.

    ``_raw_kernels(poison=True)`` aliases NaN-filled inputs to all five kernel outputs (o, lse, dq,
    dk, dv, at their padded sizes) through ``input_output_aliases``, so in interpret mode each
    output buffer *starts* as NaN and any element the kernels skip stays NaN. Interpret mode also
    pads the head dim (112 -> 128 tiles) with NaN, so finite results also show that the masked
    loads replace out-of-array columns. The poisoned run must equal the plain one bit for bit.
    """
    q, k, v, w, q_seg, kv_seg = make_case(5, 2, 45, 83, 8, 2, 112, 2, jnp.float32)
    kwargs = dict(
        causal=True,
        alibi_slopes=jnp.asarray(alibi_slopes(8)),
        q_segment_ids=jnp.asarray(q_seg),
        kv_segment_ids=jnp.asarray(kv_seg),
        block_sizes=SMALL,
        interpret=True,
    )
    cfg, poisoned = _raw_kernels(q, k, v, w, poison=True, **kwargs)
    _, plain = _raw_kernels(q, k, v, w, **kwargs)
    assert (cfg.q_pad, cfg.kv_pad) == (64, 128), "the case must exercise sequence padding"
    for name, a, b in zip(("o", "lse", "dq", "dk", "dv"), poisoned, plain, strict=True):
        assert np.isfinite(np.asarray(a)).all(), f"{name}: an element was never written"
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)


def test_poison_hook_detects_unwritten_output():
    """Control for the test above: an aliased NaN output that a kernel leaves alone stays NaN."""
    from jax.experimental import pallas as pl

    def kernel(x_ref, poison_ref, o_ref):
        del poison_ref

        @pl.when(pl.program_id(0) == 0)
        def _():
            o_ref[...] = x_ref[...]

    x = jnp.ones((64,), jnp.float32)
    spec = pl.BlockSpec((32,), lambda i: (i,))
    out = pl.pallas_call(
        kernel,
        grid=(2,),
        in_specs=[spec, spec],
        out_specs=spec,
        out_shape=jax.ShapeDtypeStruct((64,), jnp.float32),
        input_output_aliases={1: 0},
        interpret=True,
    )(x, jnp.full((64,), jnp.nan))
    out = np.asarray(out)
    assert (out[:32] == 1).all() and np.isnan(out[32:]).all()


# ------------------------------------------------------------------------------------------------
# Sliding window (with block skipping) and attention-logit softcapping in the kernels.

B16 = BlockSizes(16, 16, 16, 16, 16, 16)  # 16-wide tiles: a window of 20 leaves most key blocks out

# (batch, q_len, kv_len, heads, kv_heads, head_dim, causal, alibi, n_segments, window, softcap, blocks)
WINDOW_CASES = [
    pytest.param(1, 256, 256, 2, 2, 64, True, True, 0, 20, None, B16, id="w20-T256-skipped-blocks"),
    pytest.param(2, 77, 77, 4, 2, 112, True, True, 3, 5, None, SMALL, id="w5-under-one-block-gqa-hd112-seg"),
    pytest.param(1, 45, 150, 4, 1, 64, True, True, 0, 0, None, SMALL, id="w0-mqa-chunk"),
    pytest.param(1, 70, 100, 4, 4, 112, False, True, 2, 13, 1.5, SMALL, id="noncausal-w13-padded-keys-softcap"),
    pytest.param(
        1, 93, 93, 4, 2, 112, True, False, 2, None, 2.0, SMALL, id="softcap-alone-hd112", marks=pytest.mark.slow
    ),
    pytest.param(1, 1, 37, 4, 2, 64, True, True, 0, 4, 2.0, SMALL, id="decode-in-kernel", marks=pytest.mark.slow),
    pytest.param(1, 60, 60, 4, 4, 64, True, True, 0, 100, None, SMALL, id="w-over-length", marks=pytest.mark.slow),
    pytest.param(1, 40, 130, 4, 2, 64, False, False, 0, 1, None, B16, id="noncausal-w1-chunk", marks=pytest.mark.slow),
]


@pytest.mark.parametrize(
    "batch,s_len,t_len,n_heads,n_kv,head_dim,causal,alibi,n_seg,window,softcap,blocks", WINDOW_CASES
)
def test_flash_window_softcap_float32(
    batch, s_len, t_len, n_heads, n_kv, head_dim, causal, alibi, n_seg, window, softcap, blocks
):
    """fp32 with a sliding window and/or softcap: output and dq, dk, dv equal float64 within 1e-5."""
    q, k, v, w, q_seg, kv_seg = make_case(
        s_len * 3 + t_len, batch, s_len, t_len, n_heads, n_kv, head_dim, n_seg, jnp.float32
    )
    q = q * 2.0  # larger logits: the softcap bites
    slopes = alibi_slopes(n_heads) if alibi else None
    out, grads = run_flash(
        q,
        k,
        v,
        w,
        causal=causal,
        slopes=None if slopes is None else jnp.asarray(slopes),
        q_seg=None if q_seg is None else jnp.asarray(q_seg),
        kv_seg=None if kv_seg is None else jnp.asarray(kv_seg),
        scale=None,
        block_sizes=blocks,
        window=window,
        softcap=softcap,
    )
    opts = dict(causal=causal, slopes=slopes, q_seg=q_seg, kv_seg=kv_seg, scale=1.0 / math.sqrt(head_dim))
    refs = ref_attention(q, k, v, w, **opts, window=window, softcap=softcap)
    for name, got, ref in zip(("out", "dq", "dk", "dv"), (out, *grads), refs, strict=True):
        err = np.abs(np.asarray(got, np.float64) - ref).max()
        print(
            f"fp32 window={window} softcap={softcap} {name}: max abs error {err:.1e} (max |ref| {np.abs(ref).max():.1f})"
        )
        np.testing.assert_allclose(np.asarray(got), ref, atol=1e-5, rtol=1e-5, err_msg=name)
    if window is not None and window < t_len - 1:  # the window matters in this case
        assert np.abs(ref_attention(q, k, v, w, **opts, softcap=softcap)[0] - refs[0]).max() > 1e-2
    if softcap is not None:
        assert np.abs(ref_attention(q, k, v, w, **opts, window=window)[0] - refs[0]).max() > 1e-2


@pytest.mark.parametrize(
    "s_len,t_len,n_heads,n_kv,head_dim,n_seg,window,softcap,blocks",
    [
        (93, 93, 8, 2, 112, 3, 20, 2.0, SMALL),  # GQA 4, hd 112, segments, window and softcap
        pytest.param(100, 100, 4, 4, 64, 0, 7, None, B16, marks=pytest.mark.slow),  # hd 64, window under a block
    ],
)
def test_flash_window_softcap_bfloat16(s_len, t_len, n_heads, n_kv, head_dim, n_seg, window, softcap, blocks):
    """bf16 with window/softcap: output and gradients within 2e-2 of max |ref| (float64 on the rounded inputs)."""
    q, k, v, w, q_seg, kv_seg = make_case(s_len + 1, 1, s_len, t_len, n_heads, n_kv, head_dim, n_seg, jnp.bfloat16)
    slopes = alibi_slopes(n_heads)
    out, grads = run_flash(
        q,
        k,
        v,
        w,
        causal=True,
        slopes=jnp.asarray(slopes),
        q_seg=None if q_seg is None else jnp.asarray(q_seg),
        kv_seg=None if kv_seg is None else jnp.asarray(kv_seg),
        scale=None,
        block_sizes=blocks,
        window=window,
        softcap=softcap,
    )
    assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
    refs = ref_attention(
        q,
        k,
        v,
        w,
        causal=True,
        slopes=slopes,
        q_seg=q_seg,
        kv_seg=kv_seg,
        scale=1.0 / math.sqrt(head_dim),
        window=window,
        softcap=softcap,
    )
    for name, got, ref in zip(("out", "dq", "dk", "dv"), (out, *grads), refs, strict=True):
        err = np.abs(np.asarray(got, np.float64) - ref).max() / np.abs(ref).max()
        print(f"bf16 window={window} softcap={softcap} {name}: max error / max |ref| = {err:.1e}")
        assert err <= 2e-2, (name, err)


@pytest.mark.parametrize(
    "causal,n_seg",
    [
        pytest.param(True, 2, marks=pytest.mark.slow),  # causal window with segments
        (False, 0),  # non-causal: padded queries past the last key see no key at all
    ],
)
def test_every_output_element_is_written_with_window(causal, n_seg):
    """NaN-poisoned kernel outputs come back finite with a window and softcap (skipped blocks included)."""
    q, k, v, w, q_seg, kv_seg = make_case(6, 2, 45, 83, 8, 2, 112, n_seg, jnp.float32)
    kwargs = dict(
        causal=causal,
        alibi_slopes=jnp.asarray(alibi_slopes(8)),
        q_segment_ids=None if q_seg is None else jnp.asarray(q_seg),
        kv_segment_ids=None if kv_seg is None else jnp.asarray(kv_seg),
        block_sizes=SMALL,
        interpret=True,
        sliding_window=3,
        logit_softcap=2.0,
    )
    cfg, poisoned = _raw_kernels(q, k, v, w, poison=True, **kwargs)
    _, plain = _raw_kernels(q, k, v, w, **kwargs)
    assert (cfg.q_pad, cfg.kv_pad, cfg.window, cfg.softcap) == (64, 128, 3, 2.0)
    for name, a, b in zip(("o", "lse", "dq", "dk", "dv"), poisoned, plain, strict=True):
        assert np.isfinite(np.asarray(a)).all(), f"{name}: an element was never written (or is not finite)"
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)


def test_window_skips_blocks(monkeypatch):
    """Blocks outside the window are never visited: NaNs placed there do not reach the checked results.

    T=256, w=20, causal, 16-wide tiles. Keys 0..31 hold NaN: query tiles from row 64 on (window
    starting at >= 44) must not visit them. Query rows 224..255 hold NaN (q and the output
    cotangent): key blocks up to 176..191 (seen by queries up to 211) must not visit them. A
    visited block would spread NaN through 0 * NaN in the kernels' dots; the control run that
    visits every block shows it does.
    """
    import mpt_jax.attention.pallas_gpu as pg

    q, k, v, w, _, _ = make_case(7, 1, 256, 256, 2, 2, 64, 0, jnp.float32)
    kw = dict(causal=True, slopes=None, q_seg=None, kv_seg=None, scale=None, block_sizes=B16, window=20)
    refs = ref_attention(q, k, v, w, causal=True, slopes=None, q_seg=None, kv_seg=None, scale=1 / 8, window=20)
    k_bad, v_bad = k.at[:, :32].set(jnp.nan), v.at[:, :32].set(jnp.nan)
    q_bad, w_bad = q.at[:, 224:].set(jnp.nan), w.at[:, 224:].set(jnp.nan)
    rows, keys = slice(64, 224), slice(64, 192)

    def checked(out, grads):
        dq, dk, dv = grads
        return (out[:, rows], dq[:, rows], dk[:, keys], dv[:, keys])

    got = checked(*run_flash(q_bad, k_bad, v_bad, w_bad, **kw))
    want = (refs[0][:, rows], refs[1][:, rows], refs[2][:, keys], refs[3][:, keys])
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        np.testing.assert_allclose(np.asarray(a), b, atol=1e-5, rtol=1e-5, err_msg=name)

    def visit_all(cfg, start, bq, bk, n):  # control: every block, all masked
        return 0, 0, 0, n

    monkeypatch.setattr(pg, "_kv_blocks", visit_all)
    monkeypatch.setattr(pg, "_q_blocks", visit_all)
    control = checked(*run_flash(q_bad, k_bad, v_bad, w_bad, **kw))
    for name, a in zip(("out", "dq", "dk", "dv"), control, strict=True):
        assert np.isnan(np.asarray(a)).any(), name


def test_attend_pallas_window_softcap():
    """attend(impl="pallas") passes the window and softcap to the kernels: equal to impl="xla"."""
    q, k, v, _, _, seg = make_case(2, 2, 40, 40, 4, 2, 64, 2, jnp.float32)
    kw = dict(
        alibi_slopes=jnp.asarray(alibi_slopes(4)), segment_ids=jnp.asarray(seg), sliding_window=6, logit_softcap=5.0
    )
    xla = np.asarray(attend(q, k, v, **kw))
    pallas = np.asarray(attend(q, k, v, impl="pallas", block_sizes=SMALL, interpret=True, **kw))
    np.testing.assert_allclose(pallas, xla, atol=2e-6)
    assert (
        np.abs(np.asarray(attend(q, k, v, alibi_slopes=kw["alibi_slopes"], segment_ids=kw["segment_ids"])) - xla).max()
        > 1e-2
    )


# ------------------------------------------------------------------------------------------------
# attend(impl=...) and the model.


def test_attend_impls():
    """IMPLS lists the backends; "pallas" equals "xla"; "auto" is xla on CPU; clear errors otherwise."""
    assert IMPLS == ("xla", "pallas", "cudnn", "auto")
    from mpt_jax.config import ATTN_IMPLS

    assert set(IMPLS) <= set(ATTN_IMPLS)
    q, k, v, _, _, seg = make_case(1, 2, 40, 40, 4, 2, 64, 2, jnp.float32)
    kw = dict(alibi_slopes=jnp.asarray(alibi_slopes(4)), segment_ids=jnp.asarray(seg))
    xla = np.asarray(attend(q, k, v, **kw))
    pallas = np.asarray(attend(q, k, v, impl="pallas", block_sizes=SMALL, interpret=True, **kw))
    np.testing.assert_allclose(pallas, xla, atol=2e-6)
    if jax.default_backend() != "gpu":  # on a GPU "auto" is the (non-interpreted) pallas kernel
        np.testing.assert_array_equal(np.asarray(attend(q, k, v, impl="auto", **kw)), xla)
    # Decoding (q_len 1) with impl="pallas" goes through xla: identical results.
    q1 = q[:, -1:]
    np.testing.assert_array_equal(
        np.asarray(attend(q1, k, v, impl="pallas", alibi_slopes=kw["alibi_slopes"])),
        np.asarray(attend(q1, k, v, alibi_slopes=kw["alibi_slopes"])),
    )
    with pytest.raises(ValueError, match="no attention dropout"):
        attend(q, k, v, impl="pallas", dropout_rate=0.1, dropout_rng=jax.random.key(0))
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="impl='cudnn' needs a GPU"):
            attend(q, k, v, impl="cudnn")
    with pytest.raises(ValueError, match="unknown impl='flash'"):
        attend(q, k, v, impl="flash")
    with pytest.raises(ValueError, match="power of two"):
        attend(q, k, v, impl="pallas", block_sizes=BlockSizes(block_q=48))


def test_model_pallas_matches_xla():
    """MPT with attn_impl="pallas" equals attn_impl="xla": logits and parameter gradients within 1e-4."""
    from mpt_jax.config import MPTConfig
    from mpt_jax.model import MPT, init_params

    base = dict(d_model=128, n_heads=2, n_layers=2, max_seq_len=64, vocab_size=97, no_bias=False, qk_ln=True)
    cfg_xla = MPTConfig(**base, attn_type="grouped_query_attention", kv_n_heads=1, attn_impl="xla")
    cfg_pallas = cfg_xla.replace(attn_impl="pallas")
    params = init_params(cfg_xla, jax.random.key(0))
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 97, (2, 45)), jnp.int32)
    seg = jnp.asarray(segments(rng, 2, 45, 3))

    def loss_and_logits(cfg):
        def loss(p):
            logits = MPT(cfg).apply({"params": p}, tokens, segment_ids=seg)
            return jnp.mean(jax.nn.log_softmax(logits)[..., 0]) + 0.1 * jnp.mean(logits**2), logits

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    with jax.default_matmul_precision("highest"):  # no TF32 in XLA's float32 dots on a GPU
        (_, logits_x), grads_x = loss_and_logits(cfg_xla)
        (_, logits_p), grads_p = loss_and_logits(cfg_pallas)
    np.testing.assert_allclose(np.asarray(logits_p), np.asarray(logits_x), atol=1e-4, rtol=1e-4)
    flat_x = jax.tree_util.tree_leaves_with_path(grads_x)
    flat_p = jax.tree.leaves(grads_p)
    for (path, gx), gp in zip(flat_x, flat_p, strict=True):
        scale = max(1.0, float(np.abs(np.asarray(gx)).max()))
        np.testing.assert_allclose(
            np.asarray(gp) / scale, np.asarray(gx) / scale, atol=1e-4, err_msg=jax.tree_util.keystr(path)
        )


SHARD_MAP_SCRIPT = textwrap.dedent(
    """
    import numpy as np, jax, jax.numpy as jnp
    from jax.sharding import Mesh, PartitionSpec as P
    from mpt_jax.attention import alibi_slopes, attend
    from mpt_jax.attention.pallas_gpu import BlockSizes

    assert jax.device_count() == 2
    mesh = Mesh(np.array(jax.devices()), ("tensor",))
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((2, 50, 8, 64)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((2, 50, 4, 64)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((2, 50, 4, 64)), jnp.float32)
    slopes = jnp.asarray(alibi_slopes(8))  # global slopes, sharded like the heads
    bs = BlockSizes(32, 32, 32, 32, 32, 32)

    def f(q, k, v, slopes):
        return attend(q, k, v, alibi_slopes=slopes, impl="pallas", block_sizes=bs, interpret=True)

    heads = P(None, None, "tensor", None)
    sharded = jax.shard_map(f, mesh=mesh, in_specs=(heads, heads, heads, P("tensor")), out_specs=heads,
                            check_vma=False)
    out = jax.jit(sharded)(q, k, v, slopes)
    ref = attend(q, k, v, alibi_slopes=slopes)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-6)
    g = jax.jit(jax.grad(lambda q, k, v: jnp.sum(jnp.sin(sharded(q, k, v, slopes))), argnums=(0, 1, 2)))(q, k, v)
    g_ref = jax.grad(lambda q, k, v: jnp.sum(jnp.sin(attend(q, k, v, alibi_slopes=slopes))), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)
    # Local slopes (alibi_slopes(4) on each shard) would be wrong: the test would notice.
    wrong = jax.shard_map(lambda q, k, v: attend(q, k, v, alibi_slopes=jnp.asarray(alibi_slopes(4)), impl="pallas",
                                                 block_sizes=bs, interpret=True),
                          mesh=mesh, in_specs=(heads,) * 3, out_specs=heads, check_vma=False)
    assert np.abs(np.asarray(jax.jit(wrong)(q, k, v)) - np.asarray(ref)).max() > 1e-2
    print("OK")
    """
)


def test_head_sharded_shard_map():
    """2 CPU devices: pallas attention under shard_map with heads on "tensor" equals the unsharded run."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-c", SHARD_MAP_SCRIPT], env=env, cwd=root, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout + proc.stderr


# ------------------------------------------------------------------------------------------------
# The GPU lowering, checked without a GPU.


@pytest.mark.parametrize(
    "options",
    [{}, {"sliding_window": 40, "logit_softcap": 30.0}, {"causal": False, "sliding_window": 7}],
    ids=["plain", "causal-window-softcap", "noncausal-window"],
)
def test_triton_lowering_without_gpu(options):
    """Forward and backward lower through Pallas' Triton backend for "cuda" (cross-platform lowering).

    This runs every Pallas-to-Triton lowering rule the kernels use (masked head-dim loads for 112,
    GQA index maps, scalar slope loads, dynamic loop bounds, tanh for the softcap); Triton's own
    compilation to PTX happens only on a GPU.
    """
    q = jax.ShapeDtypeStruct((1, 100, 8, 112), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 130, 2, 112), jnp.bfloat16)
    slopes = jax.ShapeDtypeStruct((8,), jnp.float32)
    seg_q = jax.ShapeDtypeStruct((1, 100), jnp.int32)
    seg_kv = jax.ShapeDtypeStruct((1, 130), jnp.int32)

    def loss(q, k, v, slopes, seg_q, seg_kv):
        out = flash_attention(
            q,
            k,
            v,
            alibi_slopes=slopes,
            q_segment_ids=seg_q,
            kv_segment_ids=seg_kv,
            block_sizes=SMALL,
            interpret=False,
            **options,
        )
        return jnp.sum(out.astype(jnp.float32))

    lowered = (
        jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        .trace(q, kv, kv, slopes, seg_q, seg_kv)
        .lower(lowering_platforms=("cuda",))
    )
    text = lowered.as_text()
    for name in ("mpt_flash_fwd", "mpt_flash_bwd_dq", "mpt_flash_bwd_dkv"):
        assert name in text, name
    assert "__gpu$xla.gpu.triton" in text


def test_benchmark_smoke(capsys):
    """benchmarks/attention.py --smoke runs here (tiny shapes, interpret mode) and prints its table."""
    from benchmarks import attention as bench

    cells = bench.main(["--smoke"])
    printed = capsys.readouterr().out
    assert "verify pallas vs xla" in printed and "| T | batch | heads | head_dim | pass | pallas | xla |" in printed
    assert {c.impl for c in cells} == {"pallas", "xla"} and all(c.tflops and c.tflops > 0 for c in cells), cells
