"""Move to CPU moves everything the cell reaches, as the fix's transaction reaches it: a model held
as ``trainer.model``, an optimizer (and its state) used inside a notebook function, tensors in a
dict, a list, a tuple, a dataclass and a ``SimpleNamespace``, a scheduler and a ``GradScaler``.
Through ``%gpumem retry cpu`` in a real InteractiveShell on the simulated GPU: afterwards nothing
of it is left on the card (``torch.cuda.memory_allocated()`` is 0), where the old fix left every
object the cell did not name."""

from __future__ import annotations

import re
from typing import Any

import pytest

from jupyter_gpumem.units import parse_size

pytest.importorskip("torch")

SETUP = """
import dataclasses, types
import torch

@dataclasses.dataclass
class Trainer:
    model: torch.nn.Module
    opt: object = None


trainer = Trainer(torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.BatchNorm1d(256)).cuda())
trainer.opt = torch.optim.Adam(trainer.model.parameters())
extra = torch.nn.Parameter(torch.randn(256, device="cuda"))  # only the optimizer holds it
trainer.opt.add_param_group({"params": [extra]})
sched = torch.optim.lr_scheduler.StepLR(trainer.opt, 10)
scaler = torch.amp.GradScaler("cuda")
cache = {"emb": torch.randn(64, 256, device="cuda"), "pair": (torch.ones(256, device="cuda"), 2)}
bag = types.SimpleNamespace(w=torch.randn(256, device="cuda"), items=[torch.zeros(256, device="cuda")])

def step(x):
    out = trainer.model(x) + cache["emb"].sum() + cache["pair"][0] + bag.w + bag.items[0] + extra
    trainer.opt.zero_grad()
    scaler.scale(out.pow(2).mean()).backward()
    scaler.step(trainer.opt)
    scaler.update()
    sched.step()

step(torch.randn(8, 256, device="cuda"))  # the optimizer's state and the scaler's scale exist
"""
CELL = 'x = torch.randn(160, 256, 1024, device="cuda")\nstep(x[:, :, 0])\n'


@pytest.mark.slow
def test_retry_cpu_moves_everything_the_cell_reaches(shell: Any, capsys: Any) -> None:
    shell.run_cell("%gpumem simulate 160MiB")
    assert shell.run_cell(SETUP.replace("Any = object\n", "")).success
    assert shell.run_cell("held = torch.cuda.memory_allocated()").success
    held = shell.user_ns["held"]
    assert held > 0
    result = shell.run_cell(CELL)
    assert not result.success  # 160 MiB: more than the card holds beside the rest
    capsys.readouterr()
    shell.run_cell("%gpumem retry cpu")
    out = capsys.readouterr().out
    assert "The cell ran on the CPU" in out, out
    assert "Moved to the CPU:" in out, out
    assert shell.run_cell("left = torch.cuda.memory_allocated()").success
    assert shell.user_ns["left"] == 0, "something the cell reaches stayed on the GPU"
    # predicted before moving, by the same walk: what it freed, all the notebook held
    m = re.search(
        r"Predicted GPU memory freed by the move ~([\d.]+ [KMG]?i?B) .*measured ([\d.]+ [KMG]?i?B)",
        out,
    )
    assert m, out
    predicted, measured = parse_size(m[1]), parse_size(m[2])
    assert abs(measured - held) <= 0.005 * held and abs(predicted - measured) <= 0.005 * held, out
    ns = shell.user_ns
    # one copy per tensor, wherever it is held: the optimizer still steps the model's parameters
    params = {id(p) for g in ns["trainer"].opt.param_groups for p in g["params"]}
    assert {id(p) for p in ns["trainer"].model.parameters()} <= params
    assert ns["cache"]["pair"][1] == 2 and ns["bag"].items[0].sum().item() == 0


# ---- on a real card, moving makes new tensors: identity where torch needs it ---------------------


class _CopyingBackend:
    """``move_to_cpu`` as on CUDA: a tensor leaves as a new tensor (here a clone of a CPU tensor
    marked as on the GPU by its storage), models and optimizers move in place."""

    def __init__(self, gpu: list[Any]) -> None:
        self.gpu = {t.untyped_storage().data_ptr() for t in gpu}

    def storage_of(self, t: Any) -> Any:
        ptr = t.untyped_storage().data_ptr()
        return (
            (("cuda:0", ptr), t.untyped_storage().nbytes(), "cuda:0") if ptr in self.gpu else None
        )

    def move_to_cpu(self, obj: Any) -> tuple[Any, int]:
        from jupyter_gpumem.backends.torch_objects import move_objects

        return move_objects(obj, self.storage_of, lambda t: t.clone())


def test_each_tensor_gets_one_cpu_copy_and_parameters_stay_themselves() -> None:
    import dataclasses
    import types

    import torch

    from jupyter_gpumem.fixes.cpu import move_reached

    model = torch.nn.Linear(4, 4)
    extra = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.SGD([*model.parameters(), extra], lr=0.1)
    shared = torch.zeros(3)

    @dataclasses.dataclass(slots=True)
    class Slotted:
        t: Any

    class Config:
        table = shared  # a class attribute

    ns: dict[str, Any] = {
        "slotted": Slotted(shared),
        "Config": Config,
        "model": model,
        "opt": opt,
        "cache": {"a": shared, "pair": (shared, 2), "more": [shared]},
        "bag": types.SimpleNamespace(t=shared),
    }
    backend = _CopyingBackend([*model.parameters(), extra, shared])
    weight = model.weight
    mover = move_reached(ns, set(ns), backend)  # type: ignore[arg-type]
    copy = ns["cache"]["a"]
    assert copy is not shared and backend.storage_of(copy) is None
    assert ns["cache"]["pair"] == (copy, 2) and ns["cache"]["more"][0] is copy
    assert ns["bag"].t is copy  # the same copy wherever the tensor was held
    assert ns["slotted"].t is copy and Config.table is copy
    assert model.weight is weight and backend.storage_of(weight) is None  # moved in place
    assert opt.param_groups[0]["params"][-1] is extra and backend.storage_of(extra) is None
    # each counted once: the shared tensor, the model's two parameters and `extra`
    assert sum(mover.moved.values()) == (3 + 16 + 4 + 4) * 4
