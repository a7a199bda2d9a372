"""Data sources: the stdlib corpus through TFDS, local files, tokenized shards, errors and pickling."""

from __future__ import annotations

import json
import logging
import os
import pickle
import sysconfig

import grain
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow_datasets as tfds

from mpt_jax.data import sources
from mpt_jax.data.sources import (
    build_stdlib_corpus,
    decode_record,
    encode_record,
    make_source,
    stdlib_files,
    write_records,
)


@pytest.fixture(scope="module")
def stdlib_dir(tmp_path_factory) -> str:
    return build_stdlib_corpus(str(tmp_path_factory.mktemp("stdlib_data")))


def _records(src) -> list:
    return [src[i] for i in range(len(src))]


def _rel(path: str) -> str:
    return os.path.relpath(path, sysconfig.get_paths()["stdlib"]).replace(os.sep, "/")


def _write(path, text: str | bytes) -> str:
    mode = "wb" if isinstance(text, bytes) else "w"
    with open(path, mode) as f:
        f.write(text)
    return str(path)


# ------------------------------------------------------------------ the stdlib corpus (TFDS)


def test_stdlib_files_rule():
    rels = [_rel(p) for p in stdlib_files()]
    assert rels == sorted(rels) and len(rels) > 300
    assert {"os.py", "json/__init__.py", "unittest/case.py", "doctest.py"} <= set(rels)
    for rel in rels:
        parts = rel.split("/")
        assert rel.endswith(".py")
        assert not {"site-packages", "dist-packages", "test", "tests", "idle_test"} & set(parts), rel
        assert not any(p.startswith("test_") for p in parts), rel
    assert os.path.isdir(os.path.join(sysconfig.get_paths()["stdlib"], "test"))  # excluded, not absent


def test_stdlib_splits(stdlib_dir):
    train = make_source("stdlib", data_dir=stdlib_dir)
    valid = make_source("stdlib", data_dir=stdlib_dir, split="validation")
    assert 5 <= len(valid) < 0.06 * len(train)
    assert set(train[0]) == {"text"} and isinstance(train[0]["text"], str)
    # Disjoint by path, and together every non-empty file of stdlib_files().
    paths = {}
    for split in ("train", "validation"):
        raw = tfds.data_source("python_stdlib", data_dir=stdlib_dir, split=split, download=False)
        paths[split] = [r["path"].decode() for r in (raw[i] for i in range(len(raw)))]
    assert not set(paths["train"]) & set(paths["validation"])
    nonempty = {_rel(p) for p in stdlib_files() if open(p, errors="replace").read().strip()}
    assert set(paths["train"]) | set(paths["validation"]) == nonempty
    sizes = [len(r["text"]) for r in _records(train) + _records(valid)]
    assert min(sizes) > 0 and 5e6 < sum(sizes) < 1e8


def test_stdlib_build_is_deterministic_and_reused(stdlib_dir, tmp_path):
    other = build_stdlib_corpus(str(tmp_path))
    for split in ("train", "validation"):
        assert _records(make_source("stdlib", data_dir=other, split=split)) == _records(
            make_source("stdlib", data_dir=stdlib_dir, split=split)
        )
    info = os.path.join(other, "python_stdlib", "1.0.0", "dataset_info.json")
    mtime = os.stat(info).st_mtime_ns
    assert build_stdlib_corpus(other) == other
    assert os.stat(info).st_mtime_ns == mtime


def test_default_data_dir(monkeypatch):
    monkeypatch.setenv("MPT_JAX_DATA_DIR", "/some/where")
    assert sources.default_data_dir() == "/some/where"
    monkeypatch.delenv("MPT_JAX_DATA_DIR")
    assert sources.default_data_dir() == os.path.expanduser("~/.cache/mpt_jax/data")


def test_tfds_spec(stdlib_dir):
    valid = make_source("tfds:python_stdlib:validation", data_dir=stdlib_dir)
    assert _records(valid) == _records(make_source("stdlib", data_dir=stdlib_dir, split="validation"))
    assert len(make_source("tfds:python_stdlib:1.0.0", split="train[:7]", data_dir=stdlib_dir)) == 7
    full = make_source("tfds:python_stdlib", data_dir=stdlib_dir, text_field=None)[0]
    assert set(full) == {"text", "path"} and isinstance(full["path"], str)
    with pytest.raises(ValueError, match="no feature 'body'"):
        make_source("tfds:python_stdlib", data_dir=stdlib_dir, text_field="body")


