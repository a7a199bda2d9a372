"""Weight-only int8 (mpt_jax/quantize.py) and the model reading it (model.Linear, model.Embedding).

Measured here on random models from init_params (d_model 128, 2 layers, 2 x 64 tokens, logits up to
about 6): the int8 logits differ from the float ones by at most 0.18-0.38 (2.8-5.6% of the largest
logit; RMS 2.4-4.2% of the logits' standard deviation; top-1 tokens agree on 93-98%), bfloat16 0.27
(4.5%). That is int8's own rounding (each weight moves by up to half a step, max |w| / 254 of its
channel): the int8 model computes the float model of the rounded weights within 1.6e-5 (float32).
On the tiny model trained 60 steps (the slow test): eval loss 7.1813 float vs 7.1807 int8 on 4,032
held-out tokens (perplexity 1314.6 vs 1313.8); logits differ by at most 0.24 of 10.7 (0.6% RMS),
top-1 tokens agree on 98.6%.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from workdir_utils import train_tiny

from mpt_jax import quantize
from mpt_jax.config import MPTConfig
from mpt_jax.model import MPT, SCALE_SUFFIX, Embedding, Linear, flat_params, init_params, param_shapes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BASE = dict(d_model=128, n_heads=4, n_layers=2, max_seq_len=64, vocab_size=256)
CONFIGS = {
    "mha": {},
    "gqa": dict(attn_type="grouped_query_attention", kv_n_heads=2),
    "mqa": dict(attn_type="multiquery_attention"),
    "unfused-qkv": dict(fused_qkv=False, attn_type="grouped_query_attention", kv_n_heads=2),
    "glu": dict(ffn_type="mptglu", ffn_act_fn="silu"),
    "untied-learned-bias": dict(tie_word_embeddings=False, learned_pos_emb=True, alibi=False, no_bias=False),
    "bf16": dict(dtype="bfloat16", param_dtype="bfloat16"),
}
TOKENS = jax.random.randint(jax.random.key(1), (2, 64), 0, BASE["vocab_size"])


def _cfg(**kw) -> MPTConfig:
    return MPTConfig(**{**BASE, **kw})


@functools.partial(jax.jit, static_argnums=0)
def _forward(cfg, params, tokens):
    return MPT(cfg).apply({"params": params}, tokens)


def _logits(cfg, params, tokens=TOKENS) -> np.ndarray:
    return np.asarray(_forward(cfg, params, tokens), np.float32)


@functools.cache
def _params(name: str) -> dict:
    """init_params of CONFIGS[name] as read-only numpy arrays (initialised once per session)."""
    return jax.tree.map(np.asarray, init_params(_cfg(**CONFIGS[name]), jax.random.key(0)))


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


# ------------------------------------------------------------------------------------------------
# Which params, which axes.


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_matmul_weight_is_covered_with_its_input_axes(name):
    """input_axes comes from the model's own modules: every kernel and table, nothing else; the
    scale's shape is the weight's output dims (Linear's ``features``, a table's rows)."""
    cfg = _cfg(**CONFIGS[name])
    axes = quantize.input_axes(cfg)
    shapes = dict(
        flat_params(jax.tree.map(lambda b: b.value, param_shapes(cfg), is_leaf=lambda x: hasattr(x, "names")))
    )
    assert set(axes) == {p for p in shapes if p[-1] in ("kernel", "embedding")}
    d, h, hd, kv = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.num_kv_heads
    assert axes[("blocks", "attn", "out_proj", "kernel")] == (1, 2)  # [layers, heads, head_dim, d]
    assert axes[("blocks", "ffn", "down_proj", "kernel")] == (1,)
    assert axes[("wte", "embedding")] == (1,)
    params = quantize.quantize_params(cfg, _params(name))
    scales = {p: x.shape for p, x in flat_params(params) if p[-1].endswith(SCALE_SUFFIX)}
    assert scales[("blocks", "attn", "out_proj", "kernel_scale")] == (cfg.n_layers, d)
    assert scales[("wte", "embedding_scale")] == (cfg.vocab_size,)
    if name == "mha":
        assert scales[("blocks", "attn", "Wqkv", "kernel_scale")] == (cfg.n_layers, 3, h, hd)
    if name == "unfused-qkv":
        assert scales[("blocks", "attn", "Wk", "kernel_scale")] == (cfg.n_layers, kv, hd)
    if name == "glu":
        assert scales[("blocks", "ffn", "gate_proj", "kernel_scale")] == (cfg.n_layers, cfg.ffn_dim)
    if name == "untied-learned-bias":
        assert axes[("lm_head", "kernel")] == (0,)
        assert scales[("lm_head", "kernel_scale")] == (cfg.vocab_size,)
        assert scales[("wpe", "embedding_scale")] == (cfg.max_seq_len,)


# ------------------------------------------------------------------------------------------------
# Logits.


@pytest.mark.parametrize("name", list(CONFIGS))
def test_int8_logits_are_the_rounded_models_and_close_to_float(name):
    cfg = _cfg(**CONFIGS[name])
    params = _params(name)
    q = quantize.quantize_params(cfg, params)
    for path, leaf in flat_params(q):
        if path in quantize.input_axes(cfg):
            assert leaf.dtype == jnp.int8 and int(jnp.abs(leaf.astype(jnp.int32)).max()) <= 127, path
            scale = _get(q, quantize.scale_path(path))
            assert scale.dtype == jnp.float32, path
            # each weight moved by at most half a step of its channel
            w = np.asarray(_get(params, path), np.float32)
            back = np.asarray(quantize.dequantize_array(leaf, scale, quantize.input_axes(cfg)[path]))
            step = np.expand_dims(np.asarray(scale), quantize.input_axes(cfg)[path])
            assert (np.abs(back - w) <= step / 2 * (1 + 1e-5) + 1e-12).all(), path
        elif not path[-1].endswith(SCALE_SUFFIX):
            assert leaf.dtype == jnp.dtype(cfg.param_dtype), path  # norms and biases stay float
    want = _logits(cfg, params)
    got = _logits(cfg, q)
    # The model computes exactly the float model of the rounded weights ...
    rounded = _logits(cfg, quantize.dequantize_params(cfg, q, dtype=cfg.param_dtype))
    tol = 4e-2 if cfg.dtype == "bfloat16" else 1e-5  # bf16 compute alone moves these logits by 0.06-0.08
    np.testing.assert_allclose(got, rounded, atol=tol * np.abs(rounded).max(), rtol=0)
    # ... which is within int8's rounding of the float model (module docstring: the measured numbers).
    err = np.abs(got - want)
    assert err.max() <= 0.08 * np.abs(want).max(), (name, err.max(), np.abs(want).max())
    assert np.sqrt((err**2).mean()) <= 0.06 * want.std(), (name, np.sqrt((err**2).mean()), want.std())


def test_numpy_and_jax_leaves_quantize_identically_and_chunks_change_nothing(monkeypatch):
    cfg = _cfg(**CONFIGS["untied-learned-bias"])
    params = jax.tree.map(jnp.asarray, _params("untied-learned-bias"))
    from_jax = quantize.quantize_params(cfg, params)
    numpy_params = jax.tree.map(np.asarray, params)
    from_numpy = quantize.quantize_params(cfg, numpy_params)
    monkeypatch.setattr(quantize, "_CHUNK", 1000)  # a few layers / table rows at a time
    chunked = quantize.quantize_params(cfg, numpy_params)
    for (path, a), (_, b), (_, c) in zip(
        flat_params(from_jax), flat_params(from_numpy), flat_params(chunked), strict=True
    ):
        assert isinstance(b, np.ndarray) and isinstance(c, np.ndarray), path
        np.testing.assert_array_equal(np.asarray(a), b, err_msg=str(path))
        np.testing.assert_array_equal(b, c, err_msg=str(path))
    # the input is untouched
    for (path, a), (_, b) in zip(flat_params(params), flat_params(numpy_params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b, err_msg=str(path))


def test_include_embedding_false_keeps_the_tables_float():
    cfg = _cfg(**CONFIGS["untied-learned-bias"])
    q = quantize.quantize_params(cfg, _params("untied-learned-bias"), include_embedding=False)
    assert q["wte"]["embedding"].dtype == jnp.float32 and "embedding_scale" not in q["wte"]
    assert q["wpe"]["embedding"].dtype == jnp.float32
    assert q["lm_head"]["kernel"].dtype == jnp.int8  # an untied head is a Linear
    assert np.isfinite(_logits(cfg, q)).all()


# ------------------------------------------------------------------------------------------------
# Exactness.


def _int8_multiples(name, scale_of, seed=0):
    """Params of CONFIGS[name] whose every weight is q * s: q int8 with +-127 in every channel, s from
    ``scale_of``."""
    rng = np.random.default_rng(seed)
    cfg = _cfg(**CONFIGS[name])
    params = jax.tree.map(np.array, _params(name))
    truth = {}
    for path, axes in quantize.input_axes(cfg).items():
        shape = _get(params, path).shape
        q = rng.integers(-126, 127, size=shape).astype(np.int8)
        first = tuple(0 if i in axes else slice(None) for i in range(len(shape)))
        q[first] = np.where(rng.random(q[first].shape) < 0.5, -127, 127)  # the channel's max is exactly 127
        s = scale_of(rng, tuple(n for i, n in enumerate(shape) if i not in axes))
        _get(params, path[:-1])[path[-1]] = (q.astype(np.float32) * np.expand_dims(s, axes)).astype(np.float32)
        truth[path] = (q, s)
    return params, truth


def test_weights_that_are_int8_multiples_round_trip_exactly():
    cfg = _cfg(**CONFIGS["untied-learned-bias"])
    # powers of two: everything exact, dequantized weights included
    params, truth = _int8_multiples(
        "untied-learned-bias", lambda rng, shape: 2.0 ** rng.integers(-12, -4, size=shape).astype(np.float32)
    )
    q = quantize.quantize_params(cfg, params)
    back = quantize.dequantize_params(cfg, q)
    for path, (qt, st) in truth.items():
        np.testing.assert_array_equal(_get(q, path), qt, err_msg=str(path))
        np.testing.assert_array_equal(_get(q, quantize.scale_path(path)), st, err_msg=str(path))
        np.testing.assert_array_equal(_get(back, path), _get(params, path), err_msg=str(path))
    # any float32 scale: the int8 values exact, the scale within one float32 rounding
    params, truth = _int8_multiples(
        "untied-learned-bias", lambda rng, shape: rng.uniform(1e-3, 1e-1, size=shape).astype(np.float32)
    )
    q = quantize.quantize_params(cfg, params)
    for path, (qt, st) in truth.items():
        np.testing.assert_array_equal(_get(q, path), qt, err_msg=str(path))
        np.testing.assert_allclose(_get(q, quantize.scale_path(path)), st, rtol=2**-23, atol=0, err_msg=str(path))


def test_zero_channels_get_zero_scales_and_no_nans():
    cfg = _cfg(**CONFIGS["untied-learned-bias"])
    params = jax.tree.map(np.array, _params("untied-learned-bias"))
    params["blocks"]["ffn"]["up_proj"]["kernel"][:, :, :5] = 0.0  # 5 hidden units that read nothing
    params["wte"]["embedding"][3] = 0.0
    q = quantize.quantize_params(cfg, params)
    assert (q["blocks"]["ffn"]["up_proj"]["kernel_scale"][:, :5] == 0).all()
    assert (q["blocks"]["ffn"]["up_proj"]["kernel"][:, :, :5] == 0).all()
    assert q["wte"]["embedding_scale"][3] == 0 and (q["wte"]["embedding"][3] == 0).all()
    assert np.isfinite(_logits(cfg, q)).all()


def test_float64_one_layer_dequantizes_inside_the_matmul_exactly():
    """(x @ q) * s == x @ (q * s) for the model's own Linear (fused 3-axis outputs, n_in=2) and
    Embedding (lookup and tied head), in float64 against numpy."""
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        cfg = MPTConfig(d_model=16, n_heads=2, n_layers=1, vocab_size=32, dtype="float64", param_dtype="float64")
        for features, axes, n_in, x_shape in (
            ((3, 2, 8), ("embed", "qkv", "heads", "head_dim"), 1, (2, 5, 16)),
            ((16,), ("heads", "head_dim", "embed"), 2, (2, 5, 2, 8)),
        ):
            x = rng.normal(size=x_shape)
            kernel_shape = x_shape[len(x_shape) - n_in :] + features
            w = rng.normal(size=kernel_shape)
            q, s = quantize.quantize_array(w, tuple(range(n_in)))
            layer = Linear(cfg, features, axes, n_in=n_in)
            got = np.asarray(
                layer.apply({"params": {"kernel": jnp.asarray(q), "kernel_scale": jnp.asarray(s, jnp.float64)}}, x)
            )
            assert got.dtype == np.float64
            deq = q.astype(np.float64) * s.astype(np.float64)  # s broadcasts over the leading input axes
            want = np.tensordot(x, deq, axes=n_in)
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
        table = rng.normal(size=(32, 16))
        q, s = quantize.quantize_array(table, (1,))
        emb = Embedding(cfg, 32, ("vocab", "embed"))
        variables = {"params": {"embedding": jnp.asarray(q), "embedding_scale": jnp.asarray(s, jnp.float64)}}
        deq = q.astype(np.float64) * s.astype(np.float64)[:, None]
        ids = np.array([[0, 5, 31]])
        np.testing.assert_allclose(np.asarray(emb.apply(variables, ids)), deq[ids], rtol=1e-12, atol=1e-12)
        h = rng.normal(size=(1, 3, 16))
        got = np.asarray(emb.apply(variables, jnp.asarray(h), method=Embedding.attend))
        np.testing.assert_allclose(got, np.einsum("btd,vd->btv", h, deq), rtol=1e-6, atol=1e-6)  # logits are float32


# ------------------------------------------------------------------------------------------------
# The model reads int8.


def test_the_model_reads_int8_weights_and_their_scales():
    cfg = _cfg(**CONFIGS["untied-learned-bias"])
    params = _params("untied-learned-bias")
    q = quantize.quantize_params(cfg, params)
    # what the forward pass is given is int8: the jaxpr's inputs
    jaxpr = jax.make_jaxpr(lambda p: MPT(cfg).apply({"params": p}, TOKENS))(q)
    int8_inputs = [v for v in jaxpr.jaxpr.invars if v.aval.dtype == jnp.int8]
    assert len(int8_inputs) == len(quantize.input_axes(cfg))
    # the scales are read: doubling the untied head's scales doubles the logits
    doubled = jax.tree.map(lambda x: x, q)
    doubled["lm_head"]["kernel_scale"] = 2 * q["lm_head"]["kernel_scale"]
    np.testing.assert_allclose(_logits(cfg, doubled), 2 * _logits(cfg, q), rtol=1e-6, atol=1e-6)
    # memory: weights a quarter of float32, plus one float32 per output channel
    f32, i8 = quantize.quantized_bytes(params), quantize.quantized_bytes(q)
    weights = sum(int(np.size(_get(params, p))) for p in quantize.input_axes(cfg))
    assert f32 == {"int8": 0, "scales": 0, "float": f32["total"], "total": f32["total"]}
    assert i8["int8"] == weights == sum(4 * int(np.size(_get(params, p))) for p in quantize.input_axes(cfg)) // 4
    channels = sum(int(np.size(x)) for p, x in flat_params(q) if p[-1].endswith(SCALE_SUFFIX))
    assert i8["scales"] == 4 * channels
    assert i8["float"] == f32["total"] - 4 * weights
    assert 0.25 < i8["total"] / f32["total"] < 0.3, i8["total"] / f32["total"]


def test_bf16_params_get_float32_scales():
    cfg = _cfg(**CONFIGS["bf16"])
    q = quantize.quantize_params(cfg, _params("bf16"))
    assert q["blocks"]["attn"]["Wqkv"]["kernel_scale"].dtype == jnp.float32
    assert q["blocks"]["norm_1"]["scale"].dtype == jnp.bfloat16


# ------------------------------------------------------------------------------------------------
# Errors.


def test_bad_params_are_refused_with_the_reason(tmp_path):
    cfg = _cfg()
    params = jax.tree.map(np.array, _params("mha"))
    q = quantize.quantize_params(cfg, params)
    with pytest.raises(ValueError, match="already quantized"):
        quantize.quantize_params(cfg, q)
    with pytest.raises(
        ValueError, match=r"blocks/ffn/down_proj/kernel has shape \(2, 512, 128\), the config implies \(2, 256, 128\)"
    ):
        quantize.quantize_params(_cfg(expansion_ratio=2), params)
    with pytest.raises(ValueError, match=r"missing \['wte/embedding'\]"):
        quantize.quantize_params(cfg, {k: v for k, v in params.items() if k != "wte"})
    bad = jax.tree.map(lambda x: x.copy(), params)
    bad["blocks"]["ffn"]["down_proj"]["kernel"][1, 2, 3] = np.nan
    with pytest.raises(ValueError, match="blocks/ffn/down_proj/kernel holds inf or NaN"):
        quantize.quantize_params(cfg, bad)
    # an HF checkpoint holds float weights: save_hf refuses before writing anything
    from mpt_jax.hf import save_hf

    out = tmp_path / "hf"
    with pytest.raises(ValueError, match="save_hf: these params are int8-quantized"):
        save_hf(cfg, q, out)
    assert not out.exists() and os.listdir(tmp_path) == []
    # the float params still save; dequantized ones too (they are the rounded weights)
    save_hf(cfg, quantize.dequantize_params(cfg, q), out)
    assert (out / "model.safetensors").exists()


# ------------------------------------------------------------------------------------------------
# Sharding.


def test_quantized_shardings_follow_the_float_weights_and_outputs():
    from jax.sharding import AbstractMesh, PartitionSpec

    from mpt_jax import sharding

    cfg = _cfg(attn_type="grouped_query_attention", kv_n_heads=2)
    mesh = AbstractMesh((1, 2, 2), sharding.AXES)
    flt = dict(flat_params(sharding.shardings_of_params(param_shapes(cfg), mesh)))
    q = dict(flat_params(sharding.quantized_param_shardings(cfg, mesh)))
    for path in quantize.input_axes(cfg):
        assert q[path].spec == flt[path].spec, path
    spec = {p[-2] if p[0] == "blocks" else p[0]: s.spec for p, s in q.items() if p[-1].endswith(SCALE_SUFFIX)}
    assert spec["Wq"] == PartitionSpec(None, "tensor", None)  # [layers, heads, head_dim]
    assert spec["Wkv"] == PartitionSpec(None, None, "tensor", None)  # [layers, 2, kv_heads, head_dim]
    assert spec["out_proj"] == PartitionSpec(None, "fsdp")  # [layers, d_model]: embed -> fsdp
    assert spec["up_proj"] == PartitionSpec(None, "tensor")  # [layers, mlp]
    assert spec["wte"] == PartitionSpec("tensor")  # [vocab]


_MESH_SCRIPT = textwrap.dedent(
    """
    import json
    import flax.linen as nn, jax, numpy as np
    from mpt_jax import plan, quantize, sharding
    from mpt_jax.config import MPTConfig
    from mpt_jax.model import MPT, init_params

    cfg = MPTConfig(d_model=128, n_heads=4, n_layers=2, max_seq_len=64, vocab_size=256,
                    attn_type="grouped_query_attention", kv_n_heads=2)
    params = init_params(cfg, jax.random.key(0))
    q = quantize.quantize_params(cfg, params)
    tokens = jax.random.randint(jax.random.key(1), (4, 32), 0, 256)
    want = np.asarray(MPT(cfg).apply({"params": q}, tokens))
    out = {}
    for shape in ((1, 2, 4), (2, 2, 2)):
        mesh = sharding.make_mesh(shape)
        sh = sharding.quantized_param_shardings(cfg, mesh)
        placed = jax.device_put(q, sh)
        # quantizing float params that are already sharded (what load(..., mesh=) holds) gives the same
        floats = jax.device_put(params, sharding.param_shardings(cfg, mesh))
        same = all(np.array_equal(np.asarray(a), np.asarray(b))
                   for a, b in zip(jax.tree.leaves(quantize.quantize_params(cfg, floats)), jax.tree.leaves(q)))
        with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
            got = jax.jit(lambda p, t: MPT(cfg).apply({"params": p}, t))(placed, tokens)
        device0 = jax.devices()[0]
        held = sum(s.data.nbytes for x in jax.tree.leaves(placed) for s in x.addressable_shards if s.device == device0)
        planned = plan.inference_memory(cfg, batch=4, cache_len=32, weight_dtype="int8", mesh_shape=shape)
        out[str(shape)] = dict(same=same, err=float(np.abs(np.asarray(got) - want).max()), held=int(held),
                               planned=planned["params"], whole=quantize.quantized_bytes(q)["total"])
    print(json.dumps(out))
    """
)


def test_quantized_params_placed_on_a_mesh_give_the_same_logits_and_the_planned_bytes():
    """8 CPU devices: int8 params placed with quantized_param_shardings; the sharded forward equals
    the unsharded one, and device 0 holds exactly what plan.inference_memory says."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    done = subprocess.run(
        [sys.executable, "-c", _MESH_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for shape, r in json.loads(done.stdout.splitlines()[-1]).items():
        assert r["same"] and r["err"] < 1e-4, (shape, r)
        assert r["held"] == r["planned"] < r["whole"], (shape, r)


# ------------------------------------------------------------------------------------------------
# A trained model.


@pytest.mark.slow
def test_perplexity_of_a_trained_tiny_model_barely_changes(tmp_path, stdlib_data_dir):
    """configs/tiny.py trained 60 steps (8 x 64 tokens): the eval loss on 8 held-out batches with
    int8 weights is within 0.02 of float's (measured: module docstring)."""
    from mpt_jax import checkpoint, steps
    from mpt_jax.data.pipeline import DataConfig, get_tokenizer, make_dataset

    workdir = str(tmp_path / "run")
    train_tiny(
        workdir,
        stdlib_data_dir,
        "--config.train.max_steps=60",
        "--config.train.global_batch_size=8",
        "--config.train.seq_len=64",
        "--config.schedule.t_warmup=6",
        "--config.checkpoint.every_steps=0",
    )
    cfg, params = checkpoint.load_params_any(workdir)

    spec = importlib.util.spec_from_file_location("tiny_config", os.path.join(ROOT, "configs", "tiny.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.data.data_dir = stdlib_data_dir
    data_cfg = DataConfig.from_config(config.data)
    dataset = make_dataset(
        data_cfg,
        get_tokenizer(data_cfg),
        split="validation",
        seq_len=64,
        global_batch=8,
        seed=0,
        repeat=False,
        shuffle=False,
        vocab_size=cfg.vocab_size,
    )
    it = iter(dataset)
    batches = [next(it) for _ in range(8)]

    q = quantize.quantize_params(cfg, params)
    evaluate = jax.jit(lambda p, b: steps.eval_step(p, b, cfg=cfg))
    loss = {}
    for name, p in (("float", params), ("int8", q)):
        outs = [evaluate(p, b) for b in batches]
        loss[name] = sum(float(o["loss_sum"]) for o in outs) / sum(float(o["tokens"]) for o in outs)
    forward = jax.jit(lambda p, t: MPT(cfg).apply({"params": p}, t))
    a, b = np.asarray(forward(params, batches[0]["tokens"])), np.asarray(forward(q, batches[0]["tokens"]))
    print(
        f"eval loss float {loss['float']:.4f} int8 {loss['int8']:.4f}; perplexity {math.exp(loss['float']):.1f} vs "
        f"{math.exp(loss['int8']):.1f}; logits max error {np.abs(a - b).max():.3f} of {np.abs(a).max():.1f}, "
        f"top-1 agreement {(a.argmax(-1) == b.argmax(-1)).mean():.3f}"
    )
    assert loss["float"] < 8.0  # it learned something (9.0 at step 0)
    assert abs(loss["int8"] - loss["float"]) < 0.02, loss
    assert (a.argmax(-1) == b.argmax(-1)).mean() > 0.9
