"""Text generation: a KV-cache engine over rows (slots), sampling, streaming, and the CLI.

    python -m mpt_jax.generate --model=PATH_OR_HUB --prompt="def fib(n):" [--max_new_tokens=64
        --temperature=0 --top_k= --top_p= --min_p= --repetition_penalty= --seed= --stop= --max_seq_len=
        --quantize=int8 --dtype=bfloat16 --truncate=left --logprobs --format=mpt-7b-instruct]

``Engine`` holds a cache of ``rows`` rows of ``cache_len`` positions. A request is *inserted* into
free rows (its prompt prefilled with the training attention, any ``attn_impl``, then copied into
its rows), every ``step`` decodes one token for all rows at once, and a finished row is simply
freed: new requests go into free rows while others keep decoding. ``Batcher`` is that loop
(continuous batching), with the rules that end a request and stream its text; ``Generator`` and
the server (``mpt_jax.serve``) both run it. Each row has its own position, sampling settings and
random key (a row's draws depend only on its seed and position, not on its neighbours), so the
same request gives the same tokens alone or in any batch.

``Generator`` puts requests through an engine: ``generate`` returns ``Completion``s, ``stream``
yields tokens (and text) as they are produced, both over any number of prompts of different
lengths. Shapes are bucketed (prompt lengths and cache lengths to powers of two) so a new prompt
length rarely compiles anything.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mpt_jax.config import MPTConfig
from mpt_jax.model import MPT, init_cache, is_stacked, unstack_layers
from mpt_jax.sampling import SamplingParams, choose, process_logits, token_logprobs
from mpt_jax.sampling import top_logprobs as alternatives_of  # the name of Engine's argument

MIN_BUCKET = 16
FINISH_STOP, FINISH_LENGTH = "stop", "length"  # the OpenAI API's finish reasons


def bucket(n: int, minimum: int = MIN_BUCKET) -> int:
    """The power of two >= n (at least ``minimum``): the shapes that get compiled."""
    return max(minimum, 1 << max(0, (n - 1).bit_length()))


def _rows(tree: Any, rows: np.ndarray) -> Any:
    return jax.tree.map(lambda x: x[rows], tree)


class Engine:
    """A KV cache of ``rows`` x ``cache_len`` and the jitted steps that fill and decode it.

    The host side only says which rows hold which request; all per-row state (cache, positions,
    the tokens each row holds, sampling settings, random keys) lives on the device. The model runs
    in the params' layout: stacked (``MPT(cfg)``) or per layer (``model.unstack_layers``, with a
    cache per layer: on a CPU it decodes 2-3x faster, as nothing is copied out of stacked arrays).

    ``top_logprobs`` (static, compiled in) is how many alternatives each sampled token comes with:
    with ``k > 0``, ``insert`` and ``step`` also return the ``k`` most likely tokens and their
    log-probs (``sampling.top_logprobs``: the distribution the token was drawn from; ``-inf`` for
    filtered tokens). 0 computes nothing extra. More than the vocabulary is capped at its size.
    """

    def __init__(
        self,
        cfg: MPTConfig,
        params: Any,
        *,
        rows: int,
        cache_len: int,
        cache_dtype: str | None = None,
        mesh: jax.sharding.Mesh | None = None,
        rules: Any = None,
        top_logprobs: int = 0,
    ):
        if top_logprobs < 0:
            raise ValueError(f"top_logprobs={top_logprobs} must be >= 0 (0: no alternatives)")
        if cfg.uses_learned_pos_emb and cache_len > cfg.max_seq_len:
            raise ValueError(
                f"a cache of {cache_len} positions exceeds max_seq_len={cfg.max_seq_len}: learned position "
                "embeddings cannot run past it (ALiBi and RoPE models can: load with a larger max_seq_len)"
            )
        self.cfg, self.params, self.rows, self.cache_len = cfg, params, rows, cache_len
        self.mesh = mesh
        self.top_logprobs = k = min(top_logprobs, cfg.vocab_size)
        from mpt_jax.sharding import DEFAULT_RULES, cache_shardings

        self.rules = rules or DEFAULT_RULES
        dtype = cache_dtype or cfg.dtype
        scan = self.scan_layers = is_stacked(params)
        with self._context():
            if mesh is None:
                self.cache = init_cache(cfg, rows, cache_len, dtype, scan_layers=scan)
            else:
                shardings = cache_shardings(cfg, rows, cache_len, mesh, self.rules, scan_layers=scan)
                self.cache = jax.jit(
                    lambda: init_cache(cfg, rows, cache_len, dtype, scan_layers=scan), out_shardings=shardings
                )()
        self.positions = jnp.zeros((rows,), jnp.int32)  # tokens in the cache, per row
        self.context = jnp.zeros((rows, cache_len), jnp.int32)  # the tokens of each row, sampled ones too
        self.next_tokens = jnp.zeros((rows,), jnp.int32)  # sampled, not yet in the cache
        self.keys = jax.random.key_data(jax.random.split(jax.random.key(0), rows))
        self.sampling = SamplingParams.make(rows)
        model = MPT(cfg, scan_layers=scan)

        def prefill(params, tokens, lengths):
            cache = init_cache(cfg, tokens.shape[0], tokens.shape[1], dtype, scan_layers=scan)
            zeros = jnp.zeros((tokens.shape[0],), jnp.int32)
            logits, cache = model.apply(
                {"params": params},
                tokens,
                cache=cache,
                cache_positions=zeros,
                prefill=True,
                logit_positions=(lengths - 1)[:, None],
            )
            return logits[:, 0], cache

        def admit(state, chunk, last, rows_, lengths, prompt_context, seeds, sampling):
            """The prefilled rows join: their cache, context, position, key and settings, and their
            first token sampled from the last prompt position's logits."""
            cache, context, positions, keys, all_sampling, next_tokens = state
            # [(layers,) rows, positions, kv_heads, head_dim]: the chunk fills its rows' first positions
            cache = jax.tree.map(
                lambda c, u: c.at[..., rows_, : u.shape[-3], :, :].set(u.astype(c.dtype)), cache, chunk
            )
            new_keys = jax.random.key_data(jax.vmap(jax.random.key)(seeds))
            tok, logp, top = draw(last, sampling, new_keys, lengths, prompt_context)
            prompt_context = prompt_context.at[jnp.arange(rows_.shape[0]), lengths].set(tok)
            state = (
                cache,
                context.at[rows_].set(prompt_context),
                positions.at[rows_].set(lengths),
                keys.at[rows_].set(new_keys),
                jax.tree.map(lambda a, b: a.at[rows_].set(b), all_sampling, sampling),
                next_tokens.at[rows_].set(tok),
            )
            return state, tok, logp, top

        def decode(params, cache, tokens, positions, context, sampling, keys):
            """One fused step: feed each row its pending token, sample the next, record it."""
            logits, cache = model.apply({"params": params}, tokens[:, None], cache=cache, cache_positions=positions)
            positions = jnp.minimum(positions + 1, cache_len - 1)
            new, logprobs, top = draw(logits[:, 0], sampling, keys, positions, context)
            context = context.at[jnp.arange(context.shape[0]), positions].set(new)
            return cache, positions, context, new, logprobs, top

        def draw(logits, sampling, keys, positions, context):
            """Row r samples with key fold_in(keys[r], positions[r]): its own seed and position only.
            Returns tokens, their log-probs, and () or the k alternatives (ids, log-probs)."""
            mask = jnp.arange(context.shape[1])[None, :] < positions[:, None]
            row_keys = jax.vmap(jax.random.fold_in)(jax.random.wrap_key_data(keys), positions)
            processed = process_logits(logits, sampling, context=context, context_mask=mask)
            tokens = choose(processed, sampling, row_keys)
            return tokens, token_logprobs(processed, tokens), alternatives_of(processed, k) if k else ()

        self._prefill = jax.jit(prefill)
        self._admit = jax.jit(admit, donate_argnums=(0,))
        self._decode = jax.jit(decode, donate_argnums=(1, 4))

    def _context(self):
        """Under a mesh: the mesh and the logical rules (the model's constraints need both)."""
        import contextlib

        if self.mesh is None:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(nn.logical_axis_rules(self.rules))
        return stack

    def insert(
        self, rows: Sequence[int], prompts: Sequence[Sequence[int]], sampling: SamplingParams, seeds: Sequence[int]
    ) -> tuple[np.ndarray, ...]:
        """Prefills ``prompts`` into ``rows`` (their old content is dropped) and samples each row's
        first token; returns (tokens, logprobs) for those rows, and with ``top_logprobs > 0`` also
        the alternatives' (ids, logprobs), ``[n, k]`` each. ``sampling`` has one entry per prompt."""
        n = len(rows)
        if not (n == len(prompts) == len(seeds) == sampling.temperature.shape[0]) or n == 0:
            raise ValueError(f"Engine.insert: {n} rows, {len(prompts)} prompts, {len(seeds)} seeds must agree (> 0)")
        lengths = [len(p) for p in prompts]
        if min(lengths) < 1 or max(lengths) >= self.cache_len:
            raise ValueError(f"Engine.insert: prompt lengths {lengths} must be in [1, {self.cache_len - 1}]")
        width = min(bucket(max(lengths)), self.cache_len)
        count = bucket(n, minimum=1)  # padded with copies of the first prompt (same row, same values)
        order = list(range(n)) + [0] * (count - n)
        tokens = np.zeros((count, width), np.int32)
        for i, j in enumerate(order):
            tokens[i, : lengths[j]] = prompts[j]
        row_ids = np.asarray([rows[j] for j in order], np.int32)
        lens = np.asarray([lengths[j] for j in order], np.int32)
        with self._context():
            last, chunk = self._prefill(self.params, jnp.asarray(tokens), jnp.asarray(lens))
        context = np.zeros((count, self.cache_len), np.int32)
        context[:, :width] = tokens
        padded = jax.tree.map(lambda x: x[np.asarray(order)], sampling)
        seed_ids = np.asarray([seeds[j] for j in order], np.uint32)
        state = (self.cache, self.context, self.positions, self.keys, self.sampling, self.next_tokens)
        with self._context():
            state, tok, logp, top = self._admit(
                state, chunk, last, jnp.asarray(row_ids), jnp.asarray(lens), jnp.asarray(context), seed_ids, padded
            )
        self.cache, self.context, self.positions, self.keys, self.sampling, self.next_tokens = state
        return tuple(np.asarray(x)[:n] for x in (tok, logp, *top))

    def step(self) -> tuple[np.ndarray, ...]:
        """Feeds every row its pending token and samples the next: (tokens, logprobs), [rows] each,
        and with ``top_logprobs > 0`` the alternatives' (ids, logprobs), [rows, k] each. Rows whose
        request is over decode too (their output is ignored); free rows hold garbage."""
        with self._context():
            self.cache, self.positions, self.context, self.next_tokens, logprobs, top = self._decode(
                self.params, self.cache, self.next_tokens, self.positions, self.context, self.sampling, self.keys
            )
        return tuple(np.asarray(x) for x in (self.next_tokens, logprobs, *top))


