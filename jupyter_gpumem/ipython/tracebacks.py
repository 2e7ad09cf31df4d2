"""The traceback the hook shows for an OOM: a wrapped OOM's frames joined to the cell's, and each
run of library frames folded to one line.

Apart from the hook, which decides when to show it: this part only reads traceback objects and
IPython's formatted entries, never the shell.
"""

from __future__ import annotations

import os
import re
import sysconfig
from types import TracebackType

from jupyter_gpumem.backends.tb_frames import linked as _linked


def through(outer: TracebackType | None, inner: TracebackType | None) -> TracebackType | None:
    """The frames from the cell down to where a wrapped exception was raised, for the diagnosis.

    ``outer`` (the error the cell raised) runs from the cell to where the OOM was caught; ``inner``
    (the OOM's own) from there to where it was raised. Joined where they meet, or one after the
    other when they do not (an OOM raised in another task of an ``ExceptionGroup``).
    """
    if inner is None:
        return outer
    entries = []
    t = outer
    while t is not None and t.tb_frame is not inner.tb_frame:
        entries.append(t)
        t = t.tb_next
    t = inner
    while t is not None:
        entries.append(t)
        t = t.tb_next
    return _linked(entries)


_ANSI = re.compile(r"\x1b\[[0-9;]*m|\x1b\]8;[^\x1b]*\x1b\\")
_FRAME = re.compile(r"\s*File (?P<path>.+?):\d+, in ")
# any frame's first line: a file's, or a notebook cell's ("Cell In[1], line 13, in forward")
_ANY_FRAME = re.compile(r"\s*(File .+?:\d+, in |Cell In\[\d+\], line \d+)")
_STDLIB = sysconfig.get_paths()["stdlib"].replace("\\", "/").rstrip("/") + "/"


def library_of(entry: str) -> str | None:
    """The installed package a frame of IPython's structured traceback is in; None for the user's.

    The user's own frames are the cells and any file outside ``site-packages`` and the standard
    library (a project installed in editable mode included).
    """
    m = _FRAME.match(_ANSI.sub("", entry))
    if m is None:
        return None
    path = os.path.expanduser(m.group("path")).replace("\\", "/")
    for marker in ("/site-packages/", "/dist-packages/"):
        if marker in path:
            rest = path.split(marker, 1)[1]
            return rest.split("/", 1)[0].removesuffix(".py")
    if path.startswith(_STDLIB):
        return path[len(_STDLIB) :].split("/", 1)[0].removesuffix(".py")
    return None


def fold_library_frames(stb: list[str], note: str = "") -> list[str]:
    """Each run of two or more library frames becomes one line, ``... 6 frames in torch ...``.

    The innermost frame of each exception is kept even when it is a library's: it is the call
    that failed (``F.linear(...)``), which the user wants to see.
    """
    out: list[str] = []
    run: list[tuple[str, str]] = []

    def flush() -> None:
        if len(run) >= 2:
            names = ", ".join(dict.fromkeys(pkg for _, pkg in run))
            out.append(f"... {len(run)} frames in {names}{note} ...\n")
        else:
            out.extend(entry for entry, _ in run)
        run.clear()

    for i, entry in enumerate(stb):
        pkg = library_of(entry)
        innermost = i + 1 >= len(stb) or not _ANY_FRAME.match(_ANSI.sub("", stb[i + 1]))
        if pkg is not None and not innermost:
            run.append((entry, pkg))
            continue
        flush()
        out.append(entry)
    flush()
    return out
