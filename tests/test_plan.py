"""The memory planner (mpt_jax/plan.py) and the launch scripts (launch/).

Exact parts (params, optimizer state, batch) are checked against the parameter count and against
XLA's argument sizes; the activation formula against jax's own list of saved residuals (exactly)
and against XLA's buffer assignment of the compiled train step (within the factors that
docs/sharding.md states). Compiles run in a subprocess with 8 forced CPU devices.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest

from mpt_jax import optim, plan, sharding
from mpt_jax.config import MPTConfig
from mpt_jax.run_config import base_config, model_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_30B = 29_957_200_896


def _load(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"config_{name}", os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _small(**model) -> object:
    c = base_config()
    fields = dict(d_model=64, n_heads=4, n_layers=2, max_seq_len=64, vocab_size=512)
    fields.update(model)
    c.model = MPTConfig(**fields).to_config_dict()
    c.train.global_batch_size = 8
    c.train.seq_len = 64
    c.train.max_steps = 10
    c.schedule.t_warmup = 1
    return c


# ------------------------------------------------------------------------------------------------
# Exact sizes.


def test_30b_params_optimizer_and_grads_per_device():
    config = _load("30b")
    for fsdp in (8, 64):
        est = plan.estimate(config, (1, fsdp, 1))
        assert est["params"] == 4 * N_30B // fsdp  # float32 masters, every leaf divisible by fsdp
        assert est["opt_state"] == 2 * est["params"] + 4  # AdamW mu and nu, plus the int32 count
        assert est["grads"] == est["params"]  # no accumulation at micro_batch_size=0
    # data replicates, tensor splits heads/MLP/vocab but not the norms' [layers, d_model] scales.
    assert plan.estimate(config, (8, 1, 1))["params"] == 4 * N_30B
    norms = 2 * 48 * 7168 + 7168  # norm_1, norm_2 per layer, norm_f
    assert plan.estimate(config, (1, 4, 2))["params"] == 4 * ((N_30B - norms) // 8 + norms // 4)


def test_7b_and_lion_and_bf16_params():
    config = _load("7b")
    n = sum(int(x.size) for x in jax.tree.leaves(plan._model_of(config).params))
    assert 6.6e9 < n < 6.7e9
    assert plan.estimate(config, (1, 16, 1))["params"] == 4 * n // 16
    config.optimizer.name = "decoupled_lionw"
    config.optimizer.b2 = 0.99
    lion = plan.estimate(config, (1, 16, 1))
    assert lion["opt_state"] == lion["params"] + 4  # one float32 moment
    config.model.param_dtype = "bfloat16"
    bf16 = plan.estimate(config, (1, 16, 1))
    assert bf16["params"] == 2 * n // 16
    assert bf16["opt_state"] == 4 * n // 16 + 4  # moments stay float32
    assert bf16["grads"] == 4 * n // 16  # gradients are accumulated in float32


def test_planner_specs_are_sharding_py_specs():
    """plan.py reuses sharding._spec_for on cached shapes; it must place leaves as sharding.py does."""
    for config, shape in (
        (_small(attn_type="grouped_query_attention", kv_n_heads=2), (2, 2, 2)),
        (_load("30b"), (1, 4, 2)),
    ):
        cfg = model_config(config)
        mesh = plan._abstract_mesh(shape)
        rules = sharding.rules_from_config(config)
        optimizer = optim.make_optimizer(config.optimizer, config.schedule, max_steps=config.train.max_steps)
        want = sharding.state_shardings(cfg, optimizer, mesh, rules)
        got = plan._state_shardings(plan._model_of(config), mesh, rules)
        assert jax.tree.map(lambda s: s.spec, got) == jax.tree.map(lambda s: s.spec, want)


def test_batch_rows_and_accumulation():
    config = _load("30b")
    config.train.micro_batch_size = 512
    rows, steps = plan._rows_per_device(config, (1, 64, 1))
    assert (rows, steps) == (8, 4)
    est = plan.estimate(config, (1, 64, 1))
    assert est["grads"] == 2 * est["params"]  # the float32 sum and one micro-batch's gradients
    assert est["batch"] == 2 * 4 * 32 * 2048 + 12  # tokens + loss_mask rows of this device, step, rng
    assert est["total"] == sum(est[k] for k in ("params", "opt_state", "batch", "grads", "activations", "margin"))
    assert est["activations"] == est["act_saved"] + max(est["act_layer"], est["act_head"])


@pytest.mark.parametrize(
    "model",
    [
        dict(),
        dict(dtype="bfloat16"),
        dict(attn_type="grouped_query_attention", kv_n_heads=2, ffn_type="mptglu", ffn_act_fn="silu"),
        dict(attn_type="multiquery_attention", dtype="bfloat16", qk_ln=True, clip_qkv=6.0),
        dict(attn_impl="pallas", dtype="bfloat16", attn_type="grouped_query_attention", kv_n_heads=2),
    ],
    ids=["f32", "bf16", "gqa-glu", "mqa-qkln-clip", "pallas-gqa"],
)
def test_saved_activations_formula_is_jax_residuals(model):
    """act_saved is exactly what jax keeps for the backward of the layers (unsharded), per policy."""
    residuals = pytest.importorskip("jax._src.ad_checkpoint").saved_residuals
    from mpt_jax import steps
    from mpt_jax.model import init_params

    # The pallas kernels take head_dim 64/112/128 and pad the length to their block size.
    d, length = (256, 128) if model.get("attn_impl") == "pallas" else (48, 40)
    for policy in ("none", "full", "dots", "dots_no_batch"):
        config = _small(n_layers=3, d_model=d, max_seq_len=length, remat_policy=policy, **model)
        config.train.global_batch_size, config.train.seq_len = 2, length
        cfg = model_config(config)
        params = jax.eval_shape(lambda cfg=cfg: init_params(cfg, jax.random.key(0)))
        names = ("tokens", "segment_ids", "positions", "loss_mask")
        batch = {k: jax.ShapeDtypeStruct((2, length), jnp.int32) for k in names}
        saved = residuals(lambda p, b, cfg=cfg: steps.loss_fn(p, b, cfg, train=True)[0], params, batch)
        got = sum(math.prod(a.shape) * a.dtype.itemsize for a, why in saved if "output of scan" in why)
        want = plan.estimate(config, (1, 1, 1))["act_saved"]
        assert abs(got - want) <= 0.001 * got, (policy, got, want)


def test_attention_path_changes_the_activations():
    config = _load("30b")
    config.train.micro_batch_size = 512
    xla = plan.estimate(config, (1, 64, 1))
    config.model.attn_impl = "pallas"
    flash = plan.estimate(config, (1, 64, 1))
    assert flash["act_saved"] == xla["act_saved"]  # remat full: only the layer inputs
    assert flash["act_layer"] < xla["act_layer"] / 2  # no [rows, heads, T, T] scores
    config.model.attn_impl = "auto"
    assert plan.estimate(config, (1, 64, 1), platform="gpu")["act_layer"] == flash["act_layer"]
    assert plan.estimate(config, (1, 64, 1), platform="tpu")["act_layer"] == xla["act_layer"]


# ------------------------------------------------------------------------------------------------
# Meshes and errors.


def test_mesh_enumeration_respects_divisibility():
    assert sorted(plan.mesh_shapes(8)) == sorted(
        [(a, b, 8 // (a * b)) for a in (1, 2, 4, 8) for b in (1, 2, 4, 8) if 8 % (a * b) == 0]
    )
    assert len(plan.mesh_shapes(64)) == 28
    config = _small(n_heads=4)  # a tensor axis of 8 does not divide 4 heads
    config.train.global_batch_size = 4  # a data x fsdp of 8 does not divide 4 rows
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 2, -1
    report = plan.plan(config, 8, 80.0)
    shapes = [m["mesh"] for m in report["meshes"]]
    assert all(math.prod(s) == 8 for s in shapes)
    assert all(4 % t == 0 and 4 % (d * f) == 0 for d, f, t in shapes)
    assert sorted(shapes) == [(1, 2, 4), (1, 4, 2), (2, 1, 4), (2, 2, 2), (4, 1, 2)]
    assert [m["mesh"] for m in report["meshes"] if m["configured"]] == [(1, 2, 4)] == [report["mesh"]]
    config.train.micro_batch_size = 2  # micro-batches must split over data x fsdp too
    assert sorted(m["mesh"] for m in plan.plan(config, 8, 80.0)["meshes"]) == [(1, 2, 4), (2, 1, 4)]


def test_plan_configured_mesh_marked_and_fits():
    config = _load("30b")
    config.train.micro_batch_size = 512
    report = plan.plan(config, 64, 80.0)
    assert report["mesh"] == (1, 64, 1) and report["fits"]
    assert [m["configured"] for m in report["meshes"]].count(True) == 1
    assert report["meshes"][0]["total"] <= report["meshes"][-1]["total"]
    assert report["max_micro_batch_size"] >= 512
    assert not plan.plan(_load("30b"), 64, 80.0)["fits"]  # the whole 2048-row batch at once does not


def test_bad_inputs_raise_clear_errors():
    config = _small()
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
    with pytest.raises(ValueError, match=r"multiplies to 8, not the 4 devices"):
        plan.plan(config, 4, 80.0)
    config.mesh.data, config.mesh.tensor = 1, 3
    with pytest.raises(ValueError, match=r"n_heads=4 is not divisible by config.mesh.tensor=3"):
        plan.plan(config, 6, 80.0)
    config.mesh.fsdp, config.mesh.tensor = 16, 1
    with pytest.raises(ValueError, match=r"global_batch_size=8 is not divisible"):
        plan.plan(config, 16, 80.0)
    with pytest.raises(ValueError, match=r"device_memory_gb"):
        plan.plan(_small(), 8, 0.0)
    with pytest.raises(ValueError, match=r"three positive sizes"):
        plan.estimate(_small(), (8, 1))


# ------------------------------------------------------------------------------------------------
# XLA's buffer assignment and the CLI (subprocesses with 8 forced CPU devices).

_XLA_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from mpt_jax import plan
    from mpt_jax.config import MPTConfig
    from mpt_jax.run_config import base_config

    def config(model, batch, seq, micro, mesh):
        c = base_config()
        c.model = MPTConfig(**model).to_config_dict()
        c.train.update(dict(global_batch_size=batch, seq_len=seq, micro_batch_size=micro, max_steps=10))
        c.schedule.t_warmup = 1
        c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
        return c

    tiny = dict(d_model=256, n_heads=4, n_layers=2, max_seq_len=128, vocab_size=8256)
    wide = dict(d_model=7168, n_heads=64, n_layers=2, max_seq_len=2048, vocab_size=50432, dtype="bfloat16")
    cases = [
        ("tiny none 111", dict(tiny, remat_policy="none"), 8, 128, 0, (1, 1, 1)),
        ("tiny full 111", dict(tiny, remat_policy="full"), 8, 128, 0, (1, 1, 1)),
        ("tiny none 181", dict(tiny, remat_policy="none"), 8, 128, 0, (1, 8, 1)),
        ("tiny full 181 accum", dict(tiny, remat_policy="full"), 16, 128, 8, (1, 8, 1)),
        ("tiny dots 222", dict(tiny, remat_policy="dots"), 8, 128, 0, (2, 2, 2)),
        ("30b-width 2 layers full 181", dict(wide, remat_policy="full"), 8, 2048, 8, (1, 8, 1)),
    ]
    out = {}
    for name, model, batch, seq, micro, mesh in cases:
        c = config(model, batch, seq, micro, mesh)
        est = plan.estimate(c, mesh)
        xla = plan.compile_report(c, mesh)
        out[name] = dict(est=est, xla={k: v for k, v in xla.items() if k != "mesh"})
    json.dump(out, sys.stdout)
    """
)


