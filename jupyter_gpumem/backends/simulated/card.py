"""One simulated card: PyTorch's caching allocator on it, what is counted, torch's OOM message.

How it counts. Each storage allocated on the card is one request to the card's
:class:`~.caching_allocator.CachingAllocator` (torch's, ported): views count once with their
base, and a storage's block goes back to the allocator's cache when its last tensor dies.
*allocated* and *reserved* are the allocator's (blocks rounded as torch rounds them; freed blocks
stay reserved until ``empty_cache`` or an allocation that needs their room). An allocation fails
as torch's does: no cached block fits, and the driver has no room for a new segment even after the
allocator gave back what it could. The driver's room is the card less its CUDA context
(``context_bytes``: memory of this process outside PyTorch, as ``mem_get_info`` sees it), the
other processes, and the cap.
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

from jupyter_gpumem.backends.alloc_conf import AllocConf
from jupyter_gpumem.backends.simulated import caching_allocator as _ca
from jupyter_gpumem.backends.simulated.caching_allocator import AllocatorOOM, Block
from jupyter_gpumem.backends.simulated.profiles import CardProfile

_DOCS = "https://docs.pytorch.org/docs/stable/notes/cuda.html#optimizing-memory-usage-with-pytorch-cuda-alloc-conf"


def allocation_size(nbytes: int, conf: AllocConf | None = None) -> int:
    """What torch says it "tried to allocate" for a tensor of ``nbytes`` (the segment it needed)."""
    conf = conf or AllocConf()
    return _ca.allocation_size(_ca.round_size(nbytes, conf), conf)


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
    non_pytorch: int = 0,
) -> str:
    """torch 2.x's CUDA OOM message, clause for clause (``Process N ...`` as NVML lists them;
    this process's memory is what PyTorch reserved and ``non_pytorch``, its CUDA context)."""
    procs = "".join(
        f"Process {pid} has {format_size(n)} memory in use. " for pid, n in other_processes
    )
    cap = "" if allowed is None else f"{format_size(allowed)} allowed; "
    return (
        f"CUDA out of memory. Tried to allocate {format_size(requested)}. GPU {device} has a total "
        f"capacity of {format_size(total)} of which {format_size(free)} is free. {procs}"
        f"Including non-PyTorch memory, this process has {format_size(reserved + non_pytorch)} "
        "memory in use. "
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

    __slots__ = ("block", "homeless", "key", "nbytes")

    def __init__(
        self,
        ob: Any,
        callback: Callable[[Any], Any],
        key: int,
        nbytes: int,
        homeless: bool,
        block: Block | None = None,
    ) -> None:
        super().__init__(ob, callback)  # type: ignore[call-arg]
        self.key, self.nbytes, self.homeless = key, nbytes, homeless
        self.block = block  # the allocator's block; None for an empty storage (no memory)

    def __new__(cls, ob: Any, callback: Callable[[Any], Any], *_: Any) -> _StorageRef:
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
        context_bytes: int = 0,
        conf: AllocConf | None = None,
        profile: CardProfile | None = None,
    ) -> None:
        if total_bytes <= 0:
            raise ValueError(f"a simulated GPU needs a positive size, not {total_bytes}")
        if allowed_bytes is not None and allowed_bytes < 0:
            raise ValueError(f"the cap cannot be negative: {allowed_bytes}")
        self.total_bytes = int(total_bytes)
        self.device_index = device_index
        self._lock = threading.Lock()
        self._alloc = _ca.CachingAllocator(conf, capacity=self.total_bytes)
        self._live: dict[int, _StorageRef] = {}  # StorageImpl address -> its reference
        self._dead: collections.deque[_StorageRef] = collections.deque()  # freed, not yet drained
        self._on_free = self._dead.append  # weakref callbacks only queue: they may run anywhere
        self._history: Any = history  # backends/_trace.py's recorder while tracing, else None
        self._allowed: int | None = None
        self._context = 0
        self.profile: CardProfile | None = None
        self.name = f"Simulated GPU ({format_bytes(self.total_bytes)})"  # 24 MiB, not 0.02 GiB
        self.other_processes = other_processes
        self.allowed_bytes = allowed_bytes
        self.configure(context_bytes=context_bytes, profile=profile)

    def configure(
        self,
        *,
        context_bytes: int | None = None,
        conf: AllocConf | None = None,
        profile: CardProfile | None = None,
    ) -> None:
        """Set the card's profile (name, compute capability), its CUDA context's memory and the
        allocator's settings; the settings only before anything is allocated, as torch reads
        them once at start-up."""
        with self._lock:
            if profile is not None:
                self.profile = profile
                self.name = profile.name
            if context_bytes is not None:
                if not 0 <= context_bytes < self.total_bytes:
                    raise ValueError(
                        f"a CUDA context of {format_bytes(context_bytes)} does not fit a card of "
                        f"{format_bytes(self.total_bytes)}"
                    )
                self._context = int(context_bytes)
            if conf is not None:
                if self._live or self._alloc.reserved:
                    raise RuntimeError("the allocator's settings are read before it allocates")
                self._alloc.conf = conf
            self._sync_limits()

    @property
    def alloc_conf(self) -> AllocConf:
        return self._alloc.conf

    @property
    def context_bytes(self) -> int:
        """This process's memory on the card outside PyTorch's allocator (its CUDA context)."""
        return self._context

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
            return self._alloc.allocated_bytes

    @property
    def reserved_bytes(self) -> int:
        with self._lock:
            self._drain()
            return self._alloc.reserved

    @property
    def peak_allocated_bytes(self) -> int:
        with self._lock:
            return self._alloc.stat("allocated_bytes", "all", "peak")

    @property
    def peak_reserved_bytes(self) -> int:
        with self._lock:
            return self._alloc.stat("reserved_bytes", "all", "peak")

    @property
    def num_ooms(self) -> int:
        return int(self._alloc.stats["num_ooms"])

    @property
    def free_bytes(self) -> int:
        """What the driver reports free: the card less our reserved memory and CUDA context, and
        the other processes."""
        return max(self.total_bytes - self.reserved_bytes - self._context - self._others, 0)

    def mem_get_info(self) -> tuple[int, int]:
        return self.free_bytes, self.total_bytes

    def memory_stats(self) -> dict[str, int]:
        """``torch.cuda.memory_stats()``: the allocator's statistics, under torch's keys."""
        with self._lock:
            self._drain()
            return self._alloc.memory_stats()

    def memory_snapshot(self) -> list[dict[str, Any]]:
        """``torch.cuda.memory_snapshot()``'s segments on this card, with their blocks."""
        with self._lock:
            self._drain()
            return self._alloc.snapshot(self.device_index)

    def empty_cache(self) -> None:
        """``torch.cuda.empty_cache()``: cached segments that are wholly free go back."""
        with self._lock:
            self._drain()
            self._alloc.empty_cache()

    def reset_peak(self) -> None:
        with self._lock:
            self._drain()
            self._alloc.reset_peak_stats()

    def reset_accumulated(self) -> None:
        with self._lock:
            self._drain()
            self._alloc.reset_accumulated_stats()

    def settle(self) -> None:
        """Free the blocks of storages that died since the last reading (their weakref callbacks
        only queue them), telling the history what they were."""
        with self._lock:
            self._drain()

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
                self._release(ref)
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
        if hasattr(self, "_alloc"):
            self._sync_limits()

    @property
    def allowed_bytes(self) -> int | None:
        """The per-process cap (``set_per_process_memory_fraction``), or None."""
        return self._allowed

    @allowed_bytes.setter
    def allowed_bytes(self, value: int | None) -> None:
        self._allowed = None if value is None else int(value)
        self._sync_limits()

    def _sync_limits(self) -> None:
        alloc = self._alloc
        alloc.capacity = self.total_bytes - self._context - getattr(self, "_others", 0)
        alloc.total_memory = self.total_bytes
        fraction = alloc.conf.per_process_memory_fraction  # PYTORCH_CUDA_ALLOC_CONF's cap
        from_conf = None if fraction >= 1.0 else int(fraction * self.total_bytes)
        alloc.allowed = self._allowed if self._allowed is not None else from_conf

    def _release(self, ref: _StorageRef) -> None:  # caller holds the lock
        if ref.block is not None:
            self._alloc.free(ref.block)
            ref.block = None
        if self._history is not None:
            self._history.free(ref.key, ref.nbytes, self.device_index)

    def _drain(self) -> None:  # caller holds the lock
        dead, live = self._dead, self._live
        while dead:
            ref = dead.popleft()
            if live.get(ref.key) is ref:
                del live[ref.key]
                self._release(ref)

    def _fail(self, oom: AllocatorOOM) -> str:  # caller holds the lock
        alloc = self._alloc
        free = max(self.total_bytes - alloc.reserved - self._context - self._others, 0)
        if self._history is not None:
            self._history.oom(oom.alloc_size, free, self.device_index)
        return oom_message(
            oom.alloc_size,
            device=self.device_index,
            total=self.total_bytes,
            free=free,
            reserved=alloc.reserved,
            allocated=alloc.allocated_bytes,
            allowed=alloc.allowed,
            other_processes=self.other_processes,
            non_pytorch=self._context,
        )

    def _precheck(self, nbytes: int) -> str | None:
        """Before an allocation of known size: the OOM message if it would not fit."""
        with self._lock:
            self._drain()
            alloc = self._alloc
            if alloc.would_fit(nbytes):
                return None
            try:  # the real request, with the allocator's retries: torch's own numbers if it fails
                alloc.free(alloc.malloc(nbytes))
            except AllocatorOOM as oom:
                return self._fail(oom)
            return None

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
            alloc = self._alloc
            blocks: list[Block | None] = []
            for _storage, nbytes in new.values():
                try:
                    blocks.append(alloc.malloc(nbytes) if nbytes else None)
                except AllocatorOOM as oom:
                    message = self._fail(oom)  # earlier outputs of the op still count here
                    for block in blocks:
                        if block is not None:
                            alloc.free(block)
                    return message
            live, on_free = self._live, self._on_free
            for (key, (storage, nbytes)), block in zip(new.items(), blocks, strict=True):
                live[key] = _StorageRef(storage, on_free, key, nbytes, homeless, block)
            if self._history is not None:
                self._history.alloc(new, self.device_index)
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
        """A storage grown or shrunk in place: a block of the new size (the driver never refuses:
        the storage already exists), the old one freed."""
        with self._lock:
            alloc = self._alloc
            if ref.block is not None:
                alloc.free(ref.block)
            ref.block = alloc.malloc(nbytes, force=True) if nbytes else None
            ref.nbytes = nbytes
