"""The diagnosis panel: numbers, a breakdown chart, causes, holders, and the fix buttons.

A click runs while the kernel is idle (clicks reach the kernel on the shell channel, between cells):
a status line while the fix runs, the cell's output inside the panel, then the outcome with the
measured peak. A second OOM replaces the panel's content with the new diagnosis, so there is never
a stack of panels. Every click ends with a status line and usable buttons, whatever happened: an
interrupt (Ctrl-C, the kernel's stop button) says what was undone, the cell's own error shows as
the cell would show it, and an error of ours is one line. A click on a panel whose failure is no
longer the latest, or after other cells ran, asks first.
"""

from __future__ import annotations

from collections.abc import Callable
from html import escape
from types import TracebackType
from typing import Any

import ipywidgets as W
import plotly.graph_objects as go
from IPython import version_info as _ipython_version

from ..backends import simulated
from ..diagnosis import Diagnosis
from ..failure import FailedCell
from ..fixes import FIXES, Attempt, Check, FixOutcome
from ..hook import without_dispatch_frames
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


# IPython 9.8 (commit aaa5a45, "execution count more atomic") counts a cell before running it:
# while In [5] runs, and at its pre_run_cell where the hook reads it, execution_count is already 6.
# Before, it was 5 until the cell ended. Between cells it is the next prompt's number either way.
_COUNTED_BEFORE_RUN = tuple(_ipython_version[:2]) >= (9, 8)


def _prompt(execution_count: int | None) -> int | None:
    """The In [N] of a failure, from the execution_count recorded when it failed."""
    if execution_count is None:
        return None
    return execution_count - 1 if _COUNTED_BEFORE_RUN else execution_count


def _span(first: int, last: int) -> str:
    return f"In [{first}]" if first == last else f"In [{first}]..In [{last}]"


def staleness(shell: Any, failed: FailedCell, latest: FailedCell | None) -> str:
    """What changed since ``failed`` (cells that ran, a newer failure); "" when nothing did."""
    now = getattr(shell, "execution_count", None)
    mine = _prompt(failed.execution_count)
    newer = latest is not None and latest is not failed
    newer_at = _prompt(latest.execution_count) if newer and latest is not None else None
    if newer_at is not None and not _is_cell(shell, newer_at, latest):
        newer_at = None  # a fix's re-run failed, not a cell: it has no In [N] of its own
    parts = []
    if isinstance(now, int) and mine is not None and now > mine + 1:
        last = now - 1
        if newer_at == last:  # said on its own below
            last -= 1
        if last > mine:
            n = last - mine
            parts.append(
                f"{n} cell{'s' if n > 1 else ''} ran since this failure ({_span(mine + 1, last)})"
            )
    if newer:
        parts.append(
            f"a newer failure is In [{newer_at}]"
            if newer_at is not None
            else "a newer failure came since (a fix's re-run)"
        )
    return "; ".join(parts)


def _is_cell(shell: Any, prompt: int, failed: FailedCell | None) -> bool:
    """Whether In [prompt] is the failure's own cell (and not a re-run made between cells)."""
    history = getattr(getattr(shell, "history_manager", None), "input_hist_raw", None)
    if failed is None or not history or not 0 < prompt < len(history):
        return False
    return bool(history[prompt].strip() == failed.source.strip())


