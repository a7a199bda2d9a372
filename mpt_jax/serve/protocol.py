"""The OpenAI API's request and response shapes, and its errors: no JAX calls, no HTTP framework.

Requests are checked strictly (pydantic strict mode: ``"5"`` is not a number, ``true`` is not an
integer) and every error names its field (``param``) as the OpenAI API does. Fields this server
cannot honour are refused when set to anything but their neutral value (``UNSUPPORTED``); other
unknown fields change nothing and are ignored, as clients send many (``user``, ``metadata``...).
Beyond the OpenAI fields, ``top_k``, ``min_p`` and ``repetition_penalty`` are accepted (vLLM's names).
"""

from __future__ import annotations

import dataclasses
import secrets
import time
import uuid
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from mpt_jax.sampling import FIELDS as SAMPLING_FIELDS
from mpt_jax.sampling import _check_values

# OpenAI's limits where it has them; the rest bound the work one request can ask for.
MAX_STOP_STRINGS = 16
MAX_LOGPROBS = 5  # the completions API's own limit
MAX_TOP_LOGPROBS = 20  # the chat API's own limit
SEED_LIMIT = 2**32  # a row's random key is built from a uint32 seed

# Fields that would change the result, and the values that leave it unchanged.
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "n": (None, 1),
    "best_of": (None, 1),
    "echo": (None, False),
    "suffix": (None, ""),
    "logit_bias": (None, {}),
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "guided_json": (None,),
    "guided_regex": (None,),
    "guided_choice": (None,),
}

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        kind = ERROR_TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------------------------------------------------------------
# Requests


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class StreamOptions(_Strict):
    include_usage: bool | None = None


class _Common(_Strict):
    """What completions and chat share. None means "not given" (some clients send explicit nulls)."""

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatRequest(_Common):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


def _param(loc: tuple[Any, ...]) -> str | None:
    """pydantic's error location as the OpenAI API writes a param: ``messages[0].content``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif out and (part in ("str", "int", "list[str]", "list[int]", "list[list[int]]") or "[" in str(part)):
            break  # the name of a union member pydantic tried, not a field
        else:
            out += f".{part}" if out else str(part)
    return out or None


def parse(kind: type[BaseModel], body: Any) -> Any:
    """``body`` (decoded JSON) as a ``kind`` request: 400 for a JSON that is not an object or sets an
    unsupported field, 422 for a missing field or a value of the wrong type, naming the field."""
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    for name, neutral in UNSUPPORTED.items():
        if name in body and not any(body[name] == v and type(body[name]) is type(v) for v in neutral):
            raise APIError(
                400,
                f"{name}={body[name]!r:.80} is not supported by this server (leave it out)",
                param=name,
                code="unsupported_parameter",
            )
    try:
        return kind.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        param = _param(tuple(first["loc"]))
        got = first.get("input")
        what = "is required" if first["type"] == "missing" else f"{first['msg'][0].lower()}{first['msg'][1:]}"
        shown = "" if first["type"] == "missing" else f" (got {got!r:.60})"
        raise APIError(422, f"{param or 'body'}: {what}{shown}", param=param, code="invalid_type") from None


@dataclasses.dataclass
class Settings:
    """A request's generation settings, resolved and checked (what every one of its prompts gets)."""

    max_tokens: int | None  # None: until the context is full
    max_tokens_field: str  # the field it came from (chat has two names for it)
    sampling: dict[str, float]  # SamplingParams.make's keyword arguments
    seed: int | None  # None: each prompt draws its own (``random_seed``)
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