@pytest.mark.parametrize("name", ["no_such_dataset_xyz", "mnist"])
def test_tfds_missing_dataset(tmp_path, name):
    with pytest.raises(FileNotFoundError, match=f"tfds:{name}") as e:
        make_source(f"tfds:{name}", data_dir=str(tmp_path))
    assert "array_record" in str(e.value) and f"tfds build {name}" in str(e.value) and str(tmp_path) in str(e.value)


def test_tfds_missing_stdlib_says_how_to_build(tmp_path):
    with pytest.raises(FileNotFoundError, match="build_stdlib_corpus"):
        make_source("tfds:python_stdlib", data_dir=str(tmp_path))


# ------------------------------------------------------------------ local files


def test_txt_per_file_and_paragraph(tmp_path):
    _write(tmp_path / "b.txt", "second doc\n\n  \nwith two paragraphs\n")
    _write(tmp_path / "a.txt", "first doc\r\n\r\nline two\nline three")
    _write(tmp_path / "c.txt", " \n\t\n")  # empty: skipped
    src = make_source(f"files:{tmp_path}/*.txt")
    assert _records(src) == [
        {"text": "first doc\r\n\r\nline two\nline three"},
        {"text": "second doc\n\n  \nwith two paragraphs\n"},
    ]
    assert src.num_skipped_empty == 1
    par = make_source(f"files:{tmp_path}/*.txt", txt_mode="paragraph")
    texts = [r["text"] for r in _records(par)]
    assert texts == ["first doc", "line two\nline three", "second doc", "with two paragraphs\n"]
    with pytest.raises(ValueError, match="txt_mode"):
        make_source(f"files:{tmp_path}/*.txt", txt_mode="line")


