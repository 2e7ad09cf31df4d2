"""Cells with top-level ``await``, re-run by the fixes as IPython runs them (its async runner):
``%gpumem retry`` and ``%%oomsafe`` on the simulated GPU, in an InteractiveShell and in a real
kernel, where the kernel's own event loop is running the fix."""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import pytest

import jupyter_gpumem
from tests.conftest import Kernel

torch = pytest.importorskip("torch")

SETUP = "import asyncio, torch"
ALLOC = "x = torch.empty(batch_size << 20, dtype=torch.uint8, device='cuda')\n"
CELL = "batch_size = 80\nawait asyncio.sleep(0)\n" + ALLOC


def _fail(shell: Any, cell: str = CELL, card: str = "64MiB") -> None:
    shell.run_cell(f"%gpumem simulate {card}", store_history=True)
    shell.run_cell(SETUP, store_history=True)
    assert not shell.run_cell(cell, store_history=True).success
    assert jupyter_gpumem.last_failure(shell) is not None


def test_reduce_batch_reruns_an_await_cell(shell: Any, run: Any) -> None:
    """Was: 'Reduce batch not run: this cell uses top-level `await`, which a fix cannot re-run
    yet' (and before that, 'Reduce batch failed (SyntaxError: 'await' outside function)')."""
    _fail(shell)
    out = run(shell, "%gpumem retry batch").text
    assert "Fits at batch" in out, out
    assert "SyntaxError" not in out and "Traceback" not in out and "cannot re-run" not in out
    batch = shell.user_ns["batch_size"]
    assert batch < 80
    x = shell.user_ns["x"]
    assert x.numel() == batch << 20 and x.device.type == "cuda"
    assert "rehearsal" in out, "the rehearsals ran the cell's coroutine too"


def test_move_to_cpu_reruns_an_await_cell(shell: Any, run: Any) -> None:
    _fail(shell)
    out = run(shell, "%gpumem retry cpu").text
    assert "ran on the CPU" in out, out
    assert shell.user_ns["x"].device.type == "cpu"
    assert shell.user_ns["x"].numel() == 80 << 20, "the batch was not changed"


def test_an_awaited_last_expression_is_shown(shell: Any, run: Any) -> None:
    shell.run_cell("async def answer():\n    await asyncio.sleep(0)\n    return 4242")
    _fail(shell, CELL + "await answer()")
    out = run(shell, "%gpumem retry cpu").text
    assert "4242" in out, out


def test_oomsafe_runs_an_await_body(shell: Any, run: Any) -> None:
    """Was: "this cell uses top-level `await`, which %%oomsafe cannot run": the body's coroutine
    now runs as the cell's would, and the ladder fixes it."""
    shell.run_cell("%gpumem simulate 64MiB")
    shell.run_cell(SETUP)
    out = run(shell, "%%oomsafe --fixes batch\n" + CELL).text
    assert "oomsafe: Fits at batch" in out, out
    assert "Traceback" not in out
    assert 0 < shell.user_ns["batch_size"] < 80
    out = run(shell, "%%oomsafe\nawait asyncio.sleep(0)\ny = 1").text
    assert shell.user_ns["y"] == 1 and out.strip() == "", out


def test_an_async_loop_is_rehearsed_and_left_as_one_clean_run(shell: Any, run: Any) -> None:
    """A loop that awaits in every pass: the rehearsals stop after their passes (the coroutine's
    frame is resumed at each await), and what they left is rolled back."""
    shell.run_cell("%gpumem simulate 64MiB")
    shell.run_cell(SETUP + "\nlog = []")
    cell = (
        "batch_size = 48\n"
        "for step in range(4):\n"
        "    await asyncio.sleep(0)\n"
        "    x = torch.empty(batch_size << 20, dtype=torch.uint8, device='cuda')\n"
        "    y = torch.empty(batch_size << 20, dtype=torch.uint8, device='cuda')\n"
        "    log.append(step)\n"
        "    del x, y\n"
    )
    assert not shell.run_cell(cell, store_history=True).success
    out = run(shell, "%gpumem retry batch").text
    assert "Fits at batch" in out, out
    assert "stopped after 2 passes" in out or "2 passes" in out, out
    assert shell.user_ns["log"] == [0, 1, 2, 3], "one clean run of four passes, nothing more"


