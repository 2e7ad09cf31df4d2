"""The diagnosis panel: numbers, a breakdown chart, causes, holders, and the fix buttons.

A click runs while the kernel is idle (clicks reach the kernel on the shell channel, between cells):
a status line while the fix runs, the cell's output inside the panel, then the outcome with the
measured peak. A second OOM replaces the panel's content with the new diagnosis, so there is never
a stack of panels.
"""

from __future__ import annotations

from collections.abc import Callable
from html import escape
from typing import Any

import ipywidgets as W
import plotly.graph_objects as go

from ..diagnosis import Diagnosis
from ..failure import FailedCell
from ..fixes import FIXES, Attempt, Check, FixOutcome
from ..render import _md_code, render_html
from ..rescue import Options, apply_fix, check_all, guard
from ..units import GiB, format_bytes

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
_STYLE = """<style>
.gpumem-panel .gpumem-status{font-size:13px;padding:2px 0}
.gpumem-panel .gpumem-ok{border-left:4px solid var(--jp-success-color1,#2e7d32);padding-left:8px}
.gpumem-panel .gpumem-bad{border-left:4px solid var(--jp-error-color1,#c62828);padding-left:8px}
.gpumem-panel .gpumem-ask{border-left:4px solid var(--jp-warn-color1,#c77c02);padding-left:8px}
.gpumem-panel .gpumem-why{font-size:12px;color:var(--jp-ui-font-color2,#666)}
.gpumem-panel code{background:var(--jp-layout-color2,rgba(127,127,127,.15));padding:0 3px}
.gpumem-panel .js-plotly-plot .legendtext{fill:var(--jp-ui-font-color1,#555)!important}
.gpumem-panel .js-plotly-plot :is(.xtick,.ytick) text{fill:var(--jp-ui-font-color2,#666)!important}
</style>"""


def breakdown_figure(d: Diagnosis, width: int = 640) -> go.FigureWidget:
    """One horizontal stacked bar: where every byte of the card was at the failure."""
    fig = go.Figure()
    for s in d.breakdown:
        if s.bytes <= 0:
            continue
        fig.add_trace(
            go.Bar(
                x=[s.bytes / GiB],
                y=["memory"],
                orientation="h",
                name=f"{s.label} {format_bytes(s.bytes)}",
                marker={"color": SLICE_COLORS.get(s.label, "#888"), "line": {"width": 0}},
                hovertemplate=f"{escape(s.label)}: {format_bytes(s.bytes)}<extra></extra>",
            )
        )
    if d.requested_bytes:
        fig.add_trace(
            go.Bar(
                x=[d.requested_bytes / GiB],
                y=["requested"],
                orientation="h",
                name=f"requested {format_bytes(d.requested_bytes)}",
                marker={"color": "rgba(192,57,43,0.35)", "pattern": {"shape": "/"}},
                hovertemplate=f"requested: {format_bytes(d.requested_bytes)}<extra></extra>",
            )
        )
    fig.update_layout(
        barmode="stack",
        width=width,
        height=190,
        margin={"l": 70, "r": 10, "t": 10, "b": 30},
        # "normal": the legend reads in the bar's order (plotly reverses stacked bars' by default)
        legend={"orientation": "h", "y": -0.35, "font": {"size": 10}, "traceorder": "normal"},
        xaxis={"ticksuffix": " GiB", "rangemode": "tozero", "gridcolor": "rgba(127,127,127,0.25)"},
        paper_bgcolor="rgba(0,0,0,0)",
        plot_bgcolor="rgba(0,0,0,0)",
        font={"size": 11, "color": "#8c8c8c"},  # readable on light and dark themes
    )
    fig.update_xaxes(fixedrange=True)  # a picture, not an explorer: no drag-zoom
    fig.update_yaxes(fixedrange=True)
    widget = go.FigureWidget(fig)
    # no plotly toolbar: ten zoom/pan/share buttons would come before the fixes in the Tab order
    widget._config = {**widget._config, "displayModeBar": False}
    return widget


def _button_text(fix_label: str, check: Check) -> str:
    if check.applies and check.predicted_saving_bytes:
        return f"{fix_label} (~{format_bytes(check.predicted_saving_bytes)})"
    return fix_label


