"""Logits parity with transformers' PyTorch MptForCausalLM, in both directions of conversion."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_utils import hf_logits, random_hf_model, safetensors_dict
from transformers import MptForCausalLM

from mpt_jax import MPT, MPTConfig
from mpt_jax.hf import load_hf, save_hf
from mpt_jax.model import init_params

TOL = 1e-4

# Configs that transformers' native MptForCausalLM implements (MHA, ALiBi, no biases, FFN x4).
HF_CONFIGS = {
    "1head": dict(d_model=16, n_heads=1, n_layers=2, max_seq_len=16, vocab_size=61),
    "3heads": dict(d_model=48, n_heads=3, n_layers=2, max_seq_len=24, vocab_size=97),
    "6heads_clip": dict(
        d_model=48, n_heads=6, n_layers=3, max_seq_len=16, vocab_size=64, attn_config={"clip_qkv": 0.3}
    ),
    "12heads_scale": dict(
        d_model=96, n_heads=12, n_layers=2, max_seq_len=32, vocab_size=128, attn_config={"softmax_scale": 0.11}
    ),
    "8heads_eps": dict(d_model=64, n_heads=8, n_layers=2, max_seq_len=20, vocab_size=80, layer_norm_epsilon=1e-3),
}


def _lengths(max_len: int) -> list[int]:
    return sorted({1, 2, 7, max_len // 2 + 1, max_len})


@pytest.mark.parametrize("name", HF_CONFIGS)
def test_hf_to_jax_logits(name, tmp_path):
    """A random transformers model, saved and loaded by load_hf, gives the same logits."""
    hf_model = random_hf_model(seed=1, **HF_CONFIGS[name])
    hf_model.save_pretrained(tmp_path)
    cfg, params = load_hf(tmp_path)
    forward = jax.jit(lambda p, t: MPT(cfg).apply({"params": p}, t))
    rng = np.random.default_rng(0)
    worst = 0.0
    for length in _lengths(cfg.max_seq_len):
        tokens = rng.integers(0, cfg.vocab_size, (2, length))
        ours = np.asarray(forward(params, jnp.asarray(tokens)))
        ref = hf_logits(hf_model, tokens)
        assert ours.shape == ref.shape
        worst = max(worst, float(np.abs(ours - ref).max()))
    assert worst <= TOL, f"{name}: max |logits - transformers| = {worst:.3g}"


@pytest.mark.parametrize("name", ["3heads", "6heads_clip", "12heads_scale"])
def test_jax_to_hf_logits(name, tmp_path):
    """A random mpt-jax model, written by save_hf, loads in transformers with the same logits."""
    hf_cfg = HF_CONFIGS[name]
    attn = hf_cfg.get("attn_config", {})
    cfg = MPTConfig(
        **{k: v for k, v in hf_cfg.items() if k != "attn_config"},
        clip_qkv=attn.get("clip_qkv"),
        softmax_scale=attn.get("softmax_scale"),
    )
    params = init_params(cfg, jax.random.key(3))
    # Random norms too, so that the scales' mapping is exercised.
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: (
            x * (1 + 0.2 * jax.random.normal(jax.random.key(len(path)), x.shape))
            if "norm" in jax.tree_util.keystr(path)
            else x
        ),
        params,
    )
    save_hf(cfg, params, tmp_path / "hf")
    hf_model = MptForCausalLM.from_pretrained(tmp_path / "hf").eval()
    rng = np.random.default_rng(1)
    forward = jax.jit(lambda p, t: MPT(cfg).apply({"params": p}, t))
    for length in _lengths(cfg.max_seq_len):
        tokens = rng.integers(0, cfg.vocab_size, (3, length))
        ours = np.asarray(forward(params, jnp.asarray(tokens)))
        diff = float(np.abs(ours - hf_logits(hf_model, tokens)).max())
        assert diff <= TOL, f"{name}, length {length}: max diff {diff:.3g}"


def test_round_trip_is_bit_exact(tmp_path):
    """HF -> JAX -> HF reproduces every tensor bit for bit, and no extra or missing key."""
    hf_model = random_hf_model(seed=2, **HF_CONFIGS["6heads_clip"])
    hf_model.save_pretrained(tmp_path / "a")
    cfg, params = load_hf(tmp_path / "a")
    save_hf(cfg, params, tmp_path / "b")
    a, b = safetensors_dict(tmp_path / "a"), safetensors_dict(tmp_path / "b")
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert np.array_equal(a[key].view(np.uint8), b[key].view(np.uint8)), key
    assert MPTConfig.from_hf(tmp_path / "b") == cfg


def test_bf16_round_trip_and_parity(tmp_path):
    """bfloat16 checkpoints (how the released MPTs are stored) convert losslessly."""
    hf_model = random_hf_model(seed=4, **HF_CONFIGS["3heads"]).to(dtype=__import__("torch").bfloat16)
    hf_model.save_pretrained(tmp_path / "a")
    cfg, params = load_hf(tmp_path / "a")
    assert params["wte"]["embedding"].dtype == jnp.bfloat16
    save_hf(cfg, params, tmp_path / "b")
    a, b = safetensors_dict(tmp_path / "a"), safetensors_dict(tmp_path / "b")
    assert all(np.array_equal(a[k].view(np.uint16), b[k].view(np.uint16)) for k in a)
    # In float32 compute, bf16 weights give transformers' float32 logits of the same weights.
    cfg32, params32 = load_hf(tmp_path / "a", dtype="float32")
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, cfg.max_seq_len))
    ours = np.asarray(MPT(cfg32).apply({"params": params32}, jnp.asarray(tokens)))
    ref = hf_logits(hf_model.float(), tokens)
    assert np.abs(ours - ref).max() <= TOL
