"""Free what a failed cell pinned, and keep the frames for ``%debug``.

After an exception, the failed frames (and every tensor in their locals) stay reachable from
``sys.last_value``, ``sys.last_traceback``, ``sys.last_exc`` (3.12+), the shell's
``last_execution_result.error_in_exec`` and ``InteractiveTB.tb`` (kept for ``%debug``). Each alone
keeps the memory; ``torch.cuda.empty_cache()`` frees none of it.

With a shell (the failure ``%debug`` shows), the frames stay and each local that holds GPU memory
is rebound to a copy in host memory (:mod:`.host_copies`): a tensor to its host copy (same shape,
dtype and values), a plain list, tuple or dict to one whose tensors are host copies; a tensor the
host memory available cannot take, or an object that cannot be copied without running its code,
to a :class:`MovedOut` that describes it. A local whose object lives on elsewhere (a
global passed in, the model as ``self``) is put back as it was: dropping it frees nothing.

Without a shell (a re-run's failure, which no debugger reaches), or where this Python cannot write
a frame's locals, the frames are cleared instead. On Python <= 3.12 a frame also keeps a dict copy
of its locals once anything read ``frame.f_locals`` (IPython's traceback formatter does), which
``frame.clear()`` leaves behind; reading ``f_locals`` again after the clear drops it.
"""

from __future__ import annotations

import copy
import gc
import sys
from dataclasses import dataclass, field
from types import FrameType, TracebackType
from typing import Any

from jupyter_gpumem.backends import MemoryBackend, active
from jupyter_gpumem.backends.torch_objects import no_torch_function
from jupyter_gpumem.oom.report import walk_chain
from jupyter_gpumem.readings.holder_frames import can_write_locals, running_frames
from jupyter_gpumem.readings.host_copies import MovedLocal, MovedOut, move_to_host

__all__ = [
    "MovedLocal",
    "MovedOut",
    "ReleaseResult",
    "allocated_bytes",
    "clear_frames",
    "detached_copy",
    "release_failed_cell",
]

_CO_NEWLOCALS = 0x0002  # a function's frame; a module or class body's locals are its namespace


@dataclass
class ReleaseResult:
    freed_bytes: int | None  # allocated before minus after; None without a reading
    allocated_before_bytes: int | None
    allocated_after_bytes: int | None
    cleared: list[str] = field(default_factory=list)  # what was dropped, for the record
    # the failed frames' locals that held GPU memory, now in host memory or described
    moved: list[MovedLocal] = field(default_factory=list)
    frames_kept: bool = False  # the frames stay for %debug, holding no GPU memory

    @property
    def host_bytes(self) -> int:
        """Host memory the copies kept in the frames take."""
        return sum(m.host_bytes for m in self.moved if m.kept)

    @property
    def moved_out(self) -> list[MovedLocal]:
        """Locals replaced by a description (too big for host memory, or not copyable)."""
        return [m for m in self.moved if not m.kept]


def detached_copy(exc: BaseException) -> BaseException:
    """The same exception (type, message, attributes) without its traceback and chain."""
    try:
        clone = copy.copy(exc)
    except Exception:
        clone = exc
    for attr in ("__traceback__", "__context__", "__cause__"):
        try:
            setattr(clone, attr, None)
        except Exception:
            pass
    return clone


def _frames_of(tb: TracebackType | None) -> list[FrameType]:
    frames: list[FrameType] = []
    while tb is not None and len(frames) < 1000:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    return frames


def clear_frames(tb: TracebackType | None) -> int:
    """Clear the locals of every finished frame in a traceback; returns how many were cleared."""
    return _clear(_frames_of(tb))


def _clear(frames: list[FrameType]) -> int:
    n = 0
    for f in frames:
        try:
            f.clear()
        except RuntimeError:
            continue  # a frame still executing (the handler's own callers): leave it
        n += 1
        if sys.version_info < (3, 13):
            try:
                _ = f.f_locals  # drops the stale dict copy left by an earlier read
            except Exception:
                pass
    return n


def _clear_chain(exc: BaseException | None) -> int:
    return sum(clear_frames(e.__traceback__) for e in walk_chain(exc))


def allocated_bytes(backend: MemoryBackend) -> int | None:
    """PyTorch's allocated bytes on every visible device together (None: nothing to read)."""
    total = None
    for index in backend.visible_devices() or (backend.current_device(),):
        stats = backend.allocator_stats(index)
        if stats is not None:
            total = (total or 0) + stats.get("allocated_bytes.all.current", 0)
    return total


