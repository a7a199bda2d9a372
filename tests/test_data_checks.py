"""Data that does not fit the run is an error before step 1, naming the source and both values;
first-fit packed examples are scored exactly as if alone; the specs a new user types work."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil

import jax
import numpy as np
import pytest

from mpt_jax import MPTConfig
from mpt_jax.data import sources
from mpt_jax.data.pipeline import (
    FEATURES,
    DataConfig,
    SourceConfig,
    check_data,
    get_tokenizer,
    iterate,
    make_dataset,
    open_source,
    packed_rows,
)
from mpt_jax.data.prepare import prepare
from mpt_jax.data.sources import encode_record, write_records
from mpt_jax.model import init_params
from mpt_jax.steps import loss_fn

SEQ = 32
VOCAB = 8256  # the tiny config's embedding rows


@pytest.fixture(scope="module")
def tok(stdlib_data_dir):
    return get_tokenizer(DataConfig(data_dir=stdlib_data_dir))


def _write_jsonl(path, rows) -> str:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def prepared(stdlib_data_dir, tmp_path_factory):
    """Shards prepared from a small jsonl at SEQ, with the stdlib BPE."""
    root = tmp_path_factory.mktemp("prepared")
    docs = _write_jsonl(root / "docs.jsonl", [{"text": f"def f{i}(x):\n    return x * {i}\n"} for i in range(60)])
    cfg = DataConfig(mixture=(SourceConfig(f"files:{docs}"),), data_dir=stdlib_data_dir, shuffle=False)
    out = str(root / "tok")
    prepare(cfg, split="train", seq_len=SEQ, out=out, progress=False)
    return out


def _with_manifest(src_dir, dst_dir, **changes) -> str:
    shutil.copytree(src_dir, dst_dir)
    path = os.path.join(dst_dir, "manifest.json")
    with open(path) as f:
        manifest = json.load(f)
    manifest.update(changes)
    with open(path, "w") as f:
        json.dump(manifest, f)
    return str(dst_dir)


def _cfg(spec, data_dir, **kw) -> DataConfig:
    return DataConfig.from_config({"source": spec, "data_dir": data_dir, **kw})


# ------------------------------------------------------------------ tokenized shards vs. the run


def test_prepare_records_what_the_checks_need(prepared, tok):
    with open(os.path.join(prepared, "manifest.json")) as f:
        m = json.load(f)
    assert m["seq_len"] == SEQ and m["tokenizer"] == "stdlib-bpe" and m["tokenizer_fingerprint"] == tok.fingerprint
    assert 0 < m["max_token_id"] < tok.vocab_size and m["holdout_fraction"] == 0.01 and m["split"] == "train"


def test_matching_shards_pass(prepared, tok, stdlib_data_dir):
    check_data(_cfg(prepared, stdlib_data_dir), tok, seq_len=SEQ, vocab_size=VOCAB, need_eval=False)
    # 26 rows hold out none at 1%: eval needs an eval_source (here the same shards, for the check only).
    with pytest.raises(ValueError, match="no held-out records"):
        check_data(_cfg(prepared, stdlib_data_dir), tok, seq_len=SEQ, vocab_size=VOCAB, need_eval=True)
    with_eval = _cfg(prepared, stdlib_data_dir, eval_source=prepared)
    check_data(with_eval, tok, seq_len=SEQ, vocab_size=VOCAB, need_eval=True)


def test_shards_of_another_seq_len_are_refused(prepared, tok, stdlib_data_dir):
    cfg = _cfg(f"tokenized:{prepared}", stdlib_data_dir)
    with pytest.raises(ValueError, match=rf"config\.data\.source: .*manifest\.json has seq_len={SEQ}.* is 64"):
        check_data(cfg, tok, seq_len=64, vocab_size=VOCAB, need_eval=False)


def test_shards_of_another_tokenizer_are_refused(prepared, tok, stdlib_data_dir, tmp_path):
    other = _with_manifest(
        prepared, tmp_path / "neox", tokenizer="EleutherAI/gpt-neox-20b", tokenizer_fingerprint="0" * 16
    )
    with pytest.raises(ValueError) as e:
        check_data(_cfg(f"tokenized:{other}", stdlib_data_dir), tok, seq_len=SEQ, vocab_size=VOCAB, need_eval=False)
    assert "'EleutherAI/gpt-neox-20b'" in str(e.value) and "'stdlib-bpe'" in str(e.value)
    assert tok.fingerprint in str(e.value)


def test_shard_ids_beyond_the_embedding_are_refused(prepared, tok, stdlib_data_dir, tmp_path):
    big = _with_manifest(prepared, tmp_path / "big", max_token_id=9000)
    cfg = _cfg(f"tokenized:{big}", stdlib_data_dir)
    with pytest.raises(ValueError, match=r"token ids up to 9000, but config\.model\.vocab_size=8256"):
        check_data(cfg, tok, seq_len=SEQ, vocab_size=VOCAB, need_eval=False)


def test_an_out_of_range_id_in_the_data_is_an_error_naming_the_source(tok, tmp_path):
    """Even where the manifest says otherwise, the id is caught as the row is read."""
    directory = tmp_path / "bad"
    os.makedirs(directory)
    row = {k: np.ones(SEQ, np.int32) for k in FEATURES}
    rows = [row, {**row, "tokens": np.full(SEQ, 9000, np.int32)}]
    write_records(str(directory / "shard-00000.array_record"), map(encode_record, rows))
    manifest = dict(seq_len=SEQ, tokenizer="stdlib-bpe", tokenizer_fingerprint=tok.fingerprint, max_token_id=1)
    (directory / "manifest.json").write_text(json.dumps(manifest))
    cfg = DataConfig(mixture=(SourceConfig(f"tokenized:{directory}"),), holdout_fraction=0, shuffle=False)
    check_data(cfg, tok, seq_len=SEQ, vocab_size=VOCAB, need_eval=False)  # the manifest is fine
    it = iterate(make_dataset(cfg, tok, split="train", seq_len=SEQ, global_batch=1, seed=0, vocab_size=VOCAB))
    next(it)
    with pytest.raises(ValueError, match=rf"data source 'tokenized:{directory}': token id 9000 is outside .*8256"):
        next(it)


def test_text_ids_beyond_the_embedding_are_refused(tok, tmp_path):
    docs = _write_jsonl(tmp_path / "d.jsonl", [{"text": "print('hello world')"}] * 4)
    cfg = DataConfig(mixture=(SourceConfig(docs),), holdout_fraction=0)
    with pytest.raises(ValueError, match="config.model.vocab_size=100 is smaller than the tokenizer's 8192 ids"):
        check_data(cfg, tok, seq_len=SEQ, vocab_size=100, need_eval=False)
    it = iterate(make_dataset(cfg, tok, split="train", seq_len=SEQ, global_batch=1, seed=0, vocab_size=100))
    with pytest.raises(ValueError, match=rf"data source 'files:{docs}': token id \d+ is outside"):
        next(it)


# ------------------------------------------------------------------ finetuning records, checked when indexed


CHAT_OK = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


@pytest.mark.parametrize(
    "fmt, good, bad, message",
    [
        ("chat", CHAT_OK, {"conversation": []}, "line 2: chat record has no 'messages' key"),
        ("chat", CHAT_OK, {"messages": [{"role": "user", "content": "hi"}]}, "line 2: chat record: the last message"),
        (
            "instruction",
            {"prompt": "p", "response": "r"},
            {"prompt": "p"},
            "line 2: instruction record has no 'response'",
        ),
    ],
)
def test_finetuning_record_missing_a_field_is_reported_with_file_and_line(
    tmp_path, tok, caplog, fmt, good, bad, message
):
    path = _write_jsonl(tmp_path / "ft.jsonl", [good, bad, good])
    cfg = _cfg(path, str(tmp_path), format=fmt)  # text_field left at its default: finetuning reads whole records
    with pytest.raises(ValueError, match=f"{path}: {message}"):
        check_data(cfg, tok.with_chatml(), seq_len=SEQ, vocab_size=VOCAB, need_eval=False)
    skipping = dataclasses.replace(cfg, skip_bad_records=True)
    with caplog.at_level(logging.WARNING):
        src, _ = open_source(skipping, 0, "train")
    assert len(src) == 2 and src.num_skipped_bad == 1
    assert any("skipped 1 bad records" in r.getMessage() and path in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------ first-fit packing: each example as if alone


def _segment_batch(row: dict, seg: int) -> dict:
    """The packed row with the loss counted on one segment only."""
    batch = {k: jax.numpy.asarray(v)[None] for k, v in row.items()}
    return {**batch, "loss_mask": batch["loss_mask"] * (batch["segment_ids"] == seg)}


def _alone(row: dict, seg: int) -> dict:
    """The segment's example alone at the start of a row (padding after it is never attended to)."""
    where = row["segment_ids"] == seg
    n, length = int(where.sum()), len(where)

    def pad(x):
        return np.pad(x, (0, length - n))[None]

    return {
        "tokens": pad(row["tokens"][where]),
        "segment_ids": pad(np.ones(n, np.int32)),
        "positions": pad(np.arange(n, dtype=np.int32)),
        "loss_mask": pad(row["loss_mask"][where]),
    }


