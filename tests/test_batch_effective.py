"""What the batch change does to the effective batch of a cell that already accumulates
gradients, and what ``--accumulate`` does there (issue 20: was "the effective batch changed from
4096 to 1341" for 2 micro-batches, which went from 8192 to 2682, and ``--accumulate`` printed the
same as without it)."""

from __future__ import annotations

import argparse
import re
from typing import Any

import pytest

from jupyter_gpumem.fixes.batch.accumulate import existing_accumulation

SETUP = """\
import torch
import torch.nn.functional as F
torch.manual_seed(0)
model = torch.nn.Sequential(
    torch.nn.Linear(64, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 10),
).cuda()
opt = torch.optim.SGD(model.parameters(), lr=0.1)
"""

CELL = """\
accum_steps = 2
for i in range(4):
    x = torch.randn(4096, 64, device="cuda")
    y = torch.randint(0, 10, (4096,), device="cuda")
    loss = F.cross_entropy(model(x), y) / accum_steps
    loss.backward()
    if (i + 1) % accum_steps == 0:
        opt.step()
        opt.zero_grad()
"""


@pytest.mark.parametrize(
    ("source", "ns", "found"),
    [
        (CELL, {}, (2, "`accum_steps`")),
        (CELL.replace("% accum_steps", "% 4"), {}, (4, "`% 4`")),
        (
            CELL.replace("accum_steps = 2\n", "").replace("accum_steps", "args.grad_accum"),
            {"args": argparse.Namespace(grad_accum=8)},
            (8, "`args.grad_accum`"),
        ),
        ("for i in range(4):\n    loss.backward()\n    opt.step()\n", {}, None),
    ],
)
def test_existing_accumulation_read_from_the_cell(
    source: str, ns: dict[str, Any], found: tuple[int, str] | None
) -> None:
    assert existing_accumulation(source, ns) == found


@pytest.mark.parametrize("accumulate", [False, True])
def test_the_effective_batch_counts_the_micro_batches(
    shell: Any, run: Any, accumulate: bool
) -> None:
    pytest.importorskip("torch")
    shell.run_cell("%gpumem simulate 64MiB")
    assert shell.run_cell(SETUP, store_history=True).success
    assert not shell.run_cell(CELL, store_history=True).success
    out = run(
        shell, "%gpumem retry batch" + (" --accumulate" if accumulate else ""), store_history=False
    ).out
    m = re.search(r"Fits at batch (\d+) \(was 4096\)", out)
    assert m, out
    best = int(m.group(1))
    assert f"The effective batch changed from 8192 to {2 * best}" in out, out
    keep = -(-8192 // best)
    assert f"set accum_steps = {keep}" in out, out
    assert ("`--accumulate` did not rewrite the cell" in out) is accumulate, out


SCHEDULED = """\
from torch.utils.data import DataLoader, TensorDataset
train_loader = DataLoader(ds, batch_size=4096, shuffle=True)
epochs = 2
import functools
# transformers' get_linear_schedule_with_warmup: a LambdaLR over a partial of this
def _get_linear_schedule_with_warmup_lr_lambda(step, *, num_warmup_steps, num_training_steps):
    if step < num_warmup_steps:
        return float(step) / float(max(1, num_warmup_steps))
    return max(0.0, float(num_training_steps - step) / float(max(1, num_training_steps - num_warmup_steps)))
scheduler = torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(
    _get_linear_schedule_with_warmup_lr_lambda, num_warmup_steps=0,
    num_training_steps=len(train_loader) * epochs,
))
"""

SCHEDULED_CELL = """\
for epoch in range(epochs):
    for x, y in train_loader:
        x, y = x.cuda(), y.cuda()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        scheduler.step()
"""


def test_a_schedule_sized_in_steps_is_named_with_the_steps_to_build_it_for(
    shell: Any, run: Any
) -> None:
    """A linear schedule (transformers' get_scheduler) built for len(train_loader) * epochs at
    batch 4096: at the smaller batch it reaches a learning rate of 0 in the first epoch and
    trains the rest at 0, silently (was: nothing said); the outcome says so, with the number of
    steps to build it for."""
    pytest.importorskip("torch")
    shell.run_cell("%gpumem simulate off")
    assert shell.run_cell(
        "import torch\nfrom torch.utils.data import TensorDataset\n"
        "g = torch.Generator().manual_seed(0)\n"
        "ds = TensorDataset(torch.randn(8192, 64, generator=g), "
        "torch.randint(0, 10, (8192,), generator=g))\n"
    ).success
    shell.run_cell("%gpumem simulate 64MiB")
    assert shell.run_cell(SETUP + SCHEDULED, store_history=True).success
    assert not shell.run_cell(SCHEDULED_CELL, store_history=True).success
    out = run(shell, "%gpumem retry batch", store_history=False).out
    m = re.search(r"Fits at batch (\d+) \(was 4096\)", out)
    assert m, out
    best = int(m.group(1))
    after = -(-8192 // best)
    assert (
        f"`scheduler` (LambdaLR) was built for 4 steps (num_training_steps: 2 epochs of 2 steps of "
        f"`train_loader` at batch 4096); at batch {best} an epoch is {after} steps" in out
    ), out
    assert f"Build it again with num_training_steps={2 * after} (len(train_loader) * 2)." in out, (
        out
    )
