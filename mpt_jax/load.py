"""``mpt_jax.load``: any MPT checkpoint -> ``(cfg, params, tokenizer)``, ready to run.

    cfg, params, tok = mpt_jax.load("mosaicml/mpt-7b-instruct", dtype="bfloat16")
    cfg, params, tok = mpt_jax.load("workdirs/tiny_chat")             # a training run's newest checkpoint
    cfg, params, tok = mpt_jax.load("ckpt/mpt-30b", mesh=mesh)        # sharded over (data, fsdp, tensor)

The source is what ``checkpoint.resolve_source`` says it is: a training workdir (its newest
checkpoint, or ``step``), an mpt-jax model checkpoint (``convert hf_to_jax``), or an HF folder or
hub id. Every argument is checked, and the config read, before any weight is: a bad
``max_seq_len`` costs nothing. The tokenizer is the one the checkpoint carries
(``checkpoint.find_tokenizer``); None, with a warning saying why, when it has none.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import logging

from mpt_jax.config import DTYPES, MPTConfig

QUANTIZE = ("int8",)


def _check_args(dtype: str | None, quantize: str | None, max_seq_len: int | None, step: int | None) -> None:
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"load: dtype={dtype!r}; expected one of {DTYPES} or None (as stored)")
    if quantize is not None and quantize not in QUANTIZE:
        raise ValueError(f"load: quantize={quantize!r}; expected one of {QUANTIZE} or None")
    for name, value in (("max_seq_len", max_seq_len), ("step", step)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1):
            raise ValueError(f"load: {name}={value!r}; expected a positive integer or None")


def with_max_seq_len(cfg: MPTConfig, max_seq_len: int | None) -> MPTConfig:
    """``cfg`` with another context length for inference. ALiBi and RoPE compute positions on the
    fly, so they run past the length they were trained at (StoryWriter-style extrapolation); a
    learned position table has exactly ``max_seq_len`` rows, and dynamic-NTK RoPE scales itself
    from ``max_seq_len`` on, so moving it would change the model: both are refused."""
    if max_seq_len is None or max_seq_len == cfg.max_seq_len:
        return cfg
    if cfg.uses_learned_pos_emb:
        if max_seq_len > cfg.max_seq_len:
            raise ValueError(
                f"learned position embeddings cannot run past max_seq_len={cfg.max_seq_len} (asked for {max_seq_len})"
            )
        raise ValueError(
            f"learned position embeddings have max_seq_len={cfg.max_seq_len} rows; max_seq_len={max_seq_len} would "
            "not fit the table (prompts shorter than it need no override)"
        )
    if cfg.rope and cfg.rope_impl == "hf" and cfg.rope_hf_type == "dynamic":
        raise ValueError(
            f"max_seq_len={max_seq_len}: dynamic-NTK RoPE already runs past max_seq_len={cfg.max_seq_len} by "
            "raising its base from that length on; moving max_seq_len would change what the model computes"
        )
    return dataclasses.replace(cfg, max_seq_len=int(max_seq_len)).validate()


def _stored_dtype(params: Any) -> str | None:
    """The one floating dtype of every param, or None when they differ."""
    import jax

    names = {np.dtype(leaf.dtype).name for leaf in jax.tree.leaves(params)}
    return names.pop() if len(names) == 1 and next(iter(names)) in DTYPES else None


def load(
    path_or_hub_id: str | os.PathLike,
    *,
    dtype: str | None = None,
    quantize: str | None = None,
    mesh: Any = None,
    max_seq_len: int | None = None,
    step: int | None = None,
    rules: Sequence[tuple[str, Any]] | None = None,
    scan_layers: bool = True,
) -> tuple[MPTConfig, Any, Any]:
    """(cfg, params, tokenizer) of a training workdir, an mpt-jax model checkpoint, or an HF folder / hub id.

    ``dtype`` ("float32", "bfloat16", "float16") casts every param and becomes ``cfg.dtype`` and
    ``cfg.param_dtype`` (the compute follows the weights); None keeps them as stored, and the
    compute dtype is then the stored one. ``max_seq_len`` overrides the context length (see
    ``with_max_seq_len``). ``quantize="int8"`` makes weight-only int8 params
    (``mpt_jax.quantize.quantize_params``). ``mesh`` (a ``jax.sharding.Mesh`` over data, fsdp,
    tensor) places each param as ``sharding.param_shardings(cfg, mesh, rules)`` says (a model
    checkpoint is read straight onto its devices); otherwise params are jax arrays on the default
    device. ``step`` picks a workdir's checkpoint (default: the newest). ``scan_layers=False``
    gives the per-layer layout (``model.unstack_layers``) that generation runs fastest on, made
    on the host so the devices never hold both layouts.

    An unknown path is a FileNotFoundError naming it; a missing tokenizer is not an error: the
    tokenizer is None (and a warning says why), and generation from token ids still works.
    """
    import jax

    from mpt_jax import checkpoint

    _check_args(dtype, quantize, max_seq_len, step)
    kind, where = checkpoint.resolve_source(path_or_hub_id)
    if step is not None and kind != "workdir":
        raise ValueError(
            f"load: step={step} is for a training workdir; {os.fspath(path_or_hub_id)} is "
            f"a{' model' if kind == 'model' else 'n HF'} checkpoint"
        )
    run = None
    if kind == "workdir":
        step, run = checkpoint.workdir_run_config(where, step)  # the step first: the run may save a newer one
        cfg = MPTConfig.from_dict(run["model"], source=f"{where} checkpoint {step} config")
    elif kind == "model":
        cfg = checkpoint.load_config(where)
    else:
        from mpt_jax.hf import resolve_hf_path

        where = resolve_hf_path(where)  # a hub id is downloaded once, weights and tokenizer together
        cfg = MPTConfig.from_hf(where)
    cfg = with_max_seq_len(cfg, max_seq_len)

    rules = None if rules is None else tuple(rules)
    shardings = None
    if mesh is not None and quantize is None:
        from mpt_jax import sharding

        shardings = sharding.param_shardings(cfg, mesh, rules or sharding.DEFAULT_RULES)
    if kind == "model":  # straight onto the devices, unless the layers are to be unstacked first
        _, params = checkpoint.load_model(where, shardings=shardings if scan_layers else None, dtype=dtype)
    else:
        _, params = checkpoint.load_params_any(where, dtype=dtype, step=step)
    compute = dtype or _stored_dtype(params)
    if compute is not None:
        cfg = dataclasses.replace(cfg, dtype=compute, param_dtype=compute)
    if quantize == "int8":  # on the host, leaf by leaf: the devices only ever hold the int8 weights
        from mpt_jax.quantize import quantize_params  # only when asked: int8 is its own module

        params = quantize_params(cfg, params)
        if mesh is not None:
            from mpt_jax import sharding

            shardings = sharding.quantized_param_shardings(cfg, mesh, rules or sharding.DEFAULT_RULES)
    if not scan_layers:
        from mpt_jax import sharding
        from mpt_jax.model import unstack_layers

        params = unstack_layers(params, cfg.n_layers)
        shardings = None if shardings is None else sharding.unstack_shardings(shardings, cfg.n_layers)
    params = jax.device_put(params, shardings) if shardings is not None else jax.device_put(params)

    tokenizer, origin = checkpoint.find_tokenizer(kind, where, run=run)
    if tokenizer is None:
        logging.warning("load: no tokenizer (%s); generation from token ids still works", origin)
    else:
        logging.info("load: tokenizer from %s (%d ids)", origin, tokenizer.vocab_size)
    where_step = f" at step {step}" if kind == "workdir" else ""
    logging.info("load: %s%s (%s), %s params", where, where_step, kind, cfg.param_dtype)
    return cfg, params, tokenizer
