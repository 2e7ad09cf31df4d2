"""The failed frames: which a failed cell left behind, how each is named in a holder ("forward()
in linear.py"), their locals read without running code, and rebound (what ``%debug`` shows).

From Python 3.13 ``frame.f_locals`` is a proxy over the fast locals (PEP 667), before it a dict;
anything else (a class body's ``__prepare__`` mapping) could run user code, so it is skipped.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Mapping
from types import FrameType, TracebackType
from typing import Any

from jupyter_gpumem.readings.holder_scan import Scan, type_name


def _locals_types() -> tuple[type, ...]:
    # a plain dict up to 3.12, a C proxy over the fast locals from 3.13 (PEP 667)
    return (dict, type(sys._getframe().f_locals))


_LOCALS_TYPES = _locals_types()


def failed_frames(tb: TracebackType | None, user_ns: Mapping[str, Any]) -> list[FrameType]:
    """The frames a failed cell left behind, minus the cell's own module frame (its locals are
    the user namespace)."""
    frames = []
    seen = 0
    while tb is not None and seen < 500:
        f = tb.tb_frame
        if not (f.f_code.co_name == "<module>" and f.f_globals is user_ns):
            frames.append(f)
        tb = tb.tb_next
        seen += 1
    return frames


def _frame_label(frame: FrameType) -> str:
    parts = frame.f_code.co_filename.replace("\\", "/").rsplit("/", 2)
    fname = parts[-1]
    if fname == "__init__.py" and len(parts) > 1:  # "autograd/__init__.py": which package's
        fname = f"{parts[-2]}/{fname}"
    if fname.startswith("<ipython-input") or fname.startswith("ipykernel_"):
        return f"{frame.f_code.co_name}()"
    return f"{frame.f_code.co_name}() in {fname}"


def frame_locals(scan: Scan, frames: Iterable[FrameType]) -> Iterator[tuple[str, Any]]:
    """("name in label", value) of each failed frame's locals, a frame's read whole before any is
    yielded; a frame whose locals cannot be read safely (a class body's mapping, a raising proxy)
    is skipped and counted."""
    for frame in frames:
        label = _frame_label(frame)
        try:
            f_locals = frame.f_locals
            if type(f_locals) not in _LOCALS_TYPES:  # a class body's __prepare__ mapping
                scan.skip(label, f"its locals are a {type_name(type(f_locals))}")
                continue
            local_items = list(dict.items(f_locals) if type(f_locals) is dict else f_locals.items())
        except Exception as exc:
            scan.skip(label, f"its locals could not be read ({type_name(type(exc))})")
            continue
        for name, obj in local_items:
            yield f"{name} in {label}", obj


def _locals_to_fast() -> Any:
    """CPython's ``PyFrame_LocalsToFast`` (before 3.13), or None where ctypes cannot reach it."""
    try:
        import ctypes

        fn = ctypes.pythonapi.PyFrame_LocalsToFast
        fn.argtypes = (ctypes.py_object, ctypes.c_int)
        fn.restype = None
        return lambda frame: fn(ctypes.py_object(frame), ctypes.c_int(0))
    except Exception:  # PyPy, or a CPython without the symbol
        return None


_LOCALS_TO_FAST = None if sys.version_info >= (3, 13) else _locals_to_fast()


def can_write_locals() -> bool:
    """Whether :func:`write_locals` can rebind a finished frame's locals on this Python."""
    return sys.version_info >= (3, 13) or _LOCALS_TO_FAST is not None


def write_locals(frame: FrameType, values: Mapping[str, Any]) -> bool:
    """Rebind some of a finished frame's locals, as ``%debug`` will then see them; False where
    this Python cannot (nothing changed).

    From 3.13 ``f_locals`` writes through to the fast locals (PEP 667). Before it, ``f_locals``
    is a dict copy refreshed on each read: the new values go into it, then
    ``PyFrame_LocalsToFast`` copies it back into the frame's slots (cells included), as debuggers
    did for ``locals()`` edits.
    """
    if sys.version_info >= (3, 13):
        proxy = frame.f_locals
        for name, value in values.items():
            proxy[name] = value
        return True
    if _LOCALS_TO_FAST is None:
        return False
    f_locals = frame.f_locals  # the dict, refreshed from the fast locals
    if type(f_locals) is not dict:
        return False
    dict.update(f_locals, values)
    _LOCALS_TO_FAST(frame)
    return True


def running_frames() -> set[int]:
    """ids of the frames on the calling thread's stack: still executing, never rewritten."""
    ids = set()
    f: FrameType | None = sys._getframe()
    while f is not None:
        ids.add(id(f))
        f = f.f_back
    return ids
