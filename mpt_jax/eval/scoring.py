"""Scoring text under a model: the log-probability of a continuation given its context.

Everything evaluation reports comes from here: perplexity (windows of a document), LLM Foundry's
ICL tasks (a choice's continuation, a schema's context options), and lm-evaluation-harness's
``loglikelihood`` / ``loglikelihood_rolling``. The convention is the training loss's
(``steps.token_losses``): the logits at position t predict token t + 1, computed in float32.

A request is a pair of token lists (context, continuation); the continuation is scored given the
context. ``Scorer.loglikelihood`` groups requests that share a context into trees (the context
once, then each continuation: the model's ``attention_mask`` keeps them apart), packs the trees
into batches of a fixed number of rows of a bucketed width (one compiled shape per bucket) and
returns, in the requests' order, the continuation's summed log-probability and whether every one
of its tokens is the model's greedy choice.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mpt_jax.config import MPTConfig
from mpt_jax.generate import bucket
from mpt_jax.model import MPT, is_stacked, unstack_layers

Request = tuple[Sequence[int], Sequence[int]]  # (context token ids, continuation token ids)


def _vocab_chunk(vocab: int) -> int | None:
    """A divisor of the vocabulary to reduce it in two stages (None: reduce it whole)."""
    return next((c for c in (128, 256, 64, 32) if vocab % c == 0 and vocab > c), None)


def token_scores(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per position: (log p(target) in float32, whether the target is the argmax).

    logits [..., V] (a position's prediction), targets [...] (the token that follows it). Nothing
    [..., V] is written besides the logits: log-sum-exp and the argmax (its first index on ties,
    as ``jnp.argmax``) are reduced within chunks of the vocabulary, then across them, which XLA's
    CPU backend vectorizes several times better than one reduction over a 50k-wide row."""
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    vocab = logits.shape[-1]
    chunk = _vocab_chunk(vocab)
    if chunk is None:
        return picked - jax.nn.logsumexp(logits, axis=-1), jnp.argmax(logits, axis=-1) == targets
    pieces = logits.reshape(*logits.shape[:-1], vocab // chunk, chunk)
    chunk_max = jnp.max(pieces, axis=-1)
    chunk_sum = jnp.sum(jnp.exp(pieces - chunk_max[..., None]), axis=-1)
    top = jnp.max(chunk_max, axis=-1)
    lse = top + jnp.log(jnp.sum(chunk_sum * jnp.exp(chunk_max - top[..., None]), axis=-1))
    first = jnp.argmax(chunk_max == top[..., None], axis=-1)  # the first chunk holding the max
    within = jnp.take_along_axis(pieces, first[..., None, None], axis=-2)[..., 0, :]
    argmax = first * chunk + jnp.argmax(within == top[..., None], axis=-1)
    return picked - lse, argmax == targets


@dataclasses.dataclass(frozen=True)
class Row:
    """One request laid out for the model: inputs[t] predicts targets[t]; the continuation is the
    last ``n_targets`` targets."""

    inputs: list[int]
    targets: list[int]
    n_targets: int

    @property
    def context_len(self) -> int:
        """Inputs up to the context's last token (whose logits score the first continuation
        token): what requests with the same context share."""
        return len(self.inputs) - self.n_targets + 1


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


@dataclasses.dataclass
class Tree:
    """Requests that share a context, laid out as one piece of a row: the context (the ``trunk``)
    once, then each request's ``branch`` (its continuation less the last token), positioned right
    after the trunk and seeing only the trunk and itself. The trunk's last logits score every
    request's first continuation token."""

    trunk: tuple[int, ...]
    members: list[int]  # request indices, in branch order
    size: int  # tokens: the trunk and every branch


def trees(rows: Sequence[Row], max_length: int) -> list[Tree]:
    """Requests grouped by their trunk, each tree at most ``max_length`` tokens (a request alone
    always fits: ``layout`` cut it to ``max_length`` inputs)."""
    by_trunk: dict[tuple[int, ...], list[Tree]] = {}
    for i, r in enumerate(rows):
        trunk = tuple(r.inputs[: r.context_len])
        group = by_trunk.setdefault(trunk, [])
        if not group or group[-1].size + r.n_targets - 1 > max_length:
            group.append(Tree(trunk, [], len(trunk)))
        group[-1].members.append(i)
        group[-1].size += r.n_targets - 1
    return [t for group in by_trunk.values() for t in group]


def _fill(sizes: list[int], width: int, rows: int) -> list[list[int]]:
    """Indices into ``sizes`` (ascending) for ``rows`` rows of ``width``: each row takes the
    largest tree that still fits until none does (best fit, largest first)."""
    free = list(range(len(sizes)))  # not yet taken, ascending by size
    placed = []
    for _ in range(rows):
        room, row = width, []
        while free:
            k = bisect.bisect_right(free, room, key=lambda i: sizes[i]) - 1
            if k < 0:
                break
            row.append(free.pop(k))
            room -= sizes[row[-1]]
        if not row:
            break
        placed.append(row)
    return placed


def pack(forest: Sequence[Tree], rows: int, max_length: int) -> list[tuple[int, list[list[Tree]]]]:
    """Batches of ``rows`` rows: (width, the trees in each row), every tree whole in one row.

    Each batch starts from the largest tree left. Its width is a ``fine_bucket`` (so few shapes
    compile) from the one that holds that tree up to twice that (at most ``max_length``): the one
    whose rows cost least per token they hold, counting a row's cost as ``width * (1 + width /
    1024)`` (its tokens, plus attention that grows with the width)."""
    pool = sorted(forest, key=lambda t: t.size)
    batches = []
    while pool:
        sizes = [t.size for t in pool]
        smallest = min(fine_bucket(sizes[-1], minimum=16), max_length)
        widths = [smallest]
        while (wider := fine_bucket(widths[-1] + 1, minimum=16)) <= min(2 * smallest, max_length):
            widths.append(wider)
        best = None
        for width in widths:
            placed = _fill(sizes, width, rows)
            held = sum(sizes[i] for row in placed for i in row)
            cost = rows * width * (1 + width / 1024) / held
            if best is None or cost < best[0]:
                best = (cost, width, placed)
        _, width, placed = best
        batches.append((width, [[pool[i] for i in row] for row in placed]))
        taken = {i for row in placed for i in row}
        pool = [t for i, t in enumerate(pool) if i not in taken]
    return batches


def fine_bucket(n: int, minimum: int = 8, steps: int = 2) -> int:
    """n rounded up to a multiple of 1/``steps`` of its octave (steps=2: 2^k or 3 * 2^(k-1)), at
    least ``minimum``: ``steps`` compiled shapes per octave, at most 1/(steps+1) of padding."""
    n = max(int(n), minimum)
    top = bucket(n, minimum=1)
    step = max(1, top // (2 * steps))
    return -(-n // step) * step


def tree_mask(group: jax.Array, branch: jax.Array) -> jax.Array:
    """The model's ``attention_mask`` [B, T, T] for rows of packed trees.

    ``group`` [B, T] numbers the trees of a row (-1: padding), ``branch`` [B, T] is 0 on a trunk
    and j on a tree's j-th branch: a token sees the earlier tokens of its own tree that are on the
    trunk or on its own branch."""
    index = jnp.arange(group.shape[1])
    return (
        (group[:, :, None] == group[:, None, :])
        & (group[:, None, :] >= 0)
        & ((branch[:, None, :] == 0) | (branch[:, :, None] == branch[:, None, :]))
        & (index[:, None] >= index[None, :])
    )


@functools.cache
def _tree_score_fn(cfg: MPTConfig):
    """(log p(target), whether it is the argmax) at flat positions of rows of packed trees
    (``tree_mask``); logits are computed only at ``scored`` (indices into batch x width)."""
    model = MPT(cfg, scan_layers=False)

    def score(params, tokens, positions, group, branch, scored, targets):
        mask = tree_mask(group, branch)
        logits = model.apply(
            {"params": params}, tokens, positions=positions, attention_mask=mask, logit_positions=scored
        )
        return token_scores(logits[0], targets)

    return jax.jit(score)


class Scorer:
    """Continuation log-probabilities for one loaded model.

    Requests that share a context run it once: each group is a ``Tree`` (context, then every
    continuation after it), trees are packed whole into ``batch_size`` rows of a bucketed width
    (``pack``) and logits are computed at the scored positions only. ``max_length`` is the longest
    input (default ``cfg.max_seq_len``; ALiBi models may be given more). Params in either layout;
    the per-layer one (``load(..., scan_layers=False)``) is used as given, stacked params are
    unstacked into a copy.
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
        self._score = _tree_score_fn(cfg)

    def loglikelihood(self, requests: Sequence[Request]) -> list[tuple[float, bool]]:
        """(sum of the continuation's log-probs, whether it is the greedy continuation) per request."""
        rows = [layout(c, x, self.max_length) for c, x in requests]
        sums = np.zeros((len(rows),), np.float64)
        greedy = np.ones((len(rows),), bool)
        for width, placed in pack(trees(rows, self.max_length), self.batch_size, self.max_length):
            logp, hit, owner = self._run(rows, width, placed)
            scored = owner >= 0
            np.add.at(sums, owner[scored], logp[scored].astype(np.float64))
            np.logical_and.at(greedy, owner[scored], hit[scored])
        return [(float(s), bool(g)) for s, g in zip(sums, greedy, strict=True)]

    def _run(self, rows: list[Row], width: int, placed: list[list[Tree]]) -> tuple[np.ndarray, ...]:
        """One forward over a batch of packed rows: per scored token its log-prob, greedy flag and
        request (-1: padding). A last batch of few rows runs as a power of two of them."""
        shape = (min(bucket(len(placed), minimum=1), self.batch_size), width)
        tokens, positions = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
        group, branch = np.full(shape, -1, np.int32), np.zeros(shape, np.int32)
        scored: list[tuple[int, int, int]] = []  # (index into batch x width, target, request)
        for b, row_trees in enumerate(placed):
            at = 0
            for g, tree in enumerate(row_trees):
                n = len(tree.trunk)
                tokens[b, at : at + n], positions[b, at : at + n], group[b, at : at + n] = tree.trunk, range(n), g
                last = b * width + at + n - 1  # the trunk's last token predicts each first target
                at += n
                for j, i in enumerate(tree.members, start=1):
                    r = rows[i]
                    tail, targets = r.inputs[r.context_len :], r.targets[r.context_len - 1 :]
                    k = len(tail)
                    tokens[b, at : at + k], positions[b, at : at + k] = tail, range(n, n + k)
                    group[b, at : at + k], branch[b, at : at + k] = g, j
                    flat = [last] + list(range(b * width + at, b * width + at + k))
                    scored += [(f, t, i) for f, t in zip(flat, targets, strict=True)]
                    at += k
        size = fine_bucket(len(scored), steps=4)
        flat, targets = np.zeros((size,), np.int32), np.zeros((size,), np.int32)
        owner = np.full((size,), -1, np.int64)
        flat[: len(scored)], targets[: len(scored)], owner[: len(scored)] = zip(*scored, strict=True)
        logp, hit = self._score(self.params, tokens, positions, group, branch, flat, targets)
        return np.asarray(logp), np.asarray(hit), owner


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
