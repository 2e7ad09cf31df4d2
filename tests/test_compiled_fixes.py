"""``torch.compile``d code under Move to CPU and Enable autocast, in a real InteractiveShell on the
simulated GPU.

On the simulated GPU dynamo compiles the model and the step (backends/simulated/compiled.py,
tests/test_compile_simulated.py), so the setup here really compiles; these tests check what the
fixes do with compiled objects: the optimizer a compiled ``train_step`` uses is reached through
the function it wraps, Move to CPU runs compiled code eagerly
(``torch.compiler.set_stance("force_eager")``) instead of compiling it again for the CPU, and
both fixes say so in one line.
"""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("torch")

SETUP = """
import torch
net = torch.nn.Sequential(torch.nn.Linear(1024, 2048), torch.nn.ReLU(),
                          torch.nn.Linear(2048, 1024)).cuda()
model = torch.compile(net)
opt = torch.optim.Adam(model.parameters())

def train_step(x):
    loss = model(x).sum()
    loss.backward()
    opt.step()
    opt.zero_grad()

step = torch.compile(train_step)
step(torch.randn(8, 1024, device="cuda"))  # Adam's state exists
"""
CELL = 'x = torch.randn(236 * 32, 1024, device="cuda")\nstep(x)\n'


def _failed(shell: Any, capsys: Any) -> None:
    from jupyter_gpumem.backends import torch_objects

    shell.run_cell("%gpumem simulate 160MiB")
    before = torch_objects.compiled_graphs() or 0
    assert shell.run_cell(SETUP).success
    assert (torch_objects.compiled_graphs() or 0) > before  # compiled on the simulated card
    assert not shell.run_cell(CELL).success
    capsys.readouterr()


@pytest.mark.slow
def test_move_to_cpu_reaches_what_a_compiled_step_uses_and_runs_it_eagerly(
    shell: Any, capsys: Any
) -> None:
    _failed(shell, capsys)
    shell.run_cell("%gpumem retry cpu")
    out = capsys.readouterr().out
    assert "The cell ran on the CPU" in out, out
    assert "`model` and `step` are compiled (torch.compile): run eagerly on the CPU" in out, out
    # the model and Adam's state, reached only through `train_step`'s code, left the card
    assert shell.run_cell("left = torch.cuda.memory_allocated()").success
    assert shell.user_ns["left"] == 0


@pytest.mark.slow
def test_autocast_says_a_compiled_model_compiles_again(shell: Any, capsys: Any) -> None:
    _failed(shell, capsys)
    shell.run_cell("%gpumem retry autocast")
    out = capsys.readouterr().out
    assert "compiled (torch.compile): under autocast it compiles again" in out, out


def test_eager_compiled_runs_compiled_code_eagerly() -> None:
    import torch

    from jupyter_gpumem.backends import torch_objects

    ns: dict[str, Any] = {"calls": []}
    exec("def f(x):\n    calls.append(1)\n    return x + 1\n", ns)  # a notebook function
    ns["g"] = torch.compile(ns["f"], backend="eager")
    assert torch_objects.compiled_original(ns["g"]) is ns["f"]
    before = torch_objects.compiled_graphs() or 0
    with torch_objects.eager_compiled():
        ns["g"](torch.ones(2))
    assert (torch_objects.compiled_graphs() or 0) == before and ns["calls"] == [1]
    ns["g"](torch.ones(2))
    assert (torch_objects.compiled_graphs() or 0) == before + 1  # compiled outside it
    assert torch_objects.read_by_compiled(ns, ["g"]) == {"calls"}
    assert torch_objects.compiled_names(ns, ["f", "g"]) == ["g"]
