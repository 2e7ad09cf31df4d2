"""The panel's status line: an ARIA live region, so a screen reader hears how a fix ended.

An ``ipywidgets.HTML`` replaces its whole content on each change and has no way to set attributes;
a live region must be an element that stays while its text changes. A tiny anywidget draws one
``role="status"`` element once and updates what is inside it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import anywidget
import traitlets

_ESM = """
function render({ model, el }) {
  const region = document.createElement("div");
  region.setAttribute("role", "status");
  region.setAttribute("aria-live", "polite");
  region.setAttribute("aria-atomic", "true");
  region.className = "gpumem-live";
  const draw = () => { region.innerHTML = model.get("value"); };
  draw();
  model.on("change:value", draw);
  el.appendChild(region);
  return () => model.off("change:value", draw);
}
export default { render };
"""


class StatusLine(anywidget.AnyWidget):
    """HTML in ``value`` (escaped by the caller), shown in a live region."""

    _esm = _ESM
    value = traitlets.Unicode("").tag(sync=True)


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