# ------------------------------------------------------------------------------------------------
# Requests, completions and the generator.


# A token's alternatives: (token id, log-prob) pairs, most likely first.
Alternatives = list[tuple[int, float]]


@dataclasses.dataclass
class Completion:
    """One prompt's result (the OpenAI API's names). ``top_logprobs``: each token's alternatives,
    with ``logprobs=True`` from a ``Generator`` made with ``top_logprobs > 0``."""

    prompt_tokens: list[int]
    token_ids: list[int]
    text: str | None
    finish_reason: str
    logprobs: list[float] | None = None
    top_logprobs: list[Alternatives] | None = None


@dataclasses.dataclass
class StreamEvent:
    """One new token of prompt ``index``; ``text`` is the text it completes (may be empty while a
    multi-byte character or a possible stop string is pending); the last event has ``finish_reason``.
    ``top``: the token's alternatives when the engine computes them (its ``top_logprobs``; tokens
    the sampling filters removed are left out, so there may be fewer), else None."""

    index: int
    token_id: int | None
    text: str
    logprob: float | None
    finish_reason: str | None = None
    top: Alternatives | None = None


@dataclasses.dataclass
class Request:
    """One prompt to complete, and how (what ``Batcher.submit`` takes).

    ``sampling`` holds one row (``SamplingParams.make(1, ...)``); ``stop_ids`` end the request
    without being part of it, ``stop_strings`` are cut from its text. The fields after those are
    the batcher's record of its progress."""

    prompt: list[int]
    max_new_tokens: int
    sampling: SamplingParams
    seed: int = 0
    stop_ids: frozenset[int] = frozenset()
    stop_strings: tuple[str, ...] = ()
    id: int = -1  # set by ``Batcher.submit``: the ``index`` of its events
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    emitted: int = 0  # characters of text already streamed
    finish: str | None = None


