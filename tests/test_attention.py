"""attend() and alibi_slopes() against float64 numpy references written from MPT's definition.

Covers ALiBi, causal, segments, MQA/GQA, the sliding window and attention-logit softcapping
(forward and gradients), and the argument checks.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_reference import reference_attention, reference_probs

from mpt_jax.attention import alibi_slopes, attend

# Jitted once per shape: eager attend() compiles every small op separately, which is several times slower.
attend_jit = jax.jit(attend, static_argnames=("causal", "softmax_scale", "impl", "sliding_window", "logit_softcap"))

# ------------------------------------------------------------------------------------------------
# References.


def ref_slopes(n_heads: int, bias_max: float = 8.0) -> np.ndarray:
    """MPT's gen_slopes, written out from the spec."""
    n2 = 2 ** math.ceil(math.log2(n_heads))
    slopes = [1.0 / 2 ** (k * bias_max / n2) for k in range(1, n2 + 1)]
    if n2 != n_heads:
        slopes = (slopes[1::2] + slopes[0::2])[:n_heads]
    return np.asarray(slopes, np.float64)


def press_slopes(n: int) -> list[float]:
    """The ALiBi paper's (and BLOOM's) closed form, independent of MPT's code path."""

    def power_of_2(m: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(m) - 3)))
        return [start * start**i for i in range(m)]

    if math.log2(n).is_integer():
        return power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_2(closest) + press_slopes(2 * closest)[0::2][: n - closest]


