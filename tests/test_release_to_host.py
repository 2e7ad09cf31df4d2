"""Debug and memory both: after an OOM the failed frames stay for ``%debug`` while their GPU
tensors move to host memory, in place; the GPU memory comes back. A real InteractiveShell (and a
real kernel) with the extension loaded, on the simulated GPU."""

from __future__ import annotations

import io
import sys
from types import FrameType
from typing import Any

import pytest

import jupyter_gpumem
from jupyter_gpumem.readings import holder_frames, host_copies
from jupyter_gpumem.readings.release import MovedOut, release_failed_cell
from jupyter_gpumem.units import MiB

torch = pytest.importorskip("torch")

# a function whose locals hold 64 + 16 + 8 MiB on the card when its next allocation fails
WORK = """\
import torch
torch.manual_seed(0)
sums = {}
def work(n):
    a = torch.randn(4096, 4096, device="cuda")           # 64 MiB, float32
    pair = [torch.randn(2048, 2048, device="cuda"), "label"]
    batch = {"x": torch.ones(1024, 2048, dtype=torch.float32, device="cuda"), "n": n}
    sums["a"], sums["pair"] = float(a.sum()), float(pair[0].sum())
    more = torch.empty(2 * 2**30, dtype=torch.uint8, device="cuda")
work(3)
"""


def _frame(name: str) -> FrameType:
    """The failed frame ``name`` as ``%debug`` reaches it (``sys.last_traceback``)."""
    tb = sys.last_traceback
    while tb is not None:
        if tb.tb_frame.f_code.co_name == name:
            return tb.tb_frame
        tb = tb.tb_next
    raise AssertionError(f"no frame {name}() in sys.last_traceback")


def _allocated(shell: Any) -> int:
    return int(shell.run_cell("torch.cuda.memory_allocated()").result)


def test_the_memory_comes_back_and_debug_sees_every_local(shell: Any) -> None:
    shell.run_cell("%gpumem simulate 1GiB")
    shell.run_cell("import torch")
    before = _allocated(shell)
    result = shell.run_cell(WORK)
    assert type(result.error_in_exec).__name__ == "OutOfMemoryError"
    assert _allocated(shell) == before, "the failed frames' GPU memory is back"

    f_locals = _frame("work").f_locals  # what %debug lists
    sums = shell.user_ns["sums"]
    a = f_locals["a"]
    assert isinstance(a, torch.Tensor)
    assert (tuple(a.shape), a.dtype) == ((4096, 4096), torch.float32)
    assert float(a.sum()) == pytest.approx(sums["a"])
    assert f_locals["pair"][1] == "label"
    assert float(f_locals["pair"][0].sum()) == pytest.approx(sums["pair"])
    assert f_locals["batch"]["n"] == 3 and f_locals["n"] == 3
    assert bool((f_locals["batch"]["x"] == 1).all())

    release = jupyter_gpumem.last_failure(shell).release
    assert release is not None and release.frames_kept
    moved = {m.name: m for m in release.moved}
    assert set(moved) == {"a in work()", "pair[0] in work()", "batch['x'] in work()"}
    assert all(m.kept for m in moved.values())
    assert moved["a in work()"].what == "cuda:0 float32 [4096, 4096]"
    assert release.host_bytes == (64 + 16 + 8) * MiB
    assert release.freed_bytes == (64 + 16 + 8) * MiB


def test_a_tensor_several_frames_hold_is_moved_and_counted_once(shell: Any, capsys: Any) -> None:
    """A model's input is held by every frame it passes through (``x``, ``args``, ``t``): one host
    copy, counted once (the quickstart's panel said "Moved 308 MiB" on a 160 MiB card)."""
    shell.run_cell("%gpumem simulate 256MiB")
    capsys.readouterr()
    shell.run_cell(
        "import torch\n"
        "def inner(t, *args):\n"
        "    return t + torch.empty(512 << 20, dtype=torch.uint8, device='cuda')\n"
        "def outer():\n"
        "    x = torch.ones(2 << 20, device='cuda')  # 8 MiB\n"
        "    return inner(x, x, [x])\n"
        "outer()"
    )
    out = capsys.readouterr().out
    release = jupyter_gpumem.last_failure(shell).release
    assert release is not None and release.frames_kept
    assert len([m for m in release.moved if m.kept]) >= 3, "every local that held it is listed"
    assert release.host_bytes == 8 * MiB
    assert "Moved 8.00 MiB of the failed frames' tensors to host memory" in out, out
    f_locals = _frame("inner").f_locals
    assert f_locals["t"] is f_locals["args"][0], "one copy, as one tensor was"


