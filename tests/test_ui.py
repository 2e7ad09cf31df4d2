"""The panel, gauge and sidebar as widgets (state and text), without a browser.

The panel is built for a real failure in a real InteractiveShell on the simulated GPU; a button's
``click()`` runs the same callback a browser click does.
"""

from __future__ import annotations

import html
import re
import threading
import time
from typing import Any

import pytest

import jupyter_gpumem
from jupyter_gpumem.readings.snapshot import MemorySnapshot
from tests.conftest import extension
from tests.test_fixes import CELL, SETUP

pytest.importorskip("ipywidgets")


@pytest.fixture
def failed(shell: Any) -> Any:
    shell.run_cell("%gpumem simulate 160MiB")
    shell.run_cell(SETUP)
    shell.run_cell(CELL)
    ext = extension(shell)
    assert jupyter_gpumem.last_failure(ext.shell) is not None
    return ext


def _panel(ext: Any) -> Any:
    from jupyter_gpumem.ui.panel import DiagnosisPanel

    return DiagnosisPanel(ext, jupyter_gpumem.last_failure(ext.shell))


def _texts(widget: Any) -> str:
    out = []
    stack = [widget]
    while stack:
        w = stack.pop()
        out.append(str(getattr(w, "value", "")) if hasattr(w, "value") else "")
        out.append(str(getattr(w, "description", "")))
        out.append(str(getattr(w, "tooltip", "") or ""))
        stack.extend(getattr(w, "children", ()))
    return "\n".join(out)


def test_panel_shows_numbers_chart_causes_and_four_buttons(failed: Any) -> None:
    panel = _panel(failed)
    text = _texts(panel.widget)
    assert "GPU out of memory: Tried to allocate" in text
    assert "of 160 MiB" in text
    assert set(panel.buttons) == {"clear", "batch", "autocast", "cpu"}
    labels = [b.description for b in panel.buttons.values()]
    assert labels[0].startswith("Clear cache") and labels[1].startswith("Reduce batch")
    assert labels[2].startswith("Enable autocast") and labels[3].startswith("Move to CPU")
    assert "(saves ~" in panel.buttons["batch"].description, "the saving, said to be one"
    assert all(b.tooltip for b in panel.buttons.values()), "every button says what it will do"
    # the chart is HTML in the same units as the text (no plotly, no GiB axis on MiB numbers)
    assert text.count('class="gpumem-chart"') == 1
    chart = text[text.index('class="gpumem-chart"') :]
    assert "requested" in chart and "free" in chart and "weights" in chart
    assert " MiB" in chart and "GiB" not in chart


@pytest.mark.slow
def test_reduce_batch_click_rescues_and_shows_what_fit(failed: Any) -> None:
    panel = _panel(failed)
    outcome = panel.click("batch")
    assert outcome is not None and outcome.ok
    status = panel.status.value
    assert "✓" in status and "Fits at batch" in status
    assert f"batch_size = {outcome.batch}" in status
    assert failed.shell.user_ns["batch_size"] == outcome.batch
    # usable again, and the status says what another click would do
    assert not panel.buttons["batch"].disabled and not panel.busy
    assert "Another button would run the cell again" in status


@pytest.mark.slow
def test_a_second_oom_replaces_the_panel_content(shell: Any) -> None:
    shell.run_cell("%gpumem simulate 160MiB")
    shell.run_cell(SETUP)
    shell.run_cell(CELL.replace("256", "600"))
    panel = _panel(extension(shell))
    first_failure = panel.failed
    # clearing frees little: at batch 600 the re-run runs out of memory again
    outcome = panel.click("clear")
    assert outcome is not None and not outcome.ok
    assert panel.failed is not first_failure, "the panel now shows the new diagnosis"
    assert "The panel now shows the new diagnosis" in panel.status.value
    assert len(panel.widget.children) == 1, "one panel, its body redrawn, never a stack"


