"""The grain pipeline: determinism, processes, exact resume (workers too), lossless packing, masks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mpt_jax.data import formats, sources
from mpt_jax.data.pipeline import FEATURES, DataConfig, SourceConfig, get_tokenizer, iterate, make_dataset, packed_rows
from mpt_jax.data.prepare import prepare

SEQ = 64


@pytest.fixture(scope="module")
def stdlib_cfg(stdlib_data_dir):
    return DataConfig(data_dir=stdlib_data_dir)


@pytest.fixture(scope="module")
def tok(stdlib_cfg):
    return get_tokenizer(stdlib_cfg)


def take(dataset, n, state=None):
    it = iterate(dataset, state)
    out = [next(it) for _ in range(n)]
    return out, it


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert set(x) == set(FEATURES)
        for k in FEATURES:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_batches_shapes_and_types(stdlib_cfg, tok):
    (batch,), _ = take(make_dataset(stdlib_cfg, tok, split="train", seq_len=SEQ, global_batch=4, seed=0), 1)
    for k in FEATURES:
        assert batch[k].shape == (4, SEQ) and batch[k].dtype == np.int32
    assert batch["tokens"].max() < tok.vocab_size
    assert (batch["segment_ids"] >= 1).all()  # concat packing fills every row
    assert (batch["loss_mask"] == 1).all()


def test_same_seed_same_batches_other_seed_differs(stdlib_cfg, tok):
    def run(seed):
        return take(make_dataset(stdlib_cfg, tok, split="train", seq_len=SEQ, global_batch=4, seed=seed), 3)[0]

    a, b, c = run(1), run(1), run(2)
    assert_batches_equal(a, b)
    assert not np.array_equal(a[0]["tokens"], c[0]["tokens"])


def test_two_processes_make_the_global_batches_of_one(stdlib_cfg, tok):
    """Process p's rows are block p of the single-process global batch, batch after batch."""
    cfg = DataConfig(data_dir=stdlib_cfg.data_dir, num_streams=2)
    kw = dict(split="train", seq_len=SEQ, global_batch=6, seed=3)
    single, _ = take(make_dataset(cfg, tok, **kw), 4)
    p0, _ = take(make_dataset(cfg, tok, **kw, process_index=0, process_count=2), 4)
    p1, _ = take(make_dataset(cfg, tok, **kw, process_index=1, process_count=2), 4)
    assert p0[0]["tokens"].shape == (3, SEQ)
    joined = [{k: np.concatenate([a[k], b[k]]) for k in FEATURES} for a, b in zip(p0, p1, strict=True)]
    assert_batches_equal(single, joined)
    assert not np.array_equal(p0[0]["tokens"], p1[0]["tokens"])  # disjoint data, not copies


def test_exact_resume(stdlib_cfg, tok):
    kw = dict(split="train", seq_len=SEQ, global_batch=4, seed=5)
    straight, _ = take(make_dataset(stdlib_cfg, tok, **kw), 7)
    _, it = take(make_dataset(stdlib_cfg, tok, **kw), 3)
    state = json.loads(json.dumps(it.get_state()))  # through JSON, as checkpoints store it
    resumed, _ = take(make_dataset(stdlib_cfg, tok, **kw), 4, state=state)
    assert_batches_equal(straight[3:], resumed)


