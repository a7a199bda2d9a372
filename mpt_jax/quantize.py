"""Weight-only int8: every matmul weight stored as int8 with one float32 scale per output channel.

    s = max |w| over the weight's input axes / 127        (a zero channel gets s = 0 and q = 0)
    q = clip(round(w * (1 / s)), -127, 127)               (round half to even, symmetric: no -128)

``model.py`` reads such params as they are: a ``Linear`` computes ``(x @ q) * s`` (equal to
``x @ (q * s)`` in real numbers, and one multiply per output instead of one per weight), an
``Embedding`` scales the rows it looks up and, as the tied head, the logits of each vocabulary row.
Quantized are every ``Linear`` kernel (attention, MLP, an untied ``lm_head``) and, unless
``include_embedding=False``, the ``wte`` / ``wpe`` tables; norm scales and biases stay float.

Which axes of a weight are its inputs is read off the model itself: the params are traced once with
``flax.linen.intercept_methods`` recording each ``Linear``'s ``n_in`` (its kernel is laid out
(in..., out...), after the stacked ``layers`` axis under ``blocks``) and each ``Embedding`` (a
[rows, d_model] table whose rows are its outputs). So Wq/Wk/Wv, Wq/Wkv, gate_proj or any new
``Linear`` are covered without a table here.

Scales are float32 whatever the params' dtype: a bfloat16 scale would add up to 2^-9 relative error
per channel on top of int8's 2^-8 (half a step of 1/127), and all scales of MPT-30B take 12.6 MB
(the model casts them to the compute dtype in the matmul anyway).

Memory: ``quantize_params`` works one leaf at a time (numpy leaves in chunks of at most 64M elements
along the stacked layers or table rows), so quantizing float params costs the int8 copy plus one
chunk's float32 temporaries, never a second float copy. A loader can go lower by quantizing each
leaf as it is read (``quantize_array`` with ``input_axes(cfg)[path]``).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mpt_jax.config import MPTConfig
from mpt_jax.model import SCALE_SUFFIX, Embedding, Linear, flat_params, param_shapes

INT8_MAX = 127
SCALE_DTYPE = np.float32
_CHUNK = 1 << 26  # elements of a numpy leaf quantized at once (float32 temporaries of 256 MiB each)

Path = tuple[str, ...]


# ------------------------------------------------------------------------------------------------
# Which params are quantized, and their input axes: from the model's own modules.


@functools.lru_cache(maxsize=16)
def _traced(cfg: MPTConfig) -> tuple[Any, dict[Path, tuple[int, ...]]]:
    """(the boxed abstract params, {param path: input axes}) from one trace of the model."""
    modules: dict[Path, tuple[str, int, int]] = {}  # module path -> (param name, n_in, n_out)

    def record(next_fun, args, kwargs, context):
        m = context.module
        if isinstance(m, Linear):
            modules[tuple(m.path)] = ("kernel", m.n_in, len(m.features))
        elif isinstance(m, Embedding):
            modules[tuple(m.path)] = ("embedding", 1, 1)  # [rows, d_model]: d_model is the input
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        boxed = param_shapes(cfg)
    shapes = dict(flat_params(nn.meta.unbox(boxed)))
    axes: dict[Path, tuple[int, ...]] = {}
    for module, (name, n_in, n_out) in modules.items():
        path = (*module, name)
        ndim = len(shapes[path].shape)
        if name == "kernel":  # [stacked..., in..., out...]
            first = ndim - n_in - n_out
            axes[path] = tuple(range(first, first + n_in))
        else:  # [stacked..., rows, d_model]
            axes[path] = (ndim - 1,)
    return boxed, axes


def input_axes(cfg: MPTConfig, *, include_embedding: bool = True) -> dict[Path, tuple[int, ...]]:
    """{path of every param that ``quantize_params`` quantizes: the axes its scale reduces over}.

    E.g. ``("blocks", "attn", "Wqkv", "kernel")`` [layers, d, 3, heads, head_dim] -> (1,) (scale
    [layers, 3, heads, head_dim]); ``out_proj`` [layers, heads, head_dim, d] -> (1, 2) (scale
    [layers, d]); ``("wte", "embedding")`` [vocab, d] -> (1,) (scale [vocab])."""
    axes = _traced(cfg)[1]
    return {p: a for p, a in axes.items() if include_embedding or p[-1] != "embedding"}


def scale_path(path: Path) -> Path:
    """Where the scale of the int8 param at ``path`` lives: beside it, with model.SCALE_SUFFIX."""
    return (*path[:-1], path[-1] + SCALE_SUFFIX)


# ------------------------------------------------------------------------------------------------
# One array.


def _quantize(xp, w, axes: tuple[int, ...]):
    """The arithmetic, once for numpy and jax.numpy (``xp``). Multiplications by reciprocals, as
    XLA rewrites divisions by a broadcast anyway: numpy and XLA then round identically."""
    w32 = w.astype(xp.float32)
    amax = xp.max(xp.abs(w32), axis=axes, keepdims=True)
    scale = (amax * xp.float32(1.0 / INT8_MAX)).astype(SCALE_DTYPE)
    inverse = xp.float32(1.0) / xp.where(scale > 0, scale, xp.float32(1.0))
    q = xp.clip(xp.round(w32 * inverse), -INT8_MAX, INT8_MAX).astype(xp.int8)
    return q, xp.squeeze(scale, axes)


_quantize_jax = jax.jit(functools.partial(_quantize, jnp), static_argnums=1)


def quantize_array(w, axes: tuple[int, ...]) -> tuple[Any, Any]:
    """(int8 q, float32 scale) of one weight, the scale's shape being w's without ``axes``.

    numpy in, numpy out (in chunks along axis 0 when it is not an input axis, so a stacked 30B
    kernel never has a whole float32 copy); jax arrays (and tracers, under jit or eval_shape) go
    through one jitted function."""
    axes = tuple(sorted(a % np.ndim(w) for a in axes))
    if not isinstance(w, np.ndarray):
        return _quantize_jax(w, axes)
    with np.errstate(invalid="ignore"):  # a non-finite weight: quantize_params names it
        if 0 in axes or w.ndim < 2 or w.size <= _CHUNK:
            return _quantize(np, w, axes)
        q = np.empty(w.shape, np.int8)
        scale = np.empty(tuple(n for i, n in enumerate(w.shape) if i not in axes), SCALE_DTYPE)
        step = max(1, _CHUNK // (w.size // w.shape[0]))
        for start in range(0, w.shape[0], step):
            q[start : start + step], scale[start : start + step] = _quantize(np, w[start : start + step], axes)
        return q, scale


def dequantize_array(q, scale, axes: tuple[int, ...], dtype=SCALE_DTYPE):
    """q * scale, the scale broadcast over ``axes`` (the inverse of ``quantize_array`` up to rounding)."""
    xp = np if isinstance(q, np.ndarray) else jnp
    axes = tuple(sorted(a % np.ndim(q) for a in axes))
    return (q.astype(SCALE_DTYPE) * xp.expand_dims(scale.astype(SCALE_DTYPE), axes)).astype(dtype)


# ------------------------------------------------------------------------------------------------
# A params tree.


def _set(tree: dict, path: Path, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def is_quantized(params) -> bool:
    """Whether ``params`` holds int8 weights (any ``*_scale`` leaf beside one)."""
    return any(path[-1].endswith(SCALE_SUFFIX) for path, _ in flat_params(params))


def _check_tree(cfg: MPTConfig, flat: list[tuple[Path, Any]], what: str) -> None:
    want = {p: tuple(x.shape) for p, x in flat_params(nn.meta.unbox(_traced(cfg)[0]))}
    got = {p: tuple(np.shape(x)) for p, x in flat}
    if set(want) != set(got):
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        raise ValueError(
            f"{what}: params do not fit the config: missing {['/'.join(p) for p in missing]}, "
            f"unexpected {['/'.join(p) for p in extra]}"
        )
    for p, shape in want.items():
        if got[p] != shape:
            raise ValueError(f"{what}: {'/'.join(p)} has shape {got[p]}, the config implies {shape}")


def quantize_params(cfg: MPTConfig, params, *, include_embedding: bool = True) -> dict:
    """The params with every weight of ``input_axes(cfg)`` as int8 plus its float32 scale.

    ``params``: float params of ``cfg`` (numpy or jax leaves, any float dtype; they are not
    modified). Other leaves (norms, biases) are passed through as they are. Raises ValueError for
    params that are already quantized, do not fit ``cfg``, or hold a non-finite weight."""
    params = nn.meta.unbox(params)
    flat = flat_params(params)
    if is_quantized(params):
        raise ValueError("quantize_params: params are already quantized (they hold *_scale leaves)")
    _check_tree(cfg, flat, "quantize_params")
    axes = input_axes(cfg, include_embedding=include_embedding)
    out: dict = {}
    for path, leaf in flat:
        if path not in axes:
            _set(out, path, leaf)
            continue
        q, scale = quantize_array(leaf, axes[path])
        if not isinstance(scale, jax.core.Tracer) and not np.isfinite(np.asarray(scale)).all():
            raise ValueError(f"quantize_params: {'/'.join(path)} holds inf or NaN; int8 cannot represent it")
        _set(out, path, q)
        _set(out, scale_path(path), scale)
    return out


def dequantize_params(cfg: MPTConfig, params, *, dtype=SCALE_DTYPE) -> dict:
    """Float params (``dtype``) from quantized ones: each int8 weight times its scale; the other
    leaves as they are. ``cfg`` says the input axes (a [rows, rows] table would be ambiguous)."""
    flat = dict(flat_params(nn.meta.unbox(params)))
    axes = input_axes(cfg)
    out: dict = {}
    for path, leaf in flat.items():
        if path[-1].endswith(SCALE_SUFFIX):
            continue
        scale = flat.get(scale_path(path))
        if scale is None:
            _set(out, path, leaf)
        elif path not in axes:
            raise ValueError(f"dequantize_params: {'/'.join(path)} has a scale but is not a weight of the config")
        else:
            _set(out, path, dequantize_array(leaf, scale, axes[path], dtype))
    _check_tree(cfg, flat_params(out), "dequantize_params")
    return out


def quantized_param_shapes(cfg: MPTConfig, *, include_embedding: bool = True, dtype: str | None = None):
    """The abstract quantized params, boxed with logical axis names like ``model.param_shapes``:
    an int8 weight keeps its float weight's names, its scale gets the names of the weight's output
    axes (so the sharding rules place each scale like the outputs it scales). Float leaves are in
    ``dtype`` (default ``cfg.param_dtype``). Nothing is allocated."""
    boxed = _traced(cfg)[0]
    axes = input_axes(cfg, include_embedding=include_embedding)
    out: dict = {}
    boxes = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    for (path, value), box in zip(flat_params(nn.meta.unbox(boxed)), boxes, strict=True):
        if path not in axes:
            _set(out, path, box.replace(value=jax.ShapeDtypeStruct(value.shape, jnp.dtype(dtype or value.dtype))))
            continue
        keep = [i for i in range(len(value.shape)) if i not in axes[path]]
        _set(out, path, box.replace(value=jax.ShapeDtypeStruct(value.shape, jnp.int8)))
        scale = jax.ShapeDtypeStruct(tuple(value.shape[i] for i in keep), SCALE_DTYPE)
        _set(out, scale_path(path), box.replace(value=scale, names=tuple(box.names[i] for i in keep)))
    return out


def quantized_bytes(params) -> dict[str, int]:
    """Bytes of a params tree (arrays or ShapeDtypeStructs) by kind: ``int8`` weights, their
    ``scales``, the ``float`` rest (norms, biases, unquantized weights), and the ``total``."""
    out = {"int8": 0, "scales": 0, "float": 0}
    for path, leaf in flat_params(nn.meta.unbox(params)):
        dtype = jnp.dtype(leaf.dtype)
        kind = "scales" if path[-1].endswith(SCALE_SUFFIX) else "int8" if dtype == jnp.int8 else "float"
        out[kind] += math.prod(np.shape(leaf)) * dtype.itemsize
    out["total"] = sum(out.values())
    return out
