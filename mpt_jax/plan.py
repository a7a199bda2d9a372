"""Per-device memory of a training run (or of serving a model), before anything is allocated, and the meshes that fit.

    python -m mpt_jax.plan --config=configs/30b.py --devices=64 --device_memory_gb=80 \
        [--config.train.micro_batch_size=64 ...] [--compile]

Prints, per device: params, optimizer state, gradients, activations (for the configured remat
policy and micro-batch), a margin for XLA's temporaries, the total and whether it fits; then every
(data, fsdp, tensor) mesh of ``--devices`` that the config allows, with its total, the configured
one marked. ``--compile`` also lowers and compiles the real train step on abstract inputs (nothing
is allocated) over the devices it finds, or over forced CPU devices when there are too few (a GPU
run then compiled as the GPU runs it, ``compile_report``), and prints XLA's own per-device numbers
next to the estimate.

Params, optimizer state and gradients are counted leaf by leaf: each leaf's size divided by the
mesh axes that its PartitionSpec (``sharding.shardings_of_state`` with the config's rules) shards
it over, on a ``jax.sharding.AbstractMesh`` of the requested shape, so no devices are needed and the
counts are what ``jax.jit`` will place on a device. Activations follow an analytic per-layer formula
(``activation_bytes``; docs/sharding.md, "Memory planner", writes it out and states how close it
comes to XLA's buffer assignment).

``--inference [--cache_len=8192 --batch=1 --cache_dtype=]`` prints instead what serving the
model holds per device of the config's mesh on ``--devices``: its params in float32, bfloat16 and
int8 (``mpt_jax.quantize``, float32 scales) and the KV cache (``inference_memory``).

Python:

    from mpt_jax import plan
    report = plan.plan(config, devices=64, device_memory_gb=80.0)   # dict: estimate, fits, meshes, remedies, ...
    sizes = plan.estimate(config, (1, 64, 1))                       # dict of bytes per device
    xla = plan.compile_report(config, (1, 8, 1))                    # XLA's memory_analysis, compile time
    mem = plan.inference_memory(cfg, batch=1, cache_len=8192, weight_dtype="int8", mesh_shape=(1, 1, 1))
"""

from __future__ import annotations

import dataclasses
import functools
import math
import resource
import time
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from absl import logging
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec

from mpt_jax import cli, optim, run_config, sharding
from mpt_jax.config import MPTConfig
from mpt_jax.loss import chunk_length
from mpt_jax.model import SCALE_SUFFIX, flat_params, param_shapes

GiB = 1024**3

# The margin for what the formula does not itemise: XLA's temporaries for fusions, collectives'
# buffers, layout copies, fragmentation. A fraction of gradients + activations (see the docs for
# how it was chosen against XLA's buffer assignment).
DEFAULT_MARGIN = 0.15

# ------------------------------------------------------------------------------------------------
# Exact sharded sizes of params and optimizer state.


def _abstract_mesh(mesh_shape: Sequence[int]) -> AbstractMesh:
    shape = tuple(int(s) for s in mesh_shape)
    if len(shape) != 3 or any(s < 1 for s in shape):
        raise ValueError(f"mesh shape must be three positive sizes (data, fsdp, tensor), got {mesh_shape!r}")
    return AbstractMesh(shape, sharding.AXES)


@dataclasses.dataclass(frozen=True)
class _Model:
    """What the planner needs of a config's model, traced once (param_shapes of 30B takes ~1 s)."""

    cfg: MPTConfig
    boxed: Any  # param_shapes(cfg): ShapeDtypeStructs in nn.Partitioned boxes
    params: Any  # unboxed ShapeDtypeStructs
    opt_state: Any  # jax.eval_shape(optimizer.init, params)
    optimizer: optax.GradientTransformation


@functools.lru_cache(maxsize=8)
def _model(cfg: MPTConfig, optimizer_key: tuple) -> _Model:
    optimizer = optim.make_optimizer(dict(optimizer_key), {"name": "constant"}, max_steps=1)
    boxed = param_shapes(cfg)
    params = nn.meta.unbox(boxed)
    return _Model(cfg, boxed, params, jax.eval_shape(optimizer.init, params), optimizer)


def _model_of(config) -> _Model:
    cfg = run_config.model_config(config)
    # The schedule does not change the optimizer state's structure; only the optimizer section does.
    opt = config.optimizer.to_dict() if hasattr(config.optimizer, "to_dict") else dict(config.optimizer)
    return _model(cfg, tuple(sorted(opt.items())))


def _param_shardings(model: _Model, mesh, rules):
    """The params' shardings on ``mesh``, from the cached shapes (no re-tracing per mesh)."""
    return sharding.shardings_of_params(model.boxed, mesh, rules)


def _state_shardings(model: _Model, mesh, rules):
    """The train state's shardings on ``mesh``, from the cached shapes: what train.py places."""
    return sharding.shardings_of_state(model.boxed, model.opt_state, model.optimizer, mesh, rules)


def _device_bytes(tree, shardings, dtype=None) -> int:
    """Bytes one device holds of ``tree`` (ShapeDtypeStructs) placed with ``shardings``."""

    def one(x, s):
        itemsize = jnp.dtype(dtype or x.dtype).itemsize
        return math.prod(s.shard_shape(x.shape)) * itemsize

    return int(sum(jax.tree.leaves(jax.tree.map(one, tree, shardings))))


# ------------------------------------------------------------------------------------------------
# Activations.


def _split(n: int, ways: int) -> int:
    """A dimension of n over a mesh axis of ``ways``: split if it divides, else replicated (as sharding.spec_for)."""
    return n // ways if ways > 1 and n % ways == 0 else n


def attention_path(cfg: MPTConfig, platform: str = "gpu") -> str:
    """How the config's attention runs on ``platform``: ``xla`` (materialised [T, T] scores),
    ``flash`` (the pallas kernels: nothing [T, T]) or ``cudnn`` (flash, plus a materialised bias)."""
    impl = cfg.attn_impl
    if impl == "auto":
        return "flash" if platform == "gpu" and cfg.attn_pdrop == 0.0 else "xla"
    return {"pallas": "flash", "cudnn": "cudnn"}.get(impl, "xla")