@pytest.mark.slow
def test_guard_asks_inside_the_panel(shell: Any) -> None:
    shell.run_cell("%gpumem simulate 160MiB")
    shell.run_cell(SETUP)
    shell.run_cell("step = 0")
    shell.run_cell("step += 1\n" + CELL)
    ext = extension(shell)
    panel = _panel(ext)
    assert panel.click("batch") is None
    question = _texts(panel.confirm_box)
    assert "Re-run anyway?" in question and "step" in question
    assert shell.user_ns["step"] == 1
    yes = next(
        w for w in panel.confirm_box.children[1].children if w.description == "Re-run anyway"
    )
    yes.click()
    assert shell.user_ns["step"] >= 2, "re-run, as the user asked"
    assert "Fits at batch" in panel.status.value


def test_each_fix_is_checked_once_per_oom(shell: Any, monkeypatch: Any, capsys: Any) -> None:
    """The text diagnosis and the panel's buttons come from one run of the fixes' checks: an OOM
    through the hook (a kernel with widgets) checks each fix once, not once for the text and again
    for the panel. A panel built without checks still runs them itself."""
    from jupyter_gpumem.fixes import FIXES
    from jupyter_gpumem.ui.panel import DiagnosisPanel

    calls = dict.fromkeys(FIXES, 0)

    def counting(key: str, check: Any) -> Any:
        def counted(self: Any, ctx: Any) -> Any:
            calls[key] += 1
            return check(self, ctx)

        return counted

    for key, fix in FIXES.items():
        monkeypatch.setattr(type(fix), "check", counting(key, type(fix).check))
    ext = extension(shell)
    monkeypatch.setattr(ext, "widgets_available", lambda: True)  # as under ipykernel
    shell.run_cell("%gpumem simulate 64MiB")
    shell.run_cell(SETUP)
    assert calls == dict.fromkeys(FIXES, 0)
    shell.run_cell(CELL)
    failure = jupyter_gpumem.last_failure(ext.shell)
    assert failure is not None and ext.panel is not None, capsys.readouterr()
    assert ext.panel.failed is failure
    assert calls == dict.fromkeys(FIXES, 1), calls
    # the buttons say what the text said: the same checks
    text = capsys.readouterr().out
    assert "%gpumem retry batch" in text and not ext.panel.buttons["batch"].disabled
    for key, check in ext.panel.checks.items():
        assert ext.panel.buttons[key].disabled is (not check.applies)
    # other callers (a panel built by hand) still get the checks run for them
    panel = DiagnosisPanel(ext, failure)
    assert calls == dict.fromkeys(FIXES, 2), calls
    assert set(panel.checks) == set(FIXES)


def test_buttons_say_whether_they_are_enough_and_the_primary_one_is(shell: Any) -> None:
    shell.run_cell("%gpumem simulate 160MiB")
    shell.run_cell(SETUP)
    shell.run_cell(CELL.replace("256", "600"))
    panel = _panel(extension(shell))
    short = panel.failed.diagnosis.shortfall_bytes
    assert short
    marked = {k: b.description for k, b in panel.buttons.items() if "not enough" in b.description}
    for key, check in panel.checks.items():
        saving = check.predicted_saving_bytes
        expected = check.applies and saving is not None and saving < short
        assert (key in marked) == expected, (key, saving, short, panel.buttons[key].description)
    assert marked, "at batch 600 some fix saves less than the shortfall"
    assert all(
        re.search(r"not enough: saves ~[\d.]+ \w+ of [\d.]+ \w+ needed", t) for t in marked.values()
    )
    primary = [k for k, b in panel.buttons.items() if b.button_style == "primary"]
    assert len(primary) <= 1 and not set(primary) & set(marked)


def test_panel_words_holders_and_folds_causes_with_nothing_to_do(failed: Any) -> None:
    panel = _panel(failed)
    html = panel.details.value
    assert "locals of the failed call in torch" in html
    assert "_call_impl() in" not in html and "() in container.py" not in html
    folded = html[html.index("<details") :]
    assert "nothing to do" in folded and "Nothing to do: that memory is already back" in folded
    assert "freed since" in html, "the failed frames in the chart say they were freed"


