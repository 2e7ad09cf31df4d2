"""Rehearsals cannot touch the world: a write outside the kernel's memory ends a rehearsal, so a
fix leaves the effect of one clean run only (files, `!echo >> file`), and the rehearsal's line
says what it was stopped before. Real InteractiveShell, simulated GPU, `%gpumem retry batch`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from tests.test_rescue import SETUP, TRAIN  # noqa: E402


def _lines(path: Path) -> int:
    return path.read_text().count("\n") if path.exists() else 0


@pytest.fixture
def train(shell: Any, tmp_path: Path, monkeypatch: Any) -> Any:
    monkeypatch.chdir(tmp_path)
    shell.run_cell("%gpumem simulate 48MiB")
    assert shell.run_cell(SETUP).success
    return shell


def _one_clean_run(shell: Any, cell: str, batch: int, tmp_path: Path) -> dict[str, int]:
    """The lines each file gets from one clean run of ``cell`` at ``batch``, from the setup."""
    for f in tmp_path.iterdir():
        f.unlink()
    assert shell.run_cell(SETUP).success
    assert shell.run_cell(cell.replace("2048\n", f"{batch}\n", 1)).success
    return {f.name: _lines(f) for f in tmp_path.iterdir()}


@pytest.mark.slow
def test_a_rehearsal_appends_no_line_to_a_file_and_runs_no_shell_command(
    train: Any, tmp_path: Path, run: Any
) -> None:
    """`open(..., 'a')` and `!echo >> file` after the failing line: the fix leaves the lines of
    one clean run at the batch it keeps (the rehearsals wrote none)."""
    shell = train
    cell = TRAIN + (
        "        with open('log.txt', 'a') as f:\n"
        "            f.write(f'{loss.item()}\\n')\n"
        "        !echo step >> shell.txt\n"
    )
    assert not shell.run_cell(cell).success
    assert _lines(tmp_path / "log.txt") == 0
    out = run(shell, "%gpumem retry batch", store_history=False).out
    assert "Fits at batch" in out, out
    assert re.search(r"rehearsal.*rolled back", out), out
    assert "stopped before `open('log.txt', 'a')`" in out, out
    batch = shell.user_ns["batch_size"]
    written = {"log.txt": _lines(tmp_path / "log.txt"), "shell.txt": _lines(tmp_path / "shell.txt")}
    assert written["log.txt"] == len(shell.user_ns["history"]) > 0
    assert written == _one_clean_run(shell, cell, batch, tmp_path)


def test_reads_stay_allowed_and_a_real_run_is_not_stopped(shell: Any, tmp_path: Path) -> None:
    from jupyter_gpumem.rescue import sandbox

    (tmp_path / "data.txt").write_text("1\n")
    with sandbox.rehearsing() as state:
        assert (tmp_path / "data.txt").read_text() == "1\n"
        with pytest.raises(sandbox.WorldTouched, match="open"):
            open(tmp_path / "out.txt", "w")  # noqa: SIM115
        with pytest.raises(sandbox.WorldTouched, match=r"os\.remove"):
            (tmp_path / "data.txt").unlink()
    assert state.stopped is not None and "out.txt" in state.stopped
    (tmp_path / "out.txt").write_text("outside a rehearsal")  # idle again
    assert (tmp_path / "data.txt").exists()


@pytest.mark.parametrize(
    ("code", "words"),
    [
        ("import os; os.rename(A, B)", "`os.rename("),
        ("import shutil; shutil.copyfile(A, B)", "`shutil.copyfile("),
        ("import os; os.mkdir(B)", "`os.mkdir("),
        ("import subprocess; subprocess.run(['true'])", "running `true`"),
        ("import os; os.system('true')", "running `true`"),
        ("import socket; socket.socket().connect(('127.0.0.1', 9))", "`socket.connect("),
        ("import sqlite3; sqlite3.connect(B)", "`sqlite3.connect("),
        ("import os; os.open(B, os.O_WRONLY | os.O_CREAT)", "for writing"),
    ],
)
def test_each_kind_of_write_stops_a_rehearsal(tmp_path: Path, code: str, words: str) -> None:
    from jupyter_gpumem.rescue import sandbox

    a, b = tmp_path / "a.txt", tmp_path / "b"
    a.write_text("x")
    with sandbox.rehearsing() as state, pytest.raises(sandbox.WorldTouched):
        exec(code, {"A": str(a), "B": str(b)})
    assert state.stopped is not None and words in state.stopped, state.stopped
    assert not b.exists()


@pytest.mark.slow
def test_rehearsal_peaks_are_read_on_the_gpu_that_ran_out(shell: Any, run: Any) -> None:
    """Issue 18: with two cards and the cell on cuda:1, every rehearsal read "peak 0 B" (cuda:0)."""
    shell.run_cell("%gpumem simulate 64MiB --devices 2")
    assert shell.run_cell(SETUP.replace(".cuda()", ".to('cuda:1')")).success
    cell = TRAIN.replace(".cuda()", ".to('cuda:1')").replace("h, h, h, h, h, h", "h, " * 7 + "h")
    assert not shell.run_cell(cell).success
    out = run(shell, "%gpumem retry batch", store_history=False).out
    fits = re.findall(r"fits  peak ([\d.]+) (MiB|KiB|B) of ([\d.]+) MiB", out)
    assert fits, out
    assert all(unit == "MiB" and float(peak) > 1 for peak, unit, _ in fits), out


def test_oomsafe_leaves_one_clean_runs_lines(
    shell: Any, tmp_path: Path, monkeypatch: Any, capsys: Any
) -> None:
    """`%%oomsafe` rehearses every fix before its real run: the log gets the 3 lines of the run
    that is kept, none from the rehearsals (issue 19: 7 where 3 belong)."""
    monkeypatch.chdir(tmp_path)
    shell.run_cell("%gpumem simulate 160MiB")
    shell.run_cell("import torch")
    capsys.readouterr()
    result = shell.run_cell(
        "%%oomsafe --force\n"
        "batch_size = 64\n"
        "for step in range(3):\n"
        "    x = torch.randn(batch_size, 1 << 20, device='cuda')\n"
        "    with open('log.txt', 'a') as f:\n"
        "        print(step, x.shape[0], file=f)\n"
    )
    out = capsys.readouterr().out
    assert result.success, out
    assert "stopped before `open('log.txt', 'a')`" in out, out
    lines = (tmp_path / "log.txt").read_text().splitlines()
    batch = shell.user_ns["batch_size"]
    assert lines == [f"{step} {batch}" for step in range(3)], out


def test_a_real_run_is_journaled_and_a_rollback_takes_its_writes_back(tmp_path: Path) -> None:
    """A real run is not stopped; if it fails, its rollback puts the files it wrote back and
    names what it cannot take back."""
    import os

    from jupyter_gpumem.rescue import sandbox

    log, new, kept = tmp_path / "log.txt", tmp_path / "new.txt", tmp_path / "kept.txt"
    log.write_text("before\n")
    kept.write_text("old content\n")
    with sandbox.journaling():
        with open(log, "a") as f:
            f.write("during\n")
        new.write_text("made\n")
        kept.write_text("overwritten\n")
        os.system("true")
    journal = sandbox.take_journal()
    assert journal is not None and sandbox.take_journal() is None
    problems = journal.undo()
    assert log.read_text() == "before\n"
    assert not new.exists()
    assert kept.read_text() == "old content\n"
    assert problems == ["running `true` ran in a real run that failed: not undone"]
