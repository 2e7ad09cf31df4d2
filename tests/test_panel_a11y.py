"""Issue 21: what the panel says and what a screen reader hears, without a browser (a real
InteractiveShell on the simulated GPU; the browser side is tests/test_notebook_experience.py)."""

from __future__ import annotations

import html
import re
from typing import Any

import pytest

import jupyter_gpumem
from jupyter_gpumem.diagnosis.diagnose import diagnose
from jupyter_gpumem.diagnosis.render import render_html
from jupyter_gpumem.oom.report import parse_oom_message
from jupyter_gpumem.readings.holders import HolderSet
from jupyter_gpumem.ui import wording
from tests.conftest import extension
from tests.test_fixes import CELL, SETUP

pytest.importorskip("ipywidgets")


@pytest.fixture
def panel(shell: Any) -> Any:
    from jupyter_gpumem.ui.panel import DiagnosisPanel

    shell.run_cell("%gpumem simulate 160MiB")
    shell.run_cell(SETUP)
    shell.run_cell(CELL)
    ext = extension(shell)
    assert jupyter_gpumem.last_failure(ext.shell) is not None
    return DiagnosisPanel(ext, jupyter_gpumem.last_failure(ext.shell))


def _diagnosis(panel: Any) -> str:
    return str(panel.body.children[0].value) + str(panel.details.value)


def test_only_the_headline_is_an_alert(panel: Any) -> None:
    text = _diagnosis(panel)
    assert text.count("role='alert'") + text.count('role="alert"') == 1
    alert = re.search(r"role='alert' class='gpumem-headline'><h4>(.*?)</h4></div>", text)
    assert alert and alert.group(1).startswith("GPU out of memory: Tried to allocate"), text[:400]
    assert len(html.unescape(re.sub("<[^>]+>", "", alert.group(1)))) < 200


def test_the_answer_comes_first_then_why(panel: Any) -> None:
    """Issue 21 §2: the headline, then the fixes and the status, then the explanation (holders,
    causes, chart): a long diagnosis no longer pushes the buttons out of the first screen."""
    children = list(panel.body.children)
    head = str(children[0].value).split("</style>")[-1]
    assert "gpumem-headline" in head and "<ol>" not in head and "gpumem-chart" not in head
    assert panel.buttons["batch"] in children[1].children, "the buttons right under it"
    assert children.index(panel.status) < children.index(panel.details)
    assert children.index(panel.details) > children.index(panel.status)
    assert "<ol>" in panel.details.value and "gpumem-chart" in panel.details.value


def test_a_host_memory_failure_is_not_headed_gpu() -> None:
    report = parse_oom_message(
        "DefaultCPUAllocator: can't allocate memory: you tried to allocate 68719476736 bytes. "
        "Error code 12 (Cannot allocate memory)"
    )
    assert report is not None
    d = diagnose(report, None, HolderSet())
    shown = wording.diagnosis_html(render_html(d), d.report.backend == "CPU")
    head = re.search(r"<h4>(.*?)</h4>", shown)
    assert head and head.group(1).startswith("Out of host memory (RAM)"), shown
    assert "GPU out of memory" not in shown


def test_button_numbers_say_what_they_are(panel: Any) -> None:
    label = panel.buttons["batch"].description
    assert re.search(r"\(saves ~[\d.]+ [KMG]iB(, estimate)?\)|\(not enough: saves ~", label), label
    helps = "".join(str(getattr(w, "value", "")) for w in panel.body.children)
    assert " mib" not in helps and " gib" not in helps, "units keep their case"


def test_the_running_status_announces_changes_not_seconds(panel: Any) -> None:
    panel._running = "Reduce batch"
    heard: list[str] = []
    panel.status.observe(lambda ch: heard.append(ch["new"]), "announce")
    for second in range(5):
        panel._progress(float(second))
    assert heard == ["Reduce batch: attempt 1."], heard
    assert "so far.<br>" in panel.status.value, "a sentence ends before the next begins"


def test_declining_a_question_keeps_what_the_status_said(panel: Any) -> None:
    panel.set_status("✓ <b>Fits at batch 20 (was 64)</b>", "ok")
    before = panel.status.value
    panel.ask("batch", "2 cells ran since this failure.", "Re-run anyway?")
    labels = [b.description for b in panel.confirm_box.children[1].children]
    assert labels == ["Re-run anyway", "Don't re-run"]
    focus = panel.status.focus
    panel.confirm_box.children[1].children[1].click()
    assert panel.status.value == before, "the last success is still there"
    assert panel.status.announce == "Not re-run."
    assert panel.status.focus == focus + 1, "the focus goes to the status, not the page"


def test_a_fix_that_ends_hands_the_focus_to_the_status(panel: Any, monkeypatch: Any) -> None:
    from jupyter_gpumem.fixes import FixOutcome
    from jupyter_gpumem.ui import panel as panel_mod

    monkeypatch.setattr(
        panel_mod, "apply_fix", lambda *_a, **_k: FixOutcome("batch", True, message="Fits.")
    )
    focus = panel.status.focus
    panel.click("batch", force=True)
    assert panel.status.focus == focus + 1
    assert panel.status.announce.startswith("✓ Fits."), panel.status.announce
    assert panel.status.reveal, "the page scrolls the headline and buttons into view once"


def test_the_meter_takes_its_refresh_from_the_front_end_within_bounds() -> None:
    """The Settings Editor's "Refresh (seconds)" reaches the kernel's meter over its comm."""
    from jupyter_gpumem.frontend import meter

    class Comm:
        def __init__(self) -> None:
            self.handlers: dict[str, Any] = {}

        def on_close(self, fn: Any) -> None:
            self.handlers["close"] = fn

        def on_msg(self, fn: Any) -> None:
            self.handlers["msg"] = fn

    comm = Comm()
    m = meter._Meter(comm, 1.0)
    comm.handlers["msg"]({"content": {"data": {"interval": 2.5}}})
    assert m.interval == 2.5
    comm.handlers["msg"]({"content": {"data": {"interval": 0.001}}})
    assert m.interval == 0.2, "no faster than the schema allows"
    comm.handlers["msg"]({"content": {"data": {"other": 1}}})
    comm.handlers["msg"]({"content": {"data": {"interval": "nan"}}})
    assert m.interval == 0.2
