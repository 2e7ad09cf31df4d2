"""Every visible GPU in the panel: each one's used and free memory on a small bar, the OOM's marked.

Shown only when the snapshot read several devices; one GPU is what the rest of the panel is about.
The numbers are the driver's (``used`` as nvidia-smi counts it), else the allocator's reserved
memory where the driver cannot be read, in the units of the text around them (``format_bytes``).
"""

from __future__ import annotations

from html import escape

from jupyter_gpumem.diagnosis.model import Diagnosis
from jupyter_gpumem.readings.snapshot import MemorySnapshot
from jupyter_gpumem.units import format_bytes

CSS = """
.gpumem-devices{margin:4px 0 6px;font-size:12px;max-width:100%}
.gpumem-devices table{display:block;max-width:100%;overflow-x:auto;border-collapse:collapse}
.gpumem-devices td,.gpumem-devices th{padding:1px 10px 1px 0;text-align:left;vertical-align:top}
.gpumem-devices td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.gpumem-devices .gpumem-minibar{display:block;width:100%;min-width:48px;max-width:120px;height:7px;
 margin:1px 0 2px;border:1px solid var(--jp-border-color1,#bbb);border-radius:2px;overflow:hidden;
 box-sizing:border-box}
.gpumem-devices .gpumem-minibar span{display:block;height:100%;background:#2f6fbf}
.gpumem-devices tr.gpumem-oom td{font-weight:600}
.gpumem-devices tr.gpumem-oom .gpumem-minibar span{background:#c0392b}
"""
OOM_MARK = "◀ this OOM"


def _used(d: MemorySnapshot) -> int | None:
    return d.used_bytes if d.used_bytes is not None else d.reserved_bytes


def device_rows(d: Diagnosis) -> list[tuple[str, str, str, str, bool]]:
    """(GPU, used, free, total, is the OOM's) for each visible GPU; [] with fewer than two."""
    snap = d.snapshot
    if snap is None or len(snap.all_devices) < 2:
        return []
    oom = d.report.device_index if d.report.device_index is not None else snap.device_index
    rows = []
    for dev in snap.all_devices:
        used, total = _used(dev), dev.total_bytes
        free = dev.free_bytes
        if free is None and used is not None and total is not None:
            free = max(total - used, 0)
        rows.append(
            (
                f"GPU {dev.device_index}",
                format_bytes(used),
                format_bytes(free),
                format_bytes(total),
                dev.device_index == oom,
            )
        )
    return rows


def devices_html(d: Diagnosis) -> str:
    """The table of every GPU (empty with one)."""
    rows = device_rows(d)
    snap = d.snapshot
    if not rows or snap is None:
        return ""
    body = []
    for dev, (name, used, free, total, oom) in zip(snap.all_devices, rows, strict=True):
        u, t = _used(dev), dev.total_bytes
        share = 100 * min(u / t, 1.0) if u is not None and t else 0.0
        bar = (
            f'<span class="gpumem-minibar" aria-hidden="true">'
            f'<span style="width:{share:.1f}%"></span></span>'
        )
        mark = f" {OOM_MARK}" if oom else ""
        body.append(
            f'<tr class="{"gpumem-oom" if oom else ""}"><td>{escape(name)}{mark}{bar}</td>'
            f'<td class="num">{escape(used)}</td><td class="num">{escape(free)}</td>'
            f'<td class="num">{escape(total)}</td></tr>'
        )
    return (
        f'<div class="gpumem-devices" role="group" aria-label="Every visible GPU">'
        f"<b>{len(rows)} GPUs visible</b><table><tr><th>GPU</th><th>used</th><th>free</th>"
        f"<th>total</th></tr>{''.join(body)}</table></div>"
    )
