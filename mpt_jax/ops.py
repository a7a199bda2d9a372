"""The model's differentiable building blocks whose backward passes are written by hand.

Why by hand: JAX's own transposes of a mixed-precision product (bfloat16 inputs, float32
accumulation) multiply a float32 cotangent by a bfloat16 operand, which XLA runs as a float32
matmul; and autodiff of the exact GELU keeps four [tokens, ffn] tensors for the backward. Here:

- ``matmul``: ``x @ w`` in the compute dtype with (at least) float32 accumulation, forward and
  backward alike, the result rounded once to the compute dtype; the weight's gradient comes back in
  the weight's own dtype (float32 master weights get float32 gradients, accumulated in float32).
  The residuals are x (in the compute dtype, as torch autocast keeps it) and the weight.
- ``gelu``: the exact (erf) GELU, evaluated in float32, whose backward needs only its input.

Their outputs are tagged with ``jax.ad_checkpoint.checkpoint_name`` by the model, so that remat
policies save them by name (``model.remat_policy``).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

# 16-bit floats kept for the backward travel as their bits. Inside the layer scan every residual is
# written into (and later read from) a [layers, ...] stack; XLA:CPU updates and slices a bfloat16
# stack by converting all of it to float32 and back, once per layer (and hoists a float32 copy of
# the whole stack out of the backward loop), while a uint16 stack is updated in place. A bitcast
# costs nothing on any backend.
_BITS = {jnp.dtype(jnp.bfloat16): jnp.uint16, jnp.dtype(jnp.float16): jnp.uint16}


def to_bits(x: jax.Array) -> jax.Array:
    """x as stored between the forward and the backward pass: 16-bit floats as uint16 bits."""
    bits = _BITS.get(jnp.dtype(x.dtype))
    return x if bits is None else jax.lax.bitcast_convert_type(x, bits)


def keep(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A residual for a backward pass: x's bits (``to_bits``) and a zero-size array of x's dtype,
    which ``restore`` reads the dtype from (a custom VJP's residuals are arrays, not Python values)."""
    return to_bits(x), jnp.zeros((0,), x.dtype)


def restore(kept: tuple[jax.Array, jax.Array]) -> jax.Array:
    """The array ``keep`` was given."""
    bits, kind = kept
    return bits if bits.dtype == kind.dtype else jax.lax.bitcast_convert_type(bits, kind.dtype)


def accumulation_dtype(dtype) -> jnp.dtype:
    """float32 for bfloat16/float16/float32 inputs; float64 stays float64."""
    return jnp.promote_types(jnp.dtype(dtype), jnp.float32)