def ref_attend(q, k, v, *, causal, slopes=None, q_seg=None, kv_seg=None, scale=None) -> np.ndarray:
    """Textbook attention in float64: repeat kv heads, bottom-right aligned ALiBi and causal mask."""
    q, k, v = (np.asarray(jnp.asarray(a, jnp.float32), np.float64) for a in (q, k, v))
    n_heads, head_dim, n_kv = q.shape[2], q.shape[3], k.shape[2]
    k = np.repeat(k, n_heads // n_kv, axis=2)  # head h reads kv head h // group
    v = np.repeat(v, n_heads // n_kv, axis=2)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    probs = reference_probs(q, k, causal=causal, slopes=slopes, q_seg=q_seg, kv_seg=kv_seg, scale=scale)
    return np.einsum("bhst,bthd->bshd", probs, v)


def segments(rng: np.random.Generator, batch: int, length: int, n_segments: int) -> np.ndarray:
    """Sorted segment ids 1..n_segments per row, with random boundaries (every segment non-empty)."""
    out = np.empty((batch, length), np.int32)
    for b in range(batch):
        cuts = np.sort(rng.choice(np.arange(1, length), n_segments - 1, replace=False))
        out[b] = np.searchsorted(cuts, np.arange(length), side="right") + 1
    return out


def qkv(rng, batch, s_len, t_len, n_heads, n_kv, head_dim, dtype=jnp.float32):
    q = rng.standard_normal((batch, s_len, n_heads, head_dim))
    k = rng.standard_normal((batch, t_len, n_kv, head_dim))
    v = rng.standard_normal((batch, t_len, n_kv, head_dim))
    return tuple(jnp.asarray(a, dtype) for a in (q, k, v))


# ------------------------------------------------------------------------------------------------
# attend() numerics.

# (batch, q_len, kv_len, heads, kv_heads, head_dim, causal, alibi, n_segments, softmax_scale)
CASES = [
    (2, 7, 7, 8, 8, 64, True, True, 0, None),  # MHA, odd length
    (2, 13, 13, 8, 2, 112, True, True, 3, None),  # GQA group 4, segments
    (1, 5, 13, 8, 1, 64, True, True, 0, None),  # MQA, q shorter than kv (cache-like)
    (2, 9, 9, 8, 2, 64, False, True, 0, 0.3),  # non-causal ALiBi is the symmetric -slope*|i-j|
    (2, 11, 11, 8, 1, 112, False, False, 3, None),  # non-causal, no ALiBi, segments
    (2, 6, 15, 8, 8, 112, False, True, 2, None),  # q shorter than kv, non-causal, (q, kv) segment pair
    (3, 4, 9, 8, 2, 64, True, False, 2, 0.05),  # q shorter, causal, segment pair, custom scale
    (1, 1, 17, 8, 8, 64, True, True, 0, None),  # single decode step
]


@pytest.mark.parametrize("batch,s_len,t_len,n_heads,n_kv,head_dim,causal,alibi,n_seg,scale", CASES)
def test_attend_matches_float64_reference(batch, s_len, t_len, n_heads, n_kv, head_dim, causal, alibi, n_seg, scale):
    """Float32 attend() equals a float64 textbook reference (GQA, ALiBi, causal, segments) within 1e-5."""
    rng = np.random.default_rng(hash((batch, s_len, t_len, n_kv, head_dim)) % 2**32)
    q, k, v = qkv(rng, batch, s_len, t_len, n_heads, n_kv, head_dim)
    slopes = alibi_slopes(n_heads) if alibi else None
    seg_arg = q_seg = kv_seg = None
    if n_seg:
        kv_seg = segments(rng, batch, t_len, n_seg)
        q_seg = kv_seg[:, t_len - s_len :]  # queries sit at the last key positions
        seg_arg = jnp.asarray(kv_seg) if s_len == t_len else (jnp.asarray(q_seg), jnp.asarray(kv_seg))
    out = attend_jit(
        q,
        k,
        v,
        causal=causal,
        alibi_slopes=None if slopes is None else jnp.asarray(slopes),
        segment_ids=seg_arg,
        softmax_scale=scale,
    )
    assert out.shape == q.shape and out.dtype == jnp.float32
    ref = ref_attend(q, k, v, causal=causal, slopes=slopes, q_seg=q_seg, kv_seg=kv_seg, scale=scale)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5, rtol=1e-5)
    # The case is sensitive to each of its options: dropping one changes the reference.
    plain = dict(causal=causal, slopes=slopes, q_seg=q_seg, kv_seg=kv_seg, scale=scale)
    for off in (dict(causal=False), dict(slopes=None), dict(q_seg=None, kv_seg=None)):
        if any(plain[key] is not None and plain[key] is not False for key in off) and s_len > 1:
            assert np.abs(ref_attend(q, k, v, **{**plain, **off}) - ref).max() > 1e-2, off


def test_attend_bfloat16():
    """bf16 inputs: output is bf16 and within 2e-2 (relative to max |ref|) of float64 on the same rounded inputs."""
    rng = np.random.default_rng(1)
    q, k, v = qkv(rng, 2, 13, 13, 8, 2, 64, dtype=jnp.bfloat16)
    seg = segments(rng, 2, 13, 2)
    slopes = alibi_slopes(8)
    out = attend_jit(q, k, v, causal=True, alibi_slopes=jnp.asarray(slopes), segment_ids=jnp.asarray(seg))
    assert out.dtype == jnp.bfloat16
    ref = ref_attend(q, k, v, causal=True, slopes=slopes, q_seg=seg, kv_seg=seg)
    err = np.abs(np.asarray(out, np.float64) - ref).max()
    assert err <= 2e-2 * np.abs(ref).max()


def test_attend_is_causal_in_keys():
    """With causal=True, changing key/value t changes no output of a query before t."""
    rng = np.random.default_rng(2)
    q, k, v = qkv(rng, 1, 10, 10, 8, 2, 64)
    t = 6
    k2, v2 = k.at[:, t].add(1.0), v.at[:, t].add(1.0)
    slopes = jnp.asarray(alibi_slopes(8))
    a = np.asarray(attend_jit(q, k, v, causal=True, alibi_slopes=slopes))
    b = np.asarray(attend_jit(q, k2, v2, causal=True, alibi_slopes=slopes))
    np.testing.assert_array_equal(a[:, :t], b[:, :t])
    assert np.abs(a[:, t:] - b[:, t:]).max() > 1e-3


# ------------------------------------------------------------------------------------------------
# ALiBi slopes.


@pytest.mark.parametrize("n_heads", [1, 2, 3, 4, 6, 8, 12, 16, 32, 64])
def test_alibi_slopes_formula(n_heads):
    """alibi_slopes equals the spec's gen_slopes formula and, for bias_max 8, the ALiBi paper's slope set."""
    got = alibi_slopes(n_heads)
    assert got.shape == (n_heads,) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref_slopes(n_heads), rtol=1e-7)
    np.testing.assert_allclose(got, press_slopes(n_heads), rtol=1e-6)


