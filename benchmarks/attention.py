"""Attention throughput on one GPU: Pallas flash attention against XLA and cuDNN.

Causal attention with ALiBi at 16k tokens per batch (batch = 16384 // T), for T in {2048, 8192},
head dims 128 (MPT-7B) and 112 (MPT-30B), 32 and 64 heads. Backends:

  pallas        attend(impl="pallas"): our kernels, ALiBi computed in the kernel
  xla           attend(impl="xla"): jnp reference, materializes [B, H, T, T] scores
  cudnn+bias    attend(impl="cudnn"): cuDNN flash attention with a materialized [1, H, T, T] bias
  cudnn-nobias  cuDNN causal attention without ALiBi: the no-ALiBi ceiling (not the same math)

Before timing, pallas is checked against xla on one small case (output and gradients, max error
printed). Each cell is compiled, warmed up, then timed over --iters calls (median, with
block_until_ready); an error in one cell (e.g. out of memory) is reported in that cell and the
table goes on. TFLOP/s count useful FLOPs: forward 4*B*H*T*T*D / 2 for causal, forward+backward
3.5x that (FlashAttention-2's convention: the backward does 2.5x the forward's matmuls).

    python benchmarks/attention.py                  # the full table, on a GPU
    python benchmarks/attention.py --smoke          # tiny shapes, interpret mode, no cuDNN (CPU)
    python benchmarks/attention.py --seq-lens=2048 --heads=32 --impls=pallas,cudnn-nobias \\
        --pallas-blocks=64,64,64,64,64,64,4,4,2 --pallas-blocks=128,64,64,64,64,64,8,8,3
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mpt_jax.attention import alibi_slopes, attend  # noqa: E402
from mpt_jax.attention.pallas_gpu import BlockSizes  # noqa: E402

IMPLS = ("pallas", "xla", "cudnn+bias", "cudnn-nobias")
MODES = ("fwd", "fwd+bwd")


@dataclasses.dataclass
class Cell:
    """One measured (shape, backend, mode): TFLOP/s and ms, or the error that stopped it."""

    seq_len: int
    batch: int
    heads: int
    head_dim: int
    impl: str
    mode: str
    ms: float | None = None
    tflops: float | None = None
    error: str | None = None
    note: str = ""


def device_name() -> str:
    dev = jax.devices()[0]
    return f"{getattr(dev, 'device_kind', dev.platform)} ({dev.platform}, jax {jax.__version__})"


def attention_flops(batch: int, heads: int, seq_len: int, head_dim: int, mode: str, causal: bool = True) -> float:
    fwd = 4.0 * batch * heads * seq_len * seq_len * head_dim * (0.5 if causal else 1.0)
    return fwd if mode == "fwd" else 3.5 * fwd


def parse_blocks(spec: str) -> BlockSizes:
    """'bq,bk,bq_dq,bk_dq,bq_dkv,bk_dkv[,warps,warps_bwd,stages]' -> BlockSizes."""
    vals = [int(x) for x in spec.split(",")]
    names = [f.name for f in dataclasses.fields(BlockSizes)]
    if not 6 <= len(vals) <= len(names):
        raise argparse.ArgumentTypeError(f"--pallas-blocks wants 6 to {len(names)} integers ({','.join(names)})")
    return BlockSizes(**dict(zip(names[: len(vals)], vals, strict=True)))


def attention_fn(impl: str, *, slopes, interpret: bool | None, block_sizes: BlockSizes | None):
    """q, k, v -> out for one backend (causal; ALiBi except for the no-bias ceiling)."""
    if impl == "pallas":
        return lambda q, k, v: attend(
            q, k, v, alibi_slopes=slopes, impl="pallas", interpret=interpret, block_sizes=block_sizes
        )
    if impl == "xla":
        return lambda q, k, v: attend(q, k, v, alibi_slopes=slopes, impl="xla")
    if impl == "cudnn+bias":
        return lambda q, k, v: attend(q, k, v, alibi_slopes=slopes, impl="cudnn")
    if impl == "cudnn-nobias":
        return lambda q, k, v: attend(q, k, v, alibi_slopes=None, impl="cudnn")
    raise ValueError(f"unknown impl {impl!r}; expected one of {IMPLS}")


def compiled(fn, mode: str):
    """A jitted (q, k, v, do) -> result for the mode: the output, or the three input gradients."""
    if mode == "fwd":
        return jax.jit(lambda q, k, v, do: fn(q, k, v))

    def fwd_bwd(q, k, v, do):
        out, vjp = jax.vjp(fn, q, k, v)
        return vjp(do)

    return jax.jit(fwd_bwd)


def time_ms(fn, args, warmup: int, iters: int) -> float:
    jax.block_until_ready(fn(*args))  # compile
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def inputs(batch, seq_len, heads, head_dim, dtype, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    shape = (batch, seq_len, heads, head_dim)
    return tuple(jax.random.normal(key, shape, jnp.float32).astype(dtype) for key in keys)


def short_error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ").replace("|", "/")
    if "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower():
        return "OOM"
    return text[:120]


# ------------------------------------------------------------------------------------------------
# Parts of the benchmark (each a function: the 1b train-step comparison is a separate part).


def verify(args) -> dict[str, float]:
    """pallas vs xla on one small case (GQA, odd length, segments): max |difference| per output."""
    batch, seq_len, heads, kv_heads, head_dim = (1, 77, 4, 2, 112) if args.smoke else (2, 1000, 8, 2, 112)
    dtype = jnp.dtype(args.dtype)
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((batch, seq_len, heads, head_dim)), dtype)
    k = jnp.asarray(rng.standard_normal((batch, seq_len, kv_heads, head_dim)), dtype)
    v = jnp.asarray(rng.standard_normal((batch, seq_len, kv_heads, head_dim)), dtype)
    do = jnp.asarray(rng.standard_normal(q.shape), dtype)
    seg = jnp.asarray(np.sort(rng.integers(0, 3, (batch, seq_len)), axis=1), jnp.int32)
    slopes = jnp.asarray(alibi_slopes(heads))

    def run(impl):
        fn = lambda q, k, v: attend(  # noqa: E731
            q,
            k,
            v,
            alibi_slopes=slopes,
            segment_ids=seg,
            impl=impl,
            interpret=args.interpret if impl == "pallas" else None,
        )
        out, vjp = jax.vjp(fn, q, k, v)
        return (out, *vjp(do))

    got = jax.jit(lambda: run("pallas"))()
    ref = jax.jit(lambda: run("xla"))()
    errors = {}
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref, strict=True):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        errors[name] = float(np.abs(a - b).max())
        errors[name + "_rel"] = errors[name] / float(np.abs(b).max())
    print(
        f"verify pallas vs xla ({dtype.name}, B={batch} T={seq_len} H={heads} Hkv={kv_heads} D={head_dim}, "
        "causal, ALiBi, 3 segments): "
        + ", ".join(
            f"{n} max|diff| {errors[n]:.2e} ({errors[n + '_rel']:.1e} of max|ref|)" for n in ("out", "dq", "dk", "dv")
        )
    )
    tol = 2e-2 if dtype != jnp.float32 else 1e-4
    bad = [n for n in ("out", "dq", "dk", "dv") if not errors[n + "_rel"] <= tol]
    if bad:
        raise SystemExit(f"verify: pallas differs from xla beyond {tol} (relative) in {bad}")
    return errors


def bench_attention(args) -> list[Cell]:
    """The TFLOP/s table: every (T, head_dim, heads) x backend x mode, one Cell each."""
    cells = []
    dtype = jnp.dtype(args.dtype)
    for seq_len in args.seq_lens:
        batch = max(1, args.tokens // seq_len)
        for head_dim in args.head_dims:
            for heads in args.heads:
                q, k, v, do = inputs(batch, seq_len, heads, head_dim, dtype)
                slopes = jnp.asarray(alibi_slopes(heads))
                for impl in args.impls:
                    for mode in args.modes:
                        cell = Cell(seq_len, batch, heads, head_dim, impl, mode)
                        configs = args.pallas_blocks if impl == "pallas" and args.pallas_blocks else [None]
                        best = None
                        for blocks in configs:
                            try:
                                fn = attention_fn(impl, slopes=slopes, interpret=args.interpret, block_sizes=blocks)
                                ms = time_ms(compiled(fn, mode), (q, k, v, do), args.warmup, args.iters)
                                if best is None or ms < best[0]:
                                    best = (ms, blocks)
                            except Exception as exc:  # one cell's failure (OOM, unsupported) must not stop the table
                                cell.error = short_error(exc)
                                if args.verbose:
                                    traceback.print_exc()
                        if best is not None:
                            cell.ms, cell.error = best[0], None
                            cell.tflops = (
                                attention_flops(batch, heads, seq_len, head_dim, mode) / (best[0] * 1e-3) / 1e12
                            )
                            if len(configs) > 1:
                                b = best[1]
                                cell.note = f"blocks {b.block_q}/{b.block_k},{b.block_q_dq}/{b.block_k_dq},"
                                cell.note += (
                                    f"{b.block_q_dkv}/{b.block_k_dkv} w{b.num_warps}/{b.num_warps_bwd} s{b.num_stages}"
                                )
                        shown = f"{cell.tflops:7.2f} TFLOP/s {cell.ms:9.3f} ms" if cell.ms else cell.error
                        print(
                            f"T={seq_len:5d} B={batch:2d} H={heads} D={head_dim} {impl:12s} {mode:7s}: {shown}",
                            flush=True,
                        )
                        cells.append(cell)
                del q, k, v, do
    return cells


def markdown_table(cells: list[Cell], device: str, dtype: str) -> str:
    """One row per (T, heads, head_dim, mode); one column per backend (TFLOP/s, or the error)."""
    impls = list(dict.fromkeys(c.impl for c in cells))
    rows = list(dict.fromkeys((c.seq_len, c.batch, c.heads, c.head_dim, c.mode) for c in cells))
    by_key = {(c.seq_len, c.batch, c.heads, c.head_dim, c.mode, c.impl): c for c in cells}
    lines = [
        f"Attention TFLOP/s on {device}, {dtype}, causal + ALiBi ({max(1, cells[0].batch * cells[0].seq_len)} tokens "
        "per batch; cudnn-nobias drops ALiBi: the ceiling)",
        "",
        "| T | batch | heads | head_dim | pass | " + " | ".join(impls) + " |",
        "|---|---|---|---|---|" + "---|" * len(impls),
    ]
    for key in rows:
        entries = []
        for impl in impls:
            c = by_key.get((*key, impl))
            if c is None:
                entries.append("")
            elif c.tflops is not None:
                entries.append(f"{c.tflops:.3g} ({c.ms:.3g} ms)" + (f" [{c.note}]" if c.note else ""))
            else:
                entries.append(c.error or "?")
        lines.append("| " + " | ".join(str(x) for x in key) + " | " + " | ".join(entries) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[Cell]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, interpret mode, no cuDNN (runs on CPU)")
    parser.add_argument("--seq-lens", type=lambda s: [int(x) for x in s.split(",")], default=[2048, 8192])
    parser.add_argument("--head-dims", type=lambda s: [int(x) for x in s.split(",")], default=[128, 112])
    parser.add_argument("--heads", type=lambda s: [int(x) for x in s.split(",")], default=[32, 64])
    parser.add_argument("--tokens", type=int, default=16384, help="tokens per batch (batch = tokens // T)")
    parser.add_argument("--impls", type=lambda s: s.split(","), default=list(IMPLS))
    parser.add_argument("--modes", type=lambda s: s.split(","), default=list(MODES))
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument(
        "--pallas-blocks",
        type=parse_blocks,
        action="append",
        default=[],
        help="pallas tile config 'bq,bk,bq_dq,bk_dq,bq_dkv,bk_dkv[,warps,warps_bwd,stages]'; repeat to "
        "try several (the best is reported); default: BlockSizes.default(head_dim)",
    )
    parser.add_argument("--interpret", action="store_true", default=None, help="Pallas interpret mode")
    parser.add_argument("--skip-verify", action="store_true")
    parser.add_argument("--skip-train", action="store_true", help="skip the train-step comparison")
    parser.add_argument("--train-config", default="1b", help="config for the train-step comparison")
    parser.add_argument("--train-seq-len", type=int, default=2048)
    parser.add_argument("--train-batch", type=int, default=4)
    parser.add_argument("--verbose", action="store_true", help="print tracebacks of failed cells")
    args = parser.parse_args(argv)
    for impl in args.impls:
        if impl not in IMPLS:
            parser.error(f"unknown impl {impl!r}; expected some of {IMPLS}")
    if args.smoke:
        args.seq_lens, args.head_dims, args.heads, args.tokens = [96], [128, 112], [2], 192
        args.impls = [i for i in args.impls if not i.startswith("cudnn")]
        args.interpret, args.iters, args.warmup = True, 2, 1
        args.pallas_blocks = args.pallas_blocks or [BlockSizes(32, 32, 32, 32, 32, 32)]
    on_gpu = jax.default_backend() == "gpu"
    if not on_gpu and any(i.startswith("cudnn") for i in args.impls):
        print("no GPU: skipping the cuDNN backends")
        args.impls = [i for i in args.impls if not i.startswith("cudnn")]
    if args.interpret is None and not on_gpu:
        args.interpret = True
    device = device_name()
    print(f"device: {device}")

    if not args.skip_verify:
        verify(args)
    cells = bench_attention(args)
    if not cells:
        raise SystemExit("no backend left to time (see --impls)")
    print()
    print(markdown_table(cells, device, args.dtype))
    if not args.skip_train:
        print()
        print(bench_train_step(args, device))
    return cells


def bench_train_step(args, device: str) -> str:
    """One optimizer step of a config (configs/1b.py; the tiny one with --smoke) per attention impl:
    tokens/s and MFU (model FLOPs per token as in docs/training.md, against the device's peak)."""
    import importlib.util
    import os
    import time

    from mpt_jax import metrics, optim, steps
    from mpt_jax.run_config import model_config

    name = "tiny" if args.smoke else args.train_config
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(name, os.path.join(root, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    seq_len = 64 if args.smoke else args.train_seq_len
    batch = 2 if args.smoke else args.train_batch
    base = model_config(config).replace(max_seq_len=max(seq_len, config.model.max_seq_len))
    optimizer = optim.make_optimizer(config.optimizer, optim.schedule_config(name="constant"), max_steps=1000)
    schedule = optim.make_schedule(optim.schedule_config(name="constant"), lr=config.optimizer.lr, max_steps=1000)
    tokens = jax.random.randint(jax.random.key(0), (batch, seq_len), 0, base.vocab_size)
    data = {
        "tokens": tokens,
        "segment_ids": jnp.ones_like(tokens),
        "positions": jnp.broadcast_to(jnp.arange(seq_len), tokens.shape),
        "loss_mask": jnp.ones_like(tokens),
    }
    peak = metrics.peak_flops_per_device()
    rows = [
        f"One train step of configs/{name}.py on {device}: batch {batch} x {seq_len}, {base.dtype} compute, "
        f"remat {base.remat_policy}, {args.iters} timed steps",
        "",
        "| attention | tokens/s | step ms | MFU |",
        "|---|---|---|---|",
    ]
    for impl in [i for i in args.impls if i in ("xla", "pallas", "cudnn")]:
        cfg = base.replace(attn_impl=impl)
        try:
            state = jax.jit(lambda r, cfg=cfg: steps.init_state(cfg, optimizer, r))(jax.random.key(1))
            step = jax.jit(
                lambda s, b, cfg=cfg: steps.train_step(s, b, cfg=cfg, optimizer=optimizer, schedule=schedule),
                donate_argnums=(0,),
            )
            for _ in range(max(1, args.warmup)):
                state, m = step(state, data)
            jax.block_until_ready(m["loss"])
            start = time.perf_counter()
            for _ in range(args.iters):
                state, m = step(state, data)
            jax.block_until_ready(m["loss"])
            dt = (time.perf_counter() - start) / args.iters
            rate = batch * seq_len / dt
            mfu = metrics.mfu(rate, metrics.flops_per_token(cfg, seq_len), 1, peak)
            rows.append(f"| {impl} | {rate:,.0f} | {dt * 1e3:.1f} | {'n/a' if mfu is None else f'{mfu:.1%}'} |")
            del state
        except Exception as e:  # noqa: BLE001 - one impl failing (OOM, lowering) must not stop the table
            rows.append(f"| {impl} | {type(e).__name__}: {str(e)[:80]} | | |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
