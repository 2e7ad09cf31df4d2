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


@pytest.mark.slow
def test_beyond(monkeypatch: Any, tmp_path: Path) -> None:
    import pickle

    monkeypatch.setenv("TMPDIR", str(tmp_path))  # where the notebook saves the trace snapshot
    cells = run("beyond", monkeypatch, allow_errors=True)
    assert not any("raises-exception" in c.metadata.get("tags", []) for c in cells)

    def cell(start: str) -> Any:
        return next(c for c in cells if c.source.startswith(start))

    def errors(c: Any) -> list[str]:
        return [o.ename for o in c.outputs if o.output_type == "error"]

    def panel(c: Any) -> str:
        """The diagnosis a cell's panel shows: the live widget for the last OOM; an earlier
        panel, retired by a newer one, reads as its text and HTML, saying so."""
        shown = [o for o in c.outputs if o.output_type == "display_data"]
        assert shown, "a panel"
        plain = str(shown[0].data["text/plain"])
        assert WIDGET in shown[0].data or plain.endswith(
            "A newer out-of-memory diagnosis replaced this panel."
        ), "a live panel, or one that says a newer one replaced it"
        return plain

    failed = {c.source.splitlines()[0]: errors(c) for c in cells if errors(c)}
    assert failed == {
        "def build(device, layers=4):": ["OutOfMemoryError"],
        'labels = torch.randint(0, 1000, (65536,), device="cuda")': ["OutOfMemoryError"],
        "batches = []": ["OutOfMemoryError"],
        "del batches": ["OutOfMemoryError"],
    }, "only the four OOM cells fail, once each"

    # 1. every GPU: both listed; GPU 0's OOM points at GPU 1, which then holds the model
    status = text(cell("%gpumem status"))
    pid = int(re.search(r"pid (\d+)\s+320 MiB \(simulated other process\)", status).group(1))
    assert "2 GPUs visible" in status and "GPU 1\n" in status
    oom = panel(cell("def build("))
    assert "on CUDA GPU 0" in oom
    assert f"Other processes use the GPU. pid {pid} (simulated other process) 320 MiB" in oom
    assert "GPU 1 has 512 MiB free: `model.to('cuda:1')`" in oom
    moved = text(cell('model = build("cuda:1")'))
    assert "output (64, 4096) | on GPU 1: 257 MiB" in moved
    assert "GPU 1\n  device    262 MiB used" in moved  # 257 MiB in the allocator's segments

    # 2. what each cell cost: a quiet line after each, the history, the cells that filled the card
    first, second = cell("embeddings = "), cell("normed = ")
    # the peak is read without resetting the notebook's own peak counters: where an earlier cell's
    # peak hides this one's it is a bound ("peak ≤ 261 MiB"), never below what the cell added
    assert f"In [{first.execution_count}]: +128 MiB, peak " in text(first)
    assert f"In [{second.execution_count}]: +128 MiB, peak" in text(second)
    history = text(cell("%gpumem history"))
    assert f"In [{first.execution_count}]  +128 MiB" in history
    assert f"In [{second.execution_count}]  +128 MiB" in history
    filled = cell("labels = ")
    assert "Tried to allocate 500 MiB with 254 MiB free" in panel(filled)
    assert (
        f"The card filled over these cells: In [{first.execution_count}] +128 MiB, "
        f"In [{second.execution_count}] +128 MiB." in panel(filled)
    )
    assert "out of memory" in text(filled).splitlines()[-1]  # the cell's own quiet line

    # 3. which line allocated it: the function's line and the cell that defined it; the snapshot
    defined = cell("def load_batch(n):").execution_count
    traced = panel(cell("batches = []"))
    assert (
        f"Allocated by (tracing on)\n  `load_batch` (In [{defined}]), line 3: 441 MiB in 4 tensors"
        in traced
    )
    assert "The card filled over these cells" not in traced  # `cells off`: no stale note
    saved = text(cell("path = "))
    path = Path(
        re.search(r"Saved (\S+): open it at https://pytorch.org/memory_viz", saved).group(1)
    )
    assert path.parent == tmp_path and path.exists()
    with path.open("rb") as f:
        assert "segments" in pickle.load(f)

    # 4. other notebooks: the process that is no Jupyter kernel is named, and not shut down
    refused = text(cell("%gpumem shutdown"))  # a UsageError is one line on stderr
    assert (
        f"UsageError: %gpumem shutdown: pid {pid} is not a Jupyter kernel seen from here" in refused
    )
    assert "the other job is still running: True" in text(cell('print("the other job'))

    # 5. past one GPU: the numbers, the sharding arithmetic, the launch cell shown and not run
    states = panel(cell("del batches"))
    last = [o for o in cell("del batches").outputs if o.output_type == "display_data"]
    assert WIDGET in last[0].data, "the last OOM's panel is the one live widget"
    assert "The model's own states do not fit this card, whatever the batch" in states
    assert (
        "Weights 128.03 MiB + gradients 128.03 MiB + optimizer state 256.06 MiB = 512.12 MiB, "
        "on a card of 512 MiB" in states
    )
    assert "2 GPUs 256.06 MiB each, 4 GPUs 128.03 MiB each, 8 GPUs 64.02 MiB each" in states
    launch = text(cells[-1])
    assert "notebook_launcher(training_function, num_processes=NUM_GPUS)" in launch
    assert "FullyShardedDataParallelPlugin" in launch
    assert not any("notebook_launcher" in c.source for c in cells)  # shown, never run