def test_outcome_compares_like_with_like() -> None:
    from jupyter_gpumem.fixes import Attempt, FixOutcome
    from jupyter_gpumem.ui.wording import attempt_line, measured_line

    mib = 1 << 20
    ok = Attempt("batch", True, 138 * mib, 160 * mib, 1.0, batch=7)
    line = measured_line(FixOutcome("batch", True, [ok], predicted_saving_bytes=42 * mib))
    assert line == "Predicted saving ~42.00 MiB. The re-run peaked at 138 MiB of 160 MiB (86%)."
    cpu = Attempt("cpu", True, 0, 160 * mib, 1.0)
    assert measured_line(FixOutcome("cpu", True, [cpu])) == "", "no 'peak 0 B'"
    assert attempt_line(ok).startswith("batch 7: fits, peak 138 MiB of 160 MiB (86%)")


def test_a_running_fix_shows_its_attempt_and_elapsed_time(failed: Any, monkeypatch: Any) -> None:
    from jupyter_gpumem.fixes import Attempt, FixOutcome
    from jupyter_gpumem.ui import panel as panel_mod

    panel = _panel(failed)
    # the panel's clock, stepped: 7 s pass between two readings; a tick every 10 ms
    now = iter(range(0, 7_000_000, 7))
    panel.clock, panel.tick_seconds = lambda: float(next(now)), 0.01
    seen: list[str] = []
    panel.status.observe(lambda ch: seen.append(ch["new"]), "value")

    def ticked() -> bool:
        return any(re.search(r"\b[1-9]\d* s so far", v) for v in list(seen))

    def engine(*_a: Any, on_attempt: Any, **_k: Any) -> Any:
        on_attempt(Attempt("batch", False, None, None, 0.1, batch=128, rehearsal=True))
        # the fix blocks this thread: the ticker's thread redraws the elapsed time meanwhile
        deadline = time.monotonic() + 15
        while not ticked() and time.monotonic() < deadline:
            time.sleep(0.005)
        return FixOutcome("batch", False, message="Still out of memory.")

    monkeypatch.setattr(panel_mod, "apply_fix", engine)
    panel.click("batch")
    running = [v for v in seen if "Running" in v]
    assert any("attempt 2 in progress" in v and "batch 128: out of memory" in v for v in running)
    assert any(re.search(r"\b[1-9]\d* s so far", v) for v in running), running
    assert "interrupt the kernel" in running[-1]
    assert "✗" in panel.status.value, "the outcome is the last word, not a late tick"
    assert "role" in panel.status._esm and "aria-live" in panel.status._esm


# ---- every click ends: threads, interrupts, errors ------------------------------------------


def _in_thread(fn: Any) -> Any:
    out: list[Any] = []
    worker = threading.Thread(target=lambda: out.append(fn()))
    worker.start()
    worker.join(60)
    return out[0] if out else None


@pytest.mark.slow
def test_a_click_on_another_thread_runs_on_the_simulated_gpu(failed: Any) -> None:
    """Item 7: a widget callback may run off the thread that ran `%gpumem simulate`."""
    from jupyter_gpumem.backends import simulated

    panel = _panel(failed)
    gpu = simulated.current()
    assert gpu is not None
    gpu.reset_peak()
    before = gpu.allocated_bytes
    outcome = _in_thread(lambda: panel.click("batch"))
    assert outcome is not None and outcome.ok, panel.status.value
    assert "Fits at batch" in panel.status.value
    assert "not compiled with CUDA" not in panel.status.value
    # counted on the card: the re-runs' tensors raised its peak (a search may need no OOM)
    assert gpu.peak_allocated_bytes > before + (1 << 20), "the re-runs counted on the card"
    assert gpu.holds(failed.shell.user_ns["x"]), "the re-run's tensors live on the card"


class _Interrupted(KeyboardInterrupt):
    message = "the namespace is as it was before the click (2 names restored)."


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (_Interrupted(), "✗ Cancelled. The namespace is as it was before the click"),
        (KeyboardInterrupt(), "✗ Cancelled: nothing changed (stopped before the re-run began)."),
        (RuntimeError("boom"), "jupyter_gpumem: Reduce batch failed (RuntimeError: boom)"),
    ],
)
def test_a_click_always_ends_with_a_status_and_usable_buttons(
    failed: Any, monkeypatch: Any, capsys: Any, raised: BaseException, expected: str
) -> None:
    from jupyter_gpumem.ui import panel as panel_mod

    def engine(*_a: Any, **_k: Any) -> Any:
        raise raised

    panel = _panel(failed)
    monkeypatch.setattr(panel_mod, "apply_fix", engine)
    outcome = panel.click("batch")
    assert outcome is not None and not outcome.ok
    assert expected in panel.status.value
    assert not panel.busy and not panel.buttons["batch"].disabled
    assert "Traceback" not in capsys.readouterr().out + panel.status.value


