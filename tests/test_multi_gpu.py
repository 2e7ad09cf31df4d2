"""Every GPU, through what the user types: `%gpumem simulate SIZE --devices 2`, cells on cuda:0 and
cuda:1, the diagnosis pointing at the GPU that has room, status / gauge / sidebar showing every
GPU with the OOM's marked; and the CUDA backend's devices as CUDA_VISIBLE_DEVICES makes them."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

import jupyter_gpumem
from jupyter_gpumem.backends import _nvml, cuda
from jupyter_gpumem.backends.cuda import CudaBackend
from jupyter_gpumem.diagnosis import diagnose
from jupyter_gpumem.holders import HolderSet
from jupyter_gpumem.oom import parse_oom_message
from jupyter_gpumem.readings import read_snapshot

pytest.importorskip("torch")

MiB, GiB = 1 << 20, 1 << 30
# a 4 MiB model on GPU 0, then 240 MiB more than GPU 0 has room for; GPU 1 is empty
FILL_GPU_0 = (
    "import torch\n"
    "model = torch.nn.Linear(1024, 1024).cuda()\n"
    "x = torch.empty(240 * 2**20, dtype=torch.uint8, device='cuda')"
)


def _run(shell: Any, capsys: Any, cell: str) -> tuple[Any, str]:
    capsys.readouterr()
    result = shell.run_cell(cell, store_history=True)
    cap = capsys.readouterr()
    return result, cap.out + cap.err


def _last_failure(shell: Any) -> Any:
    failed = jupyter_gpumem.last_failure(shell)
    assert failed is not None
    return failed


def test_an_oom_on_gpu_0_with_gpu_1_free_says_to_use_gpu_1(shell: Any, capsys: Any) -> None:
    _, out = _run(shell, capsys, "%gpumem simulate 256MiB --devices 2")
    assert "2 simulated GPUs of 256 MiB each (cuda:0 to cuda:1)" in out
    result, out = _run(shell, capsys, FILL_GPU_0)
    assert not result.success and "GPU 0 has a total capacity" in out
    assert "GPU 1 has 256 MiB free: `model.to('cuda:1')`" in out
    assert '`device_map="auto"` for a Hugging Face model' in out
    causes = _last_failure(shell).diagnosis.causes
    assert causes[0].key == "other_gpu" and causes[0].closes_gap


def test_no_other_gpu_cause_with_one_gpu_or_when_the_other_is_full(shell: Any, capsys: Any) -> None:
    _run(shell, capsys, "%gpumem simulate 256MiB")
    result, out = _run(shell, capsys, FILL_GPU_0)
    assert not result.success and "has room" not in out
    assert "other_gpu" not in [c.key for c in _last_failure(shell).diagnosis.causes]

    _run(shell, capsys, "%gpumem simulate 256MiB --devices 2")
    _run(
        shell,
        capsys,
        "import torch\ntaken = torch.empty(200 * 2**20, dtype=torch.uint8, device='cuda:1')",
    )
    result, out = _run(shell, capsys, FILL_GPU_0)
    assert not result.success and "GPU 1 has" not in out
    assert "other_gpu" not in [c.key for c in _last_failure(shell).diagnosis.causes]


def test_cuda_1_is_counted_on_gpu_1_and_its_oom_names_gpu_1(shell: Any, capsys: Any) -> None:
    _run(shell, capsys, "%gpumem simulate 256MiB --devices 2")
    result, _ = _run(
        shell,
        capsys,
        "import torch\n"
        "w = torch.zeros(16 * 2**20 // 4, device='cuda:1')\n"
        "on = (torch.cuda.memory_allocated(0), torch.cuda.memory_allocated(1))",
    )
    assert result.success and shell.user_ns["on"] == (0, 16 * MiB)
    result, out = _run(
        shell, capsys, "y = torch.empty(250 * 2**20, dtype=torch.uint8, device='cuda:1')"
    )
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


def test_status_shows_every_gpu_with_the_ooms_marked(shell: Any, capsys: Any) -> None:
    _run(shell, capsys, "%gpumem simulate 256MiB --devices 2")
    _, out = _run(shell, capsys, "%gpumem status")
    assert "2 GPUs visible" in out and "GPU 0" in out and "GPU 1" in out
    assert "the last OOM" not in out
    _run(
        shell,
        capsys,
        "import torch\ny = torch.empty(300 * 2**20, dtype=torch.uint8, device='cuda:1')",
    )
    _, out = _run(shell, capsys, "%gpumem status")
    marked = [line for line in out.splitlines() if "◀ the last OOM" in line]
    assert len(marked) == 1 and "GPU 1" in marked[0]
    assert "the last OOM was on GPU 1" in out


def test_gauge_and_sidebar_show_every_gpu_with_the_ooms_marked(shell: Any, capsys: Any) -> None:
    pytest.importorskip("plotly")
    from jupyter_gpumem.ui.gauge import Gauge
    from jupyter_gpumem.ui.sidebar import Sidebar

    _run(shell, capsys, "%gpumem simulate 256MiB --devices 2")
    gauge = Gauge()
    sidebar = Sidebar(interval=1.0, history_s=10.0)
    try:
        title = gauge.widget.data[0].title.text
        assert "GPU 0" in title and "GPU 1" in title and "OOM" not in title
        _run(
            shell,
            capsys,
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
            assert title.startswith("Simulated GPU (0.25 GiB), GPU 1")  # the dial: the OOM's GPU
    finally:
        gauge.stop()
        sidebar.close()


def test_devices_option_is_checked(shell: Any, capsys: Any) -> None:
    for bad in (
        "256MiB --devices 0",
        "256MiB --devices two",
        "256MiB --devices 99",
        "off --devices 2",
    ):
        result, out = _run(shell, capsys, f"%gpumem simulate {bad}")
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


def test_a_second_model_that_does_not_fit_gpu_0_is_sent_to_gpu_1(shell: Any, capsys: Any) -> None:
    """Two equal cards: a first model fills GPU 0, the next cell's model does not fit beside it.
    Moving everything would not fit GPU 1, but this cell's own work does: the diagnosis says so."""
    _run(shell, capsys, "%gpumem simulate 256MiB --devices 2")
    assert _run(shell, capsys, "import torch\nfirst = torch.nn.Linear(4096, 8192, device='cuda')")[
        0
    ].success
    result, out = _run(shell, capsys, "second = torch.nn.Linear(4096, 8192, device='cuda')")
    assert not result.success
    cause = next(c for c in _last_failure(shell).diagnosis.causes if c.key == "other_gpu")
    assert cause.title == "GPU 1 has room for this cell's work" and cause.closes_gap, out
    assert "make its model and tensors with `device='cuda:1'`" in cause.action
    assert "GPU 1 has room for this cell's work" in out
    assert _run(shell, capsys, "second = torch.nn.Linear(4096, 8192, device='cuda:1')")[0].success
