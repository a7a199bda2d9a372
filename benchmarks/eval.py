"""lm-evaluation-harness throughput: our ``mpt_jax`` backend against lm-eval's own ``hf`` backend, same CPU.

    python benchmarks/eval.py [--shape=125m] [--examples=300] [--batch_sizes=8] [--repeats=3] [--dtype=float32]

One random model of the given shape (transformers' MptForCausalLM with its own initialisation,
saved once with a byte-level BPE trained on the task's text), read by both backends from the same
folder. The task is a generated multiple-choice task in lm-eval's yaml format (hellaswag-like:
a context of 20-60 words, four endings of 5-20 words), written beside the model. Each backend is
built once (loading is not timed); each timed run is one ``lm_eval.simple_evaluate`` of the whole
task (lm-eval's own work, identical for both, included). The first run of each side is reported
apart (ours compiles there); then runs are interleaved (ours, theirs, ours, ...) and the median
gives examples/s. Both sides must agree on accuracy, or the numbers are not printed as a result.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.forward import cpu_name  # noqa: E402

SHAPES = {
    "tiny": dict(d_model=128, n_heads=4, n_layers=2, vocab_size=4096),
    "125m": dict(d_model=768, n_heads=12, n_layers=12, vocab_size=50432),
}
WORDS = (
    "the a of to and in is was he she it they we you for on with as at by from this that which "
    "water house river city garden table window morning evening friend mother father child teacher "
    "walked opened found carried looked turned asked said gave took made left came went stood "
    "quickly slowly quietly carefully suddenly again never always often later before after under over "
    "red green small large old new bright dark warm cold long short happy tired early late"
).split()
TASK_YAML = """task: bench_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{endings}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def sentence(rng: np.random.Generator, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS, int(rng.integers(lo, hi + 1))))


def write_task(folder: str, examples: int, seed: int = 0) -> list[str]:
    """A hellaswag-shaped multiple-choice task (yaml + jsonl) in ``folder``; returns all its text."""
    rng = np.random.default_rng(seed)
    rows = [
        dict(
            context=sentence(rng, 20, 60).capitalize() + ".",
            endings=[sentence(rng, 5, 20) + "." for _ in range(4)],
            label=int(rng.integers(0, 4)),
        )
        for _ in range(examples)
    ]
    data = os.path.join(folder, "bench_mc.jsonl")
    with open(data, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(os.path.join(folder, "bench_mc.yaml"), "w", encoding="utf-8") as f:
        f.write(TASK_YAML.format(data=data))
    return [r["context"] for r in rows] + [e for r in rows for e in r["endings"]]


def make_model(folder: str, shape: dict, max_seq_len: int, texts: list[str]) -> None:
    """A random HF MPT folder with a BPE tokenizer (its ids all inside the model's vocabulary)."""
    from transformers import MptConfig, MptForCausalLM

    from mpt_jax.data.tokenizer import train_bpe

    torch.manual_seed(0)
    model = MptForCausalLM(MptConfig(**shape, max_seq_len=max_seq_len)).eval()
    model.save_pretrained(folder)
    train_bpe(texts, min(4096, shape["vocab_size"]), name="bench-bpe").save_pretrained(folder)


def timed_run(lm, manager) -> tuple[float, dict]:
    import lm_eval

    start = time.perf_counter()
    results = lm_eval.simple_evaluate(
        model=lm, tasks=["bench_mc"], task_manager=manager, bootstrap_iters=0, log_samples=False, verbosity="ERROR"
    )
    return time.perf_counter() - start, results["results"]["bench_mc"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=tuple(SHAPES), default="125m")
    parser.add_argument("--examples", type=int, default=300)
    parser.add_argument("--batch_sizes", default="8")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max_seq_len", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    import lm_eval.tasks
    from lm_eval.models.huggingface import HFLM

    from mpt_jax.eval.harness import MPTJaxLM

    folder = tempfile.mkdtemp(prefix="eval_bench_")
    texts = write_task(folder, args.examples)
    model_dir = os.path.join(folder, "model")
    make_model(model_dir, SHAPES[args.shape], args.max_seq_len, texts)
    manager = lm_eval.tasks.TaskManager(include_path=folder, include_defaults=False)
    print(
        f"{cpu_name()} ({os.cpu_count()} cores); jax {jax.__version__}, torch {torch.__version__}, lm-eval {lm_eval.__version__}"
    )
    print(f"shape {args.shape}, {args.dtype}; task: {args.examples} examples x 4 choices (multiple_choice)")
    rows = []
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        ours = MPTJaxLM(model_dir, dtype=args.dtype, batch_size=batch, max_length=args.max_seq_len)
        theirs = HFLM(
            pretrained=model_dir, dtype=args.dtype, batch_size=batch, device="cpu", max_length=args.max_seq_len
        )
        first_ours, acc_ours = timed_run(ours, manager)
        first_theirs, acc_theirs = timed_run(theirs, manager)
        times_ours, times_theirs = [], []
        for _ in range(args.repeats):
            times_ours.append(timed_run(ours, manager)[0])
            times_theirs.append(timed_run(theirs, manager)[0])
        same = all(abs(acc_ours[k] - acc_theirs[k]) < 1e-9 for k in ("acc,none", "acc_norm,none"))
        o, t = statistics.median(times_ours), statistics.median(times_theirs)
        row = dict(
            batch=batch,
            ours=args.examples / o,
            theirs=args.examples / t,
            first_ours=first_ours,
            first_theirs=first_theirs,
            acc=acc_ours["acc,none"],
            same=same,
        )
        rows.append(row)
        print(
            f"batch {batch}: mpt_jax {row['ours']:.2f} ex/s, hf {row['theirs']:.2f} ex/s "
            f"({row['ours'] / row['theirs']:.2f}x); first run {first_ours:.1f} s vs {first_theirs:.1f} s; "
            f"acc {acc_ours['acc,none']:.4f} vs {acc_theirs['acc,none']:.4f}"
        )
        if not same:
            print(f"  ACCURACY DIFFERS: {acc_ours} vs {acc_theirs}")
        del ours, theirs
    print(
        "\n| batch | mpt_jax ex/s | lm-eval hf ex/s | speed-up | first run (compile) mpt_jax | first run hf | same acc |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['batch']} | {r['ours']:.2f} | {r['theirs']:.2f} | {r['ours'] / r['theirs']:.2f}x | "
            f"{r['first_ours']:.1f} s | {r['first_theirs']:.1f} s | {'yes' if r['same'] else 'NO'} |"
        )


if __name__ == "__main__":
    main()