@pytest.mark.slow
def test_a_real_interrupt_inside_the_cell_ends_the_click(shell: Any) -> None:
    shell.run_cell("%gpumem simulate 160MiB")
    shell.run_cell(SETUP)
    shell.run_cell("runs = []")
    shell.run_cell(
        "runs.append(1)\n"
        "if len(runs) > 1:\n"
        "    raise KeyboardInterrupt\n" + CELL
    )  # fmt: skip
    panel = _panel(extension(shell))
    outcome = panel.click("batch", force=True)
    assert outcome is not None and not outcome.ok
    assert "✗ Cancelled" in panel.status.value
    assert not panel.busy and not panel.buttons["batch"].disabled


SLOW_SETUP = """\
%gpumem simulate 160MiB
import time, torch
total = 0
"""
# 4 MiB a sample: a batch of 64 does not fit 160 MiB; a batch that fits runs 40 slow steps
SLOW_CELL = """\
batch_size = 64
for step in range(40):
    x = torch.randn(batch_size, 1024, 1024, device="cuda")
    total += 1
    time.sleep(0.1)
"""


@pytest.mark.slow
def test_cancel_while_a_fix_runs_puts_the_notebook_back(shell: Any) -> None:
    """Cancel interrupts the kernel (SIGINT, as the server's interrupt API sends it) while the fix
    runs: the transaction puts the notebook back and the status ends in a result."""
    import os
    import signal

    shell.run_cell(SLOW_SETUP)
    shell.run_cell(SLOW_CELL)
    ext = extension(shell)
    assert jupyter_gpumem.last_failure(ext.shell) is not None
    panel = _panel(ext)
    assert panel.status.kernel_id == ""  # no Jupyter server started this shell: no Cancel button
    panel.status.kernel_id = "0d1e"  # as in a kernel a server started
    seen: list[tuple[bool, str]] = []
    panel.status.observe(lambda ch: seen.append((panel.status.running, ch["new"])), "value")
    ns = shell.user_ns
    assert (ns["total"], ns["batch_size"]) == (0, 64)

    def cancel() -> None:  # once a re-run has been counting for a while
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (panel.busy and ns.get("total", 0) >= 3):
            time.sleep(0.05)
        if panel.busy:
            os.kill(os.getpid(), signal.SIGINT)

    canceller = threading.Thread(target=cancel)
    canceller.start()
    outcome = panel.click("batch", force=True)
    canceller.join()
    assert outcome is not None and not outcome.ok and outcome.message == "cancelled"
    status = html.unescape(panel.status.value)
    assert "✗ Cancelled: nothing changed. Restored the notebook's variables" in status, status
    assert "Running" not in status
    assert any(running and "click Cancel" in v for running, v in seen), "Cancel was shown"
    assert not panel.status.running and not panel.busy and not panel.buttons["batch"].disabled
    assert (ns["total"], ns["batch_size"]) == (0, 64), "the state from before the fix"


class _MainLoop:
    """The kernel's main event loop as ``status.interruptible`` sees it (``add_callback``)."""

    def __init__(self) -> None:
        self.callbacks: list[tuple[Any, tuple[Any, ...]]] = []

    def add_callback(self, fn: Any, *args: Any) -> None:
        self.callbacks.append((fn, args))


