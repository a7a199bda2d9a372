"""The hand-written backward passes (ops.py, loss.py) against float64 references and jax's autodiff."""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.ad_checkpoint import saved_residuals

from mpt_jax import MPTConfig, ops
from mpt_jax.loss import chunk_length, next_token_loss
from mpt_jax.model import final_logits


def _rand(rng, shape, dtype=jnp.float32):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_matmul_forward_and_gradients_match_float64(dtype):
    """y = x w, dx = g w^T, dw = x^T g: float64 products of the (rounded) inputs, accumulated in
    float32 at least: a bfloat16 accumulation over 512 terms would be off by ~1e-2 relative."""
    rng = np.random.default_rng(0)
    x, w, g = _rand(rng, (512, 96), dtype), _rand(rng, (96, 80)), _rand(rng, (512, 80), dtype)
    y, vjp = jax.vjp(lambda x, w: ops.matmul(x, w, dtype), x, w)
    dx, dw = vjp(g)
    assert y.dtype == dx.dtype == jnp.dtype(dtype) and dw.dtype == jnp.float32  # float32 master: float32 grads
    x64, g64 = np.asarray(x, np.float64), np.asarray(g, np.float64)
    w64 = np.asarray(w.astype(dtype), np.float64)  # the weight as the product sees it
    tol = 1e-5 if dtype == "float32" else 8e-3  # bfloat16: one rounding of the result (2^-8)
    np.testing.assert_allclose(np.asarray(y, np.float64), x64 @ w64, rtol=tol, atol=tol * np.abs(x64 @ w64).max())
    np.testing.assert_allclose(np.asarray(dx, np.float64), g64 @ w64.T, rtol=tol, atol=tol * np.abs(g64 @ w64.T).max())
    # The weight gradient is not rounded to bfloat16: float32 accumulation of exact products.
    np.testing.assert_allclose(
        np.asarray(dw, np.float64), x64.T @ g64, rtol=1e-5, atol=1e-5 * np.abs(x64.T @ g64).max()
    )


def test_bfloat16_matmul_backward_multiplies_bfloat16_operands():
    """Every product of a bfloat16 linear layer, forward and backward, takes bfloat16 operands
    (jax's own transposes would multiply a float32 cotangent by the bfloat16 weight)."""
    x, w = jnp.ones((64, 32), jnp.bfloat16), jnp.ones((32, 16), jnp.float32)

    def loss(x, w):
        return jnp.sum(ops.matmul(x, w, jnp.bfloat16).astype(jnp.float32) ** 2)

    text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).as_text()
    dots = [line for line in text.splitlines() if "dot_general" in line]
    assert len(dots) == 3, dots
    for line in dots:
        operands = re.search(r":\s*\((.*?)\)\s*->", line).group(1)
        assert "f32" not in operands and "bf16" in operands, line


def test_gelu_value_and_derivative_match_float64():
    xs = np.linspace(-6.0, 6.0, 241)
    erf = np.vectorize(math.erf)
    want = 0.5 * xs * (1.0 + erf(xs / math.sqrt(2.0)))
    dwant = 0.5 * (1.0 + erf(xs / math.sqrt(2.0))) + xs * np.exp(-0.5 * xs**2) / math.sqrt(2.0 * math.pi)
    x = jnp.asarray(xs, jnp.float32)
    got, vjp = jax.vjp(ops.gelu, x)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-6)
    np.testing.assert_allclose(np.asarray(vjp(jnp.ones_like(x))[0]), dwant, atol=2e-6)
    np.testing.assert_allclose(np.asarray(got), np.asarray(jax.nn.gelu(x, approximate=False)), atol=2e-6)
    # bfloat16 in: computed in float32, rounded once.
    xb = x.astype(jnp.bfloat16)
    assert ops.gelu(xb).dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(ops.gelu(xb), np.float64), want, rtol=8e-3, atol=8e-3)


def test_gelu_backward_keeps_only_its_input():
    """jax's autodiff of the erf GELU keeps several [tokens, ffn] tensors; ops.gelu keeps x."""
    x = jnp.ones((128, 64), jnp.float32)
    ours = saved_residuals(lambda x: jnp.sum(ops.gelu(x) ** 2), x)
    theirs = saved_residuals(lambda x: jnp.sum(jax.nn.gelu(x, approximate=False) ** 2), x)
    big = [a for a, _ in ours if a.shape == x.shape]
    assert len(big) <= 2  # x (for the gelu) and gelu(x) (for the square)
    assert len([a for a, _ in theirs if a.shape == x.shape]) > len(big)


