"""The diagnosis panel: numbers, a breakdown chart, causes, holders, and the fix buttons.

A click runs while the kernel is idle (clicks reach the kernel on the shell channel, between cells):
a status line while the fix runs, with a Cancel button that interrupts the kernel from the browser
(``status.py``: no comm message reaches a kernel busy with the fix), the cell's output inside the
panel, then the outcome with the measured peak. A second OOM replaces the panel's content with the new diagnosis, so there is never
a stack of panels. Every click ends with a status line and usable buttons, whatever happened: an
interrupt (Ctrl-C, the kernel's stop button) says what was undone, the cell's own error shows as
the cell would show it, and an error of ours is one line. A click on a panel whose failure is no
longer the latest, or after other cells ran, asks first.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from html import escape
from typing import Any

import ipywidgets as W

from jupyter_gpumem import backends
from jupyter_gpumem.cells.failure import FailedCell
from jupyter_gpumem.diagnosis.display import for_display
from jupyter_gpumem.diagnosis.model import Diagnosis
from jupyter_gpumem.diagnosis.render import md_code, render_html
from jupyter_gpumem.fixes import FIXES, Attempt, Check, FixOutcome
from jupyter_gpumem.fixes.ask import question_before_rerun
from jupyter_gpumem.fixes.ladder import Options, apply_fix, check_all, error_line
from jupyter_gpumem.readings.kernels import own_kernel_id
from jupyter_gpumem.ui import chart, devices, wording
from jupyter_gpumem.ui.allocations import AllocatedBy
from jupyter_gpumem.ui.others import Lookups, OtherKernels, kernels_to_offer
from jupyter_gpumem.ui.panel_style import STYLE
from jupyter_gpumem.ui.status import StatusLine, Ticker, interruptible


class DiagnosisPanel:
    """``DiagnosisPanel(ext, failed).widget`` is shown under the failed cell's traceback.

    ``checks`` are the fixes' checks for ``failed`` when the caller already ran them (the
    extension does, for the text diagnosis): each fix's check runs once per OOM. Without them the
    panel runs the checks itself."""

    # a running fix's elapsed time: redrawn every tick_seconds, measured with clock
    tick_seconds = 1.0
    clock: Callable[[], float] = staticmethod(time.monotonic)

    def __init__(
        self, ext: Any, failed: FailedCell, checks: dict[str, Check] | None = None
    ) -> None:
        self.ext = ext
        self.shell = ext.shell
        self.body = W.VBox(layout=W.Layout(width="100%", min_width="0"))
        self.widget = W.VBox([self.body], layout=W.Layout(width="100%"))
        self.widget.add_class("gpumem-panel")
        self.buttons: dict[str, W.Button] = {}
        self.status = StatusLine(kernel_id=own_kernel_id() or "", reveal=True)
        self.status.add_class("gpumem-status")
        self.output = W.Output(layout=W.Layout(max_height="320px", overflow="auto"))
        self.confirm_box = W.VBox()
        self.log: list[str] = []
        self.outcomes: list[FixOutcome] = []
        self.busy = False
        # the output the panel was displayed in (a DisplayHandle) and what it reads without
        # widgets: a panel retired by a newer one, or by unload, becomes that, and closes
        self.handle: Any = None
        self.static: dict[str, str] = {}
        self.retired = ""
        self._running, self._t0 = "", self.clock()  # the fix in progress, since when
        self.kernels = Lookups()  # what the Jupyter servers said of each pid, asked once
        self.show(failed, checks)

    # ---- content ---------------------------------------------------------------------------------

    def show(self, failed: FailedCell, checks: dict[str, Check] | None = None) -> None:
        """(Re)draw for a failure: the first one, or the OOM of a fix that did not fit.

        ``checks``: the fixes' checks for this failure if already run, else they run here."""
        self.failed = failed
        d = failed.diagnosis
        assert d is not None
        if checks is None:
            checks = check_all(self.shell, failed, Options(), self.ext.remembered)
        self.checks = checks
        shown, folded = for_display(d)
        self.allocations = AllocatedBy(d, self.shell, self.set_status)
        if d.allocated_lines:  # the table below says it with numbers and bars
            shown = replace(shown, allocated_by=[])
        head, rest = wording.split_headline(
            wording.diagnosis_html(render_html(shown), d.report.backend == "CPU")
        )
        # the answer first: the headline, the fixes and how the last click ended; then why
        self.details = W.HTML(
            rest + devices.devices_html(d) + chart.breakdown_html(d) + wording.folded_html(folded)
        )
        short = d.shortfall_bytes
        parts: list[W.Widget] = [W.HTML(STYLE + head), self._buttons(short)]
        self.others = self._others(d)
        if self.others is not None:
            parts.append(self.others.widget)
        parts += [W.HTML(self._help_html(short)), self.confirm_box, self.status, self.output]
        parts.append(self.details)
        if self.allocations.widget is not None:
            parts.append(self.allocations.widget)
        self.body.children = tuple(parts)

    def _buttons(self, short: int | None) -> W.Widget:
        """The fixes' buttons, the recommended one primary; each says what it saves."""
        primary = self._recommended()
        self.buttons = {}
        for key, fix in FIXES.items():
            check = self.checks[key]
            b = W.Button(
                description=wording.button_text(fix.label, check, short, key),
                tooltip=self._tooltip(fix.label, check, short),
                disabled=not check.applies,
                layout=W.Layout(width="auto"),
                button_style="primary" if key == primary else "",
            )
            b.on_click(lambda _b, k=key: self.click(k))
            self.buttons[key] = b
        box = W.HBox(list(self.buttons.values()), layout=W.Layout(flex_flow="row wrap"))
        box.add_class("gpumem-buttons")
        return box

    def _others(self, d: Diagnosis) -> OtherKernels | None:
        """ "Shut down the kernel of X" for each other notebook's kernel holding memory here."""
        try:
            offers = kernels_to_offer(d, self.kernels)
        except Exception:  # an offer, never a reason to lose the panel
            return None
        return OtherKernels(offers, self.confirm_box, self.set_status) if offers else None

    def _tooltip(self, label: str, check: Check, short: int | None) -> str:
        if not check.applies:
            return f"Not available: {check.reason}"
        note = wording.shortfall_note(check, short)
        return f"{check.action} ({note})" if note else check.action

    def _help_html(self, short: int | None) -> str:
        """What each button does, in the page and not only in a tooltip: the reasons a fix is
        unavailable in sight, the rest one click away (keyboard and screen readers included)."""
        why = [
            f"<b>{escape(FIXES[k].label)}</b> not available: {md_code(c.reason)}"
            for k, c in self.checks.items()
            if not c.applies
        ]
        items = []
        for k, c in self.checks.items():
            if not c.applies:
                continue
            note = wording.shortfall_note(c, short)
            items.append(
                f"<dt><b>{escape(FIXES[k].label)}</b></dt><dd>{md_code(c.action)}"
                + (f" <i>{escape(wording.sentence(note))}.</i>" if note else "")
                + "</dd>"
            )
        html = "<br>".join(why)
        if items:
            html += (
                "<details><summary>What each button does</summary>"
                f"<dl>{''.join(items)}</dl></details>"
            )
        return f"<div class='gpumem-why'>{html}</div>"

    def _recommended(self) -> str | None:
        d = self.failed.diagnosis
        if d is None:
            return None
        top = d.causes[0].key if d.causes else ""
        return wording.recommended(self.checks, top, d.shortfall_bytes)

    def set_status(self, html: str, kind: str = "", *, announce: bool = True) -> None:
        """Show ``html``; a screen reader hears its text once (``announce``), a tick never."""
        self.status.value = f"<div class='gpumem-{kind}'>{html}</div>" if kind else html
        if announce:
            self.status.announce = wording.plain(html)

    # ---- clicks ----------------------------------------------------------------------------------

    def retire(self, why: str) -> int:
        """Replace the panel in its output by the diagnosis as HTML and text, with ``why`` (a
        newer panel, the extension unloaded), and close its widgets, so that OOM after OOM the
        kernel does not keep a growing set of live widgets; how many widgets were closed."""
        if self.retired:
            return 0
        self.retired = why
        if self.handle is not None and self.static:
            note = f"<p><i>{escape(why)}</i></p>"
            try:
                self.handle.update(
                    {
                        "text/plain": self.static["text/plain"] + "\n" + why,
                        "text/html": self.static["text/html"] + note,
                    },
                    raw=True,
                )
            except Exception:
                pass
        return _close_tree(self.widget)

    def click(self, key: str, *, force: bool = False) -> FixOutcome | None:
        """What a button does (also callable from tests, as the browser's click is). Returns
        the outcome, or None when it asked first or the fix was handed to the kernel's main
        thread (``status.interruptible``: where Cancel and ■ can stop it)."""
        if self.busy:
            return None
        if self.retired or not getattr(self.ext, "loaded", True):
            self.set_status(
                escape(self.retired or "jupyter_gpumem is not loaded in this kernel any more")
                + ": this panel's buttons do nothing (`%load_ext jupyter_gpumem`, then re-run "
                "the cell, for a live one).",
                "bad",
            )
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
        ran: list[FixOutcome] = []

        def work() -> None:
            try:
                ran.append(self.run(key))
            finally:
                self.busy = False

        self.busy = True  # until the fix ends, wherever it runs: another click does nothing
        try:
            interruptible(self.shell, work)
        except BaseException:
            self.busy = False
            raise
        return ran[0] if ran else None

    def _ask_first(self, key: str) -> bool:
        """Ask before a re-run that may not be what the user expects; whether it asked."""
        asked = question_before_rerun(self.shell, self.failed, self.ext.hook.last_failure)
        if asked is None:
            return False
        self.ask(key, *asked)
        return True

    def ask(self, key: str, summary: str, question: str) -> None:
        yes = W.Button(description="Re-run anyway", button_style="warning")
        no = W.Button(description="Don't re-run")  # "Cancel" stops a running fix
        yes.on_click(lambda _b: self.click(key, force=True))
        no.on_click(lambda _b: self._cancel())
        self._before_ask = self.status.value
        self.confirm_box.children = (
            W.HTML(f"<div class='gpumem-ask'>⚠ {md_code(summary)}<br>{md_code(question)}</div>"),
            W.HBox([yes, no]),
        )

    def _cancel(self) -> None:
        """Declined: the question goes, and the status says again what it said before."""
        self.confirm_box.children = ()
        self.status.value = getattr(self, "_before_ask", "") or "Not re-run."
        self.status.announce = "Not re-run."
        self.status.focus += 1

    def _on_attempt(self, a: Attempt) -> None:
        self.log.append(wording.attempt_line(a))
        self._progress(self.clock() - self._t0)

    def _progress(self, elapsed: float) -> None:
        """The running fix: which attempt, how long so far, what is done, how to stop it."""
        n = len(self.log) + 1
        done = f"<pre>{escape(chr(10).join(self.log))}</pre>" if self.log else ""
        how = "click Cancel or interrupt" if self.status.kernel_id else "interrupt"
        self.set_status(
            f"Running <b>{escape(self._running)}</b>: attempt {n} in progress, "
            f"{elapsed:.0f} s so far.{done}<br><span class='gpumem-why'>To stop it, {how} "
            "the kernel (■ in the toolbar): what the re-run changed is put back.</span>",
            "run",
            announce=False,
        )
        if self.status.announce != f"{self._running}: attempt {n}.":  # a change, not a second
            self.status.announce = f"{self._running}: attempt {n}."

    def run(self, key: str) -> FixOutcome:
        """Apply one fix. Always ends with a status line and the buttons usable again."""
        fix = FIXES[key]
        self._begin(fix.label)
        outcome = FixOutcome(fix=key, ok=False, message="")
        ended: FixOutcome | None = None  # what the fix returned, should Cancel come after it
        ticker = Ticker(self._progress, self.tick_seconds, self.clock)
        try:
            self.set_status(
                f"Running <b>{escape(fix.label)}</b>: {md_code(self.checks[key].action)}", "run"
            )
            self.output.clear_output()
            ticker.start()
            # a button's callback may run on another thread than the one that started the
            # simulated GPU (torch's modes are per thread): the re-run must see the same card
            with backends.active().on_this_thread():
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
                        ended = outcome
                    except BaseException as exc:  # Output's __exit__ would print and swallow it
                        raised = exc
                ticker.stop()  # before the outcome, so no tick overwrites it
                if raised is not None:
                    try:
                        raise raised
                    finally:  # not kept in this frame: its traceback holds the frame (a cycle)
                        raised = None
                self.outcomes.append(outcome)
                self._report(fix.label, outcome)
        except KeyboardInterrupt as exc:  # Cancel or ■: the engine undid what it could, says what
            ticker.stop()
            outcome = self._interrupted(key, fix.label, ended, exc)
        except BaseException as exc:  # never a traceback of ours, never a panel left busy
            ticker.stop()
            outcome = FixOutcome(fix=key, ok=False, message=f"{type(exc).__name__}: {exc}")
            self._report_error(fix.label, exc)
        finally:
            ticker.stop()
            self.status.running = False
            self.busy = False
            self._enable()
            self.status.focus += 1  # the page puts the focus on the result, if it was ours
        return outcome

    def _begin(self, label: str) -> None:
        """The panel busy with ``label``: buttons off, the log empty, the browser shows Cancel."""
        self.busy = True
        self.log = []
        self.confirm_box.children = ()
        for b in self.buttons.values():
            b.disabled = True
        self._running, self._t0 = label, self.clock()
        self.status.running = True

    def _interrupted(
        self, key: str, label: str, ended: FixOutcome | None, exc: KeyboardInterrupt
    ) -> FixOutcome:
        """The outcome of an interrupted click: "cancelled", unless the interrupt came after the
        fix had ended (Cancel is a click in the page and may arrive late): that result stands."""
        if ended is not None:
            if not self.outcomes or self.outcomes[-1] is not ended:
                self.outcomes.append(ended)
            self._report(label, ended)
            return ended
        self.set_status(f"✗ {md_code(wording.cancelled_line(exc))}", "ask")
        return FixOutcome(fix=key, ok=False, message="cancelled")

    def _report(self, label: str, outcome: FixOutcome) -> None:
        if outcome.ok:
            self._success(outcome)
        elif outcome.failure is not None and outcome.failure.diagnosis is not None:
            self.ext.hook.last_failure = outcome.failure
            self.show(outcome.failure)
            predicted = wording.prediction_note(outcome)  # what the fix predicted, beside it
            self.set_status(
                f"✗ {escape(label)}: {md_code(outcome.message)} The panel now shows the new diagnosis."
                + (f"<br>{md_code(predicted)}" if predicted else ""),
                "bad",
            )
        else:
            self.set_status(f"✗ {md_code(outcome.message)}", "bad")

    def _report_error(self, label: str, exc: BaseException) -> None:
        with self.output:  # a re-run's own error is shown as the cell would show it, above
            line = error_line(self.shell, label, exc)
        self.set_status(escape(line), "bad")

    def _enable(self) -> None:
        for key, b in self.buttons.items():
            b.disabled = not self.checks[key].applies

    def _success(self, o: FixOutcome) -> None:
        lines = [f"✓ <b>{md_code(o.message)}</b>"]
        if o.change:
            lines.append(f"To make it permanent: {md_code(o.change)}")
        measured = wording.measured_line(o)
        if measured:
            lines.append(escape(measured))
        lines += [md_code(n) for n in wording.unique_notes(o.notes)]
        if self.log:
            lines.append(f"<pre>{escape(chr(10).join(self.log))}</pre>")
        lines.append(
            "<span class='gpumem-why'>Its results are in the notebook now. Another button would "
            "run the cell again, as it was, with that fix instead.</span>"
        )
        self.set_status("<br>".join(lines), "ok")
        try:  # JupyterLab with the jupyter-gpumem extension draws an "Apply to cell" button
            offer = self.ext.apply_offer(self.failed, o)
            if offer is not None:
                from IPython.display import display

                with self.output:
                    display(offer, raw=True)
        except Exception:
            pass  # an offer, never a reason to spoil the success


