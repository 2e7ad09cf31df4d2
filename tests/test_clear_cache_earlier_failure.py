"""Clear cache predicts what clearing gives back when an earlier failure still holds GPU memory
(issue 22, item 3). The same cell run twice on a card too small for it: the first failure's frames
stay for ``%debug`` holding the tensor the variable ``x`` also held then (left on the GPU: copying it
would have freed nothing). The second run rebinds ``x``; the old tensor is then held by those frames
alone, which ``%debug`` no longer shows. Clearing frees it; the prediction counted only the new ``x``
(32 MiB predicted, 64 MiB given back, in docs/benchmarks.md) and now counts both. Through
``%gpumem retry clear`` and the panel's button, in a real InteractiveShell on the simulated GPU."""

from __future__ import annotations

import re
from typing import Any

import pytest

from jupyter_gpumem.units import parse_size

pytest.importorskip("torch")

SETUP = (
    "import torch\n"
    "model = torch.nn.Sequential(torch.nn.Linear(1024, 2048), torch.nn.ReLU(),"
    " torch.nn.Linear(2048, 1024)).cuda()\n"
)
CELL = 'x = torch.randn(256, 32, 1024, device="cuda")\nout = model(x)\n'
_SAVING = re.compile(r"Predicted saving ~([\d.]+ [KMG]?i?B) \([^)]*\), measured ([\d.]+ [KMG]?i?B)")


def _size(text: str) -> int:
    return 0 if text.split()[0] in ("0", "0.0", "0.00") else parse_size(text)


def _fail_twice(shell: Any) -> None:
    shell.run_cell("%gpumem simulate 160MiB")
    assert shell.run_cell(SETUP).success
    assert not shell.run_cell(CELL).success
    assert not shell.run_cell(CELL).success
    old_x = 256 * 32 * 1024 * 4
    # the first run's x is still on the card, held by nothing the notebook names
    held = shell.run_cell("torch.cuda.memory_allocated()").result
    assert held >= sum(p.numel() * 4 for p in shell.user_ns["model"].parameters()) + 2 * old_x


def _predicted_and_measured(text: str) -> tuple[int, int]:
    m = _SAVING.search(text)
    assert m, text
    return _size(m[1]), _size(m[2])


def test_retry_clear_predicts_what_an_earlier_failure_holds(shell: Any, capsys: Any) -> None:
    _fail_twice(shell)
    capsys.readouterr()
    shell.run_cell("%gpumem retry clear --force")
    out = capsys.readouterr().out
    predicted, measured = _predicted_and_measured(out)
    assert measured > 0
    assert abs(predicted - measured) <= 0.005 * measured, out
    assert "cleared the frames of 1 earlier failure" in out, out


@pytest.mark.slow
def test_the_panel_button_predicts_what_an_earlier_failure_holds(shell: Any) -> None:
    """A click runs no cell: the hook still has the earlier failure in hand, and clearing frees
    its frames all the same."""
    import jupyter_gpumem
    from jupyter_gpumem.ui.panel import DiagnosisPanel

    _fail_twice(shell)
    ext = jupyter_gpumem._extension_for(shell)
    panel = DiagnosisPanel(ext, ext.hook.last_failure)
    outcome = panel.click("clear", force=True)
    assert outcome is not None
    predicted, measured = _predicted_and_measured(panel.status.value)
    assert measured > 0 and abs(predicted - measured) <= 0.005 * measured, panel.status.value


def test_a_failure_kept_in_a_variable_is_left_alone(shell: Any, capsys: Any) -> None:
    """An OOM the notebook keeps (``err``) is the user's: its frames are not cleared, and what they
    hold is not promised."""
    _fail_twice(shell)
    shell.run_cell("import sys\nerr = sys.last_value")
    assert not shell.run_cell(CELL).success
    capsys.readouterr()
    shell.run_cell("%gpumem retry clear --force")
    out = capsys.readouterr().out
    predicted, measured = _predicted_and_measured(out)
    assert abs(predicted - measured) <= 0.005 * max(measured, 1), out
    assert shell.user_ns["err"].__traceback__ is not None
    frames = []
    tb = shell.user_ns["err"].__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    assert any(f.f_locals for f in frames if f.f_code.co_name == "forward"), "frames kept"
