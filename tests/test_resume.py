"""Resume and its refusals, in process (a few seconds each): a checkpoint that does not fit is an
error that moves nothing; a damaged one is skipped, said and moved aside; metrics hold each step
once; a non-finite gradient saves nothing; init_from is checked and any path form works; a config
that fails its checks writes nothing."""

from __future__ import annotations

import glob
import importlib.util
import json
import logging
import os
import shutil
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mpt_jax import checkpoint, metrics, optim, run_config, steps, train
from mpt_jax.config import MPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(data_dir: str, **overrides):
    """configs/tiny.py shrunk to a 2-layer d_model=64 model on 4 x 32 tokens; ``overrides`` are
    dotted keys ("train.max_steps": 6)."""
    spec = importlib.util.spec_from_file_location("tiny_config", os.path.join(ROOT, "configs", "tiny.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    small = {
        "model.d_model": 64,
        "model.n_heads": 2,
        "model.n_layers": 2,
        "train.seq_len": 32,
        "train.global_batch_size": 4,
        "train.max_steps": 6,
        "train.log_every": 1,
        "train.eval_every": 0,
        "train.progress": False,
        "schedule.t_warmup": 2,
        "checkpoint.every_steps": 3,
        "checkpoint.keep": 0,
        "data.data_dir": data_dir,
        "data.shuffle_rows": 0,
    }
    for key, value in {**small, **overrides}.items():
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def read_metrics(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def computed(records: list[dict]) -> list[dict]:
    """The records without wall-clock numbers (throughput differs between runs; nothing else may)."""
    timing = ("tokens_per_s", "step_time", "loss_tokens", "mfu")
    return [{k: v for k, v in r.items() if k not in timing} for r in records]


def listing(workdir: str) -> list[str]:
    return sorted(os.listdir(os.path.join(workdir, "checkpoints")))


def state_params(workdir: str, step: int):
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(os.path.join(workdir, "checkpoints", str(step), "state"))["params"]


def assert_same_bits(a, b) -> None:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8))


def copy_of(workdir: str, tmp_path, name: str = "run") -> str:
    dst = str(tmp_path / name)
    shutil.copytree(workdir, dst)
    return dst


def log_text(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records)


@pytest.fixture(scope="module")
def base(tmp_path_factory, stdlib_data_dir):
    """6 steps, checkpoints at 3 and 6, every step logged: the run the tests resume or refuse."""
    workdir = str(tmp_path_factory.mktemp("base") / "run")
    result = train.Trainer(tiny_config(stdlib_data_dir), workdir).run()
    assert result["step"] == 6 and listing(workdir) == ["3", "6"]
    return workdir


# ----------------------------------------------------------------------------------------------
# A checkpoint that does not fit: refused, nothing moved, nothing written.


def test_changed_optimizer_refuses_and_keeps_every_checkpoint(base, stdlib_data_dir, tmp_path):
    workdir = copy_of(base, tmp_path)
    before = {name: open(os.path.join(workdir, name), "rb").read() for name in ("config.json", "metrics.jsonl")}
    config = tiny_config(stdlib_data_dir, **{"optimizer.name": "decoupled_lionw", "train.max_steps": 9})
    with pytest.raises(ValueError) as e:
        train.Trainer(config, workdir).run()
    message = str(e.value)
    assert "checkpoint at step 6" in message
    assert "optimizer.name: 'decoupled_adamw' in the checkpoint, 'decoupled_lionw' in this run" in message
    assert "opt_state.1.nu.wte.embedding" in message or "opt_state.1.nu." in message
    assert listing(workdir) == ["3", "6"]  # nothing renamed, nothing new
    for name, data in before.items():
        assert open(os.path.join(workdir, name), "rb").read() == data, name
    # The same optimizer with another lr fits (and is said to change the schedule, see below).
    config = tiny_config(stdlib_data_dir, **{"optimizer.name": "adamw"})
    with pytest.raises(ValueError, match="optimizer.name: 'decoupled_adamw' in the checkpoint, 'adamw'"):
        train.Trainer(config, workdir).run()
    assert listing(workdir) == ["3", "6"]