def _run(args, *, devices: int | None = 8, timeout=600) -> subprocess.CompletedProcess:
    """``python args`` in the repo, on ``devices`` forced CPU devices (None: as the CLI asks for)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    if devices is not None:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="module")
def xla_results():
    proc = _run(["-c", _XLA_SCRIPT])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_xla_argument_bytes_are_the_planned_state_exactly(xla_results):
    for name, r in xla_results.items():
        est, xla = r["est"], r["xla"]
        assert xla["argument"] == est["params"] + est["opt_state"] + est["batch"], name
        assert xla["alias"] >= est["params"] + est["opt_state"], name  # the donated state is reused


def test_xla_temp_bytes_agree_with_the_formula(xla_results):
    """XLA's temporaries over gradients + activations (no margin): within [0.85, 1.25] (docs/sharding.md)."""
    ratios = {}
    for name, r in xla_results.items():
        est, xla = r["est"], r["xla"]
        ratios[name] = xla["temp"] / (est["grads"] + est["activations"])
    assert all(0.85 <= v <= 1.25 for v in ratios.values()), ratios
    # and the margin covers XLA on these (the planner's total is an upper bound here)
    for name, r in xla_results.items():
        est, xla = r["est"], r["xla"]
        assert xla["argument"] + xla["temp"] <= est["total"] * 1.1, name


