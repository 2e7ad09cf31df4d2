"""Free what a failed cell pinned.

After an exception, the failed frames (and every tensor in their locals) stay reachable from
``sys.last_value``, ``sys.last_traceback``, ``sys.last_exc`` (3.12+), the shell's
``last_execution_result.error_in_exec`` and ``InteractiveTB.tb`` (kept for ``%debug``). Each alone
keeps the memory; ``torch.cuda.empty_cache()`` frees none of it. On Python <= 3.12 a frame also
keeps a dict copy of its locals once anything read ``frame.f_locals`` (IPython's traceback formatter
does), which ``frame.clear()`` leaves behind; reading ``f_locals`` again after the clear drops it.
"""

from __future__ import annotations

import copy
import gc
import sys
from dataclasses import dataclass, field
from types import FrameType, TracebackType
from typing import Any

from jupyter_gpumem.backends import MemoryBackend, active
from jupyter_gpumem.oom.report import walk_chain


@dataclass
class ReleaseResult:
    freed_bytes: int | None  # allocated before minus after; None without a reading
    allocated_before_bytes: int | None
    allocated_after_bytes: int | None
    cleared: list[str] = field(default_factory=list)  # what was dropped, for the record


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


def clear_frames(tb: TracebackType | None) -> int:
    """Clear the locals of every finished frame in a traceback; returns how many were cleared."""
    n = 0
    frames: list[FrameType] = []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
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


def release_failed_cell(
    shell: Any,
    exc: BaseException | None,
    *,
    backend: MemoryBackend | None = None,
) -> ReleaseResult:
    """Drop every reference the failure keeps to its frames, then gc and empty the cache.

    ``exc`` is the failed cell's exception (the one in flight, or ``sys.last_value``). The cell's
    own module frame is the user namespace and is never touched: globals stay.
    """
    backend = backend or active()
    before = allocated_bytes(backend)
    cleared: list[str] = []
    if exc is None:
        exc = getattr(sys, "last_value", None)
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
    # young generations only: with frames cleared, what they held goes by reference counting; the
    # few cycles (exception <-> traceback <-> frame) are new. A full collection walks every object
    # torch ever created (170 ms in a kernel with torch imported); Clear cache still does one.
    gc.collect(1)
    backend.empty_cache()
    after = allocated_bytes(backend)
    freed = None if before is None or after is None else max(before - after, 0)
    return ReleaseResult(freed, before, after, cleared)
