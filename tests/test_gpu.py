"""On a real CUDA GPU (skipped elsewhere): findings §1 reproduced in a real kernel, the readings,
and one real cell each for autocast and move-to-CPU. Run with ``pytest -m gpu -s`` to see numbers.
"""

from __future__ import annotations

import pytest

from .conftest import Kernel

pytestmark = pytest.mark.gpu

PINNING_CELL = (
    "def work():\n"
    "    held = torch.empty(8 * 2**30, dtype=torch.uint8, device='cuda')\n"
    "    more = torch.empty(10**15, dtype=torch.uint8, device='cuda')\n"
    "work()"
)
ALLOCATED = "print(torch.cuda.memory_allocated())"


def _allocated(k: Kernel) -> int:
    return int(Kernel.text(k.run(ALLOCATED)).strip())


@pytest.mark.parametrize("with_extension", [False, True])
def test_memory_pinned_by_a_failed_cell(kernel: Kernel, with_extension: bool) -> None:
    k = kernel
    if with_extension:
        k.run("%load_ext jupyter_gpumem")
    k.run("import torch, gc; torch.zeros(1, device='cuda')")
    before = _allocated(k)
    r = k.run(PINNING_CELL)
    assert r["reply"]["ename"] == "OutOfMemoryError"
    after = _allocated(k)
    k.run("gc.collect(); torch.cuda.empty_cache()")
    after_empty = _allocated(k)
    print(
        f"\nwith_extension={with_extension}: before {before / 2**30:.2f} GiB, after the OOM "
        f"{after / 2**30:.2f} GiB, after gc+empty_cache {after_empty / 2**30:.2f} GiB"
    )
    if with_extension:
        assert after == before
        plain = next(o for o in r["outputs"] if o["type"] == "display_data")["data"]["text/plain"]
        assert "Freed 8.00 GiB that the failed cell pinned" in plain
    else:
        assert after_empty >= before + 8 * 2**30, "the baseline: the frame pins the tensor"


def test_real_readings_and_diagnosis_numbers() -> None:
    import torch

    from jupyter_gpumem import find_oom, read_snapshot

    torch.zeros(1, device="cuda")
    snap = read_snapshot()
    assert snap.total_bytes and snap.free_bytes is not None and snap.allocated_bytes is not None
    try:
        torch.empty(10**15, dtype=torch.uint8, device="cuda")
    except torch.OutOfMemoryError as exc:
        found = find_oom(exc)
        assert found is not None
        report = found[1]
        assert report.total_bytes is not None
        assert abs(report.total_bytes - snap.total_bytes) < 0.01 * snap.total_bytes
        assert report.requested_bytes is not None and report.requested_bytes >= 10**15 * 0.99


def test_autocast_and_cpu_fixes_on_a_capped_card(shell) -> None:  # type: ignore[no-untyped-def]
    import torch

    shell.run_cell("import torch; torch.zeros(1, device='cuda')")
    shell.run_cell("%gpumem limit 3GiB")
    shell.run_cell(
        "model = torch.nn.Sequential(*[torch.nn.Linear(4096, 4096) for _ in range(8)]).cuda()"
    )
    cell = "x = torch.randn(32768, 4096, device='cuda')\nloss = model(x).sum()\nloss.backward()\n"
    shell.run_cell(cell)
    ext = __import__("jupyter_gpumem")._extension_for(shell)
    assert ext.hook.last_failure is not None
    shell.run_cell("%gpumem retry autocast")
    print("autocast peak:", torch.cuda.max_memory_allocated() / 2**30, "GiB")
    shell.run_cell("x = None; loss = None")
    shell.run_cell(cell)
    shell.run_cell("%gpumem retry cpu")
    assert next(shell.user_ns["model"].parameters()).device.type == "cpu"
    shell.run_cell("%gpumem limit off")
