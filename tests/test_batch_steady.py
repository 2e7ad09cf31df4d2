"""Reduce batch settles on a batch that holds for the next runs of the cell (issue 20).

A cell without a loop (one training step with Adam) is run again and again, and its second run
starts from what the first left: Adam's state, made at the first ``step()``, the old ``x`` held
while the new one is made. The batch Reduce batch keeps must fit those runs too: measured against
the largest batch whose three runs in a row fit (bisection, each probe a fresh card and setup).
"""

from __future__ import annotations

import gc
import re
from typing import Any

import pytest

torch = pytest.importorskip("torch")

MiB = 1 << 20
CARD = 128 * MiB
START = 8192

SETUP = """\
import torch
import torch.nn.functional as F
torch.manual_seed(0)
model = torch.nn.Sequential(
    torch.nn.Linear(512, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 2048), torch.nn.ReLU(),
    torch.nn.Linear(2048, 10),
).cuda()
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
"""

# one training step, no loop: Adam's state is made by the first run's step()
STEP = """\
batch = {b}
x = torch.randn(batch, 512, device="cuda")
y = torch.randint(0, 10, (batch,), device="cuda")
opt.zero_grad()
loss = F.cross_entropy(model(x), y)
loss.backward()
opt.step()
"""


def _runs_in_a_row(b: int, runs: int = 3) -> bool:
    """The setup, then the step ``runs`` times at batch ``b``, on a fresh card."""
    from jupyter_gpumem import simulate, stop_simulation

    stop_simulation()
    gc.collect()
    simulate(CARD)
    ns: dict[str, Any] = {"__name__": "__main__"}
    try:
        exec(SETUP, ns)
        for _ in range(runs):
            exec(STEP.format(b=b), ns)
        return True
    except torch.OutOfMemoryError as exc:
        import traceback

        traceback.clear_frames(exc.__traceback__)
        return False
    finally:
        ns.clear()
        gc.collect()
        stop_simulation()


def _largest_steady() -> int:
    lo, hi = 0, START
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if _runs_in_a_row(mid) else (lo, mid)
    return lo


@pytest.fixture(scope="module")
def largest_steady() -> int:
    return _largest_steady()


def _failed_step(shell: Any) -> None:
    shell.run_cell(f"%gpumem simulate {CARD // MiB}MiB")
    assert shell.run_cell(SETUP, store_history=True).success
    assert not shell.run_cell(STEP.format(b=START), store_history=True).success


def _runs(out: str) -> int:
    m = re.search(r"(\d+) rehearsals? \+ 1 real run", out)
    assert m, out
    return int(m.group(1)) + 1


def _two_more_runs(shell: Any, batch: int) -> None:
    for n in range(2):
        result = shell.run_cell(STEP.format(b=batch), store_history=True)
        assert result.success, f"run {n + 2} of the cell at batch {batch} ran out of memory"


@pytest.mark.slow
def test_retry_batch_one_step_adam_survives_two_more_runs(
    shell: Any, capsys: Any, largest_steady: int
) -> None:
    """Was: settled from the first run alone (Adam's state not yet made), and the next run of
    the cell at that batch ran out of memory."""
    _failed_step(shell)
    capsys.readouterr()
    shell.run_cell("%gpumem retry batch")
    out = capsys.readouterr().out
    batch = shell.user_ns["batch"]
    assert f"Fits at batch {batch} (was {START})" in out, out
    # the replay counts with its own allocator model (blocks.py), not the card's: one probe may
    # land above what fits
    assert _runs(out) <= 5, out
    assert batch >= 0.9 * largest_steady, (batch, largest_steady, out)
    _two_more_runs(shell, batch)
    assert "the cell twice" in out, out  # the rehearsals say they ran it twice


@pytest.mark.slow
def test_oomsafe_one_step_adam_survives_two_more_runs(
    shell: Any, capsys: Any, largest_steady: int
) -> None:
    shell.run_cell(f"%gpumem simulate {CARD // MiB}MiB")
    assert shell.run_cell(SETUP, store_history=True).success
    capsys.readouterr()
    assert shell.run_cell("%%oomsafe --fixes batch\n" + STEP.format(b=START)).success
    out = capsys.readouterr().out
    batch = shell.user_ns["batch"]
    assert f"Fits at batch {batch} (was {START})" in out, out
    assert batch >= 0.9 * largest_steady, (batch, largest_steady, out)
    _two_more_runs(shell, batch)


def test_a_cell_with_a_loop_or_a_magic_is_not_run_twice() -> None:
    from jupyter_gpumem.fixes.batch.reduce import _twice

    assert _twice("x = 1\ny = x") == "x = 1\ny = x\nx = 1\ny = x"
    assert _twice("for i in range(3):\n    x = i\n") is None  # it may be long: once
    assert _twice("%%time\nx = 1\n") is None
    assert _twice("from __future__ import annotations\nx = 1\n") is None
