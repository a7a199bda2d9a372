"""Train-step throughput: mpt-jax against transformers' MptForCausalLM + torch.optim.AdamW, same CPU.

    python benchmarks/train_throughput.py [--models=tiny,125m] [--seq_len=512] [--batch=4] [--steps=3]

For each model shape, both frameworks run full optimizer steps (forward, backward, AdamW update)
in float32 on the same random batch; the table gives tokens/s, the speed-up, and MFU against this
CPU's float32 matmul ceiling measured in the same run (a jitted 2048 x 2048 jnp.dot).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.forward import cpu_name  # noqa: E402
from mpt_jax import MPTConfig, metrics, optim, steps  # noqa: E402

SHAPES = {
    "tiny": dict(d_model=256, n_heads=4, n_layers=4, vocab_size=8256),
    "125m": dict(d_model=768, n_heads=12, n_layers=12, vocab_size=50432),
}


def matmul_ceiling(n: int = 2048, repeats: int = 10) -> float:
    """Float32 FLOP/s of a jitted square matmul: the practical peak of this CPU for MFU."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        f(a).block_until_ready()
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def timed(fn, steps_: int) -> float:
    fn()  # warm-up / compile
    start = time.perf_counter()
    for _ in range(steps_):
        fn()
    return (time.perf_counter() - start) / steps_


def jax_step_time(cfg: MPTConfig, tokens: np.ndarray, n: int) -> float:
    opt_cfg = optim.optimizer_config(name="decoupled_adamw", lr=1e-4, weight_decay=0.0, grad_clip_norm=1.0)
    sched_cfg = optim.schedule_config(name="constant")
    optimizer = optim.make_optimizer(opt_cfg, sched_cfg, max_steps=1000)
    schedule = optim.make_schedule(sched_cfg, lr=1e-4, max_steps=1000)
    state = steps.init_state(cfg, optimizer, jax.random.key(0))
    batch = {
        "tokens": jnp.asarray(tokens),
        "segment_ids": jnp.ones(tokens.shape, jnp.int32),
        "positions": jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape),
        "loss_mask": jnp.ones(tokens.shape, jnp.int32),
    }
    fn = jax.jit(
        lambda s, b: steps.train_step(s, b, cfg=cfg, optimizer=optimizer, schedule=schedule), donate_argnums=(0,)
    )
    holder = {"state": state}

    def step():
        holder["state"], m = fn(holder["state"], batch)
        jax.block_until_ready(m["loss"])

    return timed(step, n)


def torch_step_time(shape: dict, tokens: np.ndarray, n: int) -> float:
    from transformers import MptConfig, MptForCausalLM

    torch.manual_seed(0)
    model = MptForCausalLM(MptConfig(max_seq_len=tokens.shape[1], **shape)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    t = torch.as_tensor(tokens)

    def step():
        loss = model(t, labels=t).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return timed(step, n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny,125m")
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    ceiling = matmul_ceiling()
    print(
        f"machine: {cpu_name()}, {os.cpu_count()} cores; jax {jax.__version__}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads); float32 matmul ceiling {ceiling / 1e9:.0f} GFLOP/s"
    )
    print(
        f"train step (forward + backward + AdamW), float32, batch {args.batch} x {args.seq_len}, mean of {args.steps}"
    )
    print("| model | params | mpt-jax tokens/s | mpt-jax MFU | transformers+torch tokens/s | torch MFU | speed-up |")
    print("|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for name in args.models.split(","):
        shape = SHAPES[name]
        cfg = MPTConfig(max_seq_len=args.seq_len, **shape)
        tokens = rng.integers(0, cfg.vocab_size, (args.batch, args.seq_len)).astype(np.int32)
        n_tokens = args.batch * args.seq_len
        fpt = metrics.flops_per_token(cfg, args.seq_len)
        t_jax = jax_step_time(cfg, tokens, args.steps)
        t_torch = torch_step_time(shape, tokens.astype(np.int64), args.steps)
        r_jax, r_torch = n_tokens / t_jax, n_tokens / t_torch
        print(
            f"| {name} | {metrics.matmul_params(cfg) / 1e6:.1f}M | {r_jax:,.0f} | {r_jax * fpt / ceiling:.1%} | "
            f"{r_torch:,.0f} | {r_torch * fpt / ceiling:.1%} | {t_torch / t_jax:.2f}x |",
            flush=True,
        )


if __name__ == "__main__":
    main()
