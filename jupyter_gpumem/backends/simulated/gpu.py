"""The simulated machine: its cards, where each allocation goes, and the ``MemoryBackend`` on it.

A :class:`SimulatedGPU` has one or more :class:`~.card.SimulatedCard`\\ s (``cuda:0``,
``cuda:1``, ...). A tensor is on card N while its storage is counted there, and it says so
(``x.device == torch.device("cuda", N)``, ``x.is_cuda``: ``cuda_to_cpu.py`` answers for it); every
other tensor is a host tensor and counts nowhere, as on a real machine. A new storage goes to the
card a placement names (``device="cuda:1"``, ``.to("cuda:1")``; plain ``"cuda"``: the current
device, per thread as torch's is), else to the card of the tensors the op reads (``x1 @ w1``
stays on card 1), else to the host (``torch.randn(n)``, ``torch.from_numpy(a)``, ``x.cpu()``). An op
reading tensors on two devices raises torch's own error (``devices.py``). Its own readings
(``gpu.allocated_bytes``, ``gpu.memory_stats()``, ...) are the current device's, like
``torch.cuda.memory_allocated()``; ``gpu.devices[i]`` is each card.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

from jupyter_gpumem.backends.allocator import SizeLog, SizeRecorder
from jupyter_gpumem.backends.base import DeviceLabel, DeviceReading, RawProcess, StorageInfo
from jupyter_gpumem.backends.cuda_to_cpu import cuda_index, cuda_to_cpu
from jupyter_gpumem.backends.simulated.card import SimulatedCard, format_size
from jupyter_gpumem.backends.simulated.devices import may_mix, mixing_error
from jupyter_gpumem.backends.tb_frames import without_dispatch_frames

if TYPE_CHECKING:
    import torch

__all__ = ["SimulatedGPU", "Simulation"]


class Simulation(Protocol):
    """What a simulated GPU asks of the simulation that runs it (``lifecycle.py``, which makes
    the GPU and hands it this, so that this module need not import the one that imports it)."""

    def current(self) -> SimulatedGPU | None: ...

    def stop(self) -> None: ...

    def paused(self) -> AbstractContextManager[None]: ...

    def on_this_thread(self) -> AbstractContextManager[SimulatedGPU | None]: ...


def _tensors(args: tuple[Any, ...], kwargs: dict[str, Any], tensor: type) -> Iterator[Any]:
    """The tensors an op reads: its arguments, in lists too, and its keyword arguments."""
    for a in (*args, *kwargs.values()) if kwargs else args:
        if isinstance(a, tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            for t in a:
                if isinstance(t, tensor):
                    yield t


_HOST = -1  # a placement target: what is made goes to the host (``x.cpu()``), counted nowhere


class _Placement:
    """While a placement names a card (``x.to("cuda:1")``) or the host (``x.cpu()``), new storages
    on this thread go there."""

    __slots__ = ("gpu", "index", "saved")

    def __init__(self, gpu: SimulatedGPU, index: int | None) -> None:
        self.gpu, self.index, self.saved = gpu, index, None

    def __enter__(self) -> _Placement:
        local = self.gpu._local
        self.saved = getattr(local, "target", None)
        index = self.gpu.current_device() if self.index is None else self.index
        if index != _HOST:
            self.gpu.card(index)  # an ordinal past the last card fails as torch's does
        local.target = index
        return self

    def __exit__(self, *exc: object) -> None:
        self.gpu._local.target = self.saved


class _Within:
    """While a torch call reads tensors on card ``index``, what it makes from no tensor on its
    inputs' device goes there: torch's C++ makes intermediates with its inputs' options (the
    causal mask of ``scaled_dot_product_attention``, ``ones(..., query.options())``), whose device
    is the CPU here and the card on CUDA. A factory given no device stays on the host, as on CUDA
    (``pack_padded_sequence``'s ``batch_sizes``, ``at::empty({n}, kLong)``)."""

    __slots__ = ("index", "local", "saved")

    def __init__(self, local: threading.local, index: int) -> None:
        self.local, self.index, self.saved = local, index, None

    def __enter__(self) -> None:
        self.saved = getattr(self.local, "within", None)
        self.local.within = self.index

    def __exit__(self, *exc: object) -> None:
        self.local.within = self.saved


class _Cards:
    """What the redirecting function mode (``cuda_to_cpu.py``) asks the simulated GPU: called
    with the CUDA index a placement names (None: the current device), a context in which new
    storages go to that card; ``host()``, one in which they stay on the host; ``within(index)``,
    one for a torch call reading tensors on that card (``_Within``); ``index_of``, the card a
    tensor is on (None: the host); ``track``, count a copy on a card."""

    __slots__ = ("gpu",)

    def __init__(self, gpu: SimulatedGPU) -> None:
        self.gpu = gpu

    def __call__(self, index: int | None) -> _Placement:
        return _Placement(self.gpu, index)

    def host(self) -> _Placement:
        return _Placement(self.gpu, _HOST)

    def within(self, index: int) -> _Within:
        return _Within(self.gpu._local, index)

    def index_of(self, tensor: torch.Tensor) -> int | None:
        return self.gpu.index_of(tensor)

    def track(self, tensor: torch.Tensor, index: int) -> None:
        self.gpu.card(index).track(tensor)


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
        simulation: Simulation,
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
        self._device_names = tuple(DeviceLabel(f"cuda:{i} (simulated)", i) for i in range(devices))
        self._active = True  # False once stopped: the modes, if still stacked, pass through
        self._local = threading.local()  # current device and placement target, per thread
        self.placement = _Cards(self)  # what the redirecting function mode asks (cuda_to_cpu.py)
        self._mixes: dict[Any, bool] = {}  # aten op -> whether it may mix devices (devices.py)
        self._simulation = simulation
        try:
            import torch
        except ImportError:  # pragma: no cover - the simulation starts only with torch
            self._tensor_type: Any = ()
        else:
            self._tensor_type = torch.Tensor

    def __enter__(self) -> SimulatedGPU:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._simulation.current() is self:
            self._simulation.stop()

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

    def index_of(self, tensor: torch.Tensor) -> int | None:
        """The card the tensor is on (its storage is counted there), else None: a host tensor."""
        try:
            storage = tensor.untyped_storage()
        except Exception:  # sparse, nested: no plain storage
            return None
        key = storage._cdata
        for card in self.devices:
            ref = card._live.get(key)
            if ref is not None and ref() is storage:
                return card.device_index
        return None

    def _device_name(self, tensor: torch.Tensor) -> str:
        index = self.index_of(tensor)
        return "cpu" if index is None else f"cuda:{index}"

    def _target(
        self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> SimulatedCard | None:
        """The card an op's new storages go to, None for the host: the placement's; else the
        card of the tensors it reads; else, for an op that reads no tensor, the card of the torch
        call it is part of (``_Within``); else the host (a host op counts nowhere). An op reading
        tensors on two devices raises torch's error (``devices.py``), as on CUDA."""
        __tracebackhide__ = True  # IPython hides this frame: torch's error is the user's
        target = getattr(self._local, "target", None)
        if target is not None:
            return None if target == _HOST else self.devices[target]
        found: int | None = None
        mixed = self._mixes.get(func)
        if mixed is None:
            mixed = self._mixes[func] = may_mix(func)
        host_seen = tensors = False
        for t in _tensors(args, kwargs, self._tensor_type):
            tensors = True
            index = self.index_of(t)
            if index is None:
                if not host_seen and t.dim() != 0:
                    host_seen = True  # a 0-dim host tensor is a scalar: it goes anywhere
                    if found is not None and not mixed:
                        self._mixing(func, args, kwargs)
                continue
            if found is None:
                found = index
                if host_seen and not mixed:
                    self._mixing(func, args, kwargs)
            elif index != found and not mixed:
                self._mixing(func, args, kwargs)
        if found is None:
            if tensors or kwargs.get("device") is None:  # at::empty({n}, kLong): the CPU's
                return None
            within = getattr(self._local, "within", None)
            return None if within is None else self.devices[within]
        return self.devices[found]

    def _mixing(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Raise torch's error for an op mixing devices, unless the host tensors it reads are
        optimizer state that dynamo made while tracing (``compiled.py``): those go on the card."""
        __tracebackhide__ = True  # IPython hides this frame: torch's error is the user's
        if self._adopt_compiled_state(args, kwargs):
            return
        devices: list[str] = []
        for t in _tensors(args, kwargs, self._tensor_type):
            index = self.index_of(t)
            if index is None and t.dim() == 0:
                continue
            name = "cpu" if index is None else f"cuda:{index}"
            if name not in devices:
                devices.append(name)
        first, second = [*devices, "cpu", "cpu"][:2]
        raise mixing_error(func, args, kwargs, self._device_name, first, second, self._tensor_type)

    def _adopt_compiled_state(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """Dynamo runs an optimizer's ``_init_group`` while it traces, with the modes off: the
        state it makes (``exp_avg``, ...) is born on the host, marked static
        (``mark_static_address``), where on CUDA it is on the parameters' card. An op reading
        such tensors with tensors on one card counts them there; True when nothing else mixed."""
        card: int | None = None
        waiting = []
        for t in _tensors(args, kwargs, self._tensor_type):
            index = self.index_of(t)
            if index is None:
                if t.dim() == 0:
                    continue
                if getattr(t, "_dynamo_static_input_type", None) is None:
                    return False
                waiting.append(t)
            elif card is None:
                card = index
            elif index != card:
                return False
        if card is None or not waiting:
            return False
        self.card(card).track(*waiting)  # torch's OOM where the state does not fit
        return True

    # ---- called by the counting mode ---------------------------------------------------------

    def _count(
        self, card: SimulatedCard, tensors: Iterable[torch.Tensor], fresh: bool = True
    ) -> str | None:
        """Count an op's output storages on ``card``; the OOM message when they do not fit."""
        if self._single:
            return card._count(tensors, fresh)
        return card._count(tensors, fresh, tuple(c for c in self.devices if c is not card))

    def _held_at_target(self, tensor: torch.Tensor) -> bool:
        """For a placement: is the result already on the card it names (so no copy is due)?"""
        target = getattr(self._local, "target", None)
        if target is None:
            return self.holds(tensor)
        if target == _HOST:
            return self.index_of(tensor) is None
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
        procs += (
            RawProcess(os.getpid(), reserved + card.context_bytes, "this kernel", is_self=True),
        )
        # the driver's reading (NVML, mem_get_info): this process's CUDA context is used memory
        others = sum(n for _, n in card.other_processes)
        free = max(card.total_bytes - reserved - card.context_bytes - others, 0)
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
        """``torch.cuda.empty_cache()`` on every card: cached segments wholly free go back."""
        for card in self.devices:
            card.empty_cache()

    def reset_peak(self, index: int | None = None) -> None:
        self.card(index).reset_peak()

    def move_to_cpu(self, obj: Any) -> tuple[Any, int]:
        from jupyter_gpumem.backends.torch_objects import move_objects

        return move_objects(obj, self.storage_of, self.untrack)  # already on the CPU: uncounted

    def host_only(self) -> AbstractContextManager[Any]:
        return self._simulation.paused()

    def placements_to_cpu(self) -> AbstractContextManager[Any]:
        # on top of the simulation's own mode, which then sees CPU placements: host tensors,
        # uncounted under host_only()
        return cuda_to_cpu()

    def on_this_thread(self) -> AbstractContextManager[Any]:
        return self._simulation.on_this_thread()

    def autocast_device_type(self) -> str:
        return "cpu"  # the tensors are on the CPU

    @contextlib.contextmanager
    def record_sizes(self, index: int | None = None) -> Iterator[SizeLog | None]:
        """What card ``index`` (None: the current device) allocates and frees while the block
        runs, whichever thread allocates it."""
        card = self.card(index)
        recorder = SizeRecorder(card.live_storages(), chained=card._history)
        card._history = recorder  # tracing's recorder, if any, is chained: it misses nothing
        try:
            yield recorder.log
        finally:
            card.settle()  # the run's last frees are in the log
            if card._history is recorder:  # else tracing was turned on or off meanwhile
                card._history = recorder._chained

    def supports_bf16(self, index: int | None = None) -> bool:
        """As ``torch.cuda.is_bf16_supported(including_emulation=False)`` answers on the card:
        compute capability 8.0 on (a plain size is an A100-like 8.0; a T4 or V100 profile only
        emulates it)."""
        profile = self.card(index).profile
        return profile is None or profile.native_bf16

    def user_traceback(self, tb: TracebackType | None) -> TracebackType | None:
        return without_dispatch_frames(tb)
