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
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

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
function render({ model, el }) {
  const region = document.createElement("div");
  region.setAttribute("role", "status");
  region.setAttribute("aria-live", "polite");
  region.setAttribute("aria-atomic", "true");
  region.className = "gpumem-live";
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
  const draw = () => { region.innerHTML = model.get("value"); };
  const drawCancel = () => {
    const on = model.get("running") && !!model.get("kernel_id");
    bar.style.display = on ? "" : "none";
    if (!on) { idle(); note.textContent = ""; }
  };
  draw();
  drawCancel();
  model.on("change:value", draw);
  model.on("change:running", drawCancel);
  model.on("change:kernel_id", drawCancel);
  el.append(region, bar);
  return () => {
    model.off("change:value", draw);
    model.off("change:running", drawCancel);
    model.off("change:kernel_id", drawCancel);
  };
}
export default { render };
"""


class StatusLine(anywidget.AnyWidget):
    """HTML in ``value`` (escaped by the caller), shown in a live region; a Cancel button while
    ``running``, for the kernel ``kernel_id`` ("" where it is not known: no button)."""

    _esm = _ESM
    value = traitlets.Unicode("").tag(sync=True)
    running = traitlets.Bool(False).tag(sync=True)
    kernel_id = traitlets.Unicode("").tag(sync=True)


class Ticker:
    """Calls ``draw(elapsed_seconds)`` every ``interval`` from a daemon thread until stopped: the
    elapsed time of a fix that blocks the thread that runs it. Touches only widget traits."""

    def __init__(self, draw: Callable[[float], None], interval: float = 1.0) -> None:
        self._draw = draw
        self._interval = interval
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(
            target=self._loop, name="jupyter_gpumem-ticker", daemon=True
        )

    def start(self) -> Ticker:
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._draw(time.monotonic() - self._t0)
            except Exception:
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=2)