CASES = {
    "tied": dict(),
    "untied": dict(tie_word_embeddings=False),
    "scale+softcap": dict(logit_scale=0.7, final_logit_softcapping=4.0),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_chunked_loss_matches_float64_autodiff(case, monkeypatch):
    """Loss and gradients (hidden states, head weights) equal jax's float64 autodiff of the plain
    whole-logits cross-entropy; the length needs padding and spans several chunks."""
    cfg = MPTConfig(d_model=32, n_heads=2, n_layers=1, vocab_size=2000, max_seq_len=128, **CASES[case])
    batch, length = 3, 101
    monkeypatch.setattr("mpt_jax.loss.CHUNK_ELEMENTS", batch * 32 * cfg.vocab_size)
    assert chunk_length(batch, length - 1, cfg.vocab_size) < length - 1  # several chunks
    rng = np.random.default_rng(1)
    h = _rand(rng, (batch, length, 32))
    shape = (2000, 32) if cfg.tie_word_embeddings else (32, 2000)
    w = _rand(rng, shape) * 0.3
    tokens = jnp.asarray(rng.integers(0, 2000, (batch, length)), jnp.int32)
    mask = jnp.asarray(rng.integers(0, 2, (batch, length)), jnp.int32)

    def ours(h, w):
        total, count = next_token_loss(h, w, tokens, mask, cfg, tied=cfg.tie_word_embeddings)
        return total / count

    def reference(h, w):
        z = h @ (w.T if cfg.tie_word_embeddings else w)
        logits = final_logits(z, cfg)[:, :-1]
        nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, tokens[:, 1:, None], -1)[..., 0]
        weights = mask[:, 1:].astype(logits.dtype)
        return jnp.sum(nll * weights) / jnp.sum(weights)

    loss, grads = jax.value_and_grad(ours, argnums=(0, 1))(h, w)
    with jax.enable_x64(True):
        h64, w64 = jnp.asarray(np.asarray(h), jnp.float64), jnp.asarray(np.asarray(w), jnp.float64)
        want, want_grads = jax.value_and_grad(reference, argnums=(0, 1))(h64, w64)
        want, want_grads = float(want), [np.asarray(g) for g in want_grads]
    assert abs(float(loss) - want) < 1e-5 * abs(want)
    for got, ref in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(np.asarray(got, np.float64), ref, rtol=1e-4, atol=1e-6 * np.abs(ref).max())


def test_chunked_loss_never_holds_the_whole_logits():
    """The compiled gradient's temporaries stay far below one [tokens, vocab] float32 block."""
    cfg = MPTConfig(d_model=64, n_heads=2, n_layers=1, vocab_size=32768, max_seq_len=2048)
    h = jax.ShapeDtypeStruct((4, 2048, 64), jnp.float32)  # 16 chunks of loss.CHUNK_ELEMENTS logits
    w = jax.ShapeDtypeStruct((32768, 64), jnp.float32)
    tokens = jax.ShapeDtypeStruct((4, 2048), jnp.int32)

    def loss(h, w, t):
        return next_token_loss(h, w, t, jnp.ones_like(t), cfg, tied=True)[0]

    temp = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(h, w, tokens).compile().memory_analysis().temp_size_in_bytes
    logits_bytes = 4 * 2048 * 32768 * 4
    assert temp < logits_bytes / 2, (temp, logits_bytes)


@pytest.mark.parametrize("rms,bias,axes", [(False, True, 1), (False, False, 2), (True, False, 1)])
def test_norm_forward_and_gradients_match_float64_autodiff(rms, bias, axes):
    rng = np.random.default_rng(2)
    shape = (3, 7, 4, 16) if axes == 2 else (3, 7, 64)
    norm_shape = shape[-axes:]
    x = _rand(rng, shape) * 3.0 + 1.5
    scale, b = _rand(rng, norm_shape), (_rand(rng, norm_shape) if bias else None)
    g = _rand(rng, shape)

    def ours(x, scale, b):
        return jnp.sum(ops.norm(x, scale, b, axes, 1e-5, rms, jnp.float32) * g)

    def reference(x, scale, b):
        reduce = tuple(range(x.ndim - axes, x.ndim))
        y = x if rms else x - x.mean(reduce, keepdims=True)
        y = y / jnp.sqrt(jnp.mean(y * y, reduce, keepdims=True) + 1e-5) * scale
        return jnp.sum((y if b is None else y + b) * g.astype(x.dtype))

    argnums = (0, 1, 2) if bias else (0, 1)
    got = jax.value_and_grad(ours, argnums=argnums)(x, scale, b)

    def as64(a):
        return None if a is None else jnp.asarray(np.asarray(a), jnp.float64)

    with jax.enable_x64(True):
        want = jax.value_and_grad(reference, argnums=argnums)(as64(x), as64(scale), as64(b))
        want = (float(want[0]), [np.asarray(w) for w in want[1]])
    assert abs(float(got[0]) - want[0]) <= 1e-5 * abs(want[0]) + 1e-4
    for a, w in zip(got[1], want[1], strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float64), w, rtol=1e-4, atol=1e-5 * np.abs(w).max())