def activation_bytes(
    cfg: MPTConfig,
    rows: int,
    seq_len: int,
    tensor: int = 1,
    *,
    platform: str = "gpu",
    head_weight_bytes: int = 0,
    layer_transient_bytes: int = 0,
    head_transient_bytes: int = 0,
    head_grad_bytes: int | None = None,
) -> dict[str, int]:
    """Bytes one device holds for the backward pass of one micro-batch (the formula in docs/sharding.md).

    ``rows``: micro-batch rows on this device; ``tensor``: the tensor-parallel degree (heads, MLP
    and vocabulary split over it, the [tokens, d_model] stream replicated); ``platform`` resolves
    ``attn_impl="auto"``. Weight-sized terms come from the sharded params (``estimate`` computes
    them): ``head_weight_bytes``, the tied table cast to the compute dtype; ``layer_transient_bytes`` /
    ``head_transient_bytes``, one layer's (the table's) gathered weights and unreduced gradients;
    ``head_grad_bytes``, the head table's float32 gradient sum as sharded (default: unsharded).

    Returns ``act_saved`` (every layer's residuals), ``act_layer`` (one layer's backward: what remat
    recomputes, the gradient work, the layer's gathered weights and gradients) and ``act_head``
    (final norm, logits, the loss' softmax and the logits' gradient).
    """
    c = jnp.dtype(cfg.dtype).itemsize
    f32 = 4
    d, T, L = cfg.d_model, seq_len, cfg.n_layers
    n = rows * T  # tokens on this device
    q = _split(cfg.n_heads, tensor) * cfg.head_dim
    kv = _split(cfg.num_kv_heads, tensor) * cfg.head_dim
    heads = _split(cfg.n_heads, tensor)
    ffn = _split(cfg.ffn_dim, tensor)
    vocab = _split(cfg.vocab_size, tensor)
    glu = cfg.ffn_type == "mptglu"
    path = attention_path(cfg, platform)
    # Only the xla path materialises the [rows, heads, T, T] scores (float32).
    scores = rows * heads * T * T if path == "xla" else 0

    # What one layer saves without remat (jax's residuals; tests/test_plan.py checks them exactly).
    norms = 2 * (c * n * d + 2 * f32 * n)  # each norm's input and its two float32 statistics (ops.norm)
    # Inputs of the matmuls: the normed x once per projection that reads it (Wqkv, or Wq and Wkv;
    # up, or up and gate), and the attention output into out_proj.
    n_in = (1 if cfg.attn_type == "multihead_attention" else 2) + (2 if glu else 1)
    linear_in = c * n * (n_in * d + q)
    qkv = c * n * (q + 2 * kv)  # q, k, v (into the einsums, or the kernel)
    if cfg.clip_qkv is not None:  # clip = max then min: each keeps its input
        qkv += 2 * c * n * (q + 2 * kv)
    if cfg.qk_ln:  # LayerNorms over q's and k's features: their inputs and statistics
        qkv += c * n * (q + kv) + 4 * f32 * n
    # The attention keeps its output and the float32 log-sum-exp (the xla path's hand-written
    # backward recomputes the probabilities, as a flash kernel does); cuDNN also the ALiBi bias.
    attn = c * n * q + f32 * rows * heads * T + (c * heads * T * T if path == "cudnn" and cfg.alibi else 0)
    # The up (and gate) outputs, what the activation's derivative keeps, the down projection's input:
    # the exact GELU (ops.gelu) keeps only its input, jax's autodiff of silu and the others two more.
    mlp = ((6 if glu else 4) - (2 if cfg.ffn_act_fn == "gelu" else 0)) * c * n * ffn
    none = norms + linear_in + qkv + attn + mlp

    carry = c * n * d  # the residual stream entering the layer
    dots_no_batch = carry + c * n * (q + 2 * kv) + c * n * d + (2 if glu else 1) * c * n * ffn
    # "dots" also keeps the xla attention's output and log-sum-exp (named; a kernel's are not).
    dots = dots_no_batch + (c * n * q + f32 * rows * heads * T if path == "xla" else 0)
    saved = {"none": none, "full": carry, "dots": dots, "dots_no_batch": dots_no_batch}[cfg.remat_policy]

    # One layer's backward: the recomputed forward (remat policies), the recomputed probabilities
    # and their gradient (xla path: a float32 [rows, heads, T, T], fused; a kernel's dq, dk, dv) and a
    # few float32 cotangents, and the layer's gathered weights and whole gradients.
    work = 2 * f32 * n * d + f32 * n * ffn + (f32 * scores if path == "xla" else f32 * n * (q + 2 * kv))
    layer = work + (0 if cfg.remat_policy == "none" else none) + layer_transient_bytes

    # Final LayerNorm; the loss (loss.py) a chunk of positions at a time: three float32
    # [rows, chunk, vocab] (logits, probabilities, their gradient), the hidden states' gradient,
    # and the table's float32 gradient summed over the chunks.
    chunk = chunk_length(rows, T, cfg.vocab_size)
    logits = 3 * f32 * rows * chunk * vocab
    head_grad = f32 * vocab * d if head_grad_bytes is None else head_grad_bytes
    head = 3 * f32 * n * d + 2 * c * n * d + logits + head_grad + head_weight_bytes + head_transient_bytes
    # The last layer's output is kept too, for the final norm's backward.
    return {"act_saved": L * saved + c * n * d, "act_layer": layer, "act_head": head}


# ------------------------------------------------------------------------------------------------
# The estimate.


