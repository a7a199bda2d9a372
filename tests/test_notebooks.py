"""The notebooks in notebooks/: committed without outputs, and each runs top to bottom offline on
the CPU with its smoke settings (a cell injected after its ``parameters`` cell, as papermill does).

A cell that raises fails the test; each notebook ends with a cell that asserts what it showed,
and saves its main plot to ``FIGURE_DIR`` (checked here)."""

from __future__ import annotations

import os
import time

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDER = os.path.join(ROOT, "notebooks")
EXPECTED = (
    "01_quickstart.ipynb",
    "02_train_tiny.ipynb",
    "03_finetune_chat.ipynb",
    "04_scale_out.ipynb",
    "05_convert_and_evaluate.ipynb",
)
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
SMOKE_CELL = "# injected by tests/test_notebooks.py\nSMOKE = True\nWORKDIR = {workdir!r}\nFIGURE_DIR = {figures!r}\n"
TIMEOUT_S = 600  # per cell


def _read(name: str) -> nbformat.NotebookNode:
    return nbformat.read(os.path.join(FOLDER, name), as_version=4)


def _parameters_cell(nb: nbformat.NotebookNode, name: str) -> int:
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{name}: {len(tagged)} cells tagged 'parameters'; expected exactly one"
    return tagged[0]


def test_every_notebook_is_here():
    assert tuple(sorted(n for n in os.listdir(FOLDER) if n.endswith(".ipynb"))) == EXPECTED


@pytest.mark.parametrize("name", EXPECTED)
def test_committed_without_outputs(name):
    """No outputs, no execution counts, an Open in Colab badge and a parameters cell defining the
    names the runner injects."""
    nb = _read(name)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{name}: cell {i} has outputs"
    assert "colab.research.google.com/github/" in nb.cells[0].source, f"{name}: no Open in Colab badge first"
    params = nb.cells[_parameters_cell(nb, name)].source
    for variable in ("SMOKE", "WORKDIR", "FIGURE_DIR"):
        assert f"{variable} =" in params, f"{name}: the parameters cell does not define {variable}"


@pytest.mark.parametrize("name", EXPECTED)
def test_runs_top_to_bottom(name, tmp_path, monkeypatch):
    """Executed in notebooks/ (as Jupyter and Colab run it), offline, smoke settings; its main plot
    is written to FIGURE_DIR."""
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    nb = _read(name)
    figures = tmp_path / "figures"
    figures.mkdir()
    cell = SMOKE_CELL.format(workdir=str(tmp_path / "work"), figures=str(figures))
    nb.cells.insert(_parameters_cell(nb, name) + 1, nbformat.v4.new_code_cell(cell))
    client = NotebookClient(nb, timeout=TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": FOLDER}})
    start = time.perf_counter()
    client.execute()
    print(f"{name}: {time.perf_counter() - start:.0f} s")
    assert any(p.suffix == ".png" for p in figures.iterdir()), f"{name}: no figure saved to FIGURE_DIR"