def default_stop_ids(tokenizer: Any) -> frozenset[int]:
    """The tokens that end a generation unless told otherwise: the tokenizer's end-of-text, and
    ``<|im_end|>`` for ChatML tokenizers (MPT-Chat's stop ids are im_end, eos); none without one."""
    if tokenizer is None:
        return frozenset()
    eos = getattr(tokenizer, "eos_id", None)
    ids = {eos} if eos is not None else set()
    im_end = tokenizer.token_to_id("<|im_end|>")
    if im_end is not None:
        ids.add(im_end)
    return frozenset(ids)


class Batcher:
    """Continuous batching over an engine's rows: the one loop ``Generator.stream`` and the server run.

    ``submit`` queues a request; each ``step`` either admits waiting requests into the free rows
    (one prefill for all of them, their first tokens sampled) or, when none can be admitted, decodes
    one token for every row. A request leaves its row the moment it ends (a stop token, a stop
    string, ``max_new_tokens``, a full row) or is cancelled, and the next waiting request takes it.
    This is the one place that decides when a request ends and turns its tokens into streamed text.
    Not thread-safe: one thread owns it (and makes every JAX call).
    """

    def __init__(self, engine: Engine, tokenizer: Any = None):
        self.engine, self.tokenizer = engine, tokenizer
        self.waiting: collections.deque[Request] = collections.deque()
        self.active: dict[int, Request] = {}  # row -> request
        self._next_id = 0

    def submit(self, request: Request) -> int:
        """Queues ``request`` for a row; returns its id (the ``index`` of its events: 0, 1, ...)."""
        n, room = len(request.prompt), self.engine.cache_len
        if not 1 <= n < room:
            raise ValueError(f"a prompt of {n} tokens does not fit a cache row of {room} positions (1 to {room - 1})")
        if request.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={request.max_new_tokens} must be positive")
        if request.stop_strings and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        if request.sampling.temperature.shape != (1,):
            raise ValueError(f"a request's sampling has one row, got {request.sampling.temperature.shape}")
        request.id, self._next_id = self._next_id, self._next_id + 1
        self.waiting.append(request)
        return request.id

    def cancel(self, request_id: int) -> bool:
        """Drops a waiting or running request (its row is free at once); False if it is not here."""
        for row, req in self.active.items():
            if req.id == request_id:
                del self.active[row]
                return True
        for req in self.waiting:
            if req.id == request_id:
                self.waiting.remove(req)
                return True
        return False

    def has_work(self) -> bool:
        return bool(self.waiting or self.active)

    def free_rows(self) -> list[int]:
        return [r for r in range(self.engine.rows) if r not in self.active]

    def step(self) -> list[StreamEvent]:
        """Admits what fits into free rows, else decodes one token for all rows; the events it made."""
        events: list[StreamEvent] = []
        free = self.free_rows()
        if self.waiting and free:
            batch = [self.waiting.popleft() for _ in range(min(len(free), len(self.waiting)))]
            rows = free[: len(batch)]
            sampling = jax.tree.map(lambda *xs: jnp.concatenate(xs), *[r.sampling for r in batch])
            out = self.engine.insert(rows, [r.prompt for r in batch], sampling, [r.seed for r in batch])
            for i, (row, req) in enumerate(zip(rows, batch, strict=True)):
                self.active[row] = req
                events.append(self._advance(req, int(out[0][i]), float(out[1][i]), _alternatives(out[2:], i)))
                if req.finish:
                    del self.active[row]
            return events
        if not self.active:
            return events
        out = self.engine.step()
        for row in list(self.active):
            req = self.active[row]
            events.append(self._advance(req, int(out[0][row]), float(out[1][row]), _alternatives(out[2:], row)))
            if req.finish:
                del self.active[row]
        return events

    def _advance(self, req: Request, token: int, logprob: float, top: Alternatives | None) -> StreamEvent:
        """Records one sampled token of ``req``; its event (and whether it ends the request)."""
        if token in req.stop_ids:
            req.finish = FINISH_STOP
            return self._event(req, None, logprob, None, final=True)
        req.tokens.append(token)
        req.logprobs.append(logprob)
        held = len(req.prompt) + len(req.tokens)
        if len(req.tokens) >= req.max_new_tokens or held >= self.engine.cache_len:
            req.finish = FINISH_LENGTH
        return self._event(req, token, logprob, top, final=req.finish is not None)

    def _event(
        self, req: Request, token: int | None, logprob: float | None, top: Alternatives | None, *, final: bool
    ) -> StreamEvent:
        """The text ``req`` adds with this token: decoded so far minus what was emitted, holding back
        an unfinished character and anything that could still become a stop string."""
        if self.tokenizer is None:
            return StreamEvent(req.id, token, "", logprob, req.finish, top)
        text = self.tokenizer.decode(req.tokens)
        cut = _first_stop(text, req.stop_strings)
        if cut is not None:
            text, req.finish, final = text[:cut], FINISH_STOP, True
        elif not final:
            hold = max((len(s) - 1 for s in req.stop_strings), default=0)
            end = len(text) - hold
            while end > 0 and text[end - 1] == "\ufffd":  # a multi-byte character still incomplete
                end -= 1
            text = text[: max(end, req.emitted)]
        delta = text[req.emitted :]
        req.emitted = len(text)
        return StreamEvent(req.id, token, delta, logprob, req.finish if final else None, top)