def _rows_per_device(config, mesh_shape) -> tuple[int, int]:
    """(micro-batch rows per device per accumulation step, number of accumulation steps)."""
    t = config.train
    micro = int(t.micro_batch_size or t.global_batch_size)
    batch_ways = int(mesh_shape[0]) * int(mesh_shape[1])
    return -(-micro // batch_ways), max(1, int(t.global_batch_size) // micro)


def _grad_dtype(config) -> jnp.dtype:
    return jnp.dtype(run_config.grad_dtype_of(config))


def _layer_grad_dtype(grad_dtype: jnp.dtype) -> jnp.dtype:
    """The dtype one layer's weight gradients are formed in: float32, or a narrower grad_dtype."""
    return grad_dtype if grad_dtype.itemsize < 4 else jnp.dtype(jnp.float32)


def gradient_bytes(params, shardings, grad_dtype, *, accumulating: bool) -> int:
    """Bytes one device holds for the gradients of a train step (``steps.train_step``).

    ``grad_dtype`` float32 (the default): one float32 set, sharded as the params; two when
    accumulating (the running sum and one micro-batch's), whatever the params' dtype. bfloat16:
    the same sets in bfloat16, plus the bfloat16 copy of the params that the loss is differentiated
    at (the leaves not already bfloat16), which lives as long as the micro-batch loop.
    """
    grad_dtype = jnp.dtype(grad_dtype)
    sets = 2 if accumulating else 1
    if grad_dtype == jnp.float32:
        return _device_bytes(params, shardings, jnp.float32) * sets
    total = 0
    for x, s in zip(jax.tree.leaves(params), jax.tree.leaves(shardings), strict=True):
        elements = math.prod(s.shard_shape(x.shape))
        copied = jnp.dtype(x.dtype) != grad_dtype
        total += elements * grad_dtype.itemsize * (sets + int(copied))
    return int(total)


def estimate(
    config, mesh_shape: Sequence[int], *, margin: float = DEFAULT_MARGIN, rules=None, platform: str = "gpu"
) -> dict[str, int]:
    """Bytes per device of one train step of ``config`` on a (data, fsdp, tensor) mesh.

    Keys: ``params``, ``opt_state``, ``batch`` (exact, leaf by leaf, from the sharding rules;
    ``batch`` is the batch arrays the step reads plus the step counter and rng key), ``grads``
    (``gradient_bytes``: sharded as the params, in ``train.grad_dtype``; the sum and one
    micro-batch's when accumulating; with bfloat16 gradients of float32 params also the params'
    bfloat16 copy they are taken at), ``act_saved``, ``act_layer``, ``act_head`` (``activation_bytes``),
    ``activations`` (``act_saved + max(act_layer, act_head)``: the logits are dead before the
    layers' backward starts), ``margin`` (``margin`` x (grads + activations)) and ``total``.
    """
    model = _model_of(config)
    cfg = model.cfg
    rules = sharding.rules_from_config(config) if rules is None else rules
    shape = tuple(int(s) for s in mesh_shape)
    state = _state_shardings(model, _abstract_mesh(shape), rules)
    shardings = state["params"]
    # The same params split only by the tensor axis: what a device sees of a gathered weight.
    whole = _param_shardings(model, _abstract_mesh((1, 1, shape[2])), rules)
    params = _device_bytes(model.params, shardings)
    opt_state = _device_bytes(model.opt_state, state["opt_state"])
    rows, steps = _rows_per_device(config, shape)
    length = run_config.seq_len(config)
    grad_dtype = _grad_dtype(config)
    grads = gradient_bytes(model.params, shardings, grad_dtype, accumulating=steps > 1)

    c = jnp.dtype(cfg.dtype).itemsize
    layers = cfg.n_layers
    blocks, blocks_sh = model.params["blocks"], shardings["blocks"]
    wte, wte_sh = model.params["wte"], shardings["wte"]
    # The layers' matmuls keep their kernels as the params themselves (no copy to save); the head
    # casts the tied table to the compute dtype.
    head_w = _device_bytes(wte, wte_sh, cfg.dtype) if c != jnp.dtype(cfg.param_dtype).itemsize else 0
    # One layer's weight gradients (float32, or train.grad_dtype when narrower) exist whole (split
    # only by tensor) before they are stored or reduce-scattered; sharded kernels are also
    # all-gathered, in the compute dtype. The sharded tied table adds one whole copy (gathered
    # float32 table or its unreduced gradient).
    layer_f32 = _device_bytes(blocks, whole["blocks"], jnp.float32) // layers
    layer_transient = _device_bytes(blocks, whole["blocks"], _layer_grad_dtype(grad_dtype)) // layers
    if _device_bytes(blocks, blocks_sh) < _device_bytes(blocks, whole["blocks"]):
        layer_transient += layer_f32 * c // 4
    head_transient = 0
    if _device_bytes(wte, wte_sh) < _device_bytes(wte, whole["wte"]):
        head_transient = _device_bytes(wte, whole["wte"], jnp.float32)
    act = activation_bytes(
        cfg,
        rows,
        length,
        shape[2],
        platform=platform,
        head_weight_bytes=head_w,
        layer_transient_bytes=layer_transient,
        head_transient_bytes=head_transient,
        head_grad_bytes=_device_bytes(wte, wte_sh, jnp.float32),
    )
    activations = act["act_saved"] + max(act["act_layer"], act["act_head"])
    # jit drops batch arrays the step does not read: tokens and loss_mask are always read.
    used = 2 + int(cfg.attn_uses_sequence_id) + int(cfg.uses_positions)
    batch_rows = -(-int(config.train.global_batch_size) // (shape[0] * shape[1]))
    batch = used * 4 * batch_rows * length + 4 + 8  # int32 arrays, the step counter, the rng key
    out = {
        "params": params,
        "opt_state": opt_state,
        "batch": batch,
        "grads": grads,
        **act,
        "activations": activations,
        "margin": int(margin * (grads + activations)),
    }
    out["total"] = params + opt_state + batch + grads + activations + out["margin"]
    return out


# ------------------------------------------------------------------------------------------------
# Meshes and the plan.


def _on_mesh(config, mesh_shape: Sequence[int]):
    """A copy of ``config`` whose mesh is ``mesh_shape`` (data, fsdp, tensor)."""
    trial = config.copy_and_resolve_references()
    trial.mesh.data, trial.mesh.fsdp, trial.mesh.tensor = (int(s) for s in mesh_shape)
    return trial


def mesh_problems(config, mesh_shape: Sequence[int]) -> list[str]:
    """Why ``config`` cannot run on a (data, fsdp, tensor) mesh (empty if it can): the trainer's own
    checks (``run_config.problems``) with the config's mesh set to ``mesh_shape``."""
    return run_config.problems(_on_mesh(config, mesh_shape), math.prod(int(s) for s in mesh_shape))


def mesh_shapes(n_devices: int) -> list[tuple[int, int, int]]:
    """Every (data, fsdp, tensor) whose product is ``n_devices``."""
    if n_devices < 1:
        raise ValueError(f"--devices={n_devices}: must be positive")
    out = []
    for data in range(1, n_devices + 1):
        if n_devices % data:
            continue
        rest = n_devices // data
        for fsdp in range(1, rest + 1):
            if rest % fsdp == 0:
                out.append((data, fsdp, rest // fsdp))
    return out


def plan(
    config, devices: int, device_memory_gb: float, *, margin: float = DEFAULT_MARGIN, platform: str = "gpu"
) -> dict[str, Any]:
    """The estimate on the configured mesh for ``devices`` devices of ``device_memory_gb`` GiB each.

    Raises ValueError (naming the key and value) when the config cannot run on that many devices:
    a mesh that does not multiply to ``devices``, heads not divisible by ``tensor``, a batch not
    divisible by data x fsdp. Returns a dict: ``devices``, ``device_memory_bytes``, ``mesh`` (the
    configured one), ``estimate`` (``estimate(...)``), ``fits``, ``rows_per_device``,
    ``micro_batches``, ``max_micro_batch_size`` (the largest micro-batch that fits on the configured
    mesh, 0 if none), ``attention`` (``attention_path``: ``platform`` resolves ``attn_impl="auto"``),
    ``meshes``: every valid mesh of ``devices`` with its ``estimate``, ``total``, ``fits`` and
    ``configured``, smallest total first, and ``remedies``: when no micro-batch fits, what would
    (``remedies``), else empty.
    """
    if device_memory_gb <= 0:
        raise ValueError(f"--device_memory_gb={device_memory_gb}: must be positive")
    shape = run_config.mesh_shape(config, devices)
    run_config.check(config, devices)
    limit = int(device_memory_gb * GiB)
    est = estimate(config, shape, margin=margin, platform=platform)
    rows, steps = _rows_per_device(config, shape)
    meshes = []
    for candidate in mesh_shapes(devices):
        if mesh_problems(config, candidate):
            continue
        e = est if candidate == shape else estimate(config, candidate, margin=margin, platform=platform)
        meshes.append({"mesh": candidate, "estimate": e, "total": e["total"], "fits": e["total"] <= limit})
        meshes[-1]["configured"] = candidate == shape
    meshes.sort(key=lambda m: (m["total"], m["mesh"]))
    best, _ = _largest_micro_batch(config, shape, limit, margin, platform)
    return {
        "devices": devices,
        "device_memory_bytes": limit,
        "mesh": shape,
        "estimate": est,
        "fits": est["total"] <= limit,
        "rows_per_device": rows,
        "micro_batches": steps,
        "max_micro_batch_size": best,
        "attention": attention_path(run_config.model_config(config), platform),
        "meshes": meshes,
        "remedies": [] if best else remedies(config, devices, limit, margin=margin, platform=platform),
    }


def _largest_micro_batch(config, shape, limit: int, margin: float, platform: str) -> tuple[int, int]:
    """(the largest train.micro_batch_size that divides the global batch, splits over data x fsdp
    and fits in ``limit`` bytes, its total); (0, 0) when none does."""
    t = config.train
    ways = shape[0] * shape[1]
    best = (0, 0)
    for micro in range(ways, t.global_batch_size + 1, ways):
        if t.global_batch_size % micro:
            continue
        trial = config.copy_and_resolve_references()
        trial.train.micro_batch_size = micro
        # Not monotonic: accumulating (micro < global) holds a second set of gradients.
        total = estimate(trial, shape, margin=margin, platform=platform)["total"]
        if total <= limit:
            best = (micro, total)
    return best


def _growing_axis(config) -> str:
    """The mesh axis that more devices would go to: the config's -1 axis, else fsdp (which shards
    params, gradients and optimizer state)."""
    for axis in sharding.AXES:
        if int(config.mesh[axis]) == -1:
            return axis
    return "fsdp"


def _more_devices(config, shape, limit: int, margin: float, platform: str) -> dict[str, Any] | None:
    """The fewest devices on which a micro-batch fits, growing one mesh axis (``_growing_axis``)
    from ``shape``; None if no size that the batch (or, for tensor, the heads) allows makes one fit."""
    axis = _growing_axis(config)
    i = sharding.AXES.index(axis)
    others = math.prod(s for j, s in enumerate(shape) if j != i)
    if axis == "tensor":
        cfg = run_config.model_config(config)
        bound = math.gcd(cfg.n_heads, cfg.ffn_dim)
    else:  # data and fsdp split the batch: a size must divide it over the other batch axis
        bound = config.train.global_batch_size // (shape[1 - i] if i < 2 else 1)
    for size in range(shape[i] + 1, bound + 1):
        if bound % size:
            continue
        candidate = tuple(size if j == i else s for j, s in enumerate(shape))
        if mesh_problems(config, candidate):
            continue
        micro, total = _largest_micro_batch(config, candidate, limit, margin, platform)
        if micro:
            n = others * size
            change = f"--devices={n}" + ("" if int(config.mesh[axis]) == -1 else f" --config.mesh.{axis}={size}")
            return {"change": change, "devices": n, "mesh": candidate, "micro_batch_size": micro, "total": total}
    return None


def _cheaper_settings(config) -> list[dict[str, str]]:
    """Settings that shrink memory without changing the model's shape, each one that the config
    does not use yet, as {"section.key": value}: bfloat16 params, bfloat16 compute, full remat;
    bfloat16 gradients when accumulating (no float32 gradient set to hold twice, ``steps.train_step``);
    a bfloat16 first moment (``optim.make_optimizer``'s mu_dtype)."""
    cfg = run_config.model_config(config)
    changes = []
    if cfg.param_dtype != "bfloat16":
        changes.append({"model.param_dtype": "bfloat16"})
    if cfg.dtype != "bfloat16":
        changes.append({"model.dtype": "bfloat16"})
    if cfg.remat_policy != "full":
        changes.append({"model.remat_policy": "full"})
    if str(_grad_dtype(config)) != "bfloat16" and cfg.param_dtype != "bfloat16":
        changes.append({"train.grad_dtype": "bfloat16"})
    if config.optimizer.get("mu_dtype", "float32") != "bfloat16":
        changes.append({"optimizer.mu_dtype": "bfloat16"})
    return changes


def _with_settings(config, change: dict[str, str]):
    trial = config.copy_and_resolve_references()
    for path, value in change.items():
        section, key = path.split(".")
        trial[section][key] = value
    return trial


def remedies(config, devices: int, limit: int, *, margin: float = DEFAULT_MARGIN, platform: str = "gpu") -> list[dict]:
    """What would let a micro-batch fit in ``limit`` bytes per device, each found by the estimate:

    another mesh of the same ``devices`` (the one that fits the largest micro-batch), the fewest
    devices that would do (``_more_devices``), and cheaper settings (``_cheaper_settings``) on the
    configured mesh, each alone, or all together when none alone is enough. Each is a dict: ``change`` (command-line flags), ``micro_batch_size`` (the
    largest that fits), ``total`` (its bytes per device), and ``mesh`` / ``devices`` where they change."""
    shape = run_config.mesh_shape(config, devices)
    out = []
    meshes = []
    for candidate in mesh_shapes(devices):
        if candidate == shape or mesh_problems(config, candidate):
            continue
        micro, total = _largest_micro_batch(config, candidate, limit, margin, platform)
        if micro:
            meshes.append((-micro, total, candidate))
    if meshes:
        neg_micro, total, mesh = min(meshes)
        change = " ".join(f"--config.mesh.{a}={s}" for a, s in zip(sharding.AXES, mesh, strict=True))
        out.append({"change": change, "mesh": mesh, "micro_batch_size": -neg_micro, "total": total})
    more = _more_devices(config, shape, limit, margin, platform)
    if more:
        out.append(more)
    changes = _cheaper_settings(config)
    found = []
    for change in changes:
        found.append((change, _largest_micro_batch(_with_settings(config, change), shape, limit, margin, platform)))
    if len(changes) > 1 and not any(micro for _, (micro, _) in found):
        together = {k: v for change in changes for k, v in change.items()}
        found.append((together, _largest_micro_batch(_with_settings(config, together), shape, limit, margin, platform)))
    for change, (micro, total) in found:
        if micro:
            flags = " ".join(f"--config.{k}={v}" for k, v in change.items())
            out.append({"change": flags, "micro_batch_size": micro, "total": total})
    return out


# ------------------------------------------------------------------------------------------------
# Checking against XLA: compile the real train step on abstract inputs.

# XLA options for compiling a GPU run's step on CPU devices (see compile_report).
CPU_AS_GPU_OPTIONS = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}


def compile_report(
    config, mesh_shape: Sequence[int], devices=None, *, rules=None, platform: str | None = None
) -> dict[str, Any]:
    """Lower and compile ``steps.train_step`` for ``config`` on a mesh of real (or forced CPU) devices.

    Nothing is allocated: the state is ``jax.eval_shape(init_state)`` and every input a
    ``jax.ShapeDtypeStruct`` carrying its sharding; the state is donated, as in train.py. Returns
    XLA's per-device ``memory_analysis()`` sizes (``argument``, ``output``, ``alias``, ``temp``,
    ``generated_code`` in bytes), ``lower_s`` and ``compile_s`` (seconds), ``host_peak_rss``
    (bytes, this process's peak so far), ``platform`` and ``attention`` (``attention_path`` of the
    compiled step).

    ``platform``: the devices the run is for, when they are not the ones compiling. A ``gpu`` run
    compiled on CPU devices is compiled as the GPU would run it, as far as XLA:CPU allows: where
    the config's attention on the GPU is the flash kernel (``attn_impl="auto"``) the step is
    compiled with ``attn_impl="pallas"`` (interpret mode: nothing [T, T] materialised), and with
    XLA's while-loop-invariant code motion off: XLA:CPU has no bfloat16 arithmetic, and that pass
    hoists float32 copies of bfloat16 loop operands (the saved activations, a bfloat16 copy of the
    params) out of the layer loops, memory a GPU never holds (docs/sharding.md). ``options`` in the
    result lists the compiler options used.
    """
    from mpt_jax import steps  # the pure step; imported here so plain planning stays light

    shape = tuple(int(s) for s in mesh_shape)
    n = math.prod(shape)
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) < n:
        raise ValueError(
            f"compile_report: mesh {shape} needs {n} devices, only {len(devices)} here "
            f"(on a CPU: XLA_FLAGS=--xla_force_host_platform_device_count={n})"
        )
    cfg = run_config.model_config(config)
    here = devices[0].platform
    options = steps.train_compiler_options(cfg, here) or {}
    if platform == "gpu" and here == "cpu":
        options = dict(CPU_AS_GPU_OPTIONS)
        if attention_path(cfg, platform) == "flash" and attention_path(cfg, here) != "flash":
            cfg = dataclasses.replace(cfg, attn_impl="pallas")
    rules = sharding.rules_from_config(config) if rules is None else rules
    t = config.train
    optimizer = optim.make_optimizer(config.optimizer, config.schedule, max_steps=t.max_steps)
    schedule = optim.make_schedule(config.schedule, lr=config.optimizer.lr, max_steps=t.max_steps)
    mesh = sharding.make_mesh(shape, devices=devices[:n])
    state_sh = sharding.state_shardings(cfg, optimizer, mesh, rules)
    batch_sh = sharding.batch_sharding(mesh)
    abstract = jax.eval_shape(functools.partial(steps.init_state, cfg, optimizer), jax.random.key(0))
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, state_sh)
    length = run_config.seq_len(config)
    batch = {
        k: jax.ShapeDtypeStruct((t.global_batch_size, length), jnp.int32, sharding=batch_sh)
        for k in ("tokens", "segment_ids", "positions", "loss_mask")
    }
    micro = t.micro_batch_size or t.global_batch_size
    step = functools.partial(
        steps.train_step,
        cfg=cfg,
        optimizer=optimizer,
        schedule=schedule,
        micro_batches=t.global_batch_size // micro,
        grad_dtype=str(_grad_dtype(config)),
    )
    replicated = NamedSharding(mesh, PartitionSpec())
    fn = jax.jit(step, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, replicated), donate_argnums=(0,))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        start = time.perf_counter()
        lowered = fn.lower(abstract, batch)
        lower_s = time.perf_counter() - start
        start = time.perf_counter()
        compiled = lowered.compile(compiler_options=options or None)
        compile_s = time.perf_counter() - start
    mem = compiled.memory_analysis()
    out = {
        "platform": here,
        "attention": attention_path(cfg, here),
        "options": options,
        "mesh": shape,
        "lower_s": lower_s,
        "compile_s": compile_s,
        "host_peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    for key in ("argument", "output", "alias", "temp", "generated_code"):
        out[key] = int(getattr(mem, f"{key}_size_in_bytes", 0) or 0) if mem is not None else None
    return out


# ------------------------------------------------------------------------------------------------
# Inference: the weights and the KV cache.

WEIGHT_DTYPES = ("float32", "bfloat16", "float16", "int8")


@functools.lru_cache(maxsize=8)
def _inference_params(cfg: MPTConfig, weight_dtype: str):
    """The boxed abstract params a model loaded for inference holds (see ``inference_memory``)."""
    from mpt_jax.quantize import quantized_param_shapes

    if weight_dtype == "int8":
        return quantized_param_shapes(cfg, dtype=cfg.dtype)
    return jax.tree.map(
        lambda box: box.replace(value=jax.ShapeDtypeStruct(box.value.shape, jnp.dtype(weight_dtype))),
        param_shapes(cfg),
        is_leaf=lambda x: isinstance(x, nn.Partitioned),
    )


def inference_memory(
    cfg: MPTConfig,
    *,
    batch: int = 1,
    cache_len: int | None = None,
    weight_dtype: str = "bfloat16",
    cache_dtype: str | None = None,
    mesh_shape: Sequence[int] = (1, 1, 1),
    rules=sharding.DEFAULT_RULES,
) -> dict[str, int]:
    """Bytes per device that serving ``cfg`` holds: its params and a KV cache of ``batch`` rows of
    ``cache_len`` positions (default ``cfg.max_seq_len``), 2 x layers x batch x cache_len x kv_heads
    x head_dim elements.

    ``weight_dtype``: ``float32``, ``bfloat16`` or ``float16`` (every param in it), or ``int8``
    (``quantize.quantize_params``: int8 weights with float32 scales, norms and biases in
    ``cfg.dtype``). ``cache_dtype`` defaults to the compute dtype, as ``mpt_jax.load`` and the
    generation engine set it: ``weight_dtype``, or ``cfg.dtype`` for int8. Each leaf is divided by
    the mesh axes its sharding splits it over (``sharding.shardings_of_params`` and
    ``sharding.cache_shardings`` on an abstract mesh of ``mesh_shape``).

    Returns ``params`` (scales included), ``scales``, ``cache`` and ``total``. The temporaries of a
    forward pass (a prefill's activations and logits) are not counted.
    """
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype={weight_dtype!r}: expected one of {WEIGHT_DTYPES}")
    cache_len = cfg.max_seq_len if cache_len is None else int(cache_len)
    if batch < 1 or cache_len < 1:
        raise ValueError(f"batch={batch}, cache_len={cache_len}: both must be positive")
    compute = cfg.dtype if weight_dtype == "int8" else weight_dtype
    cache_dtype = cache_dtype or compute
    mesh = _abstract_mesh(mesh_shape)
    boxed = _inference_params(cfg, weight_dtype)
    params = nn.meta.unbox(boxed)
    shardings = sharding.shardings_of_params(boxed, mesh, rules)
    per_leaf = jax.tree.map(
        lambda x, s: math.prod(s.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize, params, shardings
    )
    sizes = flat_params(per_leaf)
    params_bytes = int(sum(n for _, n in sizes))
    scales = int(sum(n for path, n in sizes if path[-1].endswith(SCALE_SUFFIX)))
    shape = (cfg.n_layers, batch, cache_len, cfg.num_kv_heads, cfg.head_dim)
    cache_sh = sharding.cache_shardings(cfg, batch, cache_len, mesh, rules)
    cache = 2 * math.prod(cache_sh["k"].shard_shape(shape)) * jnp.dtype(cache_dtype).itemsize
    return {"params": params_bytes, "scales": scales, "cache": cache, "total": params_bytes + cache}


def format_inference(
    cfg: MPTConfig,
    *,
    batch: int,
    cache_len: int,
    cache_dtype: str | None,
    mesh_shape: Sequence[int],
    device_memory_gb: float,
    name: str = "",
    rules=sharding.DEFAULT_RULES,
) -> str:
    """The CLI's inference table: per device, params, scales, KV cache and total for each weight dtype."""
    n_params = sum(int(x.size) for x in jax.tree.leaves(nn.meta.unbox(param_shapes(cfg))))
    size = f"{n_params / 1e9:.2f}B" if n_params >= 1e9 else f"{n_params / 1e6:.1f}M"
    limit = device_memory_gb * GiB
    head = f"{'weights':<24s} {'params':>8s} {'scales':>8s} {'KV cache':>9s} {'(dtype)':>10s} {'total':>8s}  fits in {device_memory_gb:g} GiB"
    lines = [
        f"inference memory{' for ' + name if name else ''}: {size} params (d_model {cfg.d_model}, {cfg.n_layers} "
        f"layers, {cfg.n_heads} heads, {cfg.num_kv_heads} kv heads of {cfg.head_dim})",
        f"  KV cache of {batch} row{'s' if batch != 1 else ''} x {cache_len} positions; mesh (data, fsdp, tensor) = "
        f"{tuple(int(s) for s in mesh_shape)}; GiB per device",
        "",
        "  " + head,
    ]
    for weight_dtype in ("float32", "bfloat16", "int8"):
        m = inference_memory(
            cfg,
            batch=batch,
            cache_len=cache_len,
            weight_dtype=weight_dtype,
            cache_dtype=cache_dtype,
            mesh_shape=mesh_shape,
            rules=rules,
        )
        label = "int8 + float32 scales" if weight_dtype == "int8" else weight_dtype
        dtype = cache_dtype or (cfg.dtype if weight_dtype == "int8" else weight_dtype)
        scales = _gib(m["scales"]) if weight_dtype == "int8" else "-"
        verdict = f"{'yes' if m['total'] <= limit else 'no'} ({m['total'] / limit:.0%})"
        lines.append(
            f"  {label:<24s} {_gib(m['params']):>8s} {scales:>8s} {_gib(m['cache']):>9s} {dtype:>10s} "
            f"{_gib(m['total']):>8s}  {verdict}"
        )
    lines.append(
        f"  (KV cache: 2 x {cfg.n_layers} layers x {batch} x {cache_len} x {cfg.num_kv_heads} kv heads x "
        f"{cfg.head_dim}; a forward pass's temporaries come on top)"
    )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# The CLI.


def _gib(n: int | float) -> str:
    return f"{n / GiB:,.2f}"


def _moments(config) -> str:
    """What the optimizer keeps per parameter, in words: "2 float32 moments", "mu bfloat16, nu float32"."""
    opt = config.optimizer
    mu = opt.get("mu_dtype", "float32")
    if opt.name == "decoupled_lionw":
        return f"1 {mu} moment"
    return "2 float32 moments" if mu == "float32" else f"mu {mu}, nu float32"


def format_plan(report: dict[str, Any], config, *, name: str = "") -> str:
    """The CLI's report: the estimate on the configured mesh, the verdict, the table of meshes."""
    cfg = run_config.model_config(config)
    est, shape = report["estimate"], report["mesh"]
    t = config.train
    length = run_config.seq_len(config)
    micro = t.micro_batch_size or t.global_batch_size
    n_params = sum(int(x.size) for x in jax.tree.leaves(_model_of(config).params))
    size = f"{n_params / 1e9:.2f}B" if n_params >= 1e9 else f"{n_params / 1e6:.1f}M"
    limit = report["device_memory_bytes"]
    grad_dtype = str(_grad_dtype(config))
    held = (["sum", "one micro-batch"] if report["micro_batches"] > 1 else []) + (
        ["params' copy"] if grad_dtype != "float32" and grad_dtype != cfg.param_dtype else []
    )
    rows = [
        ("params", f"params ({cfg.param_dtype})"),
        ("opt_state", f"optimizer state ({_moments(config)})"),
        ("grads", f"gradients ({', '.join([grad_dtype, ' + '.join(held)] if held else [grad_dtype])})"),
        ("activations", f"activations (remat {cfg.remat_policy})"),
        ("act_saved", f"  saved for the backward, {cfg.n_layers} layers"),
        ("act_layer", "  one layer's backward (peak of the layers)"),
        ("act_head", "  final norm, logits and loss (peak of the head)"),
        ("margin", f"XLA temporaries (margin {est['margin'] / max(1, est['grads'] + est['activations']):.0%})"),
        ("total", "total"),
    ]
    width = max(48, *(len(label) for _, label in rows))
    lines = [
        f"plan{' for ' + name if name else ''}: {size} params (d_model {cfg.d_model}, "
        f"{cfg.n_layers} layers, {cfg.n_heads} heads), compute {cfg.dtype}, attention {cfg.attn_impl} "
        f"({report['attention']})",
        f"  {report['devices']} devices x {limit / GiB:g} GiB; mesh (data, fsdp, tensor) = {shape}",
        f"  batch {t.global_batch_size} x {length} tokens; micro-batch {micro} rows = {report['rows_per_device']} per "
        f"device, {report['micro_batches']} accumulation step{'s' if report['micro_batches'] != 1 else ''}",
        "",
        f"  {'per device':<{width}s} {'GiB':>9s}",
    ]
    for key, label in rows:
        lines.append(f"  {label:<{width}s} {_gib(est[key]):>9s}")
    verdict = "fits" if report["fits"] else "does not fit"
    lines += ["", f"=> {verdict} in {limit / GiB:g} GiB per device ({est['total'] / limit:.0%} of it)"]
    best = report["max_micro_batch_size"]
    if best:
        lines.append(f"   largest train.micro_batch_size that fits on this mesh: {best}")
    else:
        lines.append("   no train.micro_batch_size fits on this mesh; what would (each computed as above):")
        for r in report["remedies"]:
            where = f" (mesh {r['mesh']})" if "mesh" in r else ""
            lines.append(
                f"     {r['change']}{where}: micro-batch {r['micro_batch_size']} fits, {_gib(r['total'])} GiB per device"
            )
        if not report["remedies"]:
            lines.append("     nothing this planner tries: more devices, another mesh, bfloat16, full remat")
    n_fit = sum(m["fits"] for m in report["meshes"])
    lines += [
        "",
        f"meshes of {report['devices']} devices that this config allows (n_heads % tensor == 0, batch and micro-batch "
        f"% (data x fsdp) == 0): {n_fit} of {len(report['meshes'])} fit",
        f"    {'data':>5s} {'fsdp':>5s} {'tensor':>6s} {'params':>9s} {'opt':>9s} {'grads':>9s} {'activ':>9s} "
        f"{'total':>9s}  fits",
    ]
    for m in report["meshes"]:
        e = m["estimate"]
        mark = "*" if m["configured"] else " "
        cells = " ".join(f"{_gib(e[k]):>9s}" for k in ("params", "opt_state", "grads", "activations", "total"))
        lines.append(
            f"  {mark} {m['mesh'][0]:>5d} {m['mesh'][1]:>5d} {m['mesh'][2]:>6d} {cells}  {'yes' if m['fits'] else 'no'}"
        )
    lines.append("  (* the configured mesh; GiB per device, smallest total first)")
    return "\n".join(lines)


def format_compile(xla: dict[str, Any], est: dict[str, int]) -> str:
    """XLA's memory analysis next to the estimate (temporaries without the planner's margin)."""
    args = est["params"] + est["opt_state"] + est["batch"]
    temp = est["grads"] + est["activations"]

    def row(label, a, b):
        return f"  {label:<48s} {_gib(a):>9s} {_gib(b):>9s} {a / max(1, b):>7.3f}"

    attention = xla.get("attention", "")
    options = xla.get("options") or {}
    return "\n".join(
        [
            f"XLA on {xla['platform']}, mesh {xla['mesh']}, attention {attention}: lowered in {xla['lower_s']:.1f} s, "
            f"compiled in {xla['compile_s']:.1f} s, host peak RSS {xla['host_peak_rss'] / GiB:.2f} GiB",
            f"  {'per device, GiB':<48s} {'XLA':>9s} {'planner':>9s} {'ratio':>7s}",
            row("arguments = params + optimizer state + batch", xla["argument"], args),
            row("temporaries = gradients + activations", xla["temp"], temp),
            row("peak = arguments + temporaries (planner: total)", xla["argument"] + xla["temp"], est["total"]),
            f"  (outputs {_gib(xla['output'])} GiB, {_gib(xla['alias'])} GiB of them aliased to the donated state)",
        ]
        + (
            [f"  (a GPU run compiled on {xla['platform']}: " + ", ".join(f"{k}={v}" for k, v in options.items()) + ")"]
            if options
            else []
        )
    )


def _use_cpu_devices(n: int) -> None:
    """Ask for ``n`` CPU devices (for --compile on a host with fewer accelerators); must run before
    the CPU backend starts, and is skipped when XLA_FLAGS already forces a count."""
    import os

    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError as e:  # the backend already started: use what there is
        logging.warning("could not ask for %d CPU devices: %s", n, e)


def main(argv) -> None:
    """Prints the plan (and XLA's numbers with --compile); errors end in one line (cli.run)."""
    del argv
    from absl import flags
    from ml_collections import config_flags

    f = flags.FLAGS
    config = cli.config_from_flags("config")
    name = config_flags.get_config_filename(f["config"])
    if f.inference:
        cfg = run_config.model_config(config)
        print(
            format_inference(
                cfg,
                batch=f.batch,
                cache_len=f.cache_len or cfg.max_seq_len,
                cache_dtype=f.cache_dtype or None,
                mesh_shape=run_config.mesh_shape(config, f.devices),
                device_memory_gb=f.device_memory_gb,
                name=name,
                rules=sharding.rules_from_config(config),
            )
        )
        return
    if f["compile"].value:
        _use_cpu_devices(f.devices)  # before anything starts a backend
    report = plan(config, f.devices, f.device_memory_gb, margin=f.margin, platform=f.platform)
    print(format_plan(report, config, name=name))
    if f["compile"].value:
        devices = jax.devices()
        if len(devices) < f.devices:
            devices = jax.devices("cpu")
        xla = compile_report(config, report["mesh"], devices, platform=f.platform)
        # Compare with the estimate of the attention that compiled (attn_impl="auto" off the GPU).
        cfg = run_config.model_config(config)
        same = xla["attention"] == attention_path(cfg, f.platform)
        est = estimate(config, report["mesh"], margin=f.margin, platform=f.platform if same else xla["platform"])
        print()
        print(format_compile(xla, est))


def _define_flags() -> None:
    """Flags are defined only when run as a program (train.py and summary.py define --config too)."""
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "a config file, e.g. configs/30b.py", lock_config=True)
    flags.DEFINE_integer("devices", 8, "number of accelerator devices (chips) of the run")
    flags.DEFINE_float(
        "device_memory_gb", 80.0, "memory per device in GiB that JAX may use (see docs/sharding.md, Memory planner)"
    )
    flags.DEFINE_float("margin", DEFAULT_MARGIN, "margin for XLA temporaries, a fraction of gradients + activations")
    flags.DEFINE_enum(
        "platform",
        "gpu",
        ["gpu", "tpu", "cpu"],
        "the devices of the run (resolves attn_impl=auto; --compile on CPU devices compiles a gpu run as the GPU runs it)",
    )
    flags.DEFINE_bool(
        "compile",
        False,
        "also compile the train step on abstract inputs and print XLA's memory analysis next to the estimate "
        "(on forced CPU devices when this host has fewer than --devices)",
    )
    flags.DEFINE_bool(
        "inference",
        False,
        "instead of training, print the memory of serving the model: params in float32, bfloat16 and int8, "
        "plus the KV cache, per device of the config's mesh on --devices",
    )
    flags.DEFINE_integer("cache_len", 0, "--inference: positions of the KV cache (0: the model's max_seq_len)")
    flags.DEFINE_integer("batch", 1, "--inference: rows of the KV cache (sequences decoded at once)")
    flags.DEFINE_enum(
        "cache_dtype",
        "",
        ["", "float32", "bfloat16", "float16"],
        "--inference: the cache's dtype (default: compute dtype)",
    )


if __name__ == "__main__":
    cli.run("plan", _define_flags, main)
