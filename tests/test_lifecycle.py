"""Load and unload in a real InteractiveShell: unload undoes everything load (and the magics) did."""

from __future__ import annotations

import gc
import re
import weakref
from typing import Any

import pytest

import jupyter_gpumem
from tests.conftest import Kernel, extension


def _state(sh: Any) -> dict[str, Any]:
    """Everything of the shell's that loading the extension touches, by identity where it can."""
    mm = sh.magics_manager
    return {
        "configurables": [id(c) for c in sh.configurables],
        "events": {name: list(cbs) for name, cbs in sh.events.callbacks.items()},
        "line magics": dict(mm.magics["line"]),
        "cell magics": dict(mm.magics["cell"]),
        "registry": dict(mm.registry),
        "custom_exceptions": sh.custom_exceptions,
        "CustomTB": sh.CustomTB,
        "loaded": dict(jupyter_gpumem._loaded),
    }


def test_a_hundred_load_unload_cycles_leave_nothing(bare_shell: Any) -> None:
    sh = bare_shell
    # IPython loads its own %load_ext/%unload_ext on first use: before the snapshot
    sh.run_cell("%unload_ext jupyter_gpumem", store_history=False)
    before = _state(sh)
    for _ in range(100):
        sh.run_cell("%load_ext jupyter_gpumem", store_history=False)
        sh.run_cell("%unload_ext jupyter_gpumem", store_history=False)
    assert _state(sh) == before


def test_an_unloaded_extension_is_garbage(bare_shell: Any) -> None:
    bare_shell.run_cell("%load_ext jupyter_gpumem")
    ext = weakref.ref(extension(bare_shell))
    bare_shell.run_cell("%unload_ext jupyter_gpumem")
    gc.collect()
    assert ext() is None, gc.get_referrers(ext())


def test_unload_stops_the_simulation_it_started_and_restores_torch_cuda(bare_shell: Any) -> None:
    torch = pytest.importorskip("torch")
    from jupyter_gpumem.backends import simulated

    cuda_before = dict(vars(torch.cuda))
    available = torch.cuda.is_available()
    bare_shell.run_cell("%load_ext jupyter_gpumem")
    bare_shell.run_cell("%gpumem simulate 160MiB")
    assert torch.cuda.is_available() and simulated.current() is not None
    bare_shell.run_cell("%unload_ext jupyter_gpumem")
    assert simulated.current() is None
    assert torch.cuda.is_available() is available
    after = dict(vars(torch.cuda))
    assert after.keys() == cuda_before.keys()
    changed = [k for k in after if after[k] is not cuda_before[k]]
    assert changed == []


def test_a_simulation_started_from_python_is_the_callers(bare_shell: Any) -> None:
    pytest.importorskip("torch")
    from jupyter_gpumem.backends import simulated

    sim = jupyter_gpumem.simulate("160MiB")
    bare_shell.run_cell("%load_ext jupyter_gpumem")
    bare_shell.run_cell("%unload_ext jupyter_gpumem")
    assert simulated.current() is sim
    jupyter_gpumem.stop_simulation()


def test_reload_keeps_a_running_simulation_and_unload_then_ends_it(bare_shell: Any) -> None:
    """`%reload_ext` is unload then load: the cells after it still run on the simulated card (was:
    "Torch not compiled with CUDA enabled"); the reloaded extension owns it, so unload ends it."""
    pytest.importorskip("torch")
    from jupyter_gpumem.backends import simulated

    bare_shell.run_cell("%load_ext jupyter_gpumem")
    bare_shell.run_cell("%gpumem simulate 160MiB")
    sim = simulated.current()
    bare_shell.run_cell("import torch\nx = torch.ones(4, device='cuda')")
    bare_shell.run_cell("%reload_ext jupyter_gpumem")
    assert simulated.current() is sim
    assert bare_shell.run_cell("y = torch.ones(4, device='cuda') + x").success
    assert bare_shell.run_cell("%gpumem status").success
    bare_shell.run_cell("del x, y")
    bare_shell.run_cell("%unload_ext jupyter_gpumem")
    assert simulated.current() is None


def _live(result: dict[str, Any]) -> int:
    m = re.search(r"live=(\d+)", Kernel.text(result))
    assert m, Kernel.text(result)
    return int(m.group(1))


@pytest.mark.kernel
def test_live_widgets_stay_flat_over_twenty_ooms_and_unload_closes_them(kernel: Any) -> None:
    """In a real ipykernel: each OOM's panel retires the one before (its output becomes the
    diagnosis as HTML, its widgets closed), so the kernel's live widgets do not grow with OOMs
    (was: about 33 more per OOM, 254 -> 584 over 10), and unload leaves none of ours."""
    pytest.importorskip("torch")
    pytest.importorskip("ipywidgets")
    k = kernel
    k.run("%load_ext jupyter_gpumem\n%gpumem simulate 64MiB\nimport torch")
    count = "from ipywidgets.widgets import widget as _w\nprint(f'live={len(_w._instances)}')"
    oom = "x = torch.empty(80 << 20, dtype=torch.uint8, device='cuda')"
    k.run(oom)
    after_one = _live(k.run(count))
    for _ in range(20):
        k.run(oom)
    after_many = _live(k.run(count))
    assert after_many <= after_one + 2, (after_one, after_many)
    retired = k.run(oom)
    updates = [o for o in retired["outputs"] if o["type"] == "update_display_data"]
    assert (
        updates
        and "A newer out-of-memory diagnosis replaced this panel"
        in (updates[0]["data"]["text/html"])
    ), "the replaced panel's output reads as the diagnosis, and says why"
    k.run("%unload_ext jupyter_gpumem")
    gone = _live(k.run(count))
    assert gone < after_one, (after_one, gone)