def test_cli_fits_and_does_not_fit():
    base = ["-m", "mpt_jax.plan", "--config=configs/30b.py", "--devices=64", "--device_memory_gb=80"]
    proc = _run(base, devices=1)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "=> does not fit in 80 GiB" in proc.stdout
    assert "largest train.micro_batch_size that fits on this mesh: " in proc.stdout
    assert "  *     1    64      1" in proc.stdout  # the configured mesh, marked
    proc = _run([*base, "--config.train.micro_batch_size=512"], devices=1)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "=> fits in 80 GiB" in proc.stdout


def test_cli_bad_input_exits_with_the_reason():
    proc = _run(["-m", "mpt_jax.plan", "--config=configs/tiny.py", "--devices=6", "--config.mesh.tensor=3"], devices=1)
    assert proc.returncode != 0
    assert "plan: error: config.model.n_heads=4 is not divisible by config.mesh.tensor=3" in proc.stderr


def test_cli_compiles_the_full_30b_step_on_8_cpu_devices():
    """30B readiness: the real 48-layer train step (seq 2048, batch 8, remat full, bf16) compiles for
    an 8-way FSDP mesh on abstract inputs; about 10 s and 0.5 GB of host memory here."""
    args = [
        "-m",
        "mpt_jax.plan",
        "--config=configs/30b.py",
        "--devices=8",
        "--config.train.global_batch_size=8",
        "--config.train.micro_batch_size=8",
        "--compile",
    ]
    proc = _run(args, devices=None)  # --compile asks for the 8 CPU devices itself
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "=> fits in 80 GiB" in out
    assert "XLA on cpu, mesh (1, 8, 1)" in out
    line = next(x for x in out.splitlines() if x.strip().startswith("arguments = params"))
    assert line.split()[-1] == "1.000"
    line = next(x for x in out.splitlines() if x.strip().startswith("temporaries = gradients"))
    assert 0.8 <= float(line.split()[-1]) <= 1.25


