"""A simulated GPU: run notebook cells as if on a CUDA card of any size, on a machine without one.

``%gpumem simulate 2GiB`` (from Python:
``jupyter_gpumem.backends.simulated.start(parse_size("2GiB"))``) makes what runs next on this thread
behave as if the process had a 2 GiB CUDA GPU:

- code that places tensors on ``cuda`` runs, with the tensors on the CPU (``.cuda()``,
  ``.to("cuda")``, ``device="cuda"``, ``module.cuda()``, ``torch.set_default_device("cuda")``);
- every tensor allocated counts against the card, and going over raises a real
  ``torch.OutOfMemoryError`` with torch's own CUDA message, numbers and all;
- ``torch.cuda.is_available()`` is True and the readings (``memory_allocated``,
  ``max_memory_allocated``, ``mem_get_info``, ``memory_stats``, ... see ``_CUDA``) report the
  simulated card, so a notebook that measures its peaks runs unchanged.

It is a real backend that lives in memory, like httpx's ``MockTransport``: rehearse a notebook on a
small card, or test code that must survive an OOM::

    import torch
    from jupyter_gpumem.backends import simulated
    from jupyter_gpumem.units import parse_size

    gpu = simulated.start(parse_size("2GiB"))
    try:
        model = torch.nn.Linear(4096, 4096).cuda()      # 64 MiB of weights, counted
        x = torch.randn(150_000, 4096, device="cuda")   # 2.29 GiB: torch.OutOfMemoryError
    finally:
        simulated.stop()
    print(gpu.peak_allocated_bytes, gpu.num_ooms)

``start(size, other_processes=[(pid, nbytes)], allowed_bytes=n)`` adds pretend processes holding
memory on the card (``Process N has ...`` in the message) and a per-process cap like
``torch.cuda.set_per_process_memory_fraction`` (the ``X allowed;`` clause). ``paused()`` stops
counting for a while (CPU work in the middle of a simulation); ``SimulatedGPU.track`` and
``untrack`` put a tensor on the card or take it off.

How it counts. *allocated* is live storage bytes: views count once with their base, and a storage
stops counting when its last tensor dies. *reserved* models the caching allocator without its
cache: tensors up to 1 MiB pack into 2 MiB blocks, those under 10 MiB into 20 MiB blocks, larger
ones take their size rounded up to 2 MiB, and freed memory goes back at once (so ``empty_cache``
has nothing to do). An allocation fails when reserved memory would pass the card less the other
processes, or the cap. Factories whose size is known beforehand (``empty``, ``zeros``, ``ones``,
``full``, ``rand*``, ``new_*``, ``*_like``) are checked before anything is allocated, so
``torch.empty(400 * 2**30, device="cuda")`` is an OOM and not 400 GiB of host memory; other
operations are checked once their output exists, which is then dropped. Autograd is counted too:
on the CPU the backward pass runs on the calling thread, under the same modes.

Limits:

- Every tensor allocated while it runs counts, including ones meant for the CPU: a large CPU-side
  dataset fills the simulated card too (the rehearsal errs towards an OOM).
- Tensors made before ``start`` count once moved with ``.cuda()`` / ``.to("cuda")`` (which copy,
  as a real transfer does) or handed to ``SimulatedGPU.track``.
- ``x.device`` is ``cpu`` and ``x.is_cuda`` False; ``x.cpu()`` returns ``x`` itself. Not simulated:
  ``torch.load(map_location="cuda")``, ``torch.cuda.FloatTensor``, streams, events,
  ``torch.Generator("cuda")``, ``torch.autocast("cuda")`` (no effect on CPU tensors);
  ``torch.compile`` was only tried with its ``eager`` backend.
- Storages grown in place (``resize_``, ``out=``) count at their new size but never raise.
- torch's modes are per thread: work on other threads is not counted (readings are global)
  unless it runs under ``on_this_thread()`` (a widget's callback, say), and
  forked workers (``DataLoader(num_workers=...)``) count nothing (they still redirect). ``stop``
  from another thread turns counting and redirection off, leaving inert modes on the starting
  thread until the next ``start`` there. If another mode was pushed above ours, ``stop`` takes ours
  from under it and leaves that one working.
- ``torch.cuda`` functions are patched on the module: code that ran ``from torch.cuda import
  memory_allocated`` earlier keeps the real one. A function someone else patched over ours is left.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import sys
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from jupyter_gpumem.units import GiB, MiB

from ._cuda_to_cpu import cuda_to_cpu_mode_class

if TYPE_CHECKING:
    import torch

__all__ = [
    "SimulatedGPU",
    "allocation_size",
    "current",
    "format_size",
    "on_this_thread",
    "oom_message",
    "paused",
    "set_limit",
    "start",
    "stop",
]

# CUDACachingAllocator's constants
_SMALL_SIZE = 1 * MiB  # kSmallSize: up to this, the small pool
_SMALL_BUFFER = 2 * MiB  # kSmallBuffer: one small-pool block
_LARGE_BUFFER = 20 * MiB  # kLargeBuffer: the block a mid-sized allocation gets
_MIN_LARGE_ALLOC = 10 * MiB  # kMinLargeAlloc: from here on, a block of its own
_ROUND_LARGE = 2 * MiB  # kRoundLarge
_DOCS = "https://docs.pytorch.org/docs/stable/notes/cuda.html#optimizing-memory-usage-with-pytorch-cuda-alloc-conf"


def _ceil(n: int, unit: int) -> int:
    return -(-n // unit) * unit


def _rounded(nbytes: int) -> int:  # round_size(): 512-byte granularity
    return 512 if nbytes < 512 else _ceil(nbytes, 512)


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
    """A weak reference to a counted storage; its callback queues it for release."""

    __slots__ = ("key", "nbytes")

    def __init__(self, ob: Any, callback: Callable[[Any], Any], key: int, nbytes: int) -> None:
        super().__init__(ob, callback)  # type: ignore[call-arg]
        self.key, self.nbytes = key, nbytes

    def __new__(cls, ob: Any, callback: Callable[[Any], Any], *_: int) -> _StorageRef:
        return super().__new__(cls, ob, callback)


class SimulatedGPU:
    """One simulated card: its size, what is counted on it, and torch-style readings.

    The one :func:`start` returns is also a context manager: ``with simulate("2GiB") as gpu:``
    ends the simulation on exit and leaves torch as it was.
    """

    def __enter__(self) -> SimulatedGPU:
        return self

    def __exit__(self, *exc: object) -> None:
        if current() is self:
            stop()

    def __init__(
        self,
        total_bytes: int,
        *,
        other_processes: Iterable[tuple[int, int]] = (),
        allowed_bytes: int | None = None,
        device_index: int = 0,
    ) -> None:
        if total_bytes <= 0:
            raise ValueError(f"a simulated GPU needs a positive size, not {total_bytes}")
        if allowed_bytes is not None and allowed_bytes < 0:
            raise ValueError(f"the cap cannot be negative: {allowed_bytes}")
        self.total_bytes = int(total_bytes)
        self.device_index = device_index
        self.name = f"Simulated GPU ({self.total_bytes / GiB:.2f} GiB)"
        self.other_processes = other_processes
        self.allowed_bytes = allowed_bytes
        self._active = True  # False once stopped: the modes, if still stacked, pass through
        self._lock = threading.Lock()
        self._live: dict[int, _StorageRef] = {}  # StorageImpl address -> its reference
        self._dead: collections.deque[_StorageRef] = collections.deque()  # freed, not yet drained
        self._on_free = self._dead.append  # weakref callbacks only queue: they may run anywhere
        self._allocated = self._small = self._mid = self._large = 0
        self._peak_allocated = self._peak_reserved = self._num_ooms = 0
        self._history: Any = _recorder  # backends/_trace.py's recorder while tracing, else None

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
        try:
            storage = tensor.untyped_storage()
        except Exception:  # sparse, nested, subclasses: no plain storage
            return False
        ref = self._live.get(storage._cdata)
        return ref is not None and ref() is storage

    def counted_storage(self, tensor: torch.Tensor) -> tuple[int, int] | None:
        """(storage key, nbytes) when the tensor's storage is counted on this card, else None."""
        try:
            storage = tensor.untyped_storage()
        except Exception:
            return None
        ref = self._live.get(storage._cdata)
        if ref is None or ref() is not storage:
            return None
        return ref.key, ref.nbytes

    def live_storages(self) -> list[tuple[int, int]]:
        """(storage key, nbytes) of every storage counted now."""
        with self._lock:
            self._drain()
            return [(ref.key, ref.nbytes) for ref in self._live.values()]

    def track(self, *tensors: torch.Tensor) -> None:
        """Count tensors made before the simulation, as if moved to the card (may raise its OOM)."""
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
        large = self._large
        return _ceil(self._small, _SMALL_BUFFER) + _ceil(self._mid, _LARGE_BUFFER) + large

    def _grow(self, nbytes: int, sign: int) -> None:
        if not nbytes:  # an empty storage takes no block (but is tracked: it may be resized)
            return
        self._allocated += sign * nbytes
        size = _rounded(nbytes)
        if size <= _SMALL_SIZE:
            self._small += sign * size
        elif size < _MIN_LARGE_ALLOC:
            self._mid += sign * size
        else:
            self._large += sign * _ceil(size, _ROUND_LARGE)

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

    def _count(self, tensors: Iterable[torch.Tensor], fresh: bool = True) -> str | None:
        """Count the new storages behind ``tensors``; the OOM message (nothing counted) if over.

        Not ``fresh``: tensors written in place, whose storage is only recounted if it was resized.
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
            if not fresh:
                continue
            if new is None:
                new = {}
            new[key] = (storage, storage.nbytes())
        return None if new is None else self._commit(new)

    def _commit(self, new: dict[int, tuple[Any, int]]) -> str | None:
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
                live[key] = _StorageRef(storage, on_free, key, nbytes)
            if self._history is not None:
                self._history.alloc(new)
            if self._allocated > self._peak_allocated:
                self._peak_allocated = self._allocated
            if reserved > self._peak_reserved:
                self._peak_reserved = reserved
        return None

    def _resized(self, ref: _StorageRef, nbytes: int) -> None:
        with self._lock:
            self._grow(ref.nbytes, -1)
            self._grow(nbytes, 1)
            ref.nbytes = nbytes
            self._note_peaks()


def _flat(out: Iterable[Any], tensor: type, acc: list[Any]) -> list[Any]:
    for o in out:
        if isinstance(o, tensor):
            acc.append(o)
        elif isinstance(o, (tuple, list)):
            _flat(o, tensor, acc)
    return acc


def _size_predictors(torch: Any) -> dict[Any, Callable[[tuple[Any, ...], dict[str, Any]], int]]:
    """aten factory overload -> bytes its output will take, computed from its arguments."""
    aten, default_dtype = torch.ops.aten, torch.get_default_dtype

    def shaped(shape: Iterable[int], dtype: Any) -> int:
        numel = 1
        for s in shape:
            numel *= int(s)
        return numel * dtype.itemsize

    def strided(shape: list[int], stride: list[int], dtype: Any) -> int:
        if any(int(s) == 0 for s in shape):
            return 0
        return (
            1 + sum((int(s) - 1) * int(st) for s, st in zip(shape, stride, strict=True))
        ) * dtype.itemsize

    def dtype_of(kwargs: dict[str, Any], default: Any) -> Any:
        return kwargs.get("dtype") or default

    def fill_dtype(value: object) -> Any:
        if isinstance(value, bool):
            return torch.bool
        if isinstance(value, int):
            return torch.int64
        if isinstance(value, complex):
            return (
                torch.complex128 if torch.get_default_dtype() == torch.float64 else torch.complex64
            )
        return torch.get_default_dtype()

    def first_shape(args: tuple[Any, ...]) -> Any:
        return next(a for a in args if isinstance(a, (list, tuple)))

    def like(a: tuple[Any, ...], k: dict[str, Any]) -> int:
        return a[0].numel() * dtype_of(k, a[0].dtype).itemsize if a[0].is_cpu else 0

    predictors: dict[Any, Callable[[tuple[Any, ...], dict[str, Any]], int]] = {
        aten.empty: lambda a, k: shaped(a[0], dtype_of(k, default_dtype())),
        aten.zeros: lambda a, k: shaped(a[0], dtype_of(k, default_dtype())),
        aten.ones: lambda a, k: shaped(a[0], dtype_of(k, default_dtype())),
        aten.rand: lambda a, k: shaped(a[0], dtype_of(k, default_dtype())),
        aten.randn: lambda a, k: shaped(a[0], dtype_of(k, default_dtype())),
        aten.full: lambda a, k: shaped(a[0], dtype_of(k, fill_dtype(a[1]))),
        aten.randint: lambda a, k: shaped(first_shape(a), dtype_of(k, torch.int64)),
        aten.empty_strided: lambda a, k: strided(a[0], a[1], dtype_of(k, default_dtype())),
        aten.new_empty: lambda a, k: shaped(a[1], dtype_of(k, a[0].dtype)),
        aten.new_zeros: lambda a, k: shaped(a[1], dtype_of(k, a[0].dtype)),
        aten.new_ones: lambda a, k: shaped(a[1], dtype_of(k, a[0].dtype)),
        aten.new_full: lambda a, k: shaped(a[1], dtype_of(k, a[0].dtype)),
        aten.new_empty_strided: lambda a, k: strided(a[1], a[2], dtype_of(k, a[0].dtype)),
        **{
            getattr(aten, name): like
            for name in (
                "empty_like", "zeros_like", "ones_like", "full_like",
                "rand_like", "randn_like", "randint_like",
            )
        },
    }  # fmt: skip
    strided_layout = torch.strided

    def checked(
        predict: Callable[[tuple[Any, ...], dict[str, Any]], int],
    ) -> Callable[[tuple[Any, ...], dict[str, Any]], int]:
        def size(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
            device = kwargs.get("device")
            if kwargs.get("layout", strided_layout) is not strided_layout or (
                device is not None and device.type != "cpu"
            ):
                return 0  # sparse, meta: not plain memory on the card
            return predict(args, kwargs)

        return size

    table = {}
    for packet, predict in predictors.items():
        for overload in packet.overloads():
            if not overload.endswith("out"):  # `out=` variants write into a tensor that exists
                table[getattr(packet, overload)] = checked(predict)
    return table


_FRESH, _VIEW, _WRITTEN = 0, 1, 2  # what an op's return is: new memory, a view, written in place


def _return_kinds(func: Any) -> tuple[int, ...]:
    """From the op's schema: which returns may be new storages (``Tensor(a)`` is a view of an
    input, ``Tensor(a!)`` an input written in place, which may have been resized)."""
    if func.__name__.startswith("lift_fresh"):  # torch.tensor(...): made outside the dispatcher
        return (_FRESH,)
    return tuple(
        _FRESH if r.alias_info is None else _WRITTEN if r.alias_info.is_write else _VIEW
        for r in func._schema.returns
    )


@functools.cache
def _counting_mode_class() -> type[Any]:
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    Tensor, OutOfMemoryError = torch.Tensor, torch.OutOfMemoryError
    predictors = _size_predictors(torch)
    kinds_of: dict[Any, tuple[int, ...]] = {}

    class CountingMode(TorchDispatchMode):
        """Counts every new storage on ``sim``; raises its CUDA OOM past the budget."""

        def __init__(self, sim: SimulatedGPU) -> None:
            super().__init__()
            self.sim = sim

        def __torch_dispatch__(
            self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
        ) -> Any:
            if kwargs is None:
                kwargs = {}
            sim = self.sim
            if not sim._active:
                return func(*args, **kwargs)
            predict = predictors.get(func)
            if predict is not None:
                try:
                    nbytes = predict(args, kwargs)
                except Exception:  # symbolic sizes and the like: count after the fact
                    nbytes = 0
                if nbytes > 0:
                    message = sim._precheck(nbytes)
                    if message is not None:
                        raise OutOfMemoryError(message)
            out = func(*args, **kwargs)
            kinds = kinds_of.get(func)
            if kinds is None:
                kinds = kinds_of[func] = _return_kinds(func)
            if isinstance(out, Tensor):
                kind = kinds[0] if kinds else _FRESH
                if kind == _VIEW:
                    return out
                message = sim._count((out,), fresh=kind == _FRESH)
            elif isinstance(out, (tuple, list)):
                message = None
                if len(kinds) == 1:  # one return, a list of tensors
                    if kinds[0] != _VIEW:
                        message = sim._count(_flat(out, Tensor, []), fresh=kinds[0] == _FRESH)
                else:
                    for kind in (_FRESH, _WRITTEN):
                        part = [o for o, k in zip(out, kinds, strict=False) if k == kind]
                        message = message or sim._count(_flat(part, Tensor, []), kind == _FRESH)
            else:
                return out
            if message is not None:
                del out  # the allocation failed: its output must not outlive the error
                raise OutOfMemoryError(message)
            return out

    return CountingMode


# ---- torch.cuda while a simulation runs -----------------------------------------------------


@dataclass(frozen=True)
class _DeviceProperties:
    name: str
    total_memory: int
    major: int = 8
    minor: int = 0
    multi_processor_count: int = 108
    is_integrated: bool = False


def _set_fraction(sim: SimulatedGPU, fraction: float) -> None:
    if not 0 <= fraction <= 1:
        raise ValueError(f"Invalid fraction value: {fraction}. Allowed range: 0~1")
    sim.allowed_bytes = int(sim.total_bytes * fraction)


def _summary(sim: SimulatedGPU) -> str:
    stats = sim.memory_stats()
    return "\n".join(
        [
            f"|  {sim.name}: memory summary",
            f"|  allocated: {format_size(stats['allocated_bytes.all.current'])} "
            f"(peak {format_size(stats['allocated_bytes.all.peak'])})",
            f"|  reserved:  {format_size(stats['reserved_bytes.all.current'])} "
            f"(peak {format_size(stats['reserved_bytes.all.peak'])})",
            f"|  OOMs: {stats['num_ooms']}",
        ]
    )


# torch.cuda function -> what it does while a simulation runs (the simulation, then its arguments)
_CUDA: dict[str, Callable[..., Any]] = {
    "is_available": lambda sim: True,
    "device_count": lambda sim: 1,
    "current_device": lambda sim: sim.device_index,
    "set_device": lambda sim, device: None,
    "synchronize": lambda sim, device=None: None,
    "empty_cache": lambda sim: None,  # freed blocks already went back
    "get_device_name": lambda sim, device=None: sim.name,
    "get_device_capability": lambda sim, device=None: (8, 0),
    "get_device_properties": lambda sim, device=None: _DeviceProperties(sim.name, sim.total_bytes),
    "is_bf16_supported": lambda sim, including_emulation=True: True,
    "memory_allocated": lambda sim, device=None: sim.allocated_bytes,
    "max_memory_allocated": lambda sim, device=None: sim.peak_allocated_bytes,
    "memory_reserved": lambda sim, device=None: sim.reserved_bytes,
    "max_memory_reserved": lambda sim, device=None: sim.peak_reserved_bytes,
    "memory_stats": lambda sim, device=None: sim.memory_stats(),
    "memory_summary": lambda sim, device=None, abbreviated=False: _summary(sim),
    "reset_peak_memory_stats": lambda sim, device=None: sim.reset_peak(),
    "reset_max_memory_allocated": lambda sim, device=None: sim.reset_peak(),
    "mem_get_info": lambda sim, device=None: sim.mem_get_info(),
    "set_per_process_memory_fraction": lambda sim, fraction, device=None: _set_fraction(
        sim, fraction
    ),
    # the CPU generator draws what "cuda" tensors get; fork_rng restores it on its own
    "get_rng_state": lambda sim, device="cuda": sys.modules["torch"].get_rng_state(),
    "get_rng_state_all": lambda sim: [sys.modules["torch"].get_rng_state()],
    "set_rng_state": lambda sim, new_state, device="cuda": None,
    "set_rng_state_all": lambda sim, new_states: None,
    "get_per_process_memory_fraction": lambda sim, device=None: (
        1.0 if sim.allowed_bytes is None else sim.allowed_bytes / sim.total_bytes
    ),
}


def _stand_in(impl: Callable[..., Any], original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def stand_in(*args: Any, **kwargs: Any) -> Any:
        sim = _sim
        if sim is None:  # left patched (someone patched over us): be torch's own again
            return original(*args, **kwargs)
        return impl(sim, *args, **kwargs)

    return stand_in


# ---- the running simulation -----------------------------------------------------------------

_state_lock = threading.RLock()
_sim: SimulatedGPU | None = None
_modes: tuple[Any, ...] = ()  # (function mode, dispatch mode) pushed by start
_thread: int | None = None
_patched: dict[str, tuple[Any, Any]] = {}  # torch.cuda name -> (original, stand-in)
_borrowed: list[Any] = []  # function modes pushed by on_this_thread, on other threads
_recorder: Any = None  # the allocation-history recorder every card gets while tracing


def record_history(recorder: Any) -> None:
    """Give each storage counted from now on (this card's and later ones') to ``recorder``
    (``alloc(new)``, ``free(key, nbytes)``, ``oom(size, free)``: backends/_trace.py); None ends it."""
    global _recorder
    with _state_lock:
        _recorder = recorder
        if _sim is not None:
            _sim._history = recorder


def current() -> SimulatedGPU | None:
    """The running simulation, if any (from any thread)."""
    return _sim


def start(
    total_bytes: int,
    *,
    other_processes: Iterable[tuple[int, int]] = (),
    allowed_bytes: int | None = None,
) -> SimulatedGPU:
    """Simulate a GPU of ``total_bytes`` on this thread until :func:`stop`; replaces any running."""
    global _sim, _modes, _thread
    import torch

    with _state_lock:
        stop()
        sim = SimulatedGPU(
            total_bytes, other_processes=other_processes, allowed_bytes=allowed_bytes
        )
        function_mode = cuda_to_cpu_mode_class()(holds=sim.holds)
        dispatch_mode = _counting_mode_class()(sim)
        _remove_inert_modes()
        function_mode.__enter__()
        try:
            dispatch_mode.__enter__()
        except BaseException:
            _leave(function_mode, dispatch=False)
            raise
        _sim, _modes, _thread = sim, (function_mode, dispatch_mode), threading.get_ident()
        for name, impl in _CUDA.items():
            original = getattr(torch.cuda, name, None)
            if original is not None:
                _patched[name] = (original, _stand_in(impl, original))
                setattr(torch.cuda, name, _patched[name][1])
        return sim


def stop() -> None:
    """End the simulation: leave the modes and restore ``torch.cuda``. Safe to call again."""
    global _sim, _modes, _thread
    with _state_lock:
        sim, modes, thread = _sim, _modes, _thread
        _sim, _modes, _thread = None, (), None
        cuda = getattr(sys.modules.get("torch"), "cuda", None)
        for name, (original, stand_in) in _patched.items():
            if getattr(cuda, name, None) is stand_in:
                setattr(cuda, name, original)
        _patched.clear()
        if sim is None:
            return
        sim._active = False
        for mode in (modes[0], *_borrowed):
            mode.active = False  # a borrowed one leaves its thread's stack when its block ends
        if thread == threading.get_ident():
            _leave(modes[1], dispatch=True)
            _leave(modes[0], dispatch=False)


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """Nothing allocated inside counts (CUDA placements still go to the CPU): for CPU work."""
    with _state_lock:
        sim, modes = _sim, _modes
    if sim is None:
        yield
        return
    was_active, holds = sim._active, modes[0].holds
    sim._active = False
    _set_holds(modes[0], None)
    try:
        yield
    finally:
        if _sim is sim:  # not stopped or replaced meanwhile
            sim._active = was_active
            _set_holds(modes[0], holds)


def _set_holds(primary: Any, holds: Any) -> None:
    with _state_lock:
        for mode in (primary, *_borrowed):
            mode.holds = holds


@contextlib.contextmanager
def on_this_thread() -> Iterator[SimulatedGPU | None]:
    """Run the block under the running simulation on this thread too; yields it (or None).

    torch's modes are per thread, and ``start`` pushed them on its own: a widget's callback or a
    worker thread would otherwise place "CUDA" tensors on a machine without CUDA. Pushes
    equivalent modes for the block and takes exactly those off at its end, whatever was pushed
    meanwhile. Nothing to do (cheap) with no simulation or where its modes are already active,
    so nested blocks and calls on the starting thread are free.
    """
    sim = _sim
    if sim is None or _counting_here(sim):
        yield sim
        return
    with _state_lock:
        sim = _sim  # stopped or replaced meanwhile: the one running now, if any
        if sim is not None:
            function_mode = cuda_to_cpu_mode_class()(holds=_modes[0].holds)
            function_mode.active = _modes[0].active
            dispatch_mode = _counting_mode_class()(sim)
            _borrowed.append(function_mode)
    if sim is None:
        yield None
        return
    try:
        function_mode.__enter__()
        try:
            dispatch_mode.__enter__()
            try:
                yield sim
            finally:
                _leave(dispatch_mode, dispatch=True)
        finally:
            _leave(function_mode, dispatch=False)
    finally:
        with _state_lock:
            _borrowed.remove(function_mode)


def _counting_here(sim: SimulatedGPU) -> bool:
    """Whether ``sim``'s counting mode is on this thread's dispatch stack."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    counting = _counting_mode_class()
    return any(isinstance(m, counting) and m.sim is sim for m in _get_current_dispatch_mode_stack())


