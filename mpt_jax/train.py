"""Train or finetune an MPT: ``python -m mpt_jax.train --config=configs/tiny.py [--workdir=DIR]``.

Overrides reach any config field: ``--config.train.max_steps=200 --config.optimizer.lr=1e-3``
(unknown keys are errors). The run resumes from the newest readable checkpoint in
``<workdir>/checkpoints``, with the data iterator and RNG where they were, so a run interrupted
and resumed computes the same bits as one that never stopped; a checkpoint that does not fit the
config is an error, a damaged one is skipped (see checkpoint.TrainCheckpoints). SIGTERM or SIGINT
saves a checkpoint and exits cleanly; a NaN/inf loss or gradient norm stops the run, naming the
step, without saving it. Nothing is written before the checks pass.

Writes to the workdir: ``metrics.jsonl`` (one JSON object per logged step), TensorBoard events,
``checkpoints/<step>/``, ``config.json`` (the resolved run config) and ``tokenizer/`` (the run's
tokenizer as transformers reads it, with a ChatML chat template when it trains on chat data).
"""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import time
from collections.abc import Callable

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from mpt_jax import checkpoint, cli, distributed, files, host_memory, metrics, optim, run_config, sharding, steps
from mpt_jax.data import formats
from mpt_jax.data.pipeline import DataConfig, check_data, get_tokenizer, iterate, make_dataset, to_global_arrays
from mpt_jax.model import flat_params


class NonFiniteLoss(RuntimeError):
    """The loss or the gradient norm of a step is NaN or infinite: the run stops and saves nothing."""


