"""The diagnosis as people read it: library frames' locals merged into one row per library
(``args in _wrapped_call_impl() in module.py`` becomes "locals of the failed call in torch"), and
causes with nothing to do folded away. The text diagnosis and the panel both show this; the
Diagnosis itself is left as it is.
"""

from __future__ import annotations

import dataclasses
import re
import sys

from jupyter_gpumem.diagnosis.model import Cause, Diagnosis
from jupyter_gpumem.readings.holders import Holder

__all__ = ["for_display", "library_of", "nothing_to_do", "readable_holders"]

# "x in step() in module.py": holders.py names a library frame's local with its function and file;
# a frame of the notebook has no file part
_LIBRARY_LOCAL = re.compile(r"^(?P<var>.+) in (?P<func>[\w.<>]+)\(\) in (?P<file>[\w./-]+\.py)$")


def library_of(filename: str) -> str:
    """The top-level package a loaded module file belongs to ("module.py" -> "torch"), or the file."""
    suffix = "/" + filename
    for name, mod in list(sys.modules.items()):
        path = getattr(mod, "__file__", None)
        if isinstance(path, str) and path.replace("\\", "/").endswith(suffix):
            return name.split(".", 1)[0]
    return filename


def readable_holders(holders: list[Holder]) -> list[Holder]:
    """Library frames' locals merged into one holder per library, in size order."""
    out: list[Holder] = []
    merged: dict[str, Holder] = {}
    names: dict[str, list[str]] = {}
    for h in holders:
        m = _LIBRARY_LOCAL.match(h.name) if h.where == "failed frame" else None
        if m is None:
            out.append(h)
            continue
        lib = library_of(m["file"])
        if lib == m["file"]:
            out.append(h)  # not a loaded library's file: a notebook cell's (ipykernel's temp files)
            continue
        if lib == "jupyter_gpumem":
            lib = "torch"  # the simulated GPU's dispatch frames stand in for torch's allocator
        if lib not in merged:
            merged[lib] = Holder(
                name=f"locals of the failed call in {lib}",
                kind="tensors",
                where="failed frame",
                device=h.device,
            )
            names[lib] = []
            out.append(merged[lib])
        merged[lib].tensor_bytes += h.total_bytes
        names[lib].append(m["var"])
    for lib, holder in merged.items():
        shown = ", ".join(dict.fromkeys(names[lib]))
        holder.detail = f"{len(names[lib])} locals of {lib}'s frames: {shown}"[:200]
    out.sort(key=lambda h: -h.total_bytes)
    return out


def nothing_to_do(c: Cause) -> bool:
    return c.action.startswith("Nothing to do")


def for_display(d: Diagnosis) -> tuple[Diagnosis, list[Cause]]:
    """(the diagnosis as the panel shows it, the causes folded away because nothing is to do)."""
    folded = [c for c in d.causes if nothing_to_do(c)]
    causes = [c for c in d.causes if not nothing_to_do(c)] or d.causes[:1]
    folded = [c for c in folded if c not in causes]
    holders = dataclasses.replace(d.holders, holders=readable_holders(d.holders.holders))
    return dataclasses.replace(d, causes=causes, holders=holders), folded
