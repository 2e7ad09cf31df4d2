"""A new user's first tries on third-party training code this project had not seen before.

The sources are copied in tests/data/fresh/ (licence and address at the top of each), their
training/eval loops verbatim, the data replaced by seeded random tensors and the models scaled so
that a simulated card of 16-64 MiB runs out of memory at the original batch size:

- PyTorch tutorials, "Transfer Learning for Computer Vision": train_model() iterating
  ``dataloaders[phase]`` from the tutorial's ``dataloaders = {'train': ..., 'val': ...}``, SGD on two
  parameter groups, StepLR, ``best_model_wts`` deep-copied.
- The Hugging Face course, chapter 3, "A full training loop": a padding collate_fn, AdamW, a linear
  LambdaLR sized in steps from ``len(train_dataloader)``, a progress bar.

Each test drives a real IPython InteractiveShell (the ``shell`` fixture) as a user types the cells.
Where the product is wrong the test is ``xfail(strict=True)`` with the exact bug as its reason.
"""

from __future__ import annotations

import os
import re
from typing import Any

import pytest

pytestmark = pytest.mark.slow

torch = pytest.importorskip("torch")

FRESH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "fresh")


def _cells(name: str) -> dict[str, str]:
    """The "# %% name" cells of a copied source."""
    with open(os.path.join(FRESH, name), encoding="utf-8") as f:
        text = f.read()
    parts = re.split(r"^# %% (\w+)\n", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def _params(model: Any) -> list[Any]:
    return [p.detach().cpu().clone() for p in model.parameters()]


def _same(a: list[Any], b: list[Any]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _setup(shell: Any, cells: dict[str, str], card: str, before: tuple[str, ...] = ()) -> None:
    """The data are made before the simulated card (it counts every tensor made while it runs),
    then the model, optimizer and scheduler on it, as in the notebook; ``before``: the cells of
    definitions run before the setup."""
    shell.run_cell("%gpumem simulate off")
    assert shell.run_cell(cells["data"]).success
    shell.run_cell(f"%gpumem simulate {card}")
    for name in (*before, "setup"):
        assert shell.run_cell(cells[name]).success


def _clean_run(shell: Any, cells: dict[str, str]) -> dict[str, Any]:
    """The same cells run once more from the start on the CPU, no simulated card: one clean run."""
    shell.run_cell("%gpumem simulate off")
    for name in ("data", "setup", "train"):
        assert shell.run_cell(cells[name]).success
    return shell.user_ns


# ------------------------------------------------------------------------------------------------
# pytorch/tutorials beginner_source/transfer_learning_tutorial.py

TL = _cells("transfer_learning_tutorial.py")
TL_CARD = "64MiB"  # batch 64 of 3x64x64 through TinyResNet asks ~16 MiB past the card


def _tl_state(ns: dict[str, Any]) -> dict[str, Any]:
    return {
        "params": _params(ns["model_ft"]),
        "momentum": [s["momentum_buffer"].clone() for s in ns["optimizer_ft"].state.values()],
        "epoch": ns["exp_lr_scheduler"].last_epoch,
    }


def test_transfer_learning_reduce_batch_fits_both_phases(shell: Any, run: Any) -> None:
    """The tutorial's `dataloaders = {x: DataLoader(..., batch_size=64) for x in ['train', 'val']}`
    read as dataloaders[phase] inside train_model(): Reduce batch ends with the cell run through,
    both phases at a batch that fits."""
    _setup(shell, TL, TL_CARD)
    assert not shell.run_cell(TL["train"]).success
    out = run(shell, "%gpumem retry batch", store_history=False).out
    assert "Fits at batch" in out, out
    assert "Best val Acc" in out, out
    assert all(dl.batch_size < 64 for dl in shell.user_ns["dataloaders"].values())


def test_transfer_learning_move_to_cpu_equals_one_clean_run(
    shell: Any, capsys: Any, run: Any
) -> None:
    """Move to CPU re-runs train_model once: the weights, the momentum buffers, the scheduler's
    epoch and the printed epoch lines are those of the same cells run once on the CPU without the
    extension; the notebook's other variables are untouched."""
    _setup(shell, TL, TL_CARD)
    assert not shell.run_cell(TL["train"]).success
    out = capsys.readouterr().out
    assert "Reduce the batch size, enable autocast (bf16) or move the work to the CPU" in out
    shell.run_cell("mine = {'keep': 1}")
    out = run(shell, "%gpumem retry cpu", store_history=False).out
    assert "Best val Acc" in out, out
    ns = shell.user_ns
    assert ns["mine"] == {"keep": 1}
    assert ns["dataloaders"]["train"].batch_size == 64
    fixed = _tl_state(ns)
    assert len(re.findall(r"^(?:train|val) Loss: .*$", out, re.M)) == 4  # printed by one run
    lines = re.findall(r"^train Loss: .*$", out, re.M)
    clean = _tl_state(_clean_run(shell, TL))
    # train mode normalises with the batch's statistics: the training is that of one clean run
    assert lines == re.findall(r"^train Loss: .*$", capsys.readouterr().out, re.M)
    assert _same(fixed["params"], clean["params"])
    assert _same(fixed["momentum"], clean["momentum"])
    assert fixed["epoch"] == clean["epoch"] == 2


def test_transfer_learning_move_to_cpu_batchnorm_statistics_as_clean_or_told(
    shell: Any, run: Any
) -> None:
    """The failed run's forward moved the BatchNorm running statistics before it ran out (stem's
    BN saw one more batch) and no copy from before that cell exists: Move to CPU's outcome says
    it kept them, as a failed fix says it could not put them back."""
    _setup(shell, TL, TL_CARD)
    assert not shell.run_cell(TL["train"]).success
    out = run(shell, "%gpumem retry cpu", store_history=False).out
    assert "Best val Acc" in out, out
    buffers = [b.detach().cpu().clone() for b in shell.user_ns["model_ft"].buffers()]
    clean = [b.detach().cpu().clone() for b in _clean_run(shell, TL)["model_ft"].buffers()]
    assert "BatchNorm running statistics" in out or _same(buffers, clean), out


def test_transfer_learning_failed_autocast_is_not_offered_again(shell: Any, run: Any) -> None:
    _setup(shell, TL, TL_CARD)
    assert not shell.run_cell(TL["train"]).success
    out = run(shell, "%gpumem retry autocast", store_history=False).out
    assert "Still out of memory under autocast" in out, out
    after = out.split("Still out of memory under autocast", 1)[1]
    assert not re.search(r"retry autocast\s+Enable autocast \(saves", after), after


# ------------------------------------------------------------------------------------------------
# huggingface/course chapters/en/chapter3/4.mdx (+ transformers' linear schedule)

HF = _cells("hf_course_training_loop.py")
HF_CARD = "16MiB"  # batch 8 padded to ~128 tokens: attention asks ~20 MiB


def _hf_state(ns: dict[str, Any]) -> dict[str, Any]:
    return {
        "steps": [int(s["step"]) for s in ns["optimizer"].state.values()][:1],
        "bar": ns["progress_bar"].n,
    }


def _hf_reduce_batch(shell: Any, run: Any, before: tuple[str, ...]) -> str:
    _setup(shell, HF, HF_CARD, before)
    assert not shell.run_cell(HF["train"]).success
    out = run(shell, "%gpumem retry batch", store_history=False).out
    assert "Fits at batch" in out, out
    ns = shell.user_ns
    assert 1 <= ns["train_dataloader"].batch_size < 8
    assert ns["eval_dataloader"].batch_size == 8  # not used by the cell: untouched
    state = _hf_state(ns)
    # every batch of every epoch trained once, the optimizer stepped once per batch
    assert state["bar"] == state["steps"][0] == 3 * len(ns["train_dataloader"])
    return out


def test_hf_course_loop_reduce_batch_says_the_schedule_was_sized_for_the_old_batch(
    shell: Any, run: Any
) -> None:
    """num_training_steps = num_epochs * len(train_dataloader) was computed at batch 8: at the
    batch found the loop takes more steps and the linear decay reaches 0 before the end. Reduce
    batch does not rebuild the schedule; it must say so, naming it and the steps to build it for."""
    out = _hf_reduce_batch(shell, run, ("scheduler",))
    steps = 3 * len(shell.user_ns["train_dataloader"])
    assert "`lr_scheduler`" in out, out
    assert f"num_training_steps={steps}" in out, out


def test_hf_course_loop_reduce_batch_reads_a_closure_schedule(shell: Any, run: Any) -> None:
    """A linear schedule whose LambdaLR lambda is a closure over num_training_steps (transformers'
    get_linear_schedule_with_warmup before its schedulers became functools.partial, and the usual
    hand-written `def lr_lambda(step)`) is read: after Reduce batch the outcome names
    lr_scheduler and num_training_steps, as for the partial form."""
    out = _hf_reduce_batch(shell, run, ("scheduler", "scheduler_closure"))
    assert "`lr_scheduler`" in out and "num_training_steps" in out, out


# ------------------------------------------------------------------------------------------------
# pytorch/examples time_sequence_prediction/train.py (float64 LSTMCells, LBFGS with a closure)

TS = _cells("time_sequence_prediction.py")
TS_CARD = "12MiB"  # the first closure's forward through 99 steps of 97 sequences runs out


def test_time_sequence_float64_model_is_not_offered_autocast(
    shell: Any, capsys: Any, monkeypatch: Any, tmp_path: Any
) -> None:
    monkeypatch.chdir(tmp_path)
    _setup(shell, TS, TS_CARD)
    assert not shell.run_cell(TS["train"]).success
    out = capsys.readouterr().out
    assert "retry autocast" in out, out
    assert not re.search(r"retry autocast\s+Enable autocast \(saves", out), out


def test_time_sequence_lbfgs_first_closure_failure_reruns_without_force(
    shell: Any, run: Any, monkeypatch: Any, tmp_path: Any
) -> None:
    """The cell failed inside line 11 `optimizer.step(closure)`, in the first closure's forward,
    before LBFGS changed any weight (n_iter 0): the guard reads that from the failure's frames
    and the optimizer's state, and the retry runs without asking for --force."""
    monkeypatch.chdir(tmp_path)
    _setup(shell, TS, TS_CARD)
    assert not shell.run_cell(TS["train"]).success
    assert shell.user_ns["optimizer"].state_dict()["state"].get(0, {}).get("n_iter", 0) == 0
    out = run(shell, "%gpumem retry cpu", store_history=False).out
    assert "already ran" not in out, out
    assert "test loss:" in out, out
    assert os.path.exists(tmp_path / "predict0.npy")