@pytest.mark.slow
def test_a_click_on_a_subshell_thread_runs_on_the_main_thread_where_cancel_lands(
    shell: Any, monkeypatch: Any
) -> None:
    """Issue 21 §1: "Re-run anyway" (a button drawn during a click) calls back on ipykernel 7's
    subshell thread, where the server's SIGINT never lands: the fix ran on and was kept. The click
    is handed to the kernel's main loop, where Ctrl-C raises (ipykernel ignores SIGINT between
    requests), and Cancel puts the notebook back."""
    import os
    import signal
    from types import SimpleNamespace

    shell.run_cell(SLOW_SETUP)
    shell.run_cell(SLOW_CELL)
    ext = extension(shell)
    panel = _panel(ext)
    panel.status.kernel_id = "0d1e"
    loop = _MainLoop()
    monkeypatch.setattr(shell, "kernel", SimpleNamespace(io_loop=loop), raising=False)
    ns = shell.user_ns

    assert _in_thread(lambda: panel.click("batch", force=True)) is None, "handed over"
    assert len(loop.callbacks) == 1 and panel.busy
    assert panel.click("batch", force=True) is None, "a second click while it waits: nothing"

    def cancel() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (panel.busy and ns.get("total", 0) >= 3):
            time.sleep(0.05)
        if panel.busy:
            os.kill(os.getpid(), signal.SIGINT)

    old = signal.signal(signal.SIGINT, signal.SIG_IGN)  # the kernel's main loop, idle
    try:
        canceller = threading.Thread(target=cancel)
        canceller.start()
        fn, args = loop.callbacks[0]
        fn(*args)
        canceller.join()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN, "put back as it was"
    finally:
        signal.signal(signal.SIGINT, old)
    status = html.unescape(panel.status.value)
    assert "✗ Cancelled: nothing changed. Restored the notebook's variables" in status, status
    assert not panel.busy and not panel.status.running and not panel.buttons["batch"].disabled
    assert (ns["total"], ns["batch_size"]) == (0, 64), "the state from before the fix"


def test_a_cancel_that_lands_after_the_fix_ended_keeps_its_outcome(
    failed: Any, monkeypatch: Any
) -> None:
    """Cancel is a click in the page: its interrupt may reach the kernel just after the fix
    returned. The fix's result stands and is reported, never "Cancelled" over a kept run."""
    from jupyter_gpumem.fixes import FixOutcome
    from jupyter_gpumem.ui import panel as panel_mod

    panel = _panel(failed)
    done = FixOutcome("batch", True, message="Fits at batch 3 (was 64).")
    monkeypatch.setattr(panel_mod, "apply_fix", lambda *_a, **_k: done)
    report = panel._report
    calls: list[str] = []

    def interrupted_once(label: str, outcome: Any) -> None:
        calls.append(label)
        if len(calls) == 1:
            raise KeyboardInterrupt  # the interrupt arrives while the outcome is being drawn
        report(label, outcome)

    monkeypatch.setattr(panel, "_report", interrupted_once)
    outcome = panel.click("batch", force=True)
    assert outcome is done and panel.outcomes == [done]
    assert "✓" in panel.status.value and "Fits at batch 3" in panel.status.value
    assert "Cancelled" not in panel.status.value
    assert not panel.status.running and not panel.busy


def test_the_kernel_id_for_cancel_comes_from_the_connection_file(monkeypatch: Any) -> None:
    import sys
    import types

    from jupyter_gpumem.readings import kernels

    connect = types.ModuleType("ipykernel.connect")
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    monkeypatch.setitem(sys.modules, "ipykernel.connect", connect)
    connect.get_connection_file = lambda: (  # type: ignore[attr-defined]
        "/run/jupyter/kernel-3da4d268-c9bc-4a6b-b4d8-6ec30eaa60f1.json"
    )
    assert kernels.own_kernel_id() == "3da4d268-c9bc-4a6b-b4d8-6ec30eaa60f1"
    connect.get_connection_file = lambda: "/tmp/tmpocuxlpg1.json"  # type: ignore[attr-defined]
    assert kernels.own_kernel_id() is None  # a kernel no server started: no Cancel button


@pytest.mark.slow
def test_the_cells_own_error_shows_as_the_cell_would_show_it(shell: Any, capsys: Any) -> None:
    shell.run_cell("%gpumem simulate 160MiB")
    shell.run_cell(SETUP)
    shell.run_cell("runs = []")
    shell.run_cell(
        "runs.append(1)\n"
        "if len(runs) > 1:\n"
        "    raise ValueError('second run ' + 'fails')\n" + CELL
    )  # fmt: skip
    panel = _panel(extension(shell))
    capsys.readouterr()
    outcome = panel.click("batch", force=True)
    assert outcome is not None and not outcome.ok
    status = panel.status.value
    assert "✗ Reduce batch: the re-run at batch" in status, status
    assert "raised ValueError: second run fails. Nothing was kept: restored" in status, status
    shown = capsys.readouterr().out
    assert "ValueError: second run fails" in shown and "raise ValueError" in shown
    assert "jupyter_gpumem" not in shown, "no frame of ours in the cell's traceback"
    assert not panel.buttons["batch"].disabled


