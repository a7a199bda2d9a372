"""Eval only on held-out data: every source's validation split is disjoint from its train split,
together they are the source, and a run that would evaluate on training data is refused."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mpt_jax.data import sources
from mpt_jax.data.pipeline import (
    HOLDOUT_FRACTION,
    DataConfig,
    SourceConfig,
    check_data,
    get_tokenizer,
    iterate,
    make_dataset,
    open_source,
    packed_rows,
)
from mpt_jax.data.sources import encode_record, make_source, write_records

SEQ = 32


@pytest.fixture(scope="module")
def tok(stdlib_data_dir):
    return get_tokenizer(DataConfig(data_dir=stdlib_data_dir))


def _records(src) -> list:
    return [src[i] for i in range(len(src))]


def _write_jsonl(path, rows) -> str:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def _docs(n: int) -> list[dict]:
    return [{"text": f"doc{i} says hello {i * 7}"} for i in range(n)]


# ------------------------------------------------------------------ the held-out rule


def test_holdout_fraction_is_whole_per_mille():
    assert sources.holdout_per_mille(0.01) == 10 and sources.holdout_per_mille(1) == 1000
    for bad in (0.0005, -0.01, 1.5):
        with pytest.raises(ValueError, match="holdout_fraction"):
            sources.holdout_per_mille(bad)
    with pytest.raises(ValueError, match=r"config\.data\.holdout_fraction=0\.0105"):
        DataConfig(holdout_fraction=0.0105).validate()


def test_stdlib_split_is_the_shared_rule():
    """The embedded corpus's split is the same held_out rule at 25 per mille (about 2.5%)."""
    rels = [f"pkg/mod{i}.py" for i in range(4000)]
    picked = [sources.is_validation(r) for r in rels]
    hashes = np.array([sources.hash64(r.encode()) for r in rels], np.uint64)
    assert picked == list(sources.held_out(hashes, 25))
    assert 0.015 < np.mean(picked) < 0.035


@pytest.mark.parametrize("kind", ["jsonl", "txt", "parquet"])
def test_files_validation_never_in_train_and_together_the_source(tmp_path, kind):
    rows = _docs(400)
    if kind == "jsonl":
        spec = f"files:{_write_jsonl(tmp_path / 'd.jsonl', rows)}"
    elif kind == "txt":
        (tmp_path / "d.txt").write_text("\n\n".join(r["text"] for r in rows))
        spec = f"files:{tmp_path / 'd.txt'}"
    else:
        pq.write_table(pa.table({"text": [r["text"] for r in rows]}), str(tmp_path / "d.parquet"), row_group_size=64)
        spec = f"files:{tmp_path / 'd.parquet'}"
    kw = dict(txt_mode="paragraph", holdout_fraction=0.1)
    train = [r["text"] for r in _records(make_source(spec, split="train", **kw))]
    valid = [r["text"] for r in _records(make_source(spec, split="validation", **kw))]
    assert not set(train) & set(valid)
    assert sorted(train + valid) == sorted(r["text"] for r in rows)
    assert 20 <= len(valid) <= 60  # about 10% of 400
    # Deterministic, and by content: the same split after the file moves.
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    shutil.copy(spec.partition(":")[2], moved)
    again = make_source(f"files:{moved}/*", split="validation", **kw)
    assert [r["text"] for r in _records(again)] == valid
    # Fraction 0: everything is train; 1: everything is validation.
    assert len(make_source(spec, split="validation", txt_mode="paragraph")) == 0
    assert len(make_source(spec, split="validation", txt_mode="paragraph", holdout_fraction=1)) == len(rows)


def test_identical_documents_share_a_split(tmp_path):
    rows = _docs(300) * 2
    spec = f"files:{_write_jsonl(tmp_path / 'd.jsonl', rows)}"
    valid = [r["text"] for r in _records(make_source(spec, split="validation", holdout_fraction=0.1))]
    train = {r["text"] for r in _records(make_source(spec, split="train", holdout_fraction=0.1))}
    assert valid and not set(valid) & train and len(valid) == 2 * len(set(valid))