def test_tasks_a_rehearsal_started_do_not_run_after_it(shell: Any, run: Any) -> None:
    """A task the cell starts and does not await: a rehearsal's is cancelled when the rehearsal
    ends (it would run later and append after the rollback); the real run's goes on, as the
    cell's would."""
    shell.run_cell("%gpumem simulate 64MiB")
    shell.run_cell(
        SETUP + "\ndone = []\n"
        "async def later(step):\n"
        "    await asyncio.sleep(0.05)\n"
        "    done.append(step)\n"
        "tasks = []"
    )
    cell = (
        "batch_size = 48\n"
        "for step in range(3):\n"
        "    x = torch.empty(batch_size << 20, dtype=torch.uint8, device='cuda')\n"
        "    y = torch.empty(batch_size << 20, dtype=torch.uint8, device='cuda')\n"
        "    del x, y\n"
        "    tasks.append(asyncio.ensure_future(later(step)))\n"
        "    await asyncio.sleep(0)\n"
    )
    assert not shell.run_cell(cell, store_history=True).success
    out = run(shell, "%gpumem retry batch --force").text
    assert "Fits at batch" in out, out
    shell.run_cell("await asyncio.sleep(0.3)")
    assert sorted(shell.user_ns["done"]) == [0, 1, 2], "the real run's three tasks, no more"
    assert len(shell.user_ns["tasks"]) == 3


@pytest.mark.skipif(os.name != "posix", reason="a real SIGINT")
def test_ctrl_c_while_an_await_rehearsal_waits(shell: Any, capsys: Any) -> None:
    """A real SIGINT while the re-run's coroutine waits in the event loop: the notebook is put
    back, the waiting re-run never goes on (was left pending on IPython's loop, to resume in the
    next await cell), and the next await cell runs normally."""
    shell.user_ns["_press_ctrl_c"] = lambda: threading.Timer(
        0.1, os.kill, (os.getpid(), signal.SIGINT)
    ).start()
    shell.run_cell(
        "import os\n"
        "async def nap():\n"
        "    nap.calls += 1\n"
        "    if nap.calls == 2:  # the first re-run: Ctrl-C while it sleeps\n"
        "        _press_ctrl_c()\n"
        "        await asyncio.sleep(20)  # ended by the Ctrl-C, however late it comes\n"
        "    await asyncio.sleep(0.6)\n"
        "nap.calls = 0\n"
        "afters = []"
    )
    cell = "batch_size = 80\nawait nap()\nafters.append(batch_size)\n" + CELL.split("\n")[2]
    _fail(shell, cell)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's, as in a notebook
    result = shell.run_cell("%gpumem retry batch --force", store_history=True)
    assert isinstance(result.error_in_exec, KeyboardInterrupt)
    assert "Interrupted" in capsys.readouterr().err
    assert shell.user_ns["nap"].calls == 1, "the re-run began, and was put back"
    assert shell.user_ns["batch_size"] == 80 and shell.user_ns["afters"] == [80], "as it was"
    assert shell.run_cell("await asyncio.sleep(0.8)\nok = 1").success
    assert shell.user_ns["afters"] == [80], "the interrupted re-run was cancelled, not resumed"
    assert shell.user_ns["ok"] == 1