def test_a_tensor_too_big_for_host_memory_is_described_in_its_place(
    shell: Any, monkeypatch: Any
) -> None:
    """A budget that takes the 16 and 8 MiB copies but not the 64 MiB one."""
    monkeypatch.setattr(host_copies, "host_budget_bytes", lambda: 30 * MiB)
    shell.run_cell("%gpumem simulate 1GiB")
    shell.run_cell("import torch")
    before = _allocated(shell)
    shell.run_cell(WORK)
    assert _allocated(shell) == before
    f_locals = _frame("work").f_locals
    a = f_locals["a"]
    assert isinstance(a, MovedOut)
    assert repr(a) == (
        "<moved out: cuda:0 float32 [4096, 4096], 64.00 MiB, not kept: host memory too small>"
    )
    assert isinstance(f_locals["pair"][0], torch.Tensor)  # the small ones still fit
    release = jupyter_gpumem.last_failure(shell).release
    assert [m.name for m in release.moved_out] == ["a in work()"]
    assert release.host_bytes == (16 + 8) * MiB


def test_a_local_that_lives_on_elsewhere_is_left_as_it_was(shell: Any) -> None:
    """The model as ``self``: moving it would free nothing, it stays. A tensor a notebook
    variable holds (``data`` passed in as ``x``): the frame keeps a host copy (same values), so
    binding ``data`` again frees the GPU tensor instead of the failed frame pinning it."""
    shell.run_cell("%gpumem simulate 1GiB")
    shell.run_cell(
        "import torch\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.lin = torch.nn.Linear(1024, 1024)\n"
        "    def forward(self, x):\n"
        "        h = self.lin(x)\n"
        "        return torch.empty(2 * 2**30, dtype=torch.uint8, device='cuda')\n"
        "model = Net().cuda()\n"
        "data = torch.randn(256, 1024, device='cuda')\n"
    )
    before = _allocated(shell)
    shell.run_cell("model(data)")
    assert _allocated(shell) == before
    f_locals = _frame("forward").f_locals
    assert f_locals["self"] is shell.user_ns["model"]
    data = shell.user_ns["data"]
    assert f_locals["x"] is not data and f_locals["x"].device.type == "cpu"
    assert torch.equal(f_locals["x"], data.cpu())
    assert isinstance(f_locals["h"], torch.Tensor) and tuple(f_locals["h"].shape) == (256, 1024)
    moved = [m.name for m in jupyter_gpumem.last_failure(shell).release.moved]
    assert moved == ["h in forward()"]  # `data`'s GPU memory was not freed: not listed
    del data, f_locals
    shell.run_cell("data = None")
    assert _allocated(shell) == before - 256 * 1024 * 4  # nothing else pinned the old `data`


def test_a_weight_a_variable_holds_stays_itself_in_the_frame(shell: Any) -> None:
    """`W = model.weight` (a parameter) and `w2` (a leaf that requires grad) passed in: weights,
    which no cell binds again, so a host copy would free nothing; the frame keeps them as they are
    (editing `w` in %debug still edits the model)."""
    shell.run_cell("%gpumem simulate 1GiB")
    shell.run_cell(
        "import torch\n"
        "W = torch.nn.Linear(1024, 1024).cuda().weight\n"
        "w2 = torch.randn(1024, 1024, device='cuda', requires_grad=True)\n"
        "def f(x, w, w2):\n"
        "    h = x @ w\n"
        "    return torch.empty(2 * 2**30, dtype=torch.uint8, device='cuda')\n"
        "x = torch.randn(8, 1024, device='cuda')\n"
    )
    shell.run_cell("f(x, W, w2)")
    f_locals = _frame("f").f_locals
    assert f_locals["w"] is shell.user_ns["W"] and f_locals["w2"] is shell.user_ns["w2"]


def test_the_cells_own_variables_are_never_touched(shell: Any) -> None:
    shell.run_cell("%gpumem simulate 1GiB")
    shell.run_cell(
        "import torch\n"
        "kept = torch.ones(8 * 2**20, dtype=torch.uint8, device='cuda')\n"
        "huge = torch.empty(2 * 2**30, dtype=torch.uint8, device='cuda')\n"
    )
    kept = shell.user_ns["kept"]
    assert shell.run_cell("torch.cuda.memory_allocated()").result == 8 * MiB
    assert jupyter_gpumem.last_failure(shell).release.moved == []
    assert kept is shell.user_ns["kept"]