# ---- stale panels --------------------------------------------------------------------------


def _cells(shell: Any, *sources: str) -> None:
    for src in sources:
        shell.run_cell(src, store_history=True)


def test_a_click_after_other_cells_ran_asks_first_and_cancel_runs_nothing(shell: Any) -> None:
    _cells(shell, "%gpumem simulate 160MiB", SETUP, "runs = []", "runs.append(1)\n" + CELL)
    ext = extension(shell)
    failed_at = shell.execution_count - 1  # the failed cell's In [N]
    panel = _panel(ext)
    _cells(shell, "a = 1", "b = 2", "c = 3")
    assert panel.click("batch") is None, "not re-run straight away"
    text = _texts(panel.confirm_box)
    assert f"3 cells ran since this failure (In [{failed_at + 1}]..In [{failed_at + 3}])" in text
    assert "Re-run anyway?" in text
    buttons = {w.description: w for w in panel.confirm_box.children[1].children}
    assert "Cancel" not in buttons, "Cancel stops a running fix; declining is another word"
    buttons["Don't re-run"].click()
    assert panel.status.value == "Not re-run." and shell.user_ns["runs"] == [1]
    assert panel.click("batch") is None
    ran: list[str] = []
    panel.run = ran.append  # the re-run itself is tested above: here, only that it is asked for
    buttons = {w.description: w for w in panel.confirm_box.children[1].children}
    buttons["Re-run anyway"].click()
    assert ran == ["batch"]


@pytest.mark.slow
def test_a_click_on_a_panel_with_a_newer_failure_says_which(shell: Any) -> None:
    from jupyter_gpumem.fixes.ask import staleness

    _cells(shell, "%gpumem simulate 160MiB", SETUP, CELL)
    ext = extension(shell)
    first = shell.execution_count - 1
    old = _panel(ext)
    _cells(shell, "a = 1", CELL.replace("256", "300"))
    newest = shell.execution_count - 1
    assert jupyter_gpumem.last_failure(ext.shell) is not old.failed
    assert old.click("batch") is None
    text = _texts(old.confirm_box)
    assert f"1 cell ran since this failure (In [{first + 1}])" in text
    assert f"a newer failure is In [{newest}]" in text
    # the latest failure's panel, nothing ran since: nothing to say, no question
    assert (
        staleness(
            shell, jupyter_gpumem.last_failure(ext.shell), jupyter_gpumem.last_failure(ext.shell)
        )
        == ""
    )


def test_a_fix_that_does_not_apply_is_disabled_and_says_why(shell: Any) -> None:
    shell.run_cell("%gpumem simulate 160MiB")
    shell.run_cell(SETUP)
    shell.run_cell("n_rows = 4096")
    shell.run_cell("y = model(torch.randn(n_rows, 32, 1024, device='cuda'))")
    panel = _panel(extension(shell))
    b = panel.buttons["batch"]
    assert b.disabled
    assert "no batch size found in this cell" in b.tooltip
    assert "--batch-var" in _texts(panel.widget)


def _snapshot(**kw: Any) -> MemorySnapshot:
    base: dict[str, Any] = dict(
        device_index=0,
        device_name="Test GPU",
        total_bytes=None,
        free_bytes=None,
        used_bytes=None,
        allocated_bytes=None,
        reserved_bytes=None,
        peak_allocated_bytes=None,
        peak_reserved_bytes=None,
        num_ooms=None,
        allowed_bytes=None,
    )
    base.update(kw)
    return MemorySnapshot(**base)


