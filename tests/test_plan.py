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
import time

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


def test_bfloat16_gradients_per_device():
    """train.grad_dtype=bfloat16 holds the micro-batch's gradients, their sum and the params'
    bfloat16 copy, each half a float32 set; bfloat16 params need no copy."""
    config = _load("30b")
    config.train.grad_dtype = "bfloat16"
    half = 2 * N_30B // 8  # every leaf divides by 8
    config.train.global_batch_size, config.train.micro_batch_size = 16, 8
    accumulating = plan.estimate(config, (1, 8, 1))
    assert accumulating["grads"] == 3 * half
    config.train.micro_batch_size = 16
    assert plan.estimate(config, (1, 8, 1))["grads"] == 2 * half
    f32_config = _load("30b")
    f32_config.train.global_batch_size = 16
    float32 = plan.estimate(f32_config, (1, 8, 1))
    # One layer's gradients are formed in bfloat16 too: 12 d^2 + 2 d float32 elements become bfloat16.
    assert float32["act_layer"] - plan.estimate(config, (1, 8, 1))["act_layer"] == 2 * (12 * 7168**2 + 2 * 7168)
    config.model.param_dtype = "bfloat16"
    config.train.micro_batch_size = 8
    assert plan.estimate(config, (1, 8, 1))["grads"] == 2 * half


def test_planner_specs_are_sharding_py_specs():
    """plan.py places cached shapes with sharding.shardings_of_state; the same specs as the trainer's."""
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
        # The layers' scan and the final norm's input (a bfloat16 one kept as its bits, ops.to_bits);
        # the loss' own scan over chunks of positions is the head's business.
        layers = [a for a, why in saved if ("output of scan" in why and "MPT.__call__" in why) or "(to_bits)" in why]
        got = sum(math.prod(a.shape) * a.dtype.itemsize for a in layers)
        want = plan.estimate(config, (1, 1, 1))["act_saved"]
        assert abs(got - want) <= 0.001 * got, (policy, got, want)


def test_attention_path_changes_the_activations():
    config = _load("30b")
    config.train.micro_batch_size = 512
    xla = plan.estimate(config, (1, 64, 1))
    config.model.attn_impl = "pallas"
    flash = plan.estimate(config, (1, 64, 1))
    assert flash["act_saved"] == xla["act_saved"]  # remat full: only the layer inputs
    # Both keep the attention's output and log-sum-exp; the xla path's backward also holds the
    # float32 [rows, heads, T, T] probabilities (8 rows of 64 heads here) where a kernel holds dq, dk, dv.
    n = 8 * 2048
    assert xla["act_layer"] - flash["act_layer"] == 4 * 8 * 64 * 2048**2 - 4 * n * 3 * 7168
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


def test_mesh_problems_are_the_trainers_checks():
    """plan.mesh_problems asks run_config.problems (what Trainer checks) of the config on that mesh."""
    from mpt_jax import run_config

    config = _small(n_heads=4)
    config.train.micro_batch_size = 2
    for mesh in plan.mesh_shapes(8):
        trial = config.copy_and_resolve_references()
        trial.mesh.data, trial.mesh.fsdp, trial.mesh.tensor = mesh
        assert plan.mesh_problems(config, mesh) == run_config.problems(trial, 8)
        if run_config.problems(trial, 8):
            with pytest.raises(ValueError) as e:
                run_config.check(trial, 8)
            assert str(e.value) == run_config.problems(trial, 8)[0]
    assert plan.mesh_problems(config, (1, 1, 8)) == ["config.model.n_heads=4 is not divisible by config.mesh.tensor=8"]
    assert plan.mesh_problems(config, (4, 1, 2)) == [
        "config.train.micro_batch_size=2 is not divisible by the data x fsdp mesh axes (4 x 1)"
    ]


GiB = 1024**3


def _fits(config, mesh, limit) -> list[int]:
    """Every micro-batch size that divides the batch, splits over data x fsdp and fits (by estimate)."""
    ways, batch = mesh[0] * mesh[1], config.train.global_batch_size
    out = []
    for micro in range(ways, batch + 1, ways):
        if batch % micro == 0:
            trial = config.copy_and_resolve_references()
            trial.train.micro_batch_size = micro
            if plan.estimate(trial, mesh)["total"] <= limit:
                out.append(micro)
    return out


