"""The panel's "Allocated by" (``%gpumem trace on``): the live memory at the failure by the line
that allocated it, with the model modules inside each line, as a table with a bar per row, and
"Save snapshot", which writes the pickle PyTorch's memory viewer opens (nothing is uploaded).

With tracing off, when the holders cannot account for the memory, it says how to turn tracing on,
in the words of the text diagnosis (``render.trace_hint``). HTML and CSS like ``chart.py``: no plotly.
"""

from __future__ import annotations

from collections.abc import Callable
from html import escape
from typing import Any

import ipywidgets as W

from jupyter_gpumem.diagnosis.model import Diagnosis
from jupyter_gpumem.diagnosis.render import md_code, trace_hint
from jupyter_gpumem.readings import trace
from jupyter_gpumem.units import format_bytes

CSS = """
.gpumem-allocs{margin:4px 0 6px;font-size:12px;max-width:100%}
.gpumem-allocs table{display:block;max-width:100%;overflow-x:auto;border-collapse:collapse}
.gpumem-allocs td,.gpumem-allocs th{padding:1px 10px 1px 0;text-align:left;vertical-align:middle}
.gpumem-allocs td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.gpumem-allocs td.gpumem-module{padding-left:1.5em}
.gpumem-allocs .gpumem-minibar{display:inline-block;width:100px;height:9px;vertical-align:middle;
 border:1px solid var(--jp-border-color1,#bbb);border-radius:2px;overflow:hidden}
.gpumem-allocs .gpumem-minibar span{display:block;height:100%;background:#3fa08a}
.gpumem-allocs tr.gpumem-sub .gpumem-minibar span{background:#86c9b8}
"""
LINES_SHOWN = 6
MODULES_SHOWN = 3
SNAPSHOT_FILE = "gpumem_snapshot.pickle"


def _bar(share: float) -> str:
    return (
        f'<span class="gpumem-minibar" aria-hidden="true">'
        f'<span style="width:{100 * min(max(share, 0.0), 1.0):.1f}%"></span></span>'
    )


def _row(label: str, nbytes: int, tensors: int | None, share: float, sub: bool = False) -> str:
    cls = ' class="gpumem-sub"' if sub else ""
    td = '<td class="gpumem-module">' if sub else "<td>"
    count = "" if tensors is None else str(tensors)
    return (
        f'<tr{cls}>{td}{md_code(label)}</td><td class="num">{escape(format_bytes(nbytes))}'
        f'</td><td class="num">{count}</td><td>{_bar(share)}</td></tr>'
    )


def allocated_html(d: Diagnosis) -> str:
    """The table: one row per line (largest first), its modules under it; "" without tracing."""
    lines = d.allocated_lines
    if not lines:
        return ""
    total = sum(t.bytes for t in lines) or 1
    rows = []
    for t in lines[:LINES_SHOWN]:
        rows.append(_row(t.where, t.bytes, t.tensors, t.bytes / total))
        for name, nbytes, tensors in t.modules[:MODULES_SHOWN]:
            rows.append(_row(f"`{name}`", nbytes, tensors, nbytes / total, sub=True))
        if len(t.modules) > MODULES_SHOWN:
            rest = t.modules[MODULES_SHOWN:]
            n = sum(m[1] for m in rest)
            rows.append(_row(f"{len(rest)} more modules", n, None, n / total, sub=True))
    rest_lines = lines[LINES_SHOWN:]
    if rest_lines:
        n = sum(t.bytes for t in rest_lines)
        rows.append(_row(f"{len(rest_lines)} more lines", n, None, n / total))
    return (
        '<div class="gpumem-allocs" role="group" aria-label="Allocated by">'
        f"<b>Allocated by</b> (tracing on): the {escape(format_bytes(total))} live at the failure, "
        "by the line of your cells that allocated it"
        "<table><tr><th>line or module</th><th>size</th><th>tensors</th><th></th></tr>"
        + "".join(rows)
        + "</table></div>"
    )


class AllocatedBy:
    """``AllocatedBy(d, shell, set_status).widget``: the table and Save snapshot, or the hint to
    turn tracing on; None when there is nothing to say."""

    def __init__(
        self,
        d: Diagnosis,
        shell: Any,
        set_status: Callable[[str, str], None],
        path: str = SNAPSHOT_FILE,
    ) -> None:
        self.shell, self.set_status, self.path = shell, set_status, path
        self.saved: str | None = None
        self.widget: W.Widget | None = None
        self.save: W.Button | None = None
        table = allocated_html(d)
        if table:
            self.save = W.Button(
                description="Save snapshot",
                tooltip="Write the snapshot PyTorch's memory viewer opens (pytorch.org/memory_viz)",
                layout=W.Layout(width="auto"),
            )
            self.save.on_click(lambda _b: self.click())
            self.widget = W.VBox(
                [W.HTML(table), self.save], layout=W.Layout(align_items="flex-start")
            )
            return
        hint = trace_hint(d)
        if hint:
            self.widget = W.HTML(
                f"<div class='gpumem-why'>{md_code(hint[0].upper() + hint[1:])}.</div>"
            )

    def click(self) -> str | None:
        """Save the snapshot; the path it was written to (None if it could not be)."""
        if not trace.active():
            self.set_status(
                "Tracing is off now, so there is no allocation history to save: "
                "<code>%gpumem trace on</code> records it from the next run.",
                "bad",
            )
            return None
        try:
            path = trace.save_snapshot(self.path, shell=self.shell)
        except Exception as exc:
            self.set_status(
                f"jupyter_gpumem: saving the snapshot failed "
                f"({escape(type(exc).__name__)}: {escape(str(exc)[:200])})",
                "bad",
            )
            return None
        self.saved = path
        self.set_status(
            f"✓ Saved <code>{escape(path)}</code>: open it at "
            '<a href="https://pytorch.org/memory_viz" target="_blank" rel="noopener">'
            "pytorch.org/memory_viz</a> (drag the file onto the page; nothing is uploaded).",
            "ok",
        )
        return path
