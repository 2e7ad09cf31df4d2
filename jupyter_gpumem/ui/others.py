"""The panel's "Shut down that kernel": another notebook's kernel that holds memory on the card.

The readings name another process from ``/proc`` only ("another notebook kernel"); which notebook a
kernel serves is asked here, of the Jupyter servers on this machine, as the panel builds its offer
(``Lookups``: once a pid for the life of the panel). Offered only where a running server names the
notebook (the server is then the one that can shut it down); a click asks first, naming the
notebook, and only the confirmation shuts the kernel down, through that server's API, as Kernel >
Shut Down Kernel does in the other notebook. A click reaches the kernel between cells, like the
fixes'.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from html import escape
from pathlib import PurePosixPath

import ipywidgets as W

from jupyter_gpumem.diagnosis.model import Diagnosis
from jupyter_gpumem.diagnosis.render import md_code
from jupyter_gpumem.readings import kernels
from jupyter_gpumem.readings.kernels import KernelInfo
from jupyter_gpumem.readings.snapshot import ProcessInfo
from jupyter_gpumem.units import format_bytes


class Lookups:
    """What the Jupyter servers here say each pid is (``kernels.find_kernel``: a request to each
    server, for a kernel's pid only), asked once a pid for the life of one panel."""

    def __init__(self) -> None:
        self.found: dict[int, KernelInfo | None] = {}

    def __call__(self, pid: int) -> KernelInfo | None:
        if pid not in self.found:
            self.found[pid] = kernels.find_kernel(pid)
        return self.found[pid]


def kernels_to_offer(d: Diagnosis, find: Lookups) -> list[tuple[ProcessInfo, KernelInfo]]:
    """The other processes on the card that are notebook kernels a server here can shut down,
    the biggest first. Each pid is asked (``find`` reads its command line, and asks the servers
    only for a kernel's): the simulated GPU's pretend processes carry a description of their own,
    and may be given a real kernel's pid."""
    out = []
    for p in sorted(d.other_processes, key=lambda p: -p.used_bytes):
        if p.pid == os.getpid():
            continue
        info = find(p.pid)
        if info is not None and info.notebook and info.server_url:
            out.append((p, info))
    return out


def _exited(pid: int, wait_s: float = 3.0) -> bool:
    deadline = time.monotonic() + wait_s
    while os.path.exists(f"/proc/{pid}"):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


class OtherKernels:
    """A row of "Shut down the kernel of X" buttons; the question and the result go to the panel's
    ``confirm_box`` and ``set_status``."""

    def __init__(
        self,
        offers: list[tuple[ProcessInfo, KernelInfo]],
        confirm_box: W.Box,
        set_status: Callable[[str, str], None],
    ) -> None:
        self.confirm_box = confirm_box
        self.set_status = set_status
        self.buttons: dict[int, W.Button] = {}
        for p, info in offers:
            name = PurePosixPath(info.notebook or "").name
            b = W.Button(
                description=f"Shut down the kernel of {name} (~{format_bytes(p.used_bytes)})",
                tooltip=f"Asks first. pid {p.pid}: {info.describe()}",
                layout=W.Layout(width="auto"),
            )
            b.on_click(lambda _b, p=p, info=info: self.ask(p, info))
            self.buttons[p.pid] = b
        who = "Another notebook holds" if len(offers) == 1 else "Other notebooks hold"
        label = W.HTML(f"<span class='gpumem-why'>{who} memory on this GPU:</span>")
        self.widget = W.HBox([label, *self.buttons.values()], layout=W.Layout(flex_flow="row wrap"))
        self.widget.add_class("gpumem-buttons")
        self.widget.add_class("gpumem-others")

    def ask(self, p: ProcessInfo, info: KernelInfo) -> None:
        """The confirmation, naming the notebook; nothing is shut down before "Shut it down"."""
        yes = W.Button(description="Shut it down", button_style="danger")
        no = W.Button(description="Keep it")
        yes.on_click(lambda _b: self.shut_down(p, info))
        no.on_click(lambda _b: self._keep(info))
        self.confirm_box.children = (
            W.HTML(
                f"<div class='gpumem-ask'>⚠ Shut down {md_code(info.describe())}? It holds "
                f"{escape(format_bytes(p.used_bytes))} on this GPU (pid {p.pid}). Its variables "
                "are lost; the notebook itself stays and can start a new kernel.</div>"
            ),
            W.HBox([yes, no]),
        )

    def _keep(self, info: KernelInfo) -> None:
        self.confirm_box.children = ()
        self.set_status(f"Not shut down: {md_code(info.describe())} keeps running.", "")

    def shut_down(self, p: ProcessInfo, info: KernelInfo) -> bool:
        """Shut it down through its server; the result in the status line. Whether it worked."""
        self.confirm_box.children = ()
        what = md_code(info.describe())
        try:
            kernels.shutdown(info)
        except Exception as exc:
            self.set_status(
                f"✗ Could not shut down {what}: {escape(type(exc).__name__)}: "
                f"{escape(str(exc)[:200])}. Shut it down from its notebook (Kernel > Shut Down "
                "Kernel).",
                "bad",
            )
            return False
        b = self.buttons.get(p.pid)
        if b is not None:
            b.disabled = True
            b.description = f"Kernel of {PurePosixPath(info.notebook or '').name} shut down"
        gone = (
            f"its process (pid {p.pid}) has exited, which gives the {format_bytes(p.used_bytes)} "
            "it held back to the GPU"
            if _exited(p.pid)
            else f"its process (pid {p.pid}) has not exited yet"
        )
        self.set_status(
            f"✓ Shut down {what}: {escape(gone)}. Run the cell again, or click a fix.", "ok"
        )
        return True
