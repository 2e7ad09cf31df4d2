"""torch's device indices mapped to NVML's: CUDA_VISIBLE_DEVICES as CUDA reads it (indices, UUID
prefixes, MIG UUIDs, duplicates, the first invalid entry), CUDA_DEVICE_ORDER, torch's UUIDs.

The cases of the parser are nvitop's documented examples (nvitop/api/device.py,
``parse_cuda_visible_devices``) on a fake NVML; the CUDA backend is read with a monkeypatched
environment and the same fake (no GPU here).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from jupyter_gpumem.backends import _nvml, cuda
from jupyter_gpumem.backends.cuda import CudaBackend
from jupyter_gpumem.backends.visible_devices import Gpu, map_devices, parse_cuda_visible_devices
from jupyter_gpumem.readings.snapshot import read_snapshot

GiB = 1 << 30
U = [f"GPU-{c * 8}-1111-2222-3333-{c * 12}" for c in "abcd"]  # GPU-aaaaaaaa-…, GPU-bbbbbbbb-…
MIG = ["MIG-eeeeeeee-1111-2222-3333-eeeeeeeeeeee", "MIG-ffffffff-1111-2222-3333-ffffffffffff"]
# NVML's order (PCI bus): an A100 in MIG mode at 2, the rest whole cards
GPUS = [
    Gpu(0, U[0], "NVIDIA A100-SXM4-40GB"),
    Gpu(1, U[1], "NVIDIA A100-SXM4-40GB"),
    Gpu(2, U[2], "NVIDIA A100-SXM4-40GB", mig_enabled=True, migs=tuple(MIG)),
    Gpu(3, U[3], "NVIDIA A100-SXM4-40GB"),
]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        # a GPU in MIG mode among those listed: its first MIG device, and no whole card
        (None, [MIG[0]]),
        ("", []),
        ("3,1", [3, 1]),
        ("1,7,3", [1]),  # CUDA stops at the first invalid entry
        ("1,1", []),  # a duplicate: no device at all
        ("1x,3", [1, 3]),  # an entry's leading digits are its index
        ("-1", []),
        ("GPU-dddd", [3]),  # a unique UUID prefix is enough
        ("GPU-dddd,GPU-aaaa", [3, 0]),
        ("GPU-zzzz,0", []),
        ("0,GPU-bbbb", [0]),  # an integer then a UUID: stops at the UUID
        ("GPU-bbbb,0", [1]),
        (MIG[1], [MIG[1]]),
        (f"{MIG[1][:12]},{MIG[0]}", [MIG[1]]),  # at most one MIG device is visible
        ("0,2,3", [MIG[0]]),
    ],
)
def test_cuda_visible_devices_is_read_as_cuda_reads_it(value: str | None, expected: list) -> None:
    assert parse_cuda_visible_devices(value, GPUS) == expected


def test_an_ambiguous_uuid_prefix_is_invalid() -> None:
    gpus = [Gpu(0, "GPU-abc1-x"), Gpu(1, "GPU-abc2-x")]
    assert parse_cuda_visible_devices("GPU-abc", gpus) == []
    assert parse_cuda_visible_devices("GPU-abc2", gpus) == [1]


MIXED = [Gpu(0, U[0], "Tesla T4"), Gpu(1, U[1], "NVIDIA A100-PCIE-40GB")]


def test_fastest_first_order_makes_integers_uncertain_on_different_gpus() -> None:
    # CUDA's default: the A100 (faster) is cuda:0 though NVML numbers it 1
    assert map_devices(None, None, MIXED).uncertain is not None
    assert map_devices("0", "FASTEST_FIRST", MIXED).uncertain is not None
    assert "CUDA_DEVICE_ORDER=PCI_BUS_ID" in (map_devices("0,1", None, MIXED).uncertain or "")
    for certain in (
        map_devices("1,0", "PCI_BUS_ID", MIXED),  # the orders agree
        map_devices(f"{U[1]},{U[0]}", None, MIXED),  # UUIDs name the GPUs whatever the order
        map_devices(None, None, MIXED[:1]),  # one GPU: nothing to confuse
        map_devices(None, None, GPUS[:2]),  # identical cards: CUDA breaks the tie by PCI bus
    ):
        assert certain.uncertain is None, certain
    assert map_devices("1,0", "PCI_BUS_ID", MIXED).targets == (1, 0)


def test_torchs_uuids_tie_the_orders() -> None:
    # torch prints UUIDs bare; cuda:0 is the A100, NVML's GPU 1
    bare = [U[1].removeprefix("GPU-"), U[0].removeprefix("GPU-")]
    found = map_devices(None, None, MIXED, torch_uuids=bare)
    assert found.uncertain is None and found.targets == (1, 0)


# ---- the CUDA backend, through a fake NVML --------------------------------------------------------


class FakeNvml:
    """pynvml's calls over MIXED (a T4 with 15 GiB, an A100 with 40 GiB) and GPUS' MIG devices."""

    NVML_DEVICE_MIG_ENABLE = 1

    def __init__(self, gpus: list[Gpu], totals: list[int]) -> None:
        self.gpus, self.totals = gpus, totals

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> Any:
        return ("gpu", i)

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> Any:
        parent = next(g.index for g in self.gpus if uuid in g.migs)
        return ("mig", parent, uuid)

    def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(self, h: Any) -> Any:
        return ("gpu", h[1])

    def nvmlDeviceGetIndex(self, h: Any) -> int:
        return int(h[1])

    def nvmlDeviceGetMemoryInfo(self, h: Any) -> Any:
        total = 5 * GiB if h[0] == "mig" else self.totals[h[1]]
        return SimpleNamespace(total=total, used=GiB, free=total - GiB)

    def nvmlDeviceGetUUID(self, h: Any) -> str:
        return str(h[2]) if h[0] == "mig" else self.gpus[h[1]].uuid

    def nvmlDeviceGetName(self, h: Any) -> str:
        return str(self.gpus[h[1]].name)

    def nvmlDeviceGetMigMode(self, h: Any) -> tuple[int, int]:
        on = int(self.gpus[h[1]].mig_enabled)
        return on, on

    def nvmlDeviceGetMaxMigDeviceCount(self, h: Any) -> int:
        return 7

    def nvmlDeviceGetMigDeviceHandleByIndex(self, h: Any, j: int) -> Any:
        migs = self.gpus[h[1]].migs
        if j >= len(migs):
            raise RuntimeError("NVML_ERROR_NOT_FOUND")
        return ("mig", h[1], migs[j])

    def nvmlDeviceGetComputeRunningProcesses(self, h: Any) -> list[Any]:
        return []

    nvmlDeviceGetGraphicsRunningProcesses = nvmlDeviceGetComputeRunningProcesses


def _use(monkeypatch: Any, fake: FakeNvml, torch: Any = None) -> None:
    monkeypatch.setattr(_nvml, "_state", {"tried": True, "nvml": fake, "error": None})
    monkeypatch.setattr(cuda, "torch_module", lambda: torch)
    monkeypatch.setattr(cuda, "cuda_ready", lambda: torch is not None)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)


def test_an_uncertain_mapping_shows_no_other_cards_numbers_and_says_why(monkeypatch: Any) -> None:
    _use(
        monkeypatch,
        FakeNvml([Gpu(0, U[0], "Tesla T4"), Gpu(1, U[1], "A100")], [15 * GiB, 40 * GiB]),
    )
    snap = read_snapshot(0, backend=CudaBackend())
    assert snap.total_bytes is None  # not the T4's 15 GiB for what may be the A100
    assert "CUDA_DEVICE_ORDER=PCI_BUS_ID" in (snap.nvml_error or ""), snap.nvml_error
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    snap = read_snapshot(0, backend=CudaBackend())
    assert snap.total_bytes == 40 * GiB and snap.nvml_error is None


def test_torchs_uuids_pick_the_card_once_torch_has_a_context(monkeypatch: Any) -> None:
    fake = FakeNvml([Gpu(0, U[0], "Tesla T4"), Gpu(1, U[1], "A100")], [15 * GiB, 40 * GiB])
    uuids = [U[1][4:], U[0][4:]]  # cuda:0 is the A100 (fastest first)
    torch = SimpleNamespace(
        cuda=SimpleNamespace(
            is_available=lambda: True,
            device_count=lambda: 2,
            current_device=lambda: 0,
            get_device_properties=lambda i: SimpleNamespace(uuid=uuids[i]),
            memory_stats=lambda i=None: {},
            mem_get_info=lambda i=None: (0, 0),
            get_per_process_memory_fraction=lambda i=None: 1.0,
        )
    )
    _use(monkeypatch, fake, torch)
    reading = CudaBackend().read(0)
    assert reading.total_bytes == 40 * GiB and reading.uuid == U[1]


def test_a_mig_uuid_in_cuda_visible_devices_reads_that_mig_device(monkeypatch: Any) -> None:
    _use(monkeypatch, FakeNvml(GPUS, [40 * GiB] * 4))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", MIG[1])
    backend = CudaBackend()
    assert backend.visible_devices() == (0,)
    reading = backend.read(0)
    assert reading.total_bytes == 5 * GiB and reading.uuid == MIG[1]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,1")  # a duplicate: CUDA sees nothing
    assert backend.visible_devices() == ()
