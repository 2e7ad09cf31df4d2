"""The breakdown chart: one stacked bar of the card at the failure, in HTML and CSS.

No plotly: a FigureWidget costs 2-4 s to create in a fresh kernel and the browser then loads
plotly's bundle, all before the panel can show. A stacked bar is a row of divs whose widths are
percentages, so it sizes to its container at any width, and its labels use the same units as the
text around it (``format_bytes``).
"""

from __future__ import annotations

from html import escape

from jupyter_gpumem.diagnosis.model import Diagnosis, Slice
from jupyter_gpumem.units import format_bytes

SLICE_COLORS = {
    "weights": "#2f6fbf",
    "gradients": "#5b8fd6",
    "optimizer state": "#86aee6",
    "variables": "#7a5cc4",
    "output cache": "#a58be0",
    "failed frames": "#c0392b",
    "activations and other tensors": "#3fa08a",
    "allocator cache": "#9cc3f0",
    "CUDA context (non-PyTorch)": "#999999",
    "other processes": "#d98b2b",
    "free": "rgba(127,127,127,0.18)",
}
REQUESTED_COLOR = (
    "repeating-linear-gradient(45deg,rgba(192,57,43,.55) 0 4px,rgba(192,57,43,.2) 4px 8px)"
)

CSS = """
.gpumem-chart{margin:6px 0 8px;max-width:100%;font-size:12px;color:var(--jp-ui-font-color1,#222)}
.gpumem-chart .gpumem-row{display:flex;align-items:center;gap:6px;margin:2px 0}
.gpumem-chart .gpumem-rowlabel{flex:0 0 7.5em;color:var(--jp-ui-font-color1,#222)}
.gpumem-chart .gpumem-bar{flex:1 1 auto;min-width:0;display:flex;height:18px;
 border:1px solid var(--jp-border-color1,#bbb);border-radius:2px;overflow:hidden}
.gpumem-chart .gpumem-seg{height:100%;min-width:1px}
.gpumem-chart .gpumem-scale{display:flex;justify-content:space-between;margin-left:calc(7.5em + 6px);
 color:var(--jp-ui-font-color1,#222)}
.gpumem-chart ul{list-style:none;display:flex;flex-wrap:wrap;gap:2px 14px;margin:4px 0 0;padding:0}
.gpumem-chart li{display:flex;align-items:center;gap:5px;min-width:0}
.gpumem-chart .gpumem-swatch{flex:0 0 11px;height:11px;border:1px solid rgba(127,127,127,.5)}
"""


def slice_label(d: Diagnosis, s: Slice) -> str:
    """A slice's name with its size; the failed frames say they were freed after the failure."""
    text = f"{s.label} {format_bytes(s.bytes)}"
    if s.label == "failed frames" and d.released:
        text += " at the failure (freed since)"
    return text


def _segment(color: str, share: float, label: str) -> str:
    return (
        f'<div class="gpumem-seg" style="width:{share:.3f}%;background:{color}" '
        f'title="{escape(label)}"></div>'
    )


def breakdown_html(d: Diagnosis) -> str:
    """The card at the failure as one bar, the request beside it on the same scale, a legend."""
    slices = [s for s in d.breakdown if s.bytes > 0]
    if not slices:
        return ""
    card = sum(s.bytes for s in slices)
    scale = max(card, d.requested_bytes or 0)
    segs = "".join(
        _segment(SLICE_COLORS.get(s.label, "#888"), 100 * s.bytes / scale, slice_label(d, s))
        for s in slices
    )
    rows = [
        '<div class="gpumem-row" aria-hidden="true"><span class="gpumem-rowlabel">'
        f'at the failure</span><div class="gpumem-bar">{segs}</div></div>'
    ]
    legend = [
        f'<li><span class="gpumem-swatch" style="background:{SLICE_COLORS.get(s.label, "#888")}">'
        f"</span>{escape(slice_label(d, s))}</li>"
        for s in slices
    ]
    if d.requested_bytes:
        req = f"requested {format_bytes(d.requested_bytes)}"
        rows.append(
            '<div class="gpumem-row" aria-hidden="true"><span class="gpumem-rowlabel">'
            f'requested</span><div class="gpumem-bar" style="border-color:transparent">'
            f"{_segment(REQUESTED_COLOR, 100 * d.requested_bytes / scale, req)}</div></div>"
        )
        legend.append(
            f'<li><span class="gpumem-swatch" style="background:{REQUESTED_COLOR}"></span>'
            f"{escape(req)}</li>"
        )
    rows.append(
        '<div class="gpumem-scale" aria-hidden="true">'
        f"<span>0</span><span>{escape(format_bytes(scale))}</span></div>"
    )
    return (
        f'<figure class="gpumem-chart" role="group" aria-label="Where the '
        f'{escape(format_bytes(card))} of the card were at the failure">'
        + "".join(rows)
        + f"<ul>{''.join(legend)}</ul></figure>"
    )
