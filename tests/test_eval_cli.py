"""`python -m mpt_jax.eval icl` end to end, and ICL tasks during training (config.evals)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from workdir_utils import train_tiny

from mpt_jax import MPTConfig
from mpt_jax.data.tokenizer import train_bpe
from mpt_jax.eval import icl
from mpt_jax.hf import save_hf
from mpt_jax.model import init_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "configs", "eval", "fixtures.py")
CFG = MPTConfig(d_model=32, n_heads=4, n_layers=2, max_seq_len=256, vocab_size=512)
TEXTS = ["Which of these is a fruit? Answer: apple. The sky is blue. def add(a, b): return a + b\n"] * 30


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("hf") / "model")
    params = jax.tree.map(np.asarray, init_params(CFG, jax.random.key(1)))
    save_hf(CFG, params, folder, tokenizer=train_bpe(TEXTS, 500, name="t"))
    return folder


def test_icl_cli_runs_every_format_and_writes_its_results(hf_folder, tmp_path):
    """The fixtures config (every LLM Foundry format) through the CLI: the JSON holds every task
    at every num_fewshot with values in [0, 1], the table prints, the metrics go to TensorBoard's
    folder; the results equal run_tasks in this process on the same model."""
    out, tb = tmp_path / "icl.json", tmp_path / "tb"
    cmd = [sys.executable, "-m", "mpt_jax.eval", "icl", f"--model={hf_folder}", f"--tasks={FIXTURES}"]
    done = subprocess.run(
        [*cmd, f"--output={out}", f"--tensorboard={tb}", "--limit=4"], capture_output=True, text=True, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    labels = {t["label"] for t in result["tasks"]}
    for label in ("lm/0-shot", "lm/2-shot", "mc/3-shot", "schema/1-shot", "qa/2-shot", "code/0-shot"):
        assert label in labels, sorted(labels)
    assert any(label.startswith("mc_categories/1-shot/") for label in labels)
    for t in result["tasks"]:
        assert all(0.0 <= v <= 1.0 for v in t["values"].values()), t
    assert "| task | type |" in done.stdout
    lines = [json.loads(x) for x in (tb / "metrics.jsonl").read_text().splitlines()]
    assert any(k.startswith("icl/mc/3-shot/") for k in lines[0])
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tb / "tensorboard"))

    import mpt_jax
    from mpt_jax.eval import sandbox
    from mpt_jax.eval.scoring import Scorer
    from mpt_jax.generate import Generator

    cfg, params, tok = mpt_jax.load(hf_folder, scan_layers=False)
    scorer = Scorer(cfg, params)
    here = icl.run_tasks(
        icl.tasks_from_file(FIXTURES),
        scorer.loglikelihood,
        icl.generator_fn(Generator(cfg, params, tok)),
        sandbox.check_program,
        tok,
        max_seq_len=cfg.max_seq_len,
        limit=4,
    )
    assert {t.label: t.values for t in here.tasks} == {t["label"]: t["values"] for t in result["tasks"]}


def test_icl_cli_names_a_bad_task_file_before_loading(hf_folder, tmp_path):
    bad = tmp_path / "tasks.py"
    bad.write_text("def get_config():\n    return {'icl_tasks': [{'label': 'x', 'dataset_uri': 'nope.jsonl'}]}\n")
    cmd = [sys.executable, "-m", "mpt_jax.eval", "icl", f"--model={hf_folder}", f"--tasks={bad}"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 1
    assert "missing keys ['icl_task_type']" in done.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_training_runs_icl_tasks_at_each_eval(tmp_path):
    """config.evals.icl_tasks: the fixtures' metrics are in metrics.jsonl at every eval step;
    a task file that does not read stops the run before step 1, naming the key."""
    data_dir = str(tmp_path / "data")
    workdir = tmp_path / "run"
    train_tiny(
        str(workdir),
        data_dir,
        "--config.train.max_steps=4",
        "--config.schedule.t_warmup=1",
        "--config.train.eval_every=2",
        "--config.train.eval_batches=1",
        f"--config.evals.icl_tasks={FIXTURES}",
        "--config.evals.icl_limit=2",
    )
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    icl_steps = sorted({r["step"] for r in rows if any(k.startswith("icl/") for k in r)})
    assert icl_steps == [2, 4]
    last = [r for r in rows if r["step"] == 4 and "icl/lm/0-shot/accuracy" in r][0]
    assert 0.0 <= last["icl/mc/3-shot/accuracy"] <= 1.0 and "icl/code/0-shot/pass@1" in last

    cmd = [
        sys.executable,
        "-m",
        "mpt_jax.train",
        "--config=configs/tiny.py",
        f"--workdir={tmp_path / 'bad'}",
        f"--config.data.data_dir={data_dir}",
        "--config.train.eval_every=2",
        f"--config.evals.icl_tasks={tmp_path / 'none.py'}",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert done.returncode == 1 and "config.evals.icl_tasks: no ICL task config at" in done.stderr
    assert not (tmp_path / "bad" / "checkpoints").exists()
