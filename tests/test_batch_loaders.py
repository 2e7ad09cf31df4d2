"""Reduce batch on loaders wherever a notebook keeps them, and on evaluation alone (issue 20).

- torchvision's fine-tuning tutorial keeps its loaders in a dict, ``dataloaders = {"train": ...,
  "val": ...}``, and its loop reads ``dataloaders[phase]``: was "the global dataloaders is a dict,
  not an int > 1 or a DataLoader", with or without ``--batch-var dataloaders['train']``;
- an OOM in evaluation (``test()`` under ``torch.no_grad()``) changes the evaluation loader only,
  and says so (the Hugging Face Trainer's ``auto_find_batch_size`` shrinks the training batch on an
  evaluation OOM, transformers issue 32215).
"""

from __future__ import annotations

import re
from typing import Any

import pytest

torch = pytest.importorskip("torch")

DATA = """\
import torch
from torch.utils.data import DataLoader, TensorDataset
g = torch.Generator().manual_seed(0)
image_datasets = {
    x: TensorDataset(torch.randn(8192, 64, generator=g), torch.randint(0, 10, (8192,), generator=g))
    for x in ["train", "val"]
}
"""

SETUP = """\
import torch.nn.functional as F
torch.manual_seed(0)
model = torch.nn.Sequential(
    torch.nn.Linear(64, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 10),
).cuda()
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
dataloaders = {
    "train": DataLoader(image_datasets["train"], batch_size=4096, shuffle=True),
    "val": DataLoader(image_datasets["val"], batch_size=1024, shuffle=False),
}
"""

# the tutorial's train_model loop, one epoch, in the cell
TRAIN = """\
for phase in ["train", "val"]:
    if phase == "train":
        model.train()
    else:
        model.eval()
    for inputs, labels in dataloaders[phase]:
        inputs, labels = inputs.cuda(), labels.cuda()
        optimizer.zero_grad()
        with torch.set_grad_enabled(phase == "train"):
            loss = F.cross_entropy(model(inputs), labels)
            if phase == "train":
                loss.backward()
                optimizer.step()
"""


def _tutorial(shell: Any) -> None:
    shell.run_cell("%gpumem simulate off")
    assert shell.run_cell(DATA).success  # host data, made before the card
    shell.run_cell("%gpumem simulate 32MiB")
    assert shell.run_cell(SETUP, store_history=True).success
    assert not shell.run_cell(TRAIN, store_history=True).success


@pytest.mark.parametrize("batch_var", [None, "dataloaders['train']", 'dataloaders["train"]'])
def test_loaders_in_a_dict_train_reduced_val_left(
    shell: Any, capsys: Any, batch_var: str | None
) -> None:
    _tutorial(shell)
    val = shell.user_ns["dataloaders"]["val"]
    capsys.readouterr()
    shell.run_cell(
        "%gpumem retry batch --force" + (f" --batch-var {batch_var}" if batch_var else "")
    )
    out = capsys.readouterr().out
    m = re.search(r"Fits at batch (\d+) \(was 4096\)", out)
    assert m, out
    loaders = shell.user_ns["dataloaders"]
    assert loaders["train"].batch_size == int(m.group(1)) < 4096
    assert loaders["val"] is val  # the other loader is the user's own, untouched
    assert "dataloaders['train']" in out.split("To make it permanent", 1)[1], out


def test_loader_as_an_attribute(shell: Any, run: Any) -> None:
    _tutorial(shell)
    shell.run_cell(
        "class Run:\n    pass\nrun = Run()\nrun.train_loader = dataloaders['train']\n",
        store_history=True,
    )
    cell = TRAIN.replace("dataloaders[phase]", "run.train_loader").replace(
        '["train", "val"]', '["train"]'
    )
    assert not shell.run_cell(cell, store_history=True).success
    out = run(
        shell, "%gpumem retry batch --force --batch-var run.train_loader", store_history=False
    ).out
    m = re.search(r"Fits at batch (\d+) \(was 4096\)", out)
    assert m, out
    assert shell.user_ns["run"].train_loader.batch_size == int(m.group(1))
    assert shell.user_ns["dataloaders"]["train"].batch_size == 4096  # the dict is not the run's


# ------------------------------------------------------------------------------------------------
# an OOM in evaluation: test() under no_grad, its own loader from the same setting