class _Stop:
    """Turns SIGTERM/SIGINT into a flag the loop checks after each step."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        del frame
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _check_init_from(config, cfg) -> None:
    """Refuses an ``init_from`` whose model computes something else than ``config.model`` (see
    ``checkpoint.init_from_changes``); logs the allowed differences. Reads no weights."""
    path = config.init_from
    allowed, refused = checkpoint.init_from_changes(checkpoint.load_config_any(path), cfg)
    if refused:
        raise ValueError(
            f"config.init_from={path}: its model does not fit config.model ({'; '.join(refused)}; checkpoint -> "
            "run): the loaded weights would compute something else. Set these config.model fields to the "
            "checkpoint's values"
        )
    for change in allowed:
        logging.info("config.init_from=%s: model.%s (allowed: does not change what the weights compute)", path, change)


def _init_params(config, cfg, abstract_params):
    """Params from ``config.init_from``: a training workdir, an mpt-jax model checkpoint or an HF folder."""
    path = config.init_from
    _check_init_from(config, cfg)
    _, params = checkpoint.load_params_any(path, dtype=cfg.param_dtype)
    want = dict((p, tuple(x.shape)) for p, x in flat_params(abstract_params))
    got = dict((p, tuple(np.shape(x))) for p, x in flat_params(params))
    if want != got:
        diff = sorted(set(want) ^ set(got)) + sorted(p for p in set(want) & set(got) if want[p] != got[p])
        shown = ", ".join(f"{'.'.join(p)} {got.get(p)} -> {want.get(p)}" for p in diff[:4])
        raise ValueError(f"config.init_from={path}: its params do not fit config.model ({shown}; checkpoint -> run)")
    return params


def _check_finite(out: dict, step: int, ckpts: checkpoint.TrainCheckpoints) -> None:
    """Raises NonFiniteLoss when the step's loss or gradient norm is NaN/inf; called before the
    step is saved, so a bad step never reaches a checkpoint (whatever else asks for a save)."""
    loss, grad_norm = float(out["loss"]), float(out["grad_norm"])
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    if math.isfinite(loss):
        what = f"gradient norm is {grad_norm} at step {step} (the loss, {loss:.4g}, is finite)"
    else:
        what = f"loss is {loss} at step {step}"
    ckpts.wait()
    good = ckpts.latest_step()
    last = "there is no checkpoint yet" if good is None else f"the last good checkpoint is at step {good}"
    raise NonFiniteLoss(f"{what}; stopping without saving ({last})")


def _write_text(path: str, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file and a rename: never half a file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


StepCallback = Callable[[int, dict[str, float]], None]


class Trainer:
    """One training run in ``workdir``. ``__init__`` and ``run`` check everything that can refuse the
    run (config, data, a checkpoint that does not fit, init_from) before the first write there.

    ``callback(step, metrics)``, if given, is called after every step of ``run`` (its checkpoint, if
    any, saved): the hook for a notebook's own progress bar or live plot. ``metrics`` holds the
    step's ``loss``, plus what was logged on a ``log_every`` step (lr, grad_norm, tokens_per_s, ...)
    and ``eval_*`` on an eval step. The first call of a resumed run is for the step after the
    restored checkpoint's. An exception it raises ends the run (the last checkpoint stays)."""

    def __init__(self, config, workdir: str, *, callback: StepCallback | None = None):
        self.config = config
        self.callback = callback
        self.workdir = os.path.abspath(os.path.expanduser(os.fspath(workdir)))
        files.check_folder_path(self.workdir, what="workdir")
        self.cfg = run_config.model_config(config)
        run_config.check(config, jax.device_count(), jax.process_count())
        self.seq_len = run_config.seq_len(config)
        t = config.train
        self.global_batch = t.global_batch_size
        self.micro_batches = t.global_batch_size // (t.micro_batch_size or t.global_batch_size)
        self.data_cfg = DataConfig.from_config(config.data)
        self.tok = get_tokenizer(self.data_cfg)
        check_data(
            self.data_cfg,
            self.tok,
            seq_len=self.seq_len,
            vocab_size=self.cfg.vocab_size,
            need_eval=bool(t.eval_every and t.eval_batches),
        )
        shape = run_config.mesh_shape(config, jax.device_count())
        dcn = tuple(int(config.mesh.get(f"dcn_{a}", 1)) for a in sharding.AXES)
        self.mesh = sharding.make_mesh(shape, dcn)
        self.rules = sharding.rules_from_config(config)
        self.batch_sharding = sharding.batch_sharding(self.mesh)
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.schedule = optim.make_schedule(config.schedule, lr=config.optimizer.lr, max_steps=t.max_steps)
        self.optimizer = optim.make_optimizer(config.optimizer, config.schedule, max_steps=t.max_steps)
        self.state_shardings = sharding.state_shardings(self.cfg, self.optimizer, self.mesh, self.rules)
        self.is_main = jax.process_index() == 0
        self.writer: metrics.MetricsWriter | None = None  # opened by run, once the checks have passed
        self._eval_data = None  # the held-out batches, built at the first eval
        self.flops_per_token = metrics.flops_per_token(self.cfg, self.seq_len)
        self.peak = metrics.peak_flops_per_device(override=t.peak_flops or None)
        self.format_stats = formats.FormatStats()
        self._icl_tasks = self._prepare_icl()

    # ------------------------------------------------------------------------------------------

    def _dataset(self, split: str, *, train: bool):
        return make_dataset(
            self.data_cfg,
            self.tok,
            split=split,
            seq_len=self.seq_len,
            global_batch=self.global_batch,
            seed=self.config.train.seed,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            shuffle=None if train else False,
            stats=self.format_stats if train else None,
            vocab_size=self.cfg.vocab_size,
        )

    def _init_fn(self):
        return functools.partial(steps.init_state, self.cfg, self.optimizer)

    def _abstract_state(self):
        """The train state's shapes, dtypes and shardings; nothing allocated."""
        shapes = jax.eval_shape(self._init_fn(), jax.random.key(self.config.train.seed))
        return jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, self.state_shardings
        )

    def _initial_state(self):
        """A fresh state, created already sharded (a large model never exists whole on one host)."""
        rng = jax.random.key(self.config.train.seed)
        params = None
        if self.config.init_from:
            abstract = jax.eval_shape(self._init_fn(), rng)
            params = _init_params(self.config, self.cfg, nn.meta.unbox(abstract["params"]))
            params = jax.device_put(params, self.state_shardings["params"])
            logging.info("initialised params from %s", self.config.init_from)
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            return jax.jit(self._init_fn(), out_shardings=self.state_shardings)(rng, params)

    def _prepare_icl(self) -> list:
        """The ``evals.icl_tasks`` evaluations, their files read and prompts built once, now (errors
        before step 1); every eval scores these."""
        e = self.config.get("evals")
        if e is None or not e.icl_tasks:
            return []
        from mpt_jax.eval import icl

        tasks = icl.tasks_from_file(e.icl_tasks)
        return [sub for task in tasks for sub in icl.prepare(task, self.tok, self.cfg.max_seq_len)]

    def _icl(self, params) -> dict[str, float]:
        """ICL metrics of ``params`` (``icl/<task>/<k>-shot/<metric>``, ``icl/category/<name>``)."""
        from mpt_jax.eval import icl, sandbox
        from mpt_jax.eval.scoring import Scorer
        from mpt_jax.generate import Generator

        e = self.config.evals
        scorer = Scorer(self.cfg, params, batch_size=e.icl_batch_size)
        generator = Generator(self.cfg, scorer.params, self.tok, max_batch=e.icl_batch_size)
        results = icl.run_prepared(
            self._icl_tasks,
            scorer.loglikelihood,
            icl.generator_fn(generator),
            sandbox.check_program,
            limit=e.icl_limit or None,
        )
        return icl.flat_metrics(results)

    def _eval(self, params, eval_fn) -> dict[str, float]:
        """Loss on the first eval_batches batches of the held-out split (the same ones every time)."""
        if self._eval_data is None:  # built once: indexing files is a pass over them
            self._eval_data = self._dataset("validation", train=False)
        it = iter(self._eval_data)  # a fresh iterator starts at the first batch
        loss_sum = tokens = 0.0
        for _ in range(self.config.train.eval_batches):
            batch = to_global_arrays(next(it), self.batch_sharding)
            out = eval_fn(params, batch)
            loss_sum += float(out["loss_sum"])
            tokens += float(out["tokens"])
        it.close()  # stops its worker processes, if any
        loss = loss_sum / max(tokens, 1.0)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": tokens}

    def _config_json(self) -> dict:
        return json.loads(self.config.to_json_best_effort())

    def _restore_or_init(self, ckpts: checkpoint.TrainCheckpoints, data_iter) -> tuple[int, dict]:
        """(step, state): the newest readable checkpoint's, else a fresh (or init_from) state.
        Writes nothing; raises when a checkpoint does not fit or init_from is refused."""
        restored = ckpts.restore_latest(self._abstract_state(), data_iter, self._config_json())
        if restored is None:
            return 0, self._initial_state()
        logging.info("resumed from the checkpoint at step %d", restored.step)
        self._warn_schedule_change(restored.config, restored.step)
        return restored.step, restored.state

    def _warn_schedule_change(self, saved: dict, step: int) -> None:
        """A resumed run with another max_steps, schedule or lr follows another LR curve from here
        on: allowed, but said, with the LR at the resumed step both ways."""
        c = self.config

        def settings(config: dict) -> dict:
            return {
                "train.max_steps": config.get("train", {}).get("max_steps"),
                "optimizer.lr": config.get("optimizer", {}).get("lr"),
                **{f"schedule.{k}": v for k, v in config.get("schedule", {}).items()},
            }

        old, new = settings(saved), settings(self._config_json())
        changes = [
            f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)
        ]
        if not changes:
            return
        now = float(self.schedule(step))
        try:
            before = optim.make_schedule(
                saved["schedule"], lr=saved["optimizer"]["lr"], max_steps=saved["train"]["max_steps"]
            )
            lrs = f"lr at step {step}: {float(before(step)):.6g} on the checkpoint's schedule, {now:.6g} on this run's"
        except (KeyError, TypeError, ValueError):
            lrs = f"lr at step {step}: {now:.6g} on this run's schedule"
        logging.warning(
            "resuming at step %d with another learning-rate schedule than the checkpoint's (%s); %s (max_steps %d)",
            step,
            ", ".join(changes),
            lrs,
            c.train.max_steps,
        )

    def _open_outputs(self, step0: int) -> None:
        """The first writes to the workdir: config.json, the run's tokenizer (``tokenizer/``, so
        the workdir's checkpoints load and convert with it), metrics.jsonl (records after
        ``step0``, which this run redoes, dropped) and TensorBoard (told to hide them)."""
        c = self.config
        os.makedirs(self.workdir, exist_ok=True)
        if self.is_main:
            _write_text(os.path.join(self.workdir, "config.json"), c.to_json_best_effort(indent=2))
            self.tok.model_max_length = self.cfg.max_seq_len
            with files.atomic_output_dir(os.path.join(self.workdir, checkpoint.TOKENIZER_DIR), overwrite=True) as tmp:
                self.tok.save_pretrained(tmp)
        self.writer = metrics.MetricsWriter(
            self.workdir,
            enabled=self.is_main,
            wandb=dict(project=c.wandb.project, name=c.wandb.name or None) if c.wandb.project else None,
        )
        dropped = self.writer.truncate_after(step0)
        if dropped:
            logging.warning("metrics.jsonl: dropped %d record(s) after step %d, which this run redoes", dropped, step0)

    def run(self) -> dict[str, float]:
        """Trains to ``train.max_steps`` (or a SIGTERM/SIGINT); returns the last step's metrics with
        the last logged throughput and eval, and ``step``."""
        data_iter = iterate(self._dataset("train", train=True))
        ckpts = checkpoint.TrainCheckpoints(
            os.path.join(self.workdir, "checkpoints"), keep=self.config.checkpoint.keep or None
        )
        try:
            step0, state = self._restore_or_init(ckpts, data_iter)
            host_memory.release_free_memory()  # what initializing or restoring freed
            self._open_outputs(step0)
            return self._loop(step0, state, ckpts, data_iter)
        finally:
            ckpts.close()
            data_iter.close()
            if self.writer is not None:
                self.writer.close()

    def _loop(self, step0: int, state: dict, ckpts: checkpoint.TrainCheckpoints, data_iter) -> dict[str, float]:
        config, t = self.config, self.config.train
        assert self.writer is not None
        step_fn = jax.jit(
            functools.partial(
                steps.train_step,
                cfg=self.cfg,
                optimizer=self.optimizer,
                schedule=self.schedule,
                micro_batches=self.micro_batches,
                grad_dtype=run_config.grad_dtype_of(config),
            ),
            in_shardings=(self.state_shardings, self.batch_sharding),
            out_shardings=(self.state_shardings, self.replicated),
            donate_argnums=(0,),
            compiler_options=steps.train_compiler_options(self.cfg),
        )
        eval_fn = jax.jit(
            functools.partial(steps.eval_step, cfg=self.cfg),
            in_shardings=(self.state_shardings["params"], self.batch_sharding),
            out_shardings=self.replicated,
        )
        config_json = self._config_json()
        last: dict[str, float] = {}
        out = None
        window_tokens, window_start, window_steps = 0.0, time.perf_counter(), 0
        bar = tqdm(
            total=t.max_steps, initial=step0, desc="train", unit="step", disable=not (t.progress and self.is_main)
        )
        step = step0
        with _Stop() as stop, jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            while step < t.max_steps:
                batch = to_global_arrays(next(data_iter), self.batch_sharding)
                state, out = step_fn(state, batch)
                step += 1
                _check_finite(out, step, ckpts)  # first: nothing of a bad step is saved
                loss = float(out["loss"])
                now = {"loss": loss}  # what the callback gets for this step
                window_tokens += float(out["tokens"])
                window_steps += 1
                if step == step0 + 1:  # the first step compiles: keep it out of the throughput
                    host_memory.release_free_memory()  # the compiler's freed memory
                    if host_memory.reusing_step_memory() and self.is_main:
                        logging.info("host memory: each step reuses the memory of the step before")
                    window_tokens, window_start, window_steps = 0.0, time.perf_counter(), 0
                bar.update(1)
                if t.log_every and (step % t.log_every == 0 or step in (step0 + 1, t.max_steps)):
                    last = {k: float(v) for k, v in out.items() if k != "tokens"}
                    if window_steps:  # none right after the compiling first step
                        elapsed = time.perf_counter() - window_start
                        tokens_per_s = self.global_batch * self.seq_len * window_steps / elapsed
                        last.update(
                            tokens_per_s=tokens_per_s, step_time=elapsed / window_steps, loss_tokens=window_tokens
                        )
                        mfu = metrics.mfu(tokens_per_s, self.flops_per_token, jax.device_count(), self.peak)
                        if mfu is not None:
                            last["mfu"] = mfu
                    self.writer.write(step, last)
                    now.update(last)
                    bar.set_postfix(loss=f"{loss:.3f}")
                    if self.is_main:
                        logging.info("%s", metrics.format_console(step, last))
                    window_tokens, window_start, window_steps = 0.0, time.perf_counter(), 0
                if t.eval_every and (step % t.eval_every == 0 or step == t.max_steps):
                    ev = self._eval(state["params"], eval_fn)
                    self.writer.write(step, ev, prefix="eval_")
                    last.update({f"eval_{k}": v for k, v in ev.items()})
                    now.update({f"eval_{k}": v for k, v in ev.items()})
                    if self.is_main:
                        logging.info("step %d | eval loss %.4f | eval ppl %.2f", step, ev["loss"], ev["perplexity"])
                    if self._icl_tasks:
                        scores = self._icl(state["params"])
                        self.writer.write(step, scores)
                        last.update(scores)
                        now.update(scores)
                        if self.is_main:
                            logging.info("%s", metrics.format_console(step, scores))
                    window_start = time.perf_counter()  # eval time is not train time
                every = config.checkpoint.every_steps
                if (every and step % every == 0) or step == t.max_steps or stop.signal is not None:
                    ckpts.save(step, state, data_iter, config_json)
                if self.callback is not None:
                    self.callback(step, now)
                if stop.signal is not None:
                    logging.warning("signal %d: saved the checkpoint at step %d, exiting", stop.signal, step)
                    break
        bar.close()
        if out is not None:  # the summary shows the last step, also when it was not a logged one
            last.update({k: float(v) for k, v in out.items() if k != "tokens"})
        if self.format_stats.truncated or self.format_stats.dropped_overlong or self.format_stats.dropped_no_loss:
            logging.warning("data: %s", self.format_stats.summary())
        last["step"] = step
        return last


