"""Every config file loads, validates, and the released sizes have the released parameter counts."""

from __future__ import annotations

import glob
import importlib.util
import os
import subprocess
import sys

import pytest

from mpt_jax.config import MPTConfig
from mpt_jax.model import count_params
from mpt_jax.run_config import model_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))
SIZES = ["tiny", "125m", "350m", "760m", "1b", "3b", "7b", "13b", "30b", "70b"]


def load(name: str):
    """Imports configs/<name>.py the way --config=<path> does (by path, not as a package)."""
    spec = importlib.util.spec_from_file_location(f"config_{name}", os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_size_has_a_config():
    names = {os.path.basename(p)[:-3] for p in CONFIGS}
    assert set(SIZES) <= names


@pytest.mark.parametrize("name", SIZES)
def test_config_validates(name):
    cfg = model_config(load(name).get_config())
    assert isinstance(cfg, MPTConfig)
    assert cfg.alibi and cfg.no_bias and cfg.tie_word_embeddings


@pytest.mark.parametrize(
    "name, count, shape",
    [
        ("7b", 6_649_286_656, (4096, 32, 32, 2048, 50432)),
        ("30b", 29_957_200_896, (7168, 64, 48, 8192, 50432)),
    ],
)
def test_released_models(name, count, shape):
    """configs/7b.py and 30b.py are the released models, counted from jax.eval_shape (no allocation)."""
    cfg = model_config(load(name).get_config())
    assert (cfg.d_model, cfg.n_heads, cfg.n_layers, cfg.max_seq_len, cfg.vocab_size) == shape
    assert count_params(cfg) == count


def test_sizes_are_increasing():
    counts = [count_params(model_config(load(n).get_config())) for n in SIZES]
    assert counts == sorted(counts)
    assert 100e6 < counts[1] < 150e6 and 60e9 < counts[-1] < 70e9


def _docs_table() -> list[dict[str, str]]:
    """The rows of docs/configs.md's table of sizes, by column name."""
    with open(os.path.join(ROOT, "docs", "configs.md"), encoding="utf-8") as f:
        rows = [line.strip().strip("|").split("|") for line in f if line.startswith("| ")]
    header = [c.strip() for c in rows[0]]
    return [dict(zip(header, (c.strip() for c in row), strict=True)) for row in rows[2:]]


def test_docs_table_matches_the_config_files():
    """Every number in docs/configs.md's table is the config file's (parameters by count_params)."""
    rows = _docs_table()
    assert [r["config"] for r in rows] == SIZES
    for row in rows:
        cfg = model_config(load(row["config"]).get_config())
        n = {k: int(v.replace(",", "")) for k, v in row.items() if v.replace(",", "").isdigit()}
        assert n["parameters"] == count_params(cfg), row["config"]
        assert n["vocabulary"] == cfg.vocab_size, row["config"]
        assert (n["d_model"], n["layers"], n["max_seq_len"]) == (cfg.d_model, cfg.n_layers, cfg.max_seq_len)
        assert row["heads (head_dim)"] == f"{cfg.n_heads} ({cfg.head_dim})", row["config"]


def test_summary_cli_with_override():
    """The README's smoke command; a --config.model override reaches the model."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mpt_jax.summary",
            "--config=configs/tiny.py",
            "--config.model.n_layers=2",
            "--length=32",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "(2, 256, 3, 4, 64)" in out.stdout  # Wqkv of 2 layers
    assert "tokens/s" in out.stdout


def test_unknown_model_field_is_an_error():
    config = load("tiny").get_config()
    config.model.n_hedas = 3
    with pytest.raises(ValueError, match=r"config\.model: unknown MPTConfig field\(s\) \['n_hedas'\]"):
        model_config(config)


def test_7b_expresses_mpt_pretraining_mix():
    from mpt_jax.data.pipeline import DataConfig

    data = DataConfig.from_config(load("7b").get_config().data)
    assert len(data.mixture) == 10 and data.tokenizer == "EleutherAI/gpt-neox-20b"
    assert abs(sum(s.weight for s in data.mixture) - 1.0) < 1e-9
    assert all(s.format == "packed" and s.source.startswith("tokenized:") for s in data.mixture)