def set_limit(allowed_bytes: int | None) -> None:
    """Cap what this process may use on the running simulated GPU (None lifts the cap)."""
    sim = _sim
    if sim is None:
        raise RuntimeError("no simulated GPU is running: start one with `%gpumem simulate SIZE`")
    if allowed_bytes is not None and allowed_bytes < 0:
        raise ValueError(f"the cap cannot be negative: {allowed_bytes}")
    sim.allowed_bytes = allowed_bytes


def _stack_ops(dispatch: bool) -> tuple[Callable[[], list[Any]], Any, Any]:
    if dispatch:
        from torch.utils import _python_dispatch as d

        return d._get_current_dispatch_mode_stack, d._pop_mode, d._push_mode
    from torch import overrides as o

    return o._get_current_function_mode_stack, o._pop_mode, o._push_mode


def _leave(mode: Any, *, dispatch: bool) -> None:
    """Take ``mode`` off this thread's stack, leaving any mode pushed above it in place."""
    stack, pop, push = _stack_ops(dispatch)
    current_stack = stack()
    if not any(m is mode for m in current_stack):
        return
    if current_stack[-1] is mode:
        mode.__exit__(None, None, None)
        return
    above = []
    while (m := pop()) is not mode:
        above.append(m)
    for m in reversed(above):
        push(m)


def _remove_inert_modes() -> None:
    """Modes a stop on another thread could not reach, if this is their thread."""
    kinds = (cuda_to_cpu_mode_class(), _counting_mode_class())
    for dispatch in (False, True):
        for mode in _stack_ops(dispatch)[0]():
            inert = isinstance(mode, kinds[1]) and not mode.sim._active
            if inert or (isinstance(mode, kinds[0]) and not getattr(mode, "active", True)):
                _leave(mode, dispatch=dispatch)


def _after_fork_in_child() -> None:
    # DataLoader workers inherit this thread's modes: their copy of the card would run out on
    # its own, so they count nothing (CUDA placements still go to the CPU: there is no GPU there)
    if _sim is not None:
        _sim._active = False
        _modes[0].holds = None


os.register_at_fork(after_in_child=_after_fork_in_child)
