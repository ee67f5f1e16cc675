"""Execute notebooks/quickstart.ipynb in a Jupyter kernel of this interpreter and check its outputs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT

nbformat = pytest.importorskip("nbformat", reason="nbformat is a dev dependency (pip install -e '.[dev]')")

NOTEBOOK = REPO_ROOT / "notebooks" / "quickstart.ipynb"

# The first cell of the executed copy. The kernel prints its interpreter, so a user-level `python3` kernel
# spec that points at another Python fails the test with a clear message instead of testing another install.
INTERPRETER_PROBE = "import sys\nprint(sys.executable)"


def cell_with_tag(notebook, tag: str):
    cells = [cell for cell in notebook.cells if tag in cell.metadata.get("tags", [])]
    assert len(cells) == 1, f"expected one cell tagged {tag!r}, found {len(cells)}"
    return cells[0]


def stream_text(cell) -> str:
    return "".join(output.get("text", "") for output in cell.outputs if output.output_type == "stream")


def test_notebook_is_committed_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)

    for index, cell in enumerate(notebook.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"cell {index} has outputs: clear them before committing"
            assert cell.execution_count is None, f"cell {index} has an execution count"


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    nbclient = pytest.importorskip("nbclient", reason="nbclient is a dev dependency (pip install -e '.[dev]')")
    pytest.importorskip("ipykernel", reason="ipykernel is a dev dependency (pip install -e '.[dev]')")
    pytest.importorskip("matplotlib", reason="matplotlib is a dev dependency (pip install -e '.[dev]')")

    # The kernel inherits this environment. Without MPLBACKEND it uses the inline backend, which needs no
    # display and sends figures back as PNG outputs. TMPDIR puts the notebook's run folder under tmp_path.
    monkeypatch.delenv("MPLBACKEND", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    notebook.cells.insert(0, nbformat.v4.new_code_cell(INTERPRETER_PROBE))

    client = nbclient.NotebookClient(
        notebook,
        kernel_name="python3",
        timeout=600,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    # execute() raises CellExecutionError, with the cell's source and traceback, when a cell fails.
    client.execute()

    probe_output = stream_text(notebook.cells[0]).strip()
    assert Path(probe_output).resolve() == Path(sys.executable).resolve(), (
        f"the python3 kernel runs {probe_output}, not {sys.executable}: "
        "remove the user-level kernel spec or install ipykernel into this environment"
    )

    for index, cell in enumerate(notebook.cells):
        if cell.cell_type != "code":
            continue
        errors = [output for output in cell.outputs if output.output_type == "error"]
        assert errors == [], f"cell {index} raised {errors[0].ename}: {errors[0].evalue}"
        assert cell.execution_count is not None, f"cell {index} did not run"

    run_folders = list(tmp_path.glob("ptuning-quickstart-*"))
    assert len(run_folders) == 1, run_folders
    assert (run_folders[0] / "export" / "prefix.safetensors").is_file()
    assert (run_folders[0] / "csv" / "metrics.csv").is_file()

    train_results = [output for output in cell_with_tag(notebook, "train").outputs
                     if output.output_type == "execute_result"]
    assert len(train_results) == 1
    assert "val/loss" in train_results[0]["data"]["text/plain"]

    generated = stream_text(cell_with_tag(notebook, "generate"))
    assert generated.count("  generated: ") == 3, generated

    plot_outputs = cell_with_tag(notebook, "plot").outputs
    assert any("image/png" in output.get("data", {}) for output in plot_outputs), plot_outputs
