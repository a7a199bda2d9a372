"""python -m mpt_jax.convert: a training run to an HF folder (tokenizer included), DST refused before
anything loads, outputs whole or absent, and only our own log lines.

Training workdirs here are written by the trainer's own checkpoint class (TrainCheckpoints) from a
fresh train state, without running the data pipeline; the slow test converts a real training run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from hf_utils import hf_logits, random_hf_model, safetensors_dict, saved_hf_model
from workdir_utils import make_workdir, train_tiny

from mpt_jax import MPT, MPTConfig, checkpoint
from mpt_jax import convert as convert_cli
from mpt_jax.data.formats import render_chatml
from mpt_jax.data.tokenizer import Tokenizer, load_tokenizer, train_bpe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = MPTConfig(d_model=32, n_heads=4, n_layers=2, max_seq_len=16, vocab_size=320)
TEXTS = ["def add(a, b):\n    return a + b\n", "import os\nprint(os.getcwd())\n", "class A:\n    pass\n"] * 20


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.json")
    train_bpe(TEXTS, 300).save(path)
    return path


def our_logits(params, tokens):
    return np.asarray(MPT(CFG).apply({"params": params}, tokens))


def listing(folder) -> list[str]:
    return sorted(os.listdir(folder))


# ----------------------------------------------------------------------------------------------
# A training workdir to HF.


def test_workdir_to_hf_loads_in_transformers_with_our_logits_and_tokenizer(tmp_path, tokenizer_file):
    from transformers import AutoTokenizer, MptForCausalLM

    saved = make_workdir(tmp_path / "run", CFG, tokenizer_file)
    dst = str(tmp_path / "hf")
    assert convert_cli.main(["jax_to_hf", str(tmp_path / "run"), dst]) == 0
    model = MptForCausalLM.from_pretrained(dst).eval()
    tokens = np.array([[5, 17, 200, 3, 299, 1, 42, 8]])
    np.testing.assert_allclose(hf_logits(model, tokens), our_logits(saved[2], tokens), atol=1e-5, rtol=0)
    hf_tok = AutoTokenizer.from_pretrained(dst)
    ours = load_tokenizer(tokenizer_file)
    text = "def add(a, b):\n    return a + b\n"
    assert hf_tok(text)["input_ids"] == ours.encode(text)
    assert hf_tok.eos_token == "<|endoftext|>" and hf_tok.eos_token_id == ours.eos_id
    assert hf_tok.chat_template is None


def test_step_picks_the_checkpoint_and_a_missing_step_lists_the_steps(tmp_path, tokenizer_file, capsys):
    saved = make_workdir(tmp_path / "run", CFG, tokenizer_file)
    dst = str(tmp_path / "hf1")
    assert convert_cli.main(["jax_to_hf", str(tmp_path / "run"), dst, "--step=1"]) == 0
    got = safetensors_dict(dst)["transformer.norm_f.weight"]
    np.testing.assert_array_equal(got, saved[1]["norm_f"]["scale"])
    assert not np.array_equal(safetensors_dict(dst)["transformer.wte.weight"], saved[2]["wte"]["embedding"])
    capsys.readouterr()
    assert convert_cli.main(["jax_to_hf", str(tmp_path / "run"), str(tmp_path / "hf3"), "--step=3"]) == 1
    err = capsys.readouterr().err
    assert "no checkpoint at step 3; its steps are [1, 2]" in err and len(err.splitlines()) == 1
    assert not os.path.exists(tmp_path / "hf3")


def test_chat_run_carries_chatml_tokens_and_template(tmp_path, tokenizer_file):
    from transformers import AutoTokenizer

    make_workdir(tmp_path / "run", CFG, tokenizer_file, chat=True, at=(1,))
    dst = str(tmp_path / "hf")
    assert convert_cli.main(["jax_to_hf", str(tmp_path / "run"), dst]) == 0
    hf_tok = AutoTokenizer.from_pretrained(dst)
    ours = load_tokenizer(tokenizer_file).with_chatml()
    assert hf_tok.convert_tokens_to_ids("<|im_start|>") == ours.token_to_id("<|im_start|>") == ours.vocab_size - 2
    assert hf_tok.convert_tokens_to_ids("<|im_end|>") == ours.token_to_id("<|im_end|>")
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "def f(): pass"}]
    for prompt in (False, True):
        text = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
        assert text == render_chatml(messages, add_generation_prompt=prompt)
    text = render_chatml(messages)
    assert hf_tok(text)["input_ids"] == ours.encode(text)


def test_uncached_stdlib_bpe_converts_without_a_tokenizer_and_says_so(tmp_path, caplog):
    make_workdir(tmp_path / "run", CFG, "stdlib-bpe", at=(1,), data_dir=str(tmp_path / "empty"))
    dst = str(tmp_path / "hf")
    assert convert_cli.main(["jax_to_hf", str(tmp_path / "run"), dst]) == 0
    assert "config.json" in listing(dst) and "tokenizer.json" not in listing(dst)
    assert any(
        "no tokenizer written" in r.getMessage() and "python_stdlib_bpe" in r.getMessage() for r in caplog.records
    )


def test_sources_that_are_not_mpt_jax_are_named(tmp_path, capsys):
    model = random_hf_model(seed=0, d_model=32, n_heads=4, n_layers=2, max_seq_len=16, vocab_size=50)
    model.save_pretrained(tmp_path / "hf_src")
    assert convert_cli.main(["jax_to_hf", str(tmp_path / "hf_src"), str(tmp_path / "out")]) == 1
    assert "is already an HF folder" in capsys.readouterr().err
    (tmp_path / "empty_run" / "checkpoints").mkdir(parents=True)
    assert convert_cli.main(["jax_to_hf", str(tmp_path / "empty_run"), str(tmp_path / "out")]) == 1
    assert "a training workdir without checkpoints" in capsys.readouterr().err
    assert convert_cli.main(["jax_to_hf", str(tmp_path / "nothing"), str(tmp_path / "out")]) == 1
    assert "no such folder" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")


# ----------------------------------------------------------------------------------------------
# DST: refused before loading; whole or absent.


def test_existing_dst_is_refused_before_anything_loads(tmp_path, tokenizer_file, monkeypatch, capsys):
    import mpt_jax.hf

    make_workdir(tmp_path / "run", CFG, tokenizer_file, at=(1,))
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("mine")

    def must_not_load(*args, **kwargs):
        raise AssertionError("loaded before checking DST")

    monkeypatch.setattr(checkpoint, "load_params_any", must_not_load)
    monkeypatch.setattr(checkpoint, "load_model", must_not_load)
    monkeypatch.setattr(mpt_jax.hf, "resolve_hf_path", must_not_load)
    for direction, src in (("jax_to_hf", tmp_path / "run"), ("hf_to_jax", "mosaicml/mpt-30b")):
        assert convert_cli.main([direction, str(src), str(tmp_path / "hf")]) == 1
        err = capsys.readouterr().err
        assert "exists; pass --overwrite" in err and len(err.splitlines()) == 1
    assert listing(tmp_path / "hf") == ["keep.txt"]
    # DST that would replace SRC is refused even with --overwrite.
    assert convert_cli.main(["jax_to_hf", str(tmp_path / "run"), str(tmp_path), "--overwrite"]) == 1
    assert "writing DST would replace SRC" in capsys.readouterr().err
    assert listing(tmp_path / "run") == ["checkpoints"]


def _no_temporaries(folder) -> bool:
    return not [n for n in os.listdir(folder) if ".tmp-" in n or ".old-" in n]


def test_a_failure_while_writing_the_tokenizer_leaves_dst_absent_or_as_it_was(tmp_path, tokenizer_file, monkeypatch):
    """The tokenizer is written inside the temporary folder: a failure there leaves no DST, and an
    existing DST (--overwrite) untouched."""
    make_workdir(tmp_path / "run", CFG, tokenizer_file, at=(1,))

    def disk_full(self, folder):
        with open(os.path.join(folder, "tokenizer.json"), "w") as f:
            f.write("{")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Tokenizer, "save_pretrained", disk_full)
    assert convert_cli.main(["jax_to_hf", str(tmp_path / "run"), str(tmp_path / "hf")]) == 1
    assert not os.path.exists(tmp_path / "hf") and _no_temporaries(tmp_path)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "old.txt").write_text("previous export")
    assert convert_cli.main(["jax_to_hf", str(tmp_path / "run"), str(tmp_path / "hf"), "--overwrite"]) == 1
    assert listing(tmp_path / "hf") == ["old.txt"] and _no_temporaries(tmp_path)

    # hf_to_jax: the tokenizer copy fails after the params are written.
    src = tmp_path / "src"
    saved_hf_model(src, seed=0, d_model=32, n_heads=4, n_layers=2, max_seq_len=16, vocab_size=50)
    (src / "tokenizer.json").write_text('{"version": "1.0"}')
    (src / "tokenizer_config.json").write_text("{}")
    copies = []

    def copy_then_fail(a, b):
        copies.append(a)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shutil, "copy2", copy_then_fail)
    assert convert_cli.main(["hf_to_jax", str(src), str(tmp_path / "jax")]) == 1
    assert copies and not os.path.exists(tmp_path / "jax") and _no_temporaries(tmp_path)
    monkeypatch.undo()
    assert convert_cli.main(["hf_to_jax", str(src), str(tmp_path / "jax")]) == 0
    assert listing(tmp_path / "jax" / "tokenizer") == ["tokenizer.json", "tokenizer_config.json"]


# ----------------------------------------------------------------------------------------------
# Logs (a subprocess: the CLI as a user runs it).


def _convert(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-m", "mpt_jax.convert", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def test_cli_logs_only_its_own_lines(tmp_path, tokenizer_file):
    make_workdir(tmp_path / "run", CFG, tokenizer_file, at=(1,))
    saved_hf_model(tmp_path / "src", seed=0, d_model=32, n_heads=4, n_layers=2, max_seq_len=16, vocab_size=50)
    for args in (
        ("hf_to_jax", str(tmp_path / "src"), str(tmp_path / "jax")),
        ("jax_to_hf", str(tmp_path / "run"), str(tmp_path / "hf")),
    ):
        done = _convert(*args)
        assert done.returncode == 0, done.stderr[-3000:]
        lines = [line for line in done.stderr.splitlines() if line.strip() and "Writing model shards" not in line]
        assert len(lines) <= 4, done.stderr  # was about 150 lines of orbax INFO
        assert "orbax" not in done.stderr.lower() and "INFO:absl" not in done.stderr
        assert f"convert {args[0]}: wrote" in done.stdout


@pytest.mark.slow
def test_a_real_training_run_converts_and_matches(tmp_path, stdlib_data_dir):
    """The documented path: train (2 steps of a small tiny), then convert the workdir; transformers
    gives our logits, and the stdlib BPE the run trained comes along."""
    from transformers import AutoTokenizer, MptForCausalLM

    workdir = str(tmp_path / "run")
    train_tiny(
        workdir,
        stdlib_data_dir,
        "--config.model.d_model=64",
        "--config.model.n_layers=2",
        "--config.train.max_steps=2",
        "--config.train.global_batch_size=2",
        "--config.train.seq_len=32",
        "--config.schedule.t_warmup=1",
    )
    done = _convert("jax_to_hf", workdir, str(tmp_path / "hf"))
    assert done.returncode == 0, done.stderr[-3000:]
    cfg, params = checkpoint.load_params_any(workdir)
    tokens = np.array([[0, 5, 900, 8000, 17, 3]])
    model = MptForCausalLM.from_pretrained(tmp_path / "hf").eval()
    want = np.asarray(MPT(cfg).apply({"params": params}, tokens))
    np.testing.assert_allclose(hf_logits(model, tokens), want, atol=2e-5, rtol=0)
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours = load_tokenizer(os.path.join(stdlib_data_dir, "python_stdlib_bpe8192.json"))
    assert hf_tok("import os\n")["input_ids"] == ours.encode("import os\n")
