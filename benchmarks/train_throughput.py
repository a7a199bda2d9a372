"""Train-step throughput and peak memory: mpt-jax against transformers' MptForCausalLM + torch AdamW.

    python benchmarks/train_throughput.py --dtype=float32 [--model=125m] [--batch=4] [--seq_len=512]
    python benchmarks/train_throughput.py --dtype=bfloat16
    python benchmarks/train_throughput.py --remat_table [--dtype=float32]
    python benchmarks/train_throughput.py --gemm [--dtype=bfloat16]
    python benchmarks/train_throughput.py --reuse_table [--dtype=bfloat16]

Each side runs full optimizer steps (forward, backward, gradient clipping, AdamW) on the same random
batch in a process of its own, so that each one's peak resident memory (``ru_maxrss``: the
framework, the compile, the weights, the optimizer state and the activations) is its own. The two
sides alternate over ``--repeats`` rounds (this machine's speed wanders by 10-20% over minutes);
each round gives a ratio of the two sides' median step times, and the table reports the median
ratio. ``--dtype=bfloat16`` runs each side at its best bfloat16: ``model.dtype=bfloat16`` here
(float32 master weights, optimizer and loss), ``torch.autocast("cpu", dtype=torch.bfloat16)``
there. MFU is against this CPU's matmul ceiling at that precision, measured in the same run.

``--remat_table`` runs only mpt-jax, once per remat policy, and reports each one's step time and
peak memory against the no-remat step.

``--gemm`` times the step's own matrix products ([tokens, in] x [in, out] of the four linear layers
and the head's chunk of logits) as one torch.mm and as one jitted XLA dot at ``--dtype``
(bfloat16 inputs, float32 accumulation on both sides), alternating, in one process: the ceiling
each framework's matmul library puts on the step.

``--reuse_table`` runs only mpt-jax, with and without ``host_memory.reuse_step_memory`` (which the
trainer applies, and the comparison's mpt-jax side too unless ``--no_reuse``), and reports each
one's step time, page faults per step and peak memory.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SHAPES = {
    "tiny": dict(d_model=256, n_heads=4, n_layers=4, vocab_size=8256),
    "125m": dict(d_model=768, n_heads=12, n_layers=12, vocab_size=50432),
}
LR, BETAS, EPS, CLIP = 1e-4, (0.9, 0.95), 1e-8, 1.0


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def tokens_for(args) -> np.ndarray:
    vocab = SHAPES[args.model]["vocab_size"]
    return np.random.default_rng(0).integers(0, vocab, (args.batch, args.seq_len)).astype(np.int32)


def host_cpu_ticks() -> list[int] | None:
    """The host's CPU time so far, in ticks, as /proc/stat's first line counts it (user, nice,
    system, idle, iowait, irq, softirq, steal); None where there is no /proc/stat."""
    try:
        with open("/proc/stat") as f:
            return [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None


def stolen_share(before: list[int] | None, after: list[int] | None) -> float | None:
    """The share of the host's CPU time that the hypervisor gave to other machines between two
    readings (steal): on a shared VM it lengthens a step without any change in the step's work."""
    if before is None or after is None or sum(after) == sum(before):
        return None
    return (after[7] - before[7]) / (sum(after) - sum(before))


def run_steps(step, n: int) -> dict[str, list]:
    """Seconds, page faults (minor: memory the kernel maps and zeroes), kernel CPU seconds and the
    VM's stolen share of each of n steps after one warm-up/compile step; every step's loss."""
    losses = [step()]
    times, faults, system, stolen = [], [], [], []
    for _ in range(n):
        before, ticks = resource.getrusage(resource.RUSAGE_SELF), host_cpu_ticks()
        start = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_SELF)
        faults.append(after.ru_minflt - before.ru_minflt)
        system.append(after.ru_stime - before.ru_stime)
        stolen.append(stolen_share(ticks, host_cpu_ticks()))
    return {"times": times, "losses": losses, "faults": faults, "system": system, "stolen": stolen}


