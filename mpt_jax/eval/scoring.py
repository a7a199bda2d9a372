"""Scoring text under a model: the log-probability of a continuation given its context.

Everything evaluation reports comes from here: perplexity (windows of a document), LLM Foundry's
ICL tasks (a choice's continuation, a schema's context options), and lm-evaluation-harness's
``loglikelihood`` / ``loglikelihood_rolling``. The convention is the training loss's
(``steps.token_losses``): the logits at position t predict token t + 1, computed in float32.

A request is a pair of token lists (context, continuation); the continuation is scored given the
context. ``Scorer.loglikelihood`` sorts requests by length, packs them into batches of a fixed
number of rows, pads each batch to a power-of-two length (one compiled shape per bucket) and
returns, in the requests' order, the continuation's summed log-probability and whether every one
of its tokens is the model's greedy choice.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mpt_jax.config import MPTConfig
from mpt_jax.generate import bucket
from mpt_jax.model import MPT, init_cache, is_stacked, unstack_layers

Request = tuple[Sequence[int], Sequence[int]]  # (context token ids, continuation token ids)


def target_scores(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per row: (sum of log p(targets) where ``mask``, whether each masked target is the argmax).

    logits [B, T, V] (position t's prediction), targets [B, T] (the token at t + 1), mask [B, T].
    Pure: what the jitted scorer and the tests call."""
    logits = logits.astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    token_logp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    mask = mask.astype(bool)
    greedy = jnp.argmax(logits, axis=-1) == targets
    return jnp.sum(jnp.where(mask, token_logp, 0.0), axis=-1), jnp.all(greedy | ~mask, axis=-1)


@functools.cache
def _score_fn(cfg: MPTConfig):
    model = MPT(cfg, scan_layers=False)

    def score(params, inputs, targets, mask):
        return target_scores(model.apply({"params": params}, inputs), targets, mask)

    return jax.jit(score)


@functools.cache
def _prefix_score_fn(cfg: MPTConfig):
    """Scores continuations on top of shared prefixes: each distinct prefix [G, Lp] is run once
    (prefill into a KV cache, logits at one position only), each request's rows of the cache are
    its prefix's, and only its tail [B, Lt] (last context token + continuation) is run on top,
    with logits where they are scored. Multiple choice shares one question among its choices."""
    model = MPT(cfg, scan_layers=False)
    cap = cfg.max_seq_len - 1 if cfg.uses_learned_pos_emb else None

    def score(params, prefixes, prefix_of, prefix_len, tails, targets, mask):
        groups, lp = prefixes.shape
        cache = init_cache(cfg, groups, lp + tails.shape[1], scan_layers=False)
        zeros = jnp.zeros((groups,), jnp.int32)
        _, cache = model.apply(
            {"params": params},
            prefixes,
            cache=cache,
            cache_positions=zeros,
            prefill=True,
            logit_positions=zeros[:, None],
        )
        cache = jax.tree.map(lambda c: c[prefix_of], cache)  # each request's rows: its prefix's
        positions = prefix_len[:, None] + jnp.arange(tails.shape[1], dtype=jnp.int32)
        if cap is not None:  # padding past the learned embedding's table: its rows are never read
            positions = jnp.minimum(positions, cap)
        logits, _ = model.apply({"params": params}, tails, cache=cache, cache_positions=prefix_len, positions=positions)
        return target_scores(logits, targets, mask)

    return jax.jit(score)


@dataclasses.dataclass(frozen=True)
class Row:
    """One request laid out for the model: inputs[t] predicts targets[t]; the continuation is the
    last ``n_targets`` targets."""

    inputs: list[int]
    targets: list[int]
    n_targets: int

    @property
    def prefix_len(self) -> int:
        """Inputs before the scored positions: the context less its last token (what requests with
        the same context share)."""
        return len(self.inputs) - self.n_targets


def layout(context: Sequence[int], continuation: Sequence[int], max_length: int) -> Row:
    """The model's row for a request: context + continuation shifted by one, cut on the left to
    ``max_length`` inputs (the continuation is always kept whole: it must fit)."""
    context, continuation = [int(t) for t in context], [int(t) for t in continuation]
    if not continuation:
        raise ValueError("a request's continuation is empty: there is nothing to score")
    if not context:
        raise ValueError("a request's context is empty: the first continuation token has no prediction")
    if len(continuation) > max_length:
        raise ValueError(
            f"a continuation of {len(continuation)} tokens does not fit max_length={max_length} (the model's context)"
        )
    full = (context + continuation)[-(max_length + 1) :]
    return Row(inputs=full[:-1], targets=full[1:], n_targets=len(continuation))


