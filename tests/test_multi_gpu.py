"""Every GPU, through what the user types: `%gpumem simulate SIZE --devices 2`, cells on cuda:0 and
cuda:1, the diagnosis pointing at the GPU that has room, status / gauge / sidebar showing every
GPU with the OOM's marked; and the CUDA backend's devices as CUDA_VISIBLE_DEVICES makes them."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

import jupyter_gpumem
from jupyter_gpumem.backends import _nvml, cuda, simulated
from jupyter_gpumem.backends.cuda import CudaBackend
from jupyter_gpumem.diagnosis.diagnose import diagnose
from jupyter_gpumem.oom.report import parse_oom_message
from jupyter_gpumem.readings.holders import HolderSet
from jupyter_gpumem.readings.snapshot import read_snapshot
from tests.conftest import extension

pytest.importorskip("torch")

MiB, GiB = 1 << 20, 1 << 30
# a 4 MiB model on GPU 0, then 240 MiB more than GPU 0 has room for; GPU 1 is empty
FILL_GPU_0 = (
    "import torch\n"
    "model = torch.nn.Linear(1024, 1024).cuda()\n"
    "x = torch.empty(240 * 2**20, dtype=torch.uint8, device='cuda')"
)


def _last_failure(shell: Any) -> Any:
    failed = jupyter_gpumem.last_failure(shell)
    assert failed is not None
    return failed


def test_an_oom_on_gpu_0_with_gpu_1_free_says_to_use_gpu_1(shell: Any, run: Any) -> None:
    out = run(shell, "%gpumem simulate 256MiB --devices 2").text
    assert "2 simulated GPUs of 256 MiB each (cuda:0 to cuda:1)" in out
    seen = run(shell, FILL_GPU_0)
    result, out = seen.result, seen.text
    assert not result.success and "GPU 0 has a total capacity" in out
    assert "GPU 1 has 256 MiB free: `model.to('cuda:1')`" in out
    assert '`device_map="auto"` for a Hugging Face model' in out
    causes = _last_failure(shell).diagnosis.causes
    assert causes[0].key == "other_gpu" and causes[0].closes_gap


def test_no_other_gpu_cause_with_one_gpu_or_when_the_other_is_full(shell: Any, run: Any) -> None:
    run(shell, "%gpumem simulate 256MiB")
    seen = run(shell, FILL_GPU_0)
    result, out = seen.result, seen.text
    assert not result.success and "has room" not in out
    assert "other_gpu" not in [c.key for c in _last_failure(shell).diagnosis.causes]

    run(shell, "%gpumem simulate 256MiB --devices 2")
    run(
        shell,
        "import torch\ntaken = torch.empty(200 * 2**20, dtype=torch.uint8, device='cuda:1')",
    )
    seen = run(shell, FILL_GPU_0)
    result, out = seen.result, seen.text
    assert not result.success and "GPU 1 has" not in out
    assert "other_gpu" not in [c.key for c in _last_failure(shell).diagnosis.causes]


def test_cuda_1_is_counted_on_gpu_1_and_its_oom_names_gpu_1(shell: Any, run: Any) -> None:
    run(shell, "%gpumem simulate 256MiB --devices 2")
    result = run(
        shell,
        "import torch\n"
        "w = torch.zeros(16 * 2**20 // 4, device='cuda:1')\n"
        "on = (torch.cuda.memory_allocated(0), torch.cuda.memory_allocated(1))",
    ).result
    assert result.success and shell.user_ns["on"] == (0, 16 * MiB)
    seen = run(shell, "y = torch.empty(250 * 2**20, dtype=torch.uint8, device='cuda:1')")
    result, out = seen.result, seen.text
    assert not result.success
    assert "GPU 1 has a total capacity of 256.00 MiB" in out
    failed = _last_failure(shell)
    assert failed.report.device_index == 1
    assert "GPU 1 (simulated)" in failed.diagnosis.headline
    assert failed.diagnosis.snapshot.device_index == 1  # the reading of the GPU that ran out
    # GPU 0 has 256 MiB free: not room for everything (16 MiB + 250 MiB), but for this cell's
    # own 250 MiB, with the 16 MiB an earlier cell made left on GPU 1
    cause = next(c for c in failed.diagnosis.causes if c.key == "other_gpu")
    assert cause.title == "GPU 0 has room for this cell's work"


def test_status_shows_every_gpu_with_the_ooms_marked(shell: Any, run: Any) -> None:
    run(shell, "%gpumem simulate 256MiB --devices 2")
    out = run(shell, "%gpumem status").text
    assert "2 GPUs visible" in out and "GPU 0" in out and "GPU 1" in out
    assert "the last OOM" not in out
    run(
        shell,
        "import torch\ny = torch.empty(300 * 2**20, dtype=torch.uint8, device='cuda:1')",
    )
    out = run(shell, "%gpumem status").text
    marked = [line for line in out.splitlines() if "◀ the last OOM" in line]
    assert len(marked) == 1 and "GPU 1" in marked[0]
    assert "the last OOM was on GPU 1" in out


def test_gauge_and_sidebar_show_every_gpu_with_the_ooms_marked(shell: Any, run: Any) -> None:
    pytest.importorskip("plotly")
    from jupyter_gpumem.ui.gauge import Gauge
    from jupyter_gpumem.ui.sidebar import Sidebar

    run(shell, "%gpumem simulate 256MiB --devices 2")
    gauge = Gauge()
    sidebar = Sidebar(interval=1.0, history_s=10.0)
    try:
        title = gauge.widget.data[0].title.text
        assert "GPU 0" in title and "GPU 1" in title and "OOM" not in title
        run(
            shell,
            FILL_GPU_0.replace("device='cuda'", "device='cuda:1'").replace(
                ".cuda()", ".to('cuda:1')"
            ),
        )
        assert _last_failure(shell).report.device_index == 1
        for g in (gauge, sidebar.gauge):
            g.sample()
            title = g.widget.data[0].title.text
            assert "GPU 1" in title and "◀ OOM" in title
            parts = [p for line in title.split("<br>") for p in line.split(" · ")]
            every = [p.removesuffix("</span>") for p in parts if p.startswith("GPU ")]
            assert [p.split()[:2] for p in every] == [["GPU", "0"], ["GPU", "1"]]
            assert [p for p in every if "◀ OOM" in p] == [every[1]]
            assert title.startswith("Simulated GPU (256 MiB), GPU 1")  # the dial: the OOM's GPU
    finally:
        gauge.stop()
        sidebar.close()


def test_devices_option_is_checked(shell: Any, run: Any) -> None:
    for bad in (
        "256MiB --devices 0",
        "256MiB --devices two",
        "256MiB --devices 99",
        "off --devices 2",
    ):
        seen = run(shell, f"%gpumem simulate {bad}")
        result, out = seen.result, seen.text
        assert not result.success and "UsageError" in out and "--devices" in out


# ---- the CUDA backend: CUDA_VISIBLE_DEVICES -----------------------------------------------------


class FakeNvml:
    """pynvml's calls the backend makes, over four GPUs of 80 GiB with the given use."""

    def __init__(self, used_gib: list[int]) -> None:
        self.used = used_gib

    def nvmlDeviceGetCount(self) -> int:
        return len(self.used)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetMemoryInfo(self, h: int) -> Any:
        return SimpleNamespace(
            total=80 * GiB, used=self.used[h] * GiB, free=(80 - self.used[h]) * GiB
        )

    def nvmlDeviceGetIndex(self, h: int) -> int:
        return h

    def nvmlDeviceGetUUID(self, h: int) -> str:
        return f"GPU-{h:04d}"

    def nvmlDeviceGetName(self, h: int) -> str:
        return "Fake H100"

    def nvmlDeviceGetComputeRunningProcesses(self, h: int) -> list[Any]:
        return []

    nvmlDeviceGetGraphicsRunningProcesses = nvmlDeviceGetComputeRunningProcesses


