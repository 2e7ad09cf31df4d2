"""One loaded extension per shell: settings, the hook, the magics, and how a diagnosis is shown."""

from __future__ import annotations

import importlib.util
import sys
from types import MethodType
from typing import Any

from jupyter_gpumem.cells.failure import FailedCell
from jupyter_gpumem.config import GpuMem
from jupyter_gpumem.diagnosis.diagnose import diagnose
from jupyter_gpumem.diagnosis.model import Diagnosis
from jupyter_gpumem.diagnosis.render import render_html, render_text
from jupyter_gpumem.fixes import FIXES, FixOutcome
from jupyter_gpumem.fixes.ladder import Options, check_all
from jupyter_gpumem.frontend import meter
from jupyter_gpumem.ipython.cellstats import CellStats
from jupyter_gpumem.ipython.hook import OOMHook
from jupyter_gpumem.ipython.magics import GpuMemMagics

# `%reload_ext jupyter_gpumem` unloads, then loads again: what the magics started (a simulated GPU,
# a cap) is handed from the one to the other, by shell, instead of being ended in between.
_carried: dict[int, tuple[Any, Any]] = {}


def _reloading() -> bool:
    """Whether this unload is the first half of IPython's ``reload_extension``."""
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_name == "reload_extension" and frame.f_globals.get("__name__", "").startswith(
            "IPython.core.extensions"
        ):
            return True
        frame = frame.f_back  # type: ignore[assignment]
    return False


def fix_lines(checks: dict[str, Any], shortfall_bytes: int | None = None) -> list[str]:
    """One line per fix for the text diagnosis: the command, what it saves, or why it cannot.

    A fix predicted to save less than the allocation was short by says so, in the panel's words.
    """
    from jupyter_gpumem.ui.wording import (
        shortfall_note,  # plain text, no widgets: the panel's one wording
    )

    lines = []
    for key, check in checks.items():
        cmd = f"%gpumem retry {key}"
        if not check.applies:
            lines.append(f"{cmd:<24} {FIXES[key].label}: not available: {check.reason}")
            continue
        note = shortfall_note(check, shortfall_bytes) or check.saving_text
        if key == "cpu" and note == check.saving_text and note:  # may be more than the card
            note = note.replace("saves ~", "takes ~", 1) + " off the GPU"
        lines.append(f"{cmd:<24} {FIXES[key].label}" + (f" ({note})" if note else ""))
    return lines


def display_widget(widget: Any, display: Any) -> None:
    """A widget with a one-line text/plain, not its trait dump, for front ends without widgets."""
    bundle = dict(widget._repr_mimebundle_() or {})
    bundle["text/plain"] = "GPU memory gauge (live; shown where Jupyter widgets are available)"
    display(bundle, raw=True)


