"""Reduce batch through `%gpumem retry batch` and `%%oomsafe`, for each place a batch lives: a
literal in the cell, any variable that sizes the failing tensors, a global, `args.batch_size`,
`cfg["batch_size"]`, a dataclass field, a DataLoader built in another cell (iterated by the cell or
passed to a notebook function), a number passed to a notebook function, with a decoy number that sizes nothing. Real InteractiveShell,
simulated GPU."""

from __future__ import annotations

import gc
import re
from typing import Any

import pytest

pytestmark = pytest.mark.slow

torch = pytest.importorskip("torch")

CARD = "%gpumem simulate 12MiB"
SETUP = """\
import argparse
import dataclasses
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
torch.manual_seed(0)
model = torch.nn.Sequential(
    torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10)
).cuda()
opt = torch.optim.SGD(model.parameters(), lr=0.1)
"""
STEP = """\
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
"""


def _loop(batch: str) -> str:
    return (
        "for step in range(2):\n"
        f'    x = torch.randn({batch}, 64, device="cuda")\n'
        f'    y = torch.randint(0, 10, ({batch},), device="cuda")\n' + STEP
    )


LOADER_SETUP = """\
ds = TensorDataset(torch.randn(4096, 64), torch.randint(0, 10, (4096,)))
train_loader = DataLoader(ds, batch_size=4096, shuffle=True)
decoder = torch.nn.Linear(20, 64).cuda()
"""
LOADER_CELL = (
    """\
for step, (x, y) in zip(range(2), train_loader):
    x, y = x.cuda(), y.cuda()
"""
    + STEP.replace("    ", "    ", 1)
    + """\
with torch.no_grad():
    sample = decoder(torch.randn(64, 20, device="cuda"))
"""
)
FUNC_SETUP = (
    LOADER_SETUP
    + """\
def train(model, loader, opt):
    for step, (x, y) in zip(range(2), loader):
        x, y = x.cuda(), y.cuda()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
"""
)
FUNC_CELL = """\
for epoch in range(1):
    train(model, train_loader, opt)
    with torch.no_grad():
        sample = decoder(torch.randn(64, 20, device="cuda"))
"""

# (name, extra setup, failing cell, how to read the batch afterwards, in the "make it permanent")
FORMS = [
    ("literal", "", "batch_size = 4096\n" + _loop("batch_size"), "batch_size", "line 1"),
    ("any name", "", "batch = 4096\n" + _loop("batch"), "batch", "line 1"),
    ("leading dim", "", _loop("4096"), None, "line 2"),
    ("global", "bs = 4096\n", _loop("bs"), "bs", "change In [2], line 1 to: bs = "),
    (
        "args",
        "p = argparse.ArgumentParser()\np.add_argument('--batch-size', type=int, default=4096)\n"
        "args = p.parse_args([])\n",
        _loop("args.batch_size"),
        "args.batch_size",
        "change In [2], line 2 to: p.add_argument('--batch-size', type=int, default=",
    ),
    (
        "cfg",
        "cfg = {'lr': 0.1, 'batch_size': 4096}\n",
        _loop("cfg['batch_size']"),
        "cfg['batch_size']",
        "change In [2], line 1 to: cfg = {'lr': 0.1, 'batch_size': ",
    ),
    (
        "dataclass",
        "@dataclasses.dataclass\nclass Config:\n    batch_size: int = 4096\nconf = Config()\n",
        _loop("conf.batch_size"),
        "conf.batch_size",
        "change In [2], line 3 to: batch_size: int = ",
    ),
    (
        "loader + decoy",
        LOADER_SETUP,
        LOADER_CELL,
        "train_loader.batch_size",
        "change In [2], line 2 to: train_loader = DataLoader(ds, batch_size=",
    ),
    (
        "loader passed to a function",
        FUNC_SETUP,
        FUNC_CELL,
        "train_loader.batch_size",
        "change In [2], line 2 to: train_loader = DataLoader(ds, batch_size=",
    ),
    (
        # the batch handed to a notebook function as a plain number; the 2 (steps) sizes nothing
        "argument of a notebook function",
        "def train_steps(batch, steps):\n"
        "    for step in range(steps):\n"
        '        x = torch.randn(batch, 64, device="cuda")\n'
        '        y = torch.randint(0, 10, (batch,), device="cuda")\n'
        + STEP.replace("\n    ", "\n        ").replace("    loss", "        loss", 1),
        "train_steps(4096, 2)\n",
        None,
        "change line 1 to: train_steps(",
    ),
]


