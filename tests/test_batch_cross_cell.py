"""Reduce batch across cells: what an earlier cell made from the batch setting (a tensor, a
batchified dataset) is re-made at each batch the fix runs, by re-running just the statements that
make it (read from the notebook's history, guarded, inside the fix's transaction). Real
InteractiveShell, simulated GPU; the pytorch/examples copies are in tests/test_real_batch.py."""

from __future__ import annotations

import re
import signal
import weakref
from typing import Any

import pytest

pytestmark = pytest.mark.slow

torch = pytest.importorskip("torch")

CARD = "%gpumem simulate 24MiB"
SETUP = """\
import types
import torch
torch.manual_seed(0)
cfg = types.SimpleNamespace(batch_size=4096, lr=0.1)
model = torch.nn.Linear(512, 512).cuda()
"""
# made from the setting through a name, in another cell
NOISE = """\
bs = cfg.batch_size
noise = torch.randn(bs, 512, device="cuda")
"""
LOOP = """\
for step in range(3):
    x = torch.randn(cfg.batch_size, 512, device="cuda")
    y = model(x) + model(noise)
    y.square().mean().backward()
"""
# the same loop where `noise` need not have the batch's size: the search goes on without it
LOOP_APART = LOOP.replace("y = model(x) + model(noise)", "y = model(x).sum() + noise.sum()")


def _notebook(shell: Any, noise: str = NOISE, loop: str = LOOP, card: str = CARD) -> None:
    shell.run_cell(card)
    assert shell.run_cell(SETUP, store_history=True).success
    assert shell.run_cell(noise, store_history=True).success
    assert not shell.run_cell(loop, store_history=True).success


def _cells(shell: Any) -> tuple[int, int]:
    """The In numbers of the setup and the noise cells."""
    history = shell.user_ns["In"]
    setup = next(n for n, c in enumerate(history) if "model = torch.nn.Linear" in c)
    return setup, next(n for n, c in enumerate(history) if "noise =" in c)


def test_a_tensor_an_earlier_cell_made_from_the_setting_is_re_made(shell: Any, capsys: Any) -> None:
    """`noise` was made at the old batch in an earlier cell (through `bs = cfg.batch_size`) and
    the loop reads it: each run re-makes `bs` and `noise` at its batch, the model is not made
    again, and the outcome names the lines, says the values are new random draws, and what to
    change (was: every run ran out on `noise` (4096, 512), "Reduce batch stopped")."""
    _notebook(shell)
    ns = shell.user_ns
    model = ns["model"]
    _setup, made = _cells(shell)
    capsys.readouterr()
    shell.run_cell("%gpumem retry batch")
    out = capsys.readouterr().out
    m = re.search(r"Fits at batch (\d+) \(was 4096\)", out)
    assert m, out
    batch = int(m.group(1))
    assert ns["cfg"].batch_size == ns["bs"] == batch
    assert tuple(ns["noise"].shape) == (batch, 512)
    assert ns["model"] is model  # the slice only: the setup cell's model is the same object
    assert f"Also re-made `noise` (In [{made}], line 2) at batch {batch}" in out, out
    assert "new random draws" in out, out
    assert "Reduce batch stopped" not in out, out
    permanent = out.split("To make it permanent:", 1)[1].split("\n", 1)[0]
    assert f"In [{made}], lines 1 (`bs`), 2 (`noise`)" in permanent, out
    assert f"re-run In [{made}] before this cell" in permanent, out


def test_oomsafe_re_makes_it_too(shell: Any, capsys: Any) -> None:
    """The same through `%%oomsafe`: the cell runs to the end at the batch found, with `noise`
    made at that batch."""
    shell.run_cell(CARD)
    assert shell.run_cell(SETUP, store_history=True).success
    assert shell.run_cell(NOISE, store_history=True).success
    capsys.readouterr()
    result = shell.run_cell("%%oomsafe\n" + LOOP, store_history=True)
    out = capsys.readouterr().out
    assert result.success, out
    ns = shell.user_ns
    batch = ns["cfg"].batch_size
    assert batch < 4096 and tuple(ns["noise"].shape) == (batch, 512), out
    assert ns["step"] == 2, out  # the whole loop ran
    assert re.search(r"Also re-made `noise` \(In \[\d+\], line 2\)", out), out


