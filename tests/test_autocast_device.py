"""Enable autocast picks bfloat16 only where the GPU that ran out computes it in hardware.

``torch.cuda.is_bf16_supported()`` says True on a T4 or V100 (it emulates bf16, slower than fp16)
and asks the current device. The CUDA backend's answer is tested against a stand-in for
``torch.cuda`` (no GPU here: an A100 as GPU 0, a T4 as GPU 1); the fix in a real shell on the
simulated GPU with two cards, the second one answering as a T4.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from jupyter_gpumem import backends
from jupyter_gpumem.backends import cuda
from jupyter_gpumem.backends.cuda import CudaBackend


@pytest.fixture
def a100_and_t4(monkeypatch: Any) -> SimpleNamespace:
    capability = {0: 8, 1: 7}  # A100 is 8.0, T4 is 7.5
    fake_cuda = SimpleNamespace(
        current=0,
        is_available=lambda: True,
        get_device_properties=lambda i: SimpleNamespace(major=capability[i]),
        # torch's own answer: True on both (emulation counts) unless told not to count it
        is_bf16_supported=lambda including_emulation=True: True,
    )
    fake_cuda.current_device = lambda: fake_cuda.current
    fake_torch = SimpleNamespace(cuda=fake_cuda, version=SimpleNamespace(hip=None))
    monkeypatch.setattr(cuda, "torch_module", lambda: fake_torch)
    monkeypatch.setattr(cuda, "cuda_ready", lambda: True)
    return fake_cuda


def test_bf16_is_native_from_compute_capability_8_on_the_device_asked(
    a100_and_t4: SimpleNamespace,
) -> None:
    backend = CudaBackend()
    assert backend.supports_bf16(0) and not backend.supports_bf16(1)
    a100_and_t4.current = 1
    assert not backend.supports_bf16()  # the T4 emulates it: not native
    assert backend.supports_bf16(0)  # the A100, asked while the T4 is current


def test_without_properties_torch_is_asked_without_emulation(
    a100_and_t4: SimpleNamespace,
) -> None:
    asked: list[bool] = []

    def is_bf16_supported(including_emulation: bool = True) -> bool:
        asked.append(including_emulation)
        return including_emulation

    def no_properties(i: int) -> Any:
        raise RuntimeError("no properties")

    a100_and_t4.get_device_properties = no_properties
    a100_and_t4.is_bf16_supported = is_bf16_supported
    assert not CudaBackend().supports_bf16() and asked == [False]


SETUP = (
    "import torch\n"
    "model = torch.nn.Sequential(torch.nn.Linear(1024, 2048), torch.nn.ReLU(),"
    " torch.nn.Linear(2048, 1024)).to('cuda:1')\n"
)
CELL = 'x = torch.randn(220, 32, 1024, device="cuda:1")\nout = model(x).sum()\n'


@pytest.mark.slow
def test_autocast_asks_the_gpu_that_ran_out_not_the_current_one(shell: Any, run: Any) -> None:
    pytest.importorskip("torch")
    shell.run_cell("%gpumem simulate 160MiB --devices 2")
    gpu = backends.simulation()
    assert gpu is not None
    # GPU 0 (current) has bf16 in hardware, GPU 1 (where the cell runs out) is a T4
    gpu.supports_bf16 = lambda index=None: index != 1  # type: ignore[method-assign]
    assert backends.active().supports_bf16() and not backends.active().supports_bf16(1)
    shell.run_cell(SETUP)
    result = shell.run_cell(CELL)
    assert not result.success
    out = run(shell, "%gpumem retry autocast", store_history=False).out
    assert "under autocast (float16)" in out, out
    assert "GPU 1 has no bfloat16 in hardware" in out and "GradScaler" in out, out
