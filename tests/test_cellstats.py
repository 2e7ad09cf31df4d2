"""`%gpumem cells on`, `%gpumem history`: what each cell cost, in a real InteractiveShell on the
simulated GPU, and the cells over which the card filled named next to an OOM."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("torch")


@pytest.mark.slow
def test_each_cell_gets_a_line_and_history_a_table(shell: Any, capsys: Any, run: Any) -> None:
    shell.run_cell("%gpumem simulate 256MiB")
    shell.run_cell("import torch")
    shell.run_cell("%gpumem cells on")
    out = run(shell, 'a = torch.zeros(16 << 20, device="cuda")  # 64 MiB', store_history=False).out
    assert "+64.00 MiB, peak 64.00 MiB of 256 MiB" in out, out
    shell.run_cell("del a")
    assert "-64.00 MiB" in capsys.readouterr().out
    shell.run_cell("%gpumem history")
    table = capsys.readouterr().out
    assert "+64.00 MiB" in table and "-64.00 MiB" in table
    assert table.splitlines()[0].split() == ["cell", "change", "after", "peak", "time"]
    shell.run_cell("%gpumem cells off")
    capsys.readouterr()
    shell.run_cell('b = torch.zeros(1 << 20, device="cuda")')
    assert "peak" not in capsys.readouterr().out


def test_the_diagnosis_names_the_cells_that_filled_the_card(shell: Any, capsys: Any) -> None:
    shell.run_cell("%gpumem simulate 160MiB")
    shell.run_cell("import torch")
    shell.run_cell("%gpumem cells on --quiet")
    shell.run_cell('a = torch.zeros(20 << 20, device="cuda")  # 80 MiB')
    shell.run_cell('b = torch.zeros(10 << 20, device="cuda")  # 40 MiB')
    capsys.readouterr()
    assert not shell.run_cell('c = torch.zeros(20 << 20, device="cuda")').success
    out = capsys.readouterr().out
    assert "The card filled over these cells: In [" in out, out
    assert "+80.00 MiB" in out and "+40.00 MiB" in out


def test_no_filled_note_once_recording_is_off(shell: Any, capsys: Any) -> None:
    shell.run_cell("%gpumem simulate 160MiB")
    shell.run_cell("import torch")
    shell.run_cell("%gpumem cells on --quiet")
    shell.run_cell('a = torch.zeros(20 << 20, device="cuda")  # 80 MiB')
    shell.run_cell("del a")
    shell.run_cell("%gpumem cells off")
    capsys.readouterr()
    assert not shell.run_cell('c = torch.zeros(50 << 20, device="cuda")').success
    assert "The card filled over these cells" not in capsys.readouterr().out


def test_bad_arguments_are_one_line(shell: Any) -> None:
    from IPython.core.error import UsageError

    with pytest.raises(UsageError):
        shell.run_line_magic("gpumem", "cells maybe")
    with pytest.raises(UsageError):
        shell.run_line_magic("gpumem", "history now")


def test_unload_stops_recording(shell: Any, capsys: Any) -> None:
    shell.run_cell("%gpumem simulate 64MiB")
    shell.run_cell("import torch\n%gpumem cells on")
    shell.run_cell("%unload_ext jupyter_gpumem")
    capsys.readouterr()
    shell.run_cell('x = torch.zeros(1 << 20, device="cuda")')
    assert "peak" not in capsys.readouterr().out
    shell.run_cell("%load_ext jupyter_gpumem")
