"""jupyter_gpumem in a real JupyterLab, in Debian's Chromium through Playwright.

Adapted from ../shared/recipes/browser/test_widget_ui.py (its pitfalls are documented there).

Starts a private, headless JupyterLab on 127.0.0.1, opens a notebook in
Debian's /usr/bin/chromium through Playwright (Python package; its own
browser download is NOT used), runs cells with Shift+Enter, clicks an
ipywidgets Button and checks that the kernel-side on_click callback ran.

Env knobs:
  CHROMIUM       path of the browser   (default: `which chromium` or /usr/bin/chromium)
  UI_ARTIFACTS   folder for screenshots (default: folder of this file)
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

nbformat = pytest.importorskip("nbformat")
psutil = pytest.importorskip("psutil")
sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect

CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("UI_ARTIFACTS", ROOT / "tests" / "artifacts"))
SCREENSHOTS = ROOT / "docs" / "screenshots"
CHROME_ARGS = [
    # Playwright itself adds --headless and a fresh temporary --user-data-dir.
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
T_LONG = 90_000  # ms: first notebook load + kernel start on a 2-core box

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM}"),
]


# --------------------------------------------------------------------------- #
# JupyterLab server
# --------------------------------------------------------------------------- #
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api(lab, path, method="GET", timeout=5):
    req = urllib.request.Request(
        f"{lab.base}{path}",
        method=method,
        headers={"Authorization": f"token {lab.token}"},
        data=b"" if method == "POST" else None,
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        body = r.read()
        return r.status, (json.loads(body) if body else None)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    root = tmp_path_factory.mktemp("lab_root")
    home = tmp_path_factory.mktemp("lab_home")
    port, token = _free_port(), secrets.token_hex(16)
    settings = home / "settings"
    # Without this JupyterLab 4 pops a "get notified about official Jupyter
    # news?" toast over the notebook (LabApp.news_url=None does not stop it).
    notif = settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    notif.parent.mkdir(parents=True)
    notif.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    env = dict(
        os.environ,
        # keep the user's Jupyter config/runtime files out of the test
        JUPYTER_CONFIG_DIR=str(home / "config"),
        JUPYTER_RUNTIME_DIR=str(home / "runtime"),
        PYTHONUNBUFFERED="1",
        PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    cmd = [
        sys.executable,
        "-m",
        "jupyterlab",
        "--no-browser",
        f"--port={port}",
        "--ServerApp.port_retries=0",
        f"--ServerApp.token={token}",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.root_dir={root}",
        # no outbound traffic from the server
        "--LabApp.news_url=None",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        "--LabApp.extension_manager=readonly",
        f"--LabApp.user_settings_dir={settings}",
        f"--LabApp.workspaces_dir={home / 'workspaces'}",
        # window.jupyterapp: lets the test wait until the kernel is connected
        "--LabApp.expose_app_in_browser=True",
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")  # CI containers often run as root
    log_path = home / "lab.log"
    log = open(log_path, "w")  # noqa: SIM115 (closed in teardown)
    proc = subprocess.Popen(
        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    ns = SimpleNamespace(
        base=f"http://127.0.0.1:{port}", token=token, root=root, proc=proc, log=log_path
    )
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"jupyter lab exited {proc.returncode}:\n{log_path.read_text()}")
        try:
            if _api(ns, "/api/status", timeout=2)[0] == 200:
                break
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"jupyter lab did not come up:\n{log_path.read_text()}")
        time.sleep(0.25)

    yield ns

    # ---- clean shutdown: server stops its kernels, then exits -------------
    try:
        kids = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        kids = []
    try:
        _api(ns, "/api/shutdown", method="POST")
        proc.wait(timeout=30)
    except Exception:
        os.killpg(proc.pid, 9)
        proc.wait(timeout=10)
    _, alive = psutil.wait_procs(kids, timeout=15)
    for p in alive:
        p.kill()
    log.close()
    assert proc.returncode == 0, log_path.read_text()[-3000:]
    assert not alive, f"left-over processes after shutdown: {alive}"


# --------------------------------------------------------------------------- #
# Browser
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROME_ARGS)
        yield b
        b.close()


@pytest.fixture
def open_notebook(lab, browser, request):
    """open_notebook(name, [cell sources]) -> page with the kernel idle."""
    pages = []
    failed_before = request.session.testsfailed

    def _open(name, cells):
        nb = nbformat.v4.new_notebook()
        nb.cells = [nbformat.v4.new_code_cell(src) for src in cells]
        nb.metadata["kernelspec"] = {
            "name": "python3",
            "display_name": "Python 3 (ipykernel)",
            "language": "python",
        }
        nbformat.write(nb, str(lab.root / name))
        ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
        page = ctx.new_page()
        page.console_lines = []
        page.on("console", lambda m: page.console_lines.append(f"{m.type}: {m.text}"))
        page.on("pageerror", lambda e: page.console_lines.append(f"pageerror: {e}"))
        pages.append(page)
        page.goto(f"{lab.base}/lab/tree/{name}?reset&token={lab.token}")
        # Wait until the notebook's kernel is connected and idle. The status
        # widgets say "Idle" earlier than that, and a cell run before the
        # session has a kernel is silently dropped (prompt stays "[ ]").
        page.wait_for_function(KERNEL_READY_JS, timeout=T_LONG)
        expect(page.locator(".jp-Notebook .jp-Cell")).to_have_count(len(cells))
        return page

    yield _open

    failed = request.session.testsfailed > failed_before  # call phase already reported
    for page in pages:
        if failed:
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / f"fail-{request.node.name}.png"))
            print("\n".join(page.console_lines[-50:]))
        page.context.close()


KERNEL_READY_JS = """() => {
  const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
  const k = w && w.sessionContext && w.sessionContext.session
            && w.sessionContext.session.kernel;
  return !!k && k.connectionStatus === 'connected' && k.status === 'idle';
}"""


def run_cell(page, index):
    """Put cell `index` in edit mode and press Shift+Enter, like a person."""
    cell = page.locator(".jp-Notebook .jp-Cell").nth(index)
    cell.locator(".cm-content").click()
    page.keyboard.press("Shift+Enter")
    return cell


def gauge_number(page) -> str:
    return page.locator(".js-plotly-plot .indicatorlayer text.number").first.text_content() or ""


# --------------------------------------------------------------------------- #
# Tests
# --------------------------------------------------------------------------- #
SETUP = """\
%load_ext jupyter_gpumem
%gpumem simulate 160MiB
import torch
model = torch.nn.Sequential(torch.nn.Linear(1024, 2048), torch.nn.ReLU(),
                            torch.nn.Linear(2048, 1024)).cuda()
