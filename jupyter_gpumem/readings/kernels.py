"""Other notebooks on the same GPU: which notebook a kernel process belongs to, and shutting it down.

A kernel's command line names its connection file (``-f .../kernel-<id>.json``); each running Jupyter
server writes a runtime file (``jpserver-<pid>.json``: its URL and token) and lists its sessions
(notebook path -> kernel id) at ``/api/sessions``. Together they map a pid NVML reports to a
notebook. Honest where they cannot: in a container NVML reports host pids, which ``/proc`` here
does not show; a server started elsewhere (another user, another container) is not listed.

Only the standard library: the requests go to servers on this machine, with a short timeout, and
only when asked (``find_kernel``, ``shutdown``): reading whether a process is a kernel
(``kernel_id_of``) is local, and importing this module costs no ``urllib``.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

_KERNEL_FILE = re.compile(r"kernel-([0-9a-fA-F-]{8,})\.json$")
_TIMEOUT_S = 0.5
_CACHE_S = 30.0
_SHUTDOWN_TIMEOUT_S = 30.0  # the server answers once the kernel has stopped (a few seconds)
_cache: dict[int, tuple[float, KernelInfo | None]] = {}


@dataclass(frozen=True)
class KernelInfo:
    pid: int
    kernel_id: str
    notebook: str | None  # the notebook's path on its server, when a server lists it
    server_url: str | None
    token: str | None = None

    def describe(self) -> str:
        if self.notebook:
            return f"the kernel of notebook `{self.notebook}` ({self.server_url})"
        return (
            "another notebook kernel (no running Jupyter server here lists it: started from "
            "another user's or container's server, or a console)"
        )


def kernel_id_in(args: Iterable[str]) -> str | None:
    """The kernel id a command line names (its connection file, ``kernel-<id>.json``), if any."""
    for arg in args:
        m = _KERNEL_FILE.search(arg)
        if m:
            return m.group(1)
    return None


def kernel_id_of(pid: int) -> str | None:
    """The kernel id in a process's command line, if it is a Jupyter kernel (read from ``/proc``)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return kernel_id_in(a.decode(errors="replace") for a in raw.split(b"\0"))


def own_kernel_id() -> str | None:
    """This kernel's id on the Jupyter server that started it (its connection file is
    ``kernel-<id>.json``); None in a terminal, a console without a server, or any other front end."""
    if "ipykernel" not in sys.modules:  # never import ipykernel just to find out
        return None
    try:
        from ipykernel.connect import get_connection_file

        path = get_connection_file()
    except Exception:  # no kernel app in this process
        return None
    m = _KERNEL_FILE.search(os.path.basename(str(path)))
    return m.group(1) if m else None


def runtime_dirs() -> list[Path]:
    dirs = []
    env = os.environ.get("JUPYTER_RUNTIME_DIR")
    if env:
        dirs.append(Path(env))
    try:
        from jupyter_core.paths import jupyter_runtime_dir

        dirs.append(Path(jupyter_runtime_dir()))
    except Exception:
        pass
    return list(dict.fromkeys(dirs))


def running_servers() -> list[dict[str, object]]:
    """The Jupyter servers on this machine whose runtime files this user can read."""
    servers = []
    for d in runtime_dirs():
        for f in sorted(d.glob("jpserver-*.json")) + sorted(d.glob("nbserver-*.json")):
            try:
                info = json.loads(f.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(info, dict) and info.get("url"):
                servers.append(info)
    return servers


def _get(url: str, token: str | None, method: str = "GET", timeout: float = _TIMEOUT_S) -> object:
    import urllib.request

    req = urllib.request.Request(url, method=method)
    if token:
        req.add_header("Authorization", f"token {token}")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        body = resp.read()
    return json.loads(body) if body else None


def find_kernel(pid: int) -> KernelInfo | None:
    """The kernel ``pid`` is, with its notebook where a running server lists it; None when the
    process is not a kernel (or not visible from here). Asks each running server for a kernel's
    pid (a request each, answers kept ``_CACHE_S``): for what the user asked about (the panel's
    "Shut down" offer, ``%gpumem shutdown``), never for a reading."""
    now = time.monotonic()
    hit = _cache.get(pid)
    if hit is not None and now - hit[0] < _CACHE_S:
        return hit[1]
    kid = kernel_id_of(pid)
    info = None
    if kid is not None:
        from urllib.parse import urljoin

        info = KernelInfo(pid, kid, None, None)
        for server in running_servers():
            url = str(server["url"])
            url = url if url.endswith("/") else url + "/"
            token = str(server.get("token") or "") or None
            try:
                sessions = _get(urljoin(url, "api/sessions"), token)
            except Exception:
                continue
            for s in sessions if isinstance(sessions, list) else []:
                kernel = s.get("kernel") or {}
                if kernel.get("id") == kid:
                    path = s.get("path") or (s.get("notebook") or {}).get("path")
                    info = KernelInfo(pid, kid, path, url, token)
                    break
            if info.notebook:
                break
    _cache[pid] = (now, info)
    return info


def shutdown(info: KernelInfo) -> None:
    """Shut the kernel down through its server's API (as Kernel > Shut Down Kernel does)."""
    from urllib.parse import urljoin

    if not info.server_url:
        raise RuntimeError("no running Jupyter server here lists that kernel")
    url = urljoin(info.server_url, f"api/kernels/{info.kernel_id}")
    _get(url, info.token, method="DELETE", timeout=_SHUTDOWN_TIMEOUT_S)
    _cache.pop(info.pid, None)