def test_alibi_slopes_known_values():
    """Hand-written values from the spec: H=12 interleaves, H=32 (MPT-7B) is 2^(-k/4), H=64 (MPT-30B) 2^(-k/8)."""
    h12 = [2.0**-k for k in range(1, 9)] + [2**-0.5, 2**-1.5, 2**-2.5, 2**-3.5]
    np.testing.assert_allclose(alibi_slopes(12), h12, rtol=1e-7)
    np.testing.assert_allclose(alibi_slopes(32), [2 ** (-k / 4) for k in range(1, 33)], rtol=1e-7)
    np.testing.assert_allclose(alibi_slopes(64), [2 ** (-k / 8) for k in range(1, 65)], rtol=1e-7)
    np.testing.assert_allclose(alibi_slopes(1), [2.0**-8], rtol=1e-7)
    np.testing.assert_allclose(alibi_slopes(32)[:4], [0.8408964, 0.7071068, 0.5946036, 0.5], rtol=1e-6)


def test_alibi_slopes_bias_max():
    """alibi_bias_max rescales the exponents: m_k = k * bias_max / n2."""
    np.testing.assert_allclose(alibi_slopes(4, 16), [2.0**-4, 2.0**-8, 2.0**-12, 2.0**-16], rtol=1e-7)
    np.testing.assert_allclose(alibi_slopes(6, 4), ref_slopes(6, 4), rtol=1e-7)
    with pytest.raises(ValueError, match="n_heads"):
        alibi_slopes(0)


# ------------------------------------------------------------------------------------------------
# Errors.


def _z(*shape):
    return jnp.zeros(shape, jnp.float32)


@pytest.mark.parametrize(
    "q,k,v,kwargs,match",
    [
        (_z(1, 4, 8, 16), _z(1, 4, 8, 16), _z(1, 4, 8, 8), {}, r"k \(1, 4, 8, 16\) and v \(1, 4, 8, 8\)"),
        (_z(1, 4, 8, 16), _z(1, 4, 8, 32), _z(1, 4, 8, 32), {}, "batch or head_dim"),
        (_z(2, 4, 8, 16), _z(1, 4, 8, 16), _z(1, 4, 8, 16), {}, "batch or head_dim"),
        (_z(4, 8, 16), _z(1, 4, 8, 16), _z(1, 4, 8, 16), {}, "4-D"),
        (_z(1, 4, 8, 16), _z(1, 4, 3, 16), _z(1, 4, 3, 16), {}, "8 query heads are not a multiple of 3 kv heads"),
        (_z(1, 4, 6, 16), _z(1, 4, 4, 16), _z(1, 4, 4, 16), {}, "not a multiple"),
        (_z(1, 5, 8, 16), _z(1, 4, 8, 16), _z(1, 4, 8, 16), {}, "q_len 5 exceeds kv_len 4"),
        (_z(1, 4, 8, 16), _z(1, 4, 8, 16), _z(1, 4, 8, 16), {"impl": "flash"}, "unknown impl='flash'"),
        (_z(1, 4, 8, 16), _z(1, 4, 8, 16), _z(1, 4, 8, 16), {"alibi_slopes": _z(4)}, "alibi_slopes shape"),
        (_z(1, 4, 8, 16), _z(1, 4, 8, 16), _z(1, 4, 8, 16), {"segment_ids": jnp.ones((1, 5), int)}, "segment ids"),
        (_z(1, 2, 8, 16), _z(1, 4, 8, 16), _z(1, 4, 8, 16), {"segment_ids": jnp.ones((1, 4), int)}, "q_len == kv_len"),
    ],
)
def test_attend_errors(q, k, v, kwargs, match):
    """Bad shapes, head counts and backend names raise ValueError naming the problem."""
    with pytest.raises(ValueError, match=match):
        attend(q, k, v, **kwargs)


# ------------------------------------------------------------------------------------------------
# Sliding window and attention-logit softcapping (impl="xla"), forward and gradients.

