"""Forward-pass throughput: mpt-jax against transformers' MptForCausalLM on the same CPU.

Both models hold the same weights (converted with mpt_jax.hf); the script checks that their logits
agree, then times the forward pass (logits for every position, float32, no KV cache) and prints a
table of tokens/s and the ratio. Run:

    python benchmarks/forward.py [--configs=tiny,125m] [--batch=4] [--length=512] [--repeats=5]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mpt_jax import MPT  # noqa: E402
from mpt_jax.hf import load_hf  # noqa: E402

SHAPES = {
    "tiny": dict(d_model=256, n_heads=4, n_layers=4, vocab_size=8192),
    "125m": dict(d_model=768, n_heads=12, n_layers=12, vocab_size=50432),
    "350m": dict(d_model=1024, n_heads=16, n_layers=24, vocab_size=50432),
}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up (and compile)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def run(name: str, batch: int, length: int, repeats: int) -> dict:
    from transformers import MptConfig as HFConfig
    from transformers import MptForCausalLM

    shape = SHAPES[name]
    torch.manual_seed(0)
    hf_model = MptForCausalLM(HFConfig(max_seq_len=length, **shape)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf_model.save_pretrained(tmp)
        cfg, params = load_hf(tmp)
    params = jax.device_put(params)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, length))
    forward = jax.jit(lambda p, t: MPT(cfg).apply({"params": p}, t))
    jt, tt = jnp.asarray(tokens), torch.as_tensor(tokens)

    def ours():
        return forward(params, jt).block_until_ready()

    def theirs():
        with torch.inference_mode():
            return hf_model(tt).logits

    diff = float(np.abs(np.asarray(ours()) - theirs().numpy()).max())
    t_jax, t_torch = best_of(ours, repeats), best_of(theirs, repeats)
    n = batch * length
    return dict(
        name=name,
        params=sum(p.numel() for p in hf_model.parameters()),
        diff=diff,
        jax=n / t_jax,
        torch=n / t_torch,
        ratio=t_torch / t_jax,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="tiny,125m")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads)"
    )
    print(f"forward, float32, batch {args.batch} x length {args.length}, best of {args.repeats}")
    print("| model | params | max abs logit diff | mpt-jax tokens/s | transformers tokens/s | speed-up |")
    print("|---|---|---|---|---|---|")
    for name in args.configs.split(","):
        r = run(name, args.batch, args.length, args.repeats)
        print(
            f"| {r['name']} | {r['params'] / 1e6:.1f}M | {r['diff']:.1e} | {r['jax']:,.0f} | {r['torch']:,.0f} | "
            f"{r['ratio']:.2f}x |"
        )


if __name__ == "__main__":
    main()