def _alternatives(top: tuple[np.ndarray, ...], row: int) -> Alternatives | None:
    """Row ``row``'s alternatives from an engine's extra outputs (ids, logprobs), the tokens the
    filters removed (``-inf``) left out; None when the engine computes none."""
    if not top:
        return None
    ids, logprobs = top[0][row].tolist(), top[1][row].tolist()
    return [(i, lp) for i, lp in zip(ids, logprobs, strict=True) if lp != -math.inf]


class Generator:
    """Generation for one loaded model: ``generate`` and ``stream`` over batches of prompts.

    ``tokenizer`` (``mpt_jax.data.tokenizer.Tokenizer``) is needed for text prompts, stop strings
    and text output; token-id prompts work without one. ``max_batch`` is the number of cache rows
    (prompts beyond it wait for a free row); the cache holds up to ``cfg.max_seq_len`` positions
    (load with a larger ``max_seq_len`` to run an ALiBi or RoPE model past its training length).
    It decodes with the per-layer params layout: stacked params are unstacked into a copy (load
    with ``scan_layers=False`` to have that layout without ever holding both). ``top_logprobs``:
    how many alternatives each token comes with (``Engine``'s; ``StreamEvent.top`` and, with
    ``logprobs=True``, ``Completion.top_logprobs``).
    """

    def __init__(
        self,
        cfg: MPTConfig,
        params: Any,
        tokenizer: Any = None,
        *,
        max_batch: int = 8,
        cache_dtype: str | None = None,
        mesh: jax.sharding.Mesh | None = None,
        rules: Any = None,
        top_logprobs: int = 0,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch} must be positive")
        if top_logprobs < 0:
            raise ValueError(f"top_logprobs={top_logprobs} must be >= 0 (0: no alternatives)")
        self.cfg, self.tokenizer = cfg, tokenizer
        self.params = unstack_layers(params, cfg.n_layers)
        self.max_batch, self.cache_dtype, self.mesh, self.rules = max_batch, cache_dtype, mesh, rules
        self.top_logprobs = top_logprobs
        self._engine: Engine | None = None

    def engine(self, rows: int, cache_len: int) -> Engine:
        """An engine with at least these rows and positions (kept and reused while large enough)."""
        e = self._engine
        if e is None or e.rows < rows or e.cache_len < cache_len:
            e = self._engine = None
            e = self._engine = Engine(
                self.cfg,
                self.params,
                rows=rows,
                cache_len=cache_len,
                cache_dtype=self.cache_dtype,
                mesh=self.mesh,
                rules=self.rules,
                top_logprobs=self.top_logprobs,
            )
        return e

    # -- inputs --

    def encode_prompts(
        self, prompts: Sequence[str | Sequence[int]], *, truncate: str | None, room: int
    ) -> list[list[int]]:
        """Token ids of each prompt, checked: not empty, ids in the vocabulary, at most
        ``cfg.max_seq_len - room`` tokens (``truncate='left'`` keeps the last ones instead)."""
        if isinstance(prompts, str | bytes):
            raise ValueError("prompts must be a list of strings or of token-id lists, not one string")
        if not prompts:
            raise ValueError("no prompts given")
        if truncate not in (None, "left"):
            raise ValueError(f"truncate={truncate!r}: expected None or 'left'")
        limit = self.cfg.max_seq_len - room
        if limit < 1:
            raise ValueError(f"max_new_tokens={room} leaves no room for a prompt in max_seq_len={self.cfg.max_seq_len}")
        out = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise ValueError("text prompts need a tokenizer (this model was loaded without one)")
                ids = self.tokenizer.encode(p)
            else:
                ids = [int(t) for t in p]
            if not ids:
                raise ValueError(f"prompt {i} is empty")
            bad = [t for t in ids if not 0 <= t < self.cfg.vocab_size]
            if bad:
                raise ValueError(
                    f"prompt {i}: token ids {bad[:5]} are outside the vocabulary [0, {self.cfg.vocab_size})"
                )
            if len(ids) > limit:
                if truncate != "left":
                    raise ValueError(
                        f"prompt {i} has {len(ids)} tokens; with max_new_tokens={room} the context of "
                        f"{self.cfg.max_seq_len} (max_seq_len) holds at most {limit}: shorten it, lower "
                        "max_new_tokens, load with a larger max_seq_len (ALiBi/RoPE), or pass truncate='left'"
                    )
                ids = ids[-limit:]
            out.append(ids)
        return out

    # -- the loop --

    def stream(
        self,
        prompts: Sequence[str | Sequence[int]],
        *,
        max_new_tokens: int = 64,
        temperature: float | Sequence[float] = 1.0,
        top_k: int | Sequence[int] = 0,
        top_p: float | Sequence[float] = 1.0,
        min_p: float | Sequence[float] = 0.0,
        repetition_penalty: float | Sequence[float] = 1.0,
        seed: int | Sequence[int] = 0,
        stop: Sequence[str] | None = None,
        stop_token_ids: Sequence[int] | None = None,
        truncate: str | None = None,
    ) -> Iterator[StreamEvent]:
        """Yields a ``StreamEvent`` per generated token of each prompt, as they are produced.

        Sampling settings may be one value or one per prompt; ``temperature=0`` is greedy. A seed
        gives the same tokens whatever else is in the batch. Generation of a prompt ends at a stop
        token (default: the tokenizer's end-of-text, and ``<|im_end|>`` for ChatML tokenizers; the
        token is not part of the text), a stop string (cut from the text), ``max_new_tokens``, or a
        full context (``finish_reason`` "stop" or "length").
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be positive")
        if stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        ids = self.encode_prompts(prompts, truncate=truncate, room=max_new_tokens)
        n = len(ids)
        per_row = SamplingParams.make(
            n,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
        )
        seeds = [int(s) for s in (seed if isinstance(seed, Sequence) else [seed] * n)]
        if len(seeds) != n:
            raise ValueError(f"{len(seeds)} seeds for {n} prompts")
        stop_ids = (
            default_stop_ids(self.tokenizer) if stop_token_ids is None else frozenset(int(t) for t in stop_token_ids)
        )
        stops = tuple(s for s in (stop or ()) if s)
        requests = [
            Request(p, max_new_tokens, _rows(per_row, np.asarray([i])), seeds[i], stop_ids, stops)
            for i, p in enumerate(ids)
        ]
        longest = max(len(p) for p in ids) + max_new_tokens
        engine = self.engine(min(self.max_batch, n), min(bucket(longest), self.cfg.max_seq_len))
        batcher = Batcher(engine, self.tokenizer)
        for req in requests:  # ids 0, 1, ...: the prompts' indices
            batcher.submit(req)
        while batcher.has_work():
            yield from batcher.step()

    def generate(self, prompts: Sequence[str | Sequence[int]], *, logprobs: bool = False, **kwargs) -> list[Completion]:
        """Completions of ``prompts`` (same keyword arguments as ``stream``), in prompt order; with
        ``logprobs``, each token's log-prob and (``top_logprobs > 0``) its alternatives."""
        truncate, room = kwargs.get("truncate"), kwargs.get("max_new_tokens", 64)
        ids = self.encode_prompts(prompts, truncate=truncate, room=room)
        top = logprobs and self.top_logprobs > 0
        text = "" if self.tokenizer else None
        out = [Completion(p, [], text, "", [] if logprobs else None, [] if top else None) for p in ids]
        for ev in self.stream(ids, **{k: v for k, v in kwargs.items() if k != "truncate"}):
            c = out[ev.index]
            if ev.token_id is not None:
                c.token_ids.append(ev.token_id)
                if logprobs:
                    c.logprobs.append(ev.logprob)
                if top:
                    c.top_logprobs.append(ev.top)
            if c.text is not None:
                c.text += ev.text
            if ev.finish_reason:
                c.finish_reason = ev.finish_reason
        return out


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the earliest stop string starts in ``text``, or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