def test_when_nothing_fits_the_plan_computes_more_devices_and_bf16_params():
    config = _load("7b")  # fsdp=-1, float32 params, bfloat16 compute, remat full
    report = plan.plan(config, 2, 65.0)
    assert report["max_micro_batch_size"] == 0 and _fits(config, (1, 2, 1), 65 * GiB) == []
    remedies = {r["change"].split("=")[0]: r for r in report["remedies"]}
    # The fewest devices (growing the -1 fsdp axis) on which a micro-batch fits, and the largest one.
    more = remedies["--devices"]
    n = more["devices"]
    assert more["mesh"] == (1, n, 1) and more["change"] == f"--devices={n}"
    assert _fits(config, (1, n, 1), 65 * GiB)[-1] == more["micro_batch_size"]
    assert all(not _fits(config, (1, m, 1), 65 * GiB) for m in range(3, n) if 1024 % m == 0)
    # bfloat16 params on the same mesh (compute is bfloat16 already, remat already full).
    bf16 = remedies["--config.model.param_dtype"]
    assert bf16["change"] == "--config.model.param_dtype=bfloat16"
    config.model.param_dtype = "bfloat16"
    fits = _fits(config, (1, 2, 1), 65 * GiB)
    assert fits and fits[-1] == bf16["micro_batch_size"]
    config.train.micro_batch_size = bf16["micro_batch_size"]
    assert plan.estimate(config, (1, 2, 1))["total"] == bf16["total"]
    # bfloat16 gradients (and their sum), or a bfloat16 first moment, each on its own.
    assert set(remedies) == {
        "--devices",
        "--config.model.param_dtype",
        "--config.train.grad_dtype",
        "--config.optimizer.mu_dtype",
    }
    for flag, (section, key) in (
        ("--config.train.grad_dtype", ("train", "grad_dtype")),
        ("--config.optimizer.mu_dtype", ("optimizer", "mu_dtype")),
    ):
        r = remedies[flag]
        assert r["change"] == f"{flag}=bfloat16"
        trial = _load("7b")
        trial[section][key] = "bfloat16"
        assert _fits(trial, (1, 2, 1), 65 * GiB)[-1] == r["micro_batch_size"]


def test_when_nothing_fits_the_plan_computes_another_mesh():
    config = _load("7b")
    config.mesh.data, config.mesh.fsdp = -1, 1  # pure data parallel: every device holds the whole state
    report = plan.plan(config, 8, 80.0)
    assert report["max_micro_batch_size"] == 0
    mesh = next(r for r in report["remedies"] if r["change"].startswith("--config.mesh."))
    best = {m["mesh"]: _fits(config, m["mesh"], 80 * GiB) for m in report["meshes"] if not m["configured"]}
    assert mesh["micro_batch_size"] == max(f[-1] for f in best.values() if f)
    assert best[mesh["mesh"]][-1] == mesh["micro_batch_size"]
    assert mesh["change"] == " ".join(
        f"--config.mesh.{a}={s}" for a, s in zip(("data", "fsdp", "tensor"), mesh["mesh"], strict=True)
    )
    text = plan.format_plan(report, config)
    assert f"{mesh['change']} (mesh {mesh['mesh']}): micro-batch {mesh['micro_batch_size']} fits" in text


def test_cheaper_settings_are_offered_together_when_none_alone_is_enough():
    config = _load("1b")
    config.model.dtype, config.model.remat_policy = "float32", "none"
    report = plan.plan(config, 8, 4.5)
    assert report["max_micro_batch_size"] == 0
    changes = (
        ("model", "param_dtype", "bfloat16"),
        ("model", "dtype", "bfloat16"),
        ("model", "remat_policy", "full"),
        ("train", "grad_dtype", "bfloat16"),
        ("optimizer", "mu_dtype", "bfloat16"),
    )
    for section, key, value in changes:
        trial = config.copy_and_resolve_references()
        trial[section][key] = value
        assert _fits(trial, (1, 8, 1), 4.5 * GiB) == []
    (together,) = report["remedies"]
    assert together["change"] == " ".join(f"--config.{s}.{k}={v}" for s, k, v in changes)
    for section, key, value in changes:
        config[section][key] = value
    assert _fits(config, (1, 8, 1), 4.5 * GiB)[-1] == together["micro_batch_size"]


def test_when_nothing_at_all_fits_the_plan_says_so():
    report = plan.plan(_load("30b"), 8, 1.0)
    assert report["max_micro_batch_size"] == 0 and report["remedies"] == []
    assert "nothing this planner tries" in plan.format_plan(report, _load("30b"))