def test_check_fits_names_paths_shapes_and_dtypes():
    def sds(shape, dtype="float32"):
        return jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))

    key = jax.eval_shape(lambda: jax.random.key(0))
    stored = {"params": {"w": sds((4, 8)), "b": sds((8,))}, "step": sds((), "int32"), "rng": sds((2,), "uint32")}
    run = {"params": {"w": sds((4, 16)), "b": sds((8,), "int32")}, "step": sds((), "int32"), "rng": key}
    saved = {"model": {"d_model": 8}, "optimizer": {"name": "decoupled_adamw"}}
    with pytest.raises(ValueError) as e:
        checkpoint.check_fits(saved, stored, run, saved, where="ckpt")
    assert "state.params.w shape (4, 8) in the checkpoint, (4, 16) in this run" in str(e.value)
    assert "state.params.b dtype float32 in the checkpoint, int32 in this run" in str(e.value)
    assert "rng" not in str(e.value)  # a PRNG key is stored as its uint32 data: that fits
    # A float params dtype may change with model.param_dtype (an execution field); nothing else may.
    run = {"params": {"w": sds((4, 8), "bfloat16"), "b": sds((8,), "bfloat16")}, "step": sds((), "int32"), "rng": key}
    bf16 = {"model": {"d_model": 8, "param_dtype": "bfloat16"}, "optimizer": {"name": "decoupled_adamw"}}
    checkpoint.check_fits(saved, stored, run, bf16, where="ckpt")
    with pytest.raises(ValueError, match="state.params.w dtype float32 in the checkpoint, bfloat16 in this run"):
        checkpoint.check_fits(saved, stored, run, saved, where="ckpt")
    with pytest.raises(ValueError, match="model.d_model: 8 in the checkpoint, 16 in this run"):
        checkpoint.check_fits(saved, stored, stored, dict(saved, model={"d_model": 16}), where="ckpt")


# ----------------------------------------------------------------------------------------------
# Damage: fall back, say so, move aside (never delete); other errors are errors.


