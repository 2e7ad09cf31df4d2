"""The notebooks in notebooks/ run in a real kernel (nbclient) and show what they promise."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

pytestmark = pytest.mark.kernel
ROOT = Path(__file__).resolve().parents[1]
WIDGET = "application/vnd.jupyter.widget-view+json"


def run(name: str, monkeypatch: Any, allow_errors: bool = False) -> list[Any]:
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    nbclient.NotebookClient(
        nb,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(ROOT)}},
        allow_errors=allow_errors,
    ).execute()
    return [c for c in nb.cells if c.cell_type == "code"]


def text(cell: Any) -> str:
    parts = []
    for o in cell.outputs:
        if o.output_type == "stream":
            parts.append(o.text)
        elif o.output_type in ("display_data", "execute_result"):
            parts.append(o.data.get("text/plain", ""))
        elif o.output_type == "error":
            parts.append(f"{o.ename}: {o.evalue}")
    return "".join(parts)


def test_quickstart(monkeypatch: Any) -> None:
    # No `raises-exception` tag on the OOM cell: JupyterLab sends such a cell with
    # stop_on_error=False, and Run All would go past the OOM. Here the run goes on past it.
    cells = run("quickstart", monkeypatch, allow_errors=True)
    assert not any("raises-exception" in c.metadata.get("tags", []) for c in cells)
    failed = [c for c in cells if any(o.output_type == "error" for o in c.outputs)]
    assert len(failed) == 1, "only the OOM cell fails"
    oom = failed[0]
    errors = [o for o in oom.outputs if o.output_type == "error"]
    assert [e.ename for e in errors] == ["OutOfMemoryError"]
    panel = [o for o in oom.outputs if o.output_type == "display_data"]
    assert panel and WIDGET in panel[0].data, "the panel is a widget"
    assert "GPU out of memory: Tried to allocate" in panel[0].data["text/plain"]
    assert "Reduce batch" in panel[0].data["text/plain"]
    retry = next(c for c in cells if c.source.strip() == "%gpumem retry batch")
    out = text(retry)
    found = int(re.search(r"Fits at batch (\d+) \(was 64\)", out).group(1))
    assert 1 < found < 64
    assert f"To make it permanent: change line 1 to: batch_size = {found}" in out
    after = text(cells[cells.index(retry) + 1])
    assert f"batch_size = {found} | logits: ({found}, 4)" in after
    assert f"starting at batch {found}, which fit this cell last time" in text(cells[-1])


def test_training(monkeypatch: Any) -> None:
    cells = run("training", monkeypatch)
    outs = [text(c) for c in cells]
    guarded = next(t for t in outs if "stopped before re-running" in t)
    assert "`step += 1`" in guarded and "--force" in guarded
    assert "step = 1 | losses = [nan]" in outs[outs.index(guarded) + 1]
    rescued = next(t for t in outs if "oomsafe: Fits at batch" in t)
    batch = int(re.search(r"Fits at batch (\d+) \(was 512\)", rescued).group(1))
    assert f"change line 1 to: batch_size = {batch}" in rescued
    assert f"batch_size = {batch} | steps run: 3" in outs[outs.index(rescued) + 1]
    autocast = next(t for t in outs if "enable autocast" in t)
    assert "fits under autocast (bfloat16)" in autocast and "Numerics change" in autocast
    assert outs[-1].startswith("torch.bfloat16")


def test_gauge(monkeypatch: Any) -> None:
    cells = run("gauge", monkeypatch)
    gauge = next(c for c in cells if c.source.strip() == "%gpumem gauge")
    assert any(WIDGET in o.get("data", {}) for o in gauge.outputs)
    assert "allocated 576 MiB" in "".join(text(c) for c in cells)
    sidebar = next(c for c in cells if c.source.strip() == "%gpumem sidebar")
    assert "No JupyterLab here: the gauge is shown inline" in text(sidebar)
    assert any(WIDGET in o.get("data", {}) for o in sidebar.outputs)
    assert "Sidebar gauge closed." in text(cells[-1])
