"""mpt-jax model checkpoints: the params as orbax arrays, plus the model config as JSON.

Layout of a model checkpoint folder (written by ``convert hf_to_jax``, read by training's
``init_from`` and ``convert jax_to_hf``):

    DIR/config.json            {"format": "mpt-jax-model", "version": 1, "model": {MPTConfig fields}}
    DIR/params/<a.b.c>/        one orbax PyTree checkpoint per param, e.g. params/blocks.attn.Wqkv.kernel
    DIR/tokenizer/             its tokenizer (tokenizer.json + tokenizer_config.json), when it has one

A training workdir keeps its run's tokenizer the same way, in ``<workdir>/tokenizer/``.

One orbax item per param, written one after the other, because orbax copies what it writes: saving
MPT-30B as a single tree would need twice its size in host memory, param by param it needs the
model plus its largest param. Restoring can place each array straight onto its devices.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from mpt_jax.config import EXECUTION_FIELDS, MPTConfig
from mpt_jax.files import atomic_output_dir, read_json
from mpt_jax.model import flat_params

FORMAT = "mpt-jax-model"
VERSION = 1
PARAMS = "params"
TOKENIZER_DIR = "tokenizer"  # a model checkpoint's or a training workdir's tokenizer folder


def save_model(
    path: str | os.PathLike,
    cfg: MPTConfig,
    params: Any | Iterable[tuple[tuple[str, ...], Any]],
    *,
    overwrite: bool = False,
    tokenizer: Any = None,
    extra: Callable[[str], None] | None = None,
) -> str:
    """Writes ``params`` and ``cfg`` to ``path``, atomically (a temporary folder, then a rename).

    ``params`` is a nested dict of numpy or jax arrays, or an iterable of (path tuple, array)
    pairs, which is consumed one param at a time (what ``convert hf_to_jax`` streams).
    ``tokenizer`` goes to ``path/tokenizer/``: a ``Tokenizer`` (anything with
    ``save_pretrained(folder)``) or a folder whose tokenizer files are copied as they are (an HF
    source's). ``extra(folder)`` writes more files into the temporary folder before the rename.
    Either way they appear together with the params or not at all.
    """
    path = os.path.abspath(os.fspath(path))
    if tokenizer is not None and not hasattr(tokenizer, "save_pretrained"):
        from mpt_jax.data.tokenizer import TokenizerFiles

        tokenizer = TokenizerFiles(tokenizer)  # checked now: a folder without tokenizer files stops before writing
    leaves = flat_params(params) if isinstance(params, dict) else params
    with atomic_output_dir(path, overwrite=overwrite) as tmp:
        with ocp.PyTreeCheckpointer() as ckptr:
            for leaf_path, value in leaves:
                ckptr.save(os.path.join(tmp, PARAMS, ".".join(leaf_path)), {"value": value})
                del value
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump({"format": FORMAT, "version": VERSION, "model": cfg.to_dict()}, f, indent=2)
            f.write("\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(os.path.join(tmp, TOKENIZER_DIR))
        if extra is not None:
            extra(tmp)
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

ITEMS = ("state", "data", "config")
# tensorstore status codes that mean bytes are missing or cut short (its errors start with the code).
_DAMAGE_CODES = ("NOT_FOUND", "OUT_OF_RANGE", "DATA_LOSS", "FAILED_PRECONDITION")


@dataclasses.dataclass
class Restored:
    """A checkpoint read back: its step, the train state and the run config it was written with."""

    step: int
    state: Any
    config: dict


def _causes(error: BaseException) -> list[BaseException]:
    chain, seen = [], set()
    while error is not None and id(error) not in seen:
        chain.append(error)
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return chain


def _short(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300] if text else ''}"


def damage_of(error: BaseException) -> str | None:
    """What in ``error`` shows that a checkpoint's files are missing or cut short, or None.

    Only damage lets a resume fall back to an older checkpoint. A permission error, an I/O error
    that may pass, or a bug says nothing about the files, so it is not damage.
    """
    chain = _causes(error)
    if any(isinstance(e, PermissionError) or str(e).startswith("PERMISSION_DENIED") for e in chain):
        return None
    for e in chain:
        if isinstance(e, FileNotFoundError | json.JSONDecodeError | UnicodeDecodeError | EOFError):
            return _short(e)
        if isinstance(e, ValueError) and str(e).startswith(_DAMAGE_CODES):
            return _short(e)
    return None


class _Damaged(Exception):
    """A checkpoint whose files are missing or cut short (never raised out of this module)."""


class TrainCheckpoints:
    """Orbax checkpoints of a training run under ``directory`` (``<workdir>/checkpoints/<step>/``).

    Each holds the train state (params, optimizer state, step, rng), the data iterator's state
    and the run config as JSON. Saves are asynchronous; orbax writes each into a temporary folder
    and renames it when complete, so a run killed mid-save leaves the previous checkpoints intact.
    Nothing is written before the first ``save`` (not even the folder).

    ``restore_latest`` tells two failures apart. A checkpoint that does not fit the run (another
    model, optimizer, state tree, shape or dtype) is a ValueError naming the difference, decided
    from the stored metadata before any array is read; nothing is moved. A *damaged* one (files
    missing or cut short) is skipped for the previous one with a warning, and moved aside
    (``<step>.unreadable-<n>``, never deleted) once an older one has been restored. Any other error
    (e.g. permissions) is raised with every checkpoint left as it is.
    """

    def __init__(self, directory: str, *, keep: int | None = None, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=False, enable_async_checkpointing=async_save, save_decision_policy=None
        )
        handlers = {
            "state": ocp.StandardCheckpointHandler(),
            "data": ocp.JsonCheckpointHandler(),
            "config": ocp.JsonCheckpointHandler(),
        }
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

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

    def restore_latest(self, abstract_state: Any, data_iterator: Any, run_config: dict) -> Restored | None:
        """The newest readable checkpoint, with ``data_iterator`` moved to its position; None when
        the folder holds none. ``run_config`` is the run's config as JSON (what ``save`` stores).

        Raises ValueError when the newest undamaged checkpoint does not fit the run, and
        FileNotFoundError when every checkpoint is damaged (a silent restart at step 0 would
        redo the run's steps); neither moves anything.
        """
        damaged: list[tuple[int, str]] = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                saved, stored = self._metadata(step)
                check_fits(
                    saved,
                    stored,
                    abstract_state,
                    run_config,
                    where=f"the checkpoint at step {step} in {self.directory}",
                )
                restored = self._read(step, abstract_state)
            except _Damaged as e:
                logging.warning("checkpoint at step %d is damaged (%s); trying the previous one", step, e)
                damaged.append((step, str(e)))
                continue
            try:  # a readable checkpoint that does not fit this run is the user's to resolve: no fallback
                data_iterator.set_state(restored["data"])
            except ValueError as e:
                raise ValueError(f"checkpoint at step {step} in {self.directory}: {e}") from None
            for bad, why in damaged:
                logging.warning("moved the damaged checkpoint at step %d (%s) to %s", bad, why, self._move_aside(bad))
            return Restored(step, restored["state"], saved)
        if damaged:
            listed = "; ".join(f"step {s}: {why}" for s, why in damaged)
            raise FileNotFoundError(
                f"every checkpoint in {self.directory} is damaged ({listed}); nothing was moved or started: "
                "move them out of the folder to start from step 0, or use another --workdir"
            )
        return None

    def _metadata(self, step: int) -> tuple[dict, Any]:
        """(the stored run config, the state's orbax metadata tree), without reading any array."""
        missing = [item for item in ITEMS if not os.path.isdir(os.path.join(self.directory, str(step), item))]
        if missing:
            raise _Damaged(f"no {', '.join(missing)} folder")
        with self._classified(step):
            saved = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
            stored = self.manager.item_metadata(step)["state"]
        if not isinstance(saved, dict) or stored is None:
            raise _Damaged("no readable config or state metadata")
        return saved, stored

    def _read(self, step: int, abstract_state: Any) -> dict:
        with self._classified(step):
            return self.manager.restore(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()),
            )

    @contextlib.contextmanager
    def _classified(self, step: int) -> Iterator[None]:
        """Turns evidence of damage into _Damaged; other I/O errors into an OSError that says the
        checkpoint was left alone; anything else passes unchanged."""
        try:
            yield
        except Exception as e:  # noqa: BLE001 - sorted below; nothing is swallowed
            why = damage_of(e)
            if why is not None:
                raise _Damaged(why) from e
            if any(
                isinstance(c, OSError) or str(c).startswith(("PERMISSION_DENIED", "UNAVAILABLE")) for c in _causes(e)
            ):
                raise OSError(
                    f"checkpoint at step {step} in {self.directory} could not be read ({_short(e)}); "
                    "it was left as it is: fix the cause and run again"
                ) from e
            raise

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


# ----------------------------------------------------------------------------------------------
# Does a checkpoint fit the run that wants to resume from it?


def check_fits(saved: dict, stored_state: Any, abstract_state: Any, run_config: dict, *, where: str) -> None:
    """Raises ValueError naming every difference between a checkpoint and the run that would
    resume from it: model fields (EXECUTION_FIELDS may change), optimizer name, and the state
    tree (paths, shapes, dtypes) against ``abstract_state``. ``saved`` is the checkpoint's run
    config, ``stored_state`` its orbax metadata tree. Reads no arrays."""
    problems = _model_changes(saved.get("model", {}), run_config.get("model", {}))
    old_opt, new_opt = saved.get("optimizer", {}).get("name"), run_config.get("optimizer", {}).get("name")
    if old_opt != new_opt:
        problems.insert(0, f"optimizer.name: {old_opt!r} in the checkpoint, {new_opt!r} in this run")
    cast_ok = saved.get("model", {}).get("param_dtype") != run_config.get("model", {}).get("param_dtype")
    problems += _tree_changes(_leaf_specs(stored_state), _leaf_specs(abstract_state), params_cast_ok=cast_ok)
    if problems:
        raise ValueError(
            f"{where} does not fit this run: {'; '.join(problems)}. Nothing was moved or started: "
            "change the config back, or use another --workdir"
        )


def _model_changes(saved_model: dict, model: dict) -> list[str]:
    # A field the checkpoint does not name is one added since it was written: it had the default.
    defaults = {f.name: f.default for f in dataclasses.fields(MPTConfig) if f.default is not dataclasses.MISSING}
    saved_model, model = {**defaults, **saved_model}, {**defaults, **model}
    keys = sorted(k for k in set(saved_model) | set(model) if saved_model.get(k) != model.get(k))
    return [
        f"model.{k}: {saved_model.get(k)!r} in the checkpoint, {model.get(k)!r} in this run"
        for k in keys
        if k not in EXECUTION_FIELDS
    ]


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _leaf_specs(tree: Any) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{"opt_state.1.mu.wte.embedding": (shape, dtype)} for orbax metadata and abstract trees alike
    (a NamedTuple field and the dict key orbax stores it under read the same; PRNG keys as their
    uint32 data, which is how they are stored)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        shape, dtype = tuple(leaf.shape), leaf.dtype
        if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(shape, dtype))
            shape, dtype = tuple(data.shape), data.dtype
        out[".".join(_key_name(k) for k in path)] = (shape, np.dtype(dtype))
    return out


def _tree_changes(stored: dict, wanted: dict, *, params_cast_ok: bool, limit: int = 4) -> list[str]:
    def listed(items: list[str]) -> str:
        more = f" and {len(items) - limit} more" if len(items) > limit else ""
        return ", ".join(items[:limit]) + more

    out = []
    only_stored = sorted(set(stored) - set(wanted))
    only_wanted = sorted(set(wanted) - set(stored))
    if only_stored:
        out.append(f"state has {listed(only_stored)} in the checkpoint, not in this run")
    if only_wanted:
        out.append(f"state has {listed(only_wanted)} in this run, not in the checkpoint")
    differ = []
    for path in sorted(set(stored) & set(wanted)):
        (old_shape, old_dtype), (new_shape, new_dtype) = stored[path], wanted[path]
        if old_shape != new_shape:
            differ.append(f"state.{path} shape {old_shape} in the checkpoint, {new_shape} in this run")
        elif old_dtype != new_dtype:
            cast = (
                params_cast_ok
                and path.startswith("params.")
                and jax.numpy.issubdtype(old_dtype, jax.numpy.floating)
                and jax.numpy.issubdtype(new_dtype, jax.numpy.floating)
            )
            if not cast:
                differ.append(f"state.{path} dtype {old_dtype} in the checkpoint, {new_dtype} in this run")
    if differ:
        out.append(listed(differ))
    return out


# ----------------------------------------------------------------------------------------------
# init_from: which model fields a finetuning run may set differently from its source checkpoint.

# Free to differ: how the weights run (EXECUTION_FIELDS), regularisation and packing while
# training, the random init (the loaded weights replace it), and max_seq_len unless a learned
# position table has that many rows. Every other field must mean the same in both.
INIT_FROM_FREE_FIELDS = (
    *EXECUTION_FIELDS,
    "emb_pdrop",
    "attn_pdrop",
    "resid_pdrop",
    "attn_uses_sequence_id",
    "max_seq_len",
    *(f.name for f in dataclasses.fields(MPTConfig) if "init_" in f.name),
)


def _meaning(cfg: MPTConfig, field: str) -> Any:
    """What ``field`` contributes to the model's function, so that two spellings of the same
    model compare equal (softmax_scale None and 1/sqrt(head_dim); a switched-off option's knobs)."""
    derived = {
        "softmax_scale": lambda: cfg.attn_scale,
        "logit_scale": lambda: cfg.logit_multiplier,
        "expansion_ratio": lambda: cfg.ffn_dim,
        "ffn_hidden_size": lambda: cfg.ffn_dim,
        "kv_n_heads": lambda: cfg.num_kv_heads,
        "learned_pos_emb": lambda: cfg.uses_learned_pos_emb,
        "alibi_bias_max": lambda: cfg.alibi_bias_max if cfg.alibi else None,
        "attention_bias": lambda: cfg.qkv_bias,
        "attn_temperature_floor_scale": lambda: (
            cfg.attn_temperature_floor_scale if cfg.uses_temperature_tuning else None
        ),
    }
    if field in derived:
        return derived[field]()
    if field.startswith("rope_") and not getattr(cfg, "rope", False):
        return None
    return getattr(cfg, field)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9)
    return a == b