def jax_side(args) -> dict:
    import jax
    import jax.numpy as jnp

    from mpt_jax import MPTConfig, host_memory, optim, steps

    # As `python -m mpt_jax.train` does, before any jax computation.
    reuse = False if args.no_reuse else host_memory.reuse_step_memory()
    cfg = MPTConfig(max_seq_len=args.seq_len, dtype=args.dtype, remat_policy=args.remat, **SHAPES[args.model])
    opt_cfg = optim.optimizer_config(
        name="decoupled_adamw", lr=LR, b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=0.0, grad_clip_norm=CLIP
    )
    sched_cfg = optim.schedule_config(name="constant")
    optimizer = optim.make_optimizer(opt_cfg, sched_cfg, max_steps=1000)
    schedule = optim.make_schedule(sched_cfg, lr=LR, max_steps=1000)
    tokens = tokens_for(args)
    batch = {
        "tokens": jnp.asarray(tokens),
        "segment_ids": jnp.ones(tokens.shape, jnp.int32),
        "positions": jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape),
        "loss_mask": jnp.ones(tokens.shape, jnp.int32),
    }
    fn = jax.jit(
        lambda s, b: steps.train_step(s, b, cfg=cfg, optimizer=optimizer, schedule=schedule), donate_argnums=(0,)
    )
    # Compiled before the state exists, so that the compiler's working memory and the state are
    # not held at once (torch has no compile step to keep apart).
    abstract = jax.eval_shape(lambda: steps.init_state(cfg, optimizer, jax.random.key(0)))
    fn = fn.lower(abstract, batch).compile(compiler_options=steps.train_compiler_options(cfg))
    host_memory.release_free_memory()  # as the trainer does after its compiling first step
    holder = {"state": steps.init_state(cfg, optimizer, jax.random.key(0))}
    host_memory.release_free_memory()  # as the trainer does once the state exists

    def step() -> float:
        holder["state"], m = fn(holder["state"], batch)
        return float(m["loss"])

    return {**run_steps(step, args.steps), "reuse": reuse}