def show_panel(
    ext: Any,
    failed: FailedCell,
    display: Callable[..., Any],
    text: str,
    checks: dict[str, Check] | None = None,
) -> DiagnosisPanel:
    """Display the panel with the text and HTML diagnosis beside it in the same output, so a
    front end without widgets (nbconvert, a saved notebook on GitHub) still shows the diagnosis.
    ``checks``: the ones the text was written from, so the fixes are not checked again."""
    panel = DiagnosisPanel(ext, failed, checks)
    bundle = dict(panel.widget._repr_mimebundle_() or {})
    bundle["text/plain"] = text
    assert failed.diagnosis is not None
    bundle["text/html"] = render_html(failed.diagnosis)
    panel.static = {"text/plain": text, "text/html": bundle["text/html"]}
    try:
        panel.handle = display(bundle, raw=True, display_id=True)
    except TypeError:  # a display without display ids (a test's stand-in)
        display(bundle, raw=True)
    return panel


def _close_tree(widget: Any) -> int:
    """Close a widget, every widget inside it, and their layout and style widgets (each a
    widget of its own, with its own comm); how many were closed."""
    closed = sum(_close_tree(child) for child in getattr(widget, "children", ()) or ())
    for part in (getattr(widget, "layout", None), getattr(widget, "style", None)):
        if isinstance(part, W.Widget) and part.comm is not None:
            try:
                part.close()
                closed += 1
            except Exception:
                pass
    try:
        widget.close()
    except Exception:
        return closed
    return closed + 1
