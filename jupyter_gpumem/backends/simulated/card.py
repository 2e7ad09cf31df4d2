"""One simulated card: the caching allocator's arithmetic, what is counted, torch's OOM message.

How it counts. *allocated* is live storage bytes: views count once with their base, and a storage
stops counting when its last tensor dies. *reserved* models the caching allocator without its
cache: tensors up to 1 MiB pack into 2 MiB blocks, those under 10 MiB into 20 MiB blocks, larger
ones take their size rounded up to 2 MiB, and freed memory goes back at once (so ``empty_cache``
has nothing to do). An allocation fails when reserved memory would pass the card less the other
processes, or the cap.
"""

from __future__ import annotations

import collections
import threading
import weakref
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from jupyter_gpumem.units import GiB, MiB, format_bytes

if TYPE_CHECKING:
    import torch

__all__ = ["SimulatedCard", "allocation_size", "format_size", "oom_message"]

from jupyter_gpumem.backends.allocator import LARGE_BUFFER as _LARGE_BUFFER
from jupyter_gpumem.backends.allocator import MIN_LARGE_ALLOC as _MIN_LARGE_ALLOC
from jupyter_gpumem.backends.allocator import ROUND_LARGE as _ROUND_LARGE
from jupyter_gpumem.backends.allocator import SMALL_BUFFER as _SMALL_BUFFER
from jupyter_gpumem.backends.allocator import SMALL_SIZE as _SMALL_SIZE
from jupyter_gpumem.backends.allocator import Pools
from jupyter_gpumem.backends.allocator import ceil_to as _ceil
from jupyter_gpumem.backends.allocator import rounded as _rounded

_DOCS = "https://docs.pytorch.org/docs/stable/notes/cuda.html#optimizing-memory-usage-with-pytorch-cuda-alloc-conf"


def allocation_size(nbytes: int) -> int:
    """What torch says it "tried to allocate" for a tensor of ``nbytes`` (a whole block)."""
    size = _rounded(nbytes)
    if size <= _SMALL_SIZE:
        return _SMALL_BUFFER
    if size < _MIN_LARGE_ALLOC:
        return _LARGE_BUFFER
    return _ceil(size, _ROUND_LARGE)


def format_size(nbytes: int) -> str:
    """c10's ``format_size``: sizes as torch's OOM message has them (``0 bytes``, ``2.00 MiB``)."""
    if nbytes <= 1024:
        return f"{nbytes} bytes"
    if nbytes <= MiB:
        return f"{nbytes / 1024:.2f} KiB"
    if nbytes <= GiB:
        return f"{nbytes / MiB:.2f} MiB"
    return f"{nbytes / GiB:.2f} GiB"


def oom_message(
    requested: int,
    *,
    device: int,
    total: int,
    free: int,
    reserved: int,
    allocated: int,
    allowed: int | None = None,
    other_processes: Iterable[tuple[int, int]] = (),
) -> str:
    """torch 2.x's CUDA OOM message, clause for clause (``Process N ...`` as NVML lists them)."""
    procs = "".join(
        f"Process {pid} has {format_size(n)} memory in use. " for pid, n in other_processes
    )
    cap = "" if allowed is None else f"{format_size(allowed)} allowed; "
    return (
        f"CUDA out of memory. Tried to allocate {format_size(requested)}. GPU {device} has a total "
        f"capacity of {format_size(total)} of which {format_size(free)} is free. {procs}"
        f"Including non-PyTorch memory, this process has {format_size(reserved)} memory in use. "
        f"{cap}Of the allocated memory {format_size(allocated)} is allocated by PyTorch, and "
        f"{format_size(reserved - allocated)} is reserved by PyTorch but unallocated. If reserved "
        "but unallocated memory is large try setting "
        "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation."
        f"  See documentation for Memory Management  ({_DOCS})"
    )


class _StorageRef(weakref.ref):
    """A weak reference to a counted storage; its callback queues it for release. ``homeless``:
    counted where it was made, no placement naming a card (real torch would have made it on the
    CPU), until a placement sends it to a card (``SimulatedGPU._moved``)."""

    __slots__ = ("homeless", "key", "nbytes")

    def __init__(
        self, ob: Any, callback: Callable[[Any], Any], key: int, nbytes: int, homeless: bool
    ) -> None:
        super().__init__(ob, callback)  # type: ignore[call-arg]
        self.key, self.nbytes, self.homeless = key, nbytes, homeless

    def __new__(cls, ob: Any, callback: Callable[[Any], Any], *_: int) -> _StorageRef:
        return super().__new__(cls, ob, callback)


