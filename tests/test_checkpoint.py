"""mpt-jax model checkpoints: exact save/load, restore onto devices, casting, clear errors."""

from __future__ import annotations

import json

import jax
import ml_dtypes
import numpy as np
import pytest

from mpt_jax import MPTConfig
from mpt_jax.checkpoint import load_model, save_model
from mpt_jax.model import init_params

CFG = MPTConfig(d_model=32, n_heads=4, n_layers=2, max_seq_len=16, vocab_size=50, qk_ln=True, no_bias=False)


@pytest.fixture(scope="module")
def params():
    return jax.tree.map(np.asarray, init_params(CFG, jax.random.key(0)))


def test_save_load_exact_and_streamed(tmp_path, params):
    save_model(tmp_path / "a", CFG, params)
    cfg, loaded = load_model(tmp_path / "a")
    assert cfg == CFG
    assert jax.tree.structure(loaded) == jax.tree.structure(params)
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, params, loaded)))
    # The same checkpoint from a stream of (path, array) pairs.
    pairs = [(tuple(k.key for k in path), leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]]
    save_model(tmp_path / "b", CFG, iter(pairs))
    _, streamed = load_model(tmp_path / "b")
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, params, streamed)))


def test_restore_onto_devices_with_cast(tmp_path, params):
    save_model(tmp_path / "a", CFG, params)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, params)
    _, loaded = load_model(tmp_path / "a", shardings=shardings, dtype="bfloat16")
    leaf = loaded["blocks"]["attn"]["Wqkv"]["kernel"]
    assert isinstance(leaf, jax.Array) and leaf.dtype == jax.numpy.bfloat16 and leaf.sharding == device
    expected = params["blocks"]["attn"]["Wqkv"]["kernel"].astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(np.asarray(leaf), expected)
    with pytest.raises(ValueError, match="shardings tree does not match"):
        load_model(tmp_path / "a", shardings={"wte": {"embedding": device}})


def test_refuses_overwrite_and_names_bad_folders(tmp_path, params):
    save_model(tmp_path / "a", CFG, params)
    with pytest.raises(FileExistsError, match="exists"):
        save_model(tmp_path / "a", CFG.replace(n_layers=3), params)
    assert load_model(tmp_path / "a")[0] == CFG  # untouched
    hf_like = tmp_path / "hf"
    hf_like.mkdir()
    (hf_like / "config.json").write_text(json.dumps(CFG.to_hf()))
    with pytest.raises(ValueError, match="use load_hf"):
        load_model(hf_like)
    with pytest.raises(FileNotFoundError, match="no mpt-jax model checkpoint config"):
        load_model(tmp_path / "missing")


def test_failed_save_leaves_nothing(tmp_path, params):
    def broken():
        yield ("wte", "embedding"), params["wte"]["embedding"]
        raise RuntimeError("conversion failed half way")

    with pytest.raises(RuntimeError, match="half way"):
        save_model(tmp_path / "a", CFG, broken())
    assert list(tmp_path.iterdir()) == []
