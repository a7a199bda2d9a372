"""Example formats (mpt_jax/data/formats.py): pretraining, instruction templates, ChatML chat, over-long policy."""

from __future__ import annotations

import pickle
import random

import numpy as np
import pytest

from mpt_jax.data.formats import (
    MPT_30B_CHAT_SYSTEM_PROMPT,
    TEMPLATES,
    FormatStats,
    chat_example,
    instruction_example,
    make_formatter,
    pretrain_example,
    render_chatml,
    resolve_template,
)
from mpt_jax.data.tokenizer import EOS, IM_END, IM_START, Tokenizer, train_bpe

WORDS = (
    "the a an of to and in is it that model data token train loss response instruction below task write request "
    "answer question user assistant system hello world python jax numbers code please explain why how what short "
    "long sentence example rain sun cloud river mountain"
).split()


def _corpus(n: int = 400) -> list[str]:
    rng = random.Random(0)
    lines = [t.format(instruction="Explain the rain.") for t in TEMPLATES.values()]
    # Indented and blank-line-heavy text, so that BPE learns whitespace merges such as "\n " and "\n\n" (these
    # exercise the chat header/content boundary).
    lines += ["def f():\n    return 1\n\n\n\nclass A:\n  pass\n  x"] * 50
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 14))]
        sep = rng.choice([" ", " ", " ", "\n", "\n\n", ", ", ". "])
        lines.append(sep.join(words).capitalize() + rng.choice([".", "?", "!", "\n", ""]))
    return lines


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_bpe(_corpus(), vocab_size=600, name="test-bpe")