def test_without_a_way_to_write_frame_locals_the_frames_are_dropped(
    shell: Any, monkeypatch: Any
) -> None:
    """A Python where ``PyFrame_LocalsToFast`` cannot be reached (PyPy): the memory still comes
    back, as before, and nothing pretends the frames were kept."""
    if sys.version_info >= (3, 13):
        pytest.skip("f_locals writes through from 3.13")
    monkeypatch.setattr(holder_frames, "_LOCALS_TO_FAST", None)
    shell.run_cell("%gpumem simulate 1GiB")
    shell.run_cell("import torch")
    before = _allocated(shell)
    shell.run_cell(WORK)
    assert _allocated(shell) == before
    release = jupyter_gpumem.last_failure(shell).release
    assert not release.frames_kept and release.moved == []


def test_keep_traceback_still_keeps_the_tensors_on_the_gpu(shell: Any) -> None:
    shell.run_cell("%config GpuMem.keep_traceback = True")
    shell.run_cell("%gpumem simulate 1GiB")
    shell.run_cell("import torch")
    before = _allocated(shell)
    shell.run_cell(WORK)
    assert _allocated(shell) == before + (64 + 16 + 8) * MiB
    assert jupyter_gpumem.last_failure(shell).release is None


def test_a_rerun_failure_without_a_shell_is_dropped() -> None:
    """``release_failed_cell(None, exc)``: a re-run's failure, which no debugger reaches."""
    with jupyter_gpumem.simulate("256MiB"):

        def work() -> None:
            held = torch.ones(64 * MiB, dtype=torch.uint8, device="cuda")  # noqa: F841
            torch.empty(1 << 30, dtype=torch.uint8, device="cuda")

        try:
            work()
        except torch.OutOfMemoryError as exc:
            error = exc
        assert torch.cuda.memory_allocated() == 64 * MiB
        result = release_failed_cell(None, error)
        assert torch.cuda.memory_allocated() == 0
        assert not result.frames_kept and "frame locals" in result.cleared


def test_debug_magic_prints_the_moved_locals(shell: Any, monkeypatch: Any, capsys: Any) -> None:
    shell.run_cell("%gpumem simulate 1GiB")
    shell.run_cell(WORK)
    capsys.readouterr()
    # up to the cell's frame (past the simulated GPU's own), then down into work()
    commands = "up\n" * 20 + "down\np tuple(a.shape), a.dtype\np float(a.sum()) == sums['a']\nq\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(commands))
    shell.run_cell("%debug")
    out = capsys.readouterr().out
    assert "((4096, 4096), torch.float32)" in out
    assert "ipdb> True" in out


@pytest.mark.slow
def test_in_a_real_kernel_the_memory_comes_back_and_the_frames_stay(kernel: Any) -> None:
    kernel.run("%load_ext jupyter_gpumem")
    kernel.run("%gpumem simulate 1GiB")
    kernel.run("import torch, sys")
    kernel.run(WORK)
    out = kernel.text(
        kernel.run(
            "tb = sys.last_traceback\n"
            "while tb.tb_frame.f_code.co_name != 'work': tb = tb.tb_next\n"
            "a = tb.tb_frame.f_locals['a']\n"
            "print('allocated', torch.cuda.memory_allocated(), 'a', tuple(a.shape), a.dtype,\n"
            "      abs(float(a.sum()) - sums['a']) < 1e-3)"
        )
    )
    assert "allocated 0 a (4096, 4096) torch.float32 True" in out


def test_a_move_that_fails_frees_the_memory_as_before(shell: Any, monkeypatch: Any) -> None:
    """Something unforeseen while copying: the frames are dropped (the memory still comes back,
    the hook stays), never a half-moved frame or a traceback through the extension."""

    def broken(*_: Any) -> Any:
        raise RuntimeError("unforeseen")

    monkeypatch.setattr("jupyter_gpumem.readings.release.move_to_host", broken)
    shell.run_cell("%gpumem simulate 1GiB")
    shell.run_cell("import torch")
    before = _allocated(shell)
    shell.run_cell(WORK)
    assert _allocated(shell) == before
    release = jupyter_gpumem.last_failure(shell).release
    assert not release.frames_kept and "frame locals" in release.cleared


def test_the_diagnosis_says_what_moved_and_its_host_cost(shell: Any, run: Any) -> None:
    shell.run_cell("%gpumem simulate 1GiB")
    out = run(shell, WORK, store_history=False).out
    assert "Moved 88.00 MiB of the failed frames' tensors to host memory (%debug still works)." in (
        out
    )
