"""The one interface the rest of the package reads GPU memory through, and which backend answers.

Two backends implement :class:`MemoryBackend`: the CUDA one (torch + NVML, ``backends/cuda.py``)
and the simulated GPU (``backends/simulated``), a double that runs in host memory. Nothing outside
``backends/`` asks which one it has: it calls :func:`active` once per job (a reading, a scan, a
release, a fix) and goes through what it got. A simulation selects itself while it runs
(:func:`select`) and deselects itself when it ends; otherwise the default answers
(:func:`set_default`: the CUDA backend, set by the package).
"""

from __future__ import annotations

import threading
from contextlib import AbstractContextManager
from dataclasses import dataclass
from types import TracebackType
from typing import Any, NamedTuple, Protocol, runtime_checkable

from jupyter_gpumem.backends.allocator import SizeLog

__all__ = [
    "DeviceLabel",
    "DeviceReading",
    "MemoryBackend",
    "RawProcess",
    "StorageInfo",
    "active",
    "deselect",
    "on_device",
    "select",
    "set_default",
]


class DeviceLabel(str):
    """How a storage's device is shown ("cuda:1", "cuda:0 (simulated)"), carrying the card's
    ``device_index`` (torch's, read from the tensor by the backend; None: not a CUDA card).

    A ``str``, so what keeps or shows it (holders, the panel, the front end) takes it as text; the
    index travels with it, so nothing reads it back out of the words: :func:`on_device` asks."""

    device_index: int | None

    def __new__(cls, text: str, device_index: int | None) -> DeviceLabel:
        label = super().__new__(cls, text)
        label.device_index = device_index
        return label

    def __getnewargs__(self) -> tuple[str, int | None]:  # type: ignore[override]
        return str(self), self.device_index  # copy and pickle make it again with its index


def on_device(device: str, index: int | None) -> bool:
    """Whether what a storage or a holder names as its ``device`` is on card ``index`` (None: any
    card). Text without an index (no storage was read, or not a :class:`DeviceLabel`) counts on
    every card."""
    if index is None:
        return True
    known = device.device_index if isinstance(device, DeviceLabel) else None
    return known is None or known == index


# (key, nbytes, device): the key identifies the storage (views and tied weights count once), the
# device is how holders name it, with its index (:class:`DeviceLabel`)
StorageInfo = tuple[tuple[str, int], int, DeviceLabel]


class RawProcess(NamedTuple):
    """A process on a device as the backend sees it; readings describe the ones left undescribed."""

    pid: int
    used_bytes: int
    description: str | None = None  # None: readings look at /proc and the Jupyter servers
    is_self: bool = False


@dataclass(frozen=True)
class DeviceReading:
    """One device, read once. Anything the backend cannot tell is None."""

    index: int  # torch's (logical) index, after CUDA_VISIBLE_DEVICES
    name: str | None
    title: str  # how the UI names it: "NVIDIA H100 80GB HBM3 (GPU 0)", "Simulated GPU (2.00 GiB)"
    total_bytes: int | None = None
    free_bytes: int | None = None
    used_bytes: int | None = None  # by every process (nvidia-smi's number)
    stats: dict[str, int] | None = None  # torch.cuda.memory_stats() keys
    allowed_bytes: int | None = None
    processes: tuple[RawProcess, ...] = ()
    uuid: str | None = None
    error: str | None = None  # why the driver gives no reading (NVML's error)
    note: str | None = None  # said after the device's label: "simulated"


@runtime_checkable
class MemoryBackend(Protocol):
    """What the readers, the release, the fixes and the UI need from a GPU."""

    note: str | None  # None on real hardware; "simulated" for the double

    def visible_devices(self) -> tuple[int, ...]:
        """torch's indices of every device this process can use (CUDA_VISIBLE_DEVICES applied)."""
        ...

    def current_device(self) -> int: ...

    def read(self, index: int | None = None) -> DeviceReading:
        """The device's reading; never raises."""
        ...

    def allocator_stats(self, index: int | None = None) -> dict[str, int] | None: ...

    def mem_get_info(self, index: int | None = None) -> tuple[int, int] | None:
        """(free, total) as the driver says, or None."""
        ...

    def process_cap(self, index: int | None = None) -> int | None:
        """The per-process cap, if one is set."""
        ...

    def set_limit(self, limit_bytes: int | None, index: int | None = None) -> int:
        """Cap what this process may use on device ``index``, on every visible device when it is
        None (a ``limit_bytes`` of None lifts the cap); returns the device's total bytes (None:
        the current device's)."""
        ...

    def storage_of(self, tensor: Any) -> StorageInfo | None:
        """The storage behind a tensor on this GPU; None for anything not on it. Kept lean."""
        ...

    def empty_cache(self) -> None: ...

    def reset_peak(self, index: int | None = None) -> None: ...

    def move_to_cpu(self, obj: Any) -> tuple[Any, int]:
        """A tensor, model or optimizer's state moved to the CPU; (object, bytes moved)."""
        ...

    def host_only(self) -> AbstractContextManager[Any]:
        """A block whose tensors are host memory and must not count on the GPU."""
        ...

    def placements_to_cpu(self) -> AbstractContextManager[Any]:
        """A block where code written for the GPU runs on the CPU: every CUDA placement
        (``x.cuda()``, ``device="cuda:1"``, a default device) makes a CPU tensor instead. What it
        enters has ``redirected``, a ``Counter`` of what it sent, by torch's function name."""
        ...

    def on_this_thread(self) -> AbstractContextManager[Any]:
        """A block that sees this GPU from the calling thread as the cell's thread does."""
        ...

    def autocast_device_type(self) -> str:
        """Where ``torch.autocast`` must act for tensors "on the GPU"."""
        ...

    def record_sizes(self, index: int | None = None) -> AbstractContextManager[SizeLog | None]:
        """A block whose allocations and frees on device ``index`` (None: the current one) are
        logged, in order (a :class:`~.allocator.SizeLog`, filled when the block ends); None where
        they cannot be."""
        ...

    def supports_bf16(self, index: int | None = None) -> bool:
        """Device ``index`` (None: the current one) computes in bfloat16 natively (compute
        capability 8.0 or later on CUDA), not by emulation, which is slower than float16:
        ``torch.cuda.is_bf16_supported(including_emulation=False)`` for that device."""
        ...

    def user_traceback(self, tb: TracebackType | None) -> TracebackType | None:
        """The traceback as the user should see it (the backend's own frames left out)."""
        ...


_lock = threading.Lock()
_selected: list[MemoryBackend] = []
_default: list[MemoryBackend] = []


def active() -> MemoryBackend:
    """The backend that answers now: the last one selected, else the default (the CUDA one)."""
    selected = _selected
    if selected:
        return selected[-1]
    return _default[0]


def set_default(backend: MemoryBackend) -> None:
    """The backend that answers when none is selected. ``backends/__init__.py`` sets the CUDA
    one as the package is imported: this module imports no backend, so that each can import it."""
    with _lock:
        _default[:] = [backend]


def select(backend: MemoryBackend) -> None:
    """Make ``backend`` the active one until :func:`deselect`."""
    with _lock:
        _selected.append(backend)


def deselect(backend: MemoryBackend) -> None:
    """Stop answering with ``backend`` (whatever was selected after it stays)."""
    with _lock:
        for i in range(len(_selected) - 1, -1, -1):
            if _selected[i] is backend:
                del _selected[i]
                return
