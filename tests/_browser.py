"""What the real-browser tests share: a private Jupyter server (JupyterLab 4 or Notebook 7) whose
kernels import this checkout, Debian's Chromium through Playwright, notebooks opened and cells run
like a person does, and the screenshots kept when a test passes.

Adapted from ../shared/recipes/browser/test_widget_ui.py (its pitfalls are documented there). A
test module takes the fixtures by name (``browser = _browser.browser``); a module that needs
another server (the lab extension loaded, Notebook 7) defines its own ``lab`` fixture with
:func:`serve`, and ``open_notebook`` opens its notebooks there.

Env knobs:
  CHROMIUM            path of the browser (default: `which chromium` or /usr/bin/chromium)
  UI_ARTIFACTS        folder for failure screenshots (default: tests/artifacts)
  UPDATE_SCREENSHOTS  0: leave docs/screenshots/ alone
  GPUMEM_PYTHONPATH   the copy of the package the kernels import (benchmarks/panel_latency.py)
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
HAVE_CHROMIUM = Path(CHROMIUM).exists()

nbformat = pytest.importorskip("nbformat")
psutil = pytest.importorskip("psutil")
sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("UI_ARTIFACTS", ROOT / "tests" / "artifacts"))
SCREENSHOTS = ROOT / "docs" / "screenshots"
UPDATE_SCREENSHOTS = os.environ.get("UPDATE_SCREENSHOTS", "1") != "0"
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
T_RUN = 60_000  # ms: a cell, or a fix's re-runs, on the simulated GPU

BROWSER_MARKS = [
    pytest.mark.browser,
    pytest.mark.skipif(not HAVE_CHROMIUM, reason=f"no Chromium at {CHROMIUM}"),
]


# --------------------------------------------------------------------------- #
# The Jupyter server
# --------------------------------------------------------------------------- #
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _api(lab: Any, path: str, method: str = "GET", timeout: float = 5, body: Any = None) -> Any:
    """(status, json) of a request to the server's REST API, with its token."""
    data = json.dumps(body).encode() if body is not None else (b"" if method == "POST" else None)
    req = urllib.request.Request(
        f"{lab.base}{path}",
        method=method,
        headers={"Authorization": f"token {lab.token}", "Content-Type": "application/json"},
        data=data,
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        raw = r.read()
        return r.status, (json.loads(raw) if raw else None)


def serve(app: str, tmp_path_factory: Any, *, labextension: Path | None = None) -> Iterator[Any]:
    """A private, headless Jupyter server on 127.0.0.1: ``app`` "lab" (JupyterLab) or "notebook"
    (Notebook 7); ``labextension``: a built lab extension to load, as pip would install it.

    A generator for a fixture: yields the server (``base``, ``token``, ``root``, ``app``,
    ``runtime``), then shuts it down and checks that no kernel process is left."""
    root = tmp_path_factory.mktemp(f"{app}_root")
    home = tmp_path_factory.mktemp(f"{app}_home")
    port, token = _free_port(), secrets.token_hex(16)
    settings = home / "settings"
    # Without this JupyterLab 4 (and Notebook 7) pops a "get notified about official Jupyter
    # news?" toast over the notebook (LabApp.news_url=None does not stop it).
    notif = settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    notif.parent.mkdir(parents=True)
    notif.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    env = dict(
        os.environ,
        # keep the user's Jupyter config/runtime files out of the test
        JUPYTER_CONFIG_DIR=str(home / "config"),
        JUPYTER_RUNTIME_DIR=str(home / "runtime"),
        IPYTHONDIR=str(home / "ipython"),  # no user ipython_config.py (extensions, GpuMem.*)
        PYTHONUNBUFFERED="1",
        # kernels inherit it: they import jupyter_gpumem from this checkout
        # (benchmarks/panel_latency.py --source times another copy: GPUMEM_PYTHONPATH)
        PYTHONPATH=os.environ.get("GPUMEM_PYTHONPATH", str(ROOT))
        + os.pathsep
        + os.environ.get("PYTHONPATH", ""),
    )
    # The sidebar must find its front end on its own (parent process command lines), as for a user.
    env.pop("JUPYTER_GPUMEM_FRONTEND", None)
    klass = "LabApp" if app == "lab" else "JupyterNotebookApp"
    # No outbound traffic from the server (Notebook 7 serves JupyterLab's LabApp beside it), set
    # in a config file: on the command line "jupyterlab.NeverCheckForUpdate" would make Notebook
    # 7's server look like JupyterLab to a kernel that reads its parent's command line.
    (home / "config").mkdir()
    (home / "config" / "jupyter_server_config.json").write_text(
        json.dumps(
            {
                "LabApp": {
                    "news_url": None,
                    "check_for_updates_class": "jupyterlab.NeverCheckForUpdate",
                    "extension_manager": "readonly",
                }
            }
        )
    )
    cmd = [
        sys.executable, "-m", "jupyterlab" if app == "lab" else "notebook",
        "--no-browser", f"--port={port}", "--ServerApp.port_retries=0",
        f"--ServerApp.token={token}", "--ServerApp.ip=127.0.0.1", f"--ServerApp.root_dir={root}",
        f"--{klass}.user_settings_dir={settings}",
        f"--{klass}.workspaces_dir={home / 'workspaces'}",
        # window.jupyterapp: lets the test wait until the kernel is connected
        f"--{klass}.expose_app_in_browser=True",
    ]  # fmt: skip
    if labextension is not None:
        # JupyterLab serves an extension's files from <path>/<its npm name>/static: the built
        # folder goes in under its npm name, as pip installs it
        labextensions = home / "labextensions"
        labextensions.mkdir()
        name = json.loads((labextension / "package.json").read_text())["name"]
        (labextensions / name).symlink_to(labextension, target_is_directory=True)
        cmd.append(f"--{klass}.extra_labextensions_path={labextensions}")
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")  # CI containers often run as root
    log_path = home / f"{app}.log"
    log = open(log_path, "w")  # noqa: SIM115 (closed in teardown)
    proc = subprocess.Popen(
        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    ns = SimpleNamespace(
        base=f"http://127.0.0.1:{port}",
        token=token,
        root=root,
        app=app,
        proc=proc,
        log=log_path,
        runtime=home / "runtime",
    )
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"jupyter {app} exited {proc.returncode}:\n{log_path.read_text()}")
        try:
            if _api(ns, "/api/status", timeout=2)[0] == 200:
                break
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"jupyter {app} did not come up:\n{log_path.read_text()}")
        time.sleep(0.25)

    yield ns

    # ---- clean shutdown: the server stops its kernels, then exits -------------
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


