"""The panel's sections beyond one card: every visible GPU with the OOM's marked, and "Allocated
by" when tracing is on (a table with a bar per row, Save snapshot), through a real InteractiveShell
on the simulated GPU; the widget's content is checked as the browser would receive it."""

from __future__ import annotations

import html
import re
from typing import Any

import pytest

import jupyter_gpumem

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

    ext = jupyter_gpumem._extension_for(shell)
    assert ext.hook.last_failure is not None
    return DiagnosisPanel(ext, ext.hook.last_failure)


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