def init_from_changes(source: MPTConfig, run: MPTConfig) -> tuple[list[str], list[str]]:
    """(allowed, refused): the fields where ``run`` differs from the ``source`` checkpoint's
    config, each as ``"field: old -> new"``. Refused ones change what the loaded weights compute
    (clip_qkv, softmax_scale, alibi_bias_max, logit_scale, ...); allowed ones are INIT_FROM_FREE_FIELDS."""
    learned_positions = source.uses_learned_pos_emb or run.uses_learned_pos_emb
    allowed, refused = [], []
    for field in dataclasses.fields(MPTConfig):
        old, new = getattr(source, field.name), getattr(run, field.name)
        if old == new:
            continue
        change = f"{field.name}: {old!r} -> {new!r}"
        if field.name in INIT_FROM_FREE_FIELDS and not (field.name == "max_seq_len" and learned_positions):
            allowed.append(change)
        elif not _same(_meaning(source, field.name), _meaning(run, field.name)):
            refused.append(change)
    return allowed, refused


# ----------------------------------------------------------------------------------------------
# Any source of weights: a training workdir, an mpt-jax model checkpoint, an HF folder or hub id.


def resolve_source(path: str | os.PathLike) -> tuple[str, str]:
    """(kind, location): kind "workdir", "model" or "hf"; location an absolute folder, or the hub
    id itself. Relative, absolute, ``~`` and trailing-slash paths all work; a path that names no
    local folder is FileNotFoundError at once unless it is a hub id (``owner/name``, see
    ``hf.is_hub_id``)."""
    from mpt_jax.hf import is_hub_id

    given = os.fspath(path)
    local = os.path.abspath(os.path.expanduser(given))
    if not os.path.isdir(local):
        if is_hub_id(given):
            return "hf", given
        where = "" if local == given else f" ({local})"
        raise FileNotFoundError(f"no such folder: {given}{where}")
    if os.path.isdir(os.path.join(local, "checkpoints")):
        return "workdir", local
    config_file = os.path.join(local, "config.json")
    if os.path.isfile(config_file) and read_json(config_file).get("format") == FORMAT:
        return "model", local
    return "hf", local