class Extension:
    def __init__(self, shell: Any) -> None:
        self.shell = shell
        self.settings = GpuMem(parent=shell)
        self.hook = OOMHook(shell, self.settings)
        self.hook.present = self.present
        self.magics = GpuMemMagics(shell, self)
        self.remembered: dict[str, int] = {}  # cell hash -> batch size that fit
        self._cell_stats: CellStats | None = None  # `%gpumem cells on`
        self.sidebar: Any = None
        self.panel: Any = None  # the last diagnosis panel shown (the one live one)
        self.loaded = False
        self.simulation: Any = None  # the simulated GPU `%gpumem simulate` started, until unload
        # the backend `%gpumem limit` capped: lifted on unload if it still answers (a simulated
        # GPU's cap ends with it)
        self.limited: Any = None

    def widgets_available(self) -> bool:
        """A kernel whose front end can show widgets (ipykernel), not a terminal."""
        if self.settings.display in ("text", "html"):
            return False
        if getattr(self.shell, "kernel", None) is None:
            return False
        return importlib.util.find_spec("ipywidgets") is not None

    def load(self) -> None:
        self.loaded = True
        self.hook.install()
        self.simulation, self.limited = _carried.pop(id(self.shell), (None, None))
        try:
            meter.start(
                self.shell, last_failure=lambda: self.hook.last_failure
            )  # the JupyterLab status-bar meter's samples (a no-op elsewhere)
        except Exception:
            pass
        self.shell.register_magics(self.magics)
        configurables = getattr(self.shell, "configurables", None)
        if isinstance(configurables, list):
            configurables.append(self.settings)  # so `%config GpuMem.gauge_interval = 0.5` works
        if self.settings.sidebar_on_load and self.widgets_available():
            try:
                print(self.open_sidebar())
            except Exception as exc:
                print(f"jupyter_gpumem: could not open the sidebar ({type(exc).__name__}: {exc})")
        self.settings.observe(self._trace_setting, names="trace")
        if self.settings.trace:
            self._trace_when_torch()

    # ---- GpuMem.trace ------------------------------------------------------------------------

    def _trace_setting(self, change: Any) -> None:
        """``%config GpuMem.trace = True/False`` turns tracing on or off, as the magic does."""
        if change["new"]:
            self._trace_when_torch()
        else:
            self._stop_trace()

    def _trace_when_torch(self) -> None:
        """Trace from now on if torch is imported; else from the cell that imports it (we never
        import torch ourselves)."""
        if "torch" in sys.modules:
            self._start_trace()
            return
        events = self.shell.events
        for event in ("pre_run_cell", "post_run_cell"):
            if self._trace_pending not in events.callbacks[event]:
                events.register(event, self._trace_pending)

    def _trace_pending(self, *_: Any) -> None:
        if "torch" not in sys.modules:
            return
        self._forget_trace_pending()
        if self.settings.trace:
            self._start_trace()

    def _forget_trace_pending(self) -> None:
        events = self.shell.events
        for event in ("pre_run_cell", "post_run_cell"):
            if self._trace_pending in events.callbacks[event]:
                events.unregister(event, self._trace_pending)

    def _start_trace(self) -> None:
        from jupyter_gpumem.readings import trace

        try:
            if not trace.active():
                trace.start(shell=self.shell)
        except Exception as exc:  # a setting never breaks loading or a cell
            print(f"jupyter_gpumem: could not start tracing ({type(exc).__name__}: {exc})")

    def unload(self) -> None:
        """Undo everything load and the magics did; each step runs even if one before failed."""
        self.loaded = False
        try:
            self.settings.unobserve(self._trace_setting, names="trace")
        except ValueError:  # never observed (load failed before)
            pass
        for step in (
            self.hook.uninstall,
            self._forget_configurables,
            self._close_widgets,
            self._unregister_magics,
            self._end_simulation,
            self._stop_cell_stats,
            meter.stop,
            self._stop_trace,
        ):
            try:
                step()
            except Exception as exc:
                print(
                    f"jupyter_gpumem: unload: {step.__name__} failed ({type(exc).__name__}: {exc})"
                )

    def _forget_configurables(self) -> None:
        configurables = getattr(self.shell, "configurables", None)
        if isinstance(configurables, list):
            # Magics.__init__ appended the magics; load appended the settings
            configurables[:] = [
                c for c in configurables if c is not self.settings and c is not self.magics
            ]

    def cell_stats(self) -> CellStats:
        if self._cell_stats is None:
            self._cell_stats = CellStats(self.shell)
        return self._cell_stats

    def _stop_cell_stats(self) -> None:
        if self._cell_stats is not None:
            self._cell_stats.stop()

    def _stop_trace(self) -> None:
        self._forget_trace_pending()
        if "jupyter_gpumem.readings.trace" in sys.modules:
            from jupyter_gpumem.readings import trace

            trace.stop()

    def _close_widgets(self) -> None:
        if self.sidebar is not None:
            self.sidebar.close()
            self.sidebar = None
        if self.panel is not None:
            self.panel.retire("jupyter_gpumem was unloaded: this panel's buttons are gone.")
        self.panel = None
        if "jupyter_gpumem.ui.gauge" in sys.modules:
            from jupyter_gpumem.ui.gauge import stop_all

            stop_all()

    def _unregister_magics(self) -> None:
        mm = self.shell.magics_manager
        for kind in ("line", "cell"):
            for name in list(mm.magics[kind]):
                bound = mm.magics[kind][name]
                # isinstance first: reading an attribute of a lazy magic's stand-in loads it
                if isinstance(bound, MethodType) and bound.__self__ is self.magics:
                    del mm.magics[kind][name]
        name = type(self.magics).__name__
        if mm.registry.get(name) is self.magics:
            del mm.registry[name]

    def _end_simulation(self) -> None:
        """Stop the simulated GPU the magics started (one started from Python is the caller's)."""
        from jupyter_gpumem.backends import active, simulation, stop_simulation

        if _reloading():  # the extension loaded next takes them over; the cells go on as they were
            _carried[id(self.shell)] = (self.simulation, self.limited)
            self.simulation = self.limited = None
            return
        if self.simulation is not None and simulation() is self.simulation:
            stop_simulation()  # puts back every torch.cuda function it replaced
        self.simulation = None
        limited, self.limited = self.limited, None
        if limited is not None and limited is active():
            limited.set_limit(None)

    def present(self, failed: FailedCell) -> None:
        """Show the diagnosis of ``failed``: the one ``diagnose`` makes of what was read at the
        failure and what is learnt here (the fixes' checks, the cells that filled the card, a
        ready cell inserted below)."""
        read = failed.diagnosis
        if read is None:
            return
        from IPython.display import display

        if "jupyter_gpumem.ui.gauge" in sys.modules:  # gauges open: mark the device that ran out
            from jupyter_gpumem.ui.gauge import mark_oom

            mark_oom(failed.report.device_index)

        # the one run of the fixes' checks for this OOM: the text's lines and the panel's buttons
        checks = check_all(self.shell, failed, Options(), self.remembered)
        batch = checks.get("batch")
        d = failed.diagnosis = diagnose(
            **read.evidence.arguments(),
            # the number that sized the failing tensors, named in the causes (mnist's test())
            batch=batch.evidence if batch is not None and batch.applies else "",
            notes=self._filled_by(failed),
            insert_cells=self._insert_ready_cell(read),
        )
        text = render_text(d, fix_lines(checks, d.shortfall_bytes))
        if self.widgets_available():
            from jupyter_gpumem.ui.panel import show_panel

            if self.panel is not None:  # one live panel: the newest
                self.panel.retire("A newer out-of-memory diagnosis replaced this panel.")
            self.panel = show_panel(self, failed, display, text, checks)
            return
        if self.settings.display == "text":
            print(text, file=sys.stdout)
            return
        display({"text/plain": text, "text/html": render_html(d)}, raw=True)

    def _filled_by(self, failed: FailedCell) -> list[str]:
        """The cells that filled the card, while `%gpumem cells` records (after `cells off` the
        cells recorded may hold none of this memory)."""
        stats = self._cell_stats
        if stats is None or not stats.active or not stats.records:
            return []
        filled = stats.filled_by(device=failed.report.device_index)
        return [filled] if filled else []

    def _insert_ready_cell(self, d: Diagnosis) -> bool:
        """Insert the ready cell a cause offers (the multi-GPU launch) below the failed one, not
        run, where the front end can: whether it was."""
        ready = next((c.cell for c in d.causes if c.cell), "")
        if not ready or getattr(self.shell, "kernel", None) is None:
            return False
        try:
            self.shell.set_next_input(ready, replace=False)
        except Exception:
            return False
        return True

    def show_gauge(self) -> Any:
        from IPython.display import display

        from jupyter_gpumem.ui.gauge import Gauge

        gauge = Gauge(interval=self.settings.gauge_interval, history_s=self.settings.gauge_history)
        display_widget(gauge.widget, display)
        return gauge.start()

    def open_sidebar(self) -> str:
        from IPython.display import display

        from jupyter_gpumem.ui.sidebar import Sidebar

        if self.sidebar is not None:
            self.sidebar.close()
        self.sidebar = Sidebar(self.settings.gauge_interval, self.settings.gauge_history)
        return self.sidebar.open(lambda w: display_widget(w, display))

    def close_sidebar(self) -> bool:
        if self.sidebar is None:
            return False
        self.sidebar.close()
        self.sidebar = None
        return True

    def apply_offer(self, failed: FailedCell, outcome: FixOutcome) -> dict[str, Any] | None:
        """An "Apply to cell" bundle when the fix's change is one line of the failed cell itself
        (JupyterLab draws it as a button; elsewhere it reads as text); None otherwise."""
        if not (outcome.ok and outcome.change and failed.cell_id and outcome.batch is not None):
            return None
        from jupyter_gpumem.fixes.batch.source import apply_batch, find_batch

        try:
            finding = find_batch(failed.source, self.shell.user_ns)
            new_source, _updates = apply_batch(failed.source, finding, outcome.batch)
        except Exception:
            return None
        old_lines, new_lines = failed.source.splitlines(), new_source.splitlines()
        if len(old_lines) != len(new_lines):
            return None
        changed = [i for i, (a, b) in enumerate(zip(old_lines, new_lines, strict=True)) if a != b]
        if len(changed) != 1:
            return None
        i = changed[0]
        from jupyter_gpumem.frontend.labext import change_bundle

        return change_bundle(failed.cell_id, i + 1, old_lines[i], new_lines[i])

    def report_outcome(self, outcome: FixOutcome, failed: FailedCell | None = None) -> None:
        """The end of a `%gpumem retry`: what happened, what to change, what to know."""
        print(outcome.message)
        if outcome.ok and failed is not None:
            failed.fixed_by = FIXES[outcome.fix].label if outcome.fix in FIXES else outcome.fix
        if outcome.change:
            print(f"To make it permanent: {outcome.change}")
            offer = self.apply_offer(failed, outcome) if failed is not None else None
            if offer is not None:
                from IPython.display import display

                display(offer, raw=True)
        for note in outcome.notes:
            print(f"  note: {note}")
        if outcome.new_source:
            print("\n" + outcome.new_source)
        if not outcome.ok and outcome.failure is not None:
            self.hook.last_failure = outcome.failure
            self.present(outcome.failure)