def settings(req: _Common, *, default_max_tokens: int | None) -> Settings:
    """The checked settings of ``req``: 400 naming the field for a value out of range."""
    field, max_tokens = "max_tokens", req.max_tokens
    if isinstance(req, ChatRequest) and req.max_completion_tokens is not None:
        field, max_tokens = "max_completion_tokens", req.max_completion_tokens
    if max_tokens is None:
        max_tokens = default_max_tokens
    elif max_tokens < 1:
        raise APIError(400, f"{field}={max_tokens} must be at least 1", param=field)
    sampling = {name: getattr(req, name) for name in SAMPLING_FIELDS if getattr(req, name) is not None}
    _check_sampling(sampling)
    if req.seed is not None and not 0 <= req.seed < SEED_LIMIT:
        raise APIError(400, f"seed={req.seed} must be in [0, 2**32)", param="seed")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > MAX_STOP_STRINGS:
        raise APIError(400, f"stop: {len(stop)} strings, at most {MAX_STOP_STRINGS}", param="stop")
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options is only allowed with stream=true", param="stream_options")
    return Settings(max_tokens, field, sampling, req.seed, tuple(s for s in stop if s), bool(req.stream), include_usage)


def random_seed() -> int:
    """A seed for a request that gave none (as the OpenAI API, its text then varies run to run)."""
    return secrets.randbelow(SEED_LIMIT)


def _check_sampling(sampling: dict[str, float]) -> None:
    """The ranges ``SamplingParams.make`` enforces (its own check, on the host: no JAX on this
    thread), as a 400 naming the field."""
    for name, value in sampling.items():
        try:
            _check_values(name, np.asarray([value], dtype=np.float64))
        except ValueError as e:
            rule = str(e).split(" ", 4)[-1]  # "SamplingParams: top_p[0] = 2 must be ..." -> "must be ..."
            raise APIError(400, f"{name}={value} {rule}", param=name) from None


def check_logprobs(req: CompletionRequest | ChatRequest) -> int | None:
    """How many alternatives (``top_logprobs``) each token of the response comes with, or None when
    the response carries no log-probabilities: completions' ``logprobs=N``, chat's ``logprobs=true``
    with ``top_logprobs=N`` (default 0)."""
    if isinstance(req, CompletionRequest):
        if req.logprobs is not None and not 0 <= req.logprobs <= MAX_LOGPROBS:
            raise APIError(400, f"logprobs={req.logprobs} must be in [0, {MAX_LOGPROBS}]", param="logprobs")
        return req.logprobs
    if req.top_logprobs is not None:
        if not 0 <= req.top_logprobs <= MAX_TOP_LOGPROBS:
            raise APIError(
                400, f"top_logprobs={req.top_logprobs} must be in [0, {MAX_TOP_LOGPROBS}]", param="top_logprobs"
            )
        if not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
    return (req.top_logprobs or 0) if req.logprobs else None


def chat_messages(req: ChatRequest) -> list[dict[str, str]]:
    """The messages as ``{role, content}`` dicts for ``prompts.render_chat`` (text parts joined;
    ``developer`` is the newer name of ``system``)."""
    if not req.messages:
        raise APIError(400, "messages must not be empty", param="messages")
    out = []
    for i, m in enumerate(req.messages):
        if m.role not in ("system", "developer", "user", "assistant"):
            raise APIError(
                400, f"messages[{i}].role={m.role!r}: expected system, user or assistant", param=f"messages[{i}].role"
            )
        content = m.content if isinstance(m.content, str) or m.content is None else "".join(p.text for p in m.content)
        if content is None:
            raise APIError(400, f"messages[{i}].content is required", param=f"messages[{i}].content")
        out.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    return out


def completion_prompts(req: CompletionRequest) -> list[str | list[int]]:
    """The prompts of a completions request: one string, strings, one token-id list, or token-id lists."""
    p = req.prompt
    if isinstance(p, str):
        return [p]
    if not p:
        raise APIError(400, "prompt must not be an empty list", param="prompt")
    if all(isinstance(x, int) for x in p):
        return [list(p)]
    return list(p)


# ---------------------------------------------------------------------------------------------------------------------
# Responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