@pytest.mark.kernel
def test_await_cells_fixed_in_a_real_kernel(kernel: Kernel) -> None:
    """In ipykernel the kernel's event loop is running the fix: the cell's coroutine runs beside
    it, and the kernel's loop is the running loop again afterwards (await cells still work)."""
    k = kernel
    k.run("%load_ext jupyter_gpumem\n%gpumem simulate 64MiB\n" + SETUP)
    before = Kernel.text(k.run("print(id(asyncio.get_running_loop()))")).strip()
    r = k.run(CELL)
    assert r["reply"]["status"] == "error" and r["reply"]["ename"] == "OutOfMemoryError"
    retry = Kernel.text(k.run("%gpumem retry batch"))
    assert "Fits at batch" in retry and "Traceback" not in retry, retry
    assert int(Kernel.text(k.run("print(batch_size)")).strip()) < 80
    after = k.run("await asyncio.sleep(0)\nprint(id(asyncio.get_running_loop()))")
    assert after["reply"]["status"] == "ok"
    assert Kernel.text(after).strip() == before, "the kernel's own loop runs its cells again"
    k.run("del x")
    r = k.run(CELL.replace("80", "72"))
    assert r["reply"]["status"] == "error"
    cpu = Kernel.text(k.run("%gpumem retry cpu"))
    assert "ran on the CPU" in cpu, cpu
    assert Kernel.text(k.run("print(x.device.type)")).strip() == "cpu"
    safe = k.run("%%oomsafe --fixes batch\n" + CELL.replace("80", "96"))
    assert safe["reply"]["status"] == "ok", Kernel.text(safe)
    assert "oomsafe: Fits at batch" in Kernel.text(safe)
    # a task the kept run starts and leaves: IPython's loop runs no more after the fix, so it is
    # cancelled, and the run's line says so (was: left pending there, silently, for good)
    k.run("del x")
    r = k.run("t = asyncio.ensure_future(asyncio.sleep(30))\n" + CELL.replace("80", "72"))
    assert r["reply"]["status"] == "error"
    cpu = Kernel.text(k.run("%gpumem retry cpu"))
    assert "1 task it started and did not await cancelled" in cpu, cpu
    assert Kernel.text(k.run("print(t.cancelled())")).strip() == "True"
    # what only the kernel's loop can deliver: said in one sentence (was: the task's repr)
    k.run(
        "del x\nfut = asyncio.get_running_loop().create_future()\n"
        "asyncio.get_running_loop().call_later(0.2, fut.set_result, 1)"
    )
    r = k.run("batch_size = 80\nawait asyncio.sleep(0)\nif not fut.done(): await fut\n" + ALLOC)
    assert r["reply"]["status"] == "error"
    k.run("fut = asyncio.get_running_loop().create_future()  # pending, and nothing sets it")
    other = Kernel.text(k.run("%gpumem retry cpu --force"))
    assert "raised RuntimeError: Future <Future pending> attached to a different loop" in other
    assert "made on the kernel's event loop by an earlier cell" in other, other
    assert "rerun.py" not in other.splitlines()[-1], "the line names no frame of ours"


def test_a_task_started_in_the_cell_and_awaited_last(shell: Any, run: Any) -> None:
    """The cell starts a task and awaits it as its last expression: the whole cell is one
    coroutine, as IPython runs it, so the task is still there when the last line awaits it
    (a rehearsal's tasks are cancelled only once the cell has ended)."""
    shell.run_cell(
        "async def make(n):\n"
        "    await asyncio.sleep(0.01)\n"
        "    return torch.empty(n << 20, dtype=torch.uint8, device='cuda').numel() >> 20"
    )
    _fail(shell, "batch_size = 80\nt = asyncio.ensure_future(make(batch_size))\nawait t")
    out = run(shell, "%gpumem retry batch").text
    assert "Fits at batch" in out and "Traceback" not in out, out
    assert shell.user_ns["t"].result() == shell.user_ns["batch_size"] < 80


def test_an_await_rehearsal_stops_before_a_write(
    shell: Any, run: Any, tmp_path: Any, monkeypatch: Any
) -> None:
    """The sandbox holds inside the coroutine too: a rehearsal of an async loop stops before its
    first write to a file, and the fix leaves one clean run's lines."""
    monkeypatch.chdir(tmp_path)
    cell = (
        "batch_size = 48\n"
        "for step in range(3):\n"
        "    x = torch.empty(batch_size << 20, dtype=torch.uint8, device='cuda')\n"
        "    y = torch.empty(batch_size << 20, dtype=torch.uint8, device='cuda')\n"
        "    del x, y\n"
        "    await asyncio.sleep(0)\n"
        "    with open('log.txt', 'a') as f:\n"
        "        f.write(f'{step}\\n')\n"
    )
    _fail(shell, cell)
    out = run(shell, "%gpumem retry batch").text
    assert "Fits at batch" in out, out
    assert "stopped before `open('log.txt', 'a')`" in out, out
    assert (tmp_path / "log.txt").read_text() == "0\n1\n2\n", "one clean run's lines"