# ------------------------------------------------------------------------------------------------
# XLA's buffer assignment and the CLI (subprocesses with 8 forced CPU devices).

_XLA_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from mpt_jax import plan
    from mpt_jax.config import MPTConfig
    from mpt_jax.run_config import base_config

    def config(model, batch, seq, micro, mesh, grad_dtype="float32"):
        c = base_config()
        c.model = MPTConfig(**model).to_config_dict()
        c.train.update(dict(global_batch_size=batch, seq_len=seq, micro_batch_size=micro, max_steps=10))
        c.train.grad_dtype = grad_dtype
        c.schedule.t_warmup = 1
        c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
        return c

    tiny = dict(d_model=256, n_heads=4, n_layers=2, max_seq_len=128, vocab_size=8256)
    wide = dict(d_model=7168, n_heads=64, n_layers=2, max_seq_len=2048, vocab_size=50432, dtype="bfloat16")
    full = dict(wide, n_layers=48, remat_policy="full")
    cases = [
        ("tiny none 111", dict(tiny, remat_policy="none"), 8, 128, 0, (1, 1, 1)),
        ("tiny full 111", dict(tiny, remat_policy="full"), 8, 128, 0, (1, 1, 1)),
        ("tiny none 181", dict(tiny, remat_policy="none"), 8, 128, 0, (1, 8, 1)),
        ("tiny full 181 accum", dict(tiny, remat_policy="full"), 16, 128, 8, (1, 8, 1)),
        ("tiny dots 222", dict(tiny, remat_policy="dots"), 8, 128, 0, (2, 2, 2)),
        ("30b-width 2 layers full 181", dict(wide, remat_policy="full"), 8, 2048, 8, (1, 8, 1)),
        # The full 30B accumulating 2 micro-batches, compiled as for a GPU run (compile_report's platform).
        ("30b accum float32 181 gpu", full, 16, 2048, 8, (1, 8, 1), "float32", "gpu"),
        ("30b accum bfloat16 181 gpu", full, 16, 2048, 8, (1, 8, 1), "bfloat16", "gpu"),
    ]
    out = {}
    for name, model, batch, seq, micro, mesh, *more in cases:
        grad_dtype, platform = more or ("float32", None)
        c = config(model, batch, seq, micro, mesh, grad_dtype)
        est = plan.estimate(c, mesh)
        xla = plan.compile_report(c, mesh, platform=platform)
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


@pytest.mark.slow
def test_xla_argument_bytes_are_the_planned_state_exactly(xla_results):
    for name, r in xla_results.items():
        est, xla = r["est"], r["xla"]
        assert xla["argument"] == est["params"] + est["opt_state"] + est["batch"], name
        assert xla["alias"] >= est["params"] + est["opt_state"], name  # the donated state is reused


@pytest.mark.slow
def test_xla_temp_bytes_agree_with_the_formula(xla_results):
    """XLA's temporaries over gradients + activations (no margin): within [0.75, 1.25] (docs/sharding.md;
    XLA:CPU's memory-optimized scheduler, which float32 steps on CPU compile with, packs the tiny
    (1, 8, 1) step into 0.77 of the formula)."""
    ratios = {}
    for name, r in xla_results.items():
        est, xla = r["est"], r["xla"]
        ratios[name] = xla["temp"] / (est["grads"] + est["activations"])
    assert all(0.75 <= v <= 1.25 for v in ratios.values()), ratios
    # and the margin covers XLA on these (the planner's total is an upper bound here)
    for name, r in xla_results.items():
        est, xla = r["est"], r["xla"]
        assert xla["argument"] + xla["temp"] <= est["total"] * 1.1, name


@pytest.mark.slow
def test_xla_bfloat16_gradients_lower_the_compiled_peak_of_accumulation(xla_results):
    """The full 30B accumulating micro-batches: bfloat16 gradients and sum (plus the params'
    bfloat16 copy) take XLA's peak down by what the planner says, about 7 GiB per device on 8."""
    f32, bf16 = (xla_results[f"30b accum {g} 181 gpu"] for g in ("float32", "bfloat16"))

    def peak(r):
        return r["xla"]["argument"] + r["xla"]["temp"]

    planned = f32["est"]["total"] - bf16["est"]["total"]
    assert f32["est"]["grads"] - bf16["est"]["grads"] == 2 * N_30B // 8  # 4 + 4 bytes -> 2 + 2 + 2
    assert peak(f32) - peak(bf16) > 0.8 * (f32["est"]["grads"] - bf16["est"]["grads"]) > 0
    assert planned > 0 and bf16["xla"]["options"] == plan.CPU_AS_GPU_OPTIONS


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


