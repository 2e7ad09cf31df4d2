"""A Diagnosis as text (terminal IPython) and as HTML (Jupyter). The same object, two renderers.

Numbers first, then the cause, then one concrete action. Everything that comes from the user (names,
messages, source) is escaped in HTML.
"""

from __future__ import annotations

from html import escape
from typing import TYPE_CHECKING

from jupyter_gpumem.diagnosis.display import for_display
from jupyter_gpumem.units import format_bytes as fmt

if TYPE_CHECKING:
    from jupyter_gpumem.diagnosis.model import Diagnosis
    from jupyter_gpumem.readings.snapshot import MemorySnapshot

MAX_HOLDERS = 8


def _freed_line(d: Diagnosis) -> str | None:
    if not d.released:
        return (
            "The failed frames keep their tensors on the GPU for %debug (keep_traceback is on): "
            "`%gpumem release` moves them to host memory, and %debug still shows them."
        )
    moved = _moved_text(d)
    if d.freed_bytes is None:
        return moved or None
    after = (
        f"; PyTorch now has {fmt(d.allocated_after_bytes)} allocated"
        if d.allocated_after_bytes is not None
        else ""
    )
    if d.freed_bytes == 0:
        freed = f"Nothing was pinned by the failure{after}."
    else:
        freed = f"Freed {fmt(d.freed_bytes)} that the failed cell pinned{after}."
    return f"{freed} {moved}" if moved else freed


def _moved_text(d: Diagnosis) -> str:
    """What the failed frames kept for %debug now hold in host memory."""
    if not d.frames_kept or not (d.host_copies_bytes or d.moved_out):
        return ""
    out = []
    if d.host_copies_bytes:
        out.append(
            f"Moved {fmt(d.host_copies_bytes)} of the failed frames' tensors to host memory "
            "(%debug still works)."
        )
    if d.moved_out:
        shown = ", ".join(d.moved_out[:3]) + (
            f" and {len(d.moved_out) - 3} more" if len(d.moved_out) > 3 else ""
        )
        out.append(f"Not kept in host memory, described in their place: {shown}.")
    return " ".join(out)


def _holder_rows(d: Diagnosis) -> list[tuple[str, str, str, str, str]]:
    rows = []
    for h in d.holders.holders[:MAX_HOLDERS]:
        parts = []
        if h.parameters_bytes or h.buffers_bytes:
            parts.append(f"weights {fmt(h.parameters_bytes + h.buffers_bytes)}")
        if h.gradients_bytes:
            parts.append(f"gradients {fmt(h.gradients_bytes)}")
        if h.optimizer_state_bytes:
            parts.append(f"optimizer state {fmt(h.optimizer_state_bytes)}")
        what = h.detail + (f" ({', '.join(parts)})" if len(parts) > 1 else "")
        where = h.where + (
            ", rebuilt by this cell"
            if h.recreated_by_cell
            else ", used by this cell"
            if h.used_by_cell
            else ""
        )
        rows.append((h.name, h.kind, fmt(h.total_bytes), where, what))
    return rows


def _unexplained(d: Diagnosis) -> int:
    """Allocated memory no holder accounts for, when it is a large part of it."""
    if not d.allocated_bytes:
        return 0
    rest = d.allocated_bytes - sum(h.total_bytes for h in d.holders.holders)
    return rest if rest > d.allocated_bytes // 4 and rest >= 1 << 20 else 0


def trace_hint(d: Diagnosis) -> str | None:
    """How to learn which lines allocated the memory no variable holds (tracing off), else None."""
    if d.allocated_by or d.tracing or not _unexplained(d):
        return None
    return (
        f"{fmt(_unexplained(d))} is in no variable: `%gpumem trace on` shows which lines "
        "allocate it, from the next run"
    )


def _numbers_text(d: Diagnosis) -> list[str]:
    nums = []
    if d.allocated_bytes is not None:
        nums.append(f"PyTorch allocated {fmt(d.allocated_bytes)}")
    if d.reserved_bytes is not None:
        nums.append(f"reserved {fmt(d.reserved_bytes)}")
    if d.other_processes:
        nums.append(f"other processes {fmt(sum(p.used_bytes for p in d.other_processes))}")
    out = ["  " + ", ".join(nums) + "."] if nums else []
    freed = _freed_line(d)
    return out + (["  " + freed] if freed else [])


def _holders_text(d: Diagnosis) -> list[str]:
    out: list[str] = []
    rows = _holder_rows(d)
    if rows:
        out += ["", "Where the memory went"]
        w = max(len(r[0]) for r in rows)
        out += [
            f"  {name:<{w}}  {size:>10}  {kind}, {where}: {what}"
            for name, kind, size, where, what in rows
        ]
        more = len(d.holders.holders) - len(rows)
        if more > 0:
            out.append(f"  ... and {more} more")
    if d.allocated_by:
        out += ["", "Allocated by (tracing on)"] + [f"  {line}" for line in d.allocated_by]
    elif trace_hint(d):
        out.append(f"  ({trace_hint(d)})")
    skipped = getattr(d.holders, "skipped", 0)
    if skipped:
        why = "; ".join(getattr(d.holders, "skipped_reasons", [])[:2])
        out.append(
            f"  ({skipped} object{'s' if skipped > 1 else ''} not read: reading "
            f"{'them' if skipped > 1 else 'it'} would run its own code{': ' + why if why else ''})"
        )
    return out