# ------------------------------------------------------------------------------------------------
# The CLI.


SAMPLING_FLAGS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed")


def define_model_and_sampling_flags(*, temperature: float, top_p: float, max_new_tokens: int) -> None:
    """The flags generate and chat share: the model, how it is loaded, and how it samples."""
    from absl import flags

    flags.DEFINE_string("model", None, "a training workdir, an mpt-jax checkpoint, an HF folder or a hub id")
    flags.DEFINE_integer("max_new_tokens", max_new_tokens, "tokens to generate per prompt (reply)")
    flags.DEFINE_float("temperature", temperature, "0: greedy (as the OpenAI API)")
    flags.DEFINE_integer("top_k", 0, "keep the k most likely tokens (0: off)")
    flags.DEFINE_float("top_p", top_p, "nucleus sampling (1: off)")
    flags.DEFINE_float("min_p", 0.0, "drop tokens below min_p x the top probability (0: off)")
    flags.DEFINE_float("repetition_penalty", 1.0, "transformers' repetition penalty (1: off)")
    flags.DEFINE_integer("seed", 0, "sampling seed: the same seed gives the same tokens")
    flags.DEFINE_integer("max_seq_len", None, "context length (ALiBi/RoPE models may go past training length)")
    flags.DEFINE_enum("quantize", None, ["int8"], "weight-only int8")
    flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "params and compute dtype (default: as stored)")


