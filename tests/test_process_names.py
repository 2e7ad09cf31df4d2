"""Other processes on the card are named by the readings from ``/proc`` alone; the Jupyter server's
REST API is asked which notebook a kernel serves only when the panel offers to shut it down (issue
17). And the meter shows the backend's own words after a device's name; no flag decides them."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

import jupyter_gpumem
from jupyter_gpumem.frontend.meter import sample
from jupyter_gpumem.readings.snapshot import read_snapshot
from tests.conftest import extension

MiB = 1 << 20


class _Server:
    """A stand-in for a Jupyter server on this machine: its runtime file in ``JUPYTER_RUNTIME_DIR``
    and ``api/sessions`` listing one notebook, ``other.ipynb``, whose kernel is ``kernel_id``;
    every request counted."""

    def __init__(self, runtime: Path, kernel_id: str) -> None:
        self.requests: list[str] = []
        sessions = [{"path": "other.ipynb", "type": "notebook", "kernel": {"id": kernel_id}}]
        seen = self.requests

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                seen.append(self.path)
                body = json.dumps(sessions if self.path == "/api/sessions" else {}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        (runtime / "jpserver-1.json").write_text(
            json.dumps({"url": f"http://127.0.0.1:{port}/", "token": "t"}), encoding="utf-8"
        )

    @property
    def sessions_asked(self) -> int:
        return sum(1 for p in self.requests if p.startswith("/api/sessions"))

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def other_notebook(tmp_path: Path, monkeypatch: Any) -> Iterator[tuple[int, _Server]]:
    """A process whose command line is a kernel's (``ipykernel_launcher -f kernel-<id>.json``)
    and a server that lists it as ``other.ipynb``: its pid and the server."""
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(runtime))
    kid = str(uuid.uuid4())
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; time.sleep(120)",
            "ipykernel_launcher",
            "-f",
            str(runtime / f"kernel-{kid}.json"),
        ]
    )
    server = _Server(runtime, kid)
    try:
        yield proc.pid, server
    finally:
        server.close()
        proc.kill()
        proc.wait(timeout=30)


def _driver_like(gpu: Any, monkeypatch: Any) -> None:
    """The simulated GPU's reading as NVML gives processes on a real card: pid and bytes, no
    description (the simulated GPU describes its pretend processes itself). The one stand-in."""
    real_read = gpu.read

    def read(index: int | None = None) -> Any:
        r = real_read(index)
        procs = tuple(p._replace(description=None) for p in r.processes)
        return dataclasses.replace(r, processes=procs)

    monkeypatch.setattr(gpu, "read", read)


OOM_CELL = "import torch\nx = torch.empty(600 << 20, dtype=torch.uint8, device='cuda')"


def test_the_diagnosis_asks_no_server_and_the_panels_offer_asks_once(
    other_notebook: tuple[int, _Server], shell: Any, monkeypatch: Any
) -> None:
    from jupyter_gpumem.ui.panel import DiagnosisPanel

    pid, server = other_notebook
    gpu = jupyter_gpumem.simulate("1GiB", other_processes=[(pid, 600 * MiB)])
    _driver_like(gpu, monkeypatch)

    # a reading and an OOM's whole diagnosis: the kernel named from its command line, no request
    (named,) = read_snapshot().other_processes
    assert named.pid == pid and named.description == "another notebook kernel"
    shell.run_cell(OOM_CELL)
    failed = jupyter_gpumem.last_failure(shell)
    assert failed is not None and failed.diagnosis is not None
    other = next(c for c in failed.diagnosis.causes if c.key == "other_processes")
    assert f"pid {pid} (another notebook kernel) 600 MiB" in other.evidence
    assert f"`%gpumem shutdown {pid}` names its notebook and asks first" in other.action
    shell.run_line_magic("gpumem", "status")
    assert server.requests == []

    # the panel's offer asks the server which notebook it is: once, and names it
    panel = DiagnosisPanel(extension(shell), failed)
    assert server.sessions_asked == 1
    assert panel.others is not None
    button = panel.others.buttons[pid]
    assert button.description == "Shut down the kernel of other.ipynb (~600 MiB)"
    button.click()  # asks first, naming the notebook, from what the offer learnt
    ask = " ".join(str(getattr(w, "value", "")) for w in panel.confirm_box.children)
    assert "Shut down the kernel of notebook <code>other.ipynb</code>" in ask
    keep = next(b for b in panel.confirm_box.children[1].children if b.description == "Keep it")
    keep.click()
    panel.show(failed)  # a redraw (the OOM of a fix that did not fit) asks no more
    assert panel.others is not None and pid in panel.others.buttons
    assert server.sessions_asked == 1


def test_the_meter_shows_the_backends_words_and_decides_nothing_from_them() -> None:
    """What the lab extension's label shows after a device's name ("(simulated)") is the backend's
    own note, passed on as words: the simulated GPU says "simulated", whatever it was told to
    say instead is shown instead, and a real card's backend says nothing. Nothing outside the
    backends asks whether the GPU is simulated (tests/test_backends.py)."""
    pytest.importorskip("torch")
    from jupyter_gpumem.backends.cuda import CudaBackend

    with jupyter_gpumem.simulate("64MiB", devices=2) as gpu:
        data = sample(read_snapshot())
        assert data["note"] == "simulated"
        assert [d["note"] for d in data["devices"]] == ["simulated", "simulated"]
        gpu.note = "a T4, simulated"
        assert sample(read_snapshot())["note"] == "a T4, simulated"
        assert "simulated" not in data  # no flag for the front end to branch on

    assert sample(read_snapshot(backend=CudaBackend()))["note"] is None


def test_the_gauge_reads_numbers_and_names_no_process(monkeypatch: Any) -> None:
    """The gauge reads once a second: the bytes other processes hold are on its dial, and none
    of them is named (naming reads /proc for each; the diagnosis and `%gpumem status` name them)."""
    import os

    pytest.importorskip("plotly")
    from jupyter_gpumem.readings import snapshot
    from jupyter_gpumem.ui.gauge import Gauge

    named: list[int] = []
    real = snapshot.describe_process
    monkeypatch.setattr(snapshot, "describe_process", lambda pid: named.append(pid) or real(pid))
    gpu = jupyter_gpumem.simulate("1GiB", other_processes=[(os.getppid(), 256 * MiB)])
    _driver_like(gpu, monkeypatch)
    gauge = Gauge()
    gauge.sample()
    _t, _allocated, _cache, other = gauge.samples[-1]
    assert other >= 0.25  # GiB: the other process's 256 MiB
    assert named == []
    assert read_snapshot().other_processes[0].description != snapshot.NOT_DESCRIBED
    assert named == [os.getppid()]
