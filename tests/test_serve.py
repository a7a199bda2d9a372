"""The OpenAI-compatible server on a loopback port, spoken to with the official ``openai`` client.

A small random model saved with a BPE + ChatML tokenizer is served from a thread of this process
(``uvicorn.Server`` on a socket bound to port 0). Outputs are checked against ``Generator``
(greedy and seeded sampling give the same tokens however requests are batched), the wire format
against the openai client and raw HTTP, ``/metrics`` against prometheus_client's parser.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
import openai
import pytest
import scipy.special
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from mpt_jax import MPT, MPTConfig
from mpt_jax.checkpoint import save_model
from mpt_jax.data.tokenizer import train_bpe
from mpt_jax.generate import Batcher, Generator, Request
from mpt_jax.load import load
from mpt_jax.model import init_params
from mpt_jax.prompts import PromptFormat, prompt_format, render_chat, render_instruction, stop_token_ids
from mpt_jax.sampling import SamplingParams
from mpt_jax.serve import protocol
from mpt_jax.serve.app import build_service, create_app, warm_up
from mpt_jax.serve.metrics import Counter, Histogram, ServerMetrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "tiny"
TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "import os\nprint(os.getcwd())\n",
    "class A:\n    pass\n",
    "hello world, how are you today?\n",
] * 20
PROMPTS = ["def add(", "import os\nprint(", "hello world", "class A:\n    pass\n\nclass B(A):"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    tok = train_bpe(TEXTS, 400, name="serve-bpe").with_chatml()
    cfg = MPTConfig(d_model=64, n_heads=2, n_layers=2, max_seq_len=256, vocab_size=tok.vocab_size).validate()
    params = jax.tree.map(lambda x: x * 3.0, init_params(cfg, jax.random.key(0)))  # peakier: varied text
    path = str(tmp_path_factory.mktemp("serve") / "model")
    save_model(path, cfg, params, tokenizer=tok)
    return path


@pytest.fixture(scope="module")
def loaded(model_dir):
    return load(model_dir, scan_layers=False)


@pytest.fixture(scope="module")
def reference(loaded) -> Generator:
    cfg, params, tok = loaded
    gen = Generator(cfg, params, tok, max_batch=4)
    gen.engine(4, cfg.max_seq_len)  # one engine (one compilation) for every reference below
    return gen


@contextlib.contextmanager
def serving(app):
    """``app`` on a free loopback port in a background thread; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="module")
def service(loaded):
    cfg, params, tok = loaded
    svc = build_service(cfg, params, tok, model_name=NAME, max_batch=4, max_queue=64)
    yield svc
    svc.worker.stop()


@pytest.fixture(scope="module")
def url(service):
    with serving(create_app(service, max_body_bytes=8192)) as base:
        yield base


