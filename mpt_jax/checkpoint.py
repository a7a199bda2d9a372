"""mpt-jax model checkpoints: the params as orbax arrays, plus the model config as JSON.

Layout of a model checkpoint folder (written by ``convert hf_to_jax``, read by training's
``init_from`` and by generation):

    DIR/config.json            {"format": "mpt-jax-model", "version": 1, "model": {MPTConfig fields}}
    DIR/params/<a.b.c>/        one orbax PyTree checkpoint per param, e.g. params/blocks.attn.Wqkv.kernel

One orbax item per param, written one after the other, because orbax copies what it writes: saving
MPT-30B as a single tree would need twice its size in host memory, param by param it needs the
model plus its largest param. Restoring can place each array straight onto its devices.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from mpt_jax.config import EXECUTION_FIELDS, MPTConfig
from mpt_jax.files import atomic_output_dir, read_json
from mpt_jax.model import flat_params

FORMAT = "mpt-jax-model"
VERSION = 1
PARAMS = "params"


def save_model(
    path: str | os.PathLike,
    cfg: MPTConfig,
    params: Any | Iterable[tuple[tuple[str, ...], Any]],
    *,
    overwrite: bool = False,
) -> str:
    """Writes ``params`` and ``cfg`` to ``path``, atomically (a temporary folder, then a rename).

    ``params`` is a nested dict of numpy or jax arrays, or an iterable of (path tuple, array)
    pairs, which is consumed one param at a time (what ``convert hf_to_jax`` streams).
    """
    path = os.path.abspath(os.fspath(path))
    leaves = flat_params(params) if isinstance(params, dict) else params
    with atomic_output_dir(path, overwrite=overwrite) as tmp:
        with ocp.PyTreeCheckpointer() as ckptr:
            for leaf_path, value in leaves:
                ckptr.save(os.path.join(tmp, PARAMS, ".".join(leaf_path)), {"value": value})
                del value
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump({"format": FORMAT, "version": VERSION, "model": cfg.to_dict()}, f, indent=2)
            f.write("\n")
    return path


def load_config(path: str | os.PathLike) -> MPTConfig:
    """The MPTConfig stored in a model checkpoint folder."""
    file = os.path.join(os.fspath(path), "config.json")
    data = read_json(file, what="mpt-jax model checkpoint config")
    if data.get("format") != FORMAT:
        raise ValueError(f"{file}: format={data.get('format')!r}, expected {FORMAT!r} (an HF folder? use load_hf)")
    return MPTConfig.from_dict(data["model"], source=file)


def load_model(
    path: str | os.PathLike, *, shardings: Any = None, dtype: str | None = None
) -> tuple[MPTConfig, dict[str, Any]]:
    """Reads (cfg, params). With ``shardings`` (a tree of jax.sharding.Sharding matching params)
    each array is restored directly onto its devices; otherwise params are numpy arrays."""
    path = os.path.abspath(os.fspath(path))
    cfg = load_config(path)
    params_dir = os.path.join(path, PARAMS)
    if not os.path.isdir(params_dir):
        raise FileNotFoundError(f"{path}: no {PARAMS}/ folder; not a complete mpt-jax model checkpoint")
    sharding_of = dict(flat_params(shardings)) if shardings is not None else {}
    params: dict[str, Any] = {}
    with ocp.PyTreeCheckpointer() as ckptr:
        for name in sorted(os.listdir(params_dir)):
            leaf_path = tuple(name.split("."))
            meta = ckptr.metadata(os.path.join(params_dir, name))
            tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta.tree
            stored = tree["value"]
            want = np.dtype(dtype) if dtype else stored.dtype
            sharding = sharding_of.get(leaf_path)
            if sharding is None:
                arg = ocp.RestoreArgs(restore_type=np.ndarray, dtype=want)
            else:
                arg = ocp.ArrayRestoreArgs(sharding=sharding, dtype=want)
            value = ckptr.restore(
                os.path.join(params_dir, name), args=ocp.args.PyTreeRestore(restore_args={"value": arg})
            )["value"]
            node = params
            for key in leaf_path[:-1]:
                node = node.setdefault(key, {})
            node[leaf_path[-1]] = value
    if shardings is not None and set(sharding_of) != set(p for p, _ in flat_params(params)):
        raise ValueError(f"{path}: the shardings tree does not match the checkpoint's params")
    return cfg, params


# ----------------------------------------------------------------------------------------------
# Training checkpoints: train state + data iterator state + run config, every N steps.


class TrainCheckpoints:
    """Orbax checkpoints of a training run under ``directory`` (``<workdir>/checkpoints/<step>/``).

    Each holds the train state (params, optimizer state, step, rng), the data iterator's state
    and the run config as JSON. Saves are asynchronous; orbax writes each into a temporary folder
    and renames it when complete, so a run killed mid-save leaves the previous checkpoints intact.
    A checkpoint that fails to restore is moved aside (renamed ``<step>.unreadable-<n>``, never
    deleted) with a warning, and the previous one is used.
    """

    def __init__(self, directory: str, *, keep: int | None = None, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save, save_decision_policy=None
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "config"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iterator: Any, config: dict) -> None:
        """A collective: every process calls it. The data position saved is every process's
        (``global_state``), so the checkpoint resumes on another process count too."""
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_iterator.global_state()),
                config=ocp.args.JsonSave(config),
            ),
            force=True,
        )

    def restore_latest(
        self, abstract_state: Any, data_iterator: Any, model: dict | None = None
    ) -> tuple[int, Any] | None:
        """(step, state) of the newest readable checkpoint, with ``data_iterator`` moved to its
        position; None when there is none. A checkpoint written with another ``model`` config is
        an error (not a fallback): the run's config must change back, or use another workdir."""
        from absl import logging

        for step in sorted(self.manager.all_steps(), reverse=True):
            if model is not None:
                self._check_model(step, model)
            try:
                restored = self.manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
                    ),
                )
            except Exception as e:  # noqa: BLE001 - any failure to read means this checkpoint is unusable
                aside = self._move_aside(step)
                logging.warning(
                    "checkpoint at step %d could not be restored (%s: %s); moved to %s, trying the previous one",
                    step,
                    type(e).__name__,
                    str(e)[:300],
                    aside,
                )
                continue
            try:  # a readable checkpoint that does not fit this run is the user's to resolve: no fallback
                data_iterator.set_state(restored["data"])
            except ValueError as e:
                raise ValueError(f"checkpoint at step {step} in {self.directory}: {e}") from None
            return step, restored["state"]
        return None

    def _check_model(self, step: int, model: dict) -> None:
        try:
            saved = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
        except Exception:  # noqa: BLE001 - unreadable config: the full restore decides
            return
        saved_model = saved.get("model", {})
        diff = sorted(k for k in set(saved_model) | set(model) if saved_model.get(k) != model.get(k))
        diff = [k for k in diff if k not in EXECUTION_FIELDS]
        if diff:
            changes = ", ".join(f"{k}: {saved_model.get(k)!r} -> {model.get(k)!r}" for k in diff)
            raise ValueError(
                f"the checkpoint at step {step} in {self.directory} was written with another model config ({changes}); "
                "restore the config or use another --workdir"
            )

    def _move_aside(self, step: int) -> str:
        src = os.path.join(self.directory, str(step))
        n = 0
        while os.path.exists(os.path.join(self.directory, f"{step}.unreadable-{n}")):
            n += 1
        dst = os.path.join(self.directory, f"{step}.unreadable-{n}")
        if jax.process_index() == 0:
            os.rename(src, dst)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"move_aside_{step}")
        self.manager.reload()
        return dst

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def load_params_any(path: str, *, dtype: str | None = None) -> tuple[MPTConfig, dict[str, Any]]:
    """(cfg, params) from a training workdir (its newest checkpoint), an mpt-jax model checkpoint,
    or an HF folder / hub id: whatever a user points ``init_from`` or generation at."""
    ckpt_dir = os.path.join(path, "checkpoints")
    if os.path.isdir(ckpt_dir):
        return _load_workdir_params(path, dtype)
    config_file = os.path.join(path, "config.json")
    if os.path.isfile(config_file) and read_json(config_file).get("format") == FORMAT:
        return load_model(path, dtype=dtype)
    from mpt_jax.hf import load_hf

    return load_hf(path, dtype=dtype)


def _load_workdir_params(workdir: str, dtype: str | None) -> tuple[MPTConfig, dict[str, Any]]:
    steps = sorted((int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()), reverse=True)
    if not steps:
        raise FileNotFoundError(f"{workdir}: a training workdir without checkpoints")
    run = read_json(os.path.join(workdir, "checkpoints", str(steps[0]), "config", "metadata"), what="checkpoint config")
    cfg = MPTConfig.from_dict(run["model"], source=f"{workdir} checkpoint {steps[0]} config")
    state_dir = os.path.join(workdir, "checkpoints", str(steps[0]), "state")
    with ocp.PyTreeCheckpointer() as ckptr:
        tree = ckptr.metadata(state_dir)
        tree = tree.item_metadata.tree if hasattr(tree, "item_metadata") else tree.tree
        args = jax.tree.map(
            lambda m: ocp.RestoreArgs(restore_type=np.ndarray, dtype=np.dtype(dtype) if dtype else m.dtype),
            tree["params"],
        )
        restored = ckptr.restore(
            state_dir,
            args=ocp.args.PyTreeRestore(
                item={"params": tree["params"]}, restore_args={"params": args}, partial_restore=True
            ),
        )
    return cfg, restored["params"]
