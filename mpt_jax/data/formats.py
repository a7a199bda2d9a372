"""Example formats: raw records -> ``{"tokens", "loss_mask"}`` examples.

An *example* is a dict of two equal-length 1-D int32 numpy arrays:

- ``tokens``: token ids, unshifted (as llm-foundry's labels);
- ``loss_mask``: 0/1; ``loss_mask[t] == 1`` means token ``t`` is a training target, i.e. the model is trained to
  predict it from positions ``< t``. Whether position 0 of a packed row may be a target is decided by the packer.

Three formats, each a function returning an example or ``None`` (record skipped or dropped):

- ``pretrain_example``: llm-foundry ``concat_tokens``: ``encode(text) + [eos]``, all targets, no BOS, never truncated
  (the packer wraps long documents across rows, as ``ConcatTokensDataset`` does);
- ``instruction_example``: ``{prompt, response}`` rendered with a released model's prompt template; loss on the
  response and the EOS that ends it;
- ``chat_example``: ``{messages: [{role, content}, ...]}`` in ChatML (MPT-7B/30B-Chat); loss on assistant turns.

Over-long instruction/chat examples are truncated (keeping the head) or dropped, and every outcome is counted in a
``FormatStats`` so that a run can report how much data its ``max_len`` cost. ``make_formatter`` bundles a format and
its options into a picklable callable for grain workers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from mpt_jax.data.tokenizer import Tokenizer

# The prompt formats themselves live in mpt_jax.prompts (shared with generation and serving).
from mpt_jax.prompts import (  # noqa: F401 - MPT_30B_CHAT_SYSTEM_PROMPT, TEMPLATES, render_chatml: re-exported
    CHAT_ROLES,
    IM_END,
    IM_START,
    MPT_30B_CHAT_SYSTEM_PROMPT,
    TEMPLATES,
    render_chatml,
    resolve_template,
)

Example = dict[str, np.ndarray]

KINDS = ("pretrain", "instruction", "chat")
OVERLONG_POLICIES = ("truncate", "drop")


@dataclasses.dataclass
class FormatStats:
    """Counts of what the formats did with the records they saw.

    ``examples`` counts examples returned (truncated ones included); the ``dropped_*`` and ``skipped_empty`` counts
    are records for which ``None`` was returned, so ``seen`` is the number of records processed. Records that fail
    validation raise instead and are not counted. Each process (grain worker) counts into its own copy; merge them
    with ``+``/``update``/``sum(..., FormatStats())``.
    """

    examples: int = 0
    truncated: int = 0
    dropped_overlong: int = 0
    dropped_no_loss: int = 0
    skipped_empty: int = 0

    @property
    def seen(self) -> int:
        """Records processed: returned examples plus every kind of ``None``."""
        return self.examples + self.dropped_overlong + self.dropped_no_loss + self.skipped_empty

    def update(self, other: FormatStats) -> FormatStats:
        """Adds ``other``'s counts into this one (in place) and returns it."""
        if not isinstance(other, FormatStats):
            raise TypeError(f"FormatStats.update: expected FormatStats, got {type(other).__name__}")
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self

    def __add__(self, other: FormatStats) -> FormatStats:
        if not isinstance(other, FormatStats):
            return NotImplemented
        return dataclasses.replace(self).update(other)

    def __radd__(self, other: Any) -> FormatStats:
        # Lets plain ``sum(stats_list)`` work (its start value is 0).
        if isinstance(other, int) and other == 0:
            return dataclasses.replace(self)
        return NotImplemented

    def summary(self) -> str:
        """One line for logs, e.g. ``formats: 98 examples of 100 records (3 truncated, ...)``."""
        return (
            f"formats: {self.examples} examples of {self.seen} records ({self.truncated} truncated, "
            f"{self.dropped_overlong} dropped as over-long, {self.dropped_no_loss} dropped with no loss token left, "
            f"{self.skipped_empty} skipped as empty)"
        )


# ---------------------------------------------------------------------------------------------------------------------
# Validation helpers


