"""The command-line programs: importable together (no flags at import), and a user's mistake is one
line on stderr with a non-zero exit status, not a traceback. Each runs in a subprocess, as typed."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_every_module_imports_in_one_process_without_defining_flags():
    """A notebook imports train, summary, plan and convert together: no DuplicateFlagError, and no
    module of the package defines absl flags when imported (only when run as a program)."""
    script = (
        "import importlib, pkgutil, mpt_jax\n"
        "import mpt_jax.train, mpt_jax.summary, mpt_jax.plan, mpt_jax.convert\n"
        "for m in pkgutil.walk_packages(mpt_jax.__path__, 'mpt_jax.'):\n"
        "    importlib.import_module(m.name)\n"
        "from absl import flags\n"
        "print(sorted(m for m in flags.FLAGS.flags_by_module_dict() if m.startswith('mpt_jax')))\n"
    )
    done = _run("-c", script)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def _assert_one_line(done: subprocess.CompletedProcess, prog: str, *expected: str) -> str:
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(f"{prog}: error: ")]
    assert len(errors) == 1, done.stderr
    # At most one log line before it (train logs its workdir once the config is read).
    assert len(lines) <= 2, done.stderr
    for text in expected:
        assert text in errors[0], errors[0]
    return errors[0]


TRAIN = ("-m", "mpt_jax.train")


def test_train_config_file_problems(tmp_path):
    _assert_one_line(_run(*TRAIN, "--config=configs/nope.py"), "train", "--config=configs/nope.py: no such file")
    done = _run(*TRAIN, "--config=configs/nope.py", "--config.train.max_steps=3")  # an override of it too
    _assert_one_line(done, "train", "--config=configs/nope.py: no such file")
    (tmp_path / "empty.py").write_text("x = 1\n")
    done = _run(*TRAIN, f"--config={tmp_path / 'empty.py'}")
    _assert_one_line(done, "train", "empty.py: the file has no get_config() function")
    (tmp_path / "raises.py").write_text("def get_config():\n    raise ValueError('set the lr')\n")
    done = _run(*TRAIN, f"--config={tmp_path / 'raises.py'}")
    _assert_one_line(done, "train", "raises.py: get_config() raised ValueError: set the lr")


def test_train_override_typo_keeps_the_suggestion():
    done = _run(*TRAIN, "--config=configs/tiny.py", "--config.train.max_step=3")
    _assert_one_line(done, "train", "'max_step'", "--config.train.max_step=3", 'Did you mean "max_steps"')
    done = _run(*TRAIN, "--config=configs/tiny.py", "--config.trian.max_steps=3")
    _assert_one_line(done, "train", "'trian'", 'Did you mean "train"')


def test_train_workdir_that_is_a_file(tmp_path):
    file = tmp_path / "notes.txt"
    file.write_text("not a folder")
    done = _run(*TRAIN, "--config=configs/tiny.py", f"--workdir={file}")
    _assert_one_line(done, "train", f"--workdir={file} is a file")
    done = _run(*TRAIN, "--config=configs/tiny.py", f"--workdir={file}/run")
    _assert_one_line(done, "train", f"inside {file}, which is a file")
    assert file.read_text() == "not a folder"


def test_train_errors_raised_by_the_trainer(tmp_path):
    """A ValueError (the mesh check) and a FileNotFoundError (the tokenizer) from Trainer(...)."""
    workdir = str(tmp_path / "run")
    done = _run(*TRAIN, "--config=configs/tiny.py", f"--workdir={workdir}", "--config.mesh.data=3")
    _assert_one_line(done, "train", "(3, 1, 1) multiplies to 3, not the 1 devices")
    done = _run(*TRAIN, "--config=configs/tiny.py", f"--workdir={workdir}", "--config.data.tokenizer=/nowhere/t.json")
    _assert_one_line(done, "train", "/nowhere/t.json")


def test_train_bad_flags():
    _assert_one_line(_run(*TRAIN, "--config=configs/tiny.py", "--no_such_flag=1"), "train", "no_such_flag")
    _assert_one_line(_run(*TRAIN, "--config=configs/tiny.py", "--config.train.max_steps=ten"), "train", "'ten'")
    _assert_one_line(_run(*TRAIN, "--config=configs/tiny.py", "stray"), "train", "unexpected arguments ['stray']")
    _assert_one_line(_run(*TRAIN), "train", "--config=configs/<name>.py is required")


@pytest.mark.parametrize("module", ["summary", "plan"])
def test_summary_and_plan_report_config_mistakes_in_one_line(module):
    prog = ("-m", f"mpt_jax.{module}")
    _assert_one_line(_run(*prog, "--config=configs/nope.py"), module, "no such file")
    done = _run(*prog, "--config=configs/tiny.py", "--config.model.n_layer=2")
    _assert_one_line(done, module, "'n_layer'", 'Did you mean "n_layers"')
