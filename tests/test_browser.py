"""jupyter_gpumem in a real JupyterLab 4, in Debian's Chromium through Playwright.

Adapted from ../shared/recipes/browser/test_widget_ui.py (its pitfalls are documented there): a
private, headless JupyterLab on 127.0.0.1 whose kernels import this checkout (PYTHONPATH), notebooks
written with nbformat, cells run with Shift+Enter, the panel's buttons pressed with the mouse and
the keyboard, the gauge read while a cell allocates, the sidebar measured, the dark theme checked,
a DataLoader training loop rescued from a button (whose callback runs on another thread).

On success each test's screenshots replace those in docs/screenshots/ (the README shows them); on
failure they go, with a screenshot of the page, to tests/artifacts/ (gitignored).

Env knobs:
  CHROMIUM            path of the browser (default: `which chromium` or /usr/bin/chromium)
  UI_ARTIFACTS        folder for failure screenshots (default: tests/artifacts)
  UPDATE_SCREENSHOTS  0: leave docs/screenshots/ alone
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from tests import _browser
from tests._browser import (
    BROWSER_MARKS,
    KERNEL_READY_JS,
    ROOT,
    T_LONG,
    T_RUN,
    expect,
    outputs,
    run_cell,
    within,
)
from tests.test_kernels import _kernel_pid

pytestmark = BROWSER_MARKS

# the shared fixtures (tests/_browser.py), used by name
lab = _browser.lab
browser = _browser.browser
open_notebook = _browser.open_notebook
shots = _browser.shots


# The gauge's numbers as the page draws them, each new one recorded on the element (read every
# animation frame, so none is missed); true once `n` different ones were seen.
NUMBERS_SEEN_JS = """([el, n]) => {
  const t = el.querySelector('.js-plotly-plot .indicatorlayer text.number');
  const seen = (el._gpumemSeen = el._gpumemSeen || []);
  const now = t ? t.textContent : '';
  if (seen[seen.length - 1] !== now) seen.push(now);
  return new Set(seen).size >= n;
}"""


def numbers_seen(scope, n: int, timeout: float) -> list[str]:
    """The gauge's numbers in `scope` from now until `n` different ones were drawn (or `timeout`
    ms passed): the numbers, in order."""
    handle = scope.element_handle()
    try:
        scope.page.wait_for_function(NUMBERS_SEEN_JS, arg=[handle, n], timeout=timeout)
    except _browser.sync_api.TimeoutError:
        pass  # the caller's assertion says what was seen
    return handle.evaluate("e => e._gpumemSeen || []")


# True once the gauge's history (plotly's first stacked series, PyTorch allocated) ends at `gib`:
# the last sample drawn, as the dial's number says.
HISTORY_ENDS_AT_JS = """([el, gib]) => {
  const gd = el.querySelector('.js-plotly-plot');
  const ys = gd && gd.data && gd.data[1] && gd.data[1].y;
  return !!ys && ys.length > 1 && Math.abs(ys[ys.length - 1] - gib) < 1e-6;
}"""


def history_ends_at(scope, gib: float) -> None:
    scope.page.wait_for_function(
        HISTORY_ENDS_AT_JS, arg=[scope.element_handle(), gib], timeout=T_RUN
    )


def run_gauge_while_allocating(page):
    """Cells 0 (the gauge) and 1 (allocates 512 MiB in steps): the gauge's number moves while
    cell 1 runs and ends at 0.50 GiB. Returns cell 0."""
    cell0 = run_cell(page, 0)
    expect(cell0.locator(".js-plotly-plot text.number")).to_have_count(1, timeout=T_RUN)
    cell1 = run_cell(page, 1)
    seen = numbers_seen(cell0, 3, timeout=15_000)
    assert len(set(seen)) >= 3, f"the gauge's number did not move: {seen}"
    expect(outputs(cell1)).to_contain_text("allocated MiB: 512", timeout=T_RUN)
    expect(cell0.locator(".js-plotly-plot text.number")).to_have_text("0.50 GiB", timeout=5_000)
    return cell0


# The theme is set and its CSS is in force: JupyterLab's background colour, as the page computes
# it, is light (or dark).
THEME_APPLIED_JS = """light => {
  if (document.body.dataset.jpThemeLight !== String(light)) return false;
  const probe = document.createElement('div');
  probe.style.background = 'var(--jp-layout-color0)';
  document.body.appendChild(probe);
  const rgb = (getComputedStyle(probe).backgroundColor.match(/[\\d.]+/g) || []).map(Number);
  probe.remove();
  if (rgb.length < 3) return false;
  const mean = (rgb[0] + rgb[1] + rgb[2]) / 3;
  return light ? mean > 155 : mean < 100;
}"""


def set_theme(page, theme: str) -> None:
    light = "true" if "Light" in theme else "false"
    page.evaluate(
        f"window.jupyterapp.commands.execute('apputils:change-theme', {{theme: '{theme}'}})"
    )
    page.wait_for_function(THEME_APPLIED_JS, arg=light == "true", timeout=T_RUN)


# Colour of an element's text, and the colour behind it: the first ancestor with an opaque enough
# background (the panel sits on the notebook's background).
COLORS_JS = """e => {
  const cs = getComputedStyle(e);
  const fg = e instanceof SVGElement ? cs.fill : cs.color;
  let n = e;
  while (n) {
    const bg = getComputedStyle(n).backgroundColor;
    const a = bg.match(/[\\d.]+/g);
    if (a && (a.length < 4 || parseFloat(a[3]) > 0.5)) return [fg, bg];
    n = n.parentElement;
  }
  return [fg, getComputedStyle(document.body).backgroundColor];
}"""


def _rgba(css: str) -> tuple[float, float, float, float]:
    v = [float(x) for x in re.findall(r"[\d.]+", css)]
    return v[0], v[1], v[2], v[3] if len(v) > 3 else 1.0


def contrast(fg: str, bg: str) -> float:
    """WCAG contrast ratio of text colour `fg` (alpha blended onto `bg`) against `bg`."""
    fr, fg_, fb, fa = _rgba(fg)
    br, bg_, bb, _ = _rgba(bg)
    blended = (fr * fa + br * (1 - fa), fg_ * fa + bg_ * (1 - fa), fb * fa + bb * (1 - fa))

    def lum(rgb) -> float:
        c = [x / 255 for x in rgb]
        c = [x / 12.92 if x <= 0.03928 else ((x + 0.055) / 1.055) ** 2.4 for x in c]
        return 0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2]

    hi, lo = sorted((lum(blended), lum((br, bg_, bb))), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


# --------------------------------------------------------------------------- #
# The quickstart: an OOM, the panel, Reduce batch
# --------------------------------------------------------------------------- #
SETUP = """\
%load_ext jupyter_gpumem
%gpumem simulate 1GiB
import torch
# ~25 MiB of activations a sample with little compute: a batch of 64 needs ~1.6 GiB
model = torch.nn.Sequential(
    torch.nn.Linear(1024, 16), torch.nn.Linear(16, 8192),
    torch.nn.ReLU(), torch.nn.GELU(), torch.nn.Tanh(), torch.nn.Linear(8192, 8),
).cuda()
"""
OOM_CELL = """\
batch_size = 64
x = torch.randn(batch_size, 256, 1024, device="cuda")
y = model(x)
"""
CHECK = 'print("batch " + "now", batch_size, tuple(y.shape))'
FIX_LABELS = ("Clear cache", "Reduce batch", "Enable autocast", "Move to CPU")


def fail_and_show_panel(page):
    """Run SETUP and the OOM cell; return (cell, panel) once the panel and its chart are drawn."""
    cell0 = run_cell(page, 0)
    expect(outputs(cell0).first).to_contain_text("Simulated GPU of 1.00 GiB", timeout=T_RUN)
    cell = run_cell(page, 1)
    panel = cell.locator(".gpumem-panel")
    expect(panel).to_contain_text("GPU out of memory", timeout=T_RUN)
    expect(outputs(cell).first).to_contain_text("OutOfMemoryError")
    expect(panel.locator(".gpumem-chart")).to_have_count(1, timeout=T_RUN)
    for label in FIX_LABELS:
        expect(panel.get_by_role("button", name=re.compile("^" + label))).to_have_count(1)
    return cell, panel


def fits_at(panel) -> int:
    """Wait for the success line; the batch that fit, with the line to change."""
    status = panel.locator(".gpumem-status")
    expect(status).to_contain_text("Fits at batch", timeout=T_RUN)
    text = status.text_content() or ""
    m = re.search(r"Fits at batch (\d+) \(was 64\)", text)
    assert m, text
    found = int(m.group(1))
    assert 20 <= found < 64, text
    expect(status).to_contain_text(f"batch_size = {found}")
    return found


def test_quickstart_reduce_batch_click_rescues_the_cell(open_notebook, shots):
    page = open_notebook("quickstart.ipynb", [SETUP, OOM_CELL, CHECK], viewport=(1400, 1500))
    cell, panel = fail_and_show_panel(page)

    # the fixes are the panel's only buttons (no plotly toolbar ahead of them in the Tab order),
    # each a real <button> that takes focus; Reduce batch is offered
    buttons = panel.get_by_role("button")
    expect(buttons).to_have_count(len(FIX_LABELS))
    for b in buttons.all():
        assert b.evaluate("e => e.tagName") == "BUTTON"
        assert b.evaluate("e => e.tabIndex") >= 0
    reduce = panel.get_by_role("button", name=re.compile("^Reduce batch"))
    expect(reduce).to_be_enabled()
    # the chart (HTML, no plotly) and its legend lie within the panel, below the buttons (the
    # headline and the fixes first, then why)
    legend = panel.locator(".gpumem-chart ul").bounding_box()
    plot = panel.locator(".gpumem-chart").bounding_box()
    assert legend and plot and within(legend, plot), (legend, plot)
    assert within(plot, panel.bounding_box())
    first = buttons.first.bounding_box()
    assert plot["y"] >= first["y"] + first["height"] - 1
    expect(panel.locator(".gpumem-chart")).not_to_contain_text("GiB")  # MiB, as the text
    cell.scroll_into_view_if_needed()
    shots(cell, "panel-oom.png")

    reduce.click()
    found = fits_at(panel)
    # usable again (another fix would re-run the cell as it was), and the status says so
    expect(reduce).to_be_enabled()
    expect(panel.locator(".gpumem-status")).to_contain_text("Another button would run the cell")
    cell.scroll_into_view_if_needed()
    shots(cell, "panel-fixed.png")

    # the kernel holds the run that fit
    check = run_cell(page, 2)
    expect(outputs(check)).to_contain_text(f"batch now {found} ({found}, 256, 8)")


# --------------------------------------------------------------------------- #
# Keyboard, and the dark theme
# --------------------------------------------------------------------------- #
def test_keyboard_fix_and_dark_theme_readability(open_notebook, shots):
    page = open_notebook("dark.ipynb", [SETUP, OOM_CELL], viewport=(1400, 1500))
    cell, panel = fail_and_show_panel(page)

    # Tab from the first fix button reaches the next one; Space presses it
    first = panel.get_by_role("button", name=re.compile("^" + FIX_LABELS[0]))
    reduce = panel.get_by_role("button", name=re.compile("^Reduce batch"))
    first.focus()
    expect(first).to_be_focused()
    page.keyboard.press("Tab")
    expect(reduce).to_be_focused()
    page.keyboard.press("Space")
    fits_at(panel)

    set_theme(page, "JupyterLab Dark")
    try:
        assert page.evaluate("document.body.dataset.jpThemeName") == "JupyterLab Dark"
        checks = {
            "headline": panel.locator(".gpumem-diag h4"),
            "cause": panel.locator(".gpumem-diag li").first,
            "status": panel.locator(".gpumem-status .gpumem-ok"),
            "legend": panel.locator(".gpumem-chart li").first,
            "tick": panel.locator(".gpumem-chart .gpumem-scale span").last,
        }
        ratios = {}
        for name, loc in checks.items():
            fg, bg = loc.evaluate(COLORS_JS)
            ratios[name] = (round(contrast(fg, bg), 2), fg, bg)
        bg_lum = _rgba(ratios["headline"][2])[:3]
        assert sum(bg_lum) / 3 < 100, f"the panel is not on a dark background: {ratios}"
        # body text: WCAG AA (4.5); the chart's small grey labels: at least 3
        for name in ("headline", "cause", "status", "legend"):
            assert ratios[name][0] >= 4.5, f"{name} unreadable on dark: {ratios}"
        assert ratios["tick"][0] >= 3, f"axis labels unreadable on dark: {ratios}"
        cell.scroll_into_view_if_needed()
        panel.scroll_into_view_if_needed()
        shots(panel, "panel-dark.png")
    finally:
        set_theme(page, "JupyterLab Light")  # the theme is a saved setting: later tests need Light


# --------------------------------------------------------------------------- #
# A narrow window, and Run All
# --------------------------------------------------------------------------- #
# every element of the panel whose right edge lies past the panel's (or the panel past its cell's)
PAST_EDGE_JS = """p => {
  const edge = p.getBoundingClientRect().right + 1;
  const out = p.closest('.jp-OutputArea-output, .jp-Cell').getBoundingClientRect().right + 1;
  const bad = [];
  if (edge > out) bad.push(`panel ${edge} > cell ${out}`);
  for (const e of p.querySelectorAll('*')) {
    const r = e.getBoundingClientRect();
    if (r.width > 0 && r.right > edge) bad.push(`${e.tagName}.${e.className} ${r.right}`);
  }
  return bad;
}"""


# The window is `height` px tall and JupyterLab has laid its panels out again (the notebook reaches
# the window's bottom, less its status bar)
LAID_OUT_JS = """height => {
  const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
  return window.innerHeight === height && !!w
    && w.node.getBoundingClientRect().bottom > height - 100;
}"""


def test_panel_fits_a_narrow_window(open_notebook, shots):
    page = open_notebook("narrow.ipynb", [SETUP, OOM_CELL], viewport=(800, 1200))
    cell, panel = fail_and_show_panel(page)
    past = panel.evaluate(PAST_EDGE_JS)
    assert past == [], f"{len(past)} elements past the panel's edge: {past[:20]}"
    reduce = panel.get_by_role("button", name=re.compile("^Reduce batch"))
    reduce.click()
    fits_at(panel)
    past = panel.evaluate(PAST_EDGE_JS)
    assert past == [], f"after the fix, {len(past)} elements past the edge: {past[:20]}"
    # taller, as wide: the whole panel in view, none of it under JupyterLab's toolbar
    page.set_viewport_size({"width": 800, "height": 2400})
    page.wait_for_function(LAID_OUT_JS, arg=2400, timeout=T_RUN)
    assert panel.evaluate(PAST_EDGE_JS) == []
    cell.scroll_into_view_if_needed()
    shots(panel, "panel-narrow.png")


def test_run_all_stops_at_the_oom_in_the_quickstart(open_notebook):
    """Run All went past the OOM in the quickstart: its OOM cell carried the `raises-exception`
    tag, with which JupyterLab sends stop_on_error=False. An OOM stops Run All like any error."""
    page = open_notebook("quickstart.ipynb", ROOT / "notebooks" / "quickstart.ipynb")
    page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
    code = page.locator(".jp-Notebook .jp-CodeCell")
    oom = page.locator(".jp-Notebook .jp-CodeCell", has=page.locator(".gpumem-panel"))
    expect(oom.locator(".gpumem-panel")).to_contain_text("GPU out of memory", timeout=T_LONG)
    page.wait_for_function(KERNEL_READY_JS, timeout=T_RUN)
    sources = [c.locator(".cm-content").text_content() or "" for c in code.all()]
    at = next(i for i, src in enumerate(sources) if "logits = model(ids)" in src)
    assert at < len(sources) - 1
    # Run All queued every cell ([*]); once none after the OOM waits any more (each ran, or the
    # kernel aborted it), none of them ran
    for i in range(at + 1, len(sources)):
        expect(code.nth(i).locator(".jp-InputPrompt")).not_to_contain_text("*", timeout=T_RUN)
    for i in range(at + 1, len(sources)):
        assert outputs(code.nth(i)).count() == 0, outputs(code.nth(i)).all_text_contents()
        assert "*" not in (code.nth(i).locator(".jp-InputPrompt").text_content() or "")


# --------------------------------------------------------------------------- #
# The live gauge
# --------------------------------------------------------------------------- #
GAUGE = """\
%load_ext jupyter_gpumem
%gpumem simulate 1GiB
import torch, time
%config GpuMem.gauge_interval = 0.3
%gpumem gauge
"""
ALLOC = """\
blocks = []
for i in range(8):
    blocks.append(torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda"))
    time.sleep(0.5)
print("allocated " + "MiB:", torch.cuda.memory_allocated() >> 20)
"""


def test_gauge_moves_while_a_cell_allocates(open_notebook, shots):
    page = open_notebook("gauge.ipynb", [GAUGE, ALLOC])
    cell0 = run_gauge_while_allocating(page)
    history_ends_at(cell0, 0.5)  # the history's last sample drawn
    cell0.scroll_into_view_if_needed()
    shots(cell0.locator(".jp-OutputArea"), "gauge.png")


# --------------------------------------------------------------------------- #
# The sidebar
# --------------------------------------------------------------------------- #
SIDEBAR = """\
%load_ext jupyter_gpumem
%gpumem simulate 1GiB
%config GpuMem.gauge_interval = 0.3
import torch, time
%gpumem sidebar
blocks = []
for i in range(4):
    time.sleep(0.4)
    blocks.append(torch.empty(96 * 2**20, dtype=torch.uint8, device="cuda"))
"""


def test_sidebar_holds_the_gauge_within_its_width(open_notebook, shots):
    page = open_notebook("sidebar.ipynb", [SIDEBAR], viewport=(1200, 800))
    cell = run_cell(page, 0)
    # JupyterLab found from the kernel's parent processes (no JUPYTER_GPUMEM_FRONTEND here)
    expect(outputs(cell)).to_contain_text("right sidebar", timeout=T_RUN)
    right = page.locator("#jp-right-stack")
    expect(right.locator(".js-plotly-plot text.number")).to_have_count(1, timeout=T_RUN)
    expect(
        page.locator(".jp-SideBar.jp-mod-right .lm-TabBar-tab", has_text="GPU memory")
    ).to_have_count(1)
    expect(right.locator(".js-plotly-plot text.number")).to_have_text("0.38 GiB", timeout=T_RUN)
    panel = right.bounding_box()
    plot = right.locator(".js-plotly-plot").bounding_box()
    assert panel and plot and within(plot, panel), (plot, panel)
    # and nothing in it is clipped: the gauge's title lines and numbers lie within the panel
    for text in right.locator(".js-plotly-plot text").all():
        box = text.bounding_box()
        if box and box["width"] > 0:
            assert within(box, panel), (text.text_content(), box, panel)
    history_ends_at(right, 0.375)  # the history's last step drawn
    shots(page, "sidebar.png")


# --------------------------------------------------------------------------- #
# A DataLoader training loop, rescued from a button (its callback's thread)
# --------------------------------------------------------------------------- #
TRAIN_SETUP = """\
%load_ext jupyter_gpumem
%gpumem simulate 128MiB
import threading
import torch
from torch.utils.data import DataLoader, TensorDataset
torch.manual_seed(0)
ds = TensorDataset(torch.randn(1024, 1024), torch.randn(1024, 1))
loader = DataLoader(ds, batch_size=256, shuffle=True)
# 256 KiB of activations a sample in the wide layer: a batch of 256 does not fit in 128 MiB
model = torch.nn.Sequential(
    torch.nn.Linear(1024, 16), torch.nn.Linear(16, 65536), torch.nn.ReLU(),
    torch.nn.Linear(65536, 1),
).cuda()
opt = torch.optim.SGD(model.parameters(), lr=1e-3)
ran_on = []
"""
TRAIN = """\
ran_on.append(threading.get_ident())
for xb, yb in loader:
    xb, yb = xb.cuda(), yb.cuda()
    loss = torch.nn.functional.mse_loss(model(xb), yb)
    opt.zero_grad()
    loss.backward()
    opt.step()
"""
TRAIN_CHECK = 'print("threads " + "used:", len(set(ran_on)), "loss finite:", bool(loss.isfinite()))'


def test_training_loop_rescued_from_a_button_runs_on_the_simulated_gpu(open_notebook):
    """Issue 7, item 7: a button's callback may run on another thread than `%gpumem simulate`;
    the re-run must still see the simulated card (not "Torch not compiled with CUDA")."""
    page = open_notebook("training.ipynb", [TRAIN_SETUP, TRAIN, TRAIN_CHECK])
    setup = run_cell(page, 0)
    expect(outputs(setup).first).to_contain_text("Simulated GPU", timeout=T_RUN)
    cell = run_cell(page, 1)
    panel = cell.locator(".gpumem-panel")
    expect(panel).to_contain_text("GPU out of memory", timeout=T_RUN)
    reduce = panel.get_by_role("button", name=re.compile("^Reduce batch"))
    expect(reduce).to_be_enabled()
    t0 = time.monotonic()
    reduce.click()
    status = panel.locator(".gpumem-status")
    # the guard asks first (the loop steps `opt`): Re-run anyway, until the fix's result
    answer_until(panel, status.filter(has_text=re.compile("✓|✗|jupyter_gpumem:")))
    text = status.text_content() or ""
    took = time.monotonic() - t0
    assert text.strip().startswith("✓"), (took, text)
    assert re.search(r"Fits at batch \d+ \(was 256\)", text), text
    assert "not compiled with CUDA" not in (panel.text_content() or "")
    assert "not compiled with CUDA" not in " ".join(outputs(cell).all_text_contents())
    # the buttons can be used again, and the status says what another click would do
    expect(reduce).to_be_enabled()
    assert "Another button would run the cell again" in text
    check = run_cell(page, 2)
    expect(outputs(check)).to_contain_text("loss finite: True", timeout=T_RUN)
    print(f"rescued in {took:.1f} s;", outputs(check).first.text_content())


# --------------------------------------------------------------------------- #
# Cancel while a fix runs
# --------------------------------------------------------------------------- #
SLOW_SETUP = """\
%load_ext jupyter_gpumem
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
    time.sleep(0.25)
"""
SLOW_CHECK = 'print("total " + "now", total, "batch", batch_size)'


def answer_until(
    panel, done, answer=lambda button: button.click(timeout=5000), timeout: float = T_RUN
) -> None:
    """Wait until `done` (a locator) is visible; each time the guard asks first, press
    "Re-run anyway" (with `answer`: a click, or the keyboard)."""
    anyway = panel.get_by_role("button", name="Re-run anyway")
    deadline = time.monotonic() + timeout / 1000
    while True:
        left = max(deadline - time.monotonic(), 0.001) * 1000
        expect(done.or_(anyway).first).to_be_visible(timeout=left)
        if done.first.is_visible():
            return
        if anyway.is_visible():
            try:
                answer(anyway)
            except _browser.sync_api.TimeoutError:
                # it went between the look and the press (the answer before it started the
                # fix): look again rather than wait for a button that is gone
                if time.monotonic() > deadline:
                    raise


def start_fix(panel, label: str) -> None:
    """Click a fix's button (and "Re-run anyway" if the guard asks); return once it runs."""
    panel.get_by_role("button", name=re.compile("^" + label)).click()
    answer_until(panel, panel.locator(".gpumem-status").filter(has_text="Running"))


def rerun_under_way(status) -> None:
    """Until the running fix's log lists a re-run that ended (out of memory at the cell's batch):
    the next re-run is under way, and has changed the notebook's variables."""
    expect(status.locator("pre")).to_contain_text(re.compile(r"batch \d+: "), timeout=T_RUN)


def cancel_a_slow_fix(page, shot=None) -> None:
    """Start Reduce batch on a slow cell, click Cancel, check the status and the namespace;
    ``shot(locator)`` takes a picture of the running fix with its Cancel button."""
    setup = run_cell(page, 0)
    expect(outputs(setup).first).to_contain_text("Simulated GPU", timeout=T_RUN)
    cell = run_cell(page, 1)
    panel = cell.locator(".gpumem-panel")
    expect(panel).to_contain_text("GPU out of memory", timeout=T_RUN)
    cancel = panel.locator("button.gpumem-cancel")
    expect(cancel).to_be_hidden()  # only while a fix runs
    start_fix(panel, "Reduce batch")
    expect(cancel).to_be_visible()
    expect(cancel).to_have_text("Cancel")
    status = panel.locator(".gpumem-status")
    expect(status).to_contain_text("click Cancel", timeout=T_RUN)
    rerun_under_way(status)
    assert "Running" in (status.text_content() or "")
    if shot is not None:
        shot(panel.locator(".gpumem-buttons").first, status)
    t0 = time.monotonic()
    cancel.click()
    expect(status).to_contain_text("Cancelled: nothing changed", timeout=T_RUN)
    print(f"Cancel -> 'Cancelled' in the status: {time.monotonic() - t0:.2f} s")
    expect(status).to_contain_text("Restored the notebook's variables")
    expect(status).not_to_contain_text("Running")
    expect(cancel).to_be_hidden()
    expect(panel.get_by_role("button", name=re.compile("^Reduce batch"))).to_be_enabled()
    page.wait_for_function(KERNEL_READY_JS, timeout=T_RUN)
    check = run_cell(page, 2)
    expect(outputs(check)).to_contain_text("total now 0 batch 64", timeout=T_RUN)


def test_cancel_interrupts_a_running_fix_and_nothing_changes(open_notebook, shots):
    """Issue 12: a Cancel while a fix runs. It interrupts the kernel through the server's REST
    API from the page (no comm message reaches a kernel busy with the fix); the fix's transaction
    puts the notebook back, and the status ends in that result, not in "Running..."."""
    page = open_notebook("cancel.ipynb", [SLOW_SETUP, SLOW_CELL, SLOW_CHECK], viewport=(1400, 1500))

    def shot(buttons, status) -> None:  # the buttons, the running status and Cancel
        buttons.scroll_into_view_if_needed()
        top, bottom = buttons.bounding_box(), status.bounding_box()
        clip = {
            "x": top["x"] - 8,
            "y": top["y"] - 8,
            "width": max(top["width"], bottom["width"]) + 16,
            "height": bottom["y"] + bottom["height"] - top["y"] + 16,
        }
        shots(_Clip(page, clip), "panel-running.png")

    cancel_a_slow_fix(page, shot)


class _Clip:
    """A part of the page, for `shots`."""

    def __init__(self, page, clip) -> None:
        self.page, self.clip = page, clip

    def screenshot(self, **kwargs) -> None:
        self.page.screenshot(clip=self.clip, **kwargs)


# --------------------------------------------------------------------------- #
# Another notebook's kernel holds memory on the card
# --------------------------------------------------------------------------- #
OTHER_OOM = "x = torch.empty(600 << 20, dtype=torch.uint8, device='cuda')"


def test_shut_down_another_notebooks_kernel_from_the_panel(lab, open_notebook, shots):
    """Issue 11 §4: a second real kernel of the same server, for "other/train.ipynb", is the other
    process on the (simulated) card; the panel offers to shut it down, asks first naming the
    notebook, then does it through the server's API."""
    _, session = _browser._api(
        lab,
        "/api/sessions",
        "POST",
        body={"path": "other/train.ipynb", "type": "notebook", "kernel": {"name": "python3"}},
        timeout=60,
    )
    kid = session["kernel"]["id"]
    pid = _kernel_pid(kid)
    setup = (
        "%load_ext jupyter_gpumem\nimport jupyter_gpumem, torch\n"
        f"gpu = jupyter_gpumem.simulate('1GiB', other_processes=[({pid}, 600 << 20)])\n"
        'print("simulated " + "card", gpu.total_bytes >> 20)'
    )
    page = open_notebook("others.ipynb", [setup, OTHER_OOM], viewport=(1400, 1500))
    expect(outputs(run_cell(page, 0)).first).to_contain_text("simulated card 1024", timeout=T_RUN)
    cell = run_cell(page, 1)
    panel = cell.locator(".gpumem-panel")
    expect(panel).to_contain_text("GPU out of memory", timeout=T_RUN)
    offer = panel.get_by_role("button", name="Shut down the kernel of train.ipynb (~600 MiB)")
    expect(offer).to_be_visible()

    offer.click()  # asks first, naming the notebook
    ask = panel.locator(".gpumem-ask")
    expect(ask).to_contain_text("Shut down the kernel of notebook other/train.ipynb", timeout=T_RUN)
    expect(ask).to_contain_text(f"600 MiB on this GPU (pid {pid})")
    assert any(k["id"] == kid for k in _browser._api(lab, "/api/kernels")[1])
    ask.scroll_into_view_if_needed()
    box = panel.bounding_box()
    top = panel.locator(".gpumem-buttons").first.bounding_box()
    bottom = panel.get_by_role("button", name="Keep it").bounding_box()
    clip = {
        "x": box["x"] - 8,
        "y": top["y"] - 8,
        "width": box["width"] + 16,
        "height": bottom["y"] + bottom["height"] - top["y"] + 16,
    }
    shots(_Clip(page, clip), "panel-other-kernel.png")
    panel.get_by_role("button", name="Shut it down").click()

    status = panel.locator(".gpumem-status")
    expect(status).to_contain_text(
        "✓ Shut down the kernel of notebook other/train.ipynb", timeout=T_RUN
    )
    expect(status).to_contain_text(f"its process (pid {pid}) has exited")
    assert not any(k["id"] == kid for k in _browser._api(lab, "/api/kernels")[1])
    expect(panel.get_by_role("button", name="Kernel of train.ipynb shut down")).to_be_disabled()


CANCEL_UNKNOWN = """\
from jupyter_gpumem.ui.status import StatusLine
line = StatusLine(value="Running <b>a fix</b>", running=True, kernel_id="no-such-kernel")
line
"""


def test_cancel_that_cannot_interrupt_says_so_and_stays_usable(open_notebook):
    """The page's interrupt is refused (a kernel id the server does not know): Cancel says why
    and how else to stop the fix, and can be clicked again. A 404, not a 403: the server took
    the page's credentials (its token, or the login cookie with the _xsrf header)."""
    page = open_notebook("cancel-unknown.ipynb", [CANCEL_UNKNOWN])
    cell = run_cell(page, 0)
    cancel = cell.locator("button.gpumem-cancel")
    expect(cancel).to_be_visible(timeout=T_RUN)
    cancel.click()
    note = cell.locator(".gpumem-cancel-note")
    expect(note).to_contain_text("Could not interrupt the kernel (HTTP 404)", timeout=T_RUN)
    expect(note).to_contain_text("toolbar's stop button")
    expect(cancel).to_be_enabled()
    expect(cancel).to_have_text("Cancel")


# --------------------------------------------------------------------------- #
# Allocated by (tracing on): the table and Save snapshot
# --------------------------------------------------------------------------- #
TRACE_SETUP = """\
%load_ext jupyter_gpumem
%gpumem simulate 160MiB --devices 2
import torch
%gpumem trace on
"""
TRACE_OOM = """\
a = torch.zeros(15 << 20, device='cuda')  # 60 MiB
b = torch.zeros(15 << 20, device='cuda')  # 60 MiB
c = torch.zeros(15 << 20, device='cuda')  # 60 MiB: out of memory
"""


def test_save_snapshot_from_the_panel_writes_the_file(lab, open_notebook):
    """Issue 11 §1: with tracing on, the panel's Allocated by table, and Save snapshot writing
    the pickle pytorch.org/memory_viz opens, its path in the status line; every GPU listed, the
    OOM's marked; at 800 px nothing of it past the panel's edge."""
    page = open_notebook("trace.ipynb", [TRACE_SETUP, TRACE_OOM], viewport=(800, 1400))
    expect(outputs(run_cell(page, 0)).first).to_contain_text("Tracing allocations", timeout=T_RUN)
    cell = run_cell(page, 1)
    panel = cell.locator(".gpumem-panel")
    expect(panel).to_contain_text("GPU out of memory", timeout=T_RUN)
    table = panel.locator(".gpumem-allocs")
    expect(table).to_contain_text("Allocated by")
    expect(table.locator("tr")).to_have_count(3)  # the header, line 1, line 2
    expect(table.locator(".gpumem-minibar")).to_have_count(2)
    expect(panel.locator(".gpumem-devices tr.gpumem-oom")).to_contain_text("GPU 0 ◀ this OOM")
    expect(panel.locator(".gpumem-devices tr")).to_have_count(3)
    past = panel.evaluate(PAST_EDGE_JS)
    assert past == [], f"{len(past)} elements past the panel's edge: {past[:20]}"
    panel.get_by_role("button", name="Save snapshot").click()
    status = panel.locator(".gpumem-status")
    expect(status).to_contain_text("Saved", timeout=T_RUN)
    expect(status).to_contain_text("nothing is uploaded")
    path = Path(status.locator("code").first.text_content() or "")
    assert path.name == "gpumem_snapshot.pickle" and path.is_absolute(), path
    assert path.exists() and path.stat().st_size > 0, path
    assert path.parent == lab.root, (path, lab.root)  # the notebook's folder: the kernel's cwd


TWO_GPUS = """\
%load_ext jupyter_gpumem
%gpumem simulate 1GiB --devices 2
import torch
"""
ON_GPU_0 = """\
u = torch.empty(700 << 20, dtype=torch.uint8, device="cuda:0")
v = torch.empty(600 << 20, dtype=torch.uint8, device="cuda:0")
"""


def test_the_panel_names_the_other_gpu_for_the_tensor_that_did_not_fit(open_notebook, shots):
    """Two 1 GiB cards, 700 then 600 MiB on cuda:0: the panel says where the 600 MiB fits."""
    page = open_notebook("two-gpus.ipynb", [TWO_GPUS, ON_GPU_0])
    cell0 = run_cell(page, 0)
    expect(outputs(cell0).first).to_contain_text("2 simulated GPUs", timeout=T_RUN)
    cell = run_cell(page, 1)
    panel = cell.locator(".gpumem-panel")
    expect(panel).to_contain_text("GPU out of memory", timeout=T_RUN)
    expect(panel).to_contain_text("GPU 1 has room for the tensor that did not fit", timeout=T_RUN)
    expect(panel).to_contain_text("device='cuda:1'")
    cell.scroll_into_view_if_needed()
    shots(panel, "panel-two-gpus.png")