# (batch, q_len, kv_len, heads, kv_heads, causal, alibi, n_segments, window, softcap)
WINDOW_SOFTCAP_CASES = [
    (2, 24, 24, 4, 4, True, True, 0, 0, None),  # w = 0: each query sees only itself
    (2, 24, 24, 4, 2, True, False, 3, 1, None),  # w = 1, GQA, segments
    (1, 24, 24, 4, 1, True, True, 0, 5, None),  # small window, MQA, ALiBi
    (2, 7, 24, 4, 2, True, True, 0, 5, None),  # chunked prefill: q shorter than kv
    (2, 1, 24, 4, 4, True, True, 0, 5, None),  # one decode query: the last 6 keys
    (1, 24, 24, 4, 2, True, True, 0, 40, None),  # window >= length: no effect
    (2, 9, 24, 4, 2, False, True, 2, 3, None),  # non-causal: |i - j| <= w on both sides, segment pair
    (2, 24, 24, 4, 4, True, False, 0, None, 2.0),  # softcap alone
    (2, 24, 24, 4, 2, True, True, 0, None, 1.5),  # softcap then ALiBi
    (2, 24, 24, 4, 1, True, True, 3, 4, 2.0),  # softcap, ALiBi, window, segments, MQA
    (1, 1, 24, 4, 2, True, True, 0, 3, 2.0),  # decode with everything
]


def _grads_xla(q, k, v, w, **kwargs):
    """(out, (dq, dk, dv)) of attend(impl="xla") for loss = sum(w * out)."""

    def loss(q, k, v):
        out = attend(q, k, v, **kwargs)
        return jnp.sum(out.astype(jnp.float32) * w), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


@pytest.mark.parametrize("batch,s_len,t_len,n_heads,n_kv,causal,alibi,n_seg,window,softcap", WINDOW_SOFTCAP_CASES)
def test_window_softcap_matches_float64(batch, s_len, t_len, n_heads, n_kv, causal, alibi, n_seg, window, softcap):
    """fp32 output and dq, dk, dv equal the float64 reference within 1e-5; each option changes the result."""
    rng = np.random.default_rng(s_len * 31 + t_len + (window or 0))
    q, k, v = qkv(rng, batch, s_len, t_len, n_heads, n_kv, 32)
    q = q * 3.0  # large logits, so that a softcap of 1.5-2 changes them a lot
    w = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    slopes = alibi_slopes(n_heads) if alibi else None
    seg_arg = q_seg = kv_seg = None
    if n_seg:
        kv_seg = segments(rng, batch, t_len, n_seg)
        q_seg = kv_seg[:, t_len - s_len :]
        seg_arg = jnp.asarray(kv_seg) if s_len == t_len else (jnp.asarray(q_seg), jnp.asarray(kv_seg))
    out, grads = _grads_xla(
        q,
        k,
        v,
        w,
        causal=causal,
        alibi_slopes=None if slopes is None else jnp.asarray(slopes),
        segment_ids=seg_arg,
        sliding_window=window,
        logit_softcap=softcap,
    )
    opts = dict(causal=causal, slopes=slopes, q_seg=q_seg, kv_seg=kv_seg, scale=1 / math.sqrt(32))
    refs = reference_attention(q, k, v, w, **opts, window=window, softcap=softcap)
    for name, got, ref in zip(("out", "dq", "dk", "dv"), (out, *grads), refs, strict=True):
        err = np.abs(np.asarray(got, np.float64) - ref).max()
        print(f"xla fp32 {name}: max abs error {err:.1e} (max |ref| {np.abs(ref).max():.1f})")
        np.testing.assert_allclose(np.asarray(got), ref, atol=1e-5, rtol=1e-5, err_msg=name)
    # The reference notices each option (except a window as long as the sequence, which is a no-op).
    out_ref = refs[0]
    if window is not None:
        no_window = reference_attention(q, k, v, w, **opts, softcap=softcap)[0]
        assert (np.abs(no_window - out_ref).max() > 1e-2) == (window < t_len - 1)
    if softcap is not None:
        assert np.abs(reference_attention(q, k, v, w, **opts, window=window)[0] - out_ref).max() > 1e-2


@pytest.mark.parametrize("window", [0, 2, 9])
def test_window_decode_sees_last_keys(window):
    """One query with window w equals attention over only the last w + 1 keys (ALiBi distances included)."""
    rng = np.random.default_rng(window)
    q, k, v = qkv(rng, 2, 1, 16, 4, 2, 32)
    slopes = jnp.asarray(alibi_slopes(4))
    got = attend_jit(q, k, v, alibi_slopes=slopes, sliding_window=window)
    want = attend_jit(q, k[:, -(window + 1) :], v[:, -(window + 1) :], alibi_slopes=slopes)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)
    # impl="pallas" sends a single query through the same xla path, window and softcap included.
    kw = dict(alibi_slopes=slopes, sliding_window=window, logit_softcap=3.0)
    np.testing.assert_array_equal(np.asarray(attend(q, k, v, impl="pallas", **kw)), np.asarray(attend(q, k, v, **kw)))