@pytest.fixture(scope="module")
def lab(tmp_path_factory: Any) -> Iterator[Any]:
    """JupyterLab 4 (a module overrides this fixture for another server)."""
    yield from serve("lab", tmp_path_factory)


# --------------------------------------------------------------------------- #
# The browser
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROME_ARGS)
        yield b
        b.close()


def _context(browser: Any) -> Any:
    """The module's browser context, made on first use and closed with its browser: each test
    opens its own page in it, which shares only the HTTP cache (and the server's login cookie)
    with the pages before it. JupyterLab's hashed files are served as immutable, so they are
    fetched once a module instead of once a test (~10 MB from the server's one Python thread)."""
    return browser.contexts[0] if browser.contexts else browser.new_context()


@pytest.fixture
def shots(request: Any, tmp_path: Path) -> Iterator[Any]:
    """shots(locator_or_page, "name.png"): kept in docs/screenshots/ only if the test passes."""
    taken: list[Path] = []
    failed_before = request.session.testsfailed

    def _shot(target: Any, name: str) -> None:
        path = tmp_path / name
        target.screenshot(path=str(path), animations="disabled")
        taken.append(path)

    yield _shot

    failed = request.session.testsfailed > failed_before
    dest = ARTIFACTS if failed else SCREENSHOTS
    if failed or UPDATE_SCREENSHOTS:
        dest.mkdir(parents=True, exist_ok=True)
        for path in taken:
            shutil.copyfile(path, dest / path.name)


# The kernel's status is the last status message of any subshell (ipykernel 7): the panel's own
# subshell going idle reads "idle" while a cell still runs, and a cell run then is aborted when
# the running one fails. So no prompt may show "[*]" either (a cell running or queued).
KERNEL_READY_JS = """() => {
  const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
  const k = w && w.sessionContext && w.sessionContext.session
            && w.sessionContext.session.kernel;
  const running = w && [...w.node.querySelectorAll('.jp-InputPrompt')]
                        .some(p => (p.textContent || '').includes('[*]'));
  return !!k && k.connectionStatus === 'connected' && k.status === 'idle' && !running;
}"""