@pytest.fixture
def four_gpus(monkeypatch: Any) -> FakeNvml:
    fake = FakeNvml([80, 80, 79, 10])  # physical GPUs 0 and 1 full, 2 nearly, 3 mostly free
    monkeypatch.setattr(_nvml, "_state", {"tried": True, "nvml": fake, "error": None})
    monkeypatch.setattr(cuda, "torch_module", lambda: None)  # torch has not used CUDA here
    monkeypatch.setattr(cuda, "cuda_ready", lambda: False)
    return fake


def test_the_cuda_backend_sees_the_gpus_cuda_visible_devices_names(
    four_gpus: FakeNvml, monkeypatch: Any
) -> None:
    backend = CudaBackend()
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert backend.visible_devices() == (0, 1, 2, 3)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,7,2")  # CUDA stops at the first invalid entry
    assert backend.visible_devices() == (0,)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert backend.visible_devices() == (0, 1)
    snap = read_snapshot(0, backend=backend)
    assert [(d.device_index, d.uuid, d.free_bytes) for d in snap.devices] == [
        (0, "GPU-0002", 1 * GiB),
        (1, "GPU-0003", 70 * GiB),
    ]
    assert snap.title == "Fake H100 (GPU 0)"


def test_the_diagnosis_names_the_other_gpu_by_torchs_index(
    four_gpus: FakeNvml, monkeypatch: Any
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    report = parse_oom_message(
        "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 80.00 GiB "
        "of which 1.00 GiB is free. Including non-PyTorch memory, this process has 78.50 GiB "
        "memory in use. Of the allocated memory 60.00 GiB is allocated by PyTorch, and 18.00 GiB "
        "is reserved by PyTorch but unallocated."
    )
    assert report is not None
    d = diagnose(report, read_snapshot(0, backend=CudaBackend()), HolderSet())
    other = next(c for c in d.causes if c.key == "other_gpu")
    # torch's cuda:1 is physical GPU 3 here: the advice uses the index the code uses
    assert "GPU 1 has 70.00 GiB free: `model.to('cuda:1')`" in other.action
    assert other.closes_gap


def test_a_second_model_that_does_not_fit_gpu_0_is_sent_to_gpu_1(shell: Any, run: Any) -> None:
    """Two equal cards: a first model fills GPU 0, the next cell's model does not fit beside it.
    Moving everything would not fit GPU 1, but this cell's own work does: the diagnosis says so."""
    run(shell, "%gpumem simulate 256MiB --devices 2")
    assert run(
        shell, "import torch\nfirst = torch.nn.Linear(4096, 8192, device='cuda')"
    ).result.success
    seen = run(shell, "second = torch.nn.Linear(4096, 8192, device='cuda')")
    result, out = seen.result, seen.text
    assert not result.success
    cause = next(c for c in _last_failure(shell).diagnosis.causes if c.key == "other_gpu")
    assert cause.title == "GPU 1 has room for this cell's work" and cause.closes_gap, out
    assert "make its model and tensors with `device='cuda:1'`" in cause.action
    assert "GPU 1 has room for this cell's work" in out
    assert run(shell, "second = torch.nn.Linear(4096, 8192, device='cuda:1')").result.success


# ---- %gpumem limit: every GPU, or the one named --------------------------------------------------


def _caps(out: str) -> list[str]:
    return [line.split()[1] + " " + line.split()[2] for line in out.splitlines() if "cap " in line]


def test_limit_caps_every_simulated_gpu_or_the_one_named(shell: Any, run: Any) -> None:
    run(shell, "%gpumem simulate 64MiB --devices 2")
    out = run(shell, "%gpumem limit 32MiB").text
    assert "32.00 MiB of 64.00 MiB on each of the 2 GPUs" in out, out
    assert _caps(run(shell, "%gpumem status").text) == ["32.00 MiB", "32.00 MiB"]
    out = run(shell, "%gpumem limit 16MiB --device 1").text
    assert "16.00 MiB of 64.00 MiB on GPU 1" in out, out
    assert _caps(run(shell, "%gpumem status").text) == ["32.00 MiB", "16.00 MiB"]
    seen = run(
        shell,
        "torch = __import__('torch')\nx = torch.empty(20 << 20, dtype=torch.uint8, device='cuda:1')",
    )
    result, out = seen.result, seen.text
    assert not result.success and "GPU 1 has a total capacity" in out and "16.00 MiB allowed" in out
    run(shell, "%gpumem limit off --device=0")
    assert _caps(run(shell, "%gpumem status").text) == ["16.00 MiB"]
    for bad in ("8MiB --device 2", "8MiB --device x", "8MiB --device 1 --device 0"):
        seen = run(shell, f"%gpumem limit {bad}")
        result, out = seen.result, seen.text
        assert not result.success and "UsageError" in out and "%gpumem limit" in out, out
    run(shell, "%gpumem limit off")
    assert _caps(run(shell, "%gpumem status").text) == []


class FakeTorchCuda:
    """torch.cuda's calls ``%gpumem limit`` and ``status`` make on four 80 GiB GPUs, with the
    per-process fraction kept per device as torch's allocator keeps it."""

    def __init__(self) -> None:
        self.fractions = {i: 1.0 for i in range(4)}

    def _index(self, device: int | None) -> int:
        return 0 if device is None else device  # the current device is 0

    is_available = is_initialized = staticmethod(lambda: True)
    device_count = staticmethod(lambda: 4)
    current_device = staticmethod(lambda: 0)

    def mem_get_info(self, device: int | None = None) -> tuple[int, int]:
        return 80 * GiB, 80 * GiB

    def memory_stats(self, device: int | None = None) -> dict[str, int]:
        return {"allocated_bytes.all.current": 0, "reserved_bytes.all.current": 0}

    def set_per_process_memory_fraction(self, fraction: float, device: int | None = None) -> None:
        self.fractions[self._index(device)] = fraction

    def get_per_process_memory_fraction(self, device: int | None = None) -> float:
        return self.fractions[self._index(device)]


def test_limit_caps_every_cuda_gpu_or_the_one_named(
    monkeypatch: Any, four_gpus: FakeNvml, shell: Any, run: Any
) -> None:
    """On CUDA, `%gpumem limit` caps every visible GPU as it does every simulated one. Over a fake
    torch.cuda (no GPU here): the fractions torch would be given, device by device, and the caps
    `%gpumem status` reads back. A real card is capped in tests/test_gpu.py (marked gpu)."""
    fake = FakeTorchCuda()
    monkeypatch.setattr(cuda, "torch_module", lambda: SimpleNamespace(cuda=fake))
    monkeypatch.setattr(cuda, "cuda_ready", lambda: True)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    out = run(shell, "%gpumem limit 20GiB").text
    assert fake.fractions == {0: 0.25, 1: 0.25, 2: 0.25, 3: 0.25}
    assert "20.00 GiB of 80.00 GiB on each of the 4 GPUs" in out, out
    assert _caps(run(shell, "%gpumem status").text) == ["20.00 GiB"] * 4
    out = run(shell, "%gpumem limit 40GiB --device 2").text
    assert fake.fractions == {0: 0.25, 1: 0.25, 2: 0.5, 3: 0.25}
    assert _caps(run(shell, "%gpumem status").text) == ["20.00 GiB"] * 2 + [
        "40.00 GiB",
        "20.00 GiB",
    ]
    seen = run(shell, "%gpumem limit 1GiB --device 4")
    result, out = seen.result, seen.text
    assert not result.success and "no GPU 4 here: this process sees GPU 0 to 3" in out, out
    run(shell, "%gpumem limit off")
    assert fake.fractions == {i: 1.0 for i in range(4)}
    assert _caps(run(shell, "%gpumem status").text) == []


# ---- %gpumem cells: the cells that filled the GPU that ran out -----------------------------------


def test_the_cells_that_filled_the_gpu_that_ran_out(shell: Any, run: Any) -> None:
    """An OOM on cuda:1 while the current device is 0: the cells that filled GPU 1, not GPU 0.
    (extension.present passes the OOM's device to filled_by.)"""
    run(shell, "%gpumem simulate 64MiB --devices 2")
    run(shell, "import torch")
    run(shell, "%gpumem cells on")
    out = run(shell, "a = torch.zeros(5 << 20, device='cuda:0')  # 20 MiB").text
    assert "+20.00 MiB" in out and "GPU 1" not in out, out
    out = run(shell, "b = torch.zeros(10 << 20, device='cuda:1')  # 40 MiB").text
    assert "+0 B, peak" in out and "GPU 1 +40.00 MiB" in out, out
    seen = run(shell, "c = torch.zeros(10 << 20, device='cuda:1')")
    result, out = seen.result, seen.text
    assert not result.success and _last_failure(shell).report.device_index == 1
    stats = extension(shell).cell_stats()
    a_cell, b_cell = (r.count for r in list(stats.records)[:2])
    # what the user reads under the OOM
    assert f"The card filled over these cells: In [{b_cell}] +40.00 MiB." in out, out
    assert f"In [{a_cell}] +20.00 MiB" not in out, out
    assert (
        stats.filled_by(device=1) == f"The card filled over these cells: In [{b_cell}] +40.00 MiB."
    )
    assert (
        stats.filled_by(device=0) == f"The card filled over these cells: In [{a_cell}] +20.00 MiB."
    )
    assert stats.filled_by() == stats.filled_by(device=0)  # the current device's, as before


# ---- a CPU tensor sent to cuda:1 counts on card 1 only -------------------------------------------

MOVES = {
    "x = src.to('cuda:1')": 4 * MiB,
    "x = src.cuda(1)": 4 * MiB,
    "x = src.to(torch.device('cuda', 1))": 4 * MiB,
    "x = src.to(device='cuda:1', non_blocking=True)": 4 * MiB,
    "x = src.to('cuda:1', torch.float16)": 2 * MiB,
    "torch.cuda.set_device(1)\nx = src.to('cuda', torch.float16)": 2 * MiB,
    "with torch.cuda.device(1):\n    x = src.cuda()": 4 * MiB,
}


@pytest.mark.parametrize("move", list(MOVES))
def test_a_cpu_tensor_sent_to_cuda_1_counts_there_only(shell: Any, run: Any, move: str) -> None:
    """`src` is a CPU tensor in real torch: once sent to cuda:1 only its copy counts, on card 1,
    though `src` lives on (while nothing had placed it, it counted on the current device)."""
    run(shell, "%gpumem simulate 64MiB --devices 2")
    seen = run(shell, f"import torch\nsrc = torch.randn(1024, 1024)\n{move}")
    result, out = seen.result, seen.text
    assert result.success, out
    gpu = simulated.current()
    assert (gpu.devices[0].allocated_bytes, gpu.devices[1].allocated_bytes) == (0, MOVES[move])


def test_a_cpu_tensor_made_under_device_1_is_not_counted_twice(shell: Any, run: Any) -> None:
    """Made while cuda:1 is current, the host tensor counted on card 1; its half-precision copy
    there takes its place (it counted twice)."""
    run(shell, "%gpumem simulate 64MiB --devices 2")
    cell = (
        "import torch\n"
        "torch.cuda.set_device(1)\n"
        "src = torch.randn(1024, 1024)\n"
        "x = src.to('cuda:1', torch.float16)"
    )
    seen = run(shell, cell)
    result, out = seen.result, seen.text
    assert result.success, out
    gpu = simulated.current()
    assert (gpu.devices[0].allocated_bytes, gpu.devices[1].allocated_bytes) == (0, 2 * MiB)


def test_a_gpu_tensor_copied_to_cuda_1_stays_on_card_0_too(shell: Any, run: Any) -> None:
    run(shell, "%gpumem simulate 64MiB --devices 2")
    seen = run(
        shell,
        "import torch\n"
        "a = torch.randn(1024, 1024, device='cuda:0')\n"
        "h = a * 2\n"
        "b, c = a.to('cuda:1'), h.cuda(1)\n"
        "model = torch.nn.Linear(1024, 1024).to('cuda:1')",
    )
    result, out = seen.result, seen.text
    assert result.success, out
    gpu = simulated.current()
    assert gpu.devices[0].allocated_bytes == 8 * MiB  # a and h
    assert (
        gpu.devices[1].allocated_bytes == 12 * MiB + 4 * 1024
    )  # b, c, the model's weight and bias


def test_data_sent_to_cuda_1_leaves_room_on_card_0(shell: Any, run: Any) -> None:
    """The case that hurt: a CPU dataset sent to cuda:1 stayed counted on card 0 and the next
    allocation there ran out, where real CUDA has room."""
    run(shell, "%gpumem simulate 64MiB --devices 2")
    cell = (
        "import torch\n"
        "weights = torch.empty(40 << 20, dtype=torch.uint8, device='cuda:0')\n"
        "data = torch.randn(4 << 20)  # 16 MiB on the host\n"
        "on_1 = data.to('cuda:1')\n"
        "act = torch.empty(20 << 20, dtype=torch.uint8, device='cuda:0')"
    )
    seen = run(shell, cell)
    result, out = seen.result, seen.text
    assert result.success, out
    gpu = simulated.current()
    assert gpu.devices[0].allocated_bytes == 60 * MiB and gpu.devices[1].allocated_bytes == 16 * MiB


def test_variables_on_another_gpu_are_not_a_cause(shell: Any, run: Any) -> None:
    """An OOM on cuda:1: a 60 MiB variable on GPU 0 that the cell does not use takes no room on
    GPU 1, so it is not named among the variables to delete for this failure (`b`, on GPU 1, is).
    """
    run(shell, "%gpumem simulate 64MiB --devices 2")
    run(shell, "import torch")
    run(shell, "a = torch.zeros(15 << 20, device='cuda:0')  # 60 MiB")
    run(shell, "b = torch.zeros(10 << 20, device='cuda:1')  # 40 MiB")
    seen = run(shell, "c = torch.zeros(10 << 20, device='cuda:1')")
    result, out = seen.result, seen.text
    assert not result.success and _last_failure(shell).report.device_index == 1
    cause = next(line for line in out.splitlines() if "Variables from earlier cells" in line)
    assert "`b` holds 40.00 MiB" in cause and "`a`" not in cause, cause


def test_a_tensor_that_fits_on_the_other_gpu_is_named_there(shell: Any, run: Any) -> None:
    """700 MiB then 600 MiB on cuda:0 of two 1 GiB cards: the cell's work as a whole fits neither,
    but the 600 MiB that failed fits GPU 1, and the diagnosis says to put it there (was: GPU 1
    never mentioned)."""
    pytest.importorskip("torch")
    shell.run_cell("%gpumem simulate 1GiB --devices 2")
    seen = run(
        shell,
        "import torch\nu = torch.empty(700 << 20, dtype=torch.uint8, device='cuda:0')\n"
        "v = torch.empty(600 << 20, dtype=torch.uint8, device='cuda:0')",
    )
    result, out = seen.result, seen.text
    assert not result.success
    assert "GPU 1 has room for the tensor that did not fit" in out, out
    assert "`device='cuda:1'`" in out and "the rest stays on GPU 0" in out
    assert "Move to CPU (takes ~" in out, "what leaves the GPU, not a saving larger than the card"
