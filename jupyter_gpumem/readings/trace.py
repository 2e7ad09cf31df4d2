"""Where the memory was allocated: live allocations grouped by the notebook line that made them.

``start()`` records a Python stack for every allocation (``backends/alloc_history.py``: torch's own
history on CUDA, the simulated GPU's recorder otherwise); ``allocated_by_line()`` reads what is
live now and folds each stack into the user's own line, the innermost frame in notebook code
(library frames fold into the line that called them), and the model module whose forward was
running (``model.layer4.1.conv2``). ``save_snapshot()`` writes the pickle
https://pytorch.org/memory_viz opens.

Cells are found through IPython's compile cache, ``shell.compile._filename_map`` (file -> execution
count), which both shells keep: ``<ipython-input-7-…>`` in a terminal, ``/tmp/ipykernel_PID/HASH.py``
in ipykernel.
"""

from __future__ import annotations

import os
import pickle
import re
import sys
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

from jupyter_gpumem.backends import alloc_history
from jupyter_gpumem.units import format_bytes

__all__ = [
    "LineAlloc",
    "LineTotal",
    "active",
    "allocated_by_line",
    "by_line",
    "save_snapshot",
    "start",
    "stop",
    "summary_lines",
]

BEFORE_TRACING = "(allocated before tracing started)"
_INPUT_FILE = re.compile(r"<ipython-input-(\d+)-")
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


class LineAlloc(NamedTuple):
    """Live memory allocated by one line (and, within it, one module of the model)."""

    where: str  # "In [7], line 3" or "`train` (In [5]), line 12"
    module: str | None  # "model.encoder.layer.11" when a module's forward was running
    bytes: int
    tensors: int  # storages: views of one tensor count once


class LineTotal(NamedTuple):
    """One source line's live memory, with its model modules (name, bytes, tensors), largest first."""

    where: str
    bytes: int
    tensors: int
    modules: tuple[tuple[str, int, int], ...]


def start(max_entries: int = 100_000, *, modules: bool = True, shell: Any = None) -> None:
    """Record allocation history with Python stacks (``%gpumem trace on``); off by default.

    ``max_entries``: the events kept for the snapshot's timeline (the live allocations' stacks are
    always kept). ``modules``: also track which ``nn.Module`` is running (global forward hooks).
    """
    if max_entries <= 0:
        raise ValueError(f"max_entries must be positive, not {max_entries}")
    shell = _shell(shell)
    files = getattr(getattr(shell, "compile", None), "_filename_map", None)
    alloc_history.start(max_entries, stop_files=files if files is not None else (), modules=modules)


def stop() -> None:
    """Stop recording and forget the history."""
    alloc_history.stop()


def active() -> bool:
    return alloc_history.active()


def allocated_by_line(shell: Any = None, device: int | None = None) -> list[LineAlloc]:
    """The live memory by notebook line and module, largest first; what was allocated before
    tracing started comes last. [] when tracing is off. ``shell``: the IPython shell (default: the
    running one), for its cell files and the names of its models; ``device``: that GPU's memory
    only (None: every GPU's)."""
    shell = _shell(shell)
    files: Mapping[str, int] = getattr(getattr(shell, "compile", None), "_filename_map", None) or {}
    user_ns: Mapping[str, Any] = getattr(shell, "user_ns", None) or {}
    groups: dict[tuple[str, alloc_history.ModuleToken | None], list[int]] = {}
    for alloc in alloc_history.live_allocations(device):
        where = _where(alloc.frames, files)
        group = groups.setdefault((where, alloc.module), [0, 0])
        group[0] += alloc.nbytes
        group[1] += 1
    names = _root_names({token[0] for _w, token in groups if token is not None}, user_ns)
    merged: dict[tuple[str, str | None], list[int]] = {}
    for (where, token), (nbytes, count) in groups.items():
        group = merged.setdefault((where, _module_name(token, names)), [0, 0])
        group[0] += nbytes
        group[1] += count
    rows = [LineAlloc(w, m, n, c) for (w, m), (n, c) in merged.items() if n > 0]
    rows.sort(key=lambda r: (r.where == BEFORE_TRACING, -r.bytes, r.where, r.module or ""))
    return rows


def by_line(rows: list[LineAlloc]) -> list[LineTotal]:
    """``allocated_by_line``'s rows summed by source line, largest first, what was allocated
    before tracing started last."""
    lines: dict[str, list[Any]] = {}
    for row in rows:
        entry = lines.setdefault(row.where, [0, 0, []])
        entry[0] += row.bytes
        entry[1] += row.tensors
        if row.module is not None:
            entry[2].append((row.module, row.bytes, row.tensors))
    totals = [
        LineTotal(where, n, count, tuple(sorted(modules, key=lambda m: -m[1])))
        for where, (n, count, modules) in lines.items()
    ]
    totals.sort(key=lambda t: (t.where == BEFORE_TRACING, -t.bytes))
    return totals


