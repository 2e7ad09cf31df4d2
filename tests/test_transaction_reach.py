"""Rollback complete, or honest: a fix leaves the effect of one clean run only, on everything the
cell reaches (an array changed in place, containers at any depth and length, objects' slots,
closure cells, partials, class and module attributes, random generator objects, open files), and
names what it cannot put back (a generator). Real InteractiveShell, simulated GPU, the commands
as a user types them."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
np = pytest.importorskip("numpy")

HELPERS = """\
count = 0
def bump():
    global count
    count += 1
"""

SETUP = """\
import csv, functools, logging, random
import numpy as np
import torch
import helpers
arr = np.zeros(3)
deep = {"a": {"b": [[], [], []]}}
big = [[] for _ in range(3000)]
LOG = []
class Logger:
    def log(self, v):
        LOG.append(v)
lg = Logger()
class Counter:
    n = 0
    def bump(self):
        type(self).n += 1
ctr = Counter()
class Slotted:
    __slots__ = ("v",)
sl = Slotted()
sl.v = 0
def make():
    n = 0
    def inc():
        nonlocal n
        n += 1
        return n
    return inc
inc = make()
add = functools.partial(lambda acc, v: acc.append(v), [])
nprng, pyrng, trng = np.random.default_rng(0), random.Random(0), torch.Generator().manual_seed(0)
draws = []
log_file = open("print.txt", "a")
csv_file = open("rows.csv", "a", newline="")
rows = csv.writer(csv_file)
logger = logging.getLogger("train19")
logger.propagate = False
handler = logging.FileHandler("train.log")
logger.addHandler(handler)
"""

CELL = """\
batch_size = 64
for step in range(3):
    x = torch.randn(batch_size, 1 << 20, device="cuda")
    arr += 1
    deep["a"]["b"][2].append(step)
    big[2500].append(step)
    lg.log(step)
    ctr.bump()
    sl.v += 1
    inc()
    add(step)
    helpers.bump()
    draws.append((nprng.random(), pyrng.random(), torch.rand(1, generator=trng).item()))
    print(step, file=log_file)
    log_file.flush()
    rows.writerow([step])
    csv_file.flush()
    logger.warning("step %d", step)
