"""The prebuilt ``jupyter-gpumem`` lab extension (labextension/ built into jupyter_gpumem/labextension)
in a real JupyterLab 4, in Chromium through Playwright: the status-bar meter moves while a cell
allocates on a simulated GPU, shows both of two simulated GPUs and marks the one that ran out, the
command opens the sidebar, Apply to cell edits the cell.

JupyterLab loads the extension from this checkout (``--LabApp.extra_labextensions_path`` naming a
folder with a ``jupyter-gpumem`` link to it), as it would from
``share/jupyter/labextensions/jupyter-gpumem`` after ``pip install``. Rebuild it after
editing labextension/src: ``cd labextension && npm install && npm run build``.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import jupyter_gpumem.frontend.meter as meter_module
from jupyter_gpumem.frontend.labext import CHANGE_MIME, change_bundle, current_cell_id
from jupyter_gpumem.readings.snapshot import MemorySnapshot
from tests import _browser
from tests._browser import BROWSER_MARKS, T_LONG, T_RUN, expect, outputs, run_cell, serve

# the shared fixtures (tests/_browser.py), used by name; `lab` is this module's own, below
browser = _browser.browser
open_notebook = _browser.open_notebook

ROOT = Path(__file__).resolve().parents[1]
BUILT = ROOT / "jupyter_gpumem" / "labextension"


def in_lab(test):
    """A test that drives JupyterLab with the built extension in Chromium."""
    marks = [
        *BROWSER_MARKS,
        pytest.mark.skipif(
            not (BUILT / "package.json").exists(), reason="lab extension not built (npm run build)"
        ),
    ]
    for mark in marks:
        test = mark(test)
    return test


# --------------------------------------------------------------------------- #
# Kernel side, without a browser
# --------------------------------------------------------------------------- #
def test_change_bundle_carries_the_edit_and_a_text_fallback():
    bundle = change_bundle("abc-1", 3, "    batch_size = 64", "    batch_size = 16")
    assert bundle[CHANGE_MIME] == {
        "cell_id": "abc-1", "line": 3, "old": "    batch_size = 64", "new": "    batch_size = 16",
    }  # fmt: skip
    assert bundle["text/plain"] == "Line 3 of the cell: batch_size = 64  →  batch_size = 16"


def test_current_cell_id_reads_the_execute_request_metadata():
    class Kernel:
        def __init__(self, parent):
            self.parent = parent

        def get_parent(self, channel="shell"):
            return self.parent

    lab4 = SimpleNamespace(kernel=Kernel({"metadata": {"cellId": "c-42"}, "header": {}}))
    classic = SimpleNamespace(kernel=Kernel({"metadata": {}, "header": {}}))
    assert current_cell_id(lab4) == "c-42"
    assert current_cell_id(classic) is None
    assert current_cell_id(SimpleNamespace()) is None  # a terminal: no kernel


def test_meter_is_a_no_op_outside_ipykernel():
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    meter_module.start(shell)
    assert not meter_module.running()
    meter_module.stop()
    meter_module.stop()


def snapshot(**numbers) -> MemorySnapshot:
    fields = dict.fromkeys(
        ("total_bytes", "free_bytes", "used_bytes", "allocated_bytes", "reserved_bytes",
         "peak_allocated_bytes", "peak_reserved_bytes", "num_ooms", "allowed_bytes"),
    )  # fmt: skip
    return MemorySnapshot(
        device_index=0, device_name="Simulated GPU (4.00 GiB)", note="simulated",
        **{**fields, **numbers},
    )  # fmt: skip


def test_meter_sample_is_json_in_bytes():
    data = meter_module.sample(
        snapshot(total_bytes=4 << 30, used_bytes=3 << 30, allocated_bytes=1 << 30)
    )
    assert data["meter"] == meter_module.MARKER
    assert (data["used_bytes"], data["total_bytes"]) == (3 << 30, 4 << 30)
    assert data["error"] is None
    assert json.loads(json.dumps(data)) == data
    # no driver number (torch only): the allocator's reserved bytes stand for "used"
    assert meter_module.sample(snapshot(reserved_bytes=5, allocated_bytes=2))["used_bytes"] == 5
    assert meter_module.sample(snapshot())["error"] == "no GPU reading in this kernel"


def test_meter_sample_lists_every_gpu_and_the_last_oom_device():
    gpu0 = snapshot(total_bytes=4 << 30, used_bytes=1 << 30, allocated_bytes=5, reserved_bytes=6)
    gpu1 = replace(gpu0, device_index=1, used_bytes=None, reserved_bytes=3 << 30, title="B")
    data = meter_module.sample(replace(gpu0, devices=(gpu0, gpu1)), oom_device=1)
    assert [(d["device_index"], d["used_bytes"], d["total_bytes"]) for d in data["devices"]] == [
        (0, 1 << 30, 4 << 30), (1, 3 << 30, 4 << 30),  # no driver number: reserved stands for used
    ]  # fmt: skip
    assert data["devices"][1]["title"] == "B"
    assert data["devices"][0]["allocated_bytes"] == 5
    assert data["oom_device"] == 1
    assert json.loads(json.dumps(data)) == data
    # one GPU: the list holds it alone; no OOM yet, or no extension loaded: nothing marked
    one = meter_module.sample(gpu0)
    assert [d["device_index"] for d in one["devices"]] == [0]
    assert one["oom_device"] is None
    assert meter_module.oom_device(None) is None


class _Comm:
    """Stands in for an ipykernel comm (no kernel in this test): records what the meter sends."""

    def __init__(self) -> None:
        self.sent: list[dict] = []

    def on_close(self, _cb) -> None: ...

    def on_msg(self, _cb) -> None: ...

    def send(self, data: dict) -> None:
        self.sent.append(data)


def test_meter_samples_do_not_describe_other_processes_each_second(monkeypatch):
    """A sample is numbers only: describing another process reads /proc and may ask the Jupyter
    server's REST API which notebook it is; the meter does that never, the diagnosis does.
    NVML lists processes as (pid, bytes), undescribed; there is no NVML here, so the simulated
    GPU's reading is given as the CUDA backend gives it, its descriptions taken off (a stand-in
    for the driver, the one part of this test that is not real)."""
    import dataclasses
    import os

    import jupyter_gpumem.readings.snapshot as snapshot_module
    from jupyter_gpumem import backends
    from jupyter_gpumem.backends import base

    described: list[int] = []
    real = snapshot_module.describe_process
    monkeypatch.setattr(
        snapshot_module, "describe_process", lambda pid: described.append(pid) or real(pid)
    )
    gpu = backends.simulate(1 << 30, other_processes=[(os.getppid(), 256 << 20)])
    real_read = gpu.read
    reads: list[int | None] = []

    def nvml_like_read(index=None):
        reads.append(index)
        r = real_read(index)
        procs = tuple(p._replace(description=None) for p in r.processes)
        return dataclasses.replace(r, processes=procs)

    monkeypatch.setattr(gpu, "read", nvml_like_read)
    try:
        assert base.active() is gpu
        m = meter_module._Meter(_Comm(), 0.2)
        m.thread.start()
        # three readings of the card, 0.2 s apart (a sample is sent only when one changed, or
        # as a heartbeat every few seconds: the readings are what would describe)
        deadline = time.monotonic() + 10
        while (len(reads) < 3 or not m.comm.sent) and time.monotonic() < deadline:
            time.sleep(0.05)
        m.stopped.set()
        m.thread.join(timeout=5)
        assert len(reads) >= 3, reads
        assert m.comm.sent and m.comm.sent[-1]["error"] is None
        assert described == []  # the meter described nobody
        # the same reading for the diagnosis or `%gpumem status` names the other process
        snap = snapshot_module.read_snapshot()
        assert described == [os.getppid()]
        assert [p.used_bytes for p in snap.other_processes] == [256 << 20]
    finally:
        backends.stop_simulation()


def run_collecting(kc, code: str, timeout: float = 60) -> list[dict]:
    """Run `code`; every iopub message (any parent) from its busy to its idle."""
    msg_id = kc.execute(code, store_history=False)
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        msg = kc.get_iopub_msg(timeout=timeout)
        seen.append(msg)
        if (
            msg["msg_type"] == "status"
            and msg["content"]["execution_state"] == "idle"
            and msg["parent_header"].get("msg_id") == msg_id
        ):
            return seen
    raise TimeoutError(code)


@pytest.mark.kernel
def test_meter_samples_arrive_while_a_cell_runs_and_stop_when_the_front_end_closes(kernel):
    kc = kernel.kc
    opened = run_collecting(
        kc,
        "%load_ext jupyter_gpumem\n%gpumem simulate 4GiB\n"
        "import jupyter_gpumem.frontend.meter as m\nm.start(get_ipython())\nm.start(get_ipython())",
    )
    opens = [m for m in opened if m["msg_type"] == "comm_open"]
    assert [o["content"]["target_name"] for o in opens] == [meter_module.TARGET]  # started once
    comm_id = opens[0]["content"]["comm_id"]
    # the front end's refresh setting, as the lab extension sends it: a reading every 0.2 s
    kc.shell_channel.send(
        kc.session.msg("comm_msg", {"comm_id": comm_id, "data": {"interval": 0.2}})
    )

    ran = run_collecting(
        kc,
        "import time, torch\nheld = []\nfor i in range(4):\n"
        "    held.append(torch.empty(256 << 20, dtype=torch.uint8, device='cuda'))\n"
        "    time.sleep(0.6)",
    )
    used = [
        m["content"]["data"]["used_bytes"]
        for m in ran
        if m["msg_type"] == "comm_msg" and m["content"]["comm_id"] == comm_id
    ]
    # samples came while the cell held the kernel, and followed its allocations up
    assert len(set(used)) >= 3, used
    assert used == sorted(used), used
    assert all(
        m["content"]["data"]["total_bytes"] == 4 << 30 for m in ran if m["msg_type"] == "comm_msg"
    )

    # a front end without the lab extension closes the comm: the thread stops
    kc.shell_channel.send(kc.session.msg("comm_close", {"comm_id": comm_id, "data": {}}))
    deadline = time.monotonic() + 10
    while "False" not in kernel.text(kernel.run("print(m.running())")):
        assert time.monotonic() < deadline, "the meter still runs after the front end closed it"
    kernel.run("m.stop(); m.stop()")


@in_lab
def test_built_extension_is_the_source_package():
    built = json.loads((BUILT / "package.json").read_text())
    source = json.loads((ROOT / "labextension" / "package.json").read_text())
    assert built["name"] == source["name"] == "jupyter-gpumem"
    assert built["version"] == source["version"]
    assert built["jupyterlab"]["_build"]["load"].startswith("static/remoteEntry.")
    assert (BUILT / built["jupyterlab"]["_build"]["load"]).exists()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: Any) -> Any:
    """A private JupyterLab (as test_browser's) that also loads the extension from the checkout."""
    yield from serve("lab", tmp_path_factory, labextension=BUILT)


def meter(page):
    return page.locator("#jp-main-statusbar .jp-gpumem-meter")


def cell_source(page, index: int) -> str:
    return page.evaluate(
        "i => window.jupyterapp.shell.currentWidget.content.model.cells.get(i)"
        ".sharedModel.getSource()",
        index,
    )


# --------------------------------------------------------------------------- #
# The status-bar meter
# --------------------------------------------------------------------------- #
START = """\
%load_ext jupyter_gpumem
%gpumem simulate 4GiB
import jupyter_gpumem.frontend.meter as gpumem_meter
gpumem_meter.start(get_ipython())  # until load_ipython_extension starts it
"""
ALLOCATE = """\
import time, torch
held = []
for i in range(5):
    held.append(torch.empty(256 << 20, dtype=torch.uint8, device="cuda"))
    time.sleep(1.5)
print("allocated", len(held))
"""


# The meter's texts as the page shows them, each new one recorded; true once cell `i`'s output
# contains `text`
METER_UNTIL_JS = """([i, text]) => {
  const m = document.querySelector('#jp-main-statusbar .jp-gpumem-meter');
  const seen = (window._gpumemMeterSeen = window._gpumemMeterSeen || []);
  const now = m ? m.textContent : '';
  if (seen[seen.length - 1] !== now) seen.push(now);
  const cell = document.querySelectorAll('.jp-Notebook .jp-Cell')[i];
  const outs = cell ? [...cell.querySelectorAll('.jp-OutputArea-output')] : [];
  return outs.some(o => (o.textContent || '').includes(text));
}"""


@in_lab
def test_meter_shows_and_moves_while_a_cell_allocates(open_notebook):
    page = open_notebook("meter.ipynb", [START, ALLOCATE])
    expect(meter(page)).to_have_text("GPU –", timeout=T_LONG)  # always there, before any reading
    run_cell(page, 0)
    expect(meter(page)).to_have_text("GPU 0.0/4.0 GiB", timeout=T_RUN)
    assert "simulated" in (meter(page).get_attribute("title") or "")

    run_cell(page, 1)
    # every text the meter shows (read each animation frame) until the cell prints at its end
    page.wait_for_function(METER_UNTIL_JS, arg=[1, "allocated 5"], timeout=T_RUN)
    seen: list[str] = page.evaluate("window._gpumemMeterSeen")
    # several readings while the cell ran (it prints only at its end), one per 256 MiB step
    during = [t for t in seen if t not in ("GPU 0.0/4.0 GiB", "GPU 1.3/4.0 GiB")]
    assert len(during) >= 2, seen
    assert all(re.fullmatch(r"GPU \d\.\d/4\.0 GiB", t) for t in seen), seen
    expect(meter(page)).to_have_text("GPU 1.3/4.0 GiB", timeout=T_RUN)


START_2 = """\
%load_ext jupyter_gpumem
%gpumem simulate 64MiB --devices 2
import jupyter_gpumem.frontend.meter as gpumem_meter
gpumem_meter.start(get_ipython())
"""
ON_CUDA_1 = """\
import torch
on_1 = torch.empty(32 << 20, dtype=torch.uint8, device="cuda:1")
print("allocated on cuda:1")  # (the simulated GPU keeps it on the CPU)
"""
TOO_BIG_ON_1 = 'too_big = torch.empty(48 << 20, dtype=torch.uint8, device="cuda:1")'


@in_lab
def test_meter_shows_every_gpu_and_marks_the_one_that_ran_out(open_notebook):
    page = open_notebook("meter2.ipynb", [START_2, ON_CUDA_1, TOO_BIG_ON_1])
    expect(meter(page)).to_have_text("GPU –", timeout=T_LONG)
    run_cell(page, 0)
    # two 64 MiB cards, no card reaching 1 GiB: both in MiB, one unit at the end
    expect(meter(page)).to_have_text("GPU0 0/64 · GPU1 0/64 MiB", timeout=T_RUN)
    devices = meter(page).locator(".jp-gpumem-device")
    expect(devices).to_have_count(2)
    title = meter(page).get_attribute("title") or ""
    assert title.startswith("2 GPUs (simulated)"), title
    assert "GPU 0 (current device)" in title and "GPU 1" in title, title

    cell = run_cell(page, 1)
    expect(outputs(cell).first).to_have_text("allocated on cuda:1\n", timeout=T_RUN)
    expect(meter(page)).to_have_text("GPU0 0/64 · GPU1 32/64 MiB", timeout=T_RUN)
    expect(meter(page)).to_have_attribute(
        "title", re.compile(r"GPU 1\n  used on the device: 32\.0 MiB of 64\.0 MiB \(50%\)")
    )
    expect(meter(page)).to_have_attribute(
        "title", re.compile(r"GPU 0 \(current device\)\n  used on the device: 0 B of 64\.0 MiB")
    )
    assert meter(page).get_attribute("data-devices") == "2"
    expect(devices.nth(1)).to_have_attribute("data-oom", "false")

    # 32 + 48 MiB on a 64 MiB card 1: an OOM there, and the meter marks GPU 1
    run_cell(page, 2)
    expect(meter(page)).to_have_text("GPU0 0/64 · ⚠GPU1 32/64 MiB", timeout=T_RUN)
    expect(devices.nth(1)).to_have_attribute("data-oom", "true")
    expect(devices.nth(0)).to_have_attribute("data-oom", "false")
    expect(meter(page)).to_have_attribute("title", re.compile("⚠ the last OOM ran out here"))


# --------------------------------------------------------------------------- #
# The command: palette and View menu
# --------------------------------------------------------------------------- #
@in_lab
def test_command_opens_the_sidebar_from_palette_and_view_menu(open_notebook):
    page = open_notebook("sidebar.ipynb", ["x = 1"])
    page.locator("#jp-MainMenu").get_by_text("View", exact=True).click()
    expect(page.locator(".lm-Menu-content").get_by_text("GPU memory sidebar")).to_be_visible()
    page.keyboard.press("Escape")

    page.keyboard.press("Control+Shift+C")
    palette = page.locator("#command-palette input")
    expect(palette).to_be_focused()
    palette.fill("GPU memory sidebar")
    page.locator("#command-palette .lm-CommandPalette-item", has_text="GPU memory sidebar").click()

    right = page.locator("#jp-right-stack")
    expect(right.locator(".js-plotly-plot")).to_have_count(1, timeout=T_RUN)
    expect(
        page.locator(".jp-SideBar.jp-mod-right .lm-TabBar-tab", has_text="GPU memory")
    ).to_have_count(1)
    # silent: nothing landed in the notebook, no prompt number taken
    expect(page.locator(".jp-Notebook .jp-OutputArea-output")).to_have_count(0)


# --------------------------------------------------------------------------- #
# Apply to cell
# --------------------------------------------------------------------------- #
PROPOSE = """\
from jupyter_gpumem.frontend.labext import change_bundle, current_cell_id
batch_size = 64
first = current_cell_id()
print("cell id:", first)
display(change_bundle(first, 2, "batch_size = 64", "batch_size = 16"), raw=True)
"""
STALE = 'display(change_bundle(first, 2, "batch_size = 64", "batch_size = 8"), raw=True)'


@in_lab
def test_apply_to_cell_edits_the_line_or_says_it_changed(open_notebook):
    page = open_notebook("apply.ipynb", [PROPOSE, STALE])
    cell = run_cell(page, 0)
    expect(outputs(cell).first).to_contain_text("cell id:", timeout=T_RUN)
    model_id = page.evaluate("window.jupyterapp.shell.currentWidget.content.model.cells.get(0).id")
    expect(outputs(cell).first).to_have_text(f"cell id: {model_id}\n")

    button = cell.get_by_role("button", name="Apply to cell")
    expect(button).to_be_visible()
    button.click()
    expect(cell.locator(".jp-gpumem-change-result")).to_contain_text("Applied: line 2")
    expect(button).to_be_disabled()
    assert cell_source(page, 0).splitlines()[1] == "batch_size = 16"
    assert cell_source(page, 0).splitlines()[0].startswith("from jupyter_gpumem")

    # a proposal made before the edit no longer matches: nothing is changed, and it says so
    stale = run_cell(page, 1)
    stale.get_by_role("button", name="Apply to cell").click()
    expect(stale.locator(".jp-gpumem-change-result")).to_contain_text(
        'line 2 changed since (it now reads "batch_size = 16")'
    )
    assert cell_source(page, 0).splitlines()[1] == "batch_size = 16"