def _define_flags() -> None:
    """Flags exist only when train runs as a program (summary and plan define --config too)."""
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "a config file, e.g. configs/tiny.py", lock_config=True)
    flags.DEFINE_string("workdir", None, "where checkpoints, metrics and logs go (default: workdirs/<config>)")
    flags.DEFINE_string("coordinator_address", None, "multi-process: host:port of process 0")
    flags.DEFINE_integer("num_processes", None, "multi-process: number of processes")
    flags.DEFINE_integer("process_id", None, "multi-process: this process's index")


def main(argv) -> None:
    """Checks the config file and the workdir, then trains; a user's mistake ends in one line (cli.run)."""
    del argv
    from absl import flags
    from ml_collections import config_flags

    host_memory.reuse_step_memory()  # first: it must precede jax's first computation
    f = flags.FLAGS
    config = cli.config_from_flags("config")
    name = os.path.splitext(os.path.basename(config_flags.get_config_filename(f["config"])))[0]
    workdir = f.workdir or os.path.join("workdirs", name)
    files.check_folder_path(workdir, what="--workdir")
    distributed.initialize(f.coordinator_address, f.num_processes, f.process_id)
    logging.info("workdir: %s", os.path.abspath(workdir))
    try:
        result = Trainer(config, workdir).run()
    except NonFiniteLoss as e:
        logging.error("%s", e)
        raise SystemExit(f"train: {e}") from None
    summary = {k: result[k] for k in ("step", "loss", "eval_loss") if k in result}
    print("train: done " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))


if __name__ == "__main__":
    cli.run("train", _define_flags, main)
