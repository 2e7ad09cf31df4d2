"""Reduce batch names a learning-rate schedule sized in steps whose LambdaLR lambda is a closure
over the number of steps, or a function reading it as a global (issue 20, item 7).

At a smaller batch an epoch has more steps, so a linear decay built for ``len(loader) * epochs``
steps at the old batch reaches 0 before the training ends. The ``functools.partial`` form
(transformers today) was named; a closure (transformers' ``get_linear_schedule_with_warmup``
before v4.27, the usual hand-written ``def lr_lambda(step)`` inside a helper) and a lambda
reading a global were not: the loop trained its last steps at lr 0 and nothing was said.
The schedule's code is read (closure cells, globals), never called.
"""

from __future__ import annotations

import os
import re
from typing import Any

import pytest

pytestmark = pytest.mark.slow

torch = pytest.importorskip("torch")

FRESH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "fresh")


def _hf_cells() -> dict[str, str]:
    """The "# %% name" cells of the Hugging Face course's full training loop (copied)."""
    with open(os.path.join(FRESH, "hf_course_training_loop.py"), encoding="utf-8") as f:
        parts = re.split(r"^# %% (\w+)\n", f.read(), flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_hf_course_closure_schedule_is_named_with_the_steps_to_build_it_for(
    shell: Any, run: Any
) -> None:
    """The course's loop with transformers' older get_linear_schedule_with_warmup (a closure over
    num_training_steps), built for 3 epochs of batch 8 on a 16 MiB card."""
    cells = _hf_cells()
    shell.run_cell("%gpumem simulate off")
    assert shell.run_cell(cells["data"]).success
    shell.run_cell("%gpumem simulate 16MiB")
    for name in ("scheduler", "scheduler_closure", "setup"):
        assert shell.run_cell(cells[name]).success
    lam = shell.user_ns["lr_scheduler"].lr_lambdas[0]
    assert lam.__closure__ and "num_training_steps" in lam.__code__.co_freevars  # the old form
    assert not shell.run_cell(cells["train"]).success
    out = run(shell, "%gpumem retry batch", store_history=False).out
    assert "Fits at batch" in out, out
    ns = shell.user_ns
    batch = ns["train_dataloader"].batch_size
    assert 1 <= batch < 8
    steps = 3 * len(ns["train_dataloader"])
    # what the note warns of is what happened: the decay reached 0 before the last steps
    assert ns["lr_scheduler"].get_last_lr()[0] == 0.0
    note = re.search(r"`lr_scheduler` \(LambdaLR\) was built for (\d+) steps.*", out)
    assert note, out
    assert int(note.group(1)) == ns["num_training_steps"] == 3 * 3  # 24 samples, batch 8
    assert f"Build it again with num_training_steps={steps} " in note.group(0), out


# A small training notebook: 512 sequences of 32 x 1024 (made before the card), a small MLP over
# each position, SGD, a linear decay over 2 epochs built from the loader at batch 128 (16 MiB of
# input a step: batch 128 does not fit a 24 MiB card).
DATA = """\
import torch
from torch.utils.data import DataLoader, TensorDataset
g = torch.Generator().manual_seed(0)
dataset = TensorDataset(torch.randn(512, 32, 1024, generator=g), torch.randint(0, 10, (512,), generator=g))
"""
SETUP = """\
from torch.optim.lr_scheduler import LambdaLR
loader = DataLoader(dataset, batch_size=128, shuffle=False)
torch.manual_seed(0)
model = torch.nn.Sequential(
    torch.nn.Linear(1024, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10)
).cuda()
opt = torch.optim.SGD(model.parameters(), lr=0.1)
epochs = 2
"""
CLOSURE = """\
def make_schedule(optimizer, num_training_steps):
    def lr_lambda(step):
        return max(0.0, 1 - step / num_training_steps)
    return LambdaLR(optimizer, lr_lambda)

sched = make_schedule(opt, epochs * len(loader))
"""
PARTIAL = """\
import functools

def decay(step, *, total_steps):
    return max(0.0, 1 - step / total_steps)

sched = LambdaLR(opt, functools.partial(decay, total_steps=epochs * len(loader)))
"""
GLOBAL = """\
num_training_steps = epochs * len(loader)
sched = LambdaLR(opt, lambda step: max(0.0, 1 - step / num_training_steps))
"""
TRAIN = """\
for epoch in range(epochs):
    for x, y in loader:
        x, y = x.cuda(), y.cuda()
        loss = torch.nn.functional.cross_entropy(model(x).mean(1), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
"""


@pytest.mark.parametrize(
    ("schedule", "setting", "advice"),
    [
        (
            CLOSURE,
            "num_training_steps",
            r"Build it again with num_training_steps=(\d+) \(len\(loader\) \* 2\)\.",
        ),
        (
            GLOBAL,
            "num_training_steps",
            r"Set num_training_steps = (\d+) \(len\(loader\) \* 2\): the schedule's function "
            r"reads it at each step\.",
        ),
        (PARTIAL, "total_steps", r"Build it again with total_steps=(\d+) \(len\(loader\) \* 2\)\."),
    ],
    ids=["closure", "global", "partial-total_steps"],
)
def test_hand_written_linear_decay_is_named(
    shell: Any, run: Any, schedule: str, setting: str, advice: str
) -> None:
    shell.run_cell("%gpumem simulate off")
    assert shell.run_cell(DATA).success
    shell.run_cell("%gpumem simulate 24MiB")
    assert shell.run_cell(SETUP + schedule).success
    assert not shell.run_cell(TRAIN).success
    out = run(shell, "%gpumem retry batch", store_history=False).out
    assert "Fits at batch" in out, out
    ns = shell.user_ns
    batch = ns["loader"].batch_size
    assert batch < 128
    assert re.search(
        rf"`sched` \(LambdaLR\) was built for 8 steps \({setting}: 2 epochs of 4 steps "
        rf"of `loader` at batch 128\); at batch {batch} an epoch is {len(ns['loader'])} steps",
        out,
    ), out
    m = re.search(advice, out)
    assert m and int(m.group(1)) == 2 * len(ns["loader"]), out
    assert ns["epochs"] == 2  # named, not changed: the schedule is the user's to rebuild
