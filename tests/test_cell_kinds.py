"""Every kind of cell an OOM can come from, in a real InteractiveShell on the simulated GPU: a
script run with ``%run`` (IPython shows its error itself, without the custom handler), an
ExceptionGroup holding the OOM, and a cell with top-level ``await`` (its fixes:
``test_await_cells.py``)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

import jupyter_gpumem

torch = pytest.importorskip("torch")

SCRIPT = """\
import torch

def step():
    kept = torch.empty(8 << 20, device="cuda")  # 32 MiB held by the failing frame
    more = torch.empty(64 << 20, device="cuda")  # 256 MiB: out of memory
    return kept, more

step()
"""


@pytest.mark.parametrize("flag", ["", "-i "])
def test_an_oom_in_a_run_script_is_diagnosed_and_its_memory_freed(
    shell: Any, run: Any, tmp_path: Path, flag: str
) -> None:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    shell.run_cell("%gpumem simulate 64MiB")
    out = run(shell, f"%run {flag}{script}").text
    assert "OutOfMemoryError" in out, "IPython's own traceback is still shown"
    assert "GPU out of memory: Tried to allocate 256 MiB" in out
    assert "Freed 32.00 MiB that the failed cell pinned" in out
    assert torch.cuda.memory_allocated() == 0, "the failed frame no longer holds `kept`"
    failed = jupyter_gpumem.last_failure(shell)
    assert failed is not None and failed.report.requested_bytes == 256 << 20
    # the next cell is not diagnosed again for the same error
    assert "GPU out of memory" not in run(shell, "x = 1").text


def test_a_run_script_that_fails_otherwise_is_left_as_ipython_shows_it(
    shell: Any, run: Any, tmp_path: Path
) -> None:
    script = tmp_path / "bad.py"
    script.write_text("raise ValueError('not memory')\n")
    out = run(shell, f"%run {script}").text
    assert "ValueError: not memory" in out and "GPU out of memory" not in out
    assert jupyter_gpumem.last_failure(shell) is None


@pytest.mark.skipif(sys.version_info < (3, 11), reason="ExceptionGroup is Python 3.11+")
def test_an_exception_group_holding_an_oom_is_diagnosed(shell: Any, run: Any) -> None:
    shell.run_cell("%gpumem simulate 64MiB")
    out = run(
        shell,
        "import torch\n"
        "try:\n"
        "    y = torch.empty(64 << 20, device='cuda')\n"
        "except Exception as e:\n"
        "    raise ExceptionGroup('workers', [e, ValueError('other')])",
    ).text
    assert "ExceptionGroup" in out and "ValueError: other" in out
    assert "GPU out of memory: Tried to allocate 256 MiB" in out
    assert jupyter_gpumem.last_failure(shell) is not None


def test_a_cell_with_top_level_await_is_diagnosed(shell: Any, run: Any) -> None:
    shell.run_cell("%gpumem simulate 64MiB")
    out = run(
        shell,
        "import asyncio, torch\nawait asyncio.sleep(0)\nz = torch.empty(64 << 20, device='cuda')",
    ).text
    assert "GPU out of memory: Tried to allocate 256 MiB" in out
    failed = jupyter_gpumem.last_failure(shell)
    assert failed is not None and "await asyncio.sleep(0)" in failed.source


def _fail_on_a_leftover(shell: Any) -> None:
    shell.run_cell("%gpumem simulate 64MiB", store_history=True)
    shell.run_cell(
        "import torch\nold = torch.empty(40 << 20, dtype=torch.uint8, device='cuda')",
        store_history=True,
    )
    shell.run_cell(
        "y = torch.empty(40 << 20, dtype=torch.uint8, device='cuda')", store_history=True
    )
    assert jupyter_gpumem.last_failure(shell) is not None


def test_a_retry_after_other_cells_asks_first_in_the_terminal(shell: Any, run: Any) -> None:
    """The panel asks before re-running a stale failure; `%gpumem retry` does too (was: ran)."""
    _fail_on_a_leftover(shell)
    shell.run_cell("note = 'a cell in between'", store_history=True)
    out = run(shell, "%gpumem retry clear --drop old").text
    assert "1 cell ran since" in out and "--force` re-runs it anyway" in out
    assert "old" in shell.user_ns and "y" not in shell.user_ns, "nothing ran"
    out = run(shell, "%gpumem retry clear --drop old --force").text
    assert "y" in shell.user_ns and "old" not in shell.user_ns, out


def test_a_retry_of_a_failure_already_fixed_asks_first(shell: Any, run: Any) -> None:
    _fail_on_a_leftover(shell)
    out = run(shell, "%gpumem retry clear --drop old").text
    assert "y" in shell.user_ns, out
    shell.user_ns["y"] = "kept by the user"
    out = run(shell, "%gpumem retry clear").text
    assert "was already fixed (Clear cache)" in out, out
    assert shell.user_ns["y"] == "kept by the user", "the fixed cell did not run again"


def test_a_cell_naming_hostile_objects_still_gets_its_diagnosis(shell: Any, run: Any) -> None:
    """An object whose ``__class__`` raises and a dead ``weakref.proxy``, both named by the cell:
    the diagnosis is built (was: 'could not build the diagnosis (RuntimeError: ...)')."""
    shell.run_cell("%gpumem simulate 64MiB")
    shell.run_cell(
        "import torch, weakref\n"
        "class Evil:\n"
        "    @property\n"
        "    def __class__(self):\n"
        "        raise RuntimeError('no class for you')\n"
        "class T:\n"
        "    pass\n"
        "t = T()\nproxy = weakref.proxy(t)\ndel t\nevil = Evil()"
    )
    out = run(
        shell, "y = torch.empty(80 << 20, dtype=torch.uint8, device='cuda')\nevil; proxy"
    ).text
    assert "could not build the diagnosis" not in out
    assert "GPU out of memory: Tried to allocate 80.00 MiB" in out, out