def test_a_later_cell_that_made_it_otherwise_is_the_one_that_counts(
    shell: Any, capsys: Any
) -> None:
    """`noise` made again in a later cell at a fixed size, not from the setting: nothing is
    re-made (the latest binding is what the loop reads), and the outcome says nothing of it."""
    shell.run_cell(CARD)
    assert shell.run_cell(SETUP, store_history=True).success
    assert shell.run_cell(NOISE, store_history=True).success
    assert shell.run_cell('noise = torch.randn(64, 8, device="cuda")', store_history=True).success
    deeper = LOOP_APART.replace("model(x).sum()", "model(model(x)).sum()")
    assert not shell.run_cell(deeper, store_history=True).success
    noise = shell.user_ns["noise"]
    capsys.readouterr()
    shell.run_cell("%gpumem retry batch")
    out = capsys.readouterr().out
    assert "Fits at batch" in out, out
    assert "re-made" not in out, out
    assert shell.user_ns["noise"] is noise


def test_oomsafe_starting_at_the_remembered_batch_re_makes_it(shell: Any, capsys: Any) -> None:
    """The same `%%oomsafe` cell run again after the setup cells ran again at 4096: it starts at
    the batch that fit last time, and `noise` must be made at that batch too."""
    shell.run_cell("%gpumem simulate 32MiB")
    assert shell.run_cell(SETUP, store_history=True).success
    assert shell.run_cell(NOISE, store_history=True).success
    assert shell.run_cell("%%oomsafe\n" + LOOP, store_history=True).success
    batch = shell.user_ns["cfg"].batch_size
    assert shell.run_cell(SETUP, store_history=True).success
    assert shell.run_cell(NOISE, store_history=True).success
    capsys.readouterr()
    result = shell.run_cell("%%oomsafe\n" + LOOP, store_history=True)
    out = capsys.readouterr().out
    assert f"starting at batch {batch}" in out, out
    assert result.success, out
    assert tuple(shell.user_ns["noise"].shape) == (batch, 512), out


PRINTS = """\
def make_noise(n):
    print("made noise of", n)
    return torch.randn(n, 8, device="cuda")
noise = make_noise(cfg.batch_size)
"""


def test_a_slice_that_prints_is_not_re_run_silently(shell: Any, capsys: Any) -> None:
    """`noise = make_noise(cfg.batch_size)`, whose function prints: not re-run; the fix says so,
    names the cell to re-run, and the search goes on as before without it."""
    _notebook(shell, PRINTS, LOOP_APART, "%gpumem simulate 12MiB")
    ns = shell.user_ns
    noise = ns["noise"]
    _setup, made = _cells(shell)
    capsys.readouterr()
    shell.run_cell("%gpumem retry batch")
    captured = capsys.readouterr()
    out = captured.out + captured.err
    assert "made noise of" not in out, out  # never re-run
    assert ns["noise"] is noise and tuple(noise.shape) == (4096, 8)
    assert ns["cfg"].batch_size < 4096  # the loop itself fits without it
    assert re.search(
        rf"Not re-made: `noise` \(In \[{made}\], line 4\), made from `cfg\.batch_size` in an "
        rf"earlier cell; re-running it would print again \(In \[{made}\], line 4: "
        rf"`make_noise\(\)` prints\)\. Re-run In \[{made}\] at batch \d+ yourself",
        out,
    ), out
    assert "Fits at batch" in out, out  # `noise` at 4096 does not stop this loop