def load_config_any(path: str | os.PathLike) -> MPTConfig:
    """The model config of whatever ``load_params_any`` would read, without reading any weights."""
    kind, where = resolve_source(path)
    if kind == "workdir":
        return _workdir_config(where, _workdir_step(where))
    if kind == "model":
        return load_config(where)
    from mpt_jax.hf import open_hf

    return open_hf(where)[0]


def load_params_any(
    path: str | os.PathLike, *, dtype: str | None = None, step: int | None = None
) -> tuple[MPTConfig, dict[str, Any]]:
    """(cfg, params) from a training workdir (its newest checkpoint, or the one at ``step``), an
    mpt-jax model checkpoint, or an HF folder / hub id: whatever a user points ``init_from`` or
    ``convert jax_to_hf`` at. ``step`` with anything but a workdir is a ValueError."""
    kind, where = resolve_source(path)
    if step is not None and kind != "workdir":
        raise ValueError(
            f"step={step} is for a training workdir; {path} is a{' model' if kind == 'model' else 'n HF'} checkpoint"
        )
    if kind == "workdir":
        return _load_workdir_params(where, dtype, step)
    if kind == "model":
        return load_model(where, dtype=dtype)
    from mpt_jax.hf import load_hf

    return load_hf(where, dtype=dtype)