@pytest.fixture(scope="module")
def client(url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def post(url: str, path: str, body: bytes | str | dict, headers: dict | None = None) -> tuple[int, dict, dict]:
    """A raw POST (any bytes): (status, JSON body, headers)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    data = json.dumps(body) if isinstance(body, dict) else body
    conn.request("POST", path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    raw = resp.read()
    conn.close()
    return resp.status, json.loads(raw) if raw else {}, dict(resp.getheaders())


def get(url: str, path: str, headers: dict | None = None) -> tuple[int, str]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("GET", path, headers=headers or {})
    resp = conn.getresponse()
    out = resp.status, resp.read().decode()
    conn.close()
    return out


def metric(url: str, name: str, **labels: str) -> float:
    """One sample of /metrics, read with prometheus_client's parser (0 when absent)."""
    status, text = get(url, "/metrics")
    assert status == 200
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


# ---------------------------------------------------------------------------------------------------------------------
# Completions and chat against Generator


def test_completions_greedy_equal_generate_streamed_and_not(client, reference, loaded):
    tok = loaded[2]
    want = reference.generate(PROMPTS, max_new_tokens=12, temperature=0.0)
    batch = client.completions.create(model=NAME, prompt=PROMPTS, max_tokens=12, temperature=0)
    assert batch.object == "text_completion" and batch.model == NAME and batch.id.startswith("cmpl-")
    assert [c.index for c in batch.choices] == list(range(len(PROMPTS)))
    assert [c.text for c in batch.choices] == [w.text for w in want]
    assert [c.finish_reason for c in batch.choices] == [w.finish_reason for w in want]
    assert batch.usage.prompt_tokens == sum(len(tok.encode(p)) for p in PROMPTS)
    assert batch.usage.completion_tokens == sum(len(w.token_ids) for w in want)
    assert batch.usage.total_tokens == batch.usage.prompt_tokens + batch.usage.completion_tokens

    one = client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=12, temperature=0)
    assert one.choices[0].text == want[1].text
    ids = client.completions.create(model=NAME, prompt=tok.encode(PROMPTS[1]), max_tokens=12, temperature=0)
    assert ids.choices[0].text == want[1].text  # a token-id prompt is the same prompt

    chunks = list(
        client.completions.create(
            model=NAME,
            prompt=PROMPTS[2],
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "text_completion" for c in chunks)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == want[2].text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [want[2].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want[2].token_ids)


def token_bytes(name: str) -> bytes:
    """A completions token's bytes: OpenAI writes a piece of a multi-byte character as ``bytes:\\xe2\\x80``."""
    if name.startswith("bytes:"):
        return bytes(int(h, 16) for h in name.removeprefix("bytes:").split("\\x")[1:])
    return name.encode("utf-8")


def test_completions_logprobs_are_the_sampled_tokens(client, reference):
    want = reference.generate([PROMPTS[0]], max_new_tokens=6, temperature=0.0, logprobs=True)[0]
    got = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=6, temperature=0, logprobs=1)
    lp = got.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx(want.logprobs, abs=1e-5)
    spelled = b"".join(token_bytes(t) for t in lp.tokens).decode("utf-8", errors="replace")
    assert spelled == got.choices[0].text or got.choices[0].finish_reason == "stop"
    assert lp.text_offset[0] == len(PROMPTS[0])
    assert [list(top) for top in lp.top_logprobs] == [[t] for t in lp.tokens]  # greedy: the token is the likeliest


def model_log_softmax(loaded, ids: list[int]) -> np.ndarray:
    """float64 log_softmax of the model's own logits over ``ids`` (one forward pass, no cache):
    row ``i`` is the distribution of the token after ``ids[: i + 1]``."""
    cfg, params, _ = loaded
    logits = MPT(cfg, scan_layers=False).apply({"params": params}, jnp.asarray([ids]))[0]
    return scipy.special.log_softmax(np.asarray(logits, np.float64), axis=-1)


def expected_top(service, ref: np.ndarray, prompt_len: int, n_tokens: int, n: int) -> list[list[tuple[str, float]]]:
    """Per generated token, the ``n`` likeliest (name, log-prob, id) under ``ref``, most likely first."""
    out = []
    for t in range(n_tokens):
        step = ref[prompt_len - 1 + t]
        top = np.argsort(-step, kind="stable")[:n]
        out.append([(service.names.name(int(i)), step[i], int(i)) for i in top])
    return out