def test_cli_compiles_30b_finetuning_at_8k_on_one_node():
    """configs/30b_instruct.py (and 30b_chat.py, the same model and step) as it is: 8k tokens, 1 row
    per device, 9 accumulation steps, bfloat16 gradients, bfloat16 first moment, the flash kernel;
    the planner and XLA's compile of the GPU run (on 8 CPU devices) both fit it in 80 GiB."""
    proc = _run(["-m", "mpt_jax.plan", "--config=configs/30b_instruct.py", "--devices=8", "--compile"], devices=None)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "batch 72 x 8192 tokens; micro-batch 8 rows = 1 per device, 9 accumulation steps" in out
    assert "=> fits in 80 GiB" in out
    assert "XLA on cpu, mesh (1, 8, 1), attention flash" in out
    assert "while-loop-invariant-code-motion" in out
    rows = {x.split("=")[0].strip(): x.split() for x in out.splitlines() if " = " in x and x.startswith("  ")}
    assert rows["arguments"][-1] == "1.000"
    assert 0.9 <= float(rows["temporaries"][-1]) <= 1.2
    peak = float(rows["peak"][-3])
    assert peak < 75  # GiB: XLA's peak per device, with room under 80 GB cards


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


@pytest.mark.parametrize("script", ["slurm.sbatch", "tpu_vm.sh", "local.sh"])
def test_launch_shell_syntax(script):
    path = os.path.join(ROOT, "launch", script)
    proc = subprocess.run(["bash", "-n", path], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    with open(path, encoding="utf-8") as f:
        text = f.read()
    assert text.startswith(("#!/bin/bash", "#!/usr/bin/env bash")) and "mpt_jax.train" in text


def _local(tmp_path, log_dir, *command, n=2) -> tuple[subprocess.CompletedProcess, float]:
    env = dict(os.environ, LOG_DIR=str(log_dir), STOP_GRACE_S="5")
    start = time.monotonic()
    done = subprocess.run(
        ["bash", os.path.join(ROOT, "launch", "local.sh"), str(n), "1", *command],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return done, time.monotonic() - start


def test_local_sh_creates_log_dir_and_fails_fast(tmp_path):
    """A LOG_DIR that does not exist is created (it used to make process 1 fail to start and process 0
    wait five minutes at the coordinator); one that cannot be created fails at once; the first
    process to fail stops the others."""
    log_dir = tmp_path / "logs" / "run"
    done, _ = _local(tmp_path, log_dir, "bash", "-c", "echo process $JAX_PROCESS_ID of $JAX_NUM_PROCESSES")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "process 0 of 2"
    assert (log_dir / "process_1.log").read_text().strip() == "process 1 of 2"
    (tmp_path / "file").write_text("")
    done, seconds = _local(tmp_path, tmp_path / "file" / "logs", "true")
    assert done.returncode == 2 and "cannot be created" in done.stderr and seconds < 10
    # Process 1 fails at once; the others would sleep for a minute.
    script = 'if [ "$JAX_PROCESS_ID" = 1 ]; then exit 3; fi; sleep 60'
    done, seconds = _local(tmp_path, log_dir, "bash", "-c", script, n=3)
    assert done.returncode == 3 and "a process failed (exit 3)" in done.stderr
    assert seconds < 20


# ------------------------------------------------------------------------------------------------
# Inference memory: weights (float or int8) and the KV cache.


def _nbytes(tree) -> int:
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def test_inference_bytes_are_the_bytes_of_the_arrays():
    """Against what the code makes (abstractly): init_params cast to the weight dtype,
    quantize.quantize_params of them, model.init_cache."""
    from mpt_jax import quantize
    from mpt_jax.model import init_cache, init_params

    cfg = MPTConfig(
        d_model=64,
        n_heads=4,
        n_layers=2,
        max_seq_len=64,
        vocab_size=512,
        attn_type="grouped_query_attention",
        kv_n_heads=2,
        tie_word_embeddings=False,
        no_bias=False,
        dtype="bfloat16",
    )
    abstract = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))

    def cast(dtype):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.dtype(dtype)), abstract)

    for dtype in ("float32", "bfloat16"):
        got = plan.inference_memory(cfg, batch=3, cache_len=48, weight_dtype=dtype)
        cache = jax.eval_shape(lambda dtype=dtype: init_cache(cfg, 3, 48, dtype))
        assert got["params"] == _nbytes(cast(dtype)) and got["scales"] == 0
        assert got["cache"] == _nbytes(cache) == 2 * 2 * 3 * 48 * 2 * 16 * jnp.dtype(dtype).itemsize
        assert got["total"] == got["params"] + got["cache"]
    int8 = plan.inference_memory(cfg, batch=3, cache_len=48, weight_dtype="int8")
    quantized = jax.eval_shape(lambda p: quantize.quantize_params(cfg, p), cast(cfg.dtype))
    sizes = quantize.quantized_bytes(quantized)
    assert int8["params"] == sizes["total"] and int8["scales"] == sizes["scales"] > 0
    assert int8["cache"] == _nbytes(jax.eval_shape(lambda: init_cache(cfg, 3, 48)))  # the compute dtype
    assert plan.inference_memory(cfg, batch=3, cache_len=48, weight_dtype="int8", cache_dtype="float32")["cache"] == (
        2 * int8["cache"]
    )
    # Per device: the cache's rows split over data x fsdp when they divide, its kv heads over tensor.
    whole = plan.inference_memory(cfg, batch=4, cache_len=48)["cache"]
    assert plan.inference_memory(cfg, batch=4, cache_len=48, mesh_shape=(1, 2, 2))["cache"] == whole // 4
    assert plan.inference_memory(cfg, batch=3, cache_len=48, mesh_shape=(1, 2, 2))["cache"] == 3 * whole // 4 // 2
    with pytest.raises(ValueError, match="weight_dtype='int4'"):
        plan.inference_memory(cfg, weight_dtype="int4")
    with pytest.raises(ValueError, match="batch=0"):
        plan.inference_memory(cfg, batch=0)


