"""Every notebook runs top to bottom with nbclient: figures and key tables on a filled store, "not enough data"
on an empty one, and none is committed with outputs."""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
KERNEL = "meshlens-test-python"
# A displayed DataFrame with at least one row: pandas writes `<tbody>` then the first `<tr>`.
TABLE_ROW = re.compile(r"<tbody>\s*<tr>")


@pytest.fixture(scope="session")
def kernel_env(tmp_path_factory):
    """A kernelspec that runs this interpreter (the venv's), found through JUPYTER_PATH, for the whole session."""
    share = tmp_path_factory.mktemp("jupyter")
    spec = share / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "meshlens tests", "language": "python"}))
    saved = {k: os.environ.get(k) for k in ("JUPYTER_PATH", "MPLBACKEND", "MESHLENS_STORE", "MESHLENS_WINDOW")}
    os.environ["JUPYTER_PATH"] = str(share)
    for k in ("MPLBACKEND", "MESHLENS_WINDOW"):
        os.environ.pop(k, None)
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def execute(path: Path, store_url: str) -> nbformat.NotebookNode:
    """Run the notebook in a fresh kernel with MESHLENS_STORE set; a cell error fails the test."""
    book = nbformat.read(path, as_version=4)
    os.environ["MESHLENS_STORE"] = store_url
    try:
        NotebookClient(book, timeout=600, kernel_name=KERNEL,
                       resources={"metadata": {"path": str(ROOT)}}).execute()
    finally:
        os.environ.pop("MESHLENS_STORE", None)
    return book


def outputs(cell) -> list:
    return cell.get("outputs", []) if cell.cell_type == "code" else []


def text_of(cell) -> str:
    parts = []
    for o in outputs(cell):
        parts.append(o.get("text", "") if o.output_type == "stream" else "")
        parts.extend(str(v) for k, v in o.get("data", {}).items() if k.startswith("text/"))
    return "".join(parts)


def test_there_are_notebooks():
    assert {p.stem for p in NOTEBOOKS} >= {"traffic_overview", "latency_timeouts", "errors_retries", "mtls_readiness"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebooks_are_committed_without_outputs(path):
    book = nbformat.read(path, as_version=4)
    for cell in book.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: clear the outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_with_figures_and_key_tables(path, notebook_store_url, kernel_env):
    book = execute(path, notebook_store_url)
    cells = [c for c in book.cells if c.cell_type == "code"]
    assert not [o for c in cells for o in outputs(c) if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for c in cells for o in outputs(c)), "no figure"
    keys = [c for c in cells if "key-table" in c.metadata.get("tags", [])]
    assert keys
    for c in keys:
        html = "".join(o.get("data", {}).get("text/html", "") for o in outputs(c))
        assert TABLE_ROW.search(html), f"empty key table in {path.name}: {text_of(c)[:500]}"
        assert "not enough data —" not in text_of(c)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_says_not_enough_data_on_an_empty_store(path, empty_store_url, kernel_env):
    book = execute(path, empty_store_url)
    text = "".join(text_of(c) for c in book.cells)
    assert "not enough data" in text and "holds no calls yet" in text
