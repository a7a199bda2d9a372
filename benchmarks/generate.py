"""Generation throughput: mpt-jax's Generator against transformers' MptForCausalLM.generate, same CPU.

    python benchmarks/generate.py [--shape=125m] [--prompt=128] [--new=128] [--batches=1,8] [--repeats=3]
                                  [--dtypes=float32,bfloat16]

One random model of the given shape, saved by transformers and loaded by mpt_jax.hf (the same
weights on both sides). For each batch size and dtype, both sides generate ``--new`` tokens
greedily (no early stop) after a ``--prompt``-token prompt; runs are interleaved (ours, theirs,
ours, ...) after a warm-up and the median is reported: generated tokens/s, and time to first token
(a generation of one token). Batch 1 is also compared with the memory-bandwidth bound: the bytes
read per token (weights + the average KV cache) over this machine's copy bandwidth, measured in
the same run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.forward import cpu_name  # noqa: E402
from mpt_jax.generate import Generator  # noqa: E402
from mpt_jax.hf import load_hf  # noqa: E402

SHAPES = {
    "tiny": dict(d_model=256, n_heads=4, n_layers=4, vocab_size=8256),
    "125m": dict(d_model=768, n_heads=12, n_layers=12, vocab_size=50432),
}
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def copy_bandwidth(nbytes: int = 512 * 2**20, repeats: int = 5) -> float:
    """Bytes/s of a large numpy copy (read + write counted as the bytes read, as decoding reads)."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best  # each byte is read once and written once


def hf_model(shape: dict, folder: str, max_seq_len: int):
    from transformers import MptConfig, MptForCausalLM

    torch.manual_seed(0)
    model = MptForCausalLM(MptConfig(**shape, max_seq_len=max_seq_len)).eval()
    model.save_pretrained(folder)
    return model


def hf_generate(model, prompts: np.ndarray, new: int) -> float:
    ids = torch.as_tensor(prompts)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    elapsed = time.perf_counter() - start
    assert out.shape[1] == prompts.shape[1] + new
    return elapsed


def our_generate(gen: Generator, prompts: np.ndarray, new: int) -> float:
    start = time.perf_counter()
    out = gen.generate(prompts.tolist(), max_new_tokens=new, temperature=0.0, stop_token_ids=[])
    elapsed = time.perf_counter() - start
    assert all(len(c.token_ids) == new for c in out)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=tuple(SHAPES), default="125m")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    shape = SHAPES[args.shape]
    max_seq_len = args.prompt + args.new
    folder = tempfile.mkdtemp(prefix="gen_bench_")
    hf = hf_model(shape, folder, max_seq_len)
    bandwidth = copy_bandwidth()
    print(f"{cpu_name()}; jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads)")
    print(f"shape {args.shape}: prompt {args.prompt}, {args.new} new tokens, greedy")
    print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    rng = np.random.default_rng(0)
    rows = []
    for dtype in args.dtypes.split(","):
        cfg, params = load_hf(folder, dtype=dtype)
        cfg = cfg.replace(dtype=dtype)
        params = jax.tree.map(jnp.asarray, params)
        model = hf.to(TORCH_DTYPES[dtype])
        for batch in (int(b) for b in args.batches.split(",")):
            prompts = rng.integers(0, shape["vocab_size"], (batch, args.prompt))
            gen = Generator(cfg, params, max_batch=batch)
            our_generate(gen, prompts, args.new)  # compile
            our_generate(gen, prompts, 1)
            hf_generate(model, prompts, 2)  # warm-up
            ours, theirs, ttft_ours, ttft_theirs = [], [], [], []
            for _ in range(args.repeats):
                ours.append(our_generate(gen, prompts, args.new))
                theirs.append(hf_generate(model, prompts, args.new))
                ttft_ours.append(our_generate(gen, prompts, 1))
                ttft_theirs.append(hf_generate(model, prompts, 1))
            o, t = statistics.median(ours), statistics.median(theirs)
            row = dict(
                dtype=dtype,
                batch=batch,
                ours=batch * args.new / o,
                theirs=batch * args.new / t,
                ttft_ours=statistics.median(ttft_ours),
                ttft_theirs=statistics.median(ttft_theirs),
            )
            if batch == 1:  # weights once per token, plus the cache read at the average length
                weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
                avg_len = args.prompt + args.new / 2
                cache_bytes = 2 * cfg.n_layers * avg_len * cfg.d_model * jnp.dtype(cfg.dtype).itemsize
                row["bound"] = bandwidth / (weight_bytes + cache_bytes)
            rows.append(row)
            print(
                f"{dtype:>9s} batch {batch:>2d}: mpt-jax {row['ours']:8.1f} tok/s, transformers "
                f"{row['theirs']:8.1f} tok/s ({row['ours'] / row['theirs']:.2f}x); first token "
                f"{row['ttft_ours'] * 1e3:.0f} ms vs {row['ttft_theirs'] * 1e3:.0f} ms"
                + (
                    f"; bandwidth bound {row['bound']:.0f} tok/s ({row['ours'] / row['bound']:.0%})"
                    if "bound" in row
                    else ""
                )
            )
    print(
        "\n| dtype | batch | mpt-jax tok/s | transformers tok/s | speed-up | TTFT mpt-jax | TTFT transformers | batch-1 bound |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        bound = f"{r['bound']:.0f} tok/s ({r['ours'] / r['bound']:.0%})" if "bound" in r else ""
        print(
            f"| {r['dtype']} | {r['batch']} | {r['ours']:.1f} | {r['theirs']:.1f} | {r['ours'] / r['theirs']:.2f}x | "
            f"{r['ttft_ours'] * 1e3:.0f} ms | {r['ttft_theirs'] * 1e3:.0f} ms | {bound} |"
        )
    print("\nbest dtype each side:")
    for batch in sorted({r["batch"] for r in rows}):
        ours = max((r for r in rows if r["batch"] == batch), key=lambda r: r["ours"])
        theirs = max((r for r in rows if r["batch"] == batch), key=lambda r: r["theirs"])
        print(
            f"  batch {batch}: mpt-jax {ours['ours']:.1f} tok/s ({ours['dtype']}), transformers "
            f"{theirs['theirs']:.1f} tok/s ({theirs['dtype']}): {ours['ours'] / theirs['theirs']:.2f}x"
        )


if __name__ == "__main__":
    main()
