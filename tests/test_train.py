"""The trainer end to end: exact resume after kill -9 and SIGTERM, accumulation, errors, finetuning."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from mpt_jax import MPTConfig, steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A very small model on the tiny config's path, so that each run compiles and trains in seconds.
SMALL = [
    "--config.model.d_model=64",
    "--config.model.n_heads=2",
    "--config.model.n_layers=2",
    "--config.train.seq_len=32",
    "--config.train.global_batch_size=4",
    "--config.train.log_every=1",
    "--config.train.eval_every=0",
    "--config.train.progress=False",
    "--config.schedule.t_warmup=5",
]


def train_cmd(workdir, data_dir, *overrides, config="configs/tiny.py"):
    return [
        sys.executable,
        "-m",
        "mpt_jax.train",
        f"--config={config}",
        f"--workdir={workdir}",
        f"--config.data.data_dir={data_dir}",
        *SMALL,
        *overrides,
    ]


def run(cmd, timeout=600):
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    return done


def read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(workdir):
    return {m["step"]: m["loss"] for m in read_metrics(workdir) if "loss" in m}


def final_params(workdir, step):
    path = os.path.join(workdir, "checkpoints", str(step), "state")
    with ocp.StandardCheckpointer() as ckptr:
        state = ckptr.restore(path)
    return state["params"]


def assert_same_params(a, b):
    flat_a, flat_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(flat_a) == len(flat_b)
    for x, y in zip(flat_a, flat_b, strict=True):
        assert np.array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8))


@pytest.fixture(scope="module")
def straight(tmp_path_factory, stdlib_data_dir):
    """40 steps without interruption: the reference for both resume tests."""
    workdir = str(tmp_path_factory.mktemp("straight"))
    done = run(train_cmd(workdir, stdlib_data_dir, "--config.train.max_steps=40", "--config.checkpoint.every_steps=20"))
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir


def wait_for(predicate, proc, timeout=300):
    start = time.time()
    while not predicate():
        if proc.poll() is not None:
            return False
        if time.time() - start > timeout:
            raise TimeoutError
        time.sleep(0.02)
    return True


def test_kill_9_then_resume_is_bitwise_identical(straight, stdlib_data_dir, tmp_path):
    workdir = str(tmp_path / "killed")
    cmd = train_cmd(workdir, stdlib_data_dir, "--config.train.max_steps=40", "--config.checkpoint.every_steps=20")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    in_time = wait_for(lambda: os.path.isdir(os.path.join(workdir, "checkpoints", "20")), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert in_time and proc.returncode == -signal.SIGKILL
    assert not os.path.isdir(os.path.join(workdir, "checkpoints", "40")), "the run finished before the kill"
    done = run(cmd)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from the checkpoint at step 20" in done.stderr
    a, b = losses(straight), losses(workdir)
    assert sorted(b) == list(range(1, 41))  # stale lines past the checkpoint were replaced
    assert a == b  # every logged loss, bit for bit (JSON floats round-trip exactly)
    assert_same_params(final_params(straight, 40), final_params(workdir, 40))


def logged_steps(workdir):
    """Steps in metrics.jsonl so far (a line being written may be cut short: skipped)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line)["step"])
            except (json.JSONDecodeError, KeyError):
                pass
    return out