class SimulatedCard:
    """One simulated card: its size, what is counted on it, and torch-style readings."""

    def __init__(
        self,
        total_bytes: int,
        *,
        other_processes: Iterable[tuple[int, int]] = (),
        allowed_bytes: int | None = None,
        device_index: int = 0,
        history: Any = None,
    ) -> None:
        if total_bytes <= 0:
            raise ValueError(f"a simulated GPU needs a positive size, not {total_bytes}")
        if allowed_bytes is not None and allowed_bytes < 0:
            raise ValueError(f"the cap cannot be negative: {allowed_bytes}")
        self.total_bytes = int(total_bytes)
        self.device_index = device_index
        self.name = f"Simulated GPU ({format_bytes(self.total_bytes)})"  # 24 MiB, not 0.02 GiB
        self.other_processes = other_processes
        self.allowed_bytes = allowed_bytes
        self._lock = threading.Lock()
        self._live: dict[int, _StorageRef] = {}  # StorageImpl address -> its reference
        self._dead: collections.deque[_StorageRef] = collections.deque()  # freed, not yet drained
        self._on_free = self._dead.append  # weakref callbacks only queue: they may run anywhere
        self._allocated = 0
        self._pools = Pools()  # the allocator's blocks (backends/allocator.py)
        self._peak_allocated = self._peak_reserved = self._num_ooms = 0
        self._history: Any = history  # backends/_trace.py's recorder while tracing, else None

    def __repr__(self) -> str:
        return (
            f"<{self.name}: {format_size(self.allocated_bytes)} allocated, "
            f"{format_size(self.reserved_bytes)} reserved>"
        )

    # ---- readings ---------------------------------------------------------------------------

    @property
    def allocated_bytes(self) -> int:
        with self._lock:
            self._drain()
            return self._allocated

    @property
    def reserved_bytes(self) -> int:
        with self._lock:
            self._drain()
            return self._reserved()

    @property
    def peak_allocated_bytes(self) -> int:
        with self._lock:
            return self._peak_allocated

    @property
    def peak_reserved_bytes(self) -> int:
        with self._lock:
            return self._peak_reserved

    @property
    def num_ooms(self) -> int:
        return self._num_ooms

    @property
    def free_bytes(self) -> int:
        """What the driver would report free: the card less our reserved and other processes."""
        return max(self.total_bytes - self.reserved_bytes - self._others, 0)

    def mem_get_info(self) -> tuple[int, int]:
        return self.free_bytes, self.total_bytes

    def memory_stats(self) -> dict[str, int]:
        with self._lock:
            self._drain()
            return {
                "allocated_bytes.all.current": self._allocated,
                "allocated_bytes.all.peak": self._peak_allocated,
                "reserved_bytes.all.current": self._reserved(),
                "reserved_bytes.all.peak": self._peak_reserved,
                "allocation.all.current": len(self._live),
                "num_ooms": self._num_ooms,
                "num_alloc_retries": 0,
            }

    def reset_peak(self) -> None:
        with self._lock:
            self._drain()
            self._peak_allocated, self._peak_reserved = self._allocated, self._reserved()

    def holds(self, tensor: torch.Tensor) -> bool:
        """Whether the tensor's storage is counted on this card."""
        return self._ref(tensor) is not None

    def _ref(self, tensor: torch.Tensor) -> _StorageRef | None:
        """The reference counting the tensor's storage here, if any."""
        try:
            storage = tensor.untyped_storage()
        except Exception:
            return None
        ref = self._live.get(storage._cdata)
        return ref if ref is not None and ref() is storage else None

    def counted_storage(self, tensor: torch.Tensor) -> tuple[int, int] | None:
        """(storage key, nbytes) when the tensor's storage is counted on this card, else None."""
        ref = self._ref(tensor)
        return None if ref is None else (ref.key, ref.nbytes)

    def live_storages(self) -> list[tuple[int, int]]:
        """(storage key, nbytes) of every storage counted now."""
        with self._lock:
            self._drain()
            return [(ref.key, ref.nbytes) for ref in self._live.values()]

    def track(self, *tensors: torch.Tensor) -> None:
        """Count tensors made before the simulation, as if moved to this card (may raise its OOM)."""
        import torch

        message = self._count(tensors)
        if message is not None:
            raise torch.OutOfMemoryError(message)

    def untrack(self, tensor: torch.Tensor) -> torch.Tensor:
        """Stop counting the tensor's storage (it moved "off the card"); returns the tensor."""
        try:
            storage = tensor.untyped_storage()
        except Exception:
            return tensor
        with self._lock:
            self._drain()
            ref = self._live.get(storage._cdata)
            if ref is not None and ref() is storage:
                del self._live[ref.key]
                self._grow(ref.nbytes, -1)
                if self._history is not None:
                    self._history.free(ref.key, ref.nbytes)
        return tensor

    # ---- the model, called by the dispatch mode ---------------------------------------------

    @property
    def other_processes(self) -> tuple[tuple[int, int], ...]:
        """Pretend processes on the card, as (pid, used bytes): they count against free memory."""
        return self._other_processes

    @other_processes.setter
    def other_processes(self, value: Iterable[tuple[int, int]]) -> None:
        self._other_processes = tuple((int(pid), int(n)) for pid, n in value)
        self._others = sum(n for _pid, n in self._other_processes)

    def _budget(self) -> int:
        card = self.total_bytes - self._others
        return card if self.allowed_bytes is None else min(card, self.allowed_bytes)

    def _reserved(self) -> int:
        return self._pools.reserved()

    def _grow(self, nbytes: int, sign: int) -> None:
        self._allocated += sign * nbytes
        self._pools.grow(nbytes, sign)

    def _drain(self) -> None:  # caller holds the lock
        dead, live = self._dead, self._live
        while dead:
            ref = dead.popleft()
            if live.get(ref.key) is ref:
                del live[ref.key]
                self._grow(ref.nbytes, -1)
                if self._history is not None:
                    self._history.free(ref.key, ref.nbytes)

    def _note_peaks(self) -> None:
        self._peak_allocated = max(self._peak_allocated, self._allocated)
        self._peak_reserved = max(self._peak_reserved, self._reserved())

    def _fail(self, nbytes: int) -> str:  # caller holds the lock
        self._num_ooms += 1
        reserved = self._reserved()
        if self._history is not None:
            free = max(self.total_bytes - reserved - self._others, 0)
            self._history.oom(allocation_size(nbytes), free)
        return oom_message(
            allocation_size(nbytes),
            device=self.device_index,
            total=self.total_bytes,
            free=max(self.total_bytes - reserved - self._others, 0),
            reserved=reserved,
            allocated=self._allocated,
            allowed=self.allowed_bytes,
            other_processes=self.other_processes,
        )

    def _precheck(self, nbytes: int) -> str | None:
        """Before an allocation of known size: the OOM message if it would not fit."""
        with self._lock:
            self._drain()
            self._grow(nbytes, 1)
            fits = self._reserved() <= self._budget()
            self._grow(nbytes, -1)
            return None if fits else self._fail(nbytes)

    def _count(
        self,
        tensors: Iterable[torch.Tensor],
        fresh: bool = True,
        others: tuple[SimulatedCard, ...] = (),
        homeless: bool = False,
    ) -> str | None:
        """Count the new storages behind ``tensors``; the OOM message (nothing counted) if over.

        Not ``fresh``: tensors written in place, whose storage is only recounted if it was resized.
        ``others``: the machine's other cards, where a storage may already be counted.
        ``homeless``: new storages no placement put here (see ``_StorageRef``).
        """
        live = self._live
        new: dict[int, tuple[Any, int]] | None = None
        for t in tensors:
            if not t.is_cpu:  # meta and fake tensors hold no memory
                continue
            try:
                storage = t.untyped_storage()
            except Exception:  # sparse, nested: no plain storage
                continue
            key = storage._cdata
            ref = live.get(key)
            if ref is not None and ref() is storage:
                if ref.nbytes != storage.nbytes():
                    self._resized(ref, storage.nbytes())
                continue
            if others and any(card._recount(storage) for card in others):
                continue
            if not fresh:
                continue
            if new is None:
                new = {}
            new[key] = (storage, storage.nbytes())
        return None if new is None else self._commit(new, homeless)

    def _commit(self, new: dict[int, tuple[Any, int]], homeless: bool = False) -> str | None:
        with self._lock:
            if self._dead:
                self._drain()
            budget, reserved = self._budget(), 0
            added: list[int] = []
            for _storage, nbytes in new.values():
                self._grow(nbytes, 1)
                reserved = self._reserved()
                if reserved > budget:
                    self._grow(nbytes, -1)
                    message = self._fail(nbytes)  # earlier outputs of the op still count here
                    for n in added:
                        self._grow(n, -1)
                    return message
                added.append(nbytes)
            live, on_free = self._live, self._on_free
            for key, (storage, nbytes) in new.items():
                live[key] = _StorageRef(storage, on_free, key, nbytes, homeless)
            if self._history is not None:
                self._history.alloc(new)
            if self._allocated > self._peak_allocated:
                self._peak_allocated = self._allocated
            if reserved > self._peak_reserved:
                self._peak_reserved = reserved
        return None

    def _recount(self, storage: Any) -> bool:
        """Whether ``storage`` is counted here (recounted at its size if it was resized)."""
        ref, nbytes = self._live.get(storage._cdata), int(storage.nbytes())
        if ref is not None and ref() is storage:
            if ref.nbytes != nbytes:
                self._resized(ref, nbytes)
            return True
        return False

    def _resized(self, ref: _StorageRef, nbytes: int) -> None:
        with self._lock:
            self._grow(ref.nbytes, -1)
            self._grow(nbytes, 1)
            ref.nbytes = nbytes
            self._note_peaks()