# ------------------------------------------------------------------------------------------------
# Launch scripts.


def test_launch_yaml_parses_as_a_jobset():
    yaml = pytest.importorskip("yaml")
    with open(os.path.join(ROOT, "launch", "k8s", "jobset.yaml"), encoding="utf-8") as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    jobset = next(d for d in docs if d["kind"] == "JobSet")
    assert jobset["apiVersion"].startswith("jobset.x-k8s.io/")
    job = jobset["spec"]["replicatedJobs"][0]
    spec = job["template"]["spec"]
    assert spec["completionMode"] == "Indexed" and spec["parallelism"] == spec["completions"]
    container = spec["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert {"JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"} <= set(env)
    assert "job-completion-index" in json.dumps(env["JAX_PROCESS_ID"])
    assert str(spec["parallelism"]) == str(env["JAX_NUM_PROCESSES"]["value"])
    assert "mpt_jax.train" in " ".join(container.get("command", []) + container.get("args", []))


@pytest.mark.parametrize("script", ["slurm.sbatch", "tpu_vm.sh"])
def test_launch_shell_syntax(script):
    path = os.path.join(ROOT, "launch", script)
    proc = subprocess.run(["bash", "-n", path], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    with open(path, encoding="utf-8") as f:
        text = f.read()
    assert text.startswith("#!/bin/bash") and "mpt_jax.train" in text