def _dot(a: jax.Array, b: jax.Array, contract: tuple[int, int]) -> jax.Array:
    """2-D product contracting axis contract[0] of a with axis contract[1] of b, accumulated in
    at least float32."""
    dims = (((contract[0],), (contract[1],)), ((), ()))
    return jax.lax.dot_general(a, b, dims, preferred_element_type=accumulation_dtype(a.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul(x: jax.Array, w: jax.Array, dtype: jnp.dtype) -> jax.Array:
    return _matmul_fwd(x, w, dtype)[0]


def _matmul_fwd(x, w, dtype):
    # The residual is w itself, as the caller holds it (not reshaped, not cast): inside the layer
    # scan a weight is a slice of the stacked params, which the backward reads again for free,
    # while any copy of it would be stacked per layer and written every step.
    return _dot(x, _as_matrix(w, x.shape[1], dtype), (1, 0)).astype(dtype), (keep(x), w)


def _matmul_bwd(dtype, residuals, g):
    kept_x, w = residuals
    x = restore(kept_x)
    g = g.astype(dtype)
    dx = _dot(g, _as_matrix(w, x.shape[1], dtype), (1, 1)).astype(x.dtype)  # [N, M] . [K, M] -> [N, K]
    return dx, _weight_grad(x, g).astype(w.dtype).reshape(w.shape)


def _as_matrix(w: jax.Array, rows: int, dtype) -> jax.Array:
    return w.reshape(rows, -1).astype(dtype)


def _weight_grad(x: jax.Array, g: jax.Array) -> jax.Array:
    """x^T g: [N, K] . [N, M] -> [K, M], contracting the tokens, accumulated in at least float32.

    XLA:CPU runs a bfloat16 product that contracts the leading axis of both operands by
    converting them to float32; spelled as a contraction over two axes ([1, N]) it transposes x
    in bfloat16 and takes its fast bfloat16 matmul (3-4x faster on AVX512-BF16/AMX). float32
    keeps the plain form, which its own matmul handles as fast."""
    if x.dtype == jnp.float32 or x.dtype == jnp.float64:
        return _dot(x, g, (0, 0))
    dims = (((0, 1), (0, 1)), ((), ()))
    return jax.lax.dot_general(x[None], g[None], dims, preferred_element_type=accumulation_dtype(x.dtype))


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def matmul(x: jax.Array, w: jax.Array, dtype) -> jax.Array:
    """[N, K] @ [K, M] -> [N, M] in ``dtype``: inputs cast to ``dtype``, products accumulated in
    at least float32 and rounded once; the backward's two products likewise, w's gradient in w's
    dtype. w may be any array of K x M elements whose leading axes make K (a kernel [in..., out...]
    as the model holds it): it is reshaped to [K, M] inside, so that its residual is the model's
    own array."""
    dtype = jnp.dtype(dtype)
    return _matmul(x.astype(dtype), w, dtype)


_SQRT_HALF = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@jax.custom_vjp
def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU, x * Phi(x) (torch's default ``gelu``), in float32 whatever x's dtype."""
    y = x.astype(accumulation_dtype(x.dtype))
    return (0.5 * y * (1.0 + jax.lax.erf(y * _SQRT_HALF))).astype(x.dtype)


def _gelu_fwd(x):
    return gelu(x), keep(x)


def _gelu_bwd(kept_x, g):
    x = restore(kept_x)
    y = x.astype(accumulation_dtype(x.dtype))
    cdf = 0.5 * (1.0 + jax.lax.erf(y * _SQRT_HALF))
    pdf = jnp.exp(-0.5 * y * y) * _INV_SQRT_2PI
    return (((cdf + y * pdf) * g.astype(y.dtype)).astype(x.dtype),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def norm(x: jax.Array, scale: jax.Array, bias: jax.Array | None, axes: int, eps: float, rms: bool, dtype) -> jax.Array:
    """LayerNorm (biased variance) or RMSNorm over the trailing ``axes`` axes of x, in float32,
    times ``scale`` (plus ``bias``), returned in ``dtype``. The backward keeps x and two float32
    statistics per row (autodiff keeps three float32 copies of x)."""
    return _norm_fwd(x, scale, bias, axes, eps, rms, dtype)[0]


def _norm_stats(xf: jax.Array, axes: int, eps: float, rms: bool) -> tuple[jax.Array, jax.Array]:
    reduce = tuple(range(xf.ndim - axes, xf.ndim))
    mean = jnp.zeros((), xf.dtype) if rms else jnp.mean(xf, reduce, keepdims=True)
    centered = xf - mean
    return mean, jax.lax.rsqrt(jnp.mean(centered * centered, reduce, keepdims=True) + eps)


def _norm_fwd(x, scale, bias, axes, eps, rms, dtype):
    xf = x.astype(accumulation_dtype(x.dtype))
    mean, rstd = _norm_stats(xf, axes, eps, rms)
    y = (xf - mean) * rstd * scale.astype(xf.dtype)
    if bias is not None:
        y = y + bias.astype(xf.dtype)
    return y.astype(dtype), (keep(x), mean, rstd, scale, bias)


def _norm_bwd(axes, eps, rms, dtype, residuals, g):
    kept_x, mean, rstd, scale, bias = residuals
    x = restore(kept_x)
    xf = x.astype(accumulation_dtype(x.dtype))
    reduce = tuple(range(xf.ndim - axes, xf.ndim))
    rows = tuple(range(xf.ndim - axes))
    xhat = (xf - mean) * rstd
    gf = g.astype(xf.dtype)
    dscale = jnp.sum(gf * xhat, rows).astype(scale.dtype)
    dbias = None if bias is None else jnp.sum(gf, rows).astype(bias.dtype)
    dxhat = gf * scale.astype(xf.dtype)
    inner = dxhat - xhat * jnp.mean(dxhat * xhat, reduce, keepdims=True)
    if not rms:
        inner = inner - jnp.mean(dxhat, reduce, keepdims=True)
    return (rstd * inner).astype(x.dtype), dscale, dbias


norm.defvjp(_norm_fwd, _norm_bwd)