@pytest.fixture(scope="module")
def chat_tok(tok: Tokenizer) -> Tokenizer:
    return tok.with_chatml()


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) index ranges of consecutive ones."""
    runs, start = [], None
    for i, m in enumerate([*mask.tolist(), 0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append((start, i))
            start = None
    return runs


def _check_arrays(ex: dict) -> None:
    assert set(ex) == {"tokens", "loss_mask"}
    assert ex["tokens"].dtype == np.int32 and ex["loss_mask"].dtype == np.int32
    assert ex["tokens"].ndim == 1 and ex["tokens"].shape == ex["loss_mask"].shape
    assert set(np.unique(ex["loss_mask"]).tolist()) <= {0, 1}


# ---------------------------------------------------------------------------------------------------------------------
# Pretraining


def test_pretrain_appends_eos_all_targets(tok):
    text = "Hello world, the model is short.\nA second line."
    stats = FormatStats()
    ex = pretrain_example({"text": text}, tok, stats=stats)
    _check_arrays(ex)
    assert ex["tokens"].tolist() == tok.encode(text) + [tok.eos_id]
    assert tok.eos_id == 0 and ex["tokens"][0] != tok.eos_id  # no BOS
    assert ex["loss_mask"].tolist() == [1] * len(ex["tokens"])
    assert tok.decode(ex["tokens"]) == text + EOS
    assert stats == FormatStats(examples=1)


def test_pretrain_blank_skipped_and_bad_record(tok):
    stats = FormatStats()
    assert pretrain_example({"text": ""}, tok, stats=stats) is None
    assert pretrain_example({"text": " \n\t"}, tok, stats=stats) is None
    assert stats == FormatStats(skipped_empty=2)
    with pytest.raises(ValueError, match="no 'text' key"):
        pretrain_example({"content": "x"}, tok)
    with pytest.raises(ValueError, match="'text' must be a string"):
        pretrain_example({"text": 3}, tok)


def test_pretrain_never_truncated(tok):
    """concat_tokens wraps long documents across rows, so the formatter ignores max_len for pretraining."""
    text = " ".join(WORDS * 5)
    ex = make_formatter("pretrain", tok, max_len=4, overlong="drop")({"text": text})
    assert len(ex["tokens"]) == len(tok.encode(text)) + 1 > 4


# ---------------------------------------------------------------------------------------------------------------------
# Instruction


def test_released_template_strings():
    instr = "Name a river."
    pre = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    assert resolve_template("mpt-7b-instruct").format(instruction=instr) == (
        pre + "\n\n### Instruction:\nName a river.\n\n### Response:\n"
    )
    assert resolve_template("mpt-30b-instruct").format(instruction=instr) == (
        pre + "\n\n###Instruction\nName a river.\n\n### Response\n"
    )
    assert resolve_template("plain").format(instruction=instr) == instr


@pytest.mark.parametrize("template", ["mpt-7b-instruct", "mpt-30b-instruct", "plain", "Q: {instruction}\nA:"])
def test_instruction_ids_and_mask(tok, template):
    prompt, response = "Explain why the rain is long.", " The cloud is long, and the river is short."
    stats = FormatStats()
    ex = instruction_example({"prompt": prompt, "response": response}, tok, template=template, max_len=512, stats=stats)
    _check_arrays(ex)
    prompt_ids = tok.encode(resolve_template(template).format(instruction=prompt))
    response_ids = tok.encode(response)
    assert ex["tokens"].tolist() == prompt_ids + response_ids + [tok.eos_id]
    assert ex["loss_mask"].tolist() == [0] * len(prompt_ids) + [1] * (len(response_ids) + 1)
    assert stats == FormatStats(examples=1)


def test_instruction_record_errors(tok):
    with pytest.raises(ValueError, match="no 'response' key"):
        instruction_example({"prompt": "x"}, tok, max_len=64)
    with pytest.raises(ValueError, match="no 'prompt' key"):
        instruction_example({"instruction": "x", "response": "y"}, tok, max_len=64)
    with pytest.raises(ValueError, match="must be a dict"):
        instruction_example(["x", "y"], tok, max_len=64)
    with pytest.raises(ValueError, match="unknown prompt template 'mpt-13b'"):
        instruction_example({"prompt": "x", "response": "y"}, tok, template="mpt-13b", max_len=64)
    with pytest.raises(ValueError, match="not a valid format string"):
        resolve_template("{instruction} {other}")
    with pytest.raises(ValueError, match="overlong must be one of"):
        instruction_example({"prompt": "x", "response": "y"}, tok, max_len=64, overlong="wrap")
    with pytest.raises(ValueError, match="max_len must be a positive integer"):
        instruction_example({"prompt": "x", "response": "y"}, tok, max_len=0)


def test_instruction_blank_response_skipped(tok):
    stats = FormatStats()
    assert instruction_example({"prompt": "x", "response": "  "}, tok, max_len=64, stats=stats) is None
    assert stats == FormatStats(skipped_empty=1)


# ---------------------------------------------------------------------------------------------------------------------
# Chat

MESSAGES = [
    {"role": "system", "content": "You answer questions."},
    {"role": "user", "content": "What is the rain?"},
    {"role": "assistant", "content": "The rain is water from a cloud."},
    {"role": "user", "content": "And the river?"},
    {"role": "assistant", "content": "A river is long water, please."},
]


def test_chat_multiturn_masks(chat_tok):
    tok = chat_tok
    start, end = tok.token_to_id(IM_START), tok.token_to_id(IM_END)
    ex = chat_example({"messages": MESSAGES}, tok, max_len=1024)
    _check_arrays(ex)
    tokens, mask = ex["tokens"], ex["loss_mask"]
    rendered = render_chatml(MESSAGES)
    assert rendered.startswith("<|im_start|>system\nYou answer questions.<|im_end|>\n<|im_start|>user\n")
    # Same ids as a chat template applied to the whole conversation, and the text round-trips.
    assert tokens.tolist() == tok.encode(rendered) + [tok.eos_id]
    assert tok.decode(tokens) == rendered + EOS
    # ChatML markers are single ids.
    assert (tokens == start).sum() == len(MESSAGES) and (tokens == end).sum() == len(MESSAGES)
    # Targets: exactly each assistant content + <|im_end|>, then the final EOS.
    runs = _runs(mask)
    assistant = [m["content"] for m in MESSAGES if m["role"] == "assistant"]
    assert len(runs) == len(assistant) + 1
    for (a, b), content in zip(runs[:-1], assistant, strict=True):
        assert tok.decode(tokens[a:b]) == content + IM_END
        assert tok.decode(tokens[:a]).endswith(f"{IM_START}assistant\n")
        assert tokens[b] == tok.encode("\n")[0] and mask[b] == 0  # the newline after <|im_end|> is not a target
    assert runs[-1] == (len(tokens) - 1, len(tokens)) and tokens[-1] == tok.eos_id
    assert mask[tokens == start].sum() == 0
    assert mask[tokens == end].tolist() == [0, 0, 1, 0, 1]


@pytest.mark.parametrize(
    ("content", "merged"),
    [
        ("  two leading spaces", True),
        ("\n\n\nthree newlines", True),
        (" one space", False),
        ("\nnewline", False),
        ("", False),
    ],
)
def test_chat_whitespace_content_matches_full_encoding(chat_tok, content, merged):
    """Byte-level BPE merges the header's newline with 2+ leading whitespace characters of the content; the ids must
    still equal the chat template's, and the merged token (which holds content) is a target."""
    tok = chat_tok
    messages = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": content + " ok"}]
    ex = chat_example({"messages": messages}, tok, max_len=256)
    assert ex["tokens"].tolist() == tok.encode(render_chatml(messages)) + [tok.eos_id]
    (a, b), eos_run = _runs(ex["loss_mask"])
    assert eos_run == (len(ex["tokens"]) - 1, len(ex["tokens"]))
    reply = content + " ok" + IM_END
    header = render_chatml(messages[:1]) + f"{IM_START}assistant"
    # Only in the merged case does the header's "\n" join the targets; "assistant" itself never does.
    assert tok.decode(ex["tokens"][a:b]) == ("\n" + reply if merged else reply)
    assert tok.decode(ex["tokens"][:a]) == (header if merged else header + "\n")