# GPT-2's byte-level alphabet (byte-level BPE vocabularies write each byte as one of these
# printable characters): the printable Latin-1 bytes stand for themselves, the others (control
# characters, space, 0x7f-0xa0, the soft hyphen) for 256, 257, ... in byte order.
_PRINTABLE_BYTES = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
BYTE_LEVEL_CHARS: dict[str, int] = {chr(b): b for b in _PRINTABLE_BYTES}
BYTE_LEVEL_CHARS.update({chr(256 + i): b for i, b in enumerate(sorted(set(range(256)) - set(_PRINTABLE_BYTES)))})


class TokenNames:
    """How responses show a token id: ``text`` (the token decoded alone), ``raw`` (its bytes) and
    ``name``: the text, or, for a piece of a multi-byte character (whose text alone is U+FFFD),
    ``bytes:\\xe2\\x80`` as the OpenAI API writes it. Distinct tokens get distinct names, so a
    completions ``top_logprobs`` dict (keyed by name) holds every alternative. Cached: a server
    names the same tokens over and over."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, bytes, str]] = {}

    def _get(self, token: int) -> tuple[str, bytes, str]:
        found = self._cache.get(token)
        if found is None:
            text = self.tokenizer.decode([token])
            raw = self._bytes(token, text)
            try:
                name = raw.decode("utf-8") if raw else text
            except UnicodeDecodeError:
                name = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
            found = self._cache[token] = (text, raw, name)
        return found

    def _bytes(self, token: int, text: str) -> bytes:
        """The token's bytes: read from its vocabulary entry when its text alone is not whole
        (byte-level BPE, or sentencepiece's ``<0xNN>`` byte tokens), else its text's UTF-8."""
        if "\ufffd" not in text:
            return text.encode("utf-8")
        tk = getattr(self.tokenizer, "tk", None)
        piece = tk.id_to_token(token) if tk is not None else None
        if piece and all(c in BYTE_LEVEL_CHARS for c in piece) and "ByteLevel" in type(tk.decoder).__name__:
            return bytes(BYTE_LEVEL_CHARS[c] for c in piece)
        if piece and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            return bytes([int(piece[3:5], 16)])
        return text.encode("utf-8")

    def text(self, token: int) -> str:
        return self._get(token)[0]

    def raw(self, token: int) -> bytes:
        return self._get(token)[1]

    def name(self, token: int) -> str:
        return self._get(token)[2]


# A token's alternatives as ``generate.StreamEvent.top`` carries them: (id, log-prob), most likely first.
Alternatives = list[tuple[int, float]]


def completion_logprobs(
    names: TokenNames, ids: list[int], logprobs: list[float], tops: list[Alternatives | None], n: int, start: int
) -> dict[str, Any]:
    """The completions API's logprobs object: the tokens, their log-probs, ``top_logprobs`` (per
    token a dict of up to ``n`` alternatives, name -> log-prob, most likely first) and
    ``text_offset`` (counted from ``start``, the prompt's length, in characters of text)."""
    offsets, at = [], start
    for t in ids:
        offsets.append(at)
        at += len(names.text(t))
    top = []
    for alternatives in tops:
        entry: dict[str, float] = {}
        for t, lp in (alternatives or [])[:n]:
            entry.setdefault(names.name(t), lp)  # names are distinct; a clash keeps the likelier
        top.append(entry)
    return {
        "tokens": [names.name(t) for t in ids],
        "token_logprobs": logprobs,
        "top_logprobs": top,
        "text_offset": offsets,
    }


def chat_logprobs(
    names: TokenNames, ids: list[int], logprobs: list[float], tops: list[Alternatives | None], n: int
) -> dict[str, Any]:
    """The chat API's logprobs object: per token its name, log-prob, bytes and ``top_logprobs``
    (up to ``n`` alternatives as ``{token, logprob, bytes}``, most likely first)."""

    def token(t: int, lp: float) -> dict[str, Any]:
        return {"token": names.name(t), "logprob": lp, "bytes": list(names.raw(t))}

    return {
        "content": [
            {**token(t, lp), "top_logprobs": [token(a, alp) for a, alp in (top or [])[:n]]}
            for t, lp, top in zip(ids, logprobs, tops, strict=True)
        ]
    }
