"""mpt-jax model checkpoints: an orbax params tree plus the model config as JSON.

Layout of a model checkpoint folder (written by ``convert hf_to_jax``, read by training's
``init_from`` and by generation):

    DIR/config.json     {"format": "mpt-jax-model", "version": 1, "model": {MPTConfig fields}}
    DIR/params/         orbax PyTree checkpoint of the params (stacked layers, see model.py)
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from mpt_jax.config import MPTConfig
from mpt_jax.files import atomic_output_dir, read_json

FORMAT = "mpt-jax-model"
VERSION = 1


def save_model(path: str | os.PathLike, cfg: MPTConfig, params: Any, *, overwrite: bool = False) -> str:
    """Writes ``params`` (numpy or jax arrays) and ``cfg`` to ``path``, atomically."""
    path = os.path.abspath(os.fspath(path))
    with atomic_output_dir(path, overwrite=overwrite) as tmp:
        with ocp.PyTreeCheckpointer() as ckptr:
            ckptr.save(os.path.join(tmp, "params"), params)
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
    params_dir = os.path.join(path, "params")
    with ocp.PyTreeCheckpointer() as ckptr:
        meta = ckptr.metadata(params_dir)
        tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta.tree

        def restore_arg(leaf, sharding=None):
            want = np.dtype(dtype) if dtype else leaf.dtype
            if sharding is None:
                return ocp.RestoreArgs(restore_type=np.ndarray, dtype=want)
            return ocp.ArrayRestoreArgs(sharding=sharding, dtype=want)

        if shardings is None:
            args = jax.tree.map(restore_arg, tree)
        else:
            args = jax.tree.map(restore_arg, tree, shardings)
        params = ckptr.restore(params_dir, args=ocp.args.PyTreeRestore(restore_args=args))
    return cfg, params