# After a reload JupyterLab restores the saved layout, and the widget it makes current may be
# another one than the notebook (a Settings Editor open before the reload, say): make the
# notebook current again, then wait for its kernel as above.
NOTEBOOK_CURRENT_AND_READY_JS = """() => {
  const app = window.jupyterapp;
  if (!app || !app.shell) return false;
  for (const w of app.shell.widgets('main')) {
    if (!(w.sessionContext && w.content && w.content.model)) continue;
    if (app.shell.currentWidget !== w) { app.shell.activateById(w.id); return false; }
    const k = w.sessionContext.session && w.sessionContext.session.kernel;
    const running = [...w.node.querySelectorAll('.jp-InputPrompt')]
                      .some(p => (p.textContent || '').includes('[*]'));
    return !!k && k.connectionStatus === 'connected' && k.status === 'idle' && !running;
  }
  return false;
}"""


def reload_notebook(page: Any) -> None:
    """Reload the page and wait until the notebook is the current widget with its kernel idle."""
    page.reload()
    page.wait_for_function(NOTEBOOK_CURRENT_AND_READY_JS, timeout=T_LONG, polling=200)


def notebook_url(lab: Any, name: str) -> str:
    if lab.app == "lab":
        return f"{lab.base}/lab/tree/{name}?reset&token={lab.token}"
    return f"{lab.base}/notebooks/{name}?token={lab.token}"


@pytest.fixture
def open_notebook(lab: Any, browser: Any, request: Any) -> Iterator[Any]:
    """open_notebook(name, [cell sources]) -> page with the kernel idle."""
    pages = []
    failed_before = request.session.testsfailed

    def _open(name: str, cells: Any, viewport: tuple[int, int] = (1400, 1000)) -> Any:
        """`cells`: sources, or the path of a notebook to open as it is."""
        if isinstance(cells, Path):
            nb = nbformat.read(str(cells), as_version=4)
        else:
            nb = nbformat.v4.new_notebook()
            nb.cells = [nbformat.v4.new_code_cell(src) for src in cells]
        nb.metadata["kernelspec"] = {
            "name": "python3",
            "display_name": "Python 3 (ipykernel)",
            "language": "python",
        }
        nbformat.write(nb, str(lab.root / name))
        # The notebook's kernel starts now, through the sessions API JupyterLab itself calls,
        # while the page loads; the page then connects to it, as to any running session.
        _api(
            lab,
            "/api/sessions",
            "POST",
            body={"path": name, "name": name, "type": "notebook", "kernel": {"name": "python3"}},
            timeout=60,
        )
        page = _context(browser).new_page()
        page.set_viewport_size({"width": viewport[0], "height": viewport[1]})
        page.console_lines = []
        page.on("console", lambda m: page.console_lines.append(f"{m.type}: {m.text}"))
        page.on("pageerror", lambda e: page.console_lines.append(f"pageerror: {e}"))
        pages.append(page)
        page.goto(notebook_url(lab, name))
        # Wait until the notebook's kernel is connected and idle. The status
        # widgets say "Idle" earlier than that, and a cell run before the
        # session has a kernel is silently dropped (prompt stays "[ ]").
        page.wait_for_function(KERNEL_READY_JS, timeout=T_LONG)
        expect(page.locator(".jp-Notebook .jp-Cell")).to_have_count(len(nb.cells))
        return page

    yield _open

    failed = request.session.testsfailed > failed_before  # call phase already reported
    for page in pages:
        if failed:
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / f"fail-{request.node.name}.png"))
            print("\n".join(page.console_lines[-50:]))
        page.close()
    # stop this test's kernels (gauge threads, simulated memory) before the next test
    try:
        for s in _api(lab, "/api/sessions")[1] or []:
            _api(lab, f"/api/sessions/{s['id']}", method="DELETE", timeout=30)
    except (urllib.error.URLError, OSError):
        pass


# --------------------------------------------------------------------------- #
# Driving a notebook
# --------------------------------------------------------------------------- #
def run_cell(page: Any, index: int) -> Any:
    """Put cell `index` in edit mode and press Shift+Enter, like a person."""
    cell = page.locator(".jp-Notebook .jp-Cell").nth(index)
    cell.locator(".cm-content").click()
    page.keyboard.press("Shift+Enter")
    return cell


def outputs(cell: Any) -> Any:
    """The cell's outputs only (expected text also appears in the cell's source)."""
    return cell.locator(".jp-OutputArea-output")


def within(inner: dict[str, float], outer: dict[str, float], slack: float = 1.0) -> bool:
    return (
        inner["x"] >= outer["x"] - slack
        and inner["y"] >= outer["y"] - slack
        and inner["x"] + inner["width"] <= outer["x"] + outer["width"] + slack
        and inner["y"] + inner["height"] <= outer["y"] + outer["height"] + slack
    )
