"""The checkpoint formats load_hf reads, the ones save_hf writes, the convert CLI, and bad input."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
import torch
from hf_utils import random_hf_model, safetensors_dict, saved_hf_model, write_bin_checkpoint
from transformers import MptForCausalLM

import mpt_jax.hf
from mpt_jax import MPTConfig
from mpt_jax import convert as convert_cli
from mpt_jax.checkpoint import load_model
from mpt_jax.hf import hf_keys, load_hf, save_hf
from mpt_jax.model import init_params

SMALL = dict(d_model=32, n_heads=4, n_layers=2, max_seq_len=16, vocab_size=50)

# mosaicml/mpt-7b's remote-code config.json, at a small size (nested attn_config and init_config,
# norm_type, no layer_norm_epsilon, learned_pos_emb true but ignored because of ALiBi).
REMOTE_CODE_CONFIG = {
    "architectures": ["MPTForCausalLM"],
    "attn_config": {
        "alibi": True,
        "alibi_bias_max": 8,
        "attn_impl": "torch",
        "attn_pdrop": 0,
        "attn_type": "multihead_attention",
        "attn_uses_sequence_id": False,
        "clip_qkv": None,
        "prefix_lm": False,
        "qk_ln": False,
        "softmax_scale": None,
    },
    "auto_map": {"AutoConfig": "configuration_mpt.MPTConfig", "AutoModelForCausalLM": "modeling_mpt.MPTForCausalLM"},
    "d_model": 32,
    "emb_pdrop": 0,
    "embedding_fraction": 1.0,
    "expansion_ratio": 4,
    "init_config": {
        "emb_init_std": None,
        "emb_init_uniform_lim": None,
        "fan_mode": "fan_in",
        "init_div_is_residual": True,
        "init_gain": 0,
        "init_nonlinearity": "relu",
        "init_std": 0.02,
        "name": "kaiming_normal_",
        "verbose": 0,
    },
    "init_device": "cpu",
    "learned_pos_emb": True,
    "logit_scale": None,
    "max_seq_len": 16,
    "model_type": "mpt",
    "n_heads": 4,
    "n_layers": 2,
    "no_bias": True,
    "norm_type": "low_precision_layernorm",
    "resid_pdrop": 0,
    "tokenizer_name": "EleutherAI/gpt-neox-20b",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.28.1",
    "use_cache": False,
    "verbose": 0,
    "vocab_size": 50,
}


def _state(model: MptForCausalLM) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}


def _assert_params_equal(a, b):
    flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
    flat_b = dict(jax.tree_util.tree_flatten_with_path(b)[0])
    assert len(flat_a) == len(flat_b)
    for path, x in flat_a:
        y = flat_b[path]
        assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y)), jax.tree_util.keystr(path)


def test_safetensors_single_and_sharded_agree(tmp_path):
    model = random_hf_model(seed=0, **SMALL)
    model.save_pretrained(tmp_path / "single")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert os.path.isfile(tmp_path / "sharded" / "model.safetensors.index.json")
    cfg1, p1 = load_hf(tmp_path / "single")
    cfg2, p2 = load_hf(tmp_path / "sharded")
    assert cfg1 == cfg2
    _assert_params_equal(p1, p2)


@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pytorch_bin_with_remote_code_config(tmp_path, shards, dtype):
    """The released hub layout: remote-code config.json and pytorch_model*.bin (bf16), single or sharded."""
    model = random_hf_model(seed=1, **SMALL)
    model.save_pretrained(tmp_path / "ref")
    state = {k: v.to(dtype) for k, v in _state(model).items()}
    write_bin_checkpoint(str(tmp_path / "bin"), REMOTE_CODE_CONFIG, state, shards=shards)
    cfg, params = load_hf(tmp_path / "bin")
    ref_cfg, ref_params = load_hf(tmp_path / "ref", dtype="bfloat16" if dtype == torch.bfloat16 else None)
    assert cfg.init_std == 0.02  # from init_config; transformers' native config has no init_config
    assert cfg.replace(init_std=None) == ref_cfg
    _assert_params_equal(params, ref_params)


def test_composer_prefix_and_fused_norm_keys(tmp_path):
    """llm-foundry exports with a 'model.' prefix or fuse_norm_attn_norm keys read the same."""
    model = random_hf_model(seed=2, **SMALL)
    model.save_pretrained(tmp_path / "ref")
    state = {}
    for k, v in _state(model).items():
        k = k.replace(".norm_1.", ".norm_attn_norm.norm_1.").replace(".attn.", ".norm_attn_norm.attn.")
        state["model." + k] = v
    write_bin_checkpoint(str(tmp_path / "composer"), REMOTE_CODE_CONFIG, state)
    _, params = load_hf(tmp_path / "composer")
    _, ref = load_hf(tmp_path / "ref")
    _assert_params_equal(params, ref)


@pytest.mark.parametrize(
    "cfg",
    [
        MPTConfig(**SMALL),
        MPTConfig(**SMALL, attn_type="grouped_query_attention", kv_n_heads=2, qk_ln=True, no_bias=False),
        MPTConfig(**SMALL, attn_type="multiquery_attention", ffn_type="mptglu", expansion_ratio=3),
        MPTConfig(**SMALL, alibi=False, learned_pos_emb=True, tie_word_embeddings=False, logit_scale=0.5),
        MPTConfig(**SMALL, norm_type="rmsnorm", no_bias=False, qk_gn=True, attention_bias=False),
        MPTConfig(**SMALL, fused_qkv=False, attention_bias=True, attn_type="grouped_query_attention", kv_n_heads=2),
        MPTConfig(**SMALL, fused_qkv=False, qk_ln=True, norm_type="layernorm", no_bias=False),
        MPTConfig(
            **SMALL,
            alibi=False,
            rope=True,
            rope_impl="hf",
            rope_hf_type="llama3",
            rope_hf_factor=8.0,
            rope_hf_low_freq_factor=1.0,
            rope_hf_high_freq_factor=4.0,
            rope_hf_original_max_position_embeddings=64,
            sliding_window_size=4,
            attn_logit_softcapping=30.0,
            final_logit_softcapping=20.0,
        ),
        MPTConfig(**SMALL, alibi=False, rope=True, rope_dail_type="xpos", attn_temperature_attn_scale=0.1),
    ],
    ids=[
        "mha",
        "gqa_qkln_bias",
        "mqa_glu",
        "learned_pos_untied",
        "rmsnorm_qkgn_biases_no_attn_bias",
        "unfused_gqa_attn_bias",
        "unfused_qkln_layernorm",
        "rope_llama3_window_softcaps",
        "rope_xpos_temperature",
    ],
)
def test_jax_hf_jax_round_trip_every_option(tmp_path, cfg):
    """Options transformers ignores still round-trip exactly through our own HF files."""
    params = jax.tree.map(np.asarray, init_params(cfg, jax.random.key(0)))
    save_hf(cfg, params, tmp_path / "hf", max_shard_bytes=4096)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(hf_keys(cfg))
    cfg2, params2 = load_hf(tmp_path / "hf")
    assert cfg2 == cfg
    _assert_params_equal(params, params2)


def test_sharded_output_loads_in_transformers(tmp_path):
    cfg = MPTConfig(**SMALL)
    params = init_params(cfg, jax.random.key(1))
    save_hf(cfg, params, tmp_path / "hf", max_shard_bytes=10_000)
    shards = [f for f in os.listdir(tmp_path / "hf") if f.endswith(".safetensors")]
    assert len(shards) > 2
    model = MptForCausalLM.from_pretrained(tmp_path / "hf")
    np.testing.assert_array_equal(model.transformer.wte.weight.detach().numpy(), np.asarray(params["wte"]["embedding"]))


# ----------------------------------------------------------------------------------------------
# Bad input.


def _hf_folder(tmp_path) -> str:
    folder = tmp_path / "src"
    saved_hf_model(folder, seed=3, **SMALL)
    return str(folder)


def _rewrite(folder: str, edit) -> None:
    from safetensors.numpy import save_file

    tensors = safetensors_dict(folder)
    edit(tensors)
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})


def test_missing_tensor_is_named(tmp_path):
    folder = _hf_folder(tmp_path)
    _rewrite(folder, lambda t: t.pop("transformer.blocks.1.ffn.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensor\(s\) transformer\.blocks\.1\.ffn\.up_proj\.weight"):
        load_hf(folder)


def test_extra_tensor_is_named(tmp_path):
    folder = _hf_folder(tmp_path)
    _rewrite(folder, lambda t: t.update({"transformer.blocks.2.norm_1.weight": np.ones(32, np.float32)}))
    with pytest.raises(ValueError, match=r"unexpected tensor\(s\) transformer\.blocks\.2\.norm_1\.weight"):
        load_hf(folder)


def test_misshaped_tensor_names_key_and_both_shapes(tmp_path):
    folder = _hf_folder(tmp_path)
    _rewrite(folder, lambda t: t.update({"transformer.blocks.0.attn.Wqkv.weight": np.zeros((96, 31), np.float32)}))
    with pytest.raises(
        ValueError, match=r"transformer\.blocks\.0\.attn\.Wqkv\.weight has shape \(96, 31\), expected \(96, 32\)"
    ):
        load_hf(folder)


def test_no_weights_or_config_or_bad_json(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf(empty)
    (empty / "config.json").write_text(json.dumps(REMOTE_CODE_CONFIG))
    with pytest.raises(FileNotFoundError, match="no weights"):
        load_hf(empty)
    (empty / "config.json").write_text('{"model_type": "mpt",\n "d_model": 32,,}')
    with pytest.raises(ValueError, match=r"config\.json: line 2"):
        load_hf(empty)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        load_hf(tmp_path / "does" / "not" / "exist")


# What llm-foundry 0.22's MPTForCausalLM.save_pretrained writes for a small ALiBi model (all its keys).
LLMFOUNDRY_CONFIG = {
    "architectures": ["MPTForCausalLM"],
    "attention_bias": True,
    "attn_config": {
        "alibi": True,
        "alibi_bias_max": 8,
        "attn_impl": "torch",
        "attn_logit_softcapping": None,
        "attn_pdrop": 0.0,
        "attn_temperature_tuning": {"attn_scale": 0.0, "floor_scale": 8192},
        "attn_type": "multihead_attention",
        "attn_uses_sequence_id": False,
        "clip_qkv": None,
        "fused_qkv": True,
        "kv_dim": None,
        "nope": False,
        "qk_gn": False,
        "qk_ln": False,
        "rope": False,
        "rope_dail_config": {"pos_idx_in_fp32": True, "type": "original", "xpos_scale_base": 512},
        "rope_hf_config": {"factor": 1.0, "type": "no_scaling"},
        "rope_impl": "dail",
        "rope_theta": 10000,
        "sliding_window_size": -1,
        "softmax_scale": None,
    },
    "block_overrides": None,
    "d_model": 32,
    "emb_pdrop": 0.0,
    "embedding_fraction": 1.0,
    "expansion_ratio": 4,
    "fc_type": {"name": "torch"},
    "ffn_config": {"fc_type": {"name": "torch"}, "ffn_type": "mptmlp"},
    "final_logit_softcapping": None,
    "head_dim": None,
    "init_config": {
        "emb_init_std": None,
        "emb_init_uniform_lim": None,
        "fan_mode": "fan_in",
        "init_div_is_residual": True,
        "init_gain": 0.0,
        "init_nonlinearity": "relu",
        "init_std": None,
        "name": "kaiming_normal_",
    },
    "init_device": "cpu",
    "learned_pos_emb": False,
    "logit_scale": None,
    "max_seq_len": 16,
    "model_type": "mpt",
    "n_heads": 4,
    "n_layers": 2,
    "no_bias": False,
    "norm_eps": 1e-05,
    "norm_type": "low_precision_layernorm",
    "resid_pdrop": 0.0,
    "torch_dtype": "float32",
    "transformers_version": "4.51.3",
    "use_cache": False,
    "use_pad_tok_in_ffn": True,
    "vocab_size": 50,
}
# The attn_config keys llm-foundry 0.22 accepts: its attention classes' keyword arguments plus the keys
# MPTBlock keeps from them. Anything else (e.g. the removed prefix_lm) fails its model construction.
LLMFOUNDRY_ATTN_KEYS = {
    "attn_type", "alibi", "attn_uses_sequence_id", "alibi_bias_max", "rope", "rope_theta", "rope_impl",
    "rope_dail_config", "rope_hf_config", "attn_impl", "clip_qkv", "qk_ln", "qk_gn", "fused_qkv", "softmax_scale",
    "attn_pdrop", "sliding_window_size", "attn_logit_softcapping", "attn_temperature_tuning", "kv_dim", "nope",
    "kv_n_heads",
}  # fmt: skip


def test_reads_llmfoundry_config():
    cfg = MPTConfig.from_hf(LLMFOUNDRY_CONFIG)
    assert (cfg.no_bias, cfg.qkv_bias, cfg.alibi, cfg.uses_learned_pos_emb) == (False, True, True, False)


@pytest.mark.parametrize(
    "cfg",
    [
        MPTConfig(**SMALL),
        MPTConfig(**SMALL, attn_type="grouped_query_attention", kv_n_heads=2, qk_gn=True, sliding_window_size=3),
        MPTConfig(**SMALL, alibi=False, rope=True, rope_impl="hf", rope_hf_type="linear", rope_hf_factor=2.0),
    ],
    ids=["mha", "gqa_qkgn_window", "rope_hf_linear"],
)
def test_written_config_has_only_keys_llmfoundry_accepts(cfg):
    """Every attn_config key we write is one llm-foundry 0.22 passes to its attention layer (no prefix_lm),
    and the config reads back unchanged."""
    written = cfg.to_hf()
    assert set(written["attn_config"]) <= LLMFOUNDRY_ATTN_KEYS, set(written["attn_config"]) - LLMFOUNDRY_ATTN_KEYS
    assert "prefix_lm" not in written["attn_config"]
    assert MPTConfig.from_hf(written) == cfg


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(block_overrides={"order": [], "overrides": {}}), "block_overrides"),
        (dict(head_dim=4), "head_dim=4"),
        (dict(some_new_option=1), "unknown MPT config key.*some_new_option"),
        (dict(attn_config=dict(LLMFOUNDRY_CONFIG["attn_config"], kv_dim=16)), "kv_dim=16"),
        (dict(attn_config=dict(LLMFOUNDRY_CONFIG["attn_config"], nope=True)), "nope"),
        (dict(attn_config=dict(LLMFOUNDRY_CONFIG["attn_config"], prefix_lm=True)), "prefix_lm"),
        (dict(attn_config=dict(LLMFOUNDRY_CONFIG["attn_config"], new_attn_key=0)), "attn_config.new_attn_key"),
        (dict(attn_config=dict(LLMFOUNDRY_CONFIG["attn_config"], rope_hf_config={"type": "yarn"})), "rope_hf_type"),
        (dict(ffn_config={"ffn_type": "mb_moe"}), "ffn_config.ffn_type='mb_moe'"),
        (dict(ffn_config={"ffn_type": "mptmlp", "ffn_act_fn": {"name": "hardtanh"}}), "hardtanh"),
        (
            dict(ffn_config={"ffn_type": "mptmlp", "ffn_act_fn": {"name": "leaky_relu", "negative_slope": 0.2}}),
            "negative_slope",
        ),
        (dict(norm_type="triton_layernorm"), "norm_type='triton_layernorm'"),
        (dict(fc_type={"name": "custom"}), "fc_type"),
        (dict(attn_config=dict(LLMFOUNDRY_CONFIG["attn_config"], clip_qkv="6")), "clip_qkv='6': must be float"),
    ],
)
def test_unknown_or_unsupported_keys_are_named(change, match):
    """An option that would change the math and that we do not implement is an error naming it."""
    with pytest.raises(ValueError, match=match):
        MPTConfig.from_hf(dict(LLMFOUNDRY_CONFIG, **change))


def test_bad_config_values_are_named(tmp_path):
    bad = dict(REMOTE_CODE_CONFIG, n_heads=5)
    with pytest.raises(ValueError, match=r"d_model=32: must be divisible by n_heads=5"):
        MPTConfig.from_hf(bad)
    gqa = dict(REMOTE_CODE_CONFIG, attn_config={"attn_type": "grouped_query_attention", "kv_n_heads": 3})
    with pytest.raises(ValueError, match="kv_n_heads"):
        MPTConfig.from_hf(gqa)
    with pytest.raises(ValueError, match="model_type"):
        MPTConfig.from_hf(dict(REMOTE_CODE_CONFIG, model_type="llama"))


def test_save_params_mismatch_is_error_and_writes_nothing(tmp_path):
    cfg = MPTConfig(**SMALL)
    params = jax.tree.map(np.asarray, init_params(cfg, jax.random.key(0)))
    params["blocks"]["ffn"]["up_proj"]["kernel"] = params["blocks"]["ffn"]["up_proj"]["kernel"][:, :, :-1]
    with pytest.raises(
        ValueError, match=r"blocks/ffn/up_proj/kernel has shape \(2, 32, 127\), expected \(2, 32, 128\)"
    ):
        save_hf(cfg, params, tmp_path / "out")
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------------------------
# The CLI.


def test_cli_round_trip_refuses_overwrite_and_leaves_nothing_half_written(tmp_path, capsys):
    src = _hf_folder(tmp_path)
    (tmp_path / "src" / "tokenizer.json").write_text('{"version": "1.0"}')
    jax_dir, hf_dir = str(tmp_path / "jax"), str(tmp_path / "hf")
    assert convert_cli.main(["hf_to_jax", src, jax_dir]) == 0
    cfg, params = load_model(jax_dir)
    assert cfg == load_hf(src)[0]
    assert os.path.isfile(os.path.join(jax_dir, "tokenizer", "tokenizer.json"))
    assert convert_cli.main(["jax_to_hf", jax_dir, hf_dir, "--max_shard_size=30KB"]) == 0
    a, b = safetensors_dict(src), safetensors_dict(hf_dir)
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
    assert os.path.isfile(os.path.join(hf_dir, "tokenizer.json"))

    # Existing outputs are kept unless --overwrite.
    before = sorted(os.listdir(hf_dir))
    assert convert_cli.main(["jax_to_hf", jax_dir, hf_dir]) == 1
    assert "exists" in capsys.readouterr().err
    assert sorted(os.listdir(hf_dir)) == before
    assert convert_cli.main(["jax_to_hf", jax_dir, hf_dir, "--overwrite"]) == 0
    assert "model.safetensors" in os.listdir(hf_dir)  # one shard at the default size

    # A failing conversion leaves neither DST nor a temporary folder behind.
    _rewrite(src, lambda t: t.pop("transformer.norm_f.weight"))
    assert convert_cli.main(["hf_to_jax", src, str(tmp_path / "broken")]) == 1
    assert "transformer.norm_f.weight" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["hf", "jax", "src"]


def test_hub_id_downloads_one_weight_format(tmp_path, monkeypatch):
    """A hub id is fetched with snapshot_download, asking only for the safetensors when the repo has
    them (the released mosaicml repos hold .bin files only, and then those are fetched)."""
    import huggingface_hub

    folder = _hf_folder(tmp_path)
    calls = []

    def fake_snapshot(repo_id, allow_patterns):
        calls.append((repo_id, allow_patterns))
        return folder

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    monkeypatch.setattr(mpt_jax.hf, "_hub_unreachable", lambda: None)  # a hub that answers
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo: ["config.json", "model.safetensors"])
    cfg, _ = load_hf("someone/mpt-tiny")
    assert cfg.d_model == SMALL["d_model"]
    assert calls[-1][0] == "someone/mpt-tiny" and "*.safetensors" in calls[-1][1] and "*.bin" not in calls[-1][1]
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo: ["config.json", "pytorch_model.bin"])
    load_hf("mosaicml/mpt-tiny")
    assert "*.bin" in calls[-1][1] and "*.safetensors" not in calls[-1][1]

    def offline(repo):
        raise OSError("network unreachable")

    monkeypatch.setattr(huggingface_hub, "list_repo_files", offline)
    with pytest.raises(FileNotFoundError, match="mosaicml/mpt-7b: not a local folder, and the hub could not list it"):
        load_hf("mosaicml/mpt-7b")


def test_unreachable_hub_fails_at_once_or_uses_the_cache(tmp_path, monkeypatch):
    """Without a connection, a hub-shaped path that is not a local folder (workdirs/tiny before
    workdirs/ exists) is an error within seconds, not the hub client's half minute of retries; a
    model in the local hub cache still loads."""
    import socket
    import time

    import huggingface_hub

    def no_route(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(socket, "create_connection", no_route)
    monkeypatch.chdir(tmp_path)
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match=r"no such folder: workdirs/tiny; .* hub cannot be reached"):
        load_hf("workdirs/tiny")
    assert time.perf_counter() - start < 5
    folder = _hf_folder(tmp_path)

    def cached(repo_id, allow_patterns, local_files_only):
        assert local_files_only
        return folder

    monkeypatch.setattr(huggingface_hub, "snapshot_download", cached)
    assert load_hf("someone/cached-mpt")[0].d_model == SMALL["d_model"]
