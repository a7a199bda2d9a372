"""llm-foundry's parameter initialisation (``param_init_fns.py``) as JAX initializers.

Torch's rules are stated on (out, in) weights; ours are Flax kernels laid out (in..., out...), so
each initializer is told which axes are the inputs (``fan_in``) and which the outputs. With the
defaults (kaiming_normal_, fan_in, relu) a weight gets std sqrt(2 / fan_in); the residual
projections (attn.out_proj, ffn.down_proj) are further divided by sqrt(2 * n_layers).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from mpt_jax.config import MPTConfig

Initializer = jax.nn.initializers.Initializer


def _gain(nonlinearity: str, a: float) -> float:
    """torch.nn.init.calculate_gain."""
    if nonlinearity == "relu":
        return math.sqrt(2.0)
    if nonlinearity == "leaky_relu":
        return math.sqrt(2.0 / (1 + a**2))
    if nonlinearity == "tanh":
        return 5.0 / 3
    if nonlinearity == "selu":
        return 3.0 / 4
    return 1.0  # linear, sigmoid


def _fans(shape: Sequence[int], in_axes: Sequence[int], slice_axes: Sequence[int] | None) -> tuple[int, int]:
    in_axes = [a % len(shape) for a in in_axes]
    fan_in = math.prod(shape[a] for a in in_axes)
    if slice_axes is None:
        fan_out = math.prod(s for i, s in enumerate(shape) if i not in in_axes)
    else:  # a fused weight is initialised one slice at a time: only the slice's outputs count
        fan_out = math.prod(shape[a % len(shape)] for a in slice_axes)
    return fan_in, fan_out


def _normal(std: float) -> Initializer:
    def init(key, shape, dtype=jnp.float32):
        return std * jax.random.normal(key, shape, jnp.float32).astype(dtype)

    return init


def _uniform(bound: float) -> Initializer:
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)

    return init


def weight_init(
    cfg: MPTConfig,
    in_axes: Sequence[int],
    *,
    residual: bool = False,
    slice_axes: Sequence[int] | None = None,
) -> Initializer:
    """The initializer for a linear kernel whose input axes are ``in_axes``.

    ``slice_axes`` marks a fused kernel (Wqkv) by the output axes of one of its slices: llm-foundry
    initialises fused weights slice by slice (one head_dim slice per head), which matters to
    fan_out-based rules (xavier, fan_mode="fan_out").
    """

    def init(key, shape, dtype=jnp.float32):
        fan_in, fan_out = _fans(shape, in_axes, slice_axes)
        name = cfg.init_name
        if name in ("kaiming_normal_", "kaiming_uniform_"):
            fan = fan_in if cfg.init_fan_mode == "fan_in" else fan_out
            std = _gain(cfg.init_nonlinearity, cfg.init_gain) / math.sqrt(fan)
            base = _normal(std) if name == "kaiming_normal_" else _uniform(math.sqrt(3.0) * std)
        elif name in ("xavier_normal_", "xavier_uniform_"):
            std = cfg.init_gain * math.sqrt(2.0 / (fan_in + fan_out))
            base = _normal(std) if name == "xavier_normal_" else _uniform(math.sqrt(3.0) * std)
        elif name == "baseline_":
            base = _normal(cfg.init_std)
        else:  # small_init_ and neox_init_ (Nguyen & Salazar): std sqrt(2 / (5 d))
            base = _normal(math.sqrt(2.0 / (5.0 * cfg.d_model)))
        div = 1.0
        if residual:
            if name == "neox_init_":  # neox_init_ fixes the residual divisor to n_layers / sqrt(10)
                div = cfg.n_layers / math.sqrt(10.0)
            elif cfg.init_div_is_residual is True:
                div = math.sqrt(2.0 * cfg.n_layers)
            elif cfg.init_div_is_residual is not False:
                div = float(cfg.init_div_is_residual)
        value = base(key, shape, jnp.float32) / div
        return value.astype(dtype)

    return init


def embedding_init(cfg: MPTConfig) -> Initializer:
    """Embedding tables [rows, d_model]: emb_init_std, else emb_init_uniform_lim, else the weight rule
    applied as torch does to an (rows, d) weight, whose fan_in is d."""
    if cfg.emb_init_std is not None:
        return _normal(cfg.emb_init_std)
    if cfg.emb_init_uniform_lim is not None:
        return _uniform(cfg.emb_init_uniform_lim)
    return weight_init(cfg, in_axes=(1,))
