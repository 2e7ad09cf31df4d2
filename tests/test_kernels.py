"""Other notebooks on the GPU: a real Jupyter server with a real second kernel; its pid is mapped
to its notebook, `%gpumem shutdown PID` asks, then shuts it down through the server's API."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from jupyter_gpumem import kernels
from jupyter_gpumem.readings import describe_process

pytestmark = pytest.mark.kernel


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _api(url: str, token: str, method: str = "GET", body: Any = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Authorization", f"token {token}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=30) as resp:
        raw = resp.read()
    return json.loads(raw) if raw else None


@pytest.fixture
def server(tmp_path: Path, monkeypatch: Any) -> Any:
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    (tmp_path / "nb").mkdir()
    port, token = _free_port(), "gpumem-test-token"
    env = dict(
        os.environ,
        JUPYTER_RUNTIME_DIR=str(runtime),
        JUPYTER_CONFIG_DIR=str(tmp_path / "config"),
        JUPYTER_DATA_DIR=str(tmp_path / "data"),
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyter_server",
            f"--port={port}",
            "--ip=127.0.0.1",
            f"--IdentityProvider.token={token}",
            "--no-browser",
            "--allow-root",
            f"--ServerApp.root_dir={tmp_path / 'nb'}",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(120):
            if list(runtime.glob("jpserver-*.json")):
                try:
                    _api(url + "api/status", token)
                    break
                except OSError:
                    pass
            time.sleep(0.5)
        else:
            pytest.skip("the Jupyter server did not start")
        monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(runtime))
        kernels._cache.clear()
        yield url, token
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _kernel_pid(kernel_id: str) -> int:
    for _ in range(60):
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                try:
                    if kernel_id in (proc / "cmdline").read_bytes().decode(errors="replace"):
                        return int(proc.name)
                except OSError:
                    continue
        time.sleep(0.5)
    raise AssertionError("kernel process not found")


def test_another_notebooks_kernel_is_named_and_shut_down_after_asking(
    server: Any, shell: Any, capsys: Any
) -> None:
    url, token = server
    session = _api(
        url + "api/sessions",
        token,
        "POST",
        {"path": "other/train.ipynb", "type": "notebook", "kernel": {"name": "python3"}},
    )
    kid = session["kernel"]["id"]
    pid = _kernel_pid(kid)
    assert describe_process(pid) == f"the kernel of notebook `other/train.ipynb` ({url})"

    capsys.readouterr()
    shell.run_line_magic("gpumem", f"shutdown {pid}")
    out = capsys.readouterr().out
    assert "This would shut down the kernel of notebook `other/train.ipynb`" in out
    assert f"%gpumem shutdown {pid} --yes" in out
    assert any(k["id"] == kid for k in _api(url + "api/kernels", token))  # asked, not done

    shell.run_line_magic("gpumem", f"shutdown {pid} --yes")
    assert "Shut down the kernel of notebook `other/train.ipynb`" in capsys.readouterr().out
    assert not any(k["id"] == kid for k in _api(url + "api/kernels", token))


def test_a_process_that_is_not_a_kernel_is_refused(shell: Any) -> None:
    from IPython.core.error import UsageError

    with pytest.raises(UsageError, match="not a Jupyter kernel"):
        shell.run_line_magic("gpumem", "shutdown 1")
    with pytest.raises(UsageError, match="not a pid"):
        shell.run_line_magic("gpumem", "shutdown ２")
