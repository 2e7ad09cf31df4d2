"""The backends answer for the device asked, not the current one, and as the card's profile does
(issue 18): the allocation log of a run on ``cuda:1``, native bfloat16 per card, the driver's
reading with the CUDA context, and torch's allocation history read for the device that ran out.

On the simulated GPU in a real InteractiveShell where the user can see it; the CUDA backend
against a stand-in for ``torch.cuda`` with two devices (no GPU here), shaped as torch's
``_snapshot()`` is (``device_traces`` per device, segments naming their device).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from jupyter_gpumem.backends import alloc_history, allocator, cuda
from jupyter_gpumem.backends.cuda import CudaBackend

MiB = 1 << 20


# ---- the simulated GPU, in a notebook -------------------------------------------------------------


def test_a_run_on_the_second_card_is_logged_on_it(shell: Any) -> None:
    """``record_sizes(1)`` logs what a cell allocates on ``cuda:1`` while ``cuda:0`` is current;
    ``record_sizes()`` logs the current device, which the cell never touched."""
    torch = pytest.importorskip("torch")
    from jupyter_gpumem import backends

    shell.run_cell("%gpumem simulate 64MiB --devices 2")
    assert shell.run_cell("import torch\nw = torch.zeros(1 << 18, device='cuda:1')").success
    gpu = backends.active()
    assert torch.cuda.current_device() == 0
    with gpu.record_sizes(1) as on_1, gpu.record_sizes() as current:
        cell = "x = torch.randn(1 << 20, device='cuda:1')\ny = (x * 2).sum()\ndel x"
        assert shell.run_cell(cell).success
    assert on_1 is not None and current is not None
    assert on_1.resident == [MiB]  # w, on cuda:1 before the run
    sizes = on_1.sizes()
    assert 4 * MiB in sizes  # x
    assert (-1, sizes.index(4 * MiB)) in on_1.events  # del x, freed in the log
    assert current.events == [] and current.resident == []  # cuda:0: nothing


def test_bf16_is_native_per_card_profile(shell: Any, run: Any) -> None:
    """A T4 emulates bfloat16: Enable autocast picks float16 and says to use a GradScaler (it
    picked bfloat16: the simulated GPU said native bf16 on every card)."""
    pytest.importorskip("torch")
    shell.run_cell("%gpumem simulate T4")
    shell.run_cell("import torch")
    shell.run_cell("emulated = torch.cuda.is_bf16_supported()")
    shell.run_cell("native = torch.cuda.is_bf16_supported(including_emulation=False)")
    assert shell.user_ns["emulated"] is True and shell.user_ns["native"] is False
    shell.run_cell("%gpumem limit 160MiB")  # the T4's rules on a card of 160 MiB: little RAM here
    setup = (
        "model = torch.nn.Sequential(torch.nn.Linear(1024, 2048), torch.nn.ReLU(),"
        " torch.nn.Linear(2048, 1024)).to('cuda')\n"
    )
    assert shell.run_cell(setup).success
    cell = "x = torch.randn(220, 32, 1024, device='cuda')\nout = model(x).sum()\n"
    assert not shell.run_cell(cell).success
    out = run(shell, "%gpumem retry autocast", store_history=False).out
    assert "under autocast (float16)" in out, out
    assert "no bfloat16 in hardware" in out and "GradScaler" in out, out


@pytest.mark.parametrize(("key", "native"), [("T4", False), ("V100-16GB", False), ("L4", True)])
def test_the_backend_answers_as_torch_for_the_card_asked(key: str, native: bool) -> None:
    """``supports_bf16(index)`` is ``torch.cuda.is_bf16_supported(including_emulation=False)``
    on that card (compute capability 8.0 on), whichever card is current."""
    torch = pytest.importorskip("torch")
    from jupyter_gpumem import backends
    from jupyter_gpumem.backends import simulated

    gpu = backends.simulate(None, profile=key, devices=2)
    gpu.devices[1].configure(profile=simulated.PROFILES["A100-40GB"])  # a second, newer card
    assert gpu.supports_bf16(0) is native is torch.cuda.is_bf16_supported(False)
    assert gpu.supports_bf16() is native and backends.active().supports_bf16(0) is native
    assert gpu.supports_bf16(1) and backends.active().supports_bf16(1)
    torch.cuda.set_device(1)
    assert torch.cuda.is_bf16_supported(including_emulation=False)
    assert gpu.supports_bf16(0) is native  # asked for card 0 while card 1 is current


def test_a_plain_size_computes_bf16_natively() -> None:
    pytest.importorskip("torch")
    from jupyter_gpumem import backends

    gpu = backends.simulate(256 * MiB)
    assert gpu.supports_bf16() and gpu.supports_bf16(0)  # an A100-like 8.0


def test_the_drivers_reading_counts_the_cuda_context(shell: Any, run: Any) -> None:
    """What NVML and ``mem_get_info`` read: the T4's 150 MiB context is used memory, this
    kernel's (``%gpumem status`` said 0 B used on a card where torch says 150 MiB)."""
    pytest.importorskip("torch")
    from jupyter_gpumem import backends

    shell.run_cell("%gpumem simulate T4")
    shell.run_cell("import torch\nx = torch.zeros(64 << 20, device='cuda')  # 256 MiB")
    shell.run_cell("free, total = torch.cuda.mem_get_info()")
    out = run(shell, "%gpumem status", store_history=False).out
    assert "406 MiB used" in out, out  # 256 MiB reserved + the 150 MiB context
    reading = backends.active().read()
    assert (reading.free_bytes, reading.total_bytes) == (
        shell.user_ns["free"],
        shell.user_ns["total"],
    )
    (me,) = [p for p in reading.processes if p.is_self]
    assert me.used_bytes == 406 * MiB == reading.used_bytes


