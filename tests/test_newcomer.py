"""The path a new user follows, with the commands and relative paths the README and docs give:

    python -m mpt_jax.train --config=configs/tiny.py                  # -> workdirs/tiny
    python -m mpt_jax.train --config=configs/tiny_chat.py             # init_from=workdirs/tiny
    python -m mpt_jax.convert jax_to_hf workdirs/tiny_chat hf/tiny_chat
    python -m mpt_jax.chat --model=workdirs/tiny_chat          # and generate, driven through stdin

then the HF folder loads in transformers (model and tokenizer) and generates; its greedy tokens are
our model's. Only the run lengths are shortened; the model, the data and every path are the defaults.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHORT = [
    "--config.train.max_steps=4",
    "--config.train.global_batch_size=4",
    "--config.train.seq_len=64",
    "--config.train.eval_every=4",
    "--config.train.eval_batches=1",
    "--config.train.progress=False",
    "--config.schedule.t_warmup=1",
]


def _run(args: list[str], cwd: str, env: dict, stdin: str = "") -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", *args], cwd=cwd, env=env, input=stdin, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stderr[-3000:]}"
    return done


@pytest.mark.slow
def test_train_finetune_to_chat_convert_and_generate_in_transformers(stdlib_data_dir, tmp_path):
    from transformers import AutoTokenizer, MptForCausalLM

    from mpt_jax import MPT
    from mpt_jax.hf import load_hf

    os.symlink(os.path.join(ROOT, "configs"), tmp_path / "configs")
    env = dict(os.environ, MPT_JAX_DATA_DIR=stdlib_data_dir)
    cwd = str(tmp_path)
    done = _run(["mpt_jax.train", "--config=configs/tiny.py", *SHORT], cwd, env)
    assert "host memory: each step reuses" in done.stderr  # CPU-only: host_memory.reuse_step_memory applied
    _run(["mpt_jax.train", "--config=configs/tiny_chat.py", *SHORT], cwd, env)
    _run(["mpt_jax.convert", "jax_to_hf", "workdirs/tiny_chat", "hf/tiny_chat"], cwd, env)
    chat = ["mpt_jax.chat", "--model=workdirs/tiny_chat", "--temperature=0", "--max_new_tokens=8"]
    assert _run(chat, cwd, env, stdin="What does len do?\n").stdout.count("assistant> ") == 1
    gen = ["mpt_jax.generate", "--model=workdirs/tiny_chat", "--prompt=import os", "--max_new_tokens=8"]
    assert _run(gen, cwd, env).stdout.strip()

    with open(tmp_path / "workdirs" / "tiny_chat" / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records if "loss" in r] == sorted({r["step"] for r in records if "loss" in r})
    assert any(np.isfinite(r.get("eval_loss", np.nan)) for r in records)  # eval on stdlib-chat's held-out split

    folder = str(tmp_path / "hf" / "tiny_chat")
    tok = AutoTokenizer.from_pretrained(folder)
    prompt = tok.apply_chat_template(
        [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What does len do?"},
        ],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    ids = tok(prompt, return_tensors="pt").input_ids
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    assert ids[0, 0].item() == im_start  # ChatML tokens are single tokens, as in finetuning
    model = MptForCausalLM.from_pretrained(folder).eval()
    new = 12
    out = model.generate(ids, max_new_tokens=new, do_sample=False)[0, ids.shape[1] :].tolist()
    assert 1 <= len(out) <= new  # fewer when it ends the turn
    assert isinstance(tok.decode(out), str)

    # Our model's greedy continuation of the same prompt, one full forward per token.
    cfg, params = load_hf(folder, dtype="float32")
    forward = jax.jit(lambda p, t: MPT(cfg).apply({"params": p}, t)[:, -1])
    tokens = ids[0].tolist()
    for _ in range(len(out)):
        tokens.append(int(jnp.argmax(forward(params, jnp.asarray([tokens])), axis=-1)[0]))
    assert tokens[ids.shape[1] :] == out
