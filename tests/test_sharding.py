"""Sharding: the same training on every mesh, across processes, and across meshes on resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import ml_collections
import numpy as np
import pytest

from mpt_jax import run_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SMALL = [
    "--config.model.d_model=64",
    "--config.model.n_layers=2",
    "--config.train.global_batch_size=8",
    "--config.train.seq_len=32",
    "--config.train.log_every=1",
    "--config.train.eval_every=0",
    "--config.train.progress=False",
    "--config.schedule.t_warmup=2",
    "--config.data.num_streams=2",
]


def train(workdir, data_dir, mesh, steps, devices, *extra, processes=1, every=0):
    cmd = [
        sys.executable,
        "-m",
        "mpt_jax.train",
        "--config=configs/tiny.py",
        f"--workdir={workdir}",
        f"--config.data.data_dir={data_dir}",
        f"--config.train.max_steps={steps}",
        f"--config.checkpoint.every_steps={every}",
        f"--config.mesh.data={mesh[0]}",
        f"--config.mesh.fsdp={mesh[1]}",
        f"--config.mesh.tensor={mesh[2]}",
        *SMALL,
        *extra,
    ]
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    if processes > 1:
        cmd = ["bash", "launch/local.sh", str(processes), str(devices)] + cmd
        env["XLA_FLAGS"] = ""
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return np.array([json.loads(line)["loss"] for line in f if "loss" in json.loads(line)])


def params(workdir, step):
    """The params of the newest checkpoint (which must be ``step``) as numpy, whatever mesh wrote it."""
    from mpt_jax.checkpoint import load_params_any

    newest = max(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    assert newest == step
    return [np.asarray(x) for x in __import__("jax").tree.leaves(load_params_any(workdir)[1])]


def assert_close_params(a, b, tol=1e-5):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x, y, atol=tol, rtol=0)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, stdlib_data_dir):
    """One device, 4 steps, checkpoint at 2 and 4."""
    workdir = str(tmp_path_factory.mktemp("one_device"))
    train(workdir, stdlib_data_dir, (1, 1, 1), 4, 1, every=2)
    return workdir


@pytest.mark.slow
@pytest.mark.parametrize("mesh", [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)])
def test_train_cli_same_on_every_mesh(reference, stdlib_data_dir, tmp_path, mesh):
    """--config.mesh.* overrides on 8 devices: the losses and params of one device, within 1e-5."""
    workdir = str(tmp_path / "run")
    train(workdir, stdlib_data_dir, mesh, 4, 8, every=4)
    np.testing.assert_allclose(losses(workdir), losses(reference), atol=1e-5, rtol=0)
    assert_close_params(params(workdir, 4), params(reference, 4))


@pytest.mark.slow
def test_checkpoint_from_one_mesh_resumes_on_another(reference, stdlib_data_dir, tmp_path):
    """Saved on (1, 8, 1) at step 2, resumed on (2, 2, 2) to step 4: the one-device run's numbers."""
    workdir = str(tmp_path / "reshard")
    train(workdir, stdlib_data_dir, (1, 8, 1), 2, 8, every=2)
    done = train(workdir, stdlib_data_dir, (2, 2, 2), 4, 8, every=4)
    assert "resumed from the checkpoint at step 2" in done.stderr
    np.testing.assert_allclose(losses(workdir), losses(reference), atol=1e-5, rtol=0)
    assert_close_params(params(workdir, 4), params(reference, 4))


@pytest.mark.slow
def test_two_processes_train_like_one_and_their_checkpoint_restores_in_one(reference, stdlib_data_dir, tmp_path):
    """launch/local.sh: 2 processes x 4 CPU devices (jax.distributed over 127.0.0.1) = 1 process x 8."""
    workdir = str(tmp_path / "two")
    done = train(workdir, stdlib_data_dir, (2, 2, 2), 2, 4, processes=2, every=2)
    assert "process 0 of 2; 4 local / 8 global devices" in done.stderr
    np.testing.assert_allclose(losses(workdir), losses(reference)[:2], atol=1e-5, rtol=0)
    # The checkpoint the two processes wrote together resumes in one process (8 devices).
    done = train(workdir, stdlib_data_dir, (2, 2, 2), 4, 8, every=4)
    assert "resumed from the checkpoint at step 2" in done.stderr
    np.testing.assert_allclose(losses(workdir), losses(reference), atol=1e-5, rtol=0)
    assert_close_params(params(workdir, 4), params(reference, 4))