@pytest.mark.parametrize("position", ["alibi", "learned"])
def test_first_fit_packed_losses_equal_each_example_alone(tmp_path, tok, position):
    records = [
        {"prompt": f"Add {i} and {3 * i}.", "response": f"{4 * i}, as {i} + {3 * i} = {4 * i}."} for i in range(8)
    ]
    path = _write_jsonl(tmp_path / "inst.jsonl", records)
    source = SourceConfig(path, format="instruction", template="plain")
    cfg = DataConfig(mixture=(source,), packing="first_fit", holdout_fraction=0, shuffle=False)
    rows = list(packed_rows(cfg, tok, split="train", seq_len=64, seed=0, repeat=False))
    row = max(rows, key=lambda r: r["segment_ids"].max())
    segments = range(1, int(row["segment_ids"].max()) + 1)
    assert len(segments) >= 3
    model = MPTConfig(
        d_model=32,
        n_heads=2,
        n_layers=2,
        max_seq_len=64,
        vocab_size=VOCAB,
        alibi=position == "alibi",
        learned_pos_emb=position == "learned",
        attn_uses_sequence_id=True,
    )
    params = init_params(model, jax.random.key(0))
    losses = jax.jit(lambda p, b: loss_fn(p, b, model))  # every batch is [1, 64]: one compile
    for seg in segments:
        packed_sum, packed_n = losses(params, _segment_batch(row, seg))
        alone_sum, alone_n = losses(params, _alone(row, seg))
        assert float(packed_n) == float(alone_n) > 0
        np.testing.assert_allclose(float(packed_sum), float(alone_sum), rtol=2e-5)
    # Without segment ids a later example attends to the ones before it: its loss changes.
    leaky = dataclasses.replace(model, attn_uses_sequence_id=False)
    last = segments[-1]
    assert abs(float(loss_fn(params, _segment_batch(row, last), leaky)[0]) - float(alone_sum)) > 1e-3


