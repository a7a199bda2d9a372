"""Input pipeline throughput on the embedded corpus, next to the tiny model's step throughput.

    python benchmarks/data_pipeline.py [--seconds=10] [--batch=16] [--seq_len=256]

Measures tokens/s of make_dataset (tokenize + concat-pack + batch) with 0 and 2 worker processes,
and, in the same run, tokens/s of a jitted forward+backward pass of configs/tiny.py's model on
batches of the same shape (the bulk of a train step): the loader must outpace the model.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pipeline_tokens_per_s(workers: int, batch: int, seq_len: int, seconds: float) -> tuple[float, int]:
    from mpt_jax.data.pipeline import DataConfig, get_tokenizer, make_dataset

    cfg = DataConfig(num_workers=workers)
    tok = get_tokenizer(cfg)
    it = iter(make_dataset(cfg, tok, split="train", seq_len=seq_len, global_batch=batch, seed=0))
    for _ in range(3):  # start-up: workers spawn, first documents
        next(it)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        n += int(next(it)["tokens"].size)
    elapsed = time.perf_counter() - start
    if hasattr(it, "close"):
        it.close()
    return n / elapsed, n


def model_tokens_per_s(batch: int, seq_len: int, seconds: float) -> float:
    import importlib.util

    import jax
    import jax.numpy as jnp

    from mpt_jax.model import MPT, init_params
    from mpt_jax.run_config import model_config

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("tiny", os.path.join(root, "configs", "tiny.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = model_config(module.get_config())
    params = init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (batch, seq_len), 0, cfg.vocab_size)

    def loss(p, t):
        logits = MPT(cfg).apply({"params": p}, t)
        logp = jax.nn.log_softmax(logits[:, :-1])
        return -jnp.take_along_axis(logp, t[:, 1:, None], -1).mean()

    step = jax.jit(jax.value_and_grad(loss))
    jax.block_until_ready(step(params, tokens))
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        jax.block_until_ready(step(params, tokens))
        n += batch * seq_len
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq_len", type=int, default=256)
    args = parser.parse_args()
    from absl import flags

    flags.FLAGS(["data_pipeline"])  # grain's worker processes read absl flags
    print(f"batch {args.batch} x {args.seq_len}, {args.seconds:.0f} s per measurement, {os.cpu_count()} cores")
    print("| what | tokens/s |")
    print("|---|---|")
    for workers in (0, 2):
        rate, _ = pipeline_tokens_per_s(workers, args.batch, args.seq_len, args.seconds)
        print(f"| pipeline, {workers} workers | {rate:,.0f} |", flush=True)
    rate = model_tokens_per_s(args.batch, args.seq_len, args.seconds)
    print(f"| tiny model forward+backward (jit) | {rate:,.0f} |")


if __name__ == "__main__":
    main()