def test_a_rerun_that_raises_on_a_full_card_is_one_line(shell: Any, capsys: Any) -> None:
    """A re-run that raises the cell's own error (`noise` not re-made: its maker prints) while the
    card is full: the rollback has no room to put the failed run's leftover back on the GPU, so it
    stays in host memory, said in the one line; no new out-of-memory diagnosis through the fix."""
    _notebook(shell, PRINTS.replace("(n, 8,", "(n, 512,"), LOOP)
    capsys.readouterr()
    shell.run_cell("%gpumem retry batch")
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert re.search(r"✗ Reduce batch: the re-run at batch \d+ raised RuntimeError", text), text
    assert "Tried to allocate" not in captured.err.split("✗ Reduce batch")[-1], text
    assert shell.user_ns["cfg"].batch_size == 4096


@pytest.mark.parametrize(
    "change",
    ["noise[:] = 0", "noise.mul_(0);", "noise = torch.zeros(64, 512, device='cuda')"],
)
def test_what_the_user_changed_since_is_not_re_made(shell: Any, capsys: Any, change: str) -> None:
    """`noise` changed after the failure (in place, or bound again) is the user's now: never
    replaced by a re-made one (the fix goes on as if nothing were re-made). Was: replaced by a new
    random tensor at the new batch, the note saying only 'Also re-made'."""
    _notebook(shell)
    assert shell.run_cell(change, store_history=True).success
    noise = weakref.ref(shell.user_ns["noise"])  # not held here: the fix has the room it had
    capsys.readouterr()
    shell.run_cell("%gpumem retry batch --force")  # a cell ran since the failure
    out = capsys.readouterr().out
    assert "Also re-made" not in out, out
    kept = shell.user_ns["noise"]
    assert kept is noise() and bool((kept == 0).all()), out  # each of the three zeroes it


LIBRARY = """\
def noise(n):
    with open(LOG, "a") as f:
        f.write(f"{n}\\n")
    import torch
    return torch.randn(n, 512, device="cuda")
"""


def test_a_slice_whose_library_writes_is_stopped_before_the_write(
    shell: Any, capsys: Any, tmp_path: Any, monkeypatch: Any
) -> None:
    """`noise = mylib.noise(cfg.batch_size)` where the library (not notebook code, which the guard
    reads) appends to a log: the re-made statement runs as a rehearsal does, stopped before the
    write, in every run; the fix stops, says what and which cell, and puts the notebook back. Was:
    every rehearsal and the kept run appended a line, and nothing said so."""
    log = tmp_path / "log.txt"
    (tmp_path / "gpumem_test_lib.py").write_text(LIBRARY.replace("LOG", repr(str(log))))
    monkeypatch.syspath_prepend(str(tmp_path))
    _notebook(shell, "import gpumem_test_lib\nnoise = gpumem_test_lib.noise(cfg.batch_size)\n")
    noise = shell.user_ns["noise"]
    capsys.readouterr()
    shell.run_cell("%gpumem retry batch")
    out = capsys.readouterr().out
    assert log.read_text().splitlines() == ["4096"], out  # written once, by the user's own run
    assert re.search(r"Not re-made: `noise` \(In \[\d+\], line 2\).*would write outside memory "
                     r"\(stopped before `open\(.*log\.txt', 'a'\)`\)", out), out  # fmt: skip
    assert shell.user_ns["noise"] is noise and shell.user_ns["cfg"].batch_size == 4096


CATCHING = """\
def noise(n):
    try:
        with open(LOG, "a") as f:
            f.write(f"{n}\\n")
    except BaseException:  # a library that swallows every error, ours too
        pass
    import torch
    return torch.randn(n, 512, device="cuda")
"""


def test_a_slice_whose_library_catches_the_stop_is_still_stopped(
    shell: Any, capsys: Any, tmp_path: Any, monkeypatch: Any
) -> None:
    """As above, but the library catches every exception around its write, the stop included,
    and goes on: the fix still knows the write was stopped (its log would miss lines, silently),
    so it says so and puts the notebook back. Was: the re-made value was kept as if whole."""
    log = tmp_path / "log.txt"
    (tmp_path / "gpumem_test_catching.py").write_text(CATCHING.replace("LOG", repr(str(log))))
    monkeypatch.syspath_prepend(str(tmp_path))
    _notebook(
        shell, "import gpumem_test_catching\nnoise = gpumem_test_catching.noise(cfg.batch_size)\n"
    )
    noise = shell.user_ns["noise"]
    capsys.readouterr()
    shell.run_cell("%gpumem retry batch")
    out = capsys.readouterr().out
    assert log.read_text().splitlines() == ["4096"], out  # written once, by the user's own run
    assert re.search(
        r"Not re-made: `noise` \(In \[\d+\], line 2\).*would write outside memory", out
    ), out
    assert shell.user_ns["noise"] is noise and shell.user_ns["cfg"].batch_size == 4096