def test_files_sources_have_two_splits(tmp_path):
    spec = f"files:{_write_jsonl(tmp_path / 'd.jsonl', _docs(3))}"
    with pytest.raises(ValueError, match=r"split='test'.*\('train', 'validation'\)"):
        make_source(spec, split="test")


def _tokenized(path, sizes: list[int], manifest: dict | None = None) -> str:
    """Shards of one-token records numbered 0.. across shards, so a record is known by its token."""
    os.makedirs(path)
    start = 0
    for k, n in enumerate(sizes):
        records = (encode_record({"tokens": np.array([i], np.int32)}) for i in range(start, start + n))
        write_records(os.path.join(path, f"shard-{k:05d}.array_record"), records)
        start += n
    with open(os.path.join(path, "manifest.json"), "w") as f:
        json.dump(manifest or {"seq_len": 1}, f)
    return str(path)


def test_tokenized_validation_never_in_train_and_together_the_source(tmp_path):
    directory = _tokenized(tmp_path / "tok", [5000, 3000, 1])  # several hash blocks in the first shard
    kw = dict(holdout_fraction=0.05)
    train = [int(r["tokens"][0]) for r in _records(make_source(f"tokenized:{directory}", split="train", **kw))]
    valid_src = make_source(f"tokenized:{directory}", split="validation", **kw)
    valid = [int(r["tokens"][0]) for r in _records(valid_src)]
    assert not set(train) & set(valid)
    assert sorted(train + valid) == list(range(8001))
    assert train == sorted(train) and valid == sorted(valid)  # the shards' order, filtered
    assert 300 < len(valid) < 500 and valid_src.num_all == 8001
    assert int(valid_src[-1]["tokens"][0]) == valid[-1]
    whole = make_source(f"tokenized:{directory}", split="validation", holdout_fraction=1.0)
    assert len(whole) == 8001 and int(whole[4097]["tokens"][0]) == 4097


# ------------------------------------------------------------------ the pipeline's splits


def _text_cfg(tmp_path, n=200, **kw) -> DataConfig:
    spec = f"files:{_write_jsonl(tmp_path / 'docs.jsonl', _docs(n))}"
    return DataConfig(mixture=(SourceConfig(spec, **kw),), data_dir=str(tmp_path), holdout_fraction=0.1)


def _doc_ids(rows, tok) -> set[int]:
    return {int(m) for r in rows for m in re.findall(r"doc(\d+)", tok.decode(r["tokens"][r["segment_ids"] > 0]))}


def test_eval_batches_are_held_out_documents(tmp_path, tok):
    cfg = dataclasses.replace(_text_cfg(tmp_path), packing="first_fit")  # whole documents per row
    kw = dict(seq_len=SEQ, seed=0, shuffle=False, repeat=False)
    train = _doc_ids(packed_rows(cfg, tok, split="train", **kw), tok)
    valid = _doc_ids(packed_rows(cfg, tok, split="validation", **kw), tok)
    assert valid and not train & valid and train | valid == set(range(200))
    # What the trainer evaluates on: batches of the validation split, unlike the train batches.
    ev = next(iterate(make_dataset(cfg, tok, split="validation", seq_len=SEQ, global_batch=2, seed=0, shuffle=False)))
    tr = next(iterate(make_dataset(cfg, tok, split="train", seq_len=SEQ, global_batch=2, seed=0)))
    rows = [dict(tokens=t, segment_ids=s) for t, s in zip(ev["tokens"], ev["segment_ids"], strict=True)]
    assert _doc_ids(rows, tok) <= valid
    assert not np.array_equal(ev["tokens"], tr["tokens"])


