"""Settings that act at load: ``c.GpuMem.trace = True`` traces as ``%gpumem trace on`` does."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import pytest

from jupyter_gpumem.readings import trace

pytest.importorskip("torch")


@pytest.fixture
def configured() -> Iterator[Any]:
    """A real InteractiveShell with ``GpuMem.trace`` set in its config, as ipython_config.py
    would; the extension is loaded by the test."""
    from IPython.core.interactiveshell import InteractiveShell

    InteractiveShell.clear_instance()
    sh = InteractiveShell.instance(colors="nocolor")
    sh.config.GpuMem.trace = True
    yield sh
    sh.run_cell("%unload_ext jupyter_gpumem", store_history=False)
    trace.stop()
    for name in ("last_type", "last_value", "last_traceback", "last_exc"):
        if hasattr(sys, name):
            setattr(sys, name, None)
    InteractiveShell.clear_instance()


def test_trace_setting_traces_from_load_and_the_oom_says_which_line(
    configured: Any, run: Any
) -> None:
    assert not trace.active()
    run(configured, "%load_ext jupyter_gpumem")
    assert trace.active()  # torch is imported here already: tracing starts with the extension
    run(configured, "%gpumem simulate 64MiB")
    out = run(
        configured,
        "import torch\n"
        "big = torch.zeros(10 * 2**20, device='cuda')\n"
        "more = torch.zeros(10 * 2**20, device='cuda')",
    ).text
    assert "Allocated by (tracing on)" in out and "line 2" in out, out
    run(configured, "%unload_ext jupyter_gpumem")
    assert not trace.active()


def test_trace_setting_waits_for_torch_and_never_imports_it(
    configured: Any, run: Any, monkeypatch: Any
) -> None:
    torch = sys.modules["torch"]
    monkeypatch.delitem(sys.modules, "torch")  # a kernel that has not imported torch yet
    run(configured, "%load_ext jupyter_gpumem")
    run(configured, "x = 1")
    assert not trace.active() and "torch" not in sys.modules
    monkeypatch.setitem(sys.modules, "torch", torch)  # the user's `import torch`
    run(configured, "import torch")
    assert trace.active()


def test_setting_it_later_turns_tracing_on_and_off(shell: Any, run: Any) -> None:
    assert not trace.active()
    run(shell, "%config GpuMem.trace = True")
    assert trace.active()
    run(shell, "%config GpuMem.trace = False")
    assert not trace.active()