def test_window_off_values_and_bfloat16():
    """sliding_window=-1 and None are the same (off); bf16 with window and softcap within 2e-2 of float64."""
    rng = np.random.default_rng(3)
    q, k, v = qkv(rng, 2, 20, 20, 4, 2, 64, dtype=jnp.bfloat16)
    slopes = alibi_slopes(4)
    off = attend_jit(q, k, v, alibi_slopes=jnp.asarray(slopes), sliding_window=-1)
    np.testing.assert_array_equal(np.asarray(off), np.asarray(attend_jit(q, k, v, alibi_slopes=jnp.asarray(slopes))))
    w = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    out, grads = _grads_xla(
        q, k, v, w, alibi_slopes=jnp.asarray(slopes), sliding_window=3, logit_softcap=1.0, segment_ids=None
    )
    assert out.dtype == jnp.bfloat16
    refs = reference_attention(
        *(np.asarray(jnp.asarray(a, jnp.float32)) for a in (q, k, v, w)),
        causal=True,
        slopes=slopes,
        q_seg=None,
        kv_seg=None,
        scale=1 / 8,
        window=3,
        softcap=1.0,
    )
    for name, got, ref in zip(("out", "dq", "dk", "dv"), (out, *grads), refs, strict=True):
        err = np.abs(np.asarray(got, np.float64) - ref).max() / np.abs(ref).max()
        print(f"xla bf16 {name}: max error / max |ref| = {err:.1e}")
        assert err <= 2e-2, (name, err)


def test_reference_gradients_by_finite_differences():
    """The float64 reference's analytic dq, dk, dv (softcap chain rule included) match central differences."""
    rng = np.random.default_rng(4)
    q, k, v = (rng.standard_normal(shape) * 2 for shape in ((1, 5, 2, 4), (1, 7, 1, 4), (1, 7, 1, 4)))
    w = rng.standard_normal((1, 5, 2, 4))
    opts = dict(causal=True, slopes=ref_slopes(2), q_seg=None, kv_seg=None, scale=0.5, window=3, softcap=1.5)
    _, *grads = reference_attention(q, k, v, w, **opts)
    eps = 1e-6
    for arg, grad in enumerate(grads):
        numeric = np.zeros_like(grad)
        for idx in np.ndindex(grad.shape):
            args = [q, k, v]
            plus, minus = [a.copy() for a in args], [a.copy() for a in args]
            plus[arg][idx] += eps
            minus[arg][idx] -= eps
            f_plus = np.sum(w * reference_attention(*plus, w, **opts)[0])
            f_minus = np.sum(w * reference_attention(*minus, w, **opts)[0])
            numeric[idx] = (f_plus - f_minus) / (2 * eps)
        np.testing.assert_allclose(grad, numeric, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"sliding_window": -2}, r"sliding_window=-2 must be -1 \(off\) or >= 0"),
        ({"sliding_window": 2.5}, "sliding_window=2.5 must be an int"),
        ({"sliding_window": True}, "sliding_window=True must be an int"),
        ({"logit_softcap": 0.0}, "logit_softcap=0.0 must be a finite number > 0"),
        ({"logit_softcap": -30.0}, "logit_softcap=-30.0 must be a finite number > 0"),
        ({"logit_softcap": float("inf")}, "logit_softcap=inf must be a finite number > 0"),
        ({"logit_softcap": "50"}, "logit_softcap='50' must be a Python number"),
        ({"logit_softcap": 30.0, "impl": "cudnn"}, "impl='cudnn' has no attention logit softcapping"),
        ({"sliding_window": -2, "impl": "pallas"}, "sliding_window=-2"),
    ],
)
def test_window_softcap_errors(kwargs, match):
    """Bad window/softcap values, and a softcap with cuDNN, raise ValueError naming the value."""
    q = _z(1, 4, 8, 16)
    with pytest.raises(ValueError, match=match):
        attend(q, q, q, **kwargs)
