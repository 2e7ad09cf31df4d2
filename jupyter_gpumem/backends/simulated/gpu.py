"""The simulated machine: its cards, where each allocation goes, and the ``MemoryBackend`` on it.

A :class:`SimulatedGPU` has one or more :class:`~.card.SimulatedCard`\\ s (``cuda:0``,
``cuda:1``, ...). An allocation goes to the card a placement names (``device="cuda:1"``,
``.to("cuda:1")``), else to the card of the tensors it reads (``x1 @ w1`` stays on card 1), else
to the current device (``torch.cuda.set_device``, ``with torch.cuda.device(1):``; per thread,
as torch's is), "homeless": real torch would have made it on the CPU, so a placement that sends it
to a card moves it there (``x = torch.randn(n); y = x.to("cuda:1")`` counts ``y`` on card 1 and
``x`` nowhere). Its own readings (``gpu.allocated_bytes``, ``gpu.memory_stats()``, ...) are the
current device's, like ``torch.cuda.memory_allocated()``; ``gpu.devices[i]`` is each card.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from types import TracebackType
from typing import TYPE_CHECKING, Any

from jupyter_gpumem.backends.allocator import SizeLog, SizeRecorder
from jupyter_gpumem.backends.base import DeviceReading, RawProcess, StorageInfo
from jupyter_gpumem.backends.cuda_to_cpu import cuda_index
from jupyter_gpumem.backends.simulated.card import SimulatedCard, format_size
from jupyter_gpumem.backends.tb_frames import without_dispatch_frames

if TYPE_CHECKING:
    import torch

__all__ = ["SimulatedGPU"]


class _Placement:
    """While a placement names a card (``x.to("cuda:1")``), new storages on this thread go there."""

    __slots__ = ("gpu", "index", "saved")

    def __init__(self, gpu: SimulatedGPU, index: int | None) -> None:
        self.gpu, self.index, self.saved = gpu, index, None

    def __enter__(self) -> _Placement:
        local = self.gpu._local
        self.saved = getattr(local, "target", None)
        index = self.gpu.current_device() if self.index is None else self.index
        self.gpu.card(index)  # an ordinal past the last card fails as torch's does
        local.target = index
        return self

    def __exit__(self, *exc: object) -> None:
        self.gpu._local.target = self.saved

    def moved(self, source: torch.Tensor, out: torch.Tensor) -> None:
        """``source.to(card)`` gave ``out``: a homeless source was a CPU tensor in real torch, so
        only ``out``, its copy, counts now; one already on this card (``out`` is itself) is
        placed there from now on."""
        self.gpu._moved(source, out)


class SimulatedGPU:
    """A simulated GPU of one or more cards, and the ``MemoryBackend`` that reads it.

    The one ``start`` returns is also a context manager: ``with simulate("2GiB") as gpu:`` ends
    the simulation on exit and leaves torch as it was.
    """

    note: str | None = "simulated"

    def __init__(
        self,
        total_bytes: int,
        *,
        other_processes: Iterable[tuple[int, int]] = (),
        allowed_bytes: int | None = None,
        devices: int = 1,
        history: Any = None,
    ) -> None:
        if devices < 1:
            raise ValueError(f"a simulated GPU needs at least one device, not {devices}")
        self.devices: tuple[SimulatedCard, ...] = tuple(
            SimulatedCard(
                total_bytes,
                other_processes=other_processes if i == 0 else (),
                allowed_bytes=allowed_bytes,
                device_index=i,
                history=history,
            )
            for i in range(devices)
        )
        self._single = devices == 1
        self._device_names = tuple(f"cuda:{i} (simulated)" for i in range(devices))
        self._active = True  # False once stopped: the modes, if still stacked, pass through
        self._local = threading.local()  # current device and placement target, per thread

    def __enter__(self) -> SimulatedGPU:
        return self

    def __exit__(self, *exc: object) -> None:
        from jupyter_gpumem.backends.simulated import lifecycle

        if lifecycle.current() is self:
            lifecycle.stop()

    def __repr__(self) -> str:
        cards = ", ".join(
            f"cuda:{c.device_index} {format_size(c.allocated_bytes)} allocated"
            for c in self.devices
        )
        return f"<{self.devices[0].name}: {cards}>"

    # ---- which card --------------------------------------------------------------------------

    def card(self, device: object = None) -> SimulatedCard:
        """The card a device argument names (None: the current device)."""
        index = None if device is None else cuda_index(device)
        if index is None:
            index = self.current_device()
        if not 0 <= index < len(self.devices):
            raise RuntimeError(
                f"CUDA error: invalid device ordinal (cuda:{index}; the simulated GPU has "
                f"{len(self.devices)} device{'s' if len(self.devices) > 1 else ''})"
            )
        return self.devices[index]

    def current_device(self) -> int:
        return getattr(self._local, "device", 0)

    def set_device(self, device: object) -> None:
        self._local.device = self.card(device).device_index

    def exchange_device(self, device: int) -> int:
        """torch.cuda._exchange_device: make ``device`` current (a negative one changes nothing)."""
        old = self.current_device()
        if device >= 0:
            self.set_device(device)
        return old

    def placement(self, index: int | None) -> _Placement:
        """New storages on this thread go to card ``index`` (None: the current one) in the block."""
        return _Placement(self, index)

    def _target(self, args: tuple[Any, ...]) -> tuple[SimulatedCard, bool]:
        """The card new storages go to, and whether they are homeless there (``card.py``'s
        ``_StorageRef``): the placement's card; else the card of the tensors they read, placed
        ones first; else the current device, homeless (real torch would make them on the CPU)."""
        target = getattr(self._local, "target", None)
        if target is not None:
            return self.devices[target], False
        homeless = None
        for a in args:
            for t in a if isinstance(a, (list, tuple)) else (a,):
                try:
                    storage = t.untyped_storage()
                except Exception:
                    continue
                for card in self.devices:
                    ref = card._live.get(storage._cdata)
                    if ref is not None and ref() is storage:
                        if not ref.homeless:
                            return card, False
                        homeless = homeless or card
                        break
        return homeless or self.devices[self.current_device()], True

    def _moved(self, source: torch.Tensor, out: torch.Tensor) -> None:
        """``source`` was sent to a card as ``out``: see ``_Placement.moved``."""
        if self._single:
            return  # one card: a homeless source and its copy would count on the same card
        for card in self.devices:
            ref = card._ref(source)
            if ref is None:
                continue
            if ref.homeless:
                if card._ref(out) is ref:
                    ref.homeless = False
                else:
                    card.untrack(source)
            return

    # ---- called by the counting mode ---------------------------------------------------------

    def _precheck(self, nbytes: int, args: tuple[Any, ...] = ()) -> str | None:
        card = self.devices[0] if self._single else self._target(args)[0]
        return card._precheck(nbytes)

    def _count(
        self, tensors: Iterable[torch.Tensor], fresh: bool = True, args: tuple[Any, ...] = ()
    ) -> str | None:
        if self._single:
            return self.devices[0]._count(tensors, fresh)
        card, homeless = self._target(args)
        others = tuple(c for c in self.devices if c is not card)
        return card._count(tensors, fresh, others, homeless)

    def _held_at_target(self, tensor: torch.Tensor) -> bool:
        """For a placement: is the result already on the card it names (so no copy is due)?"""
        target = getattr(self._local, "target", None)
        if target is None:
            return self.holds(tensor)
        return self.devices[target].holds(tensor)

    def _set_history(self, recorder: Any) -> None:
        for card in self.devices:
            card._history = recorder

    @property
    def _history(self) -> Any:
        """The allocation-history recorder the cards report to (None when not tracing)."""
        return self.devices[0]._history

    # ---- the cards together ------------------------------------------------------------------

    def holds(self, tensor: torch.Tensor) -> bool:
        """Whether the tensor's storage is counted on any card."""
        return any(card.holds(tensor) for card in self.devices)

    def holder_of(self, tensor: torch.Tensor) -> SimulatedCard | None:
        return next((card for card in self.devices if card.holds(tensor)), None)

    def counted_storage(self, tensor: torch.Tensor) -> tuple[int, int] | None:
        """(storage key, nbytes) when the tensor's storage is counted on a card, else None."""
        for card in self.devices:
            counted = card.counted_storage(tensor)
            if counted is not None:
                return counted
        return None

    def live_storages(self) -> list[tuple[int, int]]:
        """(storage key, nbytes) of every storage counted now, on every card."""
        return [s for card in self.devices for s in card.live_storages()]

    def track(self, *tensors: torch.Tensor, device: object = None) -> None:
        """Count tensors made before the simulation on a card (the current one by default)."""
        self.card(device).track(*tensors)

    def untrack(self, tensor: torch.Tensor) -> torch.Tensor:
        """Stop counting the tensor's storage (it moved "off the card"); returns the tensor."""
        for card in self.devices:
            card.untrack(tensor)
        return tensor

    # ---- the current device's readings, as torch.cuda's functions give them ------------------

    @property
    def device_index(self) -> int:
        return self.current_device()

    @property
    def name(self) -> str:
        return self.card().name

    @property
    def total_bytes(self) -> int:
        return self.card().total_bytes

    @property
    def allocated_bytes(self) -> int:
        return self.card().allocated_bytes

    @property
    def reserved_bytes(self) -> int:
        return self.card().reserved_bytes

    @property
    def peak_allocated_bytes(self) -> int:
        return self.card().peak_allocated_bytes

    @property
    def peak_reserved_bytes(self) -> int:
        return self.card().peak_reserved_bytes

    @property
    def num_ooms(self) -> int:
        return sum(card.num_ooms for card in self.devices)

    @property
    def free_bytes(self) -> int:
        return self.card().free_bytes

    @property
    def allowed_bytes(self) -> int | None:
        return self.card().allowed_bytes

    @allowed_bytes.setter
    def allowed_bytes(self, value: int | None) -> None:
        self.card().allowed_bytes = value

    @property
    def other_processes(self) -> tuple[tuple[int, int], ...]:
        return self.card().other_processes

    @other_processes.setter
    def other_processes(self, value: Iterable[tuple[int, int]]) -> None:
        self.card().other_processes = value

    def mem_get_info(self, index: int | None = None) -> tuple[int, int]:
        return self.card(index).mem_get_info()

    def memory_stats(self) -> dict[str, int]:
        return self.card().memory_stats()

    # ---- MemoryBackend -----------------------------------------------------------------------

    def visible_devices(self) -> tuple[int, ...]:
        return tuple(range(len(self.devices)))

    def read(self, index: int | None = None) -> DeviceReading:
        card = self.card(index)
        stats = card.memory_stats()
        reserved = stats["reserved_bytes.all.current"]
        procs = tuple(
            RawProcess(pid, used, "simulated other process") for pid, used in card.other_processes
        )
        procs += (RawProcess(os.getpid(), reserved, "this kernel", is_self=True),)
        free = max(card.total_bytes - reserved - sum(n for _, n in card.other_processes), 0)
        title = card.name if self._single else f"{card.name}, GPU {card.device_index}"
        return DeviceReading(
            index=card.device_index,
            name=card.name,
            title=title,
            total_bytes=card.total_bytes,
            free_bytes=free,
            used_bytes=card.total_bytes - free,
            stats=stats,
            allowed_bytes=card.allowed_bytes,
            processes=procs,
            note=self.note,
        )

    def allocator_stats(self, index: int | None = None) -> dict[str, int] | None:
        return self.card(index).memory_stats()

    def process_cap(self, index: int | None = None) -> int | None:
        return self.card(index).allowed_bytes

    def set_limit(self, limit_bytes: int | None, index: int | None = None) -> int:
        if limit_bytes is not None and limit_bytes < 0:
            raise ValueError(f"the cap cannot be negative: {limit_bytes}")
        cards = self.devices if index is None else (self.card(index),)
        for card in cards:
            card.allowed_bytes = limit_bytes
        return self.card(index).total_bytes

    def storage_of(self, tensor: Any) -> StorageInfo | None:
        # called for every tensor of a namespace scan: no string built per call
        for card, device in zip(self.devices, self._device_names, strict=True):
            counted = card.counted_storage(tensor)
            if counted is not None:
                return (device, counted[0]), counted[1], device
        return None

    def empty_cache(self) -> None:
        """Nothing to give back: freed blocks went back at once."""

    def reset_peak(self, index: int | None = None) -> None:
        self.card(index).reset_peak()

    def move_to_cpu(self, obj: Any) -> tuple[Any, int]:
        from jupyter_gpumem.backends.torch_objects import move_objects

        return move_objects(obj, self.storage_of, self.untrack)  # already on the CPU: uncounted

    def host_only(self) -> AbstractContextManager[Any]:
        from jupyter_gpumem.backends.simulated import lifecycle

        return lifecycle.paused()

    def on_this_thread(self) -> AbstractContextManager[Any]:
        from jupyter_gpumem.backends.simulated import lifecycle

        return lifecycle.on_this_thread()

    def autocast_device_type(self) -> str:
        return "cpu"  # the tensors are on the CPU

    @contextlib.contextmanager
    def record_sizes(self) -> Iterator[SizeLog | None]:
        card = self.card(None)
        recorder = SizeRecorder(card.live_storages(), chained=card._history)
        card._history = recorder  # tracing's recorder, if any, is chained: it misses nothing
        try:
            yield recorder.log
        finally:
            if card._history is recorder:  # else tracing was turned on or off meanwhile
                card._history = recorder._chained

    def supports_bf16(self) -> bool:
        return True

    def user_traceback(self, tb: TracebackType | None) -> TracebackType | None:
        return without_dispatch_frames(tb)
