"""What the kernel sends to the ``jupyter-gpumem`` JupyterLab extension: a proposed edit of one line
of a notebook cell, which the extension draws as an "Apply to cell" button. Elsewhere (Notebook 7
without the extension, a terminal, nbconvert) the ``text/plain`` fallback shows the edit as text.
"""

from __future__ import annotations

from typing import Any

CHANGE_MIME = "application/vnd.jupyter-gpumem.change+json"


def change_bundle(cell_id: str, line: int, old: str, new: str) -> dict[str, Any]:
    """The display bundle for replacing line ``line`` (1-based) of cell ``cell_id``, which must
    still read ``old`` (whole line, indentation included), with ``new``. Show it with
    ``IPython.display.display(bundle, raw=True)``."""
    return {
        CHANGE_MIME: {"cell_id": cell_id, "line": int(line), "old": old, "new": new},
        "text/plain": f"Line {int(line)} of the cell: {old.strip()}  →  {new.strip()}",
    }


def current_cell_id(shell: Any = None) -> str | None:
    """The id of the notebook cell being run, or None outside a notebook. JupyterLab 4 and
    Notebook 7 put it in the execute request's metadata (``cellId``); classic front ends do not."""
    try:
        if shell is None:
            from IPython import get_ipython

            shell = get_ipython()
        kernel = getattr(shell, "kernel", None)
        if kernel is None:
            return None
        parent = kernel.get_parent("shell") or {}
        cell_id = (parent.get("metadata") or {}).get("cellId")
        return cell_id if isinstance(cell_id, str) else None
    except Exception:
        return None
