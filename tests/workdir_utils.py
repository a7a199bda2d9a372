"""A training workdir written the way TrainCheckpoints writes one, without training (convert and load tests)."""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from mpt_jax import MPTConfig, checkpoint, optim, steps
from mpt_jax.run_config import base_config


class _DataPosition:
    """What TrainCheckpoints.save asks of the data iterator."""

    def global_state(self) -> dict:
        return {"position": 0}


def make_workdir(
    path,
    cfg: MPTConfig,
    tokenizer: str,
    *,
    chat: bool = False,
    at=(1, 2),
    data_dir: str | None = None,
    with_tokenizer=None,
) -> dict:
    """Checkpoints at steps ``at`` (different params each) of a run of ``cfg`` whose data config names
    ``tokenizer``; ``with_tokenizer`` also writes ``tokenizer/`` as a run does when it starts. Returns
    {step: params}."""
    config = base_config()
    config.model = cfg.to_config_dict()
    config.data.tokenizer = tokenizer
    config.data.data_dir = data_dir
    if chat:
        config.data.format = "chat"
        config.data.text_field = None
    optimizer = optim.make_optimizer(config.optimizer, config.schedule, max_steps=config.train.max_steps)
    ckpts = checkpoint.TrainCheckpoints(os.path.join(path, "checkpoints"), async_save=False)
    saved = {}
    for step in at:
        state = steps.init_state(cfg, optimizer, jax.random.key(step))
        ckpts.save(step, state, _DataPosition(), json.loads(config.to_json_best_effort()))
        saved[step] = jax.tree.map(np.asarray, state["params"])
    ckpts.close()
    if with_tokenizer is not None:
        with_tokenizer.save_pretrained(os.path.join(path, checkpoint.TOKENIZER_DIR))
    return saved


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_tiny(workdir: str, data_dir: str, *overrides: str) -> None:
    """Trains configs/tiny.py into ``workdir`` in a subprocess (no eval, no progress bar), with
    ``overrides`` (``--config.x=y`` flags) for its length and shape; fails the test if it fails."""
    import subprocess
    import sys

    cmd = [
        sys.executable,
        "-m",
        "mpt_jax.train",
        "--config=configs/tiny.py",
        f"--workdir={workdir}",
        f"--config.data.data_dir={data_dir}",
        "--config.train.eval_every=0",
        "--config.train.progress=False",
        *overrides,
    ]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