def test_a_write_handed_to_a_thread_stops_the_rehearsal_too(
    shell: Any, run: Any, tmp_path: Any, monkeypatch: Any
) -> None:
    """``await asyncio.to_thread(write)``: the worker thread runs in the rehearsal's context, so
    its write ends the rehearsal as the cell's own would (was: written by every rehearsal)."""
    monkeypatch.chdir(tmp_path)
    shell.run_cell(
        "def write(step):\n    with open('log.txt', 'a') as f:\n        f.write(f'{step}\\n')"
    )
    cell = (
        "batch_size = 48\n"
        "for step in range(3):\n"
        "    x = torch.empty(batch_size << 20, dtype=torch.uint8, device='cuda')\n"
        "    y = torch.empty(batch_size << 20, dtype=torch.uint8, device='cuda')\n"
        "    del x, y\n"
        "    await asyncio.to_thread(write, step)\n"
    )
    _fail(shell, cell)
    out = run(shell, "%gpumem retry batch --force").text
    assert "Fits at batch" in out, out
    assert "stopped before `open('log.txt', 'a')`" in out, out
    assert (tmp_path / "log.txt").read_text() == "0\n1\n2\n", "one clean run's lines"


def test_a_real_runs_writes_from_a_thread_in_its_context_are_journaled(tmp_path: Any) -> None:
    """A real run's write handed to ``asyncio.to_thread`` (the run's context goes with it) is
    journaled as the run's own, so a rollback takes it back; a thread outside the run's context
    is not the run's."""
    import asyncio
    import contextvars

    from jupyter_gpumem.rescue import sandbox

    log, other = tmp_path / "log.txt", tmp_path / "other.txt"
    log.write_text("before\n")
    unrelated = contextvars.copy_context()  # a thread started before the run carries this one

    def write(path: Any) -> None:
        with open(path, "a") as f:
            f.write("during\n")

    with sandbox.journaling():
        asyncio.run(asyncio.to_thread(write, log))
        worker = threading.Thread(target=unrelated.run, args=(write, other))
        worker.start()
        worker.join()
    journal = sandbox.take_journal()
    assert journal is not None and journal.undo() == []
    assert log.read_text() == "before\n"
    assert other.read_text() == "during\n", "not the run's"


def test_a_background_task_an_earlier_cell_started_is_not_stopped_by_a_rehearsal(
    shell: Any, run: Any, tmp_path: Any
) -> None:
    """A logger task started by an earlier await cell runs on IPython's loop whenever an await
    cell does, on the same thread as a rehearsal: its writes are its own, not the rehearsal's.
    Was: the rehearsal raised WorldTouched inside it and the task died."""
    log = tmp_path / "bg.log"
    shell.run_cell("%gpumem simulate 64MiB", store_history=True)
    shell.run_cell(SETUP, store_history=True)
    assert shell.run_cell(
        "async def logger():\n"
        "    while True:\n"
        "        await asyncio.sleep(0.001)\n"
        f"        with open({str(log)!r}, 'a') as f:\n"
        "            f.write('tick\\n')\n"
        "bg = asyncio.ensure_future(logger())\n"
        "await asyncio.sleep(0.01)",
        store_history=True,
    ).success
    cell = "batch_size = 80\nfor i in range(3):\n    await asyncio.sleep(0.005)\n    " + ALLOC
    assert not shell.run_cell(cell, store_history=True).success
    out = run(shell, "%gpumem retry batch").text
    assert "Fits at batch" in out, out
    bg = shell.user_ns["bg"]
    assert not bg.done(), bg.exception() if not bg.cancelled() else "cancelled"
    bg.cancel()
