"""Serving throughput and latency: ``python -m mpt_jax.serve`` under 1, 8 and 32 concurrent clients.

    python benchmarks/serve.py [--shape=tiny|125m] [--clients=1,8,32] [--requests=2] [--new=64]
                               [--prompt=32,96] [--max_batch=16] [--max_seq_len=512] [--dtype=float32]

A random model of the given shape (and a small BPE trained on a few standard-library modules) is
saved and served by the real server in a subprocess on a loopback port. Each client is an
``openai.AsyncOpenAI`` streaming loop that sends ``--requests`` requests one after another:
prompts of random lengths in ``--prompt`` (token ids), ``--new`` tokens each (greedy; a random
model rarely ends early, and the usage each response reports is what is counted), with
``logprobs=0`` so that every token arrives as its own chunk. Every level is run once to warm up
(compile the prefill shapes), then measured: aggregate generated tokens/s over the wall time of
the level, time to first token (request sent to first chunk) and per-token latency (gaps
between a request's chunks), p50/p99. A request that fails, or whose streamed tokens do not add
up to its usage, is counted as failed; the run fails if any did.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.forward import cpu_name  # noqa: E402
from mpt_jax import MPTConfig  # noqa: E402
from mpt_jax.checkpoint import save_model  # noqa: E402
from mpt_jax.data.tokenizer import train_bpe  # noqa: E402
from mpt_jax.model import init_params  # noqa: E402

SHAPES = {
    "tiny": dict(d_model=256, n_heads=4, n_layers=4, vocab_size=8256),
    "125m": dict(d_model=768, n_heads=12, n_layers=12, vocab_size=50432),
}
NAME = "bench"


def make_model(shape: str, folder: str, max_seq_len: int, dtype: str):
    """A random model with a BPE tokenizer, saved as an mpt-jax checkpoint; returns the tokenizer."""
    sources = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py")))[:60]
    texts = [open(p, encoding="utf-8", errors="replace").read() for p in sources]
    tok = train_bpe(texts, 4096, name="bench-bpe")
    cfg = MPTConfig(**SHAPES[shape], max_seq_len=max_seq_len, dtype=dtype, param_dtype=dtype).validate()
    save_model(folder, cfg, init_params(cfg, jax.random.key(0)), tokenizer=tok)
    return tok, texts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(folder: str, port: int, max_batch: int, max_queue: int) -> subprocess.Popen:
    args = [sys.executable, "-m", "mpt_jax.serve", f"--model={folder}", f"--port={port}", f"--model_name={NAME}"]
    args += [f"--max_batch={max_batch}", f"--max_queue={max_queue}", "--noaccess_log"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stderr.read()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("the server did not come up in 600 s")


async def one_request(client, prompt: list[int], new: int) -> dict:
    """One streamed completion: its token count, time to first token and gaps between tokens."""
    start = time.perf_counter()
    times, usage, finish = [], None, None
    stream = await client.completions.create(
        model=NAME,
        prompt=prompt,
        max_tokens=new,
        temperature=0,
        logprobs=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if c.logprobs and c.logprobs.token_logprobs:
                times.append(time.perf_counter())
            finish = c.finish_reason or finish
    ok = usage is not None and finish is not None and usage.completion_tokens == len(times)
    gaps = list(np.diff(times)) if len(times) > 1 else []
    return dict(ok=ok, tokens=len(times), ttft=(times[0] - start) if times else None, gaps=gaps)


async def level(base: str, clients: int, requests: int, prompts: list[list[int]], new: int) -> dict:
    """``clients`` concurrent loops of ``requests`` requests each; the aggregate numbers."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=3600)
    results: list[dict] = []
    failures: list[str] = []

    async def loop(i: int) -> None:
        for j in range(requests):
            try:
                results.append(await one_request(client, prompts[(i * requests + j) % len(prompts)], new))
            except Exception as e:  # noqa: BLE001 - a benchmark counts failures, whatever they are
                failures.append(f"{type(e).__name__}: {e}")

    start = time.perf_counter()
    await asyncio.gather(*(loop(i) for i in range(clients)))
    wall = time.perf_counter() - start
    await client.close()
    bad = sum(not r["ok"] for r in results) + len(failures) + (clients * requests - len(results) - len(failures))
    ttft = [r["ttft"] for r in results if r["ttft"] is not None]
    gaps = [g for r in results for g in r["gaps"]]
    tokens = sum(r["tokens"] for r in results)
    return dict(
        clients=clients,
        requests=len(results),
        failed=bad,
        errors=failures[:3],
        tokens=tokens,
        wall=wall,
        tok_s=tokens / wall,
        ttft_p50=float(np.percentile(ttft, 50)) if ttft else float("nan"),
        ttft_p99=float(np.percentile(ttft, 99)) if ttft else float("nan"),
        tpot_p50=float(np.percentile(gaps, 50)) if gaps else float("nan"),
        tpot_p99=float(np.percentile(gaps, 99)) if gaps else float("nan"),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=tuple(SHAPES), default="tiny")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--requests", type=int, default=2, help="requests per client, one after another")
    parser.add_argument("--new", type=int, default=64, help="tokens generated per request")
    parser.add_argument("--prompt", default="32,96", help="prompt lengths: min,max tokens")
    parser.add_argument("--max_batch", type=int, default=16)
    parser.add_argument("--max_seq_len", type=int, default=512)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = parser.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    lo, hi = (int(x) for x in args.prompt.split(","))

    folder = os.path.join(tempfile.mkdtemp(prefix="serve_bench_"), "model")
    tok, texts = make_model(args.shape, folder, args.max_seq_len, args.dtype)
    ids = tok.encode("\n".join(texts))
    rng = np.random.default_rng(0)
    prompts = []
    for _ in range(max(levels) * args.requests):
        n = int(rng.integers(lo, hi + 1))
        at = int(rng.integers(0, len(ids) - n))
        prompts.append(ids[at : at + n])

    port = free_port()
    proc = start_server(folder, port, args.max_batch, max_queue=max(64, max(levels) * 2))
    base = f"http://127.0.0.1:{port}"
    print(f"{cpu_name()}, {os.cpu_count()} cores; jax {jax.__version__}")
    print(
        f"shape {args.shape} ({args.dtype}), {args.max_batch} rows x {args.max_seq_len} positions; prompts "
        f"{lo}-{hi} tokens, {args.new} new tokens each, {args.requests} requests per client"
    )
    rows = []
    try:
        for clients in levels:
            asyncio.run(level(base, clients, 1, prompts, args.new))  # warm-up: compiles this level's shapes
            r = asyncio.run(level(base, clients, args.requests, prompts, args.new))
            rows.append(r)
            print(
                f"{clients:>3d} clients: {r['tok_s']:8.1f} tok/s ({r['tokens']} tokens in {r['wall']:.1f} s), TTFT "
                f"p50 {r['ttft_p50'] * 1e3:.0f} ms p99 {r['ttft_p99'] * 1e3:.0f} ms, per token p50 "
                f"{r['tpot_p50'] * 1e3:.1f} ms p99 {r['tpot_p99'] * 1e3:.1f} ms, failed {r['failed']} {r['errors']}",
                flush=True,
            )
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()

    single = next((r["tok_s"] for r in rows if r["clients"] == 1), None)
    print(
        "\n| clients | requests | tok/s | vs 1 client | TTFT p50 | TTFT p99 | per token p50 | per token p99 | failed |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['tok_s'] / single:.1f}x" if single else ""
        print(
            f"| {r['clients']} | {r['requests']} | {r['tok_s']:.1f} | {ratio} | {r['ttft_p50'] * 1e3:.0f} ms | "
            f"{r['ttft_p99'] * 1e3:.0f} ms | {r['tpot_p50'] * 1e3:.1f} ms | {r['tpot_p99'] * 1e3:.1f} ms | {r['failed']} |"
        )
    failed = sum(r["failed"] for r in rows)
    eight = next((r["tok_s"] for r in rows if r["clients"] == 8), None)
    if single and eight:
        verdict = "met" if eight >= 4 * single else "NOT met"
        print(f"\ntarget 8 clients >= 4x one client: {eight / single:.1f}x ({verdict})")
    if failed:
        raise SystemExit(f"{failed} requests failed or were lost")


if __name__ == "__main__":
    main()