def test_completions_top_logprobs_equal_the_models_log_softmax(client, reference, service, loaded):
    """Greedy, streamed and not: ``top_logprobs[t]`` holds the N likeliest tokens of a float64
    log_softmax of the model's logits after prompt + the first t tokens, most likely first, the
    chosen token first with its ``token_logprobs`` value; N is respected and 0 gives empty dicts."""
    tok = loaded[2]
    ids = tok.encode(PROMPTS[0])
    want = reference.generate([PROMPTS[0]], max_new_tokens=8, temperature=0.0)[0]
    ref = model_log_softmax(loaded, ids + want.token_ids)
    expected = expected_top(service, ref, len(ids), len(want.token_ids), 5)
    kw = dict(model=NAME, prompt=PROMPTS[0], max_tokens=8, temperature=0)
    for n in (5, 2, 0):
        whole = client.completions.create(**kw, logprobs=n).choices[0].logprobs
        chunks = [c.choices[0].logprobs for c in client.completions.create(**kw, logprobs=n, stream=True)]
        streamed = [top for lp in chunks if lp is not None for top in lp.top_logprobs]
        assert whole.tokens == [service.names.name(t) for t in want.token_ids]
        for tops in (whole.top_logprobs, streamed):
            assert len(tops) == len(want.token_ids)
            for t, (got, exp) in enumerate(zip(tops, expected, strict=True)):
                assert list(got) == [e[0] for e in exp[:n]]  # N distinct names, most likely first
                assert list(got.values()) == pytest.approx([e[1] for e in exp[:n]], abs=1e-4)
                if n:
                    assert next(iter(got.items())) == (whole.tokens[t], pytest.approx(whole.token_logprobs[t]))


def test_sampled_top_logprobs_stay_inside_the_nucleus(client, reference, service, loaded):
    """temperature=1, top_p=0.5: each token's alternatives are the likeliest tokens of the nucleus
    (float64 reference from the model's logits), renormalized over it; tokens outside it never."""
    tok = loaded[2]
    ids = tok.encode(PROMPTS[3])
    kw = dict(max_new_tokens=12, temperature=1.0, top_p=0.5, seed=2)
    want = reference.generate([PROMPTS[3]], **kw)[0]
    ref = model_log_softmax(loaded, ids + want.token_ids)
    got = client.completions.create(
        model=NAME, prompt=PROMPTS[3], max_tokens=12, temperature=1.0, top_p=0.5, seed=2, logprobs=5
    )
    assert got.choices[0].text == want.text
    lp = got.choices[0].logprobs
    sizes = []
    for t, top in enumerate(lp.top_logprobs):
        step = ref[len(ids) - 1 + t]
        order = np.argsort(-step, kind="stable")
        mass = np.cumsum(np.exp(step[order]))
        nucleus = order[: int(np.searchsorted(mass, 0.5)) + 1]  # the fewest likeliest tokens holding 0.5
        norm = scipy.special.logsumexp(step[nucleus])
        assert list(top) == [service.names.name(int(i)) for i in nucleus[:5]]
        assert list(top.values()) == pytest.approx(list(step[nucleus[:5]] - norm), abs=1e-4)
        assert top.get(lp.tokens[t], lp.token_logprobs[t]) == pytest.approx(lp.token_logprobs[t], abs=1e-6)
        sizes.append(len(top))
    assert min(sizes) < 5, "some step's nucleus should hold fewer than 5 tokens"


def test_chat_top_logprobs_equal_the_models_log_softmax(client, reference, service, loaded):
    """Chat, greedy, streamed and not: per content token ``top_logprobs`` is N ``{token, logprob,
    bytes}`` (the float64 reference's likeliest, the chosen token first); the tokens' bytes spell
    the reply; ``top_logprobs`` 0 or left out gives empty lists."""
    tok = loaded[2]
    messages = [{"role": "user", "content": "hello world"}]
    fmt = prompt_format(tok)
    ids = tok.encode(render_chat(messages, fmt, tok))
    want = reference.generate([ids], max_new_tokens=10, temperature=0.0, stop_token_ids=stop_token_ids(fmt, tok))[0]
    ref = model_log_softmax(loaded, ids + want.token_ids)
    expected = expected_top(service, ref, len(ids), len(want.token_ids), 3)
    kw = dict(model=NAME, messages=messages, max_tokens=10, temperature=0, logprobs=True)
    whole = client.chat.completions.create(**kw, top_logprobs=3).choices[0]
    chunks = list(client.chat.completions.create(**kw, top_logprobs=3, stream=True))
    streamed = [item for c in chunks if c.choices[0].logprobs for item in c.choices[0].logprobs.content]
    assert whole.message.content == want.text
    for content in (whole.logprobs.content, streamed):
        assert [c.token for c in content] == [service.names.name(t) for t in want.token_ids]
        assert b"".join(bytes(c.bytes) for c in content).decode("utf-8", errors="replace") == want.text
        for c, exp in zip(content, expected, strict=True):
            assert [a.token for a in c.top_logprobs] == [e[0] for e in exp]
            assert [a.logprob for a in c.top_logprobs] == pytest.approx([e[1] for e in exp], abs=1e-4)
            for a, (_, _, i) in zip(c.top_logprobs, exp, strict=True):  # the bytes are the token's
                assert bytes(a.bytes).decode("utf-8", errors="replace") == tok.decode([i])
            assert (c.top_logprobs[0].token, c.top_logprobs[0].logprob) == (c.token, pytest.approx(c.logprob))
    for extra in ({"top_logprobs": 0}, {}):
        content = client.chat.completions.create(**kw, **extra).choices[0].logprobs.content
        assert len(content) == len(want.token_ids) and all(c.top_logprobs == [] for c in content)


