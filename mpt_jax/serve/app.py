"""The HTTP side: a FastAPI app with the OpenAI endpoints over a ``ModelWorker``.

``Service`` is what the routes need to know about the model (its worker, tokenizer, chat format,
name and context); ``build_service`` makes one from loaded params; ``create_app`` puts the routes,
the API-key check, the body-size limit and the error shapes around it. Everything a user sends
is parsed as JSON and checked (``protocol``); text is only ever tokenized (and rendered into the
model's chat format as data: a chat template runs in jinja2's sandbox).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mpt_jax.generate import StreamEvent, default_stop_ids
from mpt_jax.prompts import PromptFormat, render_chat, stop_token_ids
from mpt_jax.serve import protocol
from mpt_jax.serve.metrics import CONTENT_TYPE, ServerMetrics
from mpt_jax.serve.protocol import APIError, ChatRequest, CompletionRequest
from mpt_jax.serve.worker import Job, ModelWorker, QueueFull

DEFAULT_MAX_BODY_BYTES = 1 << 20
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # the completions API's default; chat runs until the context is full
RETRY_AFTER_S = 1
DISCONNECT_POLL_S = 0.5  # how often a waiting non-streamed request checks that its client is still there
PATHS = ("/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions")


@dataclasses.dataclass
class Service:
    """The served model as the routes see it. ``context_len`` is a cache row's length: a prompt
    plus its reply fit in it."""

    worker: ModelWorker
    tokenizer: Any
    fmt: PromptFormat
    model_name: str
    context_len: int
    vocab_size: int
    metrics: ServerMetrics
    created: int = dataclasses.field(default_factory=protocol.now)
    names: protocol.TokenNames = dataclasses.field(init=False)  # how responses show token ids

    def __post_init__(self) -> None:
        self.names = protocol.TokenNames(self.tokenizer)

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(
                404,
                f"model {name!r} is not served here (this server serves {self.model_name!r})",
                param="model",
                code="model_not_found",
            )

    def encode(self, prompt: str | list[int], param: str) -> list[int]:
        """A prompt's token ids, checked: not empty, in the vocabulary, leaving room for a reply."""
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not ids:
            raise APIError(400, f"{param} is empty", param=param)
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise APIError(400, f"{param}: token ids {bad[:5]} are outside [0, {self.vocab_size})", param=param)
        if len(ids) >= self.context_len:
            raise APIError(
                400,
                f"{param} has {len(ids)} tokens; the context holds {self.context_len} (max_seq_len), the reply included",
                param=param,
                code="context_length_exceeded",
            )
        return ids

    def jobs(
        self, prompts: list[list[int]], s: protocol.Settings, stop_ids: frozenset[int], queue: asyncio.Queue
    ) -> list[Job]:
        """One job per prompt; ``max_tokens`` beyond the context is a 400 naming both numbers."""
        loop = asyncio.get_running_loop()
        out = []
        for i, ids in enumerate(prompts):
            room = self.context_len - len(ids)
            new = room if s.max_tokens is None else s.max_tokens
            if new > room:
                raise APIError(
                    400,
                    f"{s.max_tokens_field}={new} with a prompt of {len(ids)} tokens exceeds the context of "
                    f"{self.context_len} tokens (at most {room})",
                    param=s.max_tokens_field,
                    code="context_length_exceeded",
                )
            seed = protocol.random_seed() if s.seed is None else s.seed
            out.append(Job(ids, new, s.sampling, seed, stop_ids, s.stop, i, loop, queue))
        return out


def build_service(
    cfg: Any,
    params: Any,
    tokenizer: Any,
    *,
    model_name: str,
    max_batch: int = 16,
    max_queue: int = 64,
    prompt_format: str | None = None,
    mesh: Any = None,
    cache_dtype: str | None = None,
    warmup: bool = False,
) -> Service:
    """A started model thread over ``max_batch`` cache rows of ``cfg.max_seq_len`` positions
    (``warmup``: every prefill shape compiled first, see ``warm_up``). Every token comes with its
    ``MAX_TOP_LOGPROBS`` alternatives (one compilation serves any request's ``top_logprobs``)."""
    from mpt_jax.generate import Batcher, Generator
    from mpt_jax.prompts import prompt_format as choose_format

    if tokenizer is None:
        raise ValueError("serving needs the model's tokenizer (none was found with the checkpoint)")
    fmt = choose_format(tokenizer, prompt_format)
    gen = Generator(
        cfg,
        params,
        tokenizer,
        max_batch=max_batch,
        cache_dtype=cache_dtype,
        mesh=mesh,
        top_logprobs=protocol.MAX_TOP_LOGPROBS,
    )
    engine = gen.engine(max_batch, cfg.max_seq_len)
    if warmup:
        warm_up(engine)
    metrics = ServerMetrics()
    worker = ModelWorker(Batcher(engine, tokenizer), metrics, max_queue=max_queue)
    worker.start()
    return Service(worker, tokenizer, fmt, model_name, engine.cache_len, cfg.vocab_size, metrics)


