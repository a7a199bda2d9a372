"""The generate and chat CLIs end to end on a small saved model with a real (BPE + ChatML) tokenizer."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import jax
import pytest

from mpt_jax import MPTConfig
from mpt_jax.chat import Chat, run
from mpt_jax.checkpoint import save_model
from mpt_jax.data.pipeline import DataConfig, get_tokenizer
from mpt_jax.generate import Generator
from mpt_jax.model import init_params
from mpt_jax.prompts import prompt_format

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def model_dir(stdlib_data_dir, tmp_path_factory):
    tok = get_tokenizer(DataConfig.from_config({"source": "stdlib", "data_dir": stdlib_data_dir})).with_chatml()
    cfg = MPTConfig(d_model=64, n_heads=2, n_layers=2, max_seq_len=128, vocab_size=8256).validate()
    params = jax.tree.map(lambda x: x * 3.0, init_params(cfg, jax.random.key(0)))  # peakier: varied text
    path = str(tmp_path_factory.mktemp("cli") / "model")
    save_model(path, cfg, params, tokenizer=tok)
    return path


def _cli(args: list[str], stdin: str = "") -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", *args], input=stdin, capture_output=True, text=True, timeout=600, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_generate_cli_streams_the_greedy_text(model_dir):
    from mpt_jax.load import load

    out = _cli(
        ["mpt_jax.generate", f"--model={model_dir}", "--prompt=def main(", "--temperature=0", "--max_new_tokens=12"]
    )
    cfg, params, tok = load(model_dir)
    want = Generator(cfg, params, tok).generate(["def main("], max_new_tokens=12, temperature=0.0)[0].text
    assert want and out.stdout == want + "\n"


def test_generate_cli_batch_file_and_bad_input(model_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("import os\nclass A:\n")
    out = _cli(["mpt_jax.generate", f"--model={model_dir}", f"--prompts={prompts}", "--max_new_tokens=5", "--seed=3"])
    assert out.stdout.count("=== ") == 2 and "import os" in out.stdout and "class A:" in out.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "mpt_jax.generate", f"--model={model_dir}", "--prompt=x", "--temperature=-1"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert bad.returncode != 0 and "temperature" in bad.stderr and len(bad.stderr.strip().splitlines()) <= 3
    missing = subprocess.run(
        [sys.executable, "-m", "mpt_jax.generate", "--model=./no/such/model", "--prompt=x"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert missing.returncode != 0 and "no such" in missing.stderr


def test_generate_cli_wraps_prompts_in_a_format(model_dir):
    """--format=chatml renders the prompt as a ChatML user turn (the output continues that prompt)."""
    from mpt_jax.load import load
    from mpt_jax.prompts import prompt_format, render_chat

    args = ["mpt_jax.generate", f"--model={model_dir}", "--prompt=hi", "--temperature=0", "--max_new_tokens=6"]
    out = _cli([*args, "--format=chatml", "--system=S"])
    cfg, params, tok = load(model_dir)
    text = render_chat([{"role": "user", "content": "hi"}], prompt_format(tok, "chatml"), tok, system="S")
    want = Generator(cfg, params, tok).generate([text], max_new_tokens=6, temperature=0.0)[0].text
    assert out.stdout == want + "\n"


def test_chat_cli_through_stdin(model_dir):
    """Two turns, a reset and an exit through stdin: each reply is printed after 'assistant> '."""
    out = _cli(
        ["mpt_jax.chat", f"--model={model_dir}", "--temperature=0", "--max_new_tokens=8", "--system=Be brief."],
        stdin="What is len?\nAnd str?\n/reset\nhello\n/exit\nnot read\n",
    )
    assert out.stdout.count("assistant> ") == 3
    assert "(conversation forgotten)" in out.stdout


def test_chat_keeps_history_and_drops_the_oldest_turns(model_dir):
    from mpt_jax.load import load

    cfg, params, tok = load(model_dir)
    gen = Generator(cfg, params, tok, max_batch=1)
    chat = Chat(gen, prompt_format(tok), system="S", max_new_tokens=8, temperature=0.0)
    stdout = io.StringIO()
    run(chat, io.StringIO("first question\nsecond question\n"), stdout, interactive=False)
    assert [t["role"] for t in chat.turns] == ["user", "assistant", "user", "assistant"]
    prompt = tok.decode(chat._prompt())  # the whole history so far
    assert "first question" in prompt and "second question" in prompt and prompt.startswith("<|im_start|>system\nS")
    long = "word " * 60  # each turn ~60 tokens: two no longer fit in 128 - 8
    for _ in range(3):
        chat.reply(long, lambda s: None)
    assert chat.dropped > 0 and len(tok.encode(tok.decode(chat._prompt()))) <= cfg.max_seq_len - 8
    assert chat.turns[-1]["role"] == "assistant"
