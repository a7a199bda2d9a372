"""The evaluation CLI: perplexity, LLM Foundry's ICL tasks, and lm-evaluation-harness.

    python -m mpt_jax.eval perplexity --model=PATH --data=SPEC [--split=validation --stride=256]
    python -m mpt_jax.eval icl --model=PATH --tasks=configs/eval/tiny.py
    python -m mpt_jax.eval harness --model=PATH --tasks=hellaswag,arc_easy [--include_path=DIR]

``--model`` is what ``mpt_jax.load`` reads (a training workdir, an mpt-jax checkpoint, an HF folder
or a hub id). Results print as a table and, with ``--output=FILE.json``, are written there (a new
file: an existing one is an error).
"""

from __future__ import annotations

COMMANDS = ("perplexity", "icl", "harness")


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("model", None, "a training workdir, an mpt-jax checkpoint, an HF folder or a hub id")
    flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "params and compute dtype (default: as stored)")
    flags.DEFINE_enum("quantize", None, ["int8"], "weight-only int8")
    flags.DEFINE_integer("step", None, "a training workdir's checkpoint step (default: newest)")
    flags.DEFINE_integer("max_length", None, "longest input (default max_seq_len; ALiBi models may go past it)")
    flags.DEFINE_integer("batch_size", 8, "rows per forward pass")
    flags.DEFINE_string("output", None, "write the results as JSON to this new file")
    # perplexity
    flags.DEFINE_string("data", None, "perplexity: a data source (stdlib, files:GLOB, tokenized:DIR, tfds:NAME)")
    flags.DEFINE_string("split", "validation", "perplexity: the split of a source with named splits")
    flags.DEFINE_float("holdout_fraction", None, "perplexity: of a files/tokenized source, only its held-out part")
    flags.DEFINE_integer("stride", None, "perplexity: sliding-window stride (default: disjoint windows)")
    flags.DEFINE_integer("limit", None, "at most this many documents (perplexity) or examples per task")
    flags.DEFINE_string("data_dir", None, "perplexity: where TFDS datasets live")
    # icl and harness
    flags.DEFINE_string("tasks", None, "icl: a task config file (configs/eval/*.py); harness: lm-eval task names")
    flags.DEFINE_string("task_dir", None, "icl: the folder relative dataset_uris start from (default: the config's)")
    flags.DEFINE_string("tensorboard", None, "icl: also write the metrics to this folder (metrics.jsonl, TensorBoard)")
    flags.DEFINE_string("include_path", None, "harness: a folder of extra lm-eval task configs")
    flags.DEFINE_integer("num_fewshot", None, "harness: few-shot examples per task (default: the task's)")
    flags.DEFINE_integer("bootstrap_iters", 100_000, "harness: lm-eval's stderr bootstrap (0: skip)")
    flags.DEFINE_bool("log_samples", False, "harness: keep every request's result in --output")


def _load(f, scan_layers: bool = False):
    from mpt_jax.load import load

    return load(
        f.model, dtype=f.dtype, quantize=f.quantize, max_seq_len=f.max_length, step=f.step, scan_layers=scan_layers
    )


def _save(results: dict, output: str | None) -> None:
    from mpt_jax.files import write_new_json

    if output:
        print(f"results written to {write_new_json(output, results)}")


def run_perplexity(f) -> dict:
    from mpt_jax.eval.perplexity import perplexity, source_documents
    from mpt_jax.eval.scoring import Scorer

    if not f.data:
        raise ValueError("perplexity needs --data=SPEC (stdlib, files:GLOB, tokenized:DIR, tfds:NAME)")
    cfg, params, tokenizer = _load(f)
    scorer = Scorer(cfg, params, batch_size=f.batch_size, max_length=f.max_length)
    docs = source_documents(
        f.data, tokenizer, split=f.split, holdout_fraction=f.holdout_fraction, limit=f.limit, data_dir=f.data_dir
    )
    result = perplexity(scorer, docs, stride=f.stride).as_dict()
    result.update(model=f.model, data=f.data, split=f.split, max_length=scorer.max_length, stride=f.stride)
    print(
        f"perplexity {result['perplexity']:.4f} (loss {result['loss']:.4f} nats/token) over "
        f"{result['tokens']} tokens of {result['documents']} documents; windows of {scorer.max_length}"
        + (f", stride {f.stride}" if f.stride else "")
    )
    return result


def run_icl(f) -> dict:
    from mpt_jax.eval import icl, sandbox
    from mpt_jax.eval.scoring import Scorer
    from mpt_jax.generate import Generator

    if not f.tasks:
        raise ValueError("icl needs --tasks=FILE (configs/eval/*.py, or an LLM Foundry tasks yaml)")
    tasks = icl.tasks_from_file(f.tasks, base_dir=f.task_dir)  # a bad task file fails before loading
    cfg, params, tokenizer = _load(f)
    if tokenizer is None:
        raise ValueError(f"{f.model} has no tokenizer: ICL tasks are text")
    scorer = Scorer(cfg, params, batch_size=f.batch_size, max_length=f.max_length)
    generator = Generator(cfg, scorer.params, tokenizer, max_batch=f.batch_size)
    results = icl.run_tasks(
        tasks,
        scorer.loglikelihood,
        icl.generator_fn(generator),
        sandbox.check_program,
        tokenizer,
        max_seq_len=scorer.max_length,
        limit=f.limit,
    )
    print(icl.results_table(results))
    if f.tensorboard:
        from mpt_jax.metrics import MetricsWriter

        with MetricsWriter(f.tensorboard) as writer:
            writer.write(0, icl.flat_metrics(results))
    return results.as_dict()


def run_harness(f) -> None:
    """lm-evaluation-harness through the ``mpt_jax`` backend; it prints lm-eval's table and writes
    ``--output`` itself (lm-eval's results need its own JSON conversion)."""
    from mpt_jax.eval import harness

    harness.run_harness(
        f.model,
        (f.tasks or "").split(","),
        include_path=f.include_path,
        num_fewshot=f.num_fewshot,
        limit=f.limit,
        batch_size=f.batch_size,
        dtype=f.dtype,
        max_length=f.max_length,
        output_path=f.output,
        log_samples=f.log_samples,
        bootstrap_iters=f.bootstrap_iters,
    )


def main(argv: list[str]) -> None:
    from absl import flags

    f = flags.FLAGS
    if not f.model:
        raise ValueError("--model=PATH_OR_HUB is required")
    if f.output:
        from mpt_jax.files import check_new_file

        check_new_file(f.output)  # before hours of evaluation, not after
    if argv[1] == "harness":
        if f.quantize or f.step is not None:
            raise ValueError("harness loads the model through lm-eval's model_args: --quantize and --step do not apply")
        run_harness(f)
        return
    results = {"perplexity": run_perplexity, "icl": run_icl}[argv[1]](f)
    _save(results, f.output)


if __name__ == "__main__":
    from mpt_jax import cli

    cli.run("eval", _define_flags, main, commands=COMMANDS)
