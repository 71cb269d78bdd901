"""notebooks/noise_and_model.ipynb runs top to bottom (nbclient, the venv's python3 kernel) and is current."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "noise_and_model.ipynb"
SCRIPT = ROOT / "scripts" / "make_noise_notebook.py"


def _builder():
    spec = importlib.util.spec_from_file_location("make_noise_notebook", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_notebook_is_generated_and_has_no_outputs() -> None:
    on_disk = nbformat.read(NOTEBOOK, as_version=4)
    built = _builder().build()
    assert [c.source for c in on_disk.cells] == [c.source for c in built.cells], (
        "notebook differs from scripts/make_noise_notebook.py: run `python scripts/make_noise_notebook.py`"
    )
    code = [c for c in on_disk.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code), (
        "commit it without outputs"
    )


def test_notebook_executes_without_errors() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    ).execute()  # raises CellExecutionError naming the cell if any cell fails
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, [f"{e.ename}: {e.evalue}" for e in errors]
    text = "\n".join(
        o.get("text", "") + str(o.get("data", {}).get("text/plain", ""))
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
    )
    assert "notebook ran in" in text  # the last cell ran to its end
    for comp in ("line_jitter", "charging", "shot", "quantization"):
        assert comp in text  # the per-component table was displayed
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 4, f"expected the figures inline, got {len(images)}"
    print(text[text.index("notebook ran in") :].splitlines()[0])