def test_exact_resume_with_worker_processes(stdlib_cfg, tok, tmp_path):
    """Workers tokenize; packing stays in the main process: same batches as 0 workers, and resume."""
    script = f"""
import json, sys
import numpy as np
from absl import flags
flags.FLAGS(["prog"])
from mpt_jax.data.pipeline import DataConfig, get_tokenizer, iterate, make_dataset

def run():
    out = {{}}
    for workers in (0, 2):
        cfg = DataConfig(data_dir={stdlib_cfg.data_dir!r}, num_workers=workers)
        tok = get_tokenizer(cfg)
        ds = lambda: make_dataset(cfg, tok, split="train", seq_len={SEQ}, global_batch=4, seed=7)
        it = iterate(ds())
        first = [next(it)["tokens"].tolist() for _ in range(3)]
        state = it.get_state()
        rest = [next(it)["tokens"].tolist() for _ in range(3)]
        it2 = iterate(ds(), state)
        resumed = [next(it2)["tokens"].tolist() for _ in range(3)]
        out[workers] = dict(first=first, rest=rest, resumed=resumed)
    json.dump(out, open({str(tmp_path / "out.json")!r}, "w"))

if __name__ == "__main__":
    run()
"""
    (tmp_path / "run.py").write_text(script)
    proc = subprocess.run([sys.executable, str(tmp_path / "run.py")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["2"]["rest"] == out["2"]["resumed"]
    assert out["0"] == out["2"]


def test_concat_packing_loses_and_duplicates_no_token(stdlib_cfg, tok):
    """One pass over the embedded validation split: the non-padding tokens of the packed rows, in
    order, are exactly the documents' tokens (each ended by EOS)."""
    src = sources.make_source("stdlib", split="validation", data_dir=stdlib_cfg.data_dir)
    expected = np.concatenate([formats.pretrain_example(src[i], tok)["tokens"] for i in range(len(src))])
    stats = formats.FormatStats()
    rows = list(
        packed_rows(stdlib_cfg, tok, split="validation", seq_len=SEQ, seed=0, shuffle=False, repeat=False, stats=stats)
    )
    got = np.concatenate([r["tokens"][r["segment_ids"] > 0] for r in rows])
    assert len(got) == len(expected) and np.array_equal(got, expected)
    assert stats.examples == len(src)
    assert int((expected == tok.eos_id).sum()) >= len(src)
    # Segment ids restart at 1 in each row and step by one at every document boundary.
    for r in rows:
        seg = r["segment_ids"][r["segment_ids"] > 0]
        assert seg[0] == 1 and set(np.diff(seg)) <= {0, 1}
        starts = np.flatnonzero(np.diff(r["segment_ids"]) == 1) + 1
        assert (r["positions"][starts] == 0).all()


def _write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def test_first_fit_instruction_and_chat_masks(tmp_path, tok):
    """Packed finetuning rows keep each example whole, with its own segment, positions from 0, and
    loss only on response / assistant tokens."""
    _write_jsonl(
        tmp_path / "inst.jsonl",
        [{"prompt": f"Add {i} and {i + 1}.", "response": f"{2 * i + 1}"} for i in range(12)],
    )
    _write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {
                "messages": [
                    {"role": "user", "content": f"What is {i} squared?"},
                    {"role": "assistant", "content": f"It is {i * i}."},
                ]
            }
            for i in range(12)
        ],
    )
    for fmt, file in (("instruction", "inst.jsonl"), ("chat", "chat.jsonl")):
        source = SourceConfig(f"files:{tmp_path / file}", format=fmt, text_field=None, template="plain")
        cfg = DataConfig(mixture=(source,), data_dir=str(tmp_path), packing="first_fit", shuffle=False)
        tk = tok.with_chatml() if fmt == "chat" else tok
        fmt_fn = formats.make_formatter(fmt, tk, max_len=SEQ, template="plain")
        src = sources.make_source(source.source, text_field=None)
        examples = [fmt_fn(src[i]) for i in range(len(src))]
        rows = list(packed_rows(cfg, tk, split="train", seq_len=SEQ, seed=0, repeat=False))
        found = 0
        for r in rows:
            for seg in range(1, r["segment_ids"].max() + 1):
                where = r["segment_ids"] == seg
                toks, mask = r["tokens"][where], r["loss_mask"][where]
                assert (r["positions"][where] == np.arange(where.sum())).all()
                match = [e for e in examples if np.array_equal(e["tokens"], toks)]
                assert match, f"{fmt}: a packed segment is not one of the examples"
                np.testing.assert_array_equal(mask, match[0]["loss_mask"])
                found += 1
            assert (r["loss_mask"][r["segment_ids"] == 0] == 0).all() and (
                r["tokens"][r["segment_ids"] == 0] == 0
            ).all()
        assert found == len(examples)


def test_mixture_picks_whole_rows_by_weight(tmp_path, tok):
    """As in MPT's pretraining mix, each row is packed from one source; rows follow the weights."""
    for name, word in (("a", "alpha"), ("b", "beta")):
        _write_jsonl(tmp_path / f"{name}.jsonl", [{"text": f"{word} {i}"} for i in range(50)])
    cfg = DataConfig(
        mixture=(
            SourceConfig(f"files:{tmp_path / 'a.jsonl'}", weight=3.0),
            SourceConfig(f"files:{tmp_path / 'b.jsonl'}"),
        ),
        data_dir=str(tmp_path),
    )
    batches, _ = take(make_dataset(cfg, tok, split="train", seq_len=SEQ, global_batch=8, seed=0), 4)
    kinds = []
    for batch in batches:
        for row in batch["tokens"]:
            text = tok.decode(row)
            assert ("alpha" in text) != ("beta" in text), text
            kinds.append("alpha" in text)
    assert sum(kinds) == 24 and len(kinds) == 32


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(global_batch=6, num_streams=4), "divisible by config.data.num_streams=4"),
        (dict(global_batch=4, num_streams=3, process_count=2), "multiple of the process count 2"),
    ],
)
def test_bad_layouts_are_errors(stdlib_cfg, tok, kw, match):
    cfg = DataConfig(data_dir=stdlib_cfg.data_dir, num_streams=kw.pop("num_streams"))
    with pytest.raises(ValueError, match=match):
        make_dataset(cfg, tok, split="train", seq_len=SEQ, seed=0, **kw)