def _workdir_step(workdir: str, step: int | None = None) -> int:
    """The newest checkpoint's step, or ``step`` if the workdir has it (else FileNotFoundError listing its steps)."""
    steps = sorted((int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()), reverse=True)
    if not steps:
        raise FileNotFoundError(f"{workdir}: a training workdir without checkpoints")
    if step is not None and step not in steps:
        raise FileNotFoundError(f"{workdir}: no checkpoint at step {step}; its steps are {sorted(steps)}")
    return steps[0] if step is None else step


def workdir_run_config(workdir: str, step: int | None = None) -> tuple[int, dict[str, Any]]:
    """(step, the whole run config saved with that checkpoint, as JSON) of a training workdir's
    checkpoint at ``step`` (default: the newest)."""
    step = _workdir_step(workdir, step)
    file = os.path.join(workdir, "checkpoints", str(step), "config", "metadata")
    return step, read_json(file, what="checkpoint config")


def _workdir_config(workdir: str, step: int) -> MPTConfig:
    step, run = workdir_run_config(workdir, step)
    return MPTConfig.from_dict(run["model"], source=f"{workdir} checkpoint {step} config")


def _load_workdir_params(workdir: str, dtype: str | None, step: int | None = None) -> tuple[MPTConfig, dict[str, Any]]:
    step = _workdir_step(workdir, step)
    cfg = _workdir_config(workdir, step)
    state_dir = os.path.join(workdir, "checkpoints", str(step), "state")
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