def test_chat_system_prompt(chat_tok):
    tok = chat_tok
    no_sys = MESSAGES[1:]
    ex = chat_example({"messages": no_sys}, tok, max_len=1024, system_prompt=MPT_30B_CHAT_SYSTEM_PROMPT)
    expected = [{"role": "system", "content": MPT_30B_CHAT_SYSTEM_PROMPT}, *no_sys]
    assert tok.decode(ex["tokens"]) == render_chatml(expected) + EOS
    # A record's own system message wins.
    ex = chat_example({"messages": MESSAGES}, tok, max_len=1024, system_prompt=MPT_30B_CHAT_SYSTEM_PROMPT)
    assert tok.decode(ex["tokens"]) == render_chatml(MESSAGES) + EOS
    # Without system_prompt nothing is added.
    ex = chat_example({"messages": no_sys}, tok, max_len=1024)
    assert tok.decode(ex["tokens"]) == render_chatml(no_sys) + EOS


@pytest.mark.parametrize(
    ("record", "match"),
    [
        ({"msgs": []}, "no 'messages' key"),
        ({"messages": []}, "empty list"),
        ({"messages": "hi"}, "must be a list"),
        ({"messages": [{"role": "user", "content": "a"}, "b"]}, "message 1 must be a dict"),
        ({"messages": [{"content": "a"}]}, "message 0 has no 'role' key"),
        ({"messages": [{"role": "assistant"}]}, "message 0 has no 'content' key"),
        (
            {"messages": [{"role": "tool", "content": "a"}, {"role": "assistant", "content": "b"}]},
            "unknown role 'tool'",
        ),
        ({"messages": [{"role": "assistant", "content": None}]}, "content must be a string"),
        ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}, "last message"),
    ],
)
def test_chat_validation_errors(chat_tok, record, match):
    with pytest.raises(ValueError, match=match):
        chat_example(record, chat_tok, max_len=64)


def test_chat_needs_chatml_tokens(tok):
    with pytest.raises(ValueError, match=r"with_chatml\(\)"):
        chat_example({"messages": MESSAGES}, tok, max_len=64)
    with pytest.raises(ValueError, match=r"with_chatml\(\)"):
        make_formatter("chat", tok, max_len=64)


def test_chat_blank_assistant_skipped(chat_tok):
    stats = FormatStats()
    record = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]}
    assert chat_example(record, chat_tok, max_len=64, stats=stats) is None
    assert stats == FormatStats(skipped_empty=1)


# ---------------------------------------------------------------------------------------------------------------------
# Over-long policy and stats


def test_truncate_vs_drop_counts(tok, chat_tok):
    record = {"prompt": "Explain the rain.", "response": " ".join(WORDS)}
    full = instruction_example(record, tok, max_len=10_000)
    n = len(full["tokens"])
    n_prompt = int((full["loss_mask"] == 0).sum())
    max_len = n_prompt + 5

    stats = FormatStats()
    ex = instruction_example(record, tok, max_len=max_len, stats=stats)
    assert ex["tokens"].tolist() == full["tokens"][:max_len].tolist()
    assert ex["loss_mask"].tolist() == full["loss_mask"][:max_len].tolist()
    assert ex["tokens"][-1] != tok.eos_id  # the head is kept; no EOS is forced in
    assert instruction_example(record, tok, max_len=n, stats=stats)["tokens"].shape == (n,)  # exactly max_len: kept
    assert stats == FormatStats(examples=2, truncated=1)

    stats = FormatStats()
    assert instruction_example(record, tok, max_len=max_len, overlong="drop", stats=stats) is None
    assert instruction_example(record, tok, max_len=n, overlong="drop", stats=stats) is not None
    assert stats == FormatStats(examples=1, dropped_overlong=1)

    chat = {"messages": MESSAGES}
    n_chat = len(chat_example(chat, chat_tok, max_len=10_000)["tokens"])
    stats = FormatStats()
    assert len(chat_example(chat, chat_tok, max_len=n_chat - 3, stats=stats)["tokens"]) == n_chat - 3
    assert chat_example(chat, chat_tok, max_len=n_chat - 3, overlong="drop", stats=stats) is None
    assert stats == FormatStats(examples=1, truncated=1, dropped_overlong=1)