def _check_limits(max_len: int, overlong: str) -> None:
    if isinstance(max_len, bool) or not isinstance(max_len, (int, np.integer)) or max_len < 1:
        raise ValueError(f"max_len must be a positive integer, got {max_len!r}")
    if overlong not in OVERLONG_POLICIES:
        raise ValueError(f"overlong must be one of {OVERLONG_POLICIES}, got {overlong!r}")


def _get_str(record: Any, key: str, what: str) -> str:
    if not isinstance(record, Mapping):
        raise ValueError(f"{what} record must be a dict, got {type(record).__name__}")
    if key not in record:
        raise ValueError(f"{what} record has no {key!r} key (keys: {sorted(map(str, record))})")
    value = record[key]
    if not isinstance(value, str):
        raise ValueError(f"{what} record: {key!r} must be a string, got {type(value).__name__}")
    return value


def _chatml_ids(tok: Tokenizer) -> tuple[int, int]:
    start, end = tok.token_to_id(IM_START), tok.token_to_id(IM_END)
    if start is None or end is None:
        raise ValueError(
            f"tokenizer {tok.name} has no ChatML tokens {IM_START} / {IM_END}: use tok.with_chatml() for chat data"
        )
    return start, end


def _validate_messages(record: Any) -> list[dict[str, str]]:
    if not isinstance(record, Mapping):
        raise ValueError(f"chat record must be a dict, got {type(record).__name__}")
    if "messages" not in record:
        raise ValueError(f"chat record has no 'messages' key (keys: {sorted(map(str, record))})")
    messages = record["messages"]
    if not isinstance(messages, Sequence) or isinstance(messages, str):
        raise ValueError(f"chat record: 'messages' must be a list, got {type(messages).__name__}")
    if not messages:
        raise ValueError("chat record: 'messages' is an empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ValueError(f"chat record: message {i} must be a dict, got {type(m).__name__}")
        for key in ("role", "content"):
            if key not in m:
                raise ValueError(f"chat record: message {i} has no {key!r} key")
        role, content = m["role"], m["content"]
        if role not in CHAT_ROLES:
            raise ValueError(f"chat record: message {i} has unknown role {role!r} (expected one of {CHAT_ROLES})")
        if not isinstance(content, str):
            raise ValueError(f"chat record: message {i} content must be a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    if out[-1]["role"] != "assistant":
        raise ValueError(f"chat record: the last message must be from the assistant, not {out[-1]['role']!r}")
    return out


def check_instruction_record(record: Any) -> None:
    """ValueError unless ``record`` has string ``prompt`` and ``response`` (what ``instruction_example`` reads)."""
    _get_str(record, "prompt", "instruction")
    _get_str(record, "response", "instruction")


def check_chat_record(record: Any) -> None:
    """ValueError unless ``record`` is a valid ``{"messages": [...]}`` (what ``chat_example`` reads)."""
    _validate_messages(record)


# Whole-record checks a source applies when it indexes finetuning data, so a record missing a field
# is reported with its file and line before training starts.
RECORD_CHECKS: dict[str, Callable[[Any], None]] = {"instruction": check_instruction_record, "chat": check_chat_record}


def _finish(tokens: list[int], mask: list[int], *, max_len: int, overlong: str, stats: FormatStats) -> Example | None:
    """Applies the over-long policy, counts the outcome and builds the arrays."""
    if len(tokens) > max_len:
        if overlong == "drop":
            stats.dropped_overlong += 1
            return None
        tokens, mask = tokens[:max_len], mask[:max_len]
        if not any(mask):
            # llm-foundry errors here; we drop and count, since one bad record should not stop a run.
            stats.dropped_no_loss += 1
            return None
        stats.truncated += 1
    stats.examples += 1
    return {"tokens": np.asarray(tokens, dtype=np.int32), "loss_mask": np.asarray(mask, dtype=np.int32)}


# ---------------------------------------------------------------------------------------------------------------------
# Formats


def pretrain_example(record: Mapping[str, Any], tok: Tokenizer, *, stats: FormatStats | None = None) -> Example | None:
    """``{"text"}`` -> ``encode(text) + [eos]``, every token a target (llm-foundry ``concat_tokens``).

    No BOS (gpt-neox adds none) and the EOS is a target, so the model learns to end documents. There is no length
    limit here on purpose: ``concat_tokens`` wraps a long document over several rows instead of cutting it, so
    splitting is the packer's job. Blank text returns ``None`` (counted as ``skipped_empty``): a lone EOS teaches
    nothing.
    """
    stats = stats if stats is not None else FormatStats()
    text = _get_str(record, "text", "pretraining")
    if not text.strip():
        stats.skipped_empty += 1
        return None
    tokens = tok.encode(text) + [tok.eos_id]
    stats.examples += 1
    return {"tokens": np.asarray(tokens, dtype=np.int32), "loss_mask": np.ones(len(tokens), dtype=np.int32)}


def instruction_example(
    record: Mapping[str, Any],
    tok: Tokenizer,
    *,
    template: str = "mpt-7b-instruct",
    max_len: int,
    overlong: str = "truncate",
    stats: FormatStats | None = None,
) -> Example | None:
    """``{"prompt", "response"}`` -> ``encode(template(prompt)) + encode(response) + [eos]``.

    The loss is on the response and its EOS only (llm-foundry ``target_prompts='none'``), so the model learns to
    answer, not to write instructions. Prompt and response are tokenized separately, as llm-foundry's
    ``tokenizer(text=prompt, text_target=response)`` does, so the boundary never falls inside a token.
    ``template`` is a ``TEMPLATES`` name or a format string with ``{instruction}``. A blank response returns ``None``
    (``skipped_empty``). Over-long examples follow ``overlong`` (see ``_finish``): truncation keeps the head, and an
    example whose response is cut away entirely is dropped (``dropped_no_loss``).
    """
    _check_limits(max_len, overlong)
    fmt = resolve_template(template)
    stats = stats if stats is not None else FormatStats()
    prompt = _get_str(record, "prompt", "instruction")
    response = _get_str(record, "response", "instruction")
    if not response.strip():
        stats.skipped_empty += 1
        return None
    prompt_ids = tok.encode(fmt.format(instruction=prompt))
    response_ids = tok.encode(response) + [tok.eos_id]
    tokens = prompt_ids + response_ids
    mask = [0] * len(prompt_ids) + [1] * len(response_ids)
    return _finish(tokens, mask, max_len=max_len, overlong=overlong, stats=stats)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def chat_example(
    record: Mapping[str, Any],
    tok: Tokenizer,
    *,
    max_len: int,
    overlong: str = "truncate",
    system_prompt: str | None = None,
    stats: FormatStats | None = None,
) -> Example | None:
    """``{"messages": [{role, content}, ...]}`` -> ChatML tokens + ``[eos]``, loss on every assistant turn.

    Layout: ``render_chatml(messages)`` followed by EOS. The token ids equal ``tok.encode(render_chatml(messages))
    + [eos]`` exactly: the ChatML markers are special tokens, which the tokenizer splits out before BPE, so encoding
    each text span between markers on its own (``"{role}\\n{content}"``, and the ``"\\n"`` between turns) is what
    encoding the whole string does.

    Targets (1): each assistant turn's content tokens and its ``<|im_end|>`` (so the model learns to stop), and the
    final EOS (it ends the document, as in pretraining and ``instruction_example``; llm-foundry also appends EOS to the
    last turn). Not targets (0): ``<|im_start|>``, the ``assistant\\n`` header, system/user turns, and the ``"\\n"``
    after each ``<|im_end|>`` -- including the last one, which belongs to the layout, not to the reply (llm-foundry
    counts it as part of the response; inference stops at ``<|im_end|>`` so it is never generated). All assistant
    turns are trained, like llm-foundry's ``target_responses='all'`` (its default is the last turn only).

    Header/content boundary: ``{role}\\n`` and the content are encoded together (as the template does); the header
    is the longest prefix shared with ``encode("{role}\\n")``. They differ only when the content starts with two or
    more whitespace characters, where byte-level BPE merges the header's newline with them; that token is a target.

    ``system_prompt`` is prepended as a system message when the record has none. A record whose assistant turns are
    all blank returns ``None`` (``skipped_empty``). ``tok`` must have the ChatML tokens (``tok.with_chatml()``).
    """
    _check_limits(max_len, overlong)
    start_id, end_id = _chatml_ids(tok)
    stats = stats if stats is not None else FormatStats()
    messages = _validate_messages(record)
    if system_prompt is not None and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": system_prompt}, *messages]
    if all(not m["content"].strip() for m in messages if m["role"] == "assistant"):
        stats.skipped_empty += 1
        return None

    newline = tok.encode("\n")
    tokens: list[int] = []
    mask: list[int] = []
    for m in messages:
        role = m["role"]
        span = tok.encode(f"{role}\n{m['content']}")
        if role == "assistant":
            n_header = _common_prefix(tok.encode(f"{role}\n"), span)
            span_mask = [0] * n_header + [1] * (len(span) - n_header)
            end_mask = 1
        else:
            span_mask = [0] * len(span)
            end_mask = 0
        tokens += [start_id, *span, end_id, *newline]
        mask += [0, *span_mask, end_mask, *([0] * len(newline))]
    tokens.append(tok.eos_id)
    mask.append(1)
    return _finish(tokens, mask, max_len=max_len, overlong=overlong, stats=stats)


# ---------------------------------------------------------------------------------------------------------------------
# Formatter


class Formatter:
    """A format with its options bound: ``formatter(record) -> example | None``.

    A class rather than a closure so that it pickles (grain sends it to worker processes; ``Tokenizer`` pickles via
    its JSON). ``stats`` is the ``FormatStats`` it counts into -- the one given, or a fresh one; a pickled copy counts
    into its own copy, so workers' counts must be collected and summed by the pipeline.
    """

    def __init__(
        self,
        kind: str,
        tok: Tokenizer,
        *,
        max_len: int,
        template: str = "mpt-7b-instruct",
        overlong: str = "truncate",
        system_prompt: str | None = None,
        stats: FormatStats | None = None,
    ):
        if kind not in KINDS:
            raise ValueError(f"unknown format kind {kind!r}: expected one of {KINDS}")
        # Validate everything now, not at the first record inside a worker.
        _check_limits(max_len, overlong)
        if kind == "instruction":
            resolve_template(template)
        if kind == "chat":
            _chatml_ids(tok)
        self.kind = kind
        self.tok = tok
        self.max_len = int(max_len)
        self.template = template
        self.overlong = overlong
        self.system_prompt = system_prompt
        self.stats = stats if stats is not None else FormatStats()

    def __call__(self, record: Mapping[str, Any]) -> Example | None:
        if self.kind == "pretrain":
            return pretrain_example(record, self.tok, stats=self.stats)
        if self.kind == "instruction":
            return instruction_example(
                record, self.tok, template=self.template, max_len=self.max_len, overlong=self.overlong, stats=self.stats
            )
        return chat_example(
            record,
            self.tok,
            max_len=self.max_len,
            overlong=self.overlong,
            system_prompt=self.system_prompt,
            stats=self.stats,
        )

    def __repr__(self) -> str:
        return (
            f"Formatter(kind={self.kind!r}, tok={self.tok.name!r}, max_len={self.max_len}, "
            f"template={self.template!r}, overlong={self.overlong!r}, system_prompt={self.system_prompt!r})"
        )


def make_formatter(
    kind: str,
    tok: Tokenizer,
    *,
    max_len: int,
    template: str = "mpt-7b-instruct",
    overlong: str = "truncate",
    system_prompt: str | None = None,
    stats: FormatStats | None = None,
) -> Callable[[Mapping[str, Any]], Example | None]:
    """A picklable ``record -> example | None`` for ``kind`` in ``KINDS``.

    ``max_len`` applies to instruction and chat examples; pretraining documents are never truncated (the packer
    wraps them). ``template`` is used by "instruction", ``system_prompt`` by "chat"; others ignore them.
    """
    return Formatter(
        kind, tok, max_len=max_len, template=template, overlong=overlong, system_prompt=system_prompt, stats=stats
    )
