"""The gauge in JupyterLab's right sidebar (sidecar), narrow; elsewhere inline, said in one line.

Like the inline gauge it lists every visible GPU, one per line, the last OOM's marked."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .gauge import Gauge

SIDEBAR_WIDTH = 240  # the sidecar panel is about 250 px wide


def _parent_cmdlines(depth: int = 4) -> list[str]:
    out = []
    pid = os.getppid()
    for _ in range(depth):
        if pid <= 1:
            break
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        out.append(raw.replace(b"\0", b" ").decode(errors="replace"))
        pid = int(stat.rsplit(")", 1)[1].split()[1])  # field 4: ppid (after the "(comm)" field)
    return out


def in_jupyterlab() -> bool:
    """Is this kernel's front end JupyterLab? Kernels cannot ask the page, so look at the server
    that started the kernel; ``JUPYTER_GPUMEM_FRONTEND=lab|inline`` overrides the guess."""
    forced = os.environ.get("JUPYTER_GPUMEM_FRONTEND")
    if forced:
        return forced == "lab"
    return any(
        "jupyter-lab" in c or "jupyterlab" in c or "jupyter lab" in c for c in _parent_cmdlines()
    )


class Sidebar:
    def __init__(self, interval: float, history_s: float) -> None:
        self.gauge = Gauge(
            interval=interval, history_s=history_s, width=SIDEBAR_WIDTH, height=360, narrow=True
        )
        self.sidecar: Any = None

    def open(self, display: Callable[..., Any]) -> str:
        """Show the gauge in the sidebar, or inline where there is no JupyterLab."""
        self.gauge.start()
        if in_jupyterlab():
            from sidecar import Sidecar

            self.sidecar = Sidecar(title="GPU memory", anchor="right")
            with self.sidecar:
                display(self.gauge.widget)
            return "The GPU memory gauge is in JupyterLab's right sidebar."
        display(self.gauge.widget)
        return "No JupyterLab here: the gauge is shown inline instead of in a sidebar."

    def close(self) -> None:
        self.gauge.stop()
        if self.sidecar is not None:
            try:
                self.sidecar.close()
            except Exception:
                pass
            self.sidecar = None