def summary_lines(
    limit: int = 5, shell: Any = None, *, rows: list[LineAlloc] | None = None
) -> list[str]:
    """The "Allocated by" lines of text, one per source line, largest first ([] when tracing is off).
    ``rows``: ``allocated_by_line``'s, when already read.

    ``In [7], line 3: 6.00 GiB in 12 tensors (model.layer4 4.00 GiB, model.layer3 1.50 GiB)``
    """
    ordered = by_line(allocated_by_line(shell) if rows is None else rows)
    lines = []
    for t in ordered[:limit]:
        count = t.tensors
        line = f"{t.where}: {format_bytes(t.bytes)} in {count} tensor{'s' if count != 1 else ''}"
        if t.modules:
            shown = ", ".join(f"{name} {format_bytes(n)}" for name, n, _c in t.modules[:2])
            more = f", {len(t.modules) - 2} more modules" if len(t.modules) > 2 else ""
            line += f" ({shown}{more})"
        lines.append(line)
    rest = ordered[limit:]
    if rest:
        lines.append(f"{len(rest)} more lines: {format_bytes(sum(t.bytes for t in rest))}")
    return lines


def save_snapshot(path: str = "gpumem_snapshot.pickle", shell: Any = None) -> str:
    """Write the allocator snapshot PyTorch's memory viewer opens (drag it onto
    https://pytorch.org/memory_viz; nothing is uploaded); returns its absolute path.

    torch's own format (``torch.cuda.memory._dump_snapshot``), with the notebook's cell files
    named as cells (``In [7]``) so the viewer's stacks read like the notebook."""
    data = alloc_history.snapshot()
    shell = _shell(shell)
    files: Mapping[str, int] = getattr(getattr(shell, "compile", None), "_filename_map", None) or {}
    renamed: dict[str, str] = {}
    for frames in _all_frames(data):
        for frame in frames:
            filename = frame.get("filename", "")
            name = renamed.get(filename)
            if name is None:
                cell = _cell(filename, files)
                name = renamed[filename] = filename if cell is None else f"In [{cell}]"
            frame["filename"] = name
    path = os.path.abspath(path)
    with open(path, "wb") as f:
        pickle.dump(data, f)
    return path


def _all_frames(data: Mapping[str, Any]) -> Iterator[list[dict[str, Any]]]:
    for seg in data.get("segments", ()):
        yield seg.get("frames", [])
        for block in seg.get("blocks", ()):
            yield block.get("frames", [])
    for device_trace in data.get("device_traces", ()):
        for entry in device_trace:
            yield entry.get("frames", [])


# ---- naming -------------------------------------------------------------------------------------


def _shell(shell: Any) -> Any:
    if shell is not None:
        return shell
    ipython = sys.modules.get("IPython")
    get = getattr(ipython, "get_ipython", None)
    return get() if get is not None else None


def _cell(filename: str, files: Mapping[str, int]) -> int | None:
    number = files.get(filename)
    if number is None:
        match = _INPUT_FILE.match(filename)
        return int(match[1]) if match else None
    return int(number)


def _is_library(filename: str) -> bool:
    if filename.startswith("<") or filename.startswith(_PACKAGE_DIR):
        return True
    if "site-packages" in filename or "dist-packages" in filename:
        return True
    prefixes = {sys.prefix, sys.base_prefix, sys.exec_prefix}
    return any(filename.startswith(p + os.sep) for p in prefixes if p)


def _where(frames: tuple[alloc_history.Frame, ...], files: Mapping[str, int]) -> str:
    """The user's own line of a stack (innermost first): the first frame in notebook code, else
    the first outside libraries."""
    if not frames:
        return BEFORE_TRACING
    for filename, line, name in frames:
        cell = _cell(filename, files)
        if cell is not None:
            if name == "<module>":
                return f"In [{cell}], line {line}"
            return f"`{name}` (In [{cell}]), line {line}"
    for filename, line, name in frames:
        if not _is_library(filename):
            base = os.path.basename(filename)
            if name == "<module>":
                return f"{base}, line {line}"
            return f"`{name}` ({base}), line {line}"
    filename, line, name = frames[-1]
    return f"`{name}` ({os.path.basename(filename)}), line {line}"


def _root_names(roots: set[int], user_ns: Mapping[str, Any]) -> dict[int, str]:
    """id of a model -> the notebook variable that holds it (else its class name)."""
    names: dict[int, str] = {}
    if not roots:
        return names
    for name, value in list(user_ns.items()):
        key = id(value)
        fresh = key in roots and key not in names and not name.startswith("_")
        if fresh and alloc_history.traced_model(key) is value:  # the id may be a dead model's
            names[key] = name
    for root_id in roots - names.keys():
        root = alloc_history.traced_model(root_id)
        if root is not None:
            names[root_id] = type(root).__name__
    return names


def _module_name(token: alloc_history.ModuleToken | None, names: Mapping[int, str]) -> str | None:
    if token is None:
        return None
    root = names.get(token[0], "<model>")
    return f"{root}.{token[1]}" if token[1] else root