def test_sigterm_at_a_random_step_saves_and_resumes_identically(straight, stdlib_data_dir, tmp_path):
    """SIGTERM once a random step in 2..12 of 40 is logged: the run saves that step, says so and exits 0
    early; the resumed run computes the uninterrupted run's bits."""
    workdir = str(tmp_path / "term")
    cmd = train_cmd(workdir, stdlib_data_dir, "--config.train.max_steps=40", "--config.checkpoint.every_steps=20")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    target = random.randint(2, 12)
    assert wait_for(lambda: max(logged_steps(workdir), default=0) >= target, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    saved = [int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()]
    stopped_at = max(saved)
    assert target <= stopped_at < 40, (target, stopped_at)  # it did stop early
    assert f"signal {int(signal.SIGTERM)}: saved the checkpoint at step {stopped_at}, exiting" in err
    assert sorted(losses(workdir)) == list(range(1, stopped_at + 1))
    done = run(cmd)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from the checkpoint at step {stopped_at}" in done.stderr
    assert losses(straight) == losses(workdir)
    assert_same_params(final_params(straight, 40), final_params(workdir, 40))


def test_newest_checkpoint_missing_its_arrays_falls_back_to_previous(straight, stdlib_data_dir, tmp_path):
    import shutil

    workdir = str(tmp_path / "corrupt")
    shutil.copytree(straight, workdir)
    state_dir = os.path.join(workdir, "checkpoints", "40", "state")
    for name in os.listdir(state_dir):  # break the newest checkpoint's arrays
        path = os.path.join(state_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
    done = run(train_cmd(workdir, stdlib_data_dir, "--config.train.max_steps=40", "--config.checkpoint.every_steps=20"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "checkpoint at step 40 is damaged" in done.stderr and "resumed from the checkpoint at step 20" in done.stderr
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["20", "40", "40.unreadable-0"]
    assert_same_params(final_params(straight, 40), final_params(workdir, 40))


def test_errors_before_anything_compiles(stdlib_data_dir, tmp_path):
    bad = run(train_cmd(tmp_path, stdlib_data_dir, "--config.train.max_stpes=3"))
    assert bad.returncode != 0 and "max_stpes" in bad.stderr
    bad = run(train_cmd(tmp_path, stdlib_data_dir, "--config.train.micro_batch_size=3"))
    assert bad.returncode != 0 and "micro_batch_size=3 does not divide" in bad.stderr
    bad = run(train_cmd(tmp_path, stdlib_data_dir, "--config.mesh.data=2"))
    assert bad.returncode != 0 and "multiplies to 2, not the 1 devices" in bad.stderr
    bad = run(train_cmd(tmp_path, stdlib_data_dir, "--config.model.vocab_size=1000"))
    assert bad.returncode != 0 and "smaller than the tokenizer's 8192 ids" in bad.stderr


def test_trainer_with_bfloat16_gradients_and_first_moment(stdlib_data_dir, tmp_path):
    """train.grad_dtype and optimizer.mu_dtype reach the jitted step: a run accumulating bfloat16
    gradients trains, and its checkpoint holds float32 params, a bfloat16 mu and a float32 nu."""
    workdir = str(tmp_path / "bf16")
    done = run(
        train_cmd(
            workdir,
            stdlib_data_dir,
            "--config.train.max_steps=12",
            "--config.train.micro_batch_size=2",
            "--config.train.grad_dtype=bfloat16",
            "--config.optimizer.mu_dtype=bfloat16",
            "--config.checkpoint.every_steps=12",
        )
    )
    assert done.returncode == 0, done.stderr[-3000:]
    got = losses(workdir)
    assert sorted(got) == list(range(1, 13)) and got[12] < got[1] - 0.5
    with ocp.StandardCheckpointer() as ckptr:
        state = ckptr.restore(os.path.join(workdir, "checkpoints", "12", "state"))
    dtypes = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        names = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
        kind = "params" if names[0] == "params" else next((n for n in names if n in ("mu", "nu")), None)
        if kind and np.ndim(leaf) > 0:
            dtypes.setdefault(kind, set()).add(np.dtype(leaf.dtype).name)
    assert dtypes == {"params": {"float32"}, "mu": {"bfloat16"}, "nu": {"float32"}}


def test_nonfinite_loss_stops_naming_the_step(stdlib_data_dir, tmp_path):
    """lr=1e30 without clipping: the gradients overflow (here while the loss is still finite) and
    the run stops there; every step before it is saved (every_steps=1), that step is not."""
    workdir = str(tmp_path / "nan")
    done = run(
        train_cmd(
            workdir,
            stdlib_data_dir,
            "--config.train.max_steps=30",
            "--config.checkpoint.every_steps=1",
            "--config.checkpoint.keep=0",
            "--config.optimizer.lr=1e30",
            "--config.optimizer.grad_clip_norm=0",
        )
    )
    assert done.returncode != 0
    found = re.search(r"(loss|gradient norm) is (nan|inf|-inf) at step (\d+)", done.stderr)
    assert found, done.stderr[-3000:]
    bad_step = int(found.group(3))
    assert f"stopping without saving (the last good checkpoint is at step {bad_step - 1})" in done.stderr
    saved = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    assert saved == list(range(1, bad_step))
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(final_params(workdir, bad_step - 1)))


def test_callback_sees_every_step_and_a_resume_starts_after_the_checkpoint(stdlib_data_dir, tmp_path, monkeypatch):
    """Trainer(callback=): one call per step with that step's loss, the logged metrics on log steps
    (the numbers metrics.jsonl holds) and eval_* on eval steps; a resumed run's first call is the
    step after the restored checkpoint; an exception from the callback ends the run. The trainer
    returns the heap's free pages twice, before the first step's callback (the state made, the step
    compiled), and not on every step."""
    import runpy

    from mpt_jax import host_memory
    from mpt_jax.train import Trainer

    def config(max_steps):
        c = runpy.run_path(os.path.join(ROOT, "configs", "tiny.py"))["get_config"]()
        c.model.d_model, c.model.n_heads, c.model.n_layers = 64, 2, 2
        c.data.data_dir = stdlib_data_dir
        c.train.update(max_steps=max_steps, seq_len=32, global_batch_size=4, log_every=2, eval_every=3)
        c.train.update(eval_batches=1, progress=False)
        c.schedule.t_warmup = 2
        c.checkpoint.every_steps = 3
        return c

    workdir = str(tmp_path / "run")
    calls = []
    releases = []
    monkeypatch.setattr(host_memory, "release_free_memory", lambda: releases.append(len(calls)) or True)
    result = Trainer(config(6), workdir, callback=lambda step, m: calls.append((step, dict(m)))).run()
    assert [s for s, _ in calls] == [1, 2, 3, 4, 5, 6]
    assert releases == [0, 0]
    assert all(np.isfinite(m["loss"]) for _, m in calls)
    logged = {}  # train and eval records of a step together
    for record in read_metrics(workdir):
        logged.setdefault(record["step"], {}).update(record)
    for step, m in calls:
        assert ("lr" in m) == (step in (1, 2, 4, 6))  # log_every=2, the first and the last step
        assert ("eval_loss" in m) == (step in (3, 6))
        written = logged.get(step, {})
        assert set(written) - {"step"} <= set(m)  # the callback sees all that was written for the step
        for key in set(written) - {"step"}:
            assert written[key] == pytest.approx(m[key], rel=1e-6), (step, key)
    assert calls[-1][1]["loss"] == pytest.approx(result["loss"])

    resumed = []
    Trainer(config(8), workdir, callback=lambda step, m: resumed.append(step)).run()
    assert resumed == [7, 8]  # from the checkpoint at step 6

    def stop_at_10(step, metrics):
        if step == 10:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Trainer(config(12), workdir, callback=stop_at_10).run()
    saved = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    assert saved[-1] == 9  # every_steps=3: step 10 was never saved


# ----------------------------------------------------------------------------------------------
# The step itself.


def _batch(rng, rows, length, vocab):
    tokens = jax.random.randint(rng, (rows, length), 0, vocab)
    seg = jnp.ones((rows, length), jnp.int32)
    return {
        "tokens": tokens,
        "segment_ids": seg,
        "positions": jnp.broadcast_to(jnp.arange(length), (rows, length)),
        "loss_mask": (jax.random.uniform(jax.random.fold_in(rng, 1), (rows, length)) > 0.3).astype(jnp.int32),
    }


def test_gradient_accumulation_equals_one_big_batch():
    """k micro-batches of b rows give the update of one batch of k*b rows (token-weighted mean)."""
    cfg = MPTConfig(d_model=32, n_heads=2, n_layers=2, vocab_size=64, max_seq_len=16)
    opt = optax.sgd(0.5)  # linear in the gradient, so the comparison is of the gradients themselves
    state = steps.init_state(cfg, opt, jax.random.key(0))
    batch = _batch(jax.random.key(1), 8, 16, cfg.vocab_size)
    out = {}
    for k in (1, 2, 4):
        fn = jax.jit(
            lambda s, b, k=k: steps.train_step(s, b, cfg=cfg, optimizer=opt, schedule=lambda t: 1e-2, micro_batches=k)
        )
        new, m = fn(state, batch)
        out[k] = (new["params"], m)
    for k in (2, 4):
        np.testing.assert_allclose(out[k][1]["loss"], out[1][1]["loss"], rtol=1e-6)
        np.testing.assert_allclose(out[k][1]["grad_norm"], out[1][1]["grad_norm"], rtol=1e-5)
        assert float(out[k][1]["tokens"]) == float(out[1][1]["tokens"])
        for a, b in zip(jax.tree.leaves(out[k][0]), jax.tree.leaves(out[1][0]), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-6)


def _micro_batch_scan(step_fn, state, batch):
    """The one top-level scan of a jitted-less train step: the loop over micro-batches."""
    jaxpr = jax.make_jaxpr(step_fn)(state, batch).jaxpr
    (scan,) = [e for e in jaxpr.eqns if e.primitive.name == "scan"]
    return scan


def test_bfloat16_gradients_are_bfloat16_inside_the_step():
    """grad_dtype='bfloat16': the loss is differentiated at bfloat16 params (the float32 masters
    never enter the micro-batch loop) and the gradient sum carried between micro-batches is
    bfloat16; with the default, both are float32. The optimizer still updates float32 params."""
    cfg = MPTConfig(d_model=48, n_heads=2, n_layers=3, vocab_size=80, max_seq_len=16, dtype="bfloat16")
    opt = optax.sgd(0.5)
    state = steps.init_state(cfg, opt, jax.random.key(0))
    batch = _batch(jax.random.key(1), 8, 16, cfg.vocab_size)
    params = jax.tree.leaves(state["params"])
    shapes = {x.shape for x in params}
    for grad_dtype, want in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
        scan = _micro_batch_scan(
            lambda s, b, g=grad_dtype: steps.train_step(
                s, b, cfg=cfg, optimizer=opt, schedule=lambda t: 0.5, micro_batches=4, grad_dtype=g
            ),
            state,
            batch,
        )
        consts = [v.aval for v in scan.invars[: scan.params["num_consts"]] if v.aval.shape in shapes]
        sums = [v.aval for v in scan.outvars[: len(params)]]  # the carry: (grads, loss_sum, count)
        assert len(consts) == len(params) and {a.dtype for a in consts} == {jnp.dtype(want)}, grad_dtype
        assert [a.shape for a in sums] == [x.shape for x in params]
        assert {a.dtype for a in sums} == {jnp.dtype(want)}, grad_dtype
        new, _ = jax.eval_shape(
            lambda s, b, g=grad_dtype: steps.train_step(
                s, b, cfg=cfg, optimizer=opt, schedule=lambda t: 0.5, micro_batches=4, grad_dtype=g
            ),
            state,
            batch,
        )
        assert {x.dtype for x in jax.tree.leaves(new["params"])} == {jnp.dtype(jnp.float32)}
    with pytest.raises(ValueError, match="grad_dtype='float16'"):
        steps.train_step(state, batch, cfg=cfg, optimizer=opt, schedule=lambda t: 0.5, grad_dtype="float16")


def test_bfloat16_gradients_give_the_float32_step_closely():
    """With bfloat16 compute the forward pass is the same at bfloat16 params (the model casts its
    weights to bfloat16 anyway; the norms' scales start at exactly 1), so the loss is the same; the
    update differs by the bfloat16 rounding of the gradients and of their sum over micro-batches."""
    cfg = MPTConfig(d_model=64, n_heads=2, n_layers=2, vocab_size=96, max_seq_len=32, dtype="bfloat16")
    opt = optax.sgd(1.0)  # linear: the param change is minus the gradient
    state = steps.init_state(cfg, opt, jax.random.key(2))
    batch = _batch(jax.random.key(3), 8, 32, cfg.vocab_size)
    out = {}
    for grad_dtype, k in (("float32", 1), ("bfloat16", 1), ("bfloat16", 4)):
        fn = jax.jit(
            lambda s, b, g=grad_dtype, k=k: steps.train_step(
                s, b, cfg=cfg, optimizer=opt, schedule=lambda t: 1.0, micro_batches=k, grad_dtype=g
            )
        )
        out[grad_dtype, k] = fn(state, batch)
    ref_params, ref = out["float32", 1]
    before = jax.tree.leaves(state["params"])
    ref_change = [a - b for a, b in zip(jax.tree.leaves(ref_params["params"]), before, strict=True)]
    for k in (1, 4):
        new, m = out["bfloat16", k]
        np.testing.assert_allclose(m["loss"], ref["loss"], rtol=1e-6)
        np.testing.assert_allclose(m["grad_norm"], ref["grad_norm"], rtol=1e-2)
        for a, b, want in zip(jax.tree.leaves(new["params"]), before, ref_change, strict=True):
            got = np.asarray(a - b)
            # bfloat16 keeps 8 bits: each gradient within a few 2^-8 of its size, or of the leaf's scale
            scale = np.abs(np.asarray(want)).max()
            np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2 * scale)
        rel = np.sqrt(
            sum(
                float(jnp.sum((a - b - w) ** 2))
                for a, b, w in zip(jax.tree.leaves(new["params"]), before, ref_change, strict=True)
            )
        )
        rel /= np.sqrt(sum(float(jnp.sum(w**2)) for w in ref_change))
        assert 0 < rel < 1e-2, (k, rel)  # different (bfloat16), but by bfloat16's rounding only


def _dtypes_in(jaxpr) -> set:
    """Every dtype of every value in a jaxpr and the jaxprs inside it (scan bodies, remat, grads)."""
    out = set()
    for eqn in jaxpr.eqns:
        out |= {v.aval.dtype for v in (*eqn.invars, *eqn.outvars) if hasattr(v.aval, "dtype")}
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            out |= _dtypes_in(sub)
    return out


def test_float32_gradients_stay_float32_throughout():
    """The default (grad_dtype float32) of a float32 model has no narrower float anywhere in the
    step, with or without accumulation: the option adds nothing to the default path."""
    cfg = MPTConfig(d_model=32, n_heads=2, n_layers=2, vocab_size=64, max_seq_len=16)
    opt = optax.sgd(0.5)
    state = steps.init_state(cfg, opt, jax.random.key(4))
    batch = _batch(jax.random.key(5), 4, 16, cfg.vocab_size)
    for k in (1, 2):
        for grad_dtype in ("float32", "bfloat16"):
            jaxpr = jax.make_jaxpr(
                lambda s, b, k=k, g=grad_dtype: steps.train_step(
                    s, b, cfg=cfg, optimizer=opt, schedule=lambda t: 0.5, micro_batches=k, grad_dtype=g
                )
            )(state, batch)
            floats = {d for d in _dtypes_in(jaxpr.jaxpr) if jnp.issubdtype(d, jnp.floating)}
            assert floats == (
                {jnp.dtype(jnp.float32)} | ({jnp.dtype(jnp.bfloat16)} if grad_dtype == "bfloat16" else set())
            )


# ----------------------------------------------------------------------------------------------
# Finetuning: init_from a workdir, an HF folder or a converted checkpoint; ChatML data.


def _chat_file(path):
    with open(path, "w") as f:
        for i in range(40):
            messages = [
                {"role": "user", "content": f"What does len([0] * {i}) return?"},
                {"role": "assistant", "content": f"It returns {i}."},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")


def test_tiny_chat_finetunes_from_workdir_hf_and_converted(straight, stdlib_data_dir, tmp_path):
    from hf_utils import saved_hf_model

    chat = tmp_path / "chat.jsonl"
    _chat_file(chat)

    def finetune(init_from, name):
        workdir = str(tmp_path / name)
        done = run(
            train_cmd(
                workdir,
                stdlib_data_dir,
                f"--config.init_from={init_from}",
                f"--config.data.source=files:{chat}",
                "--config.train.seq_len=128",
                "--config.train.max_steps=6",
                "--config.checkpoint.every_steps=0",
                config="configs/tiny_chat.py",
            )
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert f"initialised params from {init_from}" in done.stderr
        return losses(workdir)

    from_workdir = finetune(straight, "ft_workdir")
    hf_dir = str(tmp_path / "hf")
    saved_hf_model(hf_dir, seed=0, d_model=64, n_heads=2, n_layers=2, max_seq_len=256, vocab_size=8256)
    converted = str(tmp_path / "converted")
    assert (
        subprocess.run([sys.executable, "-m", "mpt_jax.convert", "hf_to_jax", hf_dir, converted], cwd=ROOT).returncode
        == 0
    )
    from_hf, from_converted = finetune(hf_dir, "ft_hf"), finetune(converted, "ft_converted")
    assert from_hf == from_converted  # the same weights, by either route
    assert from_hf[1] != from_workdir[1]  # and not the pretraining run's
    assert all(np.isfinite(v) for v in from_workdir.values())

    small_vocab = str(tmp_path / "hf_small")
    saved_hf_model(small_vocab, seed=0, d_model=64, n_heads=2, n_layers=2, max_seq_len=256, vocab_size=100)
    bad = run(
        train_cmd(
            str(tmp_path / "bad"),
            stdlib_data_dir,
            f"--config.init_from={small_vocab}",
            f"--config.data.source=files:{chat}",
            config="configs/tiny_chat.py",
        )
    )
    assert bad.returncode != 0 and "does not fit config.model" in bad.stderr and "vocab_size: 100 -> 8256" in bad.stderr
    assert not os.path.exists(tmp_path / "bad")  # refused before anything was written