def test_jsonl(tmp_path):
    rows = [
        {"text": "hello", "id": 1},
        {"text": "  "},
        {"prompt": "2+2?", "response": "4", "text": "x"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey"}], "text": "y"},
    ]
    path = _write(tmp_path / "d.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    src = make_source(f"files:{path}")
    assert _records(src) == [{"text": "hello"}, {"text": "x"}, {"text": "y"}]
    assert src.num_skipped_empty == 2  # whitespace text and the blank last line
    raw = make_source(f"files:{path}", text_field=None)
    assert _records(raw) == rows  # whole objects, the empty-text one included
    assert raw[-1] == rows[-1] and raw[2]["response"] == "4"
    with pytest.raises(IndexError):
        raw[len(raw)]


def test_parquet(tmp_path):
    path = str(tmp_path / "p.parquet")
    table = pa.table({"body": ["one", "", "three", "four", "five"], "n": [1, 2, 3, 4, 5]})
    pq.write_table(table, path, row_group_size=2)
    src = make_source(f"files:{path}", text_field="body")
    assert _records(src) == [{"text": "one"}, {"text": "three"}, {"text": "four"}, {"text": "five"}]
    assert src.num_skipped_empty == 1
    assert src[3] == {"text": "five"} and src[0] == {"text": "one"}  # across row groups, both ways
    assert make_source(f"files:{path}", text_field=None)[4] == {"body": "five", "n": 5}
    with pytest.raises(ValueError, match=f"{path}: no column 'text'"):
        make_source(f"files:{path}")


def test_mixed_globs_sorted_and_deduplicated(tmp_path):
    _write(tmp_path / "z.txt", "zed")
    _write(tmp_path / "a.jsonl", '{"text": "ay"}\n')
    src = make_source(f"files:{tmp_path}/*.txt, {tmp_path}/*, {tmp_path}/a.jsonl")
    assert src.paths == [str(tmp_path / "a.jsonl"), str(tmp_path / "z.txt")]
    assert _records(src) == [{"text": "ay"}, {"text": "zed"}]


@pytest.mark.parametrize(
    "line, message",
    [("{not json", "line 3: not valid JSON"), ('{"body": "no text"}', "line 3: no field 'text'"), ("[1, 2]", "line 3")],
)
def test_jsonl_bad_line_names_file_and_line(tmp_path, line, message):
    path = _write(tmp_path / "bad.jsonl", f'{{"text": "a"}}\n{{"text": "b"}}\n{line}\n{{"text": "c"}}\n')
    with pytest.raises(ValueError, match=f"{path}: {message}"):
        make_source(f"files:{path}")


def test_jsonl_skip_bad_records(tmp_path, caplog):
    path = _write(tmp_path / "bad.jsonl", '{"text": "a"}\n{oops\n{"text": 3}\n{"body": "x"}\n{"text": "b"}\n')
    with caplog.at_level(logging.WARNING):
        src = make_source(f"files:{path}", skip_bad_records=True)
    assert _records(src) == [{"text": "a"}, {"text": "b"}]
    assert src.num_skipped_bad == 3
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "skipped 3 bad records" in warnings[0] and path in warnings[0]
    assert "line 2" in warnings[0]


def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothing_here/\*\.jsonl"):
        make_source(f"files:{tmp_path}/nothing_here/*.jsonl")
    _write(tmp_path / "a.txt", "a")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        make_source(f"files:{tmp_path}/a.txt,{tmp_path}/missing.txt")
    _write(tmp_path / "notes.md", "# md")
    with pytest.raises(ValueError, match="notes.md has an unsupported extension"):
        make_source(f"files:{tmp_path}/*")
    with pytest.raises(ValueError, match="expected 'stdlib'"):
        make_source("hdfs:/x")


# ------------------------------------------------------------------ tokenized shards


def test_encode_decode_round_trip():
    features = {
        "tokens": np.array([0, 50276, -3, 2**31 - 1], np.int32),
        "loss_mask": np.array([0, 1, 1, 255], np.uint8),
        "positions": np.array([2**40, -1], np.int64),
        "big_endian": np.array([1, 2, 3], ">i4"),
        "empty": np.zeros(0, np.int16),
        "flag": np.array([True, False]),
    }
    data = encode_record(features)
    assert len(data) < 4 + 200 + sum(a.nbytes for a in features.values())
    out = decode_record(data)
    assert list(out) == list(features)
    for name, a in features.items():
        assert out[name].dtype == a.dtype.newbyteorder("=") and np.array_equal(out[name], a), name
    out["tokens"][0] = 7  # writable
    with pytest.raises(ValueError, match="'m'"):
        encode_record({"m": np.zeros((2, 2), np.int32)})
    with pytest.raises(ValueError, match="decode_record"):
        decode_record(data[:-1])
    with pytest.raises(ValueError, match="decode_record"):
        decode_record(b"garbage")


def _tokenized_dir(path) -> tuple[str, list[dict[str, np.ndarray]]]:
    os.makedirs(path)
    examples = [
        {"tokens": np.arange(i, i + 8, dtype=np.int32), "segment_ids": np.full(8, i % 3, np.int32)} for i in range(10)
    ]
    assert write_records(os.path.join(path, "shard-00001.array_record"), map(encode_record, examples[6:])) == 4
    assert write_records(os.path.join(path, "shard-00000.array_record"), map(encode_record, examples[:6])) == 6
    _write(os.path.join(path, "manifest.json"), json.dumps({"seq_len": 8}))
    return str(path), examples


def test_tokenized_source(tmp_path):
    directory, examples = _tokenized_dir(tmp_path / "tok")
    assert not [f for f in os.listdir(directory) if ".tmp" in f]
    src = make_source(f"tokenized:{directory}")
    assert len(src) == 10 and src.manifest == {"seq_len": 8}
    for i in (0, 5, 6, 9, 3, -1):
        assert all(np.array_equal(src[i][k], examples[i][k]) for k in examples[i])
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        make_source(f"tokenized:{tmp_path}")


# ------------------------------------------------------------------ every source


@pytest.fixture
def every_source(stdlib_dir, tmp_path):
    _write(tmp_path / "a.txt", "alpha\n\nbeta")
    _write(tmp_path / "b.jsonl", '{"prompt": "p", "response": "r"}\n{"text": "t"}\n')
    pq.write_table(pa.table({"text": ["x", "y", "z"]}), str(tmp_path / "c.parquet"), row_group_size=2)
    directory, _ = _tokenized_dir(tmp_path / "tok")
    return {
        "stdlib": make_source("stdlib", data_dir=stdlib_dir, split="validation"),
        "tfds": make_source("tfds:python_stdlib:validation", data_dir=stdlib_dir, text_field=None),
        "txt": make_source(f"files:{tmp_path}/a.txt", txt_mode="paragraph"),
        "jsonl": make_source(f"files:{tmp_path}/b.jsonl", text_field=None),
        "parquet": make_source(f"files:{tmp_path}/c.parquet"),
        "mixed": make_source(f"files:{tmp_path}/*.txt,{tmp_path}/*.parquet"),
        "tokenized": make_source(f"tokenized:{directory}"),
    }


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and np.array_equal(a, b)
    return a == b


def test_pickling_every_source(every_source):
    for name, src in every_source.items():
        before = _records(src)  # also fills the parquet row-group cache, which must not travel
        copy = pickle.loads(pickle.dumps(src))
        assert len(copy) == len(src) > 0, name
        assert all(_same(x, y) for x, y in zip(_records(copy), before, strict=True)), name


def test_grain_reads_every_source(every_source):
    for name, src in every_source.items():
        ds = grain.MapDataset.source(src).shuffle(seed=3)
        got = [ds[i] for i in range(len(ds))]
        assert sorted(map(repr, got)) == sorted(map(repr, _records(src))), name