def debug_frames(shell: Any, exc: BaseException | None) -> list[FrameType]:
    """The finished function frames ``%debug`` can reach after this failure: the exception
    chain's, ``sys.last_*``'s and ``InteractiveTB.tb``'s, each once. Module and class bodies
    (their locals are a namespace, the notebook's own for the cell) and frames still running are
    left out."""
    tbs = [e.__traceback__ for e in walk_chain(exc)]
    tbs.append(getattr(sys, "last_traceback", None))
    for name in ("last_value", "last_exc"):
        tbs += [e.__traceback__ for e in walk_chain(getattr(sys, name, None))]
    tbs.append(getattr(getattr(shell, "InteractiveTB", None), "tb", None))
    running = running_frames()
    seen: set[int] = set()
    out = []
    for tb in tbs:
        for f in _frames_of(tb):
            if id(f) in seen or id(f) in running or not f.f_code.co_flags & _CO_NEWLOCALS:
                continue
            seen.add(id(f))
            out.append(f)
    return out


def release_failed_cell(
    shell: Any,
    exc: BaseException | None,
    *,
    backend: MemoryBackend | None = None,
    to_host: bool | None = None,
    host_budget_bytes: int | None = None,
) -> ReleaseResult:
    """Give back the GPU memory the failed frames hold, then gc and empty the cache.

    ``exc`` is the failed cell's exception (the one in flight, or ``sys.last_value``). The cell's
    own module frame is the user namespace and is never touched: globals stay. ``to_host``
    (default: when there is a shell) keeps the frames for ``%debug`` with their GPU locals moved
    to host memory, at most ``host_budget_bytes`` of copies (default: what the machine has
    available, less a margin); otherwise every reference the failure keeps to its frames is
    dropped.
    """
    backend = backend or active()
    before = allocated_bytes(backend)
    if exc is None:
        exc = getattr(sys, "last_value", None)
    if to_host is None:
        to_host = shell is not None
    if to_host and can_write_locals():
        result = _move(shell, exc, backend, host_budget_bytes)
    else:
        result = _drop(shell, exc)
    # young generations only: with frames cleared, what they held goes by reference counting; the
    # few cycles (exception <-> traceback <-> frame) are new. A full collection walks every object
    # torch ever created (170 ms in a kernel with torch imported); Clear cache still does one.
    gc.collect(1)
    backend.empty_cache()
    after = allocated_bytes(backend)
    result.allocated_before_bytes, result.allocated_after_bytes = before, after
    result.freed_bytes = None if before is None or after is None else max(before - after, 0)
    return result


def _move(
    shell: Any, exc: BaseException | None, backend: MemoryBackend, budget: int | None
) -> ReleaseResult:
    frames = debug_frames(shell, exc)
    try:
        moved, unwritten = move_to_host(frames, backend, budget, _variables_tensors(shell))
    except Exception:  # a copy or a write we did not foresee: free the memory as before
        return _drop(shell, exc)
    cleared = ["frame locals"] if _clear(unwritten) else []
    return ReleaseResult(None, None, None, cleared, moved, frames_kept=True)


def _variables_tensors(shell: Any) -> frozenset[int]:
    """The ids of the tensors the notebook's variables hold themselves (``x``), not weights (a
    parameter, a leaf that requires grad): a frame keeps a host copy of those only, as a cell
    that binds ``x`` again frees the GPU tensor then. Read by type, no object's code run."""
    torch = sys.modules.get("torch")
    ns = getattr(shell, "user_ns", None)
    if torch is None or not isinstance(ns, dict):
        return frozenset()
    tensor, parameter = torch.Tensor, torch.nn.Parameter
    with no_torch_function():  # a subclass's __torch_function__ is not run for .is_leaf
        return frozenset(
            id(v)
            for v in list(ns.values())
            if issubclass(type(v), tensor)
            and not issubclass(type(v), parameter)  # a model's weight: never bound again
            and not (v.is_leaf and v.requires_grad)  # a weight by another name: the same
        )


def _drop(shell: Any, exc: BaseException | None) -> ReleaseResult:
    cleared: list[str] = []
    for name in ("last_type", "last_value", "last_traceback", "last_exc"):
        if getattr(sys, name, None) is not None:
            setattr(sys, name, None)
            cleared.append(f"sys.{name}")
    if shell is not None:
        tb_holder: Any = getattr(shell, "InteractiveTB", None)
        if getattr(tb_holder, "tb", None) is not None:
            tb_holder.tb = None
            cleared.append("InteractiveTB.tb")
        result: Any = getattr(shell, "last_execution_result", None)
        err = getattr(result, "error_in_exec", None)
        if err is not None and err.__traceback__ is not None:
            # keep the error (ipykernel reports the cell as failed from it), drop its frames
            result.error_in_exec = detached_copy(err)
            cleared.append("last_execution_result.error_in_exec")
    if exc is not None and _clear_chain(exc):
        cleared.append("frame locals")
    return ReleaseResult(None, None, None, cleared)