# ---- the CUDA backend, against a stand-in with two devices ----------------------------------------


class TwoDevices:
    """``torch.cuda.memory``'s history over two devices, as ``_snapshot()`` gives it: a trace per
    device, and segments that say their device."""

    def __init__(self) -> None:
        self.enabled = False
        self.traces: list[list[dict[str, Any]]] = [[], []]
        self.segments: list[dict[str, Any]] = []
        self.clock = 0

    def _record_memory_history(self, enabled: str | None = "all", *_: Any, **kw: Any) -> None:
        self.enabled = enabled is not None
        if not self.enabled or kw.get("clear_history"):
            self.traces = [[], []]

    def alloc(self, device: int, addr: int, size: int, meta: str | None = None) -> None:
        self.clock += 1
        entry = {"action": "alloc", "addr": addr, "size": size, "time_us": self.clock}
        if meta is not None:
            entry["user_metadata"] = meta
        if self.enabled:
            self.traces[device].append(entry)
        block = {"size": size, "requested_size": size, "state": "active_allocated", "frames": []}
        self.segments.append({"device": device, "address": addr, "blocks": [block]})

    def _snapshot(self) -> dict[str, Any]:
        return {"segments": list(self.segments), "device_traces": [list(t) for t in self.traces]}


@pytest.fixture
def two_devices(monkeypatch: Any) -> SimpleNamespace:
    hist = TwoDevices()
    fake_cuda = SimpleNamespace(memory=hist, current=0, is_available=lambda: True)
    fake_cuda.current_device = lambda: fake_cuda.current
    fake_torch = SimpleNamespace(
        _C=SimpleNamespace(_cuda_isHistoryEnabled=lambda: hist.enabled), cuda=fake_cuda
    )
    monkeypatch.setattr(cuda, "torch_module", lambda: fake_torch)
    monkeypatch.setattr(cuda, "cuda_ready", lambda: True)
    return SimpleNamespace(hist=hist, cuda=fake_cuda, torch=fake_torch)


def test_cuda_record_sizes_reads_the_device_asked(two_devices: SimpleNamespace) -> None:
    hist = two_devices.hist
    hist.alloc(1, 0x100, 2 * MiB)  # resident on cuda:1
    with CudaBackend().record_sizes(1) as on_1:
        hist.alloc(1, 0x200, 8 * MiB)
        hist.alloc(0, 0x300, 4 * MiB)
    assert on_1 is not None and on_1.sizes() == [8 * MiB] and on_1.resident == [2 * MiB]
    with CudaBackend().record_sizes() as current:  # cuda:0, current
        hist.alloc(1, 0x400, 8 * MiB)
    assert current is not None and current.sizes() == [] and not hist.enabled


def test_cuda_record_sizes_inside_a_history_being_recorded(two_devices: SimpleNamespace) -> None:
    hist = two_devices.hist
    hist._record_memory_history("all")  # the notebook's own, kept as it is
    hist.alloc(1, 0x100, 2 * MiB)
    two_devices.cuda.current = 0
    with CudaBackend().record_sizes(1) as on_1:
        hist.alloc(1, 0x200, 6 * MiB)
        hist.alloc(0, 0x300, 4 * MiB)
    assert on_1 is not None and on_1.sizes() == [6 * MiB] and hist.enabled