def warm_up(engine: Any) -> int:
    """Compiles every shape the batcher can ask of ``engine`` (a prefill is padded to a power-of-two
    number of prompts and of positions), so that no request waits for a compilation: its time to
    first token would be seconds. Returns the number of prefill shapes; the rows are left free."""
    import time

    from absl import logging

    from mpt_jax.generate import bucket
    from mpt_jax.sampling import SamplingParams

    start = time.perf_counter()
    counts = sorted({bucket(n, minimum=1) for n in range(1, engine.rows + 1)})
    widths = sorted({min(bucket(n), engine.cache_len) for n in range(1, engine.cache_len)})
    for count in counts:
        n = min(count, engine.rows)
        for width in widths:
            length = min(width, engine.cache_len - 1)
            engine.insert(list(range(n)), [[0] * length] * n, SamplingParams.make(n, temperature=0.0), [0] * n)
    engine.step()
    logging.info(
        "serve: compiled %d prefill shapes (%s prompts x %s positions) in %.0f s",
        len(counts) * len(widths),
        counts,
        widths,
        time.perf_counter() - start,
    )
    return len(counts) * len(widths)


# ---------------------------------------------------------------------------------------------------------------------
# One request's prompts on their way through the worker


class _Run:
    """The jobs of one HTTP request: submitted together, their events read from one queue, and
    every unfinished one cancelled when the reader stops (a disconnect, an error, the end)."""

    def __init__(self, service: Service, prompts: list[list[int]], s: protocol.Settings, stop_ids: frozenset[int]):
        self.service = service
        self.queue: asyncio.Queue = asyncio.Queue()
        self.jobs = service.jobs(prompts, s, stop_ids, self.queue)
        self.done: set[int] = set()
        if len(self.jobs) > service.worker.max_queue:
            raise APIError(
                400,
                f"{len(self.jobs)} prompts in one request; the queue holds {service.worker.max_queue}",
                param="prompt",
            )
        try:
            service.worker.submit(self.jobs)
        except QueueFull as e:
            raise APIError(
                429,
                f"the server is busy ({e}); retry after {RETRY_AFTER_S} s",
                code="queue_full",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            ) from None

    async def events(self, client: HTTPRequest | None = None) -> AsyncIterator[tuple[int, StreamEvent]]:
        """(choice, event) until every prompt has finished; with ``client``, stops early (cancelling)
        when it has disconnected. A failed job raises its ``APIError``."""
        getter: asyncio.Future | None = None
        loop = asyncio.get_running_loop()
        next_check = loop.time() + DISCONNECT_POLL_S
        try:
            while len(self.done) < len(self.jobs):
                if client is None:
                    choice, item = await self.queue.get()
                else:  # wait for an event, and look at the client every DISCONNECT_POLL_S meanwhile
                    getter = getter or asyncio.ensure_future(self.queue.get())
                    finished, _ = await asyncio.wait({getter}, timeout=max(0.0, next_check - loop.time()))
                    if loop.time() >= next_check:
                        next_check = loop.time() + DISCONNECT_POLL_S
                        if await client.is_disconnected():
                            return
                    if not finished:
                        continue
                    (choice, item), getter = getter.result(), None
                if isinstance(item, APIError):
                    raise item
                if item.finish_reason is not None:
                    self.done.add(choice)
                yield choice, item
        finally:
            if getter is not None:
                getter.cancel()
            self.cancel()

    def cancel(self) -> None:
        for job in self.jobs:
            if job.choice not in self.done:
                self.service.worker.cancel(job)


