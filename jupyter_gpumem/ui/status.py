"""The panel's status line: an ARIA live region, so a screen reader hears how a fix ended, and the
Cancel button of a running fix.

An ``ipywidgets.HTML`` replaces its whole content on each change and has no way to set attributes;
a live region must be an element that stays while its text changes. A tiny anywidget draws one
``role="status"`` element once and updates what is inside it.

Cancel cannot be a widget button: a click reaches the kernel as a comm message on the shell
channel, which waits behind the fix that is running there. So the browser interrupts the kernel
itself, through the Jupyter server's REST API (``POST {baseUrl}api/kernels/{id}/interrupt``, as
the toolbar's ■ does): the KeyboardInterrupt lands in the fix, whose transaction puts the notebook
back (``rescue.Interrupted``). The kernel id comes from the kernel (its connection file's name);
without one (a console, a front end that is not a Jupyter server) there is no Cancel button.

The interrupt is a SIGINT, which only the kernel's main thread receives, and a click may arrive on
another one: ipykernel 7 routes a comm's messages to the subshell of the request that last
published on it, and JupyterLab 4.6 and Notebook 7 send widget messages on a subshell, so a
button drawn (or redrawn) during a click, "Re-run anyway" first of all, calls back on a subshell
thread, where no interrupt ever lands. ``interruptible`` hands such a click to the main thread.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import anywidget
import traitlets

_ESM = """
function pageConfig() {
  const el = document.getElementById("jupyter-config-data");
  try { return el ? JSON.parse(el.textContent) : {}; } catch (e) { return {}; }
}
function cookie(name) {
  const hit = document.cookie.split(";").map(s => s.trim()).find(s => s.startsWith(name + "="));
  return hit ? decodeURIComponent(hit.slice(name.length + 1)) : "";
}
async function interrupt(kernelId) {
  const config = pageConfig();
  let base = config.baseUrl || "/";
  if (!base.endsWith("/")) base += "/";
  const headers = {};
  const xsrf = cookie("_xsrf");
  if (xsrf) headers["X-XSRFToken"] = xsrf;
  if (config.token) headers["Authorization"] = "token " + config.token;
  const url = base + "api/kernels/" + encodeURIComponent(kernelId) + "/interrupt";
  const r = await fetch(url, { method: "POST", headers, credentials: "same-origin" });
  if (!r.ok) throw new Error("HTTP " + r.status);
}
function scroller(node) {
  for (let n = node.parentElement; n; n = n.parentElement) {
    const y = getComputedStyle(n).overflowY;
    if ((y === "auto" || y === "scroll") && n.scrollHeight > n.clientHeight) return n;
  }
  return document.scrollingElement;
}
// After an OOM, bring the headline and the first fix button into view (they come after the
// traceback, and JupyterLab has moved on to the next cell): once, when the panel first shows.
function reveal(el, tries) {
  const panel = el.closest(".gpumem-panel");
  const head = panel && panel.querySelector(".gpumem-headline, .gpumem-diag h4");
  const button = panel && panel.querySelector(".gpumem-buttons button");
  if (!head || !button || !button.getBoundingClientRect().height) {
    if (tries > 0) setTimeout(() => reveal(el, tries - 1), 100);
    return;
  }
  const box = scroller(panel);
  const view = box === document.scrollingElement
    ? { top: 0, bottom: window.innerHeight } : box.getBoundingClientRect();
  const top = head.getBoundingClientRect().top;
  const bottom = button.getBoundingClientRect().bottom;
  if (top >= view.top && bottom <= view.bottom) return;
  box.scrollTop += top - view.top - 12;  // the headline at the top, the buttons below it
}
function render({ model, el }) {
  const shown = document.createElement("div");
  shown.className = "gpumem-live";
  shown.tabIndex = -1;  // where the focus goes when a fix ends
  // what a screen reader hears: a change of state, once, never the ticking seconds
  const region = document.createElement("div");
  region.setAttribute("role", "status");
  region.setAttribute("aria-live", "polite");
  region.setAttribute("aria-atomic", "true");
  region.className = "gpumem-sr";
  const bar = document.createElement("div");
  bar.className = "gpumem-cancel-bar";
  const button = document.createElement("button");
  button.type = "button";
  button.className = "jupyter-button gpumem-cancel";
  button.title = "Interrupt the kernel: the fix stops and what it changed is put back";
  const note = document.createElement("span");
  note.className = "gpumem-cancel-note";
  bar.append(button, note);
  const idle = () => { button.disabled = false; button.textContent = "Cancel"; };
  button.addEventListener("click", async () => {
    button.disabled = true;
    button.textContent = "Cancelling...";
    note.textContent = "";
    try {
      await interrupt(model.get("kernel_id"));
    } catch (e) {
      idle();
      note.textContent = " Could not interrupt the kernel (" + e.message + "): use the "
        + "toolbar's stop button.";
    }
  });
  const panel = () => el.closest(".gpumem-panel");
  let ours = false;  // the focus was in the panel (or nowhere) when the fix started
  const draw = () => { shown.innerHTML = model.get("value"); };
  const say = () => { region.textContent = model.get("announce"); };
  const drawCancel = () => {
    const on = model.get("running") && !!model.get("kernel_id");
    if (model.get("running")) {
      const a = document.activeElement;
      ours = !a || a === document.body || !!(panel() && panel().contains(a));
    }
    bar.style.display = on ? "" : "none";
    if (!on) { idle(); note.textContent = ""; }
  };
  const focus = () => {
    const a = document.activeElement;
    const lost = !a || a === document.body || (panel() && panel().contains(a) && a.disabled);
    if (ours || lost) shown.focus({ preventScroll: false });
    ours = false;
  };
  draw();
  say();
  drawCancel();
  model.on("change:value", draw);
  model.on("change:announce", say);
  model.on("change:running", drawCancel);
  model.on("change:kernel_id", drawCancel);
  model.on("change:focus", focus);
  el.append(shown, region, bar);
  if (model.get("reveal")) {
    model.set("reveal", false);  // not again on a reload of the page
    model.save_changes();
    requestAnimationFrame(() => reveal(el, 30));
  }
  return () => {
    model.off("change:value", draw);
    model.off("change:announce", say);
    model.off("change:running", drawCancel);
    model.off("change:kernel_id", drawCancel);
    model.off("change:focus", focus);
  };
}
export default { render };
"""


class StatusLine(anywidget.AnyWidget):
    """HTML in ``value`` (escaped by the caller), shown; ``announce``, the text a screen reader
    hears (a polite live region: set it on a change of state, not on every tick); a Cancel
    button while ``running``, for the kernel ``kernel_id`` ("" where it is not known: no
    button). Each increment of ``focus`` puts the focus on the status when a fix has left it
    nowhere (its button was disabled) or it was in the panel. ``reveal``: scroll the headline
    and the first fix button into view when first shown."""

    _esm = _ESM
    value = traitlets.Unicode("").tag(sync=True)
    announce = traitlets.Unicode("").tag(sync=True)
    running = traitlets.Bool(False).tag(sync=True)
    kernel_id = traitlets.Unicode("").tag(sync=True)
    focus = traitlets.Int(0).tag(sync=True)
    reveal = traitlets.Bool(False).tag(sync=True)


class Ticker:
    """Calls ``draw(elapsed_seconds)`` every ``interval`` from a daemon thread until stopped: the
    elapsed time of a fix that blocks the thread that runs it. Touches only widget traits."""

    def __init__(
        self,
        draw: Callable[[float], None],
        interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._draw = draw
        self._interval = interval
        self._clock = clock  # what "elapsed" is measured with (a test steps its own)
        self._stop = threading.Event()
        self._t0 = clock()
        self._thread = threading.Thread(
            target=self._loop, name="jupyter_gpumem-ticker", daemon=True
        )

    def start(self) -> Ticker:
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._draw(self._clock() - self._t0)
            except Exception:
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=2)


def interruptible(shell: Any, work: Callable[[], object]) -> bool:
    """Run ``work`` where Cancel and the toolbar's ■ reach it: on the main thread, with Ctrl-C
    raising ``KeyboardInterrupt``. Returns whether it ran now; False: it was handed to the
    kernel's main event loop (a click on a subshell thread), where it runs once the loop is free.

    Without a kernel (a terminal, a test's shell) it runs now on whatever thread called."""
    if threading.current_thread() is threading.main_thread():
        with _ctrl_c_raises():
            work()
        return True
    loop = getattr(getattr(shell, "kernel", None), "io_loop", None)
    if loop is None:
        work()
        return True
    # the callback runs in a copy of this thread's context: the click's parent message, so
    # what the fix prints and displays goes where the click's output goes
    loop.add_callback(_on_main_thread, work)
    return False


def _on_main_thread(work: Callable[[], object]) -> None:
    try:
        with _ctrl_c_raises():
            work()
    except KeyboardInterrupt:
        pass  # a Cancel that came after the work ended: it already said how it ended


@contextlib.contextmanager
def _ctrl_c_raises() -> Iterator[None]:
    """SIGINT raises KeyboardInterrupt here. ipykernel ignores it between requests and turns it
    on only while a request's handler runs, which a callback on its event loop is not."""
    try:
        old = signal.getsignal(signal.SIGINT)
        if old is signal.SIG_IGN:
            signal.signal(signal.SIGINT, signal.default_int_handler)
    except (ValueError, TypeError):  # not the main thread after all, or no signals here
        old = None
    try:
        yield
    finally:
        if old is signal.SIG_IGN:
            signal.signal(signal.SIGINT, old)