def _cell_traceback(tb: TracebackType | None, user_ns: dict[str, Any]) -> TracebackType | None:
    """The traceback from the cell's own frame on (None if it never reached the cell): what the
    cell would show, without the re-run machinery above it."""
    while tb is not None and tb.tb_frame.f_globals is not user_ns:
        tb = tb.tb_next
    return tb


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
        if not force:
            try:
                asked = self._ask_first(key)
            except Exception as exc:
                self.set_status(
                    f"jupyter_gpumem: checking the re-run failed "
                    f"({escape(type(exc).__name__)}: {escape(str(exc)[:200])})",
                    "bad",
                )
                return None
            if asked:
                return None
        self.confirm_box.children = ()
        return self.run(key)

    def _ask_first(self, key: str) -> bool:
        """Ask before a re-run that may not be what the user expects; whether it asked."""
        changed = staleness(self.shell, self.failed, self.ext.hook.last_failure)
        verdict = guard(self.failed, self.shell.user_ns)
        if not changed and verdict.safe:
            return False
        summary = " ".join(
            ([f"{changed[0].upper()}{changed[1:]}."] if changed else [])
            + ([verdict.summary()] if not verdict.safe else [])
        )
        question = (
            verdict.question()
            if not verdict.safe
            else "Re-run anyway? The cell would run again on the namespace as it is now."
        )
        self.ask(key, summary, question)
        return True

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
        """Apply one fix. Always ends with a status line and the buttons usable again."""
        fix = FIXES[key]
        self.busy = True
        self.log = []
        self.confirm_box.children = ()
        for b in self.buttons.values():
            b.disabled = True
        outcome = FixOutcome(fix=key, ok=False, message="")
        try:
            self.set_status(
                f"Running <b>{escape(fix.label)}</b>: {_md_code(self.checks[key].action)}"
            )
            self.output.clear_output()
            # a button's callback may run on another thread than the one that started the
            # simulated GPU (torch's modes are per thread): the re-run must see the same card
            with simulated.on_this_thread():
                raised: BaseException | None = None
                with self.output:
                    try:
                        outcome = apply_fix(
                            self.shell,
                            self.failed,
                            key,
                            Options(force=True),
                            self.ext.remembered,
                            on_attempt=self._on_attempt,
                        )
                    except BaseException as exc:  # Output's __exit__ would print and swallow it
                        raised = exc
                if raised is not None:
                    raise raised
                self.outcomes.append(outcome)
                self._report(fix.label, outcome)
        except KeyboardInterrupt as exc:  # Ctrl-C: the engine undid what it could and says what
            undone = str(getattr(exc, "message", "") or "").strip()
            outcome = FixOutcome(fix=key, ok=False, message="interrupted")
            self.set_status(
                f"✗ Interrupted: {_md_code(undone) if undone else 'the re-run was stopped.'}", "bad"
            )
        except BaseException as exc:  # never a traceback of ours, never a panel left busy
            outcome = FixOutcome(fix=key, ok=False, message=f"{type(exc).__name__}: {exc}")
            self._report_error(fix.label, exc)
        finally:
            self.busy = False
            self._enable()
        return outcome

    def _report(self, label: str, outcome: FixOutcome) -> None:
        if outcome.ok:
            self._success(outcome)
        elif outcome.failure is not None and outcome.failure.diagnosis is not None:
            self.ext.hook.last_failure = outcome.failure
            self.show(outcome.failure)
            self.set_status(
                f"✗ {escape(label)}: {_md_code(outcome.message)} The new diagnosis is above.",
                "bad",
            )
        else:
            self.set_status(f"✗ {_md_code(outcome.message)}", "bad")

    def _report_error(self, label: str, exc: BaseException) -> None:
        brief = f"{escape(type(exc).__name__)}: {escape(str(exc)[:200])}"
        tb = _cell_traceback(exc.__traceback__, self.shell.user_ns)
        if tb is None:  # raised by jupyter_gpumem itself: one line, the cell's state is reported
            self.set_status(f"jupyter_gpumem: {escape(label)} failed ({brief})", "bad")
            return
        try:  # the cell's own error: shown as the cell would show it
            with self.output:
                self.shell.showtraceback((type(exc), exc, without_dispatch_frames(tb)), tb_offset=0)
        except Exception:
            pass
        self.set_status(f"✗ The re-run raised {brief}", "bad")

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
        lines.append(
            "<span class='gpumem-why'>Its results are in the notebook now. Another button would "
            "run the cell again, as it was, with that fix instead.</span>"
        )
        self.set_status("<br>".join(lines), "ok")


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
