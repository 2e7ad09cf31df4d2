"""The gauge in JupyterLab's right sidebar (sidecar), narrow; elsewhere inline, said in one line.

Like the inline gauge it lists every visible GPU, one per line, the last OOM's marked."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from jupyter_gpumem.ui.gauge import Gauge

SIDEBAR_WIDTH = 240  # the sidecar panel is about 250 px wide


def _parent_argvs(depth: int = 4) -> list[list[str]]:
    """The command lines (argv words) of this process's parent, grandparent, ... (Linux /proc)."""
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
        out.append([w.decode(errors="replace") for w in raw.split(b"\0") if w])
        pid = int(stat.rsplit(")", 1)[1].split()[1])  # field 4: ppid (after the "(comm)" field)
    return out


_PYTHON = re.compile(r"^python[0-9.]*w?$")
_PYTHON_OPTIONS_WITH_VALUE = {"-X", "-W", "-Q"}
_MODULE_APPS = {"jupyterlab": "lab", "notebook": "notebook", "jupyter_server": "server"}


def _program(word: str) -> str:
    """``/venv/bin/jupyter-lab`` -> ``jupyter-lab``; Windows' ``jupyter-lab.exe`` and
    ``jupyter-lab-script.py`` too."""
    name = re.split(r"[\\/]", word)[-1].lower()
    for suffix in (".exe", "-script.py", ".py"):
        name = name.removesuffix(suffix)
    return name


def _subcommand(args: list[str]) -> str | None:
    """``jupyter lab --port 1`` -> ``lab``: the first word that is not an option."""
    return next((a for a in args if not a.startswith("-")), None)


def jupyter_app(argv: list[str]) -> str | None:
    """Which Jupyter application a command line runs: ``lab``, ``notebook``, ``server``,
    ``nbconvert``, ...; None when it is no Jupyter program (a shell, ``python -m ipykernel``).

    Read from the program, never from its arguments: ``jupyter-notebook
    --LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate`` and a venv in
    ``~/jupyterlab-env/`` are Notebook. The forms: ``jupyter-lab`` (what ``jupyter lab`` execs),
    ``jupyter lab``, ``python /venv/bin/jupyter-lab``, ``python -m jupyterlab``, ``python -m
    jupyter lab``.
    """
    if not argv:
        return None
    name, args = _program(argv[0]), argv[1:]
    if _PYTHON.match(name):
        i = 0
        while i < len(args) and args[i].startswith("-") and args[i] != "-m":
            i += 2 if args[i] in _PYTHON_OPTIONS_WITH_VALUE else 1
        if i >= len(args):
            return None
        if args[i] == "-m":
            module, rest = (args[i + 1] if i + 1 < len(args) else ""), args[i + 2 :]
            if module == "jupyter":
                return _subcommand(rest)
            return _MODULE_APPS.get(module)
        name, args = _program(args[i]), args[i + 1 :]
    if name == "jupyter":
        return _subcommand(args)
    if name.startswith("jupyter-"):
        return name.removeprefix("jupyter-") or None
    return None


def in_jupyterlab(
    parents: list[list[str]] | None = None, environ: Mapping[str, str] | None = None
) -> bool:
    """Is this kernel's front end JupyterLab? Kernels cannot ask the page, so look at the Jupyter
    program that started the kernel: the nearest parent that is one decides (a Notebook server
    started from a JupyterLab terminal is Notebook). ``JUPYTER_GPUMEM_FRONTEND=lab|inline``
    overrides the guess. ``parents``, ``environ``: for tests (default: /proc, os.environ)."""
    forced = (os.environ if environ is None else environ).get("JUPYTER_GPUMEM_FRONTEND")
    if forced:
        return forced == "lab"
    for argv in _parent_argvs() if parents is None else parents:
        app = jupyter_app(argv)
        if app is not None:
            return app == "lab"
    return False


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
