"""Rotary position embeddings as llm-foundry's MPT applies them (``attn_config.rope``).

Both of its implementations rotate the full head dimension in the GPT-NeoX layout (the first and
second halves of each head form the pairs), after qk-norm and before the scores:

    (x1, x2) -> (x1 cos(t f) - x2 sin(t f), x2 cos(t f) + x1 sin(t f)),   f = theta^(-2i/d)

``rope_impl="dail"`` is flash-attn's ``RotaryEmbedding`` (``original``, or ``xpos``, which also
scales q by ``s^((t - L//2)/base)`` and k by its inverse); ``rope_impl="hf"`` is transformers'
Llama rotary with its ``rope_hf_config`` scalings (``no_scaling``, ``linear``, ``dynamic`` NTK,
``llama3``). Positions ``t`` are the token's index in the row (plus the cached length when
decoding), not restarted for packed documents, as in llm-foundry. Angles are float32 whatever the
compute dtype (flash-attn's ``pos_idx_in_fp32``; a bfloat16 position index would be wrong past 256).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from mpt_jax.config import MPTConfig


def inverse_frequencies(cfg: MPTConfig, seq_len: int) -> np.ndarray:
    """The [head_dim / 2] float32 frequencies for a forward over ``seq_len`` positions.

    Only ``dynamic`` NTK depends on ``seq_len``: past ``max_seq_len`` it raises the base to
    ``theta * (factor * seq_len / max_seq_len - (factor - 1)) ** (d / (d - 2))``.
    """
    dim = cfg.head_dim
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    base = float(cfg.rope_theta)
    kind = cfg.rope_hf_type if cfg.rope_impl == "hf" else "no_scaling"
    if kind == "dynamic" and seq_len > cfg.max_seq_len:
        factor = cfg.rope_hf_factor
        base = base * (factor * seq_len / cfg.max_seq_len - (factor - 1.0)) ** (dim / (dim - 2))
    inv = (1.0 / np.power(np.float32(base), exponents)).astype(np.float32)
    if kind == "linear":
        inv = (inv / np.float32(cfg.rope_hf_factor)).astype(np.float32)
    elif kind == "llama3":
        inv = _llama3(inv, cfg).astype(np.float32)
    return inv


def _llama3(inv: np.ndarray, cfg: MPTConfig) -> np.ndarray:
    """Llama 3.1's band scaling: long wavelengths divided by factor, short ones kept, a smooth
    interpolation between the two bands."""
    factor = cfg.rope_hf_factor
    low, high = cfg.rope_hf_low_freq_factor, cfg.rope_hf_high_freq_factor
    context = cfg.rope_hf_original_max_position_embeddings
    wavelength = 2 * math.pi / inv
    scaled = np.where(wavelength > context / low, inv / factor, inv)
    smooth = (context / wavelength - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelength >= context / high) & (wavelength <= context / low)
    return np.where(medium, blended, scaled)


def _row_frequencies(cfg: MPTConfig, seq_len: jax.Array) -> jax.Array:
    """[B, 1, head_dim / 2] frequencies for rows of different lengths (``seq_len`` [B]): only
    dynamic NTK depends on the length, so the others broadcast one row."""
    if not (cfg.rope_impl == "hf" and cfg.rope_hf_type == "dynamic"):
        return jnp.asarray(inverse_frequencies(cfg, 0))[None, None]
    dim, factor = cfg.head_dim, cfg.rope_hf_factor
    length = seq_len.astype(jnp.float32)
    grown = cfg.rope_theta * (factor * length / cfg.max_seq_len - (factor - 1.0)) ** (dim / (dim - 2))
    base = jnp.where(length > cfg.max_seq_len, grown, cfg.rope_theta)
    exponents = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
    return (1.0 / base[:, None] ** exponents[None])[:, None]


def _xpos_scale(cfg: MPTConfig, positions: jax.Array, seq_len: int | jax.Array) -> jax.Array:
    """[B, S, head_dim / 2] xpos factors ``s_i ** ((t - seq_len // 2) / scale_base)``."""
    dim = cfg.head_dim
    s = (jnp.arange(0, dim, 2, dtype=jnp.float32) + 0.4 * dim) / (1.4 * dim)
    half = (seq_len // 2) if isinstance(seq_len, int) else (seq_len // 2)[:, None]
    power = (positions.astype(jnp.float32) - half) / cfg.rope_dail_xpos_scale_base
    return s ** power[..., None]


def _rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, S, H, D]; cos, sin [B, S, D/2] float32 -> rotated x in x's dtype."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    x1, x2 = x32[..., :half], x32[..., half:]
    cos, sin = cos[:, :, None], sin[:, :, None]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def apply_rope(
    q: jax.Array, k: jax.Array, positions: jax.Array, cfg: MPTConfig, seq_len: int | jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Rotates q [B, S, H, D] and k [B, S, Hkv, D] at ``positions`` [B, S] (ints).

    ``seq_len`` is the total length the forward covers, cached keys included (an int, or [B] when
    cache rows hold different lengths): dynamic NTK and xpos depend on it. A cached key keeps the
    rotation of the step that wrote it, as in llm-foundry's cached generation.
    """
    if isinstance(seq_len, int):
        frequencies = jnp.asarray(inverse_frequencies(cfg, seq_len))
    else:
        frequencies = _row_frequencies(cfg, seq_len)
    angles = positions.astype(jnp.float32)[..., None] * frequencies
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    if cfg.rope_impl == "dail" and cfg.rope_dail_type == "xpos":
        scale = _xpos_scale(cfg, positions, seq_len)
        return _rotate(q, cos * scale, sin * scale), _rotate(k, cos / scale, sin / scale)
    return _rotate(q, cos, sin), _rotate(k, cos, sin)