def run_on_8_devices(tmp_path, source: str) -> dict:
    """Runs a script (which writes JSON to argv[1]) in a process with 8 CPU devices; its output."""
    script = tmp_path / "script.py"
    script.write_text(source)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "out.json")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads((tmp_path / "out.json").read_text())


SHARDED_STEP = textwrap.dedent(
    """
    import json, sys
    import jax, numpy as np, flax.linen as nn
    from mpt_jax import MPTConfig, sharding, steps
    cfgs = {
        "mha": MPTConfig(d_model=64, n_heads=4, n_layers=2, vocab_size=128, max_seq_len=32),
        "gqa": MPTConfig(d_model=64, n_heads=8, n_layers=2, vocab_size=128, max_seq_len=32,
                         attn_type="grouped_query_attention", kv_n_heads=2),
        "mqa": MPTConfig(d_model=64, n_heads=4, n_layers=2, vocab_size=128, max_seq_len=32,
                         attn_type="multiquery_attention"),
    }
    import optax
    opt = optax.sgd(0.5)  # linear in the gradients: compares them, not Adam's amplified rounding
    sched = lambda t: 0.5
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 128, (8, 32)).astype(np.int32)
    batch = {"tokens": tokens, "segment_ids": np.ones_like(tokens), "positions": np.tile(np.arange(32), (8, 1)),
             "loss_mask": np.ones_like(tokens)}
    out = {}
    for name, cfg in cfgs.items():
        for mesh_shape in [(1, 1, 1), (8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)]:
            devices = jax.devices()[: int(np.prod(mesh_shape))]
            mesh = sharding.make_mesh(mesh_shape, devices=devices)
            shard = sharding.state_shardings(cfg, opt, mesh)
            with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
                state = jax.jit(lambda r: steps.init_state(cfg, opt, r), out_shardings=shard)(jax.random.key(0))
                step = jax.jit(lambda s, b: steps.train_step(s, b, cfg=cfg, optimizer=opt, schedule=sched),
                               in_shardings=(shard, sharding.batch_sharding(mesh)), out_shardings=(shard, None))
                losses = []
                for _ in range(3):
                    state, m = step(state, batch)
                    losses.append(float(m["loss"]))
            specs = {"/".join(str(getattr(k, "key", k)) for k in p): str(s.spec) for p, s in jax.tree_util.tree_flatten_with_path(shard["params"])[0]}
            out[f"{name} {mesh_shape}"] = {"losses": losses,
                                           "params": [np.asarray(x).tolist() for x in jax.tree.leaves(state["params"])],
                                           "specs": specs}
    json.dump(out, open(sys.argv[1], "w"))
    """
)


@pytest.mark.slow
def test_sharded_train_step_matches_one_device_with_mha_gqa_mqa(tmp_path):
    """The jitted step under each mesh's shardings equals one device (1e-5), also when kv heads are
    fewer than the tensor axis (GQA 2 kv heads on tensor 4, MQA): those stay replicated."""
    out = run_on_8_devices(tmp_path, SHARDED_STEP)
    for name in ("mha", "gqa", "mqa"):
        ref = out[f"{name} (1, 1, 1)"]
        for mesh in ("(8, 1, 1)", "(1, 8, 1)", "(2, 2, 2)", "(1, 2, 4)"):
            got = out[f"{name} {mesh}"]
            np.testing.assert_allclose(got["losses"], ref["losses"], atol=1e-5, rtol=0)
            for a, b in zip(got["params"], ref["params"], strict=True):
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)
    gqa = out["gqa (1, 2, 4)"]["specs"]
    assert gqa["blocks/attn/Wq/kernel"] == "P(None, 'fsdp', 'tensor', None)"
    assert gqa["blocks/attn/Wkv/kernel"] == "P(None, 'fsdp', None, None, None)"  # 2 kv heads, tensor 4
    assert out["mha (1, 8, 1)"]["specs"]["blocks/ffn/up_proj/kernel"] == "P(None, 'fsdp', None)"


