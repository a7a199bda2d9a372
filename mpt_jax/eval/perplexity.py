"""Perplexity of a model on documents: every token after a document's first, scored once.

    python -m mpt_jax.eval perplexity --model=PATH --data=SPEC [--split=validation --stride=
        --max_length= --limit= --batch_size=]

A document longer than the model's context is scored in windows (``scoring.rolling_windows``):
disjoint by default, or sliding by ``stride`` so that each scored token sees up to ``max_length``
tokens before it (how long-context models are judged; ALiBi models may be given a ``max_length``
past their training length). The reported loss is the mean negative log-likelihood per scored
token, perplexity its exponential, and ``tokens`` the number of tokens scored (real tokens only:
no padding, no document's first token).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from mpt_jax.eval.scoring import Request, Scorer, rolling_requests


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    loss: float  # mean negative log-likelihood per scored token (nats)
    perplexity: float
    tokens: int  # tokens scored
    documents: int  # documents with at least two tokens (a lone token has nothing to score)

    def as_dict(self) -> dict[str, float | int]:
        return dataclasses.asdict(self)


def perplexity(
    scorer: Scorer, documents: Iterable[Sequence[int]], *, stride: int | None = None, chunk: int = 256
) -> PerplexityResult:
    """Scores ``documents`` (token-id lists) in windows of ``scorer.max_length``, ``chunk`` requests
    at a time (so a long corpus is never held whole)."""
    nll, tokens, docs = 0.0, 0, 0
    pending: list[Request] = []

    def flush() -> None:
        nonlocal nll
        nll -= math.fsum(s for s, _ in scorer.loglikelihood(pending))
        pending.clear()

    for doc in documents:
        doc = list(doc)
        if len(doc) < 2:
            continue
        docs += 1
        tokens += len(doc) - 1
        pending.extend(rolling_requests(doc, scorer.max_length, stride))
        if len(pending) >= chunk:
            flush()
    if pending:
        flush()
    if tokens == 0:
        raise ValueError("perplexity: no document has two or more tokens: there is nothing to score")
    loss = nll / tokens
    return PerplexityResult(loss=loss, perplexity=math.exp(loss), tokens=tokens, documents=docs)


def source_documents(
    spec: str,
    tokenizer: Any,
    *,
    split: str = "validation",
    holdout_fraction: float | None = None,
    limit: int | None = None,
    data_dir: str | None = None,
) -> Iterator[list[int]]:
    """Token ids of the documents of a data source (``mpt_jax.data.sources.make_source`` specs).

    Text records are encoded with ``tokenizer``; tokenized shards give their packed rows split back
    into documents by segment id. Sources without named splits (files, tokenized shards) are read
    whole unless ``holdout_fraction`` is given: then only the records training held out at that
    fraction (its ``validation`` split), the held-out data of a run trained on the same files."""
    from mpt_jax.data.sources import make_source

    spec_kind = spec.partition(":")[0]
    whole = holdout_fraction is None and spec_kind not in ("stdlib", "stdlib-chat", "tfds")
    source = make_source(
        spec,
        split="validation" if whole else split,
        holdout_fraction=1.0 if whole else (holdout_fraction or 0.0),
        data_dir=data_dir,
    )
    count = len(source) if limit is None else min(limit, len(source))
    for i in range(count):
        record = source[i]
        if "tokens" in record:
            yield from _segments(record)
        elif "text" in record:
            if tokenizer is None:
                raise ValueError(f"{spec}: text documents need a tokenizer (this model was loaded without one)")
            yield tokenizer.encode(record["text"])
        else:
            raise ValueError(f"{spec}: record {i} has neither 'text' nor 'tokens' (keys: {sorted(record)})")


def _segments(record: dict[str, np.ndarray]) -> Iterator[list[int]]:
    """A packed row's documents (segment id 0 is padding)."""
    tokens = np.asarray(record["tokens"])
    segments = np.asarray(record.get("segment_ids", np.ones_like(tokens)))
    for seg in np.unique(segments[segments > 0]):
        yield tokens[segments == seg].tolist()