"""


def _observe(shell: Any, folder: Path) -> dict[str, Any]:
    ns = shell.user_ns
    return {
        "array": ns["arr"].tolist(),
        "deep": list(ns["deep"]["a"]["b"][2]),
        "item 2500": list(ns["big"][2500]),
        "method's global": list(ns["LOG"]),
        "class attribute": ns["Counter"].n,
        "slots": ns["sl"].v,
        "closure": ns["inc"].__closure__[0].cell_contents,
        "partial": list(ns["add"].args[0]),
        "module attribute": sys.modules["helpers"].count,
        "rng objects": list(ns["draws"]),
        "print(file=f)": (folder / "print.txt").read_text(),
        "csv": (folder / "rows.csv").read_text(),
        "logging": (folder / "train.log").read_text(),
    }


@pytest.fixture
def notebook(shell: Any, tmp_path: Path, monkeypatch: Any) -> Any:
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "helpers.py").write_text(HELPERS)
    yield shell
    sys.modules.pop("helpers", None)
    for name in ("log_file", "csv_file"):
        f = shell.user_ns.get(name)
        if f is not None:
            f.close()
    if "handler" in shell.user_ns:
        shell.user_ns["logger"].removeHandler(shell.user_ns["handler"])
        shell.user_ns["handler"].close()


def _fresh(shell: Any, folder: Path) -> None:
    for f in ("print.txt", "rows.csv", "train.log"):
        (folder / f).unlink(missing_ok=True)
    sys.modules.pop("helpers", None)
    if "handler" in shell.user_ns:
        shell.user_ns["logger"].removeHandler(shell.user_ns["handler"])
    assert shell.run_cell(SETUP).success


@pytest.mark.slow
def test_a_fix_leaves_one_clean_runs_effects_on_everything_the_cell_reaches(
    notebook: Any, tmp_path: Path, run: Any
) -> None:
    shell = notebook
    shell.run_cell("%gpumem simulate 160MiB")
    _fresh(shell, tmp_path)
    assert not shell.run_cell(CELL).success
    out = run(shell, "%gpumem retry batch --force", store_history=False).out
    assert "Fits at batch" in out and "rehearsal" in out, out
    batch = shell.user_ns["batch_size"]
    fixed = _observe(shell, tmp_path)

    _fresh(shell, tmp_path)
    assert shell.run_cell(CELL.replace("64\n", f"{batch}\n", 1)).success
    clean = _observe(shell, tmp_path)
    assert clean["slots"] == 3
    for what, value in clean.items():
        assert fixed[what] == value, what


def test_what_cannot_be_put_back_is_named_and_nothing_was_kept_is_not_claimed(
    shell: Any, run: Any
) -> None:
    """A final run that fails: the generator it advanced is named, not silently kept."""
    shell.run_cell("%gpumem simulate 160MiB")
    shell.run_cell(
        "import torch\ngen = (i for i in range(100))\nseen = []\n"
        "hold = torch.zeros(15 << 20, device='cuda')"
    )
    assert not shell.run_cell(
        "seen.append(next(gen))\nbig = torch.randn(30 << 20, device='cuda')"
    ).success
    out = run(shell, "%gpumem retry clear --force", store_history=False).out
    assert "Still out of memory" in out, out
    assert "`gen` (a generator) was advanced by the re-run and cannot be put back" in out, out
    assert shell.user_ns["seen"] == [0]  # the list is put back; the generator cannot be


def test_before_a_fix_the_transaction_names_what_it_cannot_cover() -> None:
    import socket
    import sqlite3

    from jupyter_gpumem.rescue.reach import survey
    from jupyter_gpumem.rescue.transaction import Transaction

    db = sqlite3.connect(":memory:")
    sock = socket.socket()
    ns: dict[str, Any] = {
        "gen": (i for i in range(3)),
        "it": map(str, [1, 2]),
        "state": {"db": db, "sock": sock},
        "fine": [1, 2],
    }
    try:
        found = survey(ns, ns)
        named = " ".join(found.not_covered)
        assert "`gen` (a generator" in named
        assert "`it` (an iterator" in named
        assert "`state` (an SQLite connection" in named and "`state` (a socket" in named
        assert "`fine`" not in named
        txn = Transaction(ns, ns, check_host=False)
        assert txn.not_covered == found.not_covered
        assert not txn.whole
        assert Transaction({"fine": [1]}, ["fine"], check_host=False).whole
    finally:
        db.close()
        sock.close()


def test_a_list_iterator_is_put_back_where_it_stood() -> None:
    from jupyter_gpumem.rescue.transaction import Transaction

    ns: dict[str, Any] = {"it": iter([1, 2, 3])}
    txn = Transaction(ns, ["it"], check_host=False)
    assert next(ns["it"]) == 1
    txn.rollback()
    assert next(ns["it"]) == 1
    assert txn.whole


def test_the_failed_runs_batchnorm_statistics_are_put_back(shell: Any, run: Any) -> None:
    """The hook copied the BatchNorm statistics of the model the cell names before it ran: what
    the failed forward did to them is put back, and said so (was: named as not put back)."""
    shell.run_cell("%gpumem simulate 160MiB")
    shell.run_cell(
        "import torch\nmodel = torch.nn.Sequential(torch.nn.Linear(16, 16), "
        "torch.nn.BatchNorm1d(16)).cuda()\nhold = torch.zeros(15 << 20, device='cuda')"
    )
    cell = "out = model(torch.randn(64, 16, device='cuda'))\nbig = torch.randn(30 << 20, device='cuda')"
    assert not shell.run_cell(cell).success
    tracked = int(shell.user_ns["model"][1].num_batches_tracked)
    out = run(shell, "%gpumem retry clear --force", store_history=False).out
    assert "`model`'s BatchNorm running statistics as they were before the failed cell" in out, out
    assert int(shell.user_ns["model"][1].num_batches_tracked) == tracked - 1  # before the cell


@pytest.mark.slow
def test_a_compiled_steps_rehearsals_are_rolled_back_like_eager_ones(shell: Any, run: Any) -> None:
    """The cell calls only the `torch.compile`d step: the optimizer it steps is reached through
    the function it wraps, and Adam's step count is one clean run's."""
    shell.run_cell("%gpumem simulate 160MiB")
    setup = (
        "import torch\ntorch.manual_seed(0)\nnet = torch.nn.Linear(256, 256).cuda()\n"
        "opt = torch.optim.Adam(net.parameters())\n"
        "@torch.compile\ndef step(x):\n    loss = net(x).sum()\n    opt.zero_grad()\n"
        "    loss.backward()\n    opt.step()\n"
    )
    cell = (
        "batch_size = 64\nfor i in range(3):\n"
        "    pad = torch.empty(batch_size, 1 << 20, device='cuda')\n"
        "    step(torch.randn(batch_size, 256, device='cuda'))\n"
    )
    assert shell.run_cell(setup).success
    assert not shell.run_cell(cell).success
    out = run(shell, "%gpumem retry batch --force", store_history=False).out
    assert "Fits at batch" in out and "rehearsal" in out, out
    ns = shell.user_ns
    assert int(ns["opt"].state[ns["net"].weight]["step"]) == 3