class DiagnosisPanel:
    """``DiagnosisPanel(ext, failed).widget`` is shown under the failed cell's traceback."""

    def __init__(self, ext: Any, failed: FailedCell) -> None:
        self.ext = ext
        self.shell = ext.shell
        self.body = W.VBox()
        self.widget = W.VBox([W.HTML(_STYLE), self.body], layout=W.Layout(width="100%"))
        self.widget.add_class("gpumem-panel")
        self.buttons: dict[str, W.Button] = {}
        self.status = W.HTML()
        self.status.add_class("gpumem-status")
        self.output = W.Output(layout=W.Layout(max_height="320px", overflow="auto"))
        self.confirm_box = W.VBox()
        self.log: list[str] = []
        self.outcomes: list[FixOutcome] = []
        self.busy = False
        self.show(failed)

    # ---- content ---------------------------------------------------------------------------------

    def show(self, failed: FailedCell) -> None:
        """(Re)draw for a failure: the first one, or the OOM of a fix that did not fit."""
        self.failed = failed
        d = failed.diagnosis
        assert d is not None
        self.checks = check_all(self.shell, failed, Options(), self.ext.remembered)
        html = W.HTML(render_html(d))
        parts: list[W.Widget] = [html]
        if d.breakdown:
            try:
                parts.append(breakdown_figure(d))
            except Exception:  # the chart is a view; the numbers are in the HTML anyway
                pass
        rows = []
        self.buttons = {}
        for key, fix in FIXES.items():
            check = self.checks[key]
            b = W.Button(
                description=_button_text(fix.label, check),
                tooltip=check.action if check.applies else f"Not available: {check.reason}",
                disabled=not check.applies,
                layout=W.Layout(width="auto"),
                button_style="primary" if key == self._recommended() else "",
            )
            b.on_click(lambda _b, k=key: self.click(k))
            self.buttons[key] = b
            rows.append(b)
        why = [
            f"<b>{escape(FIXES[k].label)}</b> not available: {_md_code(c.reason)}"
            for k, c in self.checks.items()
            if not c.applies
        ]
        parts.append(W.HBox(rows, layout=W.Layout(flex_flow="row wrap")))
        if why:
            parts.append(W.HTML(f"<div class='gpumem-why'>{'<br>'.join(why)}</div>"))
        parts += [self.confirm_box, self.status, self.output]
        self.body.children = tuple(parts)

    def _recommended(self) -> str | None:
        d = self.failed.diagnosis
        if d is None:
            return None
        top = d.causes[0].key if d.causes else ""
        order = ["clear"] if top in ("old_variables", "fragmentation", "output_cache") else []
        order += ["batch", "autocast", "clear", "cpu"]
        return next((k for k in order if self.checks.get(k, Check(False, "")).applies), None)

    def set_status(self, html: str, kind: str = "") -> None:
        self.status.value = f"<div class='gpumem-{kind}'>{html}</div>" if kind else html

    # ---- clicks ----------------------------------------------------------------------------------

    def click(self, key: str, *, force: bool = False) -> FixOutcome | None:
        """What a button does (also callable from tests, as the browser's click is)."""
        if self.busy:
            return None
        verdict = guard(self.failed)
        if not verdict.safe and not force:
            self.ask(key, verdict.summary(), verdict.question())
            return None
        self.confirm_box.children = ()
        return self.run(key)

    def ask(self, key: str, summary: str, question: str) -> None:
        yes = W.Button(description="Re-run anyway", button_style="warning")
        no = W.Button(description="Cancel")
        yes.on_click(lambda _b: self.click(key, force=True))
        no.on_click(lambda _b: self._cancel())
        self.confirm_box.children = (
            W.HTML(f"<div class='gpumem-ask'>⚠ {_md_code(summary)}<br>{_md_code(question)}</div>"),
            W.HBox([yes, no]),
        )

    def _cancel(self) -> None:
        self.confirm_box.children = ()
        self.set_status("Not re-run.")

    def _on_attempt(self, a: Attempt) -> None:
        self.log.append(a.line())
        self.set_status(
            f"Running <b>{escape(FIXES[a.fix].label)}</b>…<pre>{escape(chr(10).join(self.log))}</pre>"
        )

    def run(self, key: str) -> FixOutcome:
        fix = FIXES[key]
        self.busy = True
        self.log = []
        for b in self.buttons.values():
            b.disabled = True
        self.set_status(f"Running <b>{escape(fix.label)}</b>: {_md_code(self.checks[key].action)}")
        self.output.clear_output()
        outcome: FixOutcome
        try:
            with self.output:
                outcome = apply_fix(
                    self.shell,
                    self.failed,
                    key,
                    Options(force=True),
                    self.ext.remembered,
                    on_attempt=self._on_attempt,
                )
        except Exception as exc:  # the cell's own non-OOM error: shown as the cell would show it
            with self.output:
                self.shell.showtraceback()
            self.set_status(
                f"✗ The re-run raised {escape(type(exc).__name__)}: {escape(str(exc)[:200])}", "bad"
            )
            self._enable()
            return FixOutcome(fix=key, ok=False, message=str(exc))
        finally:
            self.busy = False
        self.outcomes.append(outcome)
        if outcome.ok:
            self._success(outcome)
        elif outcome.failure is not None and outcome.failure.diagnosis is not None:
            self.ext.hook.last_failure = outcome.failure
            self.show(outcome.failure)
            self.set_status(
                f"✗ {escape(fix.label)}: {_md_code(outcome.message)} The new diagnosis is above.",
                "bad",
            )
        else:
            self._enable()
            self.set_status(f"✗ {_md_code(outcome.message)}", "bad")
        return outcome

    def _enable(self) -> None:
        for key, b in self.buttons.items():
            b.disabled = not self.checks[key].applies

    def _success(self, o: FixOutcome) -> None:
        lines = [f"✓ <b>{_md_code(o.message)}</b>"]
        if o.change:
            lines.append(f"To make it permanent: {_md_code(o.change)}")
        if o.predicted_saving_bytes is not None and o.peak_bytes is not None:
            lines.append(
                f"Predicted saving ~{format_bytes(o.predicted_saving_bytes)}; "
                f"measured peak {format_bytes(o.peak_bytes)}."
            )
        lines += [_md_code(n) for n in o.notes]
        if self.log:
            lines.append(f"<pre>{escape(chr(10).join(self.log))}</pre>")
        self.set_status("<br>".join(lines), "ok")
        for b in self.buttons.values():
            b.disabled = True


def show_panel(
    ext: Any, failed: FailedCell, display: Callable[..., Any], text: str
) -> DiagnosisPanel:
    """Display the panel with the text and HTML diagnosis beside it in the same output, so a
    front end without widgets (nbconvert, a saved notebook on GitHub) still shows the diagnosis."""
    panel = DiagnosisPanel(ext, failed)
    bundle = dict(panel.widget._repr_mimebundle_() or {})
    bundle["text/plain"] = text
    assert failed.diagnosis is not None
    bundle["text/html"] = render_html(failed.diagnosis)
    display(bundle, raw=True)
    return panel