def _setup(shell: Any, extra: str) -> None:
    shell.run_cell(CARD)
    assert shell.run_cell(SETUP, store_history=True).success
    if not extra:
        extra = "pass\n"
    assert shell.run_cell(extra, store_history=True).success


@pytest.mark.parametrize(
    ("form", "extra", "cell", "read", "permanent"), FORMS, ids=[f[0] for f in FORMS]
)
def test_retry_batch_finds_and_reduces(
    shell: Any, run: Any, form: str, extra: str, cell: str, read: str | None, permanent: str
) -> None:
    _setup(shell, extra)
    assert not shell.run_cell(cell, store_history=True).success
    out = run(shell, "%gpumem retry batch", store_history=False).out
    m = re.search(r"Fits at batch (\d+) \(was 4096\)", out)
    assert m, out
    batch = int(m.group(1))
    assert 1 < batch < 4096
    if read is not None:
        assert shell.ev(read) == batch, out
    assert permanent in out, out
    assert "64" not in re.findall(r"batch (\d+)", out)  # the decoy is never tried
    # every attempt starts from the same resident memory
    resident = re.findall(r"from ([\d.]+ \w+) resident", out)
    assert len(set(resident)) == 1, out
    # only fits show a peak
    assert not re.search(r"OOM\s+peak", out), out


@pytest.mark.parametrize(
    ("form", "extra", "cell", "read", "permanent"),
    [FORMS[1], FORMS[4], FORMS[7]],
    ids=[FORMS[i][0] for i in (1, 4, 7)],
)
def test_oomsafe_reduces(
    shell: Any, capsys: Any, form: str, extra: str, cell: str, read: str, permanent: str
) -> None:
    _setup(shell, extra)
    capsys.readouterr()
    assert shell.run_cell("%%oomsafe --fixes batch\n" + cell, store_history=True).success
    out = capsys.readouterr().out
    m = re.search(r"Fits at batch (\d+) \(was 4096\)", out)
    assert m, out
    assert shell.ev(read) == int(m.group(1))


def test_decoy_alone_is_not_the_batch(shell: Any, run: Any) -> None:
    """The cell reaches the loader only through a lambda: the 64 of `torch.randn(64, 20)` sizes
    no failing tensor, so it is never offered; the loader whose 4096 does is found in the
    namespace by what it sizes."""
    _setup(shell, LOADER_SETUP + "get = lambda: train_loader\n")
    cell = LOADER_CELL.replace("in zip(range(2), train_loader)", "in zip(range(2), get())")
    assert not shell.run_cell(cell, store_history=True).success
    out = run(shell, "%gpumem retry batch", store_history=False).out
    assert "`train_loader.batch_size` = 4096 sizes `x`" in out, out
    assert "randn(64" not in out.split("To make it permanent")[-1].split("\n")[0], out


def test_lstm_frees_what_a_card_frees(shell: Any) -> None:
    """An LSTM training step at growing batches, some out of memory: allocated memory returns to
    the same level after each (nothing held by the CPU kernel's buffers)."""
    from jupyter_gpumem.backends import simulated

    gpu = simulated.start(24 << 20)
    lstm = torch.nn.LSTM(32, 64).cuda()
    opt = torch.optim.Adam(lstm.parameters())
    lstm(torch.randn(8, 2, 32, device="cuda"))[0].sum().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    gc.collect()
    level = gpu.allocated_bytes
    outcomes = []
    for bs in (64, 256, 1024, 4096, 128):
        try:
            lstm(torch.randn(8, bs, 32, device="cuda"))[0].pow(2).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            outcomes.append("fit")
        except torch.OutOfMemoryError as exc:
            import traceback

            traceback.clear_frames(exc.__traceback__)
            del exc
            opt.zero_grad(set_to_none=True)
            outcomes.append("OOM")
        gc.collect()
        assert gpu.allocated_bytes == level, (bs, outcomes)
    assert "OOM" in outcomes and outcomes[-1] == "fit"