def sampling_from_flags() -> dict[str, Any]:
    from absl import flags

    return {name: flags.FLAGS[name].value for name in SAMPLING_FLAGS}


def _define_flags() -> None:
    from absl import flags

    define_model_and_sampling_flags(temperature=1.0, top_p=1.0, max_new_tokens=64)
    flags.DEFINE_string("prompt", None, "the prompt text")
    flags.DEFINE_string("prompts", None, "a file of prompts, one per line (a batch)")
    flags.DEFINE_multi_string("stop", [], "a stop string (repeatable)")
    flags.DEFINE_multi_integer("stop_token_id", [], "a stop token id (repeatable; default: end of text)")
    flags.DEFINE_integer("max_batch", 8, "rows decoded at once")
    flags.DEFINE_enum("truncate", None, ["left"], "cut over-long prompts from the left instead of failing")
    flags.DEFINE_integer("step", None, "a training workdir's checkpoint step (default: newest)")
    flags.DEFINE_bool("logprobs", False, "print each generated token's log-probability after the text")
    flags.DEFINE_string(
        "format", None, "wrap each prompt as a user message: chatml, chat_template, mpt-7b-instruct, mpt-30b-instruct"
    )
    flags.DEFINE_string("system", None, "with --format=chatml/chat_template: a system message")