"""
OOM_CELL = """\
batch_size = 256
x = torch.randn(batch_size, 32, 1024, device="cuda")
out = model(x).sum()
"""
CHECK = 'print("batch " + "now", batch_size)'


def shot(page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / name))


def test_panel_reduce_batch_click_rescues_the_cell(open_notebook):
    page = open_notebook("quick.ipynb", [SETUP, OOM_CELL, CHECK])
    run_cell(page, 0)
    cell = run_cell(page, 1)
    panel = cell.locator(".gpumem-panel")
    expect(panel).to_contain_text("GPU out of memory: Tried to allocate", timeout=T_LONG)
    expect(cell.locator(".jp-OutputArea-output").first).to_contain_text("OutOfMemoryError")
    expect(panel.locator(".js-plotly-plot")).to_have_count(1, timeout=T_LONG)
    for label in ("Clear cache", "Reduce batch", "Enable autocast", "Move to CPU"):
        expect(panel.get_by_role("button", name=re.compile("^" + label))).to_have_count(1)
    panel.scroll_into_view_if_needed()
    shot(page, "panel-oom.png")

    # keyboard: the button takes focus and Enter presses it
    button = panel.get_by_role("button", name=re.compile("^Reduce batch"))
    button.focus()
    page.keyboard.press("Enter")
    status = panel.locator(".gpumem-status")
    expect(status).to_contain_text("Fits at batch", timeout=T_LONG)
    text = status.text_content() or ""
    found = int(re.search(r"Fits at batch (\d+) \(was 256\)", text).group(1))
    assert 150 < found < 256
    expect(status).to_contain_text(f"batch_size = {found}")
    shot(page, "panel-fixed.png")
    check = run_cell(page, 2)
    expect(check.locator(".jp-OutputArea-output")).to_contain_text(f"batch now {found}")

    # readable in JupyterLab's dark theme: the panel's text follows the theme's colours
    page.evaluate(
        "window.jupyterapp.commands.execute('apputils:change-theme', {theme: 'JupyterLab Dark'})"
    )
    page.wait_for_function("document.body.dataset.jpThemeLight === 'false'", timeout=T_LONG)
    page.wait_for_timeout(500)
    headline = panel.locator(".gpumem-diag h4")
    fg = headline.evaluate("e => getComputedStyle(e).color")
    bg = page.locator(".jp-Notebook").evaluate("e => getComputedStyle(e).backgroundColor")
    assert luminance(fg) - luminance(bg) > 0.4, (fg, bg)
    panel.scroll_into_view_if_needed()
    shot(page, "panel-dark.png")
    page.evaluate(
        "window.jupyterapp.commands.execute('apputils:change-theme', {theme: 'JupyterLab Light'})"
    )


def luminance(css: str) -> float:
    r, g, b = (int(v) / 255 for v in re.findall(r"\d+", css)[:3])
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


GAUGE = """\
%load_ext jupyter_gpumem
%gpumem simulate 1GiB
%config GpuMem.gauge_interval = 0.3
import torch, time
%gpumem gauge
"""
ALLOC = """\
blocks = []
for i in range(10):
    blocks.append(torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda"))
    time.sleep(0.6)
"""


def test_gauge_moves_while_a_cell_allocates(open_notebook):
    page = open_notebook("gauge.ipynb", [GAUGE, ALLOC])
    cell0 = run_cell(page, 0)
    expect(cell0.locator(".js-plotly-plot text.number")).to_have_count(1, timeout=T_LONG)
    run_cell(page, 1)
    seen = []
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and len(set(seen)) < 4:
        seen.append(gauge_number(page))
        page.wait_for_timeout(300)
    assert len(set(seen)) >= 4, f"gauge number did not change: {seen}"
    cell0.locator(".js-plotly-plot").scroll_into_view_if_needed()
    shot(page, "gauge.png")


SIDEBAR = """\
%load_ext jupyter_gpumem
%gpumem simulate 1GiB
import torch
x = torch.empty(300 * 2**20, dtype=torch.uint8, device="cuda")
%gpumem sidebar
"""


def test_sidebar_holds_the_gauge_within_its_width(open_notebook):
    page = open_notebook("sidebar.ipynb", [SIDEBAR])
    cell = run_cell(page, 0)
    expect(cell.locator(".jp-OutputArea-output")).to_contain_text("right sidebar", timeout=T_LONG)
    right = page.locator("#jp-right-stack")
    expect(right.locator(".js-plotly-plot text.number")).to_have_count(1, timeout=T_LONG)
    expect(
        page.locator(".jp-SideBar.jp-mod-right .lm-TabBar-tab", has_text="GPU memory")
    ).to_have_count(1)
    panel, plot = right.bounding_box(), right.locator(".js-plotly-plot").bounding_box()
    assert plot["x"] >= panel["x"] - 1
    assert plot["x"] + plot["width"] <= panel["x"] + panel["width"] + 1
    shot(page, "sidebar.png")
