"""notebooks/tour.ipynb runs from top to bottom, and is committed with its outputs.

The kernel is this interpreter's own ipykernel: the kernel-spec lookup is limited to the native
kernel, which ipykernel builds from ``sys.executable``, so no installed kernel spec is needed
and none elsewhere on the machine can take its place.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")
pytest.importorskip("torch")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "tour.ipynb"


def _kernel_manager():
    """A kernel manager whose only kernel is ipykernel on ``sys.executable``."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager

    specs = KernelSpecManager(kernel_dirs=[], ensure_native_kernel=True)
    return AsyncKernelManager(kernel_name="python3", kernel_spec_manager=specs)


def _errors(nb) -> list[str]:
    return [f"cell {i}: {out.get('ename')}: {out.get('evalue')}"
            for i, cell in enumerate(nb.cells) if cell.cell_type == "code"
            for out in cell.get("outputs", []) if out.get("output_type") == "error"]


def test_committed_with_outputs() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code and all(cell.execution_count for cell in code)
    assert not _errors(nb)
    images = sum("image/png" in out.get("data", {}) for cell in code for out in cell.outputs)
    assert images >= 6  # the plots were drawn


@pytest.mark.slow
def test_tour_executes_without_errors() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.executable)"))
    client = nbclient.NotebookClient(
        nb, km=_kernel_manager(), timeout=300, startup_timeout=120,
        resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()  # raises CellExecutionError on the first failing cell
    assert not _errors(nb)
    printed = "".join(out.get("text", "") for out in nb.cells[-1].outputs)
    assert Path(printed.strip()).resolve() == Path(sys.executable).resolve()
