"""Train or finetune an MPT: ``python -m mpt_jax.train --config=configs/tiny.py [--workdir=DIR]``.

Overrides reach any config field: ``--config.train.max_steps=200 --config.optimizer.lr=1e-3``
(unknown keys are errors). The run resumes from the newest readable checkpoint in
``<workdir>/checkpoints``, with the data iterator and RNG where they were, so a run interrupted
and resumed computes the same bits as one that never stopped. SIGTERM or SIGINT saves a checkpoint
and exits cleanly; a NaN/inf loss stops the run, naming the step, without saving over the last
good checkpoint.

Writes to the workdir: ``metrics.jsonl`` (one JSON object per logged step), TensorBoard events,
``checkpoints/<step>/``, and ``config.json`` (the resolved run config).
"""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import time

import flax.linen as nn
import jax
import numpy as np
from absl import app, flags, logging
from jax.sharding import NamedSharding, PartitionSpec
from ml_collections import config_flags
from tqdm import tqdm

from mpt_jax import checkpoint, distributed, metrics, optim, run_config, sharding, steps
from mpt_jax.data import formats
from mpt_jax.data.pipeline import DataConfig, check_data, get_tokenizer, iterate, make_dataset, to_global_arrays

_CONFIG = config_flags.DEFINE_config_file("config", None, "a config file, e.g. configs/tiny.py", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints, metrics and logs go (default: workdirs/<config>)")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "multi-process: host:port of process 0")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "multi-process: number of processes")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "multi-process: this process's index")


class NonFiniteLoss(RuntimeError):
    pass


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


def _init_params(config, cfg, abstract_params):
    """Params from ``config.init_from``: a training workdir, an mpt-jax model checkpoint or an HF folder."""
    path = config.init_from
    src_cfg, params = checkpoint.load_params_any(path, dtype=cfg.param_dtype)
    want = jax.tree.map(lambda x: x.shape, abstract_params)
    got = jax.tree.map(np.shape, params)
    if jax.tree.structure(want) != jax.tree.structure(got) or want != got:
        raise ValueError(
            f"config.init_from={path}: its params do not fit config.model "
            f"(checkpoint d_model={src_cfg.d_model}, n_layers={src_cfg.n_layers}, vocab_size={src_cfg.vocab_size}; "
            f"config d_model={cfg.d_model}, n_layers={cfg.n_layers}, vocab_size={cfg.vocab_size})"
        )
    return params


class Trainer:
    def __init__(self, config, workdir: str):
        self.config = config
        self.workdir = os.path.abspath(workdir)
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
        self.writer = metrics.MetricsWriter(
            self.workdir,
            enabled=self.is_main,
            wandb=dict(project=config.wandb.project, name=config.wandb.name or None) if config.wandb.project else None,
        )
        self.flops_per_token = metrics.flops_per_token(self.cfg, self.seq_len)
        self.peak = metrics.peak_flops_per_device(override=t.peak_flops or None)
        self.format_stats = formats.FormatStats()

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

    def _eval(self, params, eval_fn) -> dict[str, float]:
        it = iter(self._dataset("validation", train=False))  # the same first batches every time
        loss_sum = tokens = 0.0
        for _ in range(self.config.train.eval_batches):
            batch = to_global_arrays(next(it), self.batch_sharding)
            out = eval_fn(params, batch)
            loss_sum += float(out["loss_sum"])
            tokens += float(out["tokens"])
        it.close()  # stops its worker processes, if any
        loss = loss_sum / max(tokens, 1.0)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": tokens}

    def run(self) -> dict[str, float]:
        config, t = self.config, self.config.train
        os.makedirs(self.workdir, exist_ok=True)
        if self.is_main:
            with open(os.path.join(self.workdir, "config.json"), "w", encoding="utf-8") as f:
                f.write(config.to_json_best_effort(indent=2))
        data_iter = iterate(self._dataset("train", train=True))
        ckpts = checkpoint.TrainCheckpoints(
            os.path.join(self.workdir, "checkpoints"), keep=config.checkpoint.keep or None
        )
        restored = ckpts.restore_latest(self._abstract_state(), data_iter, model=config.model.to_dict())
        if restored is not None:
            step0, state = restored
            logging.info("resumed from the checkpoint at step %d", step0)
            self.writer.truncate_after(step0)
        else:
            step0, state = 0, self._initial_state()
        step_fn = jax.jit(
            functools.partial(
                steps.train_step,
                cfg=self.cfg,
                optimizer=self.optimizer,
                schedule=self.schedule,
                micro_batches=self.micro_batches,
            ),
            in_shardings=(self.state_shardings, self.batch_sharding),
            out_shardings=(self.state_shardings, self.replicated),
            donate_argnums=(0,),
        )
        eval_fn = jax.jit(
            functools.partial(steps.eval_step, cfg=self.cfg),
            in_shardings=(self.state_shardings["params"], self.batch_sharding),
            out_shardings=self.replicated,
        )
        config_json = json.loads(config.to_json_best_effort())
        last: dict[str, float] = {}
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
                loss = float(out["loss"])
                if not math.isfinite(loss):
                    ckpts.close()
                    raise NonFiniteLoss(
                        f"loss is {loss} at step {step}; stopping without saving (the last good checkpoint is at step "
                        f"{ckpts.latest_step()})"
                    )
                window_tokens += float(out["tokens"])
                window_steps += 1
                if step == step0 + 1:  # the first step compiles: keep it out of the throughput
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
                    bar.set_postfix(loss=f"{loss:.3f}")
                    if self.is_main:
                        logging.info("%s", metrics.format_console(step, last))
                    window_tokens, window_start, window_steps = 0.0, time.perf_counter(), 0
                if t.eval_every and (step % t.eval_every == 0 or step == t.max_steps):
                    ev = self._eval(state["params"], eval_fn)
                    self.writer.write(step, ev, prefix="eval_")
                    last.update({f"eval_{k}": v for k, v in ev.items()})
                    if self.is_main:
                        logging.info("step %d | eval loss %.4f | eval ppl %.2f", step, ev["loss"], ev["perplexity"])
                    window_start = time.perf_counter()  # eval time is not train time
                every = config.checkpoint.every_steps
                if (every and step % every == 0) or step == t.max_steps or stop.signal is not None:
                    ckpts.save(step, state, data_iter, config_json)
                if stop.signal is not None:
                    logging.warning("signal %d: saved the checkpoint at step %d, exiting", stop.signal, step)
                    break
        bar.close()
        ckpts.close()
        if self.format_stats.truncated or self.format_stats.dropped_overlong or self.format_stats.dropped_no_loss:
            logging.warning("data: %s", self.format_stats.summary())
        self.writer.close()
        last["step"] = step
        return last


def _quiet_other_libraries() -> None:
    """Keep INFO lines from mpt_jax only; orbax and friends log every file they rename."""
    import logging as std_logging

    package = os.path.dirname(os.path.abspath(__file__))

    def keep(record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or record.pathname.startswith(package)

    logging.get_absl_handler().addFilter(keep)


def main(argv):
    _quiet_other_libraries()
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config=configs/<name>.py is required")
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    name = os.path.splitext(os.path.basename(config_flags.get_config_filename(flags.FLAGS["config"])))[0]
    workdir = _WORKDIR.value or os.path.join("workdirs", name)
    logging.info("workdir: %s", os.path.abspath(workdir))
    try:
        result = Trainer(config, workdir).run()
    except NonFiniteLoss as e:
        logging.error("%s", e)
        raise SystemExit(f"train: {e}") from None
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"train: error: {e}") from None
    summary = {k: result[k] for k in ("step", "loss", "eval_loss") if k in result}
    print("train: done " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))


if __name__ == "__main__":
    app.run(main)