def test_chat_in_the_models_formats_equals_generate(client, reference, service, loaded, monkeypatch):
    """ChatML (the tokenizer's), a tokenizer chat template, and an instruct template; streamed and not."""
    tok = loaded[2]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello world"}]
    chatml = prompt_format(tok)
    assert chatml.name == "chatml"
    text = render_chat(messages, chatml, tok)
    want = reference.generate([text], max_new_tokens=10, temperature=0.0, stop_token_ids=stop_token_ids(chatml, tok))[0]
    got = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0)
    assert got.object == "chat.completion" and got.id.startswith("chatcmpl-")
    assert got.choices[0].message.role == "assistant" and got.choices[0].message.content == want.text
    assert got.choices[0].finish_reason == want.finish_reason
    assert got.usage.prompt_tokens == len(tok.encode(text)) and got.usage.completion_tokens == len(want.token_ids)
    chunks = list(
        client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0, stream=True)
    )
    assert chunks[0].choices[0].delta.role == "assistant" and all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == [want.finish_reason]

    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}>>> "
    monkeypatch.setattr(service, "fmt", PromptFormat("chat_template", template))
    text = "[system] Be brief.\n[user] hello world\n>>> "
    want = reference.generate([text], max_new_tokens=8, temperature=0.0, stop_token_ids=[tok.eos_id])[0]
    got = client.chat.completions.create(model=NAME, messages=messages, max_tokens=8, temperature=0)
    assert got.choices[0].message.content == want.text and got.usage.prompt_tokens == len(tok.encode(text))

    monkeypatch.setattr(service, "fmt", prompt_format(tok, "mpt-7b-instruct"))
    text = render_instruction("hello world", "mpt-7b-instruct")
    want = reference.generate([text], max_new_tokens=8, temperature=0.0, stop_token_ids=[tok.eos_id])[0]
    got = client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "hello world"}], max_tokens=8, temperature=0
    )
    assert got.choices[0].message.content == want.text
    with pytest.raises(openai.BadRequestError, match="instruction template"):
        client.chat.completions.create(model=NAME, messages=messages, max_tokens=8)  # an instruct model has no turns


