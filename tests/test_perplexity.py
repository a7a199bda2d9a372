"""Perplexity: equal to transformers' on the same windows, documents from data sources, the CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hf_utils import hf_and_loaded

from mpt_jax.data.sources import encode_record, write_records
from mpt_jax.data.tokenizer import train_bpe
from mpt_jax.eval.perplexity import perplexity, source_documents
from mpt_jax.eval.scoring import Scorer, rolling_windows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HF_CONFIG = dict(d_model=64, n_heads=4, n_layers=2, max_seq_len=16, vocab_size=300, attn_config={"alibi": True})
TEXTS = [f"def f{i}(x):\n    return x * {i} + {i * i}\n" for i in range(40)]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf")
    hf, cfg, params = hf_and_loaded(folder, seed=4, **HF_CONFIG)
    return hf, cfg, params, str(folder)


def reference_nll(hf, doc: list[int], max_length: int, stride: int | None) -> float:
    """float64 sum over the windows of -log p(target) from transformers' logits, window by window."""
    total = 0.0
    for start, first, end in rolling_windows(len(doc), max_length, stride):
        with torch.no_grad():
            logits = hf(torch.tensor([doc[start : end - 1]])).logits[0].double()
        logp = torch.log_softmax(logits, -1)
        offset = first - start - 1  # input position predicting token `first`
        targets = torch.tensor(doc[first:end])
        total -= float(logp[offset:].gather(-1, targets[:, None]).sum())
    return total


@pytest.mark.parametrize("stride", [None, 5])
def test_perplexity_equals_transformers_on_the_same_windows(model, stride):
    """Documents shorter and up to 3x longer than max_length (16): the summed NLL equals the
    float64 one from transformers' logits within 1e-4 per document, tokens count the real ones."""
    hf, cfg, params, _ = model
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 300, n).tolist() for n in (1, 2, 9, 17, 30, 48)]
    got = perplexity(Scorer(cfg, params, batch_size=3), docs, stride=stride, chunk=4)
    want = sum(reference_nll(hf, d, 16, stride) for d in docs if len(d) > 1)
    tokens = sum(len(d) - 1 for d in docs if len(d) > 1)
    assert got.tokens == tokens and got.documents == 5
    assert abs(got.loss * tokens - want) < 1e-4 * 5
    assert math.isclose(got.perplexity, math.exp(want / tokens), rel_tol=1e-5)


def test_a_smaller_stride_gives_long_documents_more_context(model):
    """Sliding windows score each token with more context, so they differ from disjoint windows on a
    document past max_length (and agree on one within it)."""
    _, cfg, params, _ = model
    scorer = Scorer(cfg, params, batch_size=4)
    doc = np.random.default_rng(1).integers(0, 300, 60).tolist()
    assert perplexity(scorer, [doc]).loss != pytest.approx(perplexity(scorer, [doc], stride=4).loss, abs=1e-4)
    short = doc[:12]
    assert perplexity(scorer, [short]).loss == pytest.approx(perplexity(scorer, [short], stride=4).loss, abs=1e-5)


def test_source_documents_from_files_and_tokenized_shards(tmp_path):
    """A jsonl file is read whole by default, its held-out records only with holdout_fraction; a
    tokenized shard's packed rows come back as their documents (padding dropped)."""
    tok = train_bpe(TEXTS, 300, name="t")
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    whole = list(source_documents(f"files:{path}", tok))
    assert whole == [tok.encode(t) for t in TEXTS]
    held = list(source_documents(f"files:{path}", tok, holdout_fraction=0.2))
    assert 0 < len(held) < len(TEXTS) and all(d in whole for d in held)
    assert len(list(source_documents(f"files:{path}", tok, limit=3))) == 3

    shards = tmp_path / "tok"
    shards.mkdir()
    row = {"tokens": np.array([5, 6, 7, 8, 9, 0], np.int32), "segment_ids": np.array([1, 1, 2, 2, 2, 0], np.int32)}
    write_records(str(shards / "part-0.array_record"), [encode_record(row)])
    (shards / "manifest.json").write_text(json.dumps({"seq_len": 6}))
    assert list(source_documents(f"tokenized:{shards}", None)) == [[5, 6], [7, 8, 9]]


def test_cli_writes_results_once(model, tmp_path):
    """`python -m mpt_jax.eval perplexity` prints and writes the result; the same --output again
    is a one-line error that leaves the first file as it was."""
    _, cfg, params, folder = model
    tok = train_bpe(TEXTS, 300, name="t")
    tok.save_pretrained(folder)
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:6]))
    out = tmp_path / "ppl.json"
    cmd = [sys.executable, "-m", "mpt_jax.eval", "perplexity", f"--model={folder}", f"--data=files:{data}"]
    done = subprocess.run([*cmd, f"--output={out}", "--stride=8"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    want = perplexity(Scorer(cfg, params), [tok.encode(t) for t in TEXTS[:6]], stride=8)
    assert result["tokens"] == want.tokens and result["perplexity"] == pytest.approx(want.perplexity, rel=1e-5)
    assert f"perplexity {want.perplexity:.2f}"[:14] in done.stdout
    before = out.read_text()
    again = subprocess.run([*cmd, f"--output={out}"], capture_output=True, text=True, cwd=ROOT)
    assert again.returncode == 1 and "exists" in again.stderr.strip().splitlines()[-1]
    assert out.read_text() == before
    bad = subprocess.run([*cmd[:3], "perplex", f"--model={folder}"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 1 and "give one command: perplexity | icl | harness" in bad.stderr