def main(argv) -> None:
    from absl import flags

    from mpt_jax.load import load

    del argv
    f = flags.FLAGS
    if not f.model:
        raise ValueError("--model=PATH_OR_HUB is required")
    if (f.prompt is None) == (f.prompts is None):
        raise ValueError("give exactly one of --prompt=TEXT or --prompts=FILE")
    if f.prompts is not None:
        with open(f.prompts, encoding="utf-8") as fh:
            prompts = [line.rstrip("\n").replace("\\n", "\n") for line in fh if line.strip()]
    else:
        prompts = [f.prompt]
    cfg, params, tokenizer = load(
        f.model, dtype=f.dtype, quantize=f.quantize, max_seq_len=f.max_seq_len, step=f.step, scan_layers=False
    )
    stop_ids = f.stop_token_id or None
    if f.format:  # the model's prompt format around each prompt, and its end-of-turn tokens
        from mpt_jax.prompts import prompt_format, render_chat, stop_token_ids

        fmt = prompt_format(tokenizer, f.format)
        prompts = [render_chat([{"role": "user", "content": p}], fmt, tokenizer, system=f.system) for p in prompts]
        if stop_ids is None and tokenizer is not None:
            stop_ids = stop_token_ids(fmt, tokenizer)
    gen = Generator(cfg, params, tokenizer, max_batch=f.max_batch)
    kwargs = dict(
        max_new_tokens=f.max_new_tokens,
        **sampling_from_flags(),
        stop=f.stop or None,
        stop_token_ids=stop_ids,
        truncate=f.truncate,
    )
    if len(prompts) == 1:  # stream to stdout as tokens arrive
        logprobs = []
        for ev in gen.stream(prompts, **kwargs):
            sys.stdout.write(ev.text)
            sys.stdout.flush()
            if ev.token_id is not None:
                logprobs.append(ev.logprob)
        sys.stdout.write("\n")
        if f.logprobs:
            print("logprobs: " + " ".join(f"{x:.4f}" for x in logprobs))
        return
    for i, c in enumerate(gen.generate(prompts, logprobs=f.logprobs, **kwargs)):
        print(f"=== {i} ({c.finish_reason}, {len(c.token_ids)} tokens)")
        print(prompts[i] + (c.text or ""))
        if f.logprobs:
            print("logprobs: " + " ".join(f"{x:.4f}" for x in c.logprobs))


if __name__ == "__main__":
    from mpt_jax import cli

    cli.run("generate", _define_flags, main)