EVAL_SETUP = """\
import torch.nn.functional as F
torch.manual_seed(0)
batch_size = 4096
model = torch.nn.Sequential(
    torch.nn.Linear(64, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10),
).cuda()
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
train_loader = DataLoader(image_datasets["train"], batch_size=batch_size, shuffle=True)
test_loader = DataLoader(image_datasets["val"], batch_size=batch_size)


def train():
    model.train()
    for x, y in train_loader:
        x, y = x.cuda(), y.cuda()
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


def test():
    model.eval()
    hits = 0
    with torch.no_grad():
        for x, y in test_loader:
            # test-time augmentation: 8 noisy views of each sample, their logits averaged
            x = x.cuda()
            views = x.repeat(8, 1) + 0.01 * torch.randn(8 * len(x), 64, device="cuda")
            out = model(views).view(8, len(x), 10).mean(0)
            hits += (out.argmax(1) == y.cuda()).sum().item()
    return hits
"""


def test_an_evaluation_oom_changes_the_evaluation_loader_only(shell: Any, capsys: Any) -> None:
    shell.run_cell("%gpumem simulate off")
    assert shell.run_cell(DATA).success
    shell.run_cell("%gpumem simulate 48MiB")
    assert shell.run_cell(EVAL_SETUP, store_history=True).success
    train_loader = shell.user_ns["train_loader"]
    assert not shell.run_cell("train()\nhits = test()\n", store_history=True).success
    capsys.readouterr()
    shell.run_cell("%gpumem retry batch --force")  # train() ran: it runs again
    out = capsys.readouterr().out
    m = re.search(r"Fits at batch (\d+) \(was 4096\)", out)
    assert m, out
    ns = shell.user_ns
    assert ns["test_loader"].batch_size == int(m.group(1)) < 4096
    assert ns["train_loader"] is train_loader and ns["batch_size"] == 4096
    assert "Changed the evaluation batch only (`test_loader`)" in out, out
    assert "in `test()`" in out, out
    assert "tune the learning rate" not in out, out
    # make it permanent: the evaluation loader's own line, not `batch_size = 4096` (both use it)
    permanent = out.split("To make it permanent", 1)[1].split("\n", 1)[0]
    assert "test_loader = DataLoader(" in permanent and "batch_size = " not in permanent, out
    assert ns["hits"] > 0  # the real run ran test() whole


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (
            "with torch.no_grad():\n    for x in loader:\n        y = model(x)\n",
            "under `torch.no_grad()`",
        ),
        ("model.eval()\nfor x in loader:\n    y = model(x)\n", "after `model.eval()`"),
        ("model.eval()\nmodel.train()\nfor x in loader:\n    y = model(x)\n", None),
        ("for x in val_loader:\n    y = model(x)\n", "in a loop over `val_loader`"),
        # the tutorial's phases: which branch ran is not known here, so nothing is said
        (
            "for phase in p:\n    if phase == 'train':\n        model.train()\n    else:\n"
            "        model.eval()\n    for x in loaders[phase]:\n        y = model(x)\n",
            None,
        ),
    ],
)
def test_evaluation_read_from_the_failing_loop(code: str, reason: str | None) -> None:
    import linecache
    import types

    from jupyter_gpumem.cells.loop import LoopSite
    from jupyter_gpumem.fixes.batch.phase import evaluation_reason

    name = f"<cell-eval-{abs(hash(code))}>"
    linecache.cache[name] = (len(code), None, code.splitlines(True), name)
    lineno = next(i for i, t in enumerate(code.splitlines(), 1) if "for x in" in t)
    loop = LoopSite(True, name, 0, (lineno, lineno), lineno + 1, lineno + 1, "<module>", lineno)
    failed = types.SimpleNamespace(frames=(), loop=loop, plain_values={})
    assert evaluation_reason(failed) == reason  # type: ignore[arg-type]


def test_evaluation_read_from_the_function_it_failed_in() -> None:
    import types

    from jupyter_gpumem.fixes.batch.phase import evaluation_reason

    failed = types.SimpleNamespace(frames=(("test", 12),), loop=None, plain_values={})
    assert evaluation_reason(failed) == "in `test()`"  # type: ignore[arg-type]
    failed = types.SimpleNamespace(frames=(("train", 12),), loop=None, plain_values={})
    assert evaluation_reason(failed) is None  # type: ignore[arg-type]