def test_truncation_without_loss_tokens_is_dropped(tok, chat_tok):
    stats = FormatStats()
    record = {"prompt": " ".join(WORDS), "response": "Short."}
    n_prompt = len(tok.encode(TEMPLATES["mpt-7b-instruct"].format(instruction=record["prompt"])))
    assert instruction_example(record, tok, max_len=n_prompt, stats=stats) is None
    assert instruction_example(record, tok, max_len=n_prompt + 1, stats=stats)["loss_mask"].sum() == 1
    # Chat: a long first user turn pushes the only assistant turn past max_len.
    chat = {"messages": [{"role": "user", "content": " ".join(WORDS)}, {"role": "assistant", "content": "Yes."}]}
    assert chat_example(chat, chat_tok, max_len=20, stats=stats) is None
    assert stats == FormatStats(examples=1, truncated=1, dropped_no_loss=2)
    assert "2 dropped with no loss token left" in stats.summary()


def test_stats_arithmetic():
    a = FormatStats(examples=3, truncated=1)
    b = FormatStats(examples=2, dropped_overlong=4, skipped_empty=1)
    c = a + b
    assert c == FormatStats(examples=5, truncated=1, dropped_overlong=4, skipped_empty=1)
    assert a == FormatStats(examples=3, truncated=1)  # + does not mutate
    assert sum([a, b]) == c and sum([a, b], FormatStats()) == c
    assert a.update(b) is a and a == c
    assert c.seen == 10
    assert c.summary().startswith("formats: 5 examples of 10 records (1 truncated, 4 dropped as over-long")
    with pytest.raises(TypeError):
        a.update({"examples": 1})


# ---------------------------------------------------------------------------------------------------------------------
# Formatter


@pytest.mark.parametrize(
    ("kind", "record"),
    [
        ("pretrain", {"text": "Hello world."}),
        ("instruction", {"prompt": "Explain the rain.", "response": "Water from a cloud."}),
        ("chat", {"messages": MESSAGES[1:]}),
    ],
)
def test_formatter_pickles_and_counts(chat_tok, kind, record):
    stats = FormatStats()
    fmt = make_formatter(
        kind, chat_tok, max_len=512, template="mpt-30b-instruct", system_prompt="Be brief.", stats=stats
    )
    assert fmt.stats is stats
    ex = fmt(record)
    assert stats == FormatStats(examples=1)
    clone = pickle.loads(pickle.dumps(fmt))
    ex2 = clone(record)
    assert ex2["tokens"].tolist() == ex["tokens"].tolist() and ex2["loss_mask"].tolist() == ex["loss_mask"].tolist()
    assert clone.stats == FormatStats(examples=2) and stats == FormatStats(examples=1)  # the copy counts on its own
    if kind == "instruction":
        assert chat_tok.decode(ex["tokens"]).startswith(
            TEMPLATES["mpt-30b-instruct"].format(instruction=record["prompt"])
        )
    if kind == "chat":
        assert chat_tok.decode(ex["tokens"]).startswith(f"{IM_START}system\nBe brief.{IM_END}\n")


def test_make_formatter_validates_eagerly(tok):
    with pytest.raises(ValueError, match="unknown format kind 'sft'"):
        make_formatter("sft", tok, max_len=64)
    with pytest.raises(ValueError, match="overlong must be one of"):
        make_formatter("instruction", tok, max_len=64, overlong="wrap")
    with pytest.raises(ValueError, match="unknown prompt template"):
        make_formatter("instruction", tok, max_len=64, template="dolly")
    with pytest.raises(ValueError, match="max_len must be a positive integer"):
        make_formatter("pretrain", tok, max_len=-1)