@dataclasses.dataclass
class _Choice:
    text: str = ""
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    tops: list[protocol.Alternatives | None] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None

    def add(self, ev: StreamEvent) -> None:
        self.text += ev.text
        if ev.token_id is not None:
            self.tokens.append(ev.token_id)
            self.logprobs.append(ev.logprob)
            self.tops.append(ev.top)
        self.finish_reason = ev.finish_reason or self.finish_reason


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class _EventStream(StreamingResponse):
    """Server-sent events whose source is closed however the response ends (its ``finally``
    cancels the request's unfinished prompts, also when the client went away)."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


# ---------------------------------------------------------------------------------------------------------------------
# The app


async def _read_json(request: HTTPRequest, limit: int) -> Any:
    """The body as JSON, read at most ``limit`` bytes far (413 beyond; 400 when it is not JSON)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise APIError(
            413, f"the request body has {declared} bytes; at most {limit} are accepted", code="body_too_large"
        )
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise APIError(413, f"the request body is over {limit} bytes", code="body_too_large")
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


class _Gate:
    """ASGI middleware: the API key (every path but /health) and the request counter by path and status."""

    def __init__(self, app: Any, *, api_key: str | None, metrics: ServerMetrics):
        self.app, self.api_key, self.metrics = app, api_key, metrics

    def _authorized(self, scope: dict) -> bool:
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                return scheme.lower() == "bearer" and hmac.compare_digest(token.strip(), self.api_key)
        return False

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}

        async def counted(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            if self.api_key and scope["path"] != "/health" and not self._authorized(scope):
                error = APIError(
                    401,
                    "a valid API key is required: send 'Authorization: Bearer <key>'",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await _error(error)(scope, receive, counted)
            else:
                await self.app(scope, receive, counted)
        finally:
            path = scope["path"] if scope["path"] in PATHS else "other"
            self.metrics.http_requests.inc(path=path, code=str(status["code"]))


def create_app(service: Service, *, api_key: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> Any:
    """The ASGI app: the OpenAI endpoints, /health and /metrics over ``service``."""
    app = FastAPI(title="mpt-jax", docs_url=None, redoc_url=None, openapi_url=None)
    tok = service.tokenizer

    @app.exception_handler(APIError)
    async def api_error(_: HTTPRequest, e: APIError) -> JSONResponse:
        return _error(e)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: HTTPRequest, e: StarletteHTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: {e.detail}"
        return _error(APIError(e.status_code, message, code="not_found" if e.status_code == 404 else None))

    @app.exception_handler(Exception)
    async def server_error(_: HTTPRequest, e: Exception) -> JSONResponse:
        return _error(APIError(500, f"internal error: {type(e).__name__}: {e}"))

    @app.get("/health")
    async def health() -> JSONResponse:
        if not service.worker.alive():
            return _error(APIError(503, "the model thread has stopped", code="model_stopped"))
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(service.metrics.render(), media_type=CONTENT_TYPE)

    def model_card() -> dict[str, Any]:
        return {
            "id": service.model_name,
            "object": "model",
            "created": service.created,
            "owned_by": "mpt-jax",
            "max_model_len": service.context_len,
        }

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [model_card()]})

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> JSONResponse:
        service.check_model(name)
        return JSONResponse(model_card())

    @app.post("/v1/completions")
    async def completions(http: HTTPRequest):
        req = protocol.parse(CompletionRequest, await _read_json(http, max_body_bytes))
        service.check_model(req.model)
        s = protocol.settings(req, default_max_tokens=COMPLETIONS_DEFAULT_MAX_TOKENS)
        n_top = protocol.check_logprobs(req)  # None: no logprobs
        texts = protocol.completion_prompts(req)
        many = len(texts) > 1
        prompts = [service.encode(p, f"prompt[{i}]" if many else "prompt") for i, p in enumerate(texts)]
        run = _Run(service, prompts, s, default_stop_ids(tok))
        rid, created = protocol.new_id("cmpl"), protocol.now()
        starts = [len(p) if isinstance(p, str) else 0 for p in texts]

        def logprobs_of(choice: int, ids: list[int], lps: list[float], tops: list) -> dict | None:
            if n_top is None:
                return None
            return protocol.completion_logprobs(service.names, ids, lps, tops, n_top, starts[choice])

        def head(choices: list[dict]) -> dict[str, Any]:
            out = {"id": rid, "object": "text_completion", "created": created, "model": service.model_name}
            return {**out, "choices": choices}

        if s.stream:

            async def stream() -> AsyncIterator[str]:
                sent = [0] * len(prompts)  # text characters already sent, for text_offset
                generated = 0
                try:
                    async for c, ev in run.events():
                        generated += ev.token_id is not None
                        has_token = ev.token_id is not None
                        if not ev.text and ev.finish_reason is None and not (n_top is not None and has_token):
                            continue
                        ids, lps, tops = ([ev.token_id], [ev.logprob], [ev.top]) if has_token else ([], [], [])
                        lp = logprobs_of(c, ids, lps, tops)
                        if lp is not None:
                            lp["text_offset"] = [x + sent[c] for x in lp["text_offset"]]
                        sent[c] += len(ev.text)
                        chunk = head([{"index": c, "text": ev.text, "logprobs": lp, "finish_reason": ev.finish_reason}])
                        yield _sse({**chunk, "usage": None} if s.include_usage else chunk)
                    if s.include_usage:
                        yield _sse({**head([]), "usage": protocol.usage(sum(map(len, prompts)), generated)})
                except APIError as e:
                    yield _sse(e.body())
                yield "data: [DONE]\n\n"

            return _EventStream(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

        results = [_Choice() for _ in prompts]
        async for c, ev in run.events(http):
            results[c].add(ev)
        choices = [
            {
                "index": i,
                "text": r.text,
                "logprobs": logprobs_of(i, r.tokens, r.logprobs, r.tops),
                "finish_reason": r.finish_reason,
            }
            for i, r in enumerate(results)
        ]
        used = protocol.usage(sum(map(len, prompts)), sum(len(r.tokens) for r in results))
        return JSONResponse({**head(choices), "usage": used})

    @app.post("/v1/chat/completions")
    async def chat(http: HTTPRequest):
        req = protocol.parse(ChatRequest, await _read_json(http, max_body_bytes))
        service.check_model(req.model)
        s = protocol.settings(req, default_max_tokens=None)
        n_top = protocol.check_logprobs(req)  # None: no logprobs
        messages = protocol.chat_messages(req)
        try:
            text = render_chat(messages, service.fmt, tok)
        except ValueError as e:
            raise APIError(400, f"messages: {e}", param="messages") from None
        prompt = service.encode(text, "messages")
        run = _Run(service, [prompt], s, frozenset(stop_token_ids(service.fmt, tok)))
        rid, created = protocol.new_id("chatcmpl"), protocol.now()

        def head(choices: list[dict]) -> dict[str, Any]:
            out = {"id": rid, "created": created, "model": service.model_name}
            return {**out, "object": "chat.completion.chunk" if s.stream else "chat.completion", "choices": choices}

        if s.stream:

            def chunk(delta: dict, finish: str | None = None, logprobs: dict | None = None) -> str:
                data = head([{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}])
                return _sse({**data, "usage": None} if s.include_usage else data)

            async def stream() -> AsyncIterator[str]:
                generated = 0
                try:
                    yield chunk({"role": "assistant", "content": ""})
                    async for _, ev in run.events():
                        has_token = ev.token_id is not None
                        generated += has_token
                        lp = (
                            protocol.chat_logprobs(service.names, [ev.token_id], [ev.logprob], [ev.top], n_top)
                            if (n_top is not None and has_token)
                            else None
                        )
                        if ev.text or lp is not None:
                            yield chunk({"content": ev.text}, logprobs=lp)
                        if ev.finish_reason is not None:
                            yield chunk({}, ev.finish_reason)
                    if s.include_usage:
                        yield _sse({**head([]), "usage": protocol.usage(len(prompt), generated)})
                except APIError as e:
                    yield _sse(e.body())
                yield "data: [DONE]\n\n"

            return _EventStream(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

        r = _Choice()
        async for _, ev in run.events(http):
            r.add(ev)
        lp = None if n_top is None else protocol.chat_logprobs(service.names, r.tokens, r.logprobs, r.tops, n_top)
        message = {"role": "assistant", "content": r.text}
        choice = {"index": 0, "message": message, "logprobs": lp, "finish_reason": r.finish_reason}
        return JSONResponse({**head([choice]), "usage": protocol.usage(len(prompt), len(r.tokens))})

    return _Gate(app, api_key=api_key, metrics=service.metrics)
