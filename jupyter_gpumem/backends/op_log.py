"""What a run did, op by op: each operator's new storages on the GPU with their dtypes, the storages
it read, and when each storage died; the record a fix's prediction replays (``fixes/predict.py``).

``record_sizes()`` (``allocator.SizeLog``) has the sizes in order but not what made them; a fix
like autocast changes tensors by what made them (a matmul's output halves, a float64 one does not,
a weight gets a cast copy), so this log keeps the operator and the dtypes too. It is a torch
dispatch mode entered inside the run, below autograd: the backward pass's ops are in it (on CUDA
the autograd engine's threads inherit the mode with the rest of the thread-local state). A
storage is "on the GPU" when the active backend counts it (``storage_of``); its death is seen by a
finalizer on its storage object, which torch keeps alive as long as the storage is.

An op that runs out of memory ends the log there (``failed``): a run that fails is recorded up to
its failure, which is what a rehearsal of the failed cell gives.

The deaths of storages live before the run come from the backend's size log where it fills as the
run goes (the simulated GPU's): all of them, gradients set to None before any op read them
included. On CUDA that log is read at the end, so only the residents the run read are seen dying:
a gradient dropped by ``zero_grad()`` before it was read stays counted, and the replay overstates
the need by it. Measured on the simulated GPU only (no GPU in the session that wrote this).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from jupyter_gpumem.backends.base import active

__all__ = ["OpEvent", "OpInput", "OpLog", "record_ops"]


class OpInput(NamedTuple):
    """A tensor an op read: the storage's number (``>= 0``: made during the run; ``< 0``: resident,
    live before it), its dtype ("float32"), and whether it was a single number (0-dim: type
    promotion leaves it out)."""

    storage: int
    dtype: str
    scalar: bool


class OpEvent(NamedTuple):
    """One op with new storages on the GPU (``outputs``: (number, bytes, dtype)), or, when ``op``
    is empty, the death of storage ``outputs[0][0]`` (of ``outputs[0][1]`` bytes); a death whose
    dtype field is ``"resident"`` is of a storage live at the start, known by its size alone."""

    op: str  # "addmm", "convolution_backward"; "" for a free
    outputs: tuple[tuple[int, int, str], ...]
    inputs: tuple[OpInput, ...] = ()
    backward: bool = False  # run by the autograd engine
    saved: bool = False  # grad mode on and an input requires grad: autograd may keep its inputs
    grad_of_param: tuple[bool, ...] = ()  # per output: shaped as a weight, made in the backward


@dataclass
class OpLog:
    """A run op by op. ``resident``: (number, bytes) of the storages live at the start that the
    run read (numbers < 0); ``params``: those that are model weights (leaf tensors that require
    grad); ``resident_sizes``: every storage live at the start, as the backend counts them;
    ``failed``: the op that ran out of memory, with its inputs (None: the run ended)."""

    events: list[OpEvent] = field(default_factory=list)
    resident: dict[int, int] = field(default_factory=dict)
    params: set[int] = field(default_factory=set)
    resident_sizes: list[int] = field(default_factory=list)
    failed: OpEvent | None = None
    storages: int = 0  # storages made during the run
    complete: bool = True  # False: the recorder could not read something (then not replayed)


def _dtype(t: Any) -> str:
    return str(t.dtype).removeprefix("torch.")


class _Recorder:
    def __init__(self, torch: Any, log: OpLog) -> None:
        self.torch = torch
        self.log = log
        self.backend = active()
        self.keys: dict[Any, int] = {}  # backend storage key -> number
        self.param_shapes: set[tuple[int, ...]] = set()
        self._next_resident = -1
        self.closed = False  # the block ended: deaths after it are not the run's
        self.finalizers: list[weakref.finalize] = []  # detached at the end: nothing left behind
        # the backend's size log, where it fills as the run goes: every resident's death is in
        # it, those the recorder never saw included (gradients set to None before any op read
        # them); else (CUDA fills it at the end) the deaths of residents the run read
        self.sizes: Any = None
        self.read = 0  # events of ``sizes`` read so far
        self.live: bool | None = None

    def number(self, t: Any) -> int | None:
        """The storage's number, a resident's given on first sight; None when not on the GPU."""
        info = self.backend.storage_of(t)
        if info is None:
            return None
        key, nbytes, _device = info
        n = self.keys.get(key)
        if n is None:
            n = self._next_resident
            self._next_resident -= 1
            self.keys[key] = n
            self.log.resident[n] = nbytes
            self._watch(t, key, n)
        if t.is_leaf and t.requires_grad:
            self.log.params.add(n)
            self.param_shapes.add(tuple(t.shape))
        return n

    def _watch(self, t: Any, key: Any, n: int) -> None:
        try:
            storage = t.untyped_storage()
            self.finalizers.append(weakref.finalize(storage, self._died, key, n))
        except Exception:
            self.log.complete = False

    def _died(self, key: Any, n: int) -> None:
        if self.closed:
            return
        if self.keys.get(key) == n:
            del self.keys[key]
        if n >= 0:
            self.log.events.append(OpEvent("", ((n, 0, ""),)))
        elif self.live is not True:  # dropped at the end where the size log has it
            self.log.events.append(OpEvent("", ((n, self.log.resident.get(n, 0), "seen"),)))

    def sync(self, made: bool = False) -> None:
        """The size log's resident deaths since the last op, in order; ``made``: the op just
        made storages, which tells whether the size log fills as the run goes."""
        sizes = self.sizes
        if sizes is None:
            return
        events = sizes.events
        if made and self.live is None:
            self.live = len(events) > self.read
        if self.live is False:
            return
        for n, value in events[self.read :]:
            if n == -2:
                self.log.events.append(OpEvent("", ((0, value, "resident"),)))
        self.read = len(events)

    def inputs(self, args: Any, kwargs: Any) -> tuple[tuple[OpInput, ...], bool]:
        tensor = self.torch.Tensor
        found: list[OpInput] = []
        grad = False
        for t in _tensors((args, kwargs), tensor):
            n = self.number(t)
            grad = grad or bool(t.requires_grad)
            if n is not None:
                found.append(OpInput(n, _dtype(t), t.dim() == 0))
        return tuple(found), grad

    def outputs(self, out: Any, before: set[Any]) -> tuple[list[tuple[int, int, str]], list[bool]]:
        made: list[tuple[int, int, str]] = []
        weights: list[bool] = []
        backward = _in_backward(self.torch)
        for t in _tensors(out, self.torch.Tensor):
            info = self.backend.storage_of(t)
            if info is None or info[0] in before or info[0] in self.keys:
                continue  # a view or an input written in place: no new storage
            key, nbytes, _device = info
            n = self.log.storages
            self.log.storages += 1
            self.keys[key] = n
            self._watch(t, key, n)
            made.append((n, nbytes, _dtype(t)))
            weights.append(backward and tuple(t.shape) in self.param_shapes)
        return made, weights


def _tensors(obj: Any, tensor: type) -> Iterator[Any]:
    if isinstance(obj, tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o, tensor)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o, tensor)


def _in_backward(torch: Any) -> bool:
    current = getattr(torch._C, "_current_graph_task_id", None)
    return current is not None and current() != -1


def _mode_class(torch: Any) -> type:
    from torch.utils._python_dispatch import TorchDispatchMode

    class _OpLogMode(TorchDispatchMode):
        def __init__(self, recorder: _Recorder) -> None:
            super().__init__()
            self.recorder = recorder

        def __torch_dispatch__(
            self, func: Any, types: Any, args: Any = (), kwargs: Any = None
        ) -> Any:
            kwargs = kwargs or {}
            rec = self.recorder
            name = func._schema.name.removeprefix("aten::")
            if not rec.log.complete:  # the recorder failed once: the user's code runs on
                return func(*args, **kwargs)
            try:
                rec.sync()
                inputs, grad = rec.inputs(args, kwargs)
                before = set(rec.keys)
                saved = grad and torch.is_grad_enabled()
            except Exception:
                rec.log.complete = False
                return func(*args, **kwargs)
            try:
                out = func(*args, **kwargs)
            except torch.OutOfMemoryError:
                rec.log.failed = OpEvent(name, (), inputs, _in_backward(torch), saved)
                raise
            try:
                made, weights = rec.outputs(out, before)
                rec.sync(bool(made))
                if made and rec.log.failed is not None:  # an OOM something caught: it went on
                    rec.log.failed = None
                if made:
                    event = OpEvent(
                        name, tuple(made), inputs, _in_backward(torch), saved, tuple(weights)
                    )
                    rec.log.events.append(event)
            except Exception:
                rec.log.complete = False
            return out

    return _OpLogMode


@contextlib.contextmanager
def record_ops(device: int | None = None) -> Iterator[OpLog]:
    """A block whose ops on the GPU are logged (:class:`OpLog`, filled as it runs); the sizes
    and residents beside them are device ``device``'s (None: the current one), the one that ran
    out where the caller knows it."""
    import torch

    log = OpLog()
    recorder = _Recorder(torch, log)
    with contextlib.ExitStack() as stack:
        try:
            recorder.sizes = stack.enter_context(active().record_sizes(device))
        except Exception:
            recorder.sizes = None
        try:
            with _mode_class(torch)(recorder):
                yield log
        finally:  # an OOM ends the run: what it recorded up to there is the log
            recorder.sync()
            recorder.closed = True
            for f in recorder.finalizers:
                f.detach()
            stack.close()
            if recorder.sizes is not None:
                log.resident_sizes = list(recorder.sizes.resident)
            if recorder.live:  # the size log had every resident's death
                log.events = [e for e in log.events if e.op or e.outputs[0][2] != "seen"]
