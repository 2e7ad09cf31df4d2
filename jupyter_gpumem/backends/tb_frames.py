"""A traceback as the user should see it: without the frames of our modes (the simulated GPU's,
Move to CPU's redirect, the op log) and of the torch machinery they run through."""

from __future__ import annotations

from types import TracebackType

_DISPATCH_FILES = (
    "/jupyter_gpumem/backends/",
    "/torch/_compile.py",
    "/torch/_dynamo/",
    "/torch/utils/_python_dispatch.py",
    "/torch/overrides.py",
    "/torch/utils/_device.py",
)


def without_dispatch_frames(tb: TracebackType | None) -> TracebackType | None:
    """A copy of the traceback without the simulated GPU's own frames, for display.

    A real CUDA OOM is raised in C++ under the user's last Python frame; the simulated one passes
    through torch function and dispatch modes, Python frames that say nothing to the user. The
    original traceback (and its frames, for the diagnosis and %debug) is left as it is.
    """
    entries = []
    while tb is not None:
        if not _is_dispatch(tb):
            entries.append(tb)
        tb = tb.tb_next
    return linked(entries)


def linked(entries: list[TracebackType]) -> TracebackType | None:
    copy: TracebackType | None = None
    for e in reversed(entries):
        copy = TracebackType(copy, e.tb_frame, e.tb_lasti, e.tb_lineno)
    return copy


def _is_dispatch(tb: TracebackType) -> bool:
    name = tb.tb_frame.f_code.co_filename.replace("\\", "/")
    return any(p in name for p in _DISPATCH_FILES)