class Scorer:
    """Continuation log-probabilities for one loaded model.

    ``batch_size`` rows per forward (a batch is padded with empty rows, so every call of a length
    bucket has the same shape); ``max_length`` is the longest input (default ``cfg.max_seq_len``;
    ALiBi models may be given more). Params in either layout; the per-layer one (``load(...,
    scan_layers=False)``) is used as given, stacked params are unstacked into a copy.
    """

    def __init__(self, cfg: MPTConfig, params: Any, *, batch_size: int = 8, max_length: int | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be positive")
        self.cfg, self.batch_size = cfg, int(batch_size)
        self.max_length = int(max_length or cfg.max_seq_len)
        if cfg.uses_learned_pos_emb and self.max_length > cfg.max_seq_len:
            raise ValueError(
                f"max_length={self.max_length} exceeds max_seq_len={cfg.max_seq_len} of a learned position embedding"
            )
        self.params = unstack_layers(params, cfg.n_layers) if is_stacked(params) else params
        self._score = _score_fn(cfg)

    def loglikelihood(self, requests: Sequence[Request]) -> list[tuple[float, bool]]:
        """(sum of the continuation's log-probs, whether it is the greedy continuation) per request.

        Requests whose contexts share a prefix (a multiple-choice question and its choices) run
        that prefix once (``_prefix_score_fn``); a one-token context runs whole (``_run``)."""
        rows = [layout(c, x, self.max_length) for c, x in requests]
        out: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        whole = [i for i, r in enumerate(rows) if r.prefix_len == 0]
        shared = [i for i, r in enumerate(rows) if r.prefix_len > 0]
        whole.sort(key=lambda i: -len(rows[i].inputs))  # similar lengths batch together
        shared.sort(key=lambda i: (-rows[i].prefix_len, rows[i].inputs[: rows[i].prefix_len], -rows[i].n_targets))
        chunks = [(whole[k : k + self.batch_size], self._run) for k in range(0, len(whole), self.batch_size)]
        chunks += [(chunk, self._run_shared) for chunk in self._shared_chunks(rows, shared)]
        for chunk, run in chunks:
            sums, greedy = run([rows[i] for i in chunk])
            for i, s, g in zip(chunk, sums, greedy, strict=False):
                out[i] = (float(s), bool(g))
        return out

    def _shared_chunks(self, rows: list[Row], ids: list[int]) -> list[list[int]]:
        """Consecutive requests holding at most ``batch_size`` distinct prefixes (the prefill's
        rows) and ``4 x batch_size`` requests (the tails' rows)."""
        chunks: list[list[int]] = []
        seen: set[tuple[int, ...]] = set()
        for i in ids:
            prefix = tuple(rows[i].inputs[: rows[i].prefix_len])
            if (
                not chunks
                or (prefix not in seen and len(seen) == self.batch_size)
                or len(chunks[-1]) == 4 * self.batch_size
            ):
                chunks.append([])
                seen = set()
            chunks[-1].append(i)
            seen.add(prefix)
        return chunks

    def _run_shared(self, rows: list[Row]) -> tuple[np.ndarray, np.ndarray]:
        prefixes: dict[tuple[int, ...], int] = {}
        for r in rows:
            prefixes.setdefault(tuple(r.inputs[: r.prefix_len]), len(prefixes))
        groups = bucket(len(prefixes), minimum=1)
        lp = min(bucket(max(len(p) for p in prefixes)), self.max_length)
        lt = bucket(max(r.n_targets for r in rows), minimum=4)
        prefix_ids = np.zeros((groups, lp), np.int32)
        for p, g in prefixes.items():
            prefix_ids[g, : len(p)] = p
        n = bucket(len(rows), minimum=self.batch_size)
        prefix_of = np.zeros((n,), np.int32)
        prefix_len = np.zeros((n,), np.int32)
        tails = np.zeros((n, lt), np.int32)
        targets = np.zeros((n, lt), np.int32)
        mask = np.zeros((n, lt), bool)
        for b, r in enumerate(rows):
            prefix_of[b] = prefixes[tuple(r.inputs[: r.prefix_len])]
            prefix_len[b] = r.prefix_len
            tails[b, : r.n_targets] = r.inputs[r.prefix_len :]
            targets[b, : r.n_targets] = r.targets[r.prefix_len :]
            mask[b, : r.n_targets] = True
        fn = _prefix_score_fn(self.cfg)
        sums, greedy = fn(self.params, prefix_ids, prefix_of, prefix_len, tails, targets, mask)
        return np.asarray(sums)[: len(rows)], np.asarray(greedy)[: len(rows)]

    def _run(self, rows: list[Row]) -> tuple[np.ndarray, np.ndarray]:
        width = min(bucket(max(len(r.inputs) for r in rows)), self.max_length)
        inputs = np.zeros((self.batch_size, width), np.int32)
        targets = np.zeros((self.batch_size, width), np.int32)
        mask = np.zeros((self.batch_size, width), bool)
        for b, r in enumerate(rows):
            n = len(r.inputs)
            inputs[b, :n], targets[b, :n] = r.inputs, r.targets
            mask[b, n - r.n_targets : n] = True
        sums, greedy = self._score(self.params, inputs, targets, mask)
        return np.asarray(sums)[: len(rows)], np.asarray(greedy)[: len(rows)]


def rolling_windows(n_tokens: int, max_length: int, stride: int | None = None) -> list[tuple[int, int, int]]:
    """Windows (start, first_target, end) that score tokens 1 .. n_tokens - 1 of a document once each.

    A window's request is context tokens[start:first_target], continuation
    tokens[first_target:end] (at most ``max_length`` inputs). The first window scores up to
    ``max_length`` tokens; each next one scores the ``stride`` tokens after it (default
    ``max_length``: disjoint windows, each new token seeing only those of its own window), with as
    much of the preceding text as fits as its context: a small stride gives every scored token
    more context (the sliding-window perplexity of long documents), at ``max_length / stride``
    times the compute."""
    stride = max_length if stride is None else int(stride)
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride={stride} must be in [1, max_length={max_length}]")
    windows: list[tuple[int, int, int]] = []
    scored = 1  # token 0 has no prediction
    while scored < n_tokens:
        end = min(scored + stride if windows else max_length + 1, n_tokens)
        start = max(0, end - max_length - 1)
        windows.append((start, scored, end))
        scored = end
    return windows


def rolling_requests(tokens: Sequence[int], max_length: int, stride: int | None = None) -> list[Request]:
    """The (context, continuation) requests of ``rolling_windows``: their log-probs add up to the
    document's (every token after the first scored once)."""
    tokens = list(tokens)
    return [(tokens[s:t], tokens[t:e]) for s, t, e in rolling_windows(len(tokens), max_length, stride)]
