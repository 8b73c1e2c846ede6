"""notebooks/compare_modes.ipynb runs top to bottom on tiny data and shows the report inline."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import JOB, REPO, tiny_run

NOTEBOOK = REPO / "notebooks" / "compare_modes.ipynb"
#: the notebook's sweep, shrunk to seconds (cnn_small builds far faster than VGG)
TINY_OVERRIDES = [*tiny_run(JOB), "data.fewshot.per_class=4"]
KERNEL_NAME = "transferlab-test"


def _kernel_for_this_python(jupyter_dir: Path) -> None:
    """A kernelspec that runs this interpreter, whatever `python3` kernels the machine has."""
    spec_dir = jupyter_dir / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "transferlab tests",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))


def _outputs(notebook, kind: str) -> list:
    return [
        out
        for cell in notebook.cells
        if cell.cell_type == "code"
        for out in cell.outputs
        if kind in out.get("data", {})
    ]


def test_notebook_is_stored_without_outputs():
    import nbformat

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    assert sum(c.cell_type == "markdown" for c in notebook.cells) >= 3


@pytest.mark.slow
def test_notebook_runs_a_sweep_and_shows_table_and_curves(tmp_path, cifar10_root, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    _kernel_for_this_python(tmp_path / "jupyter")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("TRANSFERLAB_NOTEBOOK_DATA", str(cifar10_root))
    monkeypatch.setenv("TRANSFERLAB_NOTEBOOK_OVERRIDES", " ".join(TINY_OVERRIDES))
    monkeypatch.delenv("TRANSFERLAB_NOTEBOOK_SWEEP", raising=False)
    work = tmp_path / "work"
    work.mkdir()

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        notebook, kernel_name=KERNEL_NAME, timeout=240, resources={"metadata": {"path": str(work)}}
    )
    client.execute()

    sweeps = list((work / "outputs" / "compare_modes").iterdir())
    assert len(sweeps) == 1, "the notebook writes its sweep under its working dir"
    jobs = sorted(p.parent.name for p in sweeps[0].glob("*/metrics.json"))
    assert [name.split("_")[0] for name in jobs] == ["0", "1", "2"]
    assert {"report.md", "report.csv", "curves.png"} <= {p.name for p in sweeps[0].iterdir()}

    tables = [out["data"]["text/markdown"] for out in _outputs(notebook, "text/markdown")]
    assert len(tables) == 1 and "| run | mode |" in tables[0]
    for mode in ("frozen", "finetune", "scratch"):
        assert f"| {mode} |" in tables[0]
    images = _outputs(notebook, "image/png")
    assert len(images) == 1, "the curves, and no sample-efficiency plot for a single few-shot size"


def test_notebook_parameters_come_from_the_environment(tmp_path, monkeypatch):
    """The first code cell holds the parameters: an existing sweep to show, the data, the overrides."""
    import nbformat

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    parameters = next(c for c in notebook.cells if c.cell_type == "code")
    monkeypatch.setenv("TRANSFERLAB_NOTEBOOK_SWEEP", str(tmp_path / "sweep"))
    monkeypatch.setenv("TRANSFERLAB_NOTEBOOK_DATA", str(tmp_path / "cifar"))
    monkeypatch.setenv("TRANSFERLAB_NOTEBOOK_OVERRIDES", "trainer.max_epochs=1 seed=3")
    namespace: dict = {}
    exec(compile(parameters.source, "parameters", "exec"), namespace)
    assert Path(namespace["SWEEP_DIR"]) == tmp_path / "sweep"
    assert namespace["DATA_ROOT"] == (tmp_path / "cifar").resolve()
    assert namespace["OVERRIDES"] == ["trainer.max_epochs=1", "seed=3"]