def torch_side(args) -> dict:
    import contextlib

    import torch
    from transformers import MptConfig, MptForCausalLM

    torch.manual_seed(0)
    config = MptConfig(max_seq_len=args.seq_len, **SHAPES[args.model])
    model = MptForCausalLM(config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0)
    t = torch.as_tensor(tokens_for(args).astype(np.int64))
    autocast = (
        (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.dtype == "bfloat16" else contextlib.nullcontext
    )

    def step() -> float:
        with autocast():
            loss = model(t, labels=t).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    return {**run_steps(step, args.steps), "threads": torch.get_num_threads(), "version": torch.__version__}


def child(args) -> None:
    result = jax_side(args) if args.side == "jax" else torch_side(args)
    result["peak_rss"] = peak_rss_bytes()
    print("RESULT " + json.dumps(result), flush=True)


def spawn(args, side: str, remat: str | None = None, reuse: bool | None = None) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), f"--side={side}", f"--model={args.model}"]
    cmd += [f"--dtype={args.dtype}", f"--batch={args.batch}", f"--seq_len={args.seq_len}", f"--steps={args.steps}"]
    cmd += [f"--remat={remat or args.remat}"]
    if reuse is None:
        reuse = not args.no_reuse
    if not reuse:
        cmd += ["--no_reuse"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode or not lines:
        raise RuntimeError(f"{side} side failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def alternate(variants: list, run, repeats: int) -> dict:
    """{variant: [run(variant, round) for each round]}, the order reversed every other round, so
    that the machine's drift over minutes falls on every variant alike."""
    runs = {v: [] for v in variants}
    for r in range(repeats):
        for v in variants if r % 2 == 0 else variants[::-1]:
            runs[v].append(run(v, r))
    return runs


def matmul_ceiling(dtype: str, n: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of a jitted square matmul at ``dtype`` (bfloat16 inputs accumulate in float32, as the
    model's linears do): this CPU's practical peak for MFU."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    f = jax.jit(lambda x: jnp.dot(x, x, preferred_element_type=jnp.float32))
    f(a).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        f(a).block_until_ready()
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def gemm_table(args) -> None:
    """GFLOP/s of torch.mm and of XLA on the step's products, forward and backward, alternating.

    XLA's side is jitted ``ops`` code (``ops._dot``, ``ops._weight_grad``): the forward x @ w, the
    input gradient g @ w^T and the weight gradient x^T g as ``ops.matmul`` computes them, each
    accumulated in float32; torch's the same three products with ``torch.mm`` on transposed views.
    Each timed run follows an untimed one of the same side, so that each library's threads are
    awake, as inside a step, not waking up after the other library's turn."""
    import jax
    import jax.numpy as jnp
    import torch

    from mpt_jax import ops
    from mpt_jax.loss import chunk_length

    shape = SHAPES[args.model]
    d, v, n = shape["d_model"], shape["vocab_size"], args.batch * args.seq_len
    rows = args.batch * chunk_length(args.batch, args.seq_len - 1, v)
    products = {
        "Wqkv": (n, d, 3 * d),
        "out_proj": (n, d, d),
        "up_proj": (n, d, 4 * d),
        "down_proj": (n, 4 * d, d),
        f"head ({rows} rows)": (rows, d, v),
    }
    dtype = getattr(torch, args.dtype)
    xla_forms = {  # the products of ops.matmul's forward and backward
        "x w": jax.jit(lambda x, w, g: ops._dot(x, w, (1, 0))),
        "g w^T": jax.jit(lambda x, w, g: ops._dot(g, w, (1, 1))),
        "x^T g": jax.jit(lambda x, w, g: ops._weight_grad(x, g)),
    }
    runs = args.repeats * 3
    print(f"{args.model}, {args.dtype}: GFLOP/s of one product, median of {runs} alternating runs")
    print("| product [m, k] x [k, n] | form | torch.mm | XLA | XLA / torch |")
    print("|---|---|---|---|---|")
    for name, (m, k, n_out) in products.items():
        a, b, c = torch.randn(m, k).to(dtype), torch.randn(k, n_out).to(dtype), torch.randn(m, n_out).to(dtype)
        x, w, g = (jnp.asarray(t.float().numpy(), args.dtype) for t in (a, b, c))
        torch_forms = {"x w": (a, b), "g w^T": (c, b.T), "x^T g": (a.T, c)}
        for form, fn in xla_forms.items():
            sides = {
                "torch": functools.partial(torch.mm, *torch_forms[form]),
                "xla": lambda fn=fn, operands=(x, w, g): fn(*operands).block_until_ready(),
            }
            times = {side: [] for side in sides}
            for run in sides.values():
                run()
            for r in range(runs):
                for side in sides if r % 2 == 0 else list(sides)[::-1]:
                    sides[side]()  # untimed: each side's threads awake, as inside a step
                    start = time.perf_counter()
                    sides[side]()
                    times[side].append(time.perf_counter() - start)
            rate = {side: 2 * m * k * n_out / statistics.median(ts) / 1e9 for side, ts in times.items()}
            print(
                f"| {name} [{m}, {k}] x [{k}, {n_out}] | {form} | {rate['torch']:.0f} | {rate['xla']:.0f} "
                f"| {rate['xla'] / rate['torch']:.2f} |",
                flush=True,
            )


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def percent(shares: list[float | None]) -> str:
    """The median of the steps' stolen shares, as a percentage ("n/a" off Linux)."""
    known = [s for s in shares if s is not None]
    return f"{statistics.median(known):.0%}" if known else "n/a"


def comparison(args) -> None:
    from benchmarks.forward import cpu_name
    from mpt_jax import MPTConfig, metrics

    cfg = MPTConfig(max_seq_len=args.seq_len, **SHAPES[args.model])
    n_tokens = args.batch * args.seq_len
    fpt = metrics.flops_per_token(cfg, args.seq_len)

    def run(side: str, r: int) -> dict:
        result = spawn(args, side)
        print(
            f"  round {r}: {side:5s} median step {statistics.median(result['times']):.3f} s, "
            f"peak {gib(result['peak_rss'])}, stolen {percent(result['stolen'])}",
            file=sys.stderr,
            flush=True,
        )
        return result

    runs = alternate(["jax", "torch"], run, args.repeats)
    ceiling = matmul_ceiling(args.dtype)
    step = {side: [statistics.median(run["times"]) for run in rs] for side, rs in runs.items()}
    ratios = [t / j for j, t in zip(step["jax"], step["torch"], strict=True)]
    peak = {side: max(run["peak_rss"] for run in rs) for side, rs in runs.items()}
    rate = {side: n_tokens / statistics.median(ts) for side, ts in step.items()}
    torch_info = runs["torch"][0]
    print(
        f"machine: {cpu_name()}, {os.cpu_count()} cores; torch {torch_info['version']} "
        f"({torch_info['threads']} threads); {args.dtype} matmul ceiling {ceiling / 1e9:.0f} GFLOP/s"
    )
    print(
        f"{args.model}, {args.dtype}, batch {args.batch} x {args.seq_len}, remat {args.remat}: "
        f"{args.repeats} alternating rounds of {args.steps} steps, each side in its own process"
    )
    print(
        "| side | tokens/s (median) | MFU | step s (each round) | stolen by the VM | peak memory | loss after steps |"
    )
    print("|---|---|---|---|---|---|---|")
    for side, name in (("jax", "mpt-jax"), ("torch", "transformers + torch")):
        each = ", ".join(f"{t:.3f}" for t in step[side])
        stolen = ", ".join(percent(run["stolen"]) for run in runs[side])
        print(
            f"| {name} | {rate[side]:,.0f} | {rate[side] * fpt / ceiling:.1%} | {each} | {stolen} | "
            f"{gib(peak[side])} | {runs[side][0]['losses'][-1]:.4f} |"
        )
    print(
        f"speed-up (median of rounds' ratios): {statistics.median(ratios):.2f}x "
        f"(rounds: {', '.join(f'{x:.2f}' for x in ratios)}); peak memory ratio mpt-jax / torch: "
        f"{peak['jax'] / peak['torch']:.2f}"
    )


def remat_table(args) -> None:
    from mpt_jax.config import REMAT_POLICIES

    policies = list(REMAT_POLICIES)
    runs = alternate(policies, lambda p, r: spawn(args, "jax", remat=p), args.repeats)
    step = {p: statistics.median(statistics.median(run["times"]) for run in rs) for p, rs in runs.items()}
    peak = {p: max(run["peak_rss"] for run in rs) for p, rs in runs.items()}
    print(f"{args.model}, {args.dtype}, batch {args.batch} x {args.seq_len}, {args.repeats} alternating rounds")
    print("| remat_policy | step s (median) | time vs none | peak memory | memory vs none |")
    print("|---|---|---|---|---|")
    for p in policies:
        print(
            f"| {p} | {step[p]:.3f} | {step[p] / step['none']:.2f}x | {gib(peak[p])} | {peak[p] / peak['none']:.2f}x |"
        )


def reuse_table(args) -> None:
    """mpt-jax alone, with and without ``host_memory.reuse_step_memory``, alternating processes."""
    runs = alternate([True, False], lambda reuse, r: spawn(args, "jax", reuse=reuse), args.repeats)
    step = {k: [statistics.median(run["times"]) for run in rs] for k, rs in runs.items()}
    ratios = [off / on for on, off in zip(step[True], step[False], strict=True)]
    print(
        f"{args.model}, {args.dtype}, batch {args.batch} x {args.seq_len}, remat {args.remat}: "
        f"{args.repeats} alternating rounds of {args.steps} steps, each run in its own process"
    )
    print(
        "| host memory | applied | step s (each round) | page faults / step | kernel CPU s / step | peak memory | loss |"
    )
    print("|---|---|---|---|---|---|---|")
    for reuse, name in ((False, "default"), (True, "reuse_step_memory")):
        rs = runs[reuse]
        faults = statistics.median(f for run in rs for f in run["faults"])
        system = statistics.median(t for run in rs for t in run["system"])
        print(
            f"| {name} | {all(run['reuse'] for run in rs)} | {', '.join(f'{t:.3f}' for t in step[reuse])} | "
            f"{faults:,.0f} | {system:.2f} | {gib(max(run['peak_rss'] for run in rs))} | "
            f"{rs[0]['losses'][-1]:.6f} |"
        )
    print(
        f"speed-up (median of rounds' ratios): {statistics.median(ratios):.2f}x ({', '.join(f'{x:.2f}' for x in ratios)})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="125m", choices=sorted(SHAPES))
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per process, after one warm-up step")
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds (one process per side each)")
    parser.add_argument("--remat", default="none", help="mpt-jax's model.remat_policy")
    parser.add_argument("--remat_table", action="store_true", help="mpt-jax only: every remat policy")
    parser.add_argument("--gemm", action="store_true", help="the step's products: torch.mm against XLA's dot")
    parser.add_argument("--reuse_table", action="store_true", help="mpt-jax only: with and without reuse_step_memory")
    parser.add_argument("--no_reuse", action="store_true", help="mpt-jax without host_memory.reuse_step_memory")
    parser.add_argument("--side", choices=("jax", "torch"), help=argparse.SUPPRESS)  # a child process
    args = parser.parse_args()
    if args.side:
        child(args)
    elif args.remat_table:
        remat_table(args)
    elif args.gemm:
        gemm_table(args)
    elif args.reuse_table:
        reuse_table(args)
    else:
        comparison(args)


if __name__ == "__main__":
    main()