def _config(**mesh):
    from mpt_jax.run_config import base_config

    c = base_config()
    c.model = ml_collections.ConfigDict(dict(c.model.to_dict(), d_model=64, n_heads=4, n_layers=2, vocab_size=128))
    c.train.global_batch_size = 8
    c.train.seq_len = 32
    for k, v in mesh.items():
        c.mesh[k] = v
    return c


@pytest.mark.parametrize(
    "changes, devices, match",
    [
        (dict(data=2, fsdp=2, tensor=1), 8, r"multiplies to 4, not the 8 devices"),
        (dict(data=1, fsdp=1, tensor=8), 8, r"n_heads=4 is not divisible by config.mesh.tensor=8"),
        (
            dict(data=16, fsdp=1, tensor=1),
            16,
            r"global_batch_size=8 is not divisible by the data x fsdp mesh axes \(16 x 1\)",
        ),
        (dict(data=-1, fsdp=-1, tensor=1), 8, r"at most one axis may be -1"),
        (dict(data=3, fsdp=-1, tensor=1), 8, r"8 devices are not divisible by 3"),
        (dict(data=4, dcn_data=3), 4, r"dcn_data=3 must divide config.mesh.data=4"),
    ],
)
def test_bad_meshes_are_clear_errors(changes, devices, match):
    with pytest.raises(ValueError, match=match):
        run_config.check(_config(**changes), devices)


def test_micro_batches_must_divide_the_batch():
    c = _config(data=1, fsdp=1, tensor=1)
    c.train.micro_batch_size = 3
    with pytest.raises(ValueError, match=r"micro_batch_size=3 does not divide config.train.global_batch_size=8"):
        run_config.check(c, 1)


PALLAS_SHARDED = textwrap.dedent(
    """
    import json, sys
    import jax, numpy as np, flax.linen as nn, optax
    from mpt_jax import MPTConfig, sharding, steps
    out = {}
    for impl, mesh_shape in [("xla", (1, 1, 1)), ("pallas", (2, 1, 4)), ("pallas", (1, 2, 4)), ("pallas", (8, 1, 1))]:
        cfg = MPTConfig(d_model=64, n_heads=4, n_layers=1, vocab_size=128, max_seq_len=64, attn_impl=impl,
                        attn_uses_sequence_id=True)
        opt = optax.sgd(0.5)
        tokens = np.random.default_rng(0).integers(0, 128, (8, 64)).astype(np.int32)
        seg = np.ones_like(tokens)
        seg[:, 40:] = 2
        batch = {"tokens": tokens, "segment_ids": seg, "positions": np.tile(np.arange(64), (8, 1)),
                 "loss_mask": np.ones_like(tokens)}
        mesh = sharding.make_mesh(mesh_shape, devices=jax.devices()[: int(np.prod(mesh_shape))])
        shard = sharding.state_shardings(cfg, opt, mesh)
        with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
            state = jax.jit(lambda r: steps.init_state(cfg, opt, r), out_shardings=shard)(jax.random.key(0))
            step = jax.jit(lambda s, b: steps.train_step(s, b, cfg=cfg, optimizer=opt, schedule=lambda t: 0.5),
                           in_shardings=(shard, sharding.batch_sharding(mesh)), out_shardings=(shard, None))
            losses = []
            for _ in range(2):
                state, m = step(state, batch)
                losses.append(float(m["loss"]))
        out[f"{impl} {mesh_shape}"] = {"losses": losses,
                                       "params": [np.asarray(x).tolist() for x in jax.tree.leaves(state["params"])]}
    json.dump(out, open(sys.argv[1], "w"))
    """
)


@pytest.mark.slow
def test_pallas_attention_in_the_sharded_train_step(tmp_path):
    """attn_impl='pallas' (interpret mode here) inside the jitted, sharded step: the kernel runs per
    shard (rows over data x fsdp, heads over tensor with their global ALiBi slopes) and matches the
    xla path on one device, packed segments included."""
    out = run_on_8_devices(tmp_path, PALLAS_SHARDED)
    ref = out["xla (1, 1, 1)"]
    for mesh in ("(2, 1, 4)", "(1, 2, 4)", "(8, 1, 1)"):
        got = out[f"pallas {mesh}"]
        np.testing.assert_allclose(got["losses"], ref["losses"], atol=1e-5, rtol=0)
        for a, b in zip(got["params"], ref["params"], strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)