def test_live_allocations_read_every_device_or_the_one_asked(
    two_devices: SimpleNamespace, monkeypatch: Any
) -> None:
    """Tracing on CUDA: the live blocks of the device asked, with each one's module from its own
    device's trace (it read the current device's only: a cell on cuda:1 had no allocations)."""
    hist = two_devices.hist
    hist._record_memory_history("all")
    hist.alloc(0, 0x100, 2 * MiB, meta="on 0")
    hist.alloc(1, 0x100, 6 * MiB, meta="on 1")  # the same address, on the other device
    monkeypatch.setitem(__import__("sys").modules, "torch", two_devices.torch)
    monkeypatch.setattr(alloc_history, "_active", True)
    monkeypatch.setattr(alloc_history, "_cuda", True)
    monkeypatch.setattr(alloc_history.simulated, "current", lambda: None)
    tokens: list[Any] = []
    monkeypatch.setattr(alloc_history, "token", lambda meta: tokens.append(meta) or meta)
    assert [a.nbytes for a in alloc_history.live_allocations(1)] == [6 * MiB]
    assert tokens == ["on 1"]
    assert sorted(a.nbytes for a in alloc_history.live_allocations()) == [2 * MiB, 6 * MiB]


def test_the_recorder_rounds_as_torchs_round_size() -> None:
    """``round_size`` in c10/cuda/CUDACachingAllocator.cpp: below kMinBlockSize (512) a request
    takes 512; above, the next multiple of 512 (no roundup_power2_divisions by default)."""
    recorder = alloc_history.Recorder(16)
    recorder.alloc({1: (None, 1), 2: (None, 512), 3: (None, 513), 4: (None, 3 * MiB + 1)})
    sizes = [e[2] for e in recorder.events if e[0] == "alloc"]
    assert sizes == [512, 512, 1024, 3 * MiB + 512]
    assert allocator.rounded(0) == 512  # torch rounds an empty request too (no block is made)


def test_the_saved_snapshot_keeps_each_cards_events_in_its_own_trace(
    shell: Any, tmp_path: Any
) -> None:
    """``%gpumem trace save`` on two simulated cards: what the cell allocated on cuda:1 is in
    ``device_traces[1]``, as torch's ``_snapshot()`` keeps it (it was all in the current
    device's trace, cuda:0's), and its live block's address is that card's segment's."""
    pytest.importorskip("torch")
    import pickle

    shell.run_cell("%gpumem simulate 64MiB --devices 2")
    shell.run_cell("%gpumem trace on")
    shell.run_cell("import torch\na = torch.zeros(1 << 18, device='cuda:0')")
    shell.run_cell("b = torch.zeros(3 << 18, device='cuda:1')")
    path = tmp_path / "snap.pickle"
    shell.run_cell(f"%gpumem trace save {path}")
    shell.run_cell("%gpumem trace off")
    with open(path, "rb") as f:
        snap = pickle.load(f)
    on_0, on_1 = snap["device_traces"]
    assert [e["size"] for e in on_0 if e["action"] == "alloc"] == [MiB]
    assert [e["size"] for e in on_1 if e["action"] == "alloc"] == [3 * MiB]
    (live,) = [e["addr"] for e in on_1 if e["action"] == "alloc"]
    blocks = [
        (s["device"], b["address"])
        for s in snap["segments"]
        for b in s["blocks"]
        if b["state"] == "active_allocated" and b["size"] == 3 * MiB
    ]
    assert blocks == [(1, live)]


def test_an_op_recording_reads_the_residents_of_the_device_asked(shell: Any) -> None:
    """Enable autocast's recording (``record_ops``) beside the sizes of the card that ran out:
    ``record_ops(1)`` on a cell on cuda:1 has cuda:1's resident weights, not cuda:0's."""
    pytest.importorskip("torch")
    from jupyter_gpumem.backends.op_log import record_ops

    shell.run_cell("%gpumem simulate 64MiB --devices 2")
    shell.run_cell("import torch\nw0 = torch.zeros(1 << 18, device='cuda:0')")  # 1 MiB
    shell.run_cell("w1 = torch.zeros(1 << 19, device='cuda:1')")  # 2 MiB
    with record_ops(1) as on_1:
        assert shell.run_cell("y = (w1 * 2).sum()").success
    with record_ops() as current:
        assert shell.run_cell("z = (w1 * 2).sum()").success
    assert on_1.resident_sizes == [2 * MiB]
    assert current.resident_sizes == [MiB]  # cuda:0's, the current device