def test_stop_sequences_and_seeds(client, reference, loaded):
    tok = loaded[2]
    full = reference.generate([PROMPTS[1]], max_new_tokens=16, temperature=0.0, stop_token_ids=[])[0]
    pieces = [tok.decode([t]) for t in full.token_ids]
    stop = next(p for p in pieces[2:] if p.strip() and p.isascii() and p.isprintable())  # a piece of the output
    want = reference.generate([PROMPTS[1]], max_new_tokens=16, temperature=0.0, stop=[stop])[0]
    assert want.text == full.text[: full.text.find(stop)] and want.finish_reason == "stop"
    got = client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=16, temperature=0, stop=stop)
    assert got.choices[0].text == want.text and got.choices[0].finish_reason == "stop"
    streamed = client.completions.create(
        model=NAME, prompt=PROMPTS[1], max_tokens=16, temperature=0, stop=[stop, "zzz"], stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == want.text

    kw = dict(model=NAME, prompt=PROMPTS[3], max_tokens=12, temperature=1.0, top_p=0.9)
    a = [client.completions.create(**kw, seed=s).choices[0].text for s in (1, 2, 3)]
    assert a == [client.completions.create(**kw, seed=s).choices[0].text for s in (1, 2, 3)]  # same seed, same text
    assert len(set(a)) > 1  # and seeds matter
    want = reference.generate([PROMPTS[3]], max_new_tokens=12, temperature=1.0, top_p=0.9, seed=2)[0]
    assert a[1] == want.text  # the engine's draws depend on the seed and position only


def test_32_concurrent_requests_equal_one_by_one(client, service):
    """Different lengths, greedy and sampled, streamed and not: the same text alone or batched."""
    busy = []
    step = service.worker.batcher.step

    def counting_step():
        busy.append(len(service.worker.batcher.active))
        return step()

    def ask(i: int, stream: bool) -> str:
        kw = dict(model=NAME, prompt="hello " * (1 + i % 7) + PROMPTS[i % 4], max_tokens=4 + i % 9, seed=i)
        kw.update(temperature=0 if i % 2 else 0.8)
        if not stream:
            return client.completions.create(**kw).choices[0].text
        return "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True))

    alone = [ask(i, stream=False) for i in range(32)]
    service.worker.batcher.step = counting_step
    try:
        with ThreadPoolExecutor(32) as pool:
            together = list(pool.map(lambda i: ask(i, stream=i % 3 == 0), range(32)))
    finally:
        del service.worker.batcher.step
    assert together == alone
    assert max(busy) == service.worker.batcher.engine.rows  # the requests did share the rows


# ---------------------------------------------------------------------------------------------------------------------
# Cancellation, backpressure, failures


@pytest.fixture(scope="module")
def slow(loaded):
    """One cache row, a queue of 2, and decode steps that wait for ``gate`` and take 20 ms."""
    cfg, params, tok = loaded
    svc = build_service(cfg, params, tok, model_name=NAME, max_batch=1, max_queue=2)
    engine = svc.worker.batcher.engine
    step, gate = engine.step, threading.Event()
    gate.set()

    def slow_step():
        gate.wait(60)
        time.sleep(0.02)
        return step()

    engine.step = slow_step
    with serving(create_app(svc)) as base:
        yield svc, base, gate
    gate.set()
    svc.worker.stop()


def wait_for(predicate, timeout: float = 20.0) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def test_cancelled_stream_frees_its_row(slow):
    svc, base, _ = slow
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=60)
    before = metric(base, "mpt_jax_generation_tokens_total")
    stream = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=100, temperature=0, stream=True)
    it = iter(stream)
    for _ in range(3):
        next(it)
    stream.close()  # the client goes away mid-stream
    wait_for(lambda: metric(base, "mpt_jax_requests_total", reason="cancelled") == 1)
    assert metric(base, "mpt_jax_batch_rows_busy") == 0
    start = time.time()
    out = client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=3, temperature=0)
    assert out.choices[0].finish_reason in ("length", "stop") and time.time() - start < 10  # the row was free
    assert metric(base, "mpt_jax_generation_tokens_total") - before < 50  # the cancelled one stopped early

    impatient = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=0.5)
    with pytest.raises(openai.APITimeoutError):  # a non-streamed request whose client gives up
        impatient.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=100, temperature=0)
    wait_for(lambda: metric(base, "mpt_jax_requests_total", reason="cancelled") == 2)
    assert metric(base, "mpt_jax_batch_rows_busy") == 0


