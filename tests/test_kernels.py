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

from jupyter_gpumem.readings import kernels
from jupyter_gpumem.readings.snapshot import describe_process
from tests.conftest import extension

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


def _other_notebook(url: str, token: str) -> tuple[str, int]:
    """A second notebook (`other/train.ipynb`) on the server: its kernel's id and pid."""
    session = _api(
        url + "api/sessions",
        token,
        "POST",
        {"path": "other/train.ipynb", "type": "notebook", "kernel": {"name": "python3"}},
    )
    kid = session["kernel"]["id"]
    return kid, _kernel_pid(kid)


def test_another_notebooks_kernel_is_named_and_shut_down_after_asking(
    server: Any, shell: Any, capsys: Any
) -> None:
    url, token = server
    kid, pid = _other_notebook(url, token)
    assert describe_process(pid) == "another notebook kernel"  # a reading asks no server
    info = kernels.find_kernel(pid)  # asked on demand: the panel's offer, %gpumem shutdown
    assert info is not None
    assert info.describe() == f"the kernel of notebook `other/train.ipynb` ({url})"

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


def test_the_panel_offers_to_shut_down_another_notebooks_kernel_after_asking(
    server: Any, shell: Any
) -> None:
    """Issue 11 §4: the panel's "Shut down the kernel of X", for a real second kernel of a real
    server holding (simulated) memory on the card: a confirmation naming the notebook first, then
    the server's API, then the result."""
    import jupyter_gpumem
    from jupyter_gpumem.ui.panel import DiagnosisPanel

    url, token = server
    kid, pid = _other_notebook(url, token)
    jupyter_gpumem.simulate("1GiB", other_processes=[(pid, 600 << 20)])
    shell.run_cell("import torch\nx = torch.empty(600 << 20, dtype=torch.uint8, device='cuda')")
    failed = jupyter_gpumem.last_failure(shell)
    assert failed is not None
    panel = DiagnosisPanel(extension(shell), failed)
    assert panel.others is not None
    button = panel.others.buttons[pid]
    assert button.description == "Shut down the kernel of train.ipynb (~600 MiB)"

    def texts() -> str:
        return " ".join(str(getattr(w, "value", "")) for w in panel.confirm_box.children)

    def answer(label: str) -> None:
        row = panel.confirm_box.children[1]
        next(b for b in row.children if b.description == label).click()

    button.click()  # asks, naming the notebook; nothing is shut down yet
    assert "Shut down the kernel of notebook <code>other/train.ipynb</code>" in texts()
    assert "600 MiB on this GPU" in texts() and f"pid {pid}" in texts()
    assert any(k["id"] == kid for k in _api(url + "api/kernels", token))
    answer("Keep it")
    assert panel.confirm_box.children == ()
    assert "Not shut down" in panel.status.value
    assert any(k["id"] == kid for k in _api(url + "api/kernels", token))

    button.click()
    answer("Shut it down")
    status = panel.status.value
    assert "✓ Shut down the kernel of notebook <code>other/train.ipynb</code>" in status, status
    assert f"its process (pid {pid}) has exited" in status
    assert not any(k["id"] == kid for k in _api(url + "api/kernels", token))
    assert not Path(f"/proc/{pid}").exists()
    assert button.disabled and button.description == "Kernel of train.ipynb shut down"


def test_no_shut_down_offer_for_a_process_no_server_names(shell: Any) -> None:
    import jupyter_gpumem
    from jupyter_gpumem.ui.panel import DiagnosisPanel

    jupyter_gpumem.simulate("1GiB", other_processes=[(1, 600 << 20)])  # pid 1: not a kernel
    shell.run_cell("import torch\nx = torch.empty(600 << 20, dtype=torch.uint8, device='cuda')")
    failed = jupyter_gpumem.last_failure(shell)
    assert failed is not None
    assert DiagnosisPanel(extension(shell), failed).others is None