def render_text(d: Diagnosis, fix_lines: list[str] | None = None) -> str:
    d, folded = for_display(d)
    out = [f"GPU out of memory: {d.headline}", *_numbers_text(d), *_holders_text(d)]
    out.append("")
    out.append("Likely cause" + ("s" if len(d.causes) > 1 else ""))
    for i, c in enumerate(d.causes, 1):
        out.append(f"  {i}. {c.title}. {c.evidence}")
        out.append(f"     -> {c.action}")
    for c in folded:
        out.append(f"  ({c.title}: {c.action[0].lower()}{c.action[1:]})")
    out.extend(f"  {note}" for note in d.notes)
    if fix_lines:
        out += ["", "Fixes"] + ["  " + line for line in fix_lines]
    return "\n".join(out)


_CSS = """
<style>
.gpumem-diag{font-family:var(--jp-ui-font-family,sans-serif);font-size:13px;line-height:1.45;
 color:var(--jp-ui-font-color1,inherit);border-left:4px solid var(--jp-warn-color1,#c77c02);
 padding:6px 12px;margin:4px 0;background:var(--jp-layout-color1,transparent)}
.gpumem-diag h4{margin:2px 0 6px;font-size:14px}
.gpumem-diag table{border-collapse:collapse;margin:4px 0}
.gpumem-diag td,.gpumem-diag th{padding:1px 10px 1px 0;text-align:left;vertical-align:top}
.gpumem-diag td.num{text-align:right;font-variant-numeric:tabular-nums}
.gpumem-diag ol{margin:4px 0;padding-left:20px}
.gpumem-diag .action{color:var(--jp-ui-font-color2,inherit)}
.gpumem-diag code{background:var(--jp-layout-color2,rgba(127,127,127,.15));padding:0 3px}
</style>
"""


def md_code(text: str) -> str:
    """Escape, then turn `name` into <code>name</code>."""
    parts = escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def render_html(d: Diagnosis, *, with_style: bool = True) -> str:
    h = [_CSS if with_style else "", '<div class="gpumem-diag" role="alert">']
    h.append(f"<h4>GPU out of memory: {escape(d.headline)}</h4>")
    freed = _freed_line(d)
    if freed:
        h.append(f"<div>{md_code(freed)}</div>")
    rows = _holder_rows(d)
    if rows:
        h.append("<table><tr><th>holder</th><th>kind</th><th>size</th><th>where</th><th></th></tr>")
        for name, kind, size, where, what in rows:
            h.append(
                f"<tr><td><code>{escape(name)}</code></td><td>{escape(kind)}</td>"
                f'<td class="num">{escape(size)}</td><td>{escape(where)}</td>'
                f"<td>{escape(what)}</td></tr>"
            )
        h.append("</table>")
    h.append("<ol>")
    for c in d.causes:
        h.append(
            f"<li><b>{escape(c.title)}.</b> {md_code(c.evidence)}<br>"
            f'<span class="action">&rarr; {md_code(c.action)}</span></li>'
        )
    h.append("</ol>")
    if d.allocated_by:
        h.append("<div><b>Allocated by</b> (tracing on)<ul>")
        h.extend(f"<li>{md_code(line)}</li>" for line in d.allocated_by)
        h.append("</ul></div>")
    h.extend(f"<div>{md_code(note)}</div>" for note in d.notes)
    h.append("</div>")
    return "".join(h)


def render_snapshot_text(s: MemorySnapshot, *, marked: int | None = None) -> str:
    """``%gpumem status``: every visible device, ``marked`` (the last OOM's) flagged."""
    devices = s.all_devices
    if len(devices) == 1:
        return _device_text(s, marked)
    head = f"{len(devices)} GPUs visible" + (
        f"; the last OOM was on GPU {marked}" if marked is not None else ""
    )
    return "\n".join([head, *(_device_text(d, marked) for d in devices)])


def _device_text(s: MemorySnapshot, marked: int | None) -> str:
    mark = "  ◀ the last OOM" if marked is not None and s.device_index == marked else ""
    lines = [s.label + mark]
    if not s.available:
        lines.append(
            "  no reading: torch has not used CUDA in this process and NVML is unavailable"
        )
        if s.nvml_error:
            lines.append(f"  NVML: {s.nvml_error}")
        return "\n".join(lines)
    if s.total_bytes is not None:
        used = f"{fmt(s.used_bytes)} used, " if s.used_bytes is not None else ""
        lines.append(f"  device    {used}{fmt(s.free_bytes)} free of {fmt(s.total_bytes)}")
    if s.allowed_bytes is not None:
        lines.append(f"  cap       {fmt(s.allowed_bytes)} allowed to this process")
    if s.allocated_bytes is not None:
        lines.append(
            f"  PyTorch   {fmt(s.allocated_bytes)} allocated, {fmt(s.reserved_bytes)} reserved "
            f"({fmt(s.reserved_unallocated_bytes)} cached), peak {fmt(s.peak_allocated_bytes)}"
            + (f", {s.num_ooms} OOMs so far" if s.num_ooms else "")
        )
    else:
        lines.append("  PyTorch   not using CUDA in this process yet")
    for p in s.processes:
        if not p.is_self:
            lines.append(f"  pid {p.pid:<7} {fmt(p.used_bytes)} ({p.description})")
    if s.nvml_error:
        lines.append(f"  NVML unavailable: {s.nvml_error}")
    return "\n".join(lines)
