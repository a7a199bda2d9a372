"""attend() and alibi_slopes() against float64 numpy references written from the MPT spec (section 1.5)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_reference import reference_probs

from mpt_jax.attention import alibi_slopes, attend

# Jitted once per shape: eager attend() compiles every small op separately, which is several times slower.
attend_jit = jax.jit(attend, static_argnames=("causal", "softmax_scale", "impl"))

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
