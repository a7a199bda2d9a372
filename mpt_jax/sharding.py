"""One device mesh (data, fsdp, tensor) and the logical-axis rules that place every array on it.

Parameters carry logical axis names (model.py); rules map them to mesh axes, MaxText style:

    batch -> (data, fsdp)      embed -> fsdp      heads, kv_heads, mlp, vocab -> tensor

so `data` replicates the model, `fsdp` shards parameters, gradients and optimizer state (ZeRO-3,
like llm-foundry's FULL_SHARD) and `tensor` splits heads and the MLP (Megatron). A dimension that
its mesh axis does not divide is replicated instead (e.g. 8 kv heads on a tensor axis of 16, or
MQA's single kv head): the kv projections are then computed redundantly on each tensor shard,
which is what GQA with fewer kv heads than tensor shards costs in any framework.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mpt_jax.config import MPTConfig
from mpt_jax.model import param_shapes, unstack_layers

AXES = ("data", "fsdp", "tensor")

DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_mlp", "tensor"),
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("qkv", None),
    ("mlp", "tensor"),
    ("length", None),
    ("cache_batch", ("data", "fsdp")),
    ("cache_length", None),
)


def rules_from_config(config) -> tuple[tuple[str, Any], ...]:
    """``config.mesh.rules`` (a list of [logical, mesh axis or list or None]) or the defaults."""
    rules = config.mesh.get("rules") if hasattr(config, "mesh") else None
    if not rules:
        return DEFAULT_RULES
    out = []
    for i, rule in enumerate(rules):
        if len(rule) != 2:
            raise ValueError(f"config.mesh.rules[{i}]={rule!r}: expected [logical_name, mesh_axis]")
        name, target = rule
        targets = target if isinstance(target, list | tuple) else [target]
        for t in targets:
            if t is not None and t not in AXES:
                raise ValueError(f"config.mesh.rules[{i}]: unknown mesh axis {t!r}; mesh axes are {AXES}")
        out.append((name, tuple(target) if isinstance(target, list | tuple) else target))
    return tuple(out)


def make_mesh(shape: Sequence[int], dcn_shape: Sequence[int] = (1, 1, 1), devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh over ``devices`` (default: all). ``dcn_shape`` splits each axis
    across slices/hosts joined by the slower data-center network (hybrid mesh, TPU multislice)."""
    devices = jax.devices() if devices is None else devices
    if any(d > 1 for d in dcn_shape):
        from jax.experimental import mesh_utils

        ici = tuple(s // d for s, d in zip(shape, dcn_shape, strict=True))
        array = mesh_utils.create_hybrid_device_mesh(ici, tuple(dcn_shape), devices=devices)
    else:
        try:
            from jax.experimental import mesh_utils

            array = mesh_utils.create_device_mesh(tuple(shape), devices=devices)
        except Exception:  # noqa: BLE001 - CPU and odd topologies: plain order is fine
            array = np.asarray(devices).reshape(tuple(shape))
    return Mesh(array, AXES)


def spec_for(shape: tuple[int, ...], names: tuple[str | None, ...], mesh, rules) -> PartitionSpec:
    """Logical names -> PartitionSpec; a mesh axis that does not divide its dimension, or is
    already used by an earlier dimension, leaves that dimension replicated. ``mesh`` may be a
    ``jax.sharding.AbstractMesh`` (only axis sizes are read)."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for size, name in zip(shape, names, strict=True):
        target = table.get(name) if name is not None else None
        axes = [target] if isinstance(target, str) else list(target or [])
        axes = [a for a in axes if a not in used]
        product = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
        if not axes or product == 1 or size % product:
            spec.append(None)
            continue
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else tuple(axes))
    return PartitionSpec(*spec)


def shardings_of_params(boxed_params: Any, mesh, rules=DEFAULT_RULES):
    """NamedShardings for abstract params whose leaves carry logical names (``nn.Partitioned``, as
    ``model.param_shapes`` returns them); unnamed leaves are replicated. Nothing is traced, so a
    caller that keeps ``param_shapes(cfg)`` can place it on many meshes cheaply (the planner)."""

    def one(leaf):
        if isinstance(leaf, nn.Partitioned):
            return NamedSharding(mesh, spec_for(leaf.value.shape, leaf.names, mesh, rules))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, boxed_params, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def shardings_of_state(
    boxed_params: Any, opt_state: Any, optimizer: optax.GradientTransformation, mesh, rules=DEFAULT_RULES
):
    """Shardings of the train state from its abstract parts: ``boxed_params`` as for
    ``shardings_of_params`` and ``opt_state`` = ``jax.eval_shape(optimizer.init, unboxed params)``.
    Optimizer moments follow their params; the step, rng and other optimizer leaves are replicated."""
    params = shardings_of_params(boxed_params, mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    opt = optax.tree_map_params(
        optimizer,
        lambda _, sharding: sharding,
        opt_state,
        params,
        transform_non_params=lambda _: replicated,
    )
    return {"step": replicated, "params": params, "opt_state": opt, "rng": replicated}


def param_shardings(cfg: MPTConfig, mesh: Mesh, rules=DEFAULT_RULES):
    """NamedShardings for the (unboxed) params tree of ``cfg``."""
    return shardings_of_params(param_shapes(cfg), mesh, rules)


def quantized_param_shardings(cfg: MPTConfig, mesh: Mesh, rules=DEFAULT_RULES, *, include_embedding: bool = True):
    """NamedShardings for the int8 params of ``cfg`` (``quantize.quantize_params``): each int8
    weight placed as its float weight, each scale as the output axes of its weight."""
    from mpt_jax.quantize import quantized_param_shapes

    return shardings_of_params(quantized_param_shapes(cfg, include_embedding=include_embedding), mesh, rules)


def state_shardings(cfg: MPTConfig, optimizer: optax.GradientTransformation, mesh: Mesh, rules=DEFAULT_RULES):
    """Shardings of the train state of ``cfg`` with ``optimizer`` (traces the model's shapes once)."""
    boxed = param_shapes(cfg)
    opt_state = jax.eval_shape(optimizer.init, nn.meta.unbox(boxed))
    return shardings_of_state(boxed, opt_state, optimizer, mesh, rules)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows of a batch split over data x fsdp; the sequence stays whole."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def cache_shardings(
    cfg: MPTConfig, batch: int, length: int, mesh: Mesh, rules=DEFAULT_RULES, *, scan_layers: bool = True
) -> dict | list[dict]:
    """NamedShardings of a KV cache (``model.init_cache``, stacked or per layer): rows like a
    batch, kv heads like the k/v projections (``model.CACHE_AXES``)."""
    from mpt_jax.model import CACHE_AXES

    shape = (cfg.n_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
    sharding = NamedSharding(mesh, spec_for(shape, CACHE_AXES, mesh, rules))
    if not scan_layers:
        return [{"k": layer_sharding(sharding), "v": layer_sharding(sharding)}] * cfg.n_layers
    return {"k": sharding, "v": sharding}


def layer_sharding(stacked: NamedSharding) -> NamedSharding:
    """The sharding of one layer of an array stacked over layers (its leading axis dropped)."""
    return NamedSharding(stacked.mesh, PartitionSpec(*tuple(stacked.spec)[1:]))


def unstack_shardings(shardings: dict, n_layers: int) -> dict:
    """A params shardings tree (``param_shardings``, ``quantized_param_shardings``) for the
    per-layer layout (``model.unstack_layers``)."""
    return unstack_layers(shardings, n_layers, take=lambda s, i: layer_sharding(s))