def test_config_errors():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['sorce'\]"):
        DataConfig.from_config({"sorce": "stdlib"})
    with pytest.raises(ValueError, match="packing='best'"):
        DataConfig.from_config({"source": "stdlib", "packing": "best"})
    with pytest.raises(ValueError, match=r"mixture\[1\]\.weight=0"):
        DataConfig.from_config({"mixture": [{"source": "stdlib"}, {"source": "files:x.txt", "weight": 0}]})
    cfg = DataConfig.from_config({"source": "files:x.jsonl", "format": "chat", "text_field": None})
    assert cfg.mixture == (SourceConfig("files:x.jsonl", format="chat", text_field=None),)


def test_prepare_writes_shards_that_train_the_same(stdlib_cfg, tok, tmp_path):
    out = str(tmp_path / "tok")
    m = prepare(stdlib_cfg, split="validation", seq_len=SEQ, out=out, records_per_shard=50, progress=False)
    assert len(m["shards"]) == -(-m["sequences"] // 50) and m["documents"] > 0
    assert m["tokens"] + m["padding_tokens"] == m["sequences"] * SEQ
    rows = list(packed_rows(stdlib_cfg, tok, split="validation", seq_len=SEQ, seed=0, shuffle=False, repeat=False))
    cfg = DataConfig(
        mixture=(SourceConfig(f"tokenized:{out}", format="packed"),), data_dir=stdlib_cfg.data_dir, holdout_fraction=0
    )  # every row is in the train split
    stored = list(packed_rows(cfg, tok, split="train", seq_len=SEQ, seed=0, shuffle=False, repeat=False))
    assert len(stored) == len(rows) == m["sequences"]
    for a, b in zip(rows, stored, strict=True):
        for k in FEATURES:
            np.testing.assert_array_equal(a[k], b[k])
    with pytest.raises(FileExistsError, match="exists"):
        prepare(stdlib_cfg, split="validation", seq_len=SEQ, out=out, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["tok"]


@pytest.mark.parametrize("overlong", ["truncate", "drop"])
def test_first_fit_pretraining_long_documents(tmp_path, tok, overlong):
    """First-fit cannot wrap a document across rows: longer ones are truncated or dropped, and counted."""
    _write_jsonl(tmp_path / "d.jsonl", [{"text": "word " * n} for n in (5, 400, 7)])
    cfg = DataConfig(
        mixture=(SourceConfig(f"files:{tmp_path / 'd.jsonl'}"),), packing="first_fit", overlong=overlong, shuffle=False
    )
    stats = formats.FormatStats()
    rows = list(packed_rows(cfg, tok, split="train", seq_len=SEQ, seed=0, repeat=False, stats=stats))
    segments = sum(int(r["segment_ids"].max()) for r in rows)
    if overlong == "truncate":
        assert (stats.examples, stats.truncated, segments) == (3, 1, 3)
    else:
        assert (stats.examples, stats.dropped_overlong, segments) == (2, 1, 2)


def test_global_arrays_from_process_local_batches(stdlib_cfg, tok):
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from mpt_jax.data.pipeline import to_global_arrays

    (batch,), _ = take(make_dataset(stdlib_cfg, tok, split="train", seq_len=SEQ, global_batch=2, seed=0), 1)
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    arrays = to_global_arrays(batch, NamedSharding(mesh, PartitionSpec("data")))
    assert set(arrays) == set(FEATURES)
    np.testing.assert_array_equal(np.asarray(arrays["tokens"]), batch["tokens"])


def test_prepare_cli(stdlib_data_dir, tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "mpt_jax.data.prepare",
        "--source=stdlib",
        "--split=validation",
        "--seq_len=128",
        f"--data_dir={stdlib_data_dir}",
        f"--out={tmp_path / 'out'}",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "documents ->" in done.stdout
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["seq_len"] == 128 and manifest["sequences"] > 0
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 1 and "exists" in again.stderr
    bad = subprocess.run(
        cmd[:3] + ["--source=files:/nonexistent/*.jsonl"] + cmd[4:6] + [f"--out={tmp_path / 'x'}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 1 and "/nonexistent/*.jsonl" in bad.stderr
    assert sorted(os.listdir(tmp_path)) == ["out"]