def test_full_queue_answers_429_then_serves_again(slow):
    svc, base, gate = slow
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=60)
    kw = dict(model=NAME, prompt=PROMPTS[0], max_tokens=5, temperature=0)
    gate.clear()  # decoding stalls: the row stays busy and the queue fills
    first = client.completions.create(**kw, stream=True, logprobs=0)  # logprobs: a chunk for every token
    next(iter(first))  # prefilled: it holds the only row
    waiting = [client.completions.create(**kw, stream=True) for _ in range(2)]  # the queue's 2 places
    wait_for(lambda: svc.worker.queue_depth() == 2)
    with pytest.raises(openai.RateLimitError) as e:
        client.completions.create(**kw)
    assert e.value.response.headers["retry-after"] == "1" and e.value.body["code"] == "queue_full"
    assert metric(base, "mpt_jax_queue_depth") == 2
    gate.set()
    for s in [first, *waiting]:
        assert [c.choices[0].finish_reason for c in s if c.choices[0].finish_reason] in (["length"], ["stop"])
    assert client.completions.create(**kw).choices[0].text is not None


def test_a_failed_step_answers_500_and_the_server_goes_on(client, service, monkeypatch):
    engine = service.worker.batcher.engine
    step = engine.step
    calls = []

    def failing_once():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("simulated device failure")
        return step()

    monkeypatch.setattr(engine, "step", failing_once)
    with pytest.raises(openai.InternalServerError, match="simulated device failure"):
        client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=5, temperature=0)
    assert client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=5, temperature=0).choices[0].text


# ---------------------------------------------------------------------------------------------------------------------
# Bad input, keys, metrics


