"""The panel's sections beyond one card: every visible GPU with the OOM's marked, and "Allocated
by" when tracing is on (a table with a bar per row, Save snapshot), through a real InteractiveShell
on the simulated GPU; the widget's content is checked as the browser would receive it."""

from __future__ import annotations

import html
import re
from typing import Any

import pytest

import jupyter_gpumem
from tests.conftest import extension

pytest.importorskip("torch")
pytest.importorskip("ipywidgets")

# a 4 MiB model on GPU 1, then more than GPU 1 has room for; GPU 0 holds 64 MiB
FILL_GPU_1 = (
    "import torch\n"
    "a = torch.empty(64 * 2**20, dtype=torch.uint8, device='cuda:0')\n"
    "model = torch.nn.Linear(1024, 1024).to('cuda:1')\n"
    "x = torch.empty(240 * 2**20, dtype=torch.uint8, device='cuda:1')"
)


def _panel(shell: Any) -> Any:
    from jupyter_gpumem.ui.panel import DiagnosisPanel

    ext = extension(shell)
    assert jupyter_gpumem.last_failure(ext.shell) is not None
    return DiagnosisPanel(ext, jupyter_gpumem.last_failure(ext.shell))


def _html(widget: Any) -> str:
    out, stack = [], [widget]
    while stack:
        w = stack.pop()
        out.append(str(getattr(w, "value", "")))
        out.append(str(getattr(w, "description", "")))
        stack.extend(getattr(w, "children", ()))
    return "\n".join(out)


def _text(fragment: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", " ", fragment))


def _device_rows(page: str) -> list[str]:
    section = page.split('class="gpumem-devices"', 1)[1].split("</table>", 1)[0]
    rows = re.findall(r"<tr[^>]*>(.*?)</tr>", section)
    return [" ".join(_text(r).split()) for r in rows[1:]]


def test_the_panel_shows_every_gpu_with_the_ooms_marked(shell: Any) -> None:
    shell.run_cell("%gpumem simulate 256MiB --devices 2")
    result = shell.run_cell(FILL_GPU_1, store_history=True)
    assert not result.success
    page = _html(_panel(shell).widget)
    assert "2 GPUs visible" in page
    rows = _device_rows(page)
    assert [r.split()[:2] for r in rows] == [["GPU", "0"], ["GPU", "1"]]
    assert [r for r in rows if "◀ this OOM" in r] == [rows[1]], rows
    # used and free as the driver counts them, in the units of the text around them
    assert rows[0] == "GPU 0 64.00 MiB 192 MiB 256 MiB", rows[0]
    assert rows[1] == "GPU 1 ◀ this OOM 22.00 MiB 234 MiB 256 MiB", rows[1]
    bars = re.findall(r'gpumem-minibar[^>]*><span style="width:([0-9.]+)%', page)
    assert [float(b) for b in bars] == [25.0, pytest.approx(100 * 22 / 256, abs=0.05)]


def test_one_gpu_shows_no_devices_table(shell: Any) -> None:
    shell.run_cell("%gpumem simulate 256MiB")
    shell.run_cell(FILL_GPU_1.replace("cuda:1", "cuda:0"), store_history=True)
    assert 'class="gpumem-devices"' not in _html(_panel(shell).widget)


# ---- Allocated by ---------------------------------------------------------------------------------
TRACED_OOM = (
    "a = torch.zeros(15 << 20, device='cuda')  # 60 MiB\n"
    "model = torch.nn.Sequential(torch.nn.Linear(1024, 1024)).cuda()\n"
    "b = torch.zeros(15 << 20, device='cuda')  # 60 MiB\n"
    "c = torch.zeros(15 << 20, device='cuda')  # 60 MiB: out of memory\n"
)


@pytest.fixture
def traced_failure(shell: Any) -> Any:
    from jupyter_gpumem.readings import trace

    shell.run_cell("%gpumem simulate 160MiB")
    shell.run_cell("import torch")
    shell.run_cell("%gpumem trace on")
    n = shell.execution_count
    assert not shell.run_cell(TRACED_OOM, store_history=True).success
    yield n
    trace.stop()


def _alloc_rows(page: str) -> list[str]:
    section = page.split('class="gpumem-allocs"', 1)[1].split("</table>", 1)[0]
    return [" ".join(_text(r).split()) for r in re.findall(r"<tr[^>]*>(.*?)</tr>", section)[1:]]


def test_allocated_by_is_a_table_with_a_bar_per_row(shell: Any, traced_failure: int) -> None:
    n = traced_failure
    panel = _panel(shell)
    page = _html(panel.widget)
    rows = _alloc_rows(page)
    assert rows[:2] == [f"In [{n}], line 1 60.00 MiB 1", f"In [{n}], line 3 60.00 MiB 1"], rows
    assert rows[2].startswith(f"In [{n}], line 2 4.00 MiB 2"), rows  # the model's weight, bias
    assert "Allocated by</b> (tracing on)" in page
    section = page.split('class="gpumem-allocs"', 1)[1]
    bars = [
        float(b) for b in re.findall(r'gpumem-minibar[^>]*><span style="width:([0-9.]+)%', section)
    ]
    assert len(bars) == len(rows) and bars[0] == bars[1] > bars[2] > 0, bars
    # the text list of render_html is not repeated above the table
    assert page.count(f"In [{n}], line 1") == 1
    assert panel.allocations.save is not None
    assert panel.allocations.save.description == "Save snapshot"


def test_save_snapshot_writes_the_pickle_and_says_where(
    shell: Any, traced_failure: int, tmp_path: Any, monkeypatch: Any
) -> None:
    import pickle

    monkeypatch.chdir(tmp_path)
    panel = _panel(shell)
    panel.allocations.save.click()  # what the browser's click runs
    path = tmp_path / "gpumem_snapshot.pickle"
    assert path.exists() and panel.allocations.saved == str(path)
    data = pickle.loads(path.read_bytes())
    assert "segments" in data and "device_traces" in data  # what pytorch.org/memory_viz reads
    status = _text(panel.status.value)
    assert f"Saved {path}" in " ".join(status.split())
    assert "nothing is uploaded" in status

    shell.run_cell("%gpumem trace off")
    panel.allocations.save.click()
    assert "Tracing is off now" in panel.status.value


def test_with_tracing_off_the_panel_says_how_to_turn_it_on(shell: Any) -> None:
    from jupyter_gpumem.diagnosis.render import render_text

    shell.run_cell("%gpumem simulate 160MiB")
    # 100 MiB held where no variable reaches it: the holders table cannot explain it
    shell.run_cell(
        "import torch, sys\n"
        "sys._gpumem_test_hidden = torch.empty(100 * 2**20, dtype=torch.uint8, device='cuda')"
    )
    try:
        shell.run_cell("x = torch.empty(100 * 2**20, dtype=torch.uint8, device='cuda')")
        panel = _panel(shell)
        page = " ".join(_text(_html(panel.widget)).split())
        hint = "100 MiB is in no variable: %gpumem trace on shows which lines allocate it"
        assert hint in page
        assert panel.allocations.save is None and 'class="gpumem-allocs"' not in _html(panel.widget)
        d = jupyter_gpumem.last_failure(shell).diagnosis
        assert hint in render_text(d).replace("`", ""), "the same words as the text diagnosis"
    finally:
        shell.run_cell("del sys._gpumem_test_hidden")