def test_30b_serves_from_one_80gb_gpu_in_bf16_and_one_40gb_gpu_in_int8():
    """MosaicML sized MPT-30B for this: with an 8k cache, 66.3 GiB in bfloat16 and 38.4 GiB in int8."""
    cfg = model_config(_load("30b"))
    bf16 = plan.inference_memory(cfg, batch=1, cache_len=8192, weight_dtype="bfloat16")
    int8 = plan.inference_memory(cfg, batch=1, cache_len=8192, weight_dtype="int8")
    cache = 2 * 48 * 8192 * 64 * 112 * 2  # k and v, bfloat16: 10.5 GiB
    assert bf16["cache"] == int8["cache"] == cache
    assert bf16["params"] == 2 * N_30B
    norms = 2 * 48 * 7168 + 7168
    channels = 48 * (3 * 7168 + 7168 + 4 * 7168 + 7168) + 50432  # Wqkv, out_proj, up, down outputs; wte rows
    assert int8["scales"] == 4 * channels
    assert int8["params"] == (N_30B - norms) + 2 * norms + 4 * channels
    gib = 1024**3
    assert 40 * gib < bf16["total"] < 80 * gib
    assert 30 * gib < int8["total"] < 40 * gib
    # tensor-parallel over 8: weights and cache split 8 ways (the norms and scales of d_model are not)
    tp = plan.inference_memory(cfg, batch=1, cache_len=8192, weight_dtype="int8", mesh_shape=(1, 1, 8))
    assert int8["total"] / 8 < tp["total"] < int8["total"] / 8 * 1.001


def test_cli_prints_the_inference_table():
    proc = _run(
        [
            "-m",
            "mpt_jax.plan",
            "--config=configs/30b.py",
            "--inference",
            "--cache_len=8192",
            "--devices=1",
            "--device_memory_gb=40",
        ],
        devices=1,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines() if line.startswith("  ")}
    assert "KV cache of 1 row x 8192 positions; mesh (data, fsdp, tensor) = (1, 1, 1)" in proc.stdout
    assert rows["bfloat16"][1:6] == ["55.80", "-", "10.50", "bfloat16", "66.30"] and rows["bfloat16"][6] == "no"
    assert rows["int8"][4:6] == ["27.91", "0.01"] and rows["int8"][8] == "38.41" and rows["int8"][9] == "yes"