def test_a_slice_that_sets_the_environment_is_stopped(shell: Any, capsys: Any) -> None:
    """A notebook helper that sets `os.environ` (which no rollback puts back): stopped before it."""
    import os

    maker = (
        "import os\n"
        "def make(n):\n"
        "    os.environ['GPUMEM_TEST_BS'] = str(n)\n"
        "    return torch.randn(n, 512, device='cuda')\n"
        "noise = make(cfg.batch_size)\n"
    )
    _notebook(shell, maker)
    capsys.readouterr()
    shell.run_cell("%gpumem retry batch")
    out = capsys.readouterr().out
    assert os.environ.pop("GPUMEM_TEST_BS") == "4096", out
    assert "Not re-made: `noise`" in out, out
    assert shell.user_ns["cfg"].batch_size == 4096


WRITES = """\
noise, _ = torch.randn(cfg.batch_size, 8, device="cuda"), open(LOG, "a").write("made\\n")
"""


def test_a_slice_the_guard_stops_is_not_re_run(shell: Any, capsys: Any, tmp_path: Any) -> None:
    """The statement that makes `noise` also appends to a file: the guard says a re-run would
    write it again, so it is not re-run (the file has one line); the fix says which cell."""
    log = tmp_path / "log.txt"
    _notebook(shell, WRITES.replace("LOG", repr(str(log))), LOOP_APART, "%gpumem simulate 12MiB")
    capsys.readouterr()
    shell.run_cell("%gpumem retry batch")
    out = capsys.readouterr().out
    assert log.read_text() == "made\n", out
    assert re.search(
        r"Not re-made: `noise` \(In \[\d+\], line 1\).*would repeat what In \[\d+\], line 1 did "
        r"\(appends to '",
        out,
    ), out
    assert tuple(shell.user_ns["noise"].shape) == (4096, 8)


def test_ctrl_c_puts_the_earlier_cells_variable_back(
    shell: Any, capsys: Any, monkeypatch: Any
) -> None:
    """Ctrl-C in the first re-run (after the slice re-made `noise` at the new batch): the setting,
    `bs` and `noise` are as before, `noise` the same object (another name holds it) with the same
    values."""
    loop = LOOP.replace("for step in range(3):\n", "for step in range(3):\n    check()\n")
    shell.run_cell(CARD)
    assert shell.run_cell(SETUP, store_history=True).success
    assert shell.run_cell(NOISE, store_history=True).success
    assert shell.run_cell(
        "calls = []\n"
        "def check():\n"
        "    calls.append(noise.shape[0])\n"
        "    if noise.shape[0] != 4096:\n"
        "        raise KeyboardInterrupt  # Ctrl-C once the slice re-made `noise`\n"
        "held = noise\n"
    ).success
    assert not shell.run_cell(loop, store_history=True).success
    ns = shell.user_ns
    before = ns["noise"].detach().cpu().clone()
    capsys.readouterr()
    shell.run_cell("%gpumem retry batch --force")
    captured = capsys.readouterr()
    text = captured.out + captured.err
    # the Ctrl-C, in the run whose `noise` the slice had re-made (without the slice: the loop's
    # RuntimeError, `noise` (4096, 512) beside `x` at the new batch)
    assert "KeyboardInterrupt" in text and "RuntimeError" not in text, text
    assert len(ns["calls"]) == 1  # the re-run's append was put back with the rest
    assert ns["noise"] is ns["held"]
    assert torch.equal(ns["noise"].cpu(), before)
    assert ns["cfg"].batch_size == ns["bs"] == 4096
    assert signal.getsignal(signal.SIGINT) is not None