@pytest.mark.slow
def test_gauge_splits_used_memory_and_shows_states() -> None:
    from jupyter_gpumem.ui.gauge import Gauge

    G = 1 << 30
    reading = _snapshot(
        total_bytes=12 * G, used_bytes=9 * G, free_bytes=3 * G,
        allocated_bytes=5 * G, reserved_bytes=6 * G,
    )  # fmt: skip
    g = Gauge(read=lambda: reading)
    ind = g.widget.data[0]
    assert abs(ind.value - 9.0) < 1e-6
    steps = [tuple(s["range"]) for s in ind.gauge.steps]
    assert steps == [(0, 5.0), (5.0, 6.0), (6.0, 9.0)], "allocated, cache, other processes"
    assert "75% of 12.00 GiB" in ind.title.text

    none = Gauge(read=lambda: _snapshot(nvml_error="NVMLError_LibraryNotFound"))
    assert "no GPU reading" in none.widget.data[0].title.text

    def broken() -> MemorySnapshot:
        raise OSError("GPU is lost")

    lost = Gauge(read=broken)
    assert "reading failed: OSError: GPU is lost" in lost.widget.data[0].title.text
    assert lost.errors == 1


@pytest.mark.slow
def test_gauge_axes_say_gib_and_draw_no_white_lines() -> None:
    from jupyter_gpumem.ui.gauge import Gauge, gib_ticks

    G = 1 << 30
    reading = _snapshot(
        total_bytes=12 * G, used_bytes=9 * G, free_bytes=3 * G,
        allocated_bytes=5 * G, reserved_bytes=6 * G,
    )  # fmt: skip
    fig = Gauge(read=lambda: reading).widget
    dial = fig.data[0].gauge.axis
    assert list(dial.ticktext) == ["0", "2.5 GiB", "5.0 GiB", "7.5 GiB", "10.0 GiB"]
    assert all(v <= 12 for v in dial.tickvals), "no tick past the card"
    y = fig.layout.yaxis
    assert y.tickmode == "array" and not y.ticksuffix
    assert list(y.ticktext) == ["0", "5 GiB", "10 GiB"], "the history's axis, above 9 GiB used"
    assert y.range[1] >= 9
    for t in [*y.ticktext, *dial.ticktext]:
        assert t == "0" or t.endswith(" GiB"), t
    # the default template's lines are white: each axis sets its own or hides them
    template = fig.layout.template.layout
    for axis, default in ((fig.layout.xaxis, template.xaxis), (y, template.yaxis)):
        for shown, color in (("showgrid", "gridcolor"), ("zeroline", "zerolinecolor"),
                             ("showline", "linecolor")):  # fmt: skip
            if axis[shown] is False:
                continue
            effective = axis[color] or default[color]
            assert effective not in (None, "white", "#fff", "#ffffff"), (axis.plotly_name, color)
    assert gib_ticks(0.5, 3) == ([0.0, 0.25, 0.5], ["0", "0.25 GiB", "0.50 GiB"])
    assert gib_ticks(80, 5)[1] == ["0", "20 GiB", "40 GiB", "60 GiB", "80 GiB"]


def test_gauge_thread_samples_and_stops_on_unload(shell: Any) -> None:
    from jupyter_gpumem.ui import gauge as gauge_mod

    shell.run_cell("%gpumem simulate 1GiB")
    g = gauge_mod.Gauge(interval=0.05).start()
    shell.run_cell("import torch; blocks = []")
    # the dial before the blocks (the card's context may already be on it)
    after = time.monotonic()
    deadline = after + 15
    while sum(t > after for t, *_ in g.samples) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)  # two samples after the cell above: the second read all of it
    start = g.widget.data[0].value
    for n in range(1, 4):
        shell.run_cell("blocks.append(torch.empty(64 * 2**20, dtype=torch.uint8, device='cuda'))")
        # until the sampling thread has drawn the n blocks (GiB on the dial, 3 decimals)
        want = start + n / 16 - 0.002
        deadline = time.monotonic() + 15
        while g.widget.data[0].value < want and time.monotonic() < deadline:
            time.sleep(0.01)
        assert g.widget.data[0].value >= want, (n, start, g.widget.data[0].value)
    assert g.running and g.updates >= 4, "a sample at start, then one drawn for each block"
    assert "simulated" in g.widget.data[0].title.text.lower()
    shell.run_cell("%unload_ext jupyter_gpumem")
    assert not g.running, "unload stops every gauge thread"
    shell.run_cell("%load_ext jupyter_gpumem")


