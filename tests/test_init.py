"""llm-foundry's initialisation (``param_init_fns.py``), parameter counts of the released shapes, and MPTConfig.validate.

init_params is called with rbg keys: the init rules are the same for any key, and XLA compiles
RngBitGenerator in half the time of threefry (compiling a model's init costs seconds on a CPU).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mpt_jax import MPTConfig
from mpt_jax.initializers import weight_init
from mpt_jax.model import count_params, init_params

D, L, V, F = 256, 4, 512, 1024
SHAPE = dict(d_model=D, n_heads=4, n_layers=L, vocab_size=V, ffn_hidden_size=F, max_seq_len=16)
KAIMING = math.sqrt(2.0 / D)  # std sqrt(2 / fan_in) of kaiming_normal_(fan_in, relu)


def rbg(seed: int) -> jax.Array:
    return jax.random.key(seed, impl="rbg")


@pytest.fixture(scope="module")
def default_init():
    """Default init rules, with biases (no_bias=False) and qk_ln so that every norm and bias exists."""
    cfg = MPTConfig(**SHAPE, no_bias=False, qk_ln=True).validate()
    return cfg, init_params(cfg, rbg(0))


def assert_std(x, want: float, name: str, rel: float = 0.05):
    x = np.asarray(x, np.float64)
    assert abs(x.mean()) < 0.05 * want, f"{name}: mean {x.mean()} (std {want})"
    assert abs(x.std() / want - 1) < rel, f"{name}: std {x.std()}, expected {want}"


def assert_untruncated_normal(x, name: str):
    """kaiming_normal_ is a plain normal: kurtosis 3 (uniform: 1.8) and tails past 4 sigma (truncated: none)."""
    z = np.asarray(x, np.float64).ravel()
    z = (z - z.mean()) / z.std()
    assert abs(np.mean(z**4) - 3.0) < 0.15, f"{name}: kurtosis {np.mean(z**4)}"
    assert np.abs(z).max() > 4.0, f"{name}: no tail beyond 4 sigma"


def test_default_init_stds(default_init):
    """wte, Wqkv, up_proj: sqrt(2/d); out_proj: sqrt(2/d)/sqrt(2L); down_proj: sqrt(2/F)/sqrt(2L); for each
    layer separately, and layers drawn independently."""
    cfg, params = default_init
    blocks = params["blocks"]
    residual_div = math.sqrt(2 * L)
    expected = {
        "wte": (params["wte"]["embedding"], KAIMING),
        "Wqkv": (blocks["attn"]["Wqkv"]["kernel"], KAIMING),
        "up_proj": (blocks["ffn"]["up_proj"]["kernel"], KAIMING),
        "out_proj": (blocks["attn"]["out_proj"]["kernel"], KAIMING / residual_div),
        "down_proj": (blocks["ffn"]["down_proj"]["kernel"], math.sqrt(2.0 / F) / residual_div),
    }
    assert params["wte"]["embedding"].shape == (V, D)
    assert blocks["attn"]["Wqkv"]["kernel"].shape == (L, D, 3, 4, D // 4)
    assert blocks["attn"]["out_proj"]["kernel"].shape == (L, 4, D // 4, D)
    assert blocks["ffn"]["down_proj"]["kernel"].shape == (L, F, D)
    for name, (value, std) in expected.items():
        assert value.dtype == jnp.float32, name
        assert_std(value, std, name)
        assert_untruncated_normal(value, name)
        if name != "wte":
            for layer in range(L):
                assert_std(value[layer], std, f"{name}[{layer}]")
            assert not np.allclose(value[0], value[1]), f"{name}: layers 0 and 1 are identical"
    # The q, k and v slices of the fused kernel share the rule (fan_in = d for each).
    for i, part in enumerate("qkv"):
        assert_std(blocks["attn"]["Wqkv"]["kernel"][:, :, i], KAIMING, f"Wqkv[{part}]")


def test_default_init_norms_and_biases(default_init):
    """Every norm scale is exactly 1 and every bias exactly 0 (no_bias=False creates them)."""
    _, params = default_init
    leaves = jax.tree_util.tree_leaves_with_path(params)
    names = [jax.tree_util.keystr(path) for path, _ in leaves]
    n_scales = n_biases = 0
    for (path, value), name in zip(leaves, names, strict=True):
        if path[-1].key == "scale":
            np.testing.assert_array_equal(value, np.ones_like(value), err_msg=name)
            n_scales += 1
        elif path[-1].key == "bias":
            np.testing.assert_array_equal(value, np.zeros_like(value), err_msg=name)
            n_biases += 1
    assert n_scales == 5  # norm_1, norm_2, q_ln, k_ln, norm_f
    assert n_biases == 5 + 4  # the norms', plus Wqkv, out_proj, up_proj, down_proj
    assert "['blocks']['attn']['q_ln']['scale']" in names and "['blocks']['attn']['Wqkv']['bias']" in names


def test_emb_init_std_and_numeric_residual_divisor():
    """emb_init_std sets wte and wpe to normal(0, emb_init_std); init_div_is_residual=4.0 divides out_proj and
    down_proj by 4. GQA's Wq / Wkv and GLU's gate_proj keep sqrt(2/d)."""
    cfg = MPTConfig(
        **SHAPE,
        emb_init_std=0.05,
        init_div_is_residual=4.0,
        alibi=False,
        learned_pos_emb=True,
        attn_type="grouped_query_attention",
        kv_n_heads=2,
        ffn_type="mptglu",
    ).validate()
    params = init_params(cfg, rbg(1))
    blocks = params["blocks"]
    assert_std(params["wte"]["embedding"], 0.05, "wte")
    assert params["wpe"]["embedding"].shape == (16, D)
    assert_std(params["wpe"]["embedding"], 0.05, "wpe", rel=0.1)  # only 16 x 256 values
    assert_std(blocks["attn"]["Wq"]["kernel"], KAIMING, "Wq")
    assert_std(blocks["attn"]["Wkv"]["kernel"], KAIMING, "Wkv")
    assert_std(blocks["ffn"]["gate_proj"]["kernel"], KAIMING, "gate_proj")
    assert_std(blocks["attn"]["out_proj"]["kernel"], KAIMING / 4.0, "out_proj")
    assert_std(blocks["ffn"]["down_proj"]["kernel"], math.sqrt(2.0 / F) / 4.0, "down_proj")


def test_no_residual_divisor_and_uniform_embedding():
    """init_div_is_residual=False leaves out_proj / down_proj at sqrt(2/fan_in); emb_init_uniform_lim=0.1 draws
    wte from U(-0.1, 0.1); an untied lm_head follows the weight rule."""
    cfg = MPTConfig(**SHAPE, init_div_is_residual=False, emb_init_uniform_lim=0.1, tie_word_embeddings=False)
    params = init_params(cfg.validate(), rbg(2))
    blocks = params["blocks"]
    assert_std(blocks["attn"]["out_proj"]["kernel"], KAIMING, "out_proj")
    assert_std(blocks["ffn"]["down_proj"]["kernel"], math.sqrt(2.0 / F), "down_proj")
    wte = np.asarray(params["wte"]["embedding"])
    assert_std(wte, 0.1 / math.sqrt(3.0), "wte")
    assert np.abs(wte).max() <= 0.1 and np.abs(wte).max() > 0.099
    assert params["lm_head"]["kernel"].shape == (D, V)
    assert_std(params["lm_head"]["kernel"], KAIMING, "lm_head")


@pytest.mark.parametrize(
    "init,residual_div",
    [
        (dict(init_name="kaiming_uniform_"), math.sqrt(2 * L)),
        (dict(init_name="kaiming_normal_", init_fan_mode="fan_out"), math.sqrt(2 * L)),
        (dict(init_name="xavier_normal_", init_gain=1.5), math.sqrt(2 * L)),
        (dict(init_name="baseline_", init_std=0.02), math.sqrt(2 * L)),
        (dict(init_name="small_init_"), math.sqrt(2 * L)),
        (dict(init_name="neox_init_"), L / math.sqrt(10.0)),
    ],
    ids=["kaiming_uniform", "kaiming_normal_fan_out", "xavier_normal", "baseline", "small_init", "neox_init"],
)
def test_other_init_names(init, residual_div):
    """The other init_config names, on a (fan_in 256, fan_out 1024) kernel, plain and residual."""
    cfg = MPTConfig(**SHAPE, **init).validate()
    fan_in, fan_out = D, F
    std = {
        "kaiming_uniform_": math.sqrt(2.0 / fan_in),
        "kaiming_normal_": math.sqrt(2.0 / fan_out),  # fan_out mode
        "xavier_normal_": 1.5 * math.sqrt(2.0 / (fan_in + fan_out)),
        "baseline_": 0.02,
        "small_init_": math.sqrt(2.0 / (5 * D)),
        "neox_init_": math.sqrt(2.0 / (5 * D)),
    }[cfg.init_name]
    plain = weight_init(cfg, in_axes=(0,))(rbg(3), (fan_in, fan_out))
    residual = weight_init(cfg, in_axes=(0,), residual=True)(rbg(4), (fan_in, fan_out))
    assert_std(plain, std, "plain")
    assert_std(residual, std / residual_div, "residual")
    if cfg.init_name == "kaiming_uniform_":
        assert np.abs(np.asarray(plain)).max() <= math.sqrt(3.0) * std


def test_fused_qkv_fan_out_is_per_head():
    """llm-foundry initialises the fused Wqkv one head_dim slice at a time (its ``_fused`` splits), so fan_out-dependent
    rules see fan_out = head_dim: xavier_normal_ std is gain * sqrt(2 / (d + head_dim))."""
    cfg = MPTConfig(**SHAPE, init_name="xavier_normal_", init_gain=1.0).validate()
    params = init_params(cfg, rbg(5))
    assert_std(params["blocks"]["ffn"]["up_proj"]["kernel"], math.sqrt(2.0 / (D + F)), "up_proj")  # not fused
    assert_std(params["blocks"]["attn"]["Wqkv"]["kernel"], math.sqrt(2.0 / (D + cfg.head_dim)), "Wqkv")


# ------------------------------------------------------------------------------------------------
# Parameter counts.


def test_count_params_mpt_7b():
    """MPTConfig() is MPT-7B: 6,649,286,656 parameters (computed from abstract shapes, nothing allocated)."""
    assert count_params(MPTConfig()) == 6_649_286_656


def test_count_params_mpt_30b():
    """MPT-30B: d_model 7168, 64 heads, 48 layers: 29,957,200,896 parameters."""
    cfg = MPTConfig(d_model=7168, n_heads=64, n_layers=48, max_seq_len=8192).validate()
    assert count_params(cfg) == 29_957_200_896


def test_count_params_formula_small():
    """A small GQA/GLU/untied/learned-position config against the count written out by hand."""
    cfg = MPTConfig(
        d_model=64,
        n_heads=8,
        n_layers=3,
        vocab_size=100,
        max_seq_len=32,
        attn_type="grouped_query_attention",
        kv_n_heads=2,
        ffn_type="mptglu",
        ffn_hidden_size=96,
        tie_word_embeddings=False,
        alibi=False,
        learned_pos_emb=True,
        no_bias=False,
    ).validate()
    d, hd, kv, f = 64, 8, 2, 96
    attn = (d * d + d) + (d * 2 * kv * hd + 2 * kv * hd) + (d * d + d)  # Wq, Wkv, out_proj (+ biases)
    ffn = 2 * (d * f + f) + (f * d + d)  # up, gate, down
    norms = 2 * 2 * d
    embed = 100 * d + 32 * d + d * 100 + 2 * d  # wte, wpe, lm_head (no bias), norm_f
    assert count_params(cfg) == 3 * (attn + ffn + norms) + embed


# ------------------------------------------------------------------------------------------------
# MPTConfig.validate.


@pytest.mark.parametrize(
    "changes,field",
    [
        (dict(d_model=100, n_heads=3), "d_model"),
        (dict(attn_type="grouped_query_attention", kv_n_heads=3), "kv_n_heads"),
        (dict(attn_type="grouped_query_attention", kv_n_heads=None), "kv_n_heads"),
        (dict(attn_type="flash_attention"), "attn_type"),
        (dict(ffn_type="mptgeglu"), "ffn_type"),
        (dict(logit_scale="inv_sqrt_d"), "logit_scale"),
        (dict(embedding_fraction=0.0), "embedding_fraction"),
        (dict(resid_pdrop=1.0), "resid_pdrop"),
        (dict(init_name="xavier_uniform_"), "init_gain"),
        (dict(init_name="baseline_"), "init_std"),
        (dict(n_layers=0), "n_layers"),
        (dict(ffn_hidden_size=72.5), "ffn_hidden_size"),  # not an integer
        (dict(clip_qkv="6"), "clip_qkv"),  # a string where a number belongs
        (dict(n_heads=True), "n_heads"),
        (dict(qk_ln=True, qk_gn=True), "qk_gn"),
        (dict(sliding_window_size=-2), "sliding_window_size"),
        (dict(attn_logit_softcapping=0.0), "attn_logit_softcapping"),
        (dict(final_logit_softcapping=-1.0), "final_logit_softcapping"),
        (dict(norm_type="triton_layernorm"), "norm_type"),
        (dict(ffn_act_fn="hardtanh"), "ffn_act_fn"),
        (dict(rope=True, rope_impl="flash"), "rope_impl"),
        (dict(rope=True, rope_impl="hf", rope_hf_type="llama3", rope_hf_factor=8.0), "rope_hf_low_freq_factor"),
        (dict(d_model=96, n_heads=32, rope=True, alibi=False), "rope"),  # odd head_dim 3
    ],
)
def test_validate_names_the_field(changes, field):
    """Each inconsistency raises ValueError whose message starts with the offending field's name."""
    with pytest.raises(ValueError, match=rf"MPTConfig\.{field}="):
        MPTConfig(**changes).validate()


def test_validate_accepts_released_shapes():
    """validate() returns the config itself for the released shapes and the GQA / MQA variants."""
    for cfg in (
        MPTConfig(),
        MPTConfig(d_model=7168, n_heads=64, n_layers=48, max_seq_len=8192),
        MPTConfig(attn_type="grouped_query_attention", kv_n_heads=8),
        MPTConfig(attn_type="multiquery_attention", logit_scale="inv_sqrt_d_model"),
    ):
        assert cfg.validate() is cfg
    assert MPTConfig(attn_type="multiquery_attention").num_kv_heads == 1