# ----------------------------------------------------------------------------------------------
# The tokenizer that goes with any source of weights.


def find_tokenizer(kind: str, where: str, *, run: dict[str, Any] | None = None) -> tuple[Any, str]:
    """(tokenizer or None, where it came from or why there is none) for the weights of
    ``resolve_source``'s ``(kind, where)``; ``where`` must be a local folder (resolve a hub id with
    ``hf.resolve_hf_path`` first).

    An HF folder's tokenizer files; a model checkpoint's ``tokenizer/``; a workdir's
    ``tokenizer/`` (written when its run started), else, for workdirs from before that, the
    tokenizer named by the run config's ``data`` section (``run``, or the newest checkpoint's):
    ChatML tokens included when it trained on chat data, never trained anew. A tokenizer file that
    is there but broken is an error, not a missing tokenizer.
    """
    from mpt_jax.data.tokenizer import load_tokenizer

    folder = where if kind == "hf" else os.path.join(where, TOKENIZER_DIR)
    if os.path.isfile(os.path.join(folder, "tokenizer.json")):
        return load_tokenizer(folder), folder
    if kind != "workdir":
        return None, f"{folder} has no tokenizer.json"
    from mpt_jax.data.pipeline import DataConfig, get_tokenizer  # older workdirs only: imports grain

    try:
        run = run if run is not None else workdir_run_config(where)[1]
        data = DataConfig.from_config(run.get("data") or {})
        tok = get_tokenizer(data, train=False)
    except (ValueError, OSError) as e:
        return None, f"{where} has no {TOKENIZER_DIR}/ folder and its run's tokenizer was not found ({e})"
    return tok, f"the run config's data.tokenizer={data.tokenizer}"