def test_sidebar_falls_back_inline_outside_jupyterlab(monkeypatch: Any) -> None:
    from jupyter_gpumem.ui.sidebar import SIDEBAR_WIDTH, Sidebar

    monkeypatch.setenv("JUPYTER_GPUMEM_FRONTEND", "inline")
    shown: list[Any] = []
    sb = Sidebar(interval=1.0, history_s=60)
    try:
        msg = sb.open(shown.append)
        assert msg == "No JupyterLab here: the gauge is shown inline instead of in a sidebar."
        assert shown == [sb.gauge.widget]
        assert sb.gauge.widget.layout.width <= SIDEBAR_WIDTH
    finally:
        sb.close()
    assert not sb.gauge.running


NOTEBOOK_7 = ["/venv/bin/python", "/venv/bin/jupyter-notebook", "--no-browser"]
LAB = ["/venv/bin/python", "/venv/bin/jupyter-lab", "--no-browser"]


@pytest.mark.parametrize(
    ("argv", "app"),
    [
        (LAB, "lab"),
        (["/usr/local/bin/jupyter-lab"], "lab"),
        (["jupyter", "lab", "--port=8888"], "lab"),
        (["/usr/bin/python3.12", "-m", "jupyterlab", "--ServerApp.port=0"], "lab"),
        (["python", "-m", "jupyter", "--debug", "lab"], "lab"),
        (["python3", "-u", "-X", "utf8", "/venv/bin/jupyter-lab"], "lab"),
        (["C:\\venv\\Scripts\\jupyter-lab.exe", "--no-browser"], "lab"),
        (["C:\\venv\\python.exe", "C:\\venv\\Scripts\\jupyter-lab-script.py"], "lab"),
        # Notebook 7, whatever its arguments or its venv's name say
        ([*NOTEBOOK_7, "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
         "notebook"),
        (["/home/u/jupyterlab-env/bin/python", "/home/u/jupyterlab-env/bin/jupyter-notebook"],
         "notebook"),
        (["/opt/jupyterlab/bin/jupyter", "notebook", "--notebook-dir=/srv/jupyter lab"],
         "notebook"),
        (["python", "-m", "notebook", "--ServerApp.jpserver_extensions={'jupyterlab': True}"],
         "notebook"),
        (["jupyter-server", "--ServerApp.default_url=/lab"], "server"),
        (["jupyter", "nbconvert", "--execute", "jupyterlab-tour.ipynb"], "nbconvert"),
        # not a Jupyter program: the search goes on to the next parent
        (["bash", "-c", "jupyter lab"], None),
        (["python", "-m", "ipykernel_launcher", "-f", "/tmp/jupyterlab/kernel.json"], None),
        (["/usr/bin/jupyterlab-desktop"], None),
        (["python"], None),
        ([], None),
    ],
)  # fmt: skip
def test_the_jupyter_app_is_read_from_the_program_not_its_arguments(
    argv: list[str], app: str | None
) -> None:
    from jupyter_gpumem.ui.sidebar import jupyter_app

    assert jupyter_app(argv) == app


def test_the_nearest_jupyter_parent_decides_whether_it_is_jupyterlab() -> None:
    from jupyter_gpumem.ui.sidebar import in_jupyterlab

    no_env: dict[str, str] = {}
    shell = ["/bin/bash", "-l"]
    assert in_jupyterlab([LAB], no_env)
    assert in_jupyterlab([shell, ["sh", "-c", "exec jupyter-lab"], LAB], no_env)
    trap = [*NOTEBOOK_7, "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    assert not in_jupyterlab([trap], no_env), "Notebook 7 keeps its gauge inline"
    # Notebook started from a JupyterLab terminal: its own server decides
    assert not in_jupyterlab([NOTEBOOK_7, shell, LAB], no_env)
    assert not in_jupyterlab([shell, ["/usr/bin/jupyterlab-app"]], no_env)
    assert not in_jupyterlab([], no_env)
    assert in_jupyterlab([NOTEBOOK_7], {"JUPYTER_GPUMEM_FRONTEND": "lab"})
    assert not in_jupyterlab([LAB], {"JUPYTER_GPUMEM_FRONTEND": "inline"})