BAD = [  # (body, status, param)
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    ({"model": NAME, "prompt": "x", "temperature": "hot"}, 422, "temperature"),
    ({"model": NAME, "prompt": "x", "max_tokens": 2.5}, 422, "max_tokens"),
    ({"model": NAME, "prompt": "x", "stream": "yes"}, 422, "stream"),
    ({"model": NAME}, 422, "prompt"),
    ({"prompt": "x"}, 422, "model"),
    ({"model": NAME, "prompt": 7}, 422, "prompt"),
    ({"model": NAME, "prompt": "x", "n": 2}, 400, "n"),
    ({"model": NAME, "prompt": "x", "logit_bias": {"5": 10}}, 400, "logit_bias"),
    ({"model": NAME, "prompt": "x", "echo": True}, 400, "echo"),
    ({"model": NAME, "prompt": list(range(1, 300))}, 400, "prompt"),
    ({"model": NAME, "prompt": "x", "max_tokens": 500}, 400, "max_tokens"),
    ({"model": NAME, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": NAME, "prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"model": NAME, "prompt": "x", "top_p": 2}, 400, "top_p"),
    ({"model": NAME, "prompt": "x", "seed": -3}, 400, "seed"),
    ({"model": NAME, "prompt": [5, 9999]}, 400, "prompt"),
    ({"model": NAME, "prompt": ""}, 400, "prompt"),
    ({"model": NAME, "prompt": "x", "logprobs": 9}, 400, "logprobs"),
    ({"model": NAME, "prompt": "x", "stop": ["a"] * 17}, 400, "stop"),
    ({"model": "gpt-4", "prompt": "x"}, 404, "model"),
    (b'{"model": "tiny", "prompt": "' + b"x" * 9000 + b'"}', 413, None),
]
BAD_CHAT = [
    ({"model": NAME, "messages": []}, 400, "messages"),
    ({"model": NAME, "messages": [{"role": "user", "content": 5}]}, 422, "messages[0].content"),
    ({"model": NAME, "messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role"),
    ({"model": NAME, "messages": [{"role": "user"}]}, 400, "messages[0].content"),
    ({"model": NAME, "messages": [{"role": "user", "content": "x " * 200}]}, 400, "messages"),
    ({"model": NAME, "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, 400, "tools"),
    (
        {"model": NAME, "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 1000},
        400,
        "max_completion_tokens",
    ),
]


def test_bad_input_answers_4xx_naming_the_field_and_the_server_goes_on(url, client):
    for path, cases in (("/v1/completions", BAD), ("/v1/chat/completions", BAD_CHAT)):
        for body, status, param in cases:
            got, reply, _ = post(url, path, body)
            assert got == status, (body if isinstance(body, dict) else body[:40], reply)
            error = reply["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"]
            assert error["param"] == param, (body if isinstance(body, dict) else body[:40], error)
    assert get(url, "/v1/nothing")[0] == 404 and json.loads(get(url, "/v1/nothing")[1])["error"]["message"]
    assert get(url, "/v1/completions")[0] == 405
    with pytest.raises(openai.UnprocessableEntityError):
        client.completions.create(model=NAME, prompt="x", extra_body={"temperature": "hot"})
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="x")
    assert get(url, "/health") == (200, '{"status":"ok"}')
    assert client.completions.create(model=NAME, prompt="x", max_tokens=2).usage.completion_tokens >= 1
    assert [m.id for m in client.models.list()] == [NAME] and client.models.retrieve(NAME).id == NAME


def test_api_key_is_required_except_for_health(service):
    with serving(create_app(service, api_key="sekret")) as base:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0).models.list()
        status, reply, headers = post(base, "/v1/completions", {"model": NAME, "prompt": "x"})
        assert status == 401 and reply["error"]["code"] == "invalid_api_key" and headers["www-authenticate"] == "Bearer"
        assert get(base, "/metrics")[0] == 401 and get(base, "/health")[0] == 200
        assert get(base, "/metrics", {"Authorization": "Bearer sekret"})[0] == 200
        ok = openai.OpenAI(base_url=f"{base}/v1", api_key="sekret", max_retries=0)
        assert ok.completions.create(model=NAME, prompt="x", max_tokens=2).choices[0].finish_reason


def test_sse_wire_format_ends_with_done(url):
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    body = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("content-type").startswith("text/event-stream")
    events = [e for e in resp.read().decode().split("\n\n") if e]
    conn.close()
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    first = json.loads(events[0].removeprefix("data: "))
    assert set(first) == {"id", "object", "created", "model", "choices"}
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}


def test_metrics_count_tokens_requests_and_latency(url, client):
    names = ("mpt_jax_prompt_tokens_total", "mpt_jax_generation_tokens_total")
    before = {n: metric(url, n) for n in names}
    ttft = metric(url, "mpt_jax_time_to_first_token_seconds_count")
    per_token = metric(url, "mpt_jax_time_per_output_token_seconds_count")
    http_ok = metric(url, "mpt_jax_http_requests_total", path="/v1/completions", code="200")
    out = client.completions.create(model=NAME, prompt=PROMPTS[3], max_tokens=7, temperature=0, stop=None)
    assert metric(url, names[0]) - before[names[0]] == out.usage.prompt_tokens
    assert metric(url, names[1]) - before[names[1]] == out.usage.completion_tokens
    assert metric(url, "mpt_jax_time_to_first_token_seconds_count") - ttft == 1
    assert metric(url, "mpt_jax_time_per_output_token_seconds_count") - per_token == out.usage.completion_tokens - 1
    wait_for(lambda: metric(url, "mpt_jax_http_requests_total", path="/v1/completions", code="200") - http_ok == 1)
    assert metric(url, "mpt_jax_batch_rows") == 4 and metric(url, "mpt_jax_queue_depth") == 0
    kinds = {f.name: f.type for f in text_string_to_metric_families(get(url, "/metrics")[1])}
    assert kinds["mpt_jax_time_to_first_token_seconds"] == "histogram" and kinds["mpt_jax_requests"] == "counter"
    assert kinds["mpt_jax_batch_rows_busy"] == "gauge"


def test_metrics_text_format_against_prometheus_client():
    m = ServerMetrics(prefix="t")
    m.http_requests.inc(path='/a"b\\c', code="200")
    m.ttft.observe(0.003)
    m.ttft.observe(7.0)
    fams = {f.name: f for f in text_string_to_metric_families(m.render())}
    (sample,) = fams["t_http_requests"].samples
    assert sample.labels == {"path": '/a"b\\c', "code": "200"} and sample.value == 1
    samples = fams["t_time_to_first_token_seconds"].samples
    buckets = {float(s.labels["le"]): s.value for s in samples if s.name.endswith("_bucket")}
    assert buckets[0.005] == 1 and buckets[5.0] == 1 and buckets[10.0] == 2 and buckets[float("inf")] == 2
    with pytest.raises(ValueError):
        Counter("c", "h").inc(-1)
    with pytest.raises(ValueError):
        Histogram("h", "h", buckets=(2, 1))


def test_protocol_names_nested_params():
    with pytest.raises(protocol.APIError) as e:
        protocol.parse(
            protocol.ChatRequest, {"model": "m", "messages": [{"role": "user", "content": "a"}, {"role": 1}]}
        )
    assert e.value.status == 422 and e.value.param == "messages[1].role"
    req = protocol.parse(protocol.ChatRequest, {"model": "m", "messages": [{"role": "user", "content": "a"}]})
    assert protocol.settings(req, default_max_tokens=None).max_tokens is None


@pytest.mark.slow
def test_warm_up_compiles_every_prefill_shape(loaded):
    """After ``warm_up`` no prompt length or admitted count compiles anything new."""
    cfg, params, tok = loaded
    engine = Generator(cfg, params, tok).engine(3, 32)
    assert warm_up(engine) == 3 * 2  # 1, 2, 4 prompts (3 rows pad to 4) x 16, 32 positions
    compiled = engine._prefill._cache_size(), engine._admit._cache_size(), engine._decode._cache_size()
    batcher = Batcher(engine, tok)
    for n in (1, 15, 17, 31, 5, 2, 9):
        batcher.submit(Request([7] * n, 1, SamplingParams.make(1, temperature=0.0)))
    while batcher.has_work():
        batcher.step()
    assert (engine._prefill._cache_size(), engine._admit._cache_size(), engine._decode._cache_size()) == compiled


# ---------------------------------------------------------------------------------------------------------------------
# The command line


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_cli_serves_sharded_with_the_key_from_the_environment(model_dir, reference, tmp_path):
    """The command line on a (1, 2, 2) mesh of 4 simulated devices, warmed up, with the API key from
    MPT_JAX_API_KEY: greedy text as on one device; SIGINT stops it cleanly."""
    port = _free_port()
    env = {**os.environ, "MPT_JAX_API_KEY": "k3y", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    args = [sys.executable, "-m", "mpt_jax.serve", f"--model={model_dir}", f"--port={port}", "--model_name=m"]
    args += ["--max_batch=2", "--max_seq_len=64", "--mesh=1,2,2"]
    log = open(tmp_path / "serve.log", "w+")  # noqa: SIM115 - read after the process ends
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.time() < deadline, "the server did not come up"
            with contextlib.suppress(OSError):
                if get(base, "/health")[0] == 200:
                    break
            time.sleep(0.5)
        assert post(base, "/v1/completions", {"model": "m", "prompt": "x"})[0] == 401
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="k3y", max_retries=0)
        got = client.completions.create(model="m", prompt=PROMPTS[1], max_tokens=8, temperature=0)
        assert got.choices[0].text == reference.generate([PROMPTS[1]], max_new_tokens=8, temperature=0.0)[0].text
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
        log.close()
    text = (tmp_path / "serve.log").read_text()
    assert proc.returncode == 0, text[-3000:]
    assert "compiled 6 prefill shapes" in text and "API key required" in text


def test_cli_refuses_bad_flags():
    done = subprocess.run(
        [sys.executable, "-m", "mpt_jax.serve", "--model=./no/such/model", "--max_batch=0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1 and "serve: error: --max_batch=0 must be positive" in done.stderr