def test_finetuning_configs_keep_packed_examples_apart():
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name in ("tiny_chat", "7b_instruct", "30b_instruct", "30b_chat"):
        spec = importlib.util.spec_from_file_location(name, os.path.join(root, "configs", f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config = module.get_config()
        assert config.model.attn_uses_sequence_id and config.data.packing == "first_fit", name


# ------------------------------------------------------------------ specs as a new user types them


def test_a_bare_path_or_glob_is_files(tmp_path, tok):
    for name in ("a", "b"):
        _write_jsonl(tmp_path / f"{name}.jsonl", [{"text": f"{name} {i}"} for i in range(20)])
    cfg = DataConfig.from_config({"source": f"{tmp_path}/*.jsonl"})
    assert cfg.mixture[0].source == f"files:{tmp_path}/*.jsonl"
    assert len(sources.make_source(f"{tmp_path}/*.jsonl")) == 40
    assert sources.canonical_spec("data/chat.jsonl,more/*.txt") == "files:data/chat.jsonl,more/*.txt"
    with pytest.raises(FileNotFoundError, match=r"files:.*nothing/\*\.jsonl: no files match"):
        sources.make_source(f"{tmp_path}/nothing/*.jsonl")
    with pytest.raises(ValueError, match="'stdlib-chat'.*bare path"):
        sources.make_source("c4")


def test_tokenized_format_is_inferred_and_a_wrong_one_names_the_users_keys(prepared):
    assert DataConfig.from_config({"source": f"tokenized:{prepared}"}).mixture[0].format == "packed"
    bare = DataConfig.from_config({"source": prepared})  # a folder with a manifest.json
    assert bare.mixture[0].source == f"tokenized:{prepared}" and bare.mixture[0].format == "packed"
    with pytest.raises(ValueError, match=r"config\.data\.source='tokenized:.*' with config\.data\.format='chat'"):
        DataConfig.from_config({"source": f"tokenized:{prepared}", "format": "chat"})
    with pytest.raises(ValueError, match=r"config\.data\.mixture\[1\]\.source='files:x\.jsonl' with .*'packed'"):
        DataConfig.from_config(
            {"source": "", "mixture": [{"source": "stdlib"}, {"source": "x.jsonl", "format": "packed"}]}
        )


def test_a_source_whose_records_all_come_out_empty_is_an_error(tmp_path, stdlib_data_dir):
    """Chat turns longer than seq_len truncated to no target: an error naming the source, not an endless wait."""
    import json

    path = tmp_path / "chat.jsonl"
    long = "word " * 50
    with open(path, "w") as f:
        for i in range(5):
            msgs = [{"role": "user", "content": long + str(i)}, {"role": "assistant", "content": "ok"}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    cfg = DataConfig.from_config(
        {
            "source": f"files:{path}",
            "format": "chat",
            "packing": "first_fit",
            "data_dir": stdlib_data_dir,
            "shuffle": False,
        }
    )
    tok = get_tokenizer(cfg)
    rows = packed_rows(cfg, tok, split="train", seq_len=16, seed=0)
    with pytest.raises(ValueError, match=r"chat\.jsonl.*records in a row gave no training example.*no loss token"):
        next(iter(rows))
