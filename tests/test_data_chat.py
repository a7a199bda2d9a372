"""The embedded chat corpus (stdlib-chat): built offline and deterministically from the standard
library's docstrings, with a held-out validation split, formatted into masked ChatML examples."""

from __future__ import annotations

import json
import os
import re

import pytest

from mpt_jax.data import formats, sources, stdlib_chat
from mpt_jax.data.pipeline import DataConfig, check_data, get_tokenizer, packed_rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def chat_paths(stdlib_data_dir):
    return stdlib_chat.build_stdlib_chat(stdlib_data_dir)


def _lines(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def _name(question: str) -> str:
    """The dotted name a conversation's first question is about."""
    return re.search(r"`([\w.]+)", question).group(1)


def test_builds_deterministically_with_both_splits(chat_paths, stdlib_data_dir):
    train, valid = _lines(chat_paths["train"]), _lines(chat_paths["validation"])
    assert len(train) > 1000 and 20 < len(valid) < 0.1 * len(train)
    # Rebuilt from the stdlib, the same conversations in the same order.
    again = {"train": [], "validation": []}
    for validation, messages in stdlib_chat.conversations():
        again["validation" if validation else "train"].append({"messages": messages})
    assert again == {"train": train, "validation": valid}
    # Built once: a second call returns the same files untouched.
    mtime = os.stat(chat_paths["train"]).st_mtime_ns
    assert stdlib_chat.build_stdlib_chat(stdlib_data_dir) == chat_paths
    assert os.stat(chat_paths["train"]).st_mtime_ns == mtime


def test_conversations_are_docstring_questions_and_answers(chat_paths):
    for record in _lines(chat_paths["train"])[:300]:
        formats.check_chat_record(record)
        messages = record["messages"]
        assert [m["role"] for m in messages] in (["user", "assistant"], ["user", "assistant"] * 2)
        assert "`" in messages[0]["content"] and messages[1]["content"].strip()
        if len(messages) == 4:
            assert messages[2]["content"] == stdlib_chat.SIGNATURE_QUESTION
            assert re.fullmatch(r"`[\w.]+\(.*\)`", messages[3]["content"], re.S)
    json_dumps = [r for r in _lines(chat_paths["train"]) if "`json.dumps`" in r["messages"][0]["content"]]
    assert len(json_dumps) == 1
    assert json_dumps[0]["messages"][1]["content"].startswith("Serialize ``obj`` to a JSON formatted ``str``.")
    assert json_dumps[0]["messages"][3]["content"].startswith("`json.dumps(obj, *, skipkeys=False")


def test_validation_is_the_stdlib_corpus_validation_modules(chat_paths):
    """Validation conversations ask about the modules held out of the pretraining corpus, and only them."""
    valid_files = {os.path.relpath(p, sources.stdlib_root()) for p in sources.stdlib_files()}
    valid_modules = {stdlib_chat._module_name(r) for r in valid_files if sources.is_validation(r)} - {None}
    train_modules = {stdlib_chat._module_name(r) for r in valid_files if not sources.is_validation(r)} - {None}

    def owner(question: str, modules: set[str]) -> bool:
        name = _name(question)
        return any(name == m or name.startswith(m + ".") for m in modules)

    for record in _lines(chat_paths["validation"]):
        assert owner(record["messages"][0]["content"], valid_modules)
    valid_questions = {r["messages"][0]["content"] for r in _lines(chat_paths["validation"])}
    train_questions = {r["messages"][0]["content"] for r in _lines(chat_paths["train"])}
    assert not valid_questions & train_questions
    assert valid_modules and train_modules and not valid_modules & train_modules


def test_formats_into_masked_chatml_examples(stdlib_data_dir, chat_paths):
    tok = get_tokenizer(
        DataConfig.from_config({"source": "stdlib-chat", "format": "chat", "data_dir": stdlib_data_dir})
    )
    src = sources.make_source("stdlib-chat", split="validation", data_dir=stdlib_data_dir)
    assert len(src) == len(_lines(chat_paths["validation"]))
    for i in range(5):
        record = src[i]
        example = formats.chat_example(record, tok, max_len=512)
        targets = tok.decode(example["tokens"][example["loss_mask"] == 1])
        for m in record["messages"]:
            assert (m["content"] in targets) == (m["role"] == "assistant")
        assert targets.endswith("<|im_end|><|endoftext|>")


def test_the_tiny_chat_data_checks_and_packs(stdlib_data_dir):
    cfg = DataConfig.from_config(
        {"source": "stdlib-chat", "format": "chat", "packing": "first_fit", "data_dir": stdlib_data_dir}
    )
    tok = get_tokenizer(cfg)
    assert tok.vocab_size == 8194  # the 8192-token BPE + ChatML, inside tiny's 8256 rows
    check_data(cfg, tok, seq_len=256, vocab_size=8256, need_eval=True)
    rows = packed_rows(cfg, tok, split="validation", seq_len=256, seed=0, shuffle=False, repeat=False)
    row = next(iter(rows))
    assert row["segment_ids"].max() >= 2 and row["loss_mask"].sum() > 0