def _truncate_largest_array_file(workdir: str, step: int) -> None:
    files = glob.glob(os.path.join(workdir, "checkpoints", str(step), "state", "**", "d", "*"), recursive=True)
    largest = max(files, key=os.path.getsize)
    os.truncate(largest, os.path.getsize(largest) // 2)


def test_truncated_newest_checkpoint_falls_back_and_says_so(base, stdlib_data_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    workdir = copy_of(base, tmp_path)
    _truncate_largest_array_file(workdir, 6)
    result = train.Trainer(tiny_config(stdlib_data_dir), workdir).run()
    text = log_text(caplog)
    assert "checkpoint at step 6 is damaged" in text
    assert "resumed from the checkpoint at step 3" in text
    assert "moved the damaged checkpoint at step 6" in text
    assert listing(workdir) == ["3", "6", "6.unreadable-0"]  # kept, renamed, and redone
    assert result["step"] == 6
    assert_same_bits(state_params(base, 6), state_params(workdir, 6))
    assert [m["step"] for m in read_metrics(workdir)] == [1, 2, 3, 4, 5, 6]
    assert computed(read_metrics(workdir)) == computed(read_metrics(base))


def test_missing_item_folder_is_damage_and_all_damaged_is_an_error(base, stdlib_data_dir, tmp_path):
    workdir = copy_of(base, tmp_path)
    shutil.rmtree(os.path.join(workdir, "checkpoints", "6", "data"))
    _truncate_largest_array_file(workdir, 3)
    with pytest.raises(FileNotFoundError) as e:
        train.Trainer(tiny_config(stdlib_data_dir), workdir).run()
    assert "every checkpoint" in str(e.value) and "step 6: no data folder" in str(e.value)
    assert "step 3: " in str(e.value)
    assert listing(workdir) == ["3", "6"]  # nothing moved when nothing could be restored


def test_permission_error_is_an_error_not_a_fallback(base, stdlib_data_dir, tmp_path, monkeypatch):
    workdir = copy_of(base, tmp_path)
    real = ocp.CheckpointManager.restore

    def restore(self, step, args=None, **kw):
        if args is not None and "state" in args.keys():
            raise PermissionError(13, "Permission denied", os.path.join(self.directory, str(step), "state"))
        return real(self, step, args=args, **kw)

    monkeypatch.setattr(ocp.CheckpointManager, "restore", restore)
    with pytest.raises(OSError, match=r"checkpoint at step 6 .* could not be read \(PermissionError.*left as it is"):
        train.Trainer(tiny_config(stdlib_data_dir), workdir).run()
    assert listing(workdir) == ["3", "6"]


def test_damage_of_tells_damage_from_other_errors():
    def chained(outer: Exception, inner: Exception) -> Exception:
        try:
            try:
                raise inner
            except Exception as e:
                raise outer from e
        except Exception as e:
            return e

    assert checkpoint.damage_of(FileNotFoundError("no _METADATA"))
    assert checkpoint.damage_of(chained(Exception("reading array"), ValueError("OUT_OF_RANGE: byte range")))
    assert checkpoint.damage_of(chained(Exception("reading"), ValueError("FAILED_PRECONDITION: Truncated Zstd")))
    assert checkpoint.damage_of(json.JSONDecodeError("Expecting value", "", 0))
    assert checkpoint.damage_of(PermissionError("denied")) is None
    assert checkpoint.damage_of(chained(Exception("reading"), ValueError("PERMISSION_DENIED: x"))) is None
    assert checkpoint.damage_of(chained(FileNotFoundError("x"), PermissionError("denied"))) is None
    assert checkpoint.damage_of(OSError(5, "Input/output error")) is None
    assert checkpoint.damage_of(RuntimeError("a bug")) is None


# ----------------------------------------------------------------------------------------------
# metrics.jsonl and TensorBoard after a resume; the LR schedule change; the summary after SIGTERM.


def tensorboard_visible(workdir: str) -> list[tuple[str, int]]:
    """(tag, step) of every scalar TensorBoard shows: event files in order, a SessionLog START at
    step s hiding the earlier files' events at steps >= s (its purge rule)."""
    from tensorboardX.proto import event_pb2
    from test_metrics import read_tfrecords

    shown: list[tuple[str, int]] = []
    for path in sorted(glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*")), key=os.path.getmtime):
        for record in read_tfrecords(path):
            event = event_pb2.Event.FromString(record)
            if event.HasField("session_log") and event.session_log.status == event.session_log.START:
                shown = [(tag, step) for tag, step in shown if step < event.step]
            shown += [(v.tag, event.step) for v in event.summary.value]
    return shown


def test_truncate_after_drops_train_and_eval_records_and_counts_them(tmp_path):
    with metrics.MetricsWriter(str(tmp_path), tensorboard=False) as writer:
        for step in range(1, 5):
            writer.write(step, {"loss": 1.0})
            writer.write(step, {"loss": 2.0}, prefix="eval_")
        assert writer.truncate_after(2) == 4
        assert writer.truncate_after(2) == 0
    kept = [(r["step"], sorted(r)) for r in read_metrics(str(tmp_path))]
    assert kept == [
        (1, ["loss", "step"]),
        (1, ["eval_loss", "step"]),
        (2, ["loss", "step"]),
        (2, ["eval_loss", "step"]),
    ]


def test_metrics_hold_each_step_once_after_a_resume(stdlib_data_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    workdir = str(tmp_path / "run")
    config = tiny_config(stdlib_data_dir, **{"train.eval_every": 2, "train.eval_batches": 1})
    train.Trainer(config, workdir).run()
    first = read_metrics(workdir)
    # As if killed after step 6's lines were written but before its checkpoint was complete.
    shutil.rmtree(os.path.join(workdir, "checkpoints", "6"))
    time.sleep(1.1)  # TensorBoard event file names carry the second they were opened
    train.Trainer(config, workdir).run()
    assert "dropped 5 record(s) after step 3" in log_text(caplog)  # train 4, 5, 6 and eval 4, 6
    records = read_metrics(workdir)
    train_steps = [m["step"] for m in records if "loss" in m]
    eval_steps = [m["step"] for m in records if "eval_loss" in m]
    assert train_steps == [1, 2, 3, 4, 5, 6]
    assert eval_steps == [2, 4, 6]
    assert computed(records) == computed(first)  # the same numbers, each once
    shown = tensorboard_visible(workdir)
    assert len(shown) == len(set(shown)), "TensorBoard would show a step twice"
    assert sorted({s for tag, s in shown if tag == "loss"}) == [1, 2, 3, 4, 5, 6]


def test_changed_max_steps_on_resume_warns_with_both_lrs(base, stdlib_data_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    workdir = copy_of(base, tmp_path)
    config = tiny_config(stdlib_data_dir, **{"train.max_steps": 8})
    train.Trainer(config, workdir).run()
    old = float(optim.make_schedule(config.schedule, lr=config.optimizer.lr, max_steps=6)(6))
    new = float(optim.make_schedule(config.schedule, lr=config.optimizer.lr, max_steps=8)(6))
    assert old != new
    assert f"train.max_steps 6 -> 8); lr at step 6: {old:.6g} on the checkpoint's schedule, {new:.6g}" in log_text(
        caplog
    )


def sigterm_while_step_runs(monkeypatch, step: int) -> None:
    """SIGTERM to this process as the batch of ``step`` is handed to the train step."""
    real = train.to_global_arrays
    calls = []

    def to_global_arrays(batch, sharding):
        calls.append(1)
        if len(calls) == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(batch, sharding)

    monkeypatch.setattr(train, "to_global_arrays", to_global_arrays)


def test_summary_after_sigterm_shows_the_last_step(base, stdlib_data_dir, tmp_path, monkeypatch):
    """SIGTERM while step 3 runs (log_every=2: step 3 is not a logged step): the run saves step 3,
    stops, and returns step 3's loss, the same bits as the uninterrupted run's step 3."""
    sigterm_while_step_runs(monkeypatch, 3)
    workdir = str(tmp_path / "run")
    result = train.Trainer(tiny_config(stdlib_data_dir, **{"train.log_every": 2}), workdir).run()
    assert result["step"] == 3 and listing(workdir) == ["3"]
    assert result["loss"] == next(m["loss"] for m in read_metrics(base) if m["step"] == 3)
    assert [m["step"] for m in read_metrics(workdir)] == [1, 2]


# ----------------------------------------------------------------------------------------------
# The NaN guard.


def test_nan_gradient_with_finite_loss_stops_without_a_checkpoint(stdlib_data_dir, tmp_path, monkeypatch):
    """Step 4 has a NaN gradient norm and a finite loss; it is also a checkpoint step, max_steps,
    and a SIGTERM arrives while it runs: still nothing of it is saved."""
    real_step = steps.train_step

    def bad_step(state, batch, **kw):
        new, out = real_step(state, batch, **kw)
        return new, dict(out, grad_norm=jnp.where(state["step"] + 1 == 4, jnp.nan, out["grad_norm"]))

    monkeypatch.setattr(steps, "train_step", bad_step)
    sigterm_while_step_runs(monkeypatch, 4)
    workdir = str(tmp_path / "run")
    config = tiny_config(stdlib_data_dir, **{"train.max_steps": 4, "checkpoint.every_steps": 2})
    with pytest.raises(train.NonFiniteLoss) as e:
        train.Trainer(config, workdir).run()
    assert "gradient norm is nan at step 4 (the loss" in str(e.value)
    assert "is finite" in str(e.value) and "last good checkpoint is at step 2" in str(e.value)
    assert listing(workdir) == ["2"]


# ----------------------------------------------------------------------------------------------
# init_from: checked against config.model; every path form.


def test_init_from_changes_rule():
    src = MPTConfig(d_model=64, n_heads=2, n_layers=2, max_seq_len=256, vocab_size=128)
    for field, value in [("clip_qkv", 6.0), ("softmax_scale", 0.5), ("alibi_bias_max", 16), ("logit_scale", 0.5)]:
        allowed, refused = checkpoint.init_from_changes(src, src.replace(**{field: value}))
        assert refused and refused[0].startswith(f"{field}: ") and allowed == []
    changed = src.replace(max_seq_len=512, attn_pdrop=0.1, attn_uses_sequence_id=True, init_std=0.02, dtype="bfloat16")
    allowed, refused = checkpoint.init_from_changes(src, changed)
    assert refused == []
    assert "max_seq_len: 256 -> 512" in allowed and "dtype: 'float32' -> 'bfloat16'" in allowed
    assert len(allowed) == 5
    # Two spellings of one model are no difference; a switched-off option's knob is none either.
    same = src.replace(softmax_scale=1 / np.sqrt(32), expansion_ratio=2.0, ffn_hidden_size=256)
    assert checkpoint.init_from_changes(src, same)[1] == []
    learned = src.replace(alibi=False, learned_pos_emb=True)
    assert checkpoint.init_from_changes(learned, learned.replace(alibi_bias_max=4)) == ([], [])
    _, refused = checkpoint.init_from_changes(learned, learned.replace(max_seq_len=512))
    assert refused == ["max_seq_len: 256 -> 512"]  # the position table has max_seq_len rows


def test_init_from_refuses_a_changed_clip_qkv_and_writes_nothing(base, stdlib_data_dir, tmp_path):
    workdir = str(tmp_path / "ft")
    config = tiny_config(stdlib_data_dir, **{"init_from": base, "model.clip_qkv": 6.0, "train.max_steps": 2})
    with pytest.raises(ValueError, match=r"config.init_from=.*clip_qkv: None -> 6\.0"):
        train.Trainer(config, workdir).run()
    assert not os.path.exists(workdir)


def test_init_from_with_a_longer_max_seq_len_logs_a_notice(base, stdlib_data_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    workdir = str(tmp_path / "ft")
    config = tiny_config(stdlib_data_dir, **{"init_from": base, "model.max_seq_len": 512, "train.max_steps": 2})
    train.Trainer(config, workdir).run()
    assert "model.max_seq_len: 256 -> 512 (allowed" in log_text(caplog)
    assert f"initialised params from {base}" in log_text(caplog)


def test_every_init_from_path_form_works(base, stdlib_data_dir, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    os.makedirs(tmp_path / "home" / "workdirs")
    shutil.copytree(base, tmp_path / "home" / "workdirs" / "tiny")
    monkeypatch.chdir(tmp_path / "home")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    want = checkpoint.load_params_any(base)[1]
    forms = [
        "workdirs/tiny",
        "workdirs/tiny/",
        "./workdirs/tiny",
        "~/workdirs/tiny",
        str(tmp_path / "home/workdirs/tiny"),
    ]
    for form in forms:
        assert checkpoint.resolve_source(form)[0] == "workdir", form
        assert_same_bits(checkpoint.load_params_any(form)[1], want)
    # The documented finetuning command's form, end to end.
    config = tiny_config(stdlib_data_dir, **{"init_from": "workdirs/tiny", "train.max_steps": 2})
    train.Trainer(config, str(tmp_path / "ft")).run()
    assert "initialised params from workdirs/tiny" in log_text(caplog)
    # A local folder that is not there is named at once; only owner/name that is no local path is a hub id.
    for missing in ["workdirs/nope", "nope", "./nope/x", "~/nope", str(tmp_path / "nope")]:
        start = time.perf_counter()
        with pytest.raises(FileNotFoundError, match="no such folder: "):
            checkpoint.load_config_any(missing)
        assert time.perf_counter() - start < 1.0
    assert checkpoint.resolve_source("mosaicml/mpt-7b") == ("hf", "mosaicml/mpt-7b")


# ----------------------------------------------------------------------------------------------
# Nothing is written until the checks pass; the config checks.


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"schedule.t_warmup": 10}, r"config\.schedule\.t_warmup=10 is greater than max_steps=6"),
        (
            {"train.eval_every": 2, "train.eval_batches": 0},
            r"config\.train\.eval_every=2 with config\.train\.eval_batches=0",
        ),
        ({"model.vocab_size": 1000}, "vocab"),
        ({"init_from": "/no/such/run"}, "no such folder: /no/such/run"),
    ],
)
def test_a_failing_config_leaves_the_workdir_empty(stdlib_data_dir, tmp_path, overrides, match):
    workdir = tmp_path / "run"
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        train.Trainer(tiny_config(stdlib_data_dir, **overrides), str(workdir)).run()
    assert not workdir.exists()
    workdir.mkdir()  # an existing empty workdir stays empty too
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        train.Trainer(tiny_config(stdlib_data_dir, **overrides), str(workdir)).run()
    assert list(workdir.iterdir()) == []


def test_a_workdir_that_is_a_file_is_named(stdlib_data_dir, tmp_path):
    path = tmp_path / "afile"
    path.write_text("x")
    with pytest.raises(ValueError, match=f"workdir={path} is a file"):
        train.Trainer(tiny_config(stdlib_data_dir), str(path))
    assert path.read_text() == "x"


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"train.global_batch_size": 0}, r"config\.train\.global_batch_size=0: must be positive"),
        ({"train.global_batch_size": -4}, r"config\.train\.global_batch_size=-4: must be positive"),
        ({"train.micro_batch_size": -1}, r"config\.train\.micro_batch_size=-1: must be >= 0"),
        (
            {"train.eval_every": 5, "train.eval_batches": 0},
            r"config\.train\.eval_every=5 with config\.train\.eval_batches=0",
        ),
        (
            {"schedule.t_warmup": 7},
            r"config\.schedule\.t_warmup=7 is greater than max_steps=6 \(config\.train\.max_steps\)",
        ),
        ({"optimizer.b2": 1.5}, r"config\.optimizer\.b2=1\.5 must be < 1"),
        ({"train.grad_dtype": "float16"}, r"config\.train\.grad_dtype='float16': expected one of float32, bfloat16"),
        ({"optimizer.mu_dtype": "int8"}, r"config\.optimizer\.mu_dtype='int8': expected one of float32, bfloat16"),
    ],
)
def test_config_checks_name_the_key(overrides, match):
    config = tiny_config("/unused", **overrides)
    with pytest.raises(ValueError, match=match):
        run_config.check(config, 1)
    assert run_config.problems(tiny_config("/unused"), 1) == []