def test_exact_resume_on_the_train_split_of_files(tmp_path, tok):
    cfg = _text_cfg(tmp_path)
    kw = dict(split="train", seq_len=SEQ, global_batch=4, seed=5)
    it = iterate(make_dataset(cfg, tok, **kw))
    straight = [next(it) for _ in range(6)]
    it = iterate(make_dataset(cfg, tok, **kw))
    [next(it) for _ in range(2)]
    state = json.loads(json.dumps(it.get_state()))
    resumed = iterate(make_dataset(cfg, tok, **kw), state)
    for a in straight[2:]:
        b = next(resumed)
        assert all(np.array_equal(a[k], b[k]) for k in a)


def test_eval_source_is_read_whole_and_the_source_is_trained_whole(tmp_path):
    train_file = _write_jsonl(tmp_path / "train.jsonl", _docs(50))
    eval_file = _write_jsonl(tmp_path / "eval.jsonl", [{"text": f"held out {i}"} for i in range(7)])
    cfg = DataConfig.from_config({"source": train_file, "eval_source": eval_file})
    assert cfg.mixture[0].eval_source == f"files:{eval_file}"
    assert len(open_source(cfg, 0, "train")[0]) == 50
    src, spec = open_source(cfg, 0, "validation")
    assert spec == f"files:{eval_file}" and [r["text"] for r in _records(src)] == [f"held out {i}" for i in range(7)]


def test_default_holdout_and_config_keys():
    from mpt_jax.data.pipeline import default_config

    c = default_config()
    assert c.holdout_fraction == HOLDOUT_FRACTION == DataConfig().holdout_fraction == 0.01
    assert c.eval_source is None
    with pytest.raises(ValueError, match="each entry's eval_source"):
        DataConfig.from_config({"source": "", "eval_source": "files:x.jsonl", "mixture": [{"source": "stdlib"}]})


# ------------------------------------------------------------------ check_data refuses eval on training data


def test_no_held_out_records_is_an_error_saying_what_to_set(tmp_path, tok):
    spec = _write_jsonl(tmp_path / "few.jsonl", _docs(3))
    cfg = DataConfig.from_config({"source": spec, "holdout_fraction": 0.0})
    check_data(cfg, tok, seq_len=SEQ, vocab_size=8256, need_eval=False)  # no eval: fine
    with pytest.raises(ValueError) as e:
        check_data(cfg, tok, seq_len=SEQ, vocab_size=8256, need_eval=True)
    for words in (
        "config.data.source",
        "no held-out records",
        "config.data.holdout_fraction",
        "config.data.eval_source",
    ):
        assert words in str(e.value)


def test_a_pinned_tfds_split_has_no_held_out_data(stdlib_data_dir, tok):
    cfg = DataConfig.from_config({"source": "tfds:python_stdlib:train", "data_dir": stdlib_data_dir})
    check_data(cfg, tok, seq_len=SEQ, vocab_size=8256, need_eval=False)
    with pytest.raises(ValueError, match=r"config\.data\.source='tfds:python_stdlib:train' pins the TFDS split"):
        check_data(cfg, tok, seq_len=SEQ, vocab_size=8256, need_eval=True)
    ok = DataConfig.from_config(
        {"source": "tfds:python_stdlib:train", "eval_source": "tfds:python_stdlib", "data_dir": stdlib_data_dir}
    )
    check_data(ok, tok, seq_len=SEQ, vocab_size=8256, need_eval=True)
    assert len(open_source(ok, 0, "validation")[0]) == len(
        make_source("stdlib", split="validation", data_dir=stdlib_data_dir)
    )


def test_tfds_missing_split_names_the_splits(stdlib_data_dir):
    with pytest.raises(ValueError, match=r"tfds:python_stdlib: no split 'test'; it has \['train', 'validation'\]"):
        make_source("tfds:python_stdlib", split="test", data_dir=stdlib_data_dir)
    assert "eval_source='tfds:c4:train[99%:]'" in sources._split_hint("c4", "validation", ["train"])
