"""A fix never damages the notebook: rehearsals roll back, the real run runs once, later variables
survive, Ctrl-C puts everything back. Real InteractiveShell, simulated GPU, `%gpumem retry` and
`%%oomsafe` as a user types them."""

from __future__ import annotations

import re
from typing import Any

import pytest

import jupyter_gpumem

torch = pytest.importorskip("torch")

# A training loop as in PyTorch's "Training a classifier" tutorial (a DataLoader, Adam, three
# epochs), with the data replaced by seeded random tensors; `h` widens the activations so that a
# batch of 2048 does not fit a 48 MiB card.
SETUP = """\
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
torch.manual_seed(0)
model = torch.nn.Sequential(
    torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10)
).cuda()
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
ds = TensorDataset(torch.randn(2048, 256), torch.randint(0, 10, (2048,)))
history = []
"""
TRAIN = """\
batch_size = 2048
loader = DataLoader(ds, batch_size=batch_size, shuffle=True)
for epoch in range(3):
    for xb, yb in loader:
        xb, yb = xb.cuda(), yb.cuda()
        h = model[0](xb)
        h = torch.cat([h, h, h, h, h, h], 1)
        loss = F.cross_entropy(model[2](model[1](h[:, :512])), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
"""


def _steps(shell: Any) -> int:
    ns = shell.user_ns
    return int(ns["opt"].state[ns["model"][0].weight]["step"].item())


def _weights(shell: Any) -> list[Any]:
    return [p.detach().clone() for p in shell.user_ns["model"].parameters()]


@pytest.fixture
def train(shell: Any) -> Any:
    shell.run_cell("%gpumem simulate 48MiB")
    assert shell.run_cell(SETUP).success
    return shell


@pytest.mark.slow
def test_training_loop_rescued_without_force_equals_one_clean_run(train: Any, run: Any) -> None:
    """The issue's "done when": no --force, the optimizer's steps and the weights of one clean
    run at the batch found, rehearsals of at most two passes."""
    shell = train
    assert not shell.run_cell(TRAIN).success
    failed = jupyter_gpumem.last_failure(shell)
    assert failed is not None and failed.loop is not None
    assert failed.earlier_passes is False  # it failed on the first pass: no step had run
    out = run(shell, "%gpumem retry batch", store_history=False).out
    assert "Fits at batch" in out, out
    assert "Re-run anyway" not in out
    rehearsals = re.findall(r"rehearsal(?: \((\d+) pass(?:es)?\))?, rolled back", out)
    assert rehearsals, out
    assert all(p == "" or int(p) <= 2 for p in rehearsals), out
    assert len(re.findall(r"\bkept\b", out)) == 1, out  # one real run
    batch = shell.user_ns["batch_size"]
    assert batch < 2048
    steps, weights, losses = _steps(shell), _weights(shell), list(shell.user_ns["history"])
    per_epoch = -(-2048 // batch)
    assert steps == 3 * per_epoch == len(losses)

    # one clean run from the same start, at the batch found
    assert shell.run_cell(SETUP).success
    assert shell.run_cell(TRAIN.replace("2048\n", f"{batch}\n", 1)).success
    assert _steps(shell) == steps
    assert shell.user_ns["history"] == losses
    for a, b in zip(weights, _weights(shell), strict=True):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_retry_keeps_variables_made_after_the_failure(shell: Any, run: Any) -> None:
    shell.run_cell("%gpumem simulate 160MiB")
    shell.run_cell("import torch")
    assert not shell.run_cell(
        'batch_size = 64\nx = torch.randn(batch_size, 2 << 20, device="cuda")'
    ).success
    shell.run_cell('results = {"accuracy": 0.91}\nnotes = "kept"')
    out = run(shell, "%gpumem retry batch", store_history=False).out
    assert "Fits at batch" in out, out
    assert shell.user_ns["results"] == {"accuracy": 0.91}
    assert shell.user_ns["notes"] == "kept"
    assert shell.user_ns["x"].shape[0] == shell.user_ns["batch_size"] < 64


def test_a_later_cell_rebinding_a_name_keeps_its_value(shell: Any, capsys: Any) -> None:
    """Only what the failed run left is dropped: `y` set again by a later cell is the user's."""
    shell.run_cell("%gpumem simulate 160MiB")
    shell.run_cell("import torch")
    cell = 'batch_size = 64\ny = "from the failed run"\nx = torch.randn(batch_size, 2 << 20, device="cuda")'
    assert not shell.run_cell(cell).success
    failed = jupyter_gpumem.last_failure(shell)
    shell.run_cell('y = "mine"')
    from jupyter_gpumem.rescue.rerun import failed_run_leftovers

    leftovers = failed_run_leftovers(shell.user_ns, failed.created)
    assert "y" not in leftovers
    assert "batch_size" in leftovers


@pytest.mark.slow
def test_rehearsals_leave_no_trace_in_lists_models_and_counters(train: Any, run: Any) -> None:
    """nanoGPT's loop shape: `while True`, a global iter_num, micro-steps; the final iter_num
    and the number of logged losses are those of one run."""
    shell = train
    shell.run_cell("iter_num = 0\nmax_iters = 4\ngradient_accumulation_steps = 2")
    cell = """\
batch_size = 2048
def get_batch():
    ix = torch.randint(len(ds), (batch_size,))
    return ds.tensors[0][ix].cuda(), ds.tensors[1][ix].cuda()
X, Y = get_batch()
while True:
    for micro_step in range(gradient_accumulation_steps):
        h = model[0](X)
        h = torch.cat([h] * 12, 1)  # the forward pass runs out of memory at 2048
        loss = F.cross_entropy(model[2](model[1](h[:, :512])), Y) / gradient_accumulation_steps
        X, Y = get_batch()
        loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    history.append(loss.item())
    iter_num += 1
    if iter_num > max_iters:
        break
"""
    assert not shell.run_cell(cell).success
    assert jupyter_gpumem.last_failure(shell).earlier_passes is False
    out = run(shell, "%gpumem retry batch", store_history=False).out
    assert "Fits at batch" in out, out
    assert shell.user_ns["iter_num"] == 5
    assert len(shell.user_ns["history"]) == 5
    assert _steps(shell) == 5


@pytest.mark.slow
def test_ctrl_c_in_the_second_run_of_oomsafe_restores_the_batch_variable(
    shell: Any, capsys: Any
) -> None:
    shell.run_cell("%gpumem simulate 160MiB")
    shell.run_cell(
        "import torch\n"
        "def tick():\n"
        "    tick.calls += 1\n"
        "    if tick.calls == 3:\n"
        "        raise KeyboardInterrupt  # Ctrl-C, during the second re-run\n"
        "tick.calls = 0\n"
        "kept = [1, 2]"
    )
    capsys.readouterr()
    result = shell.run_cell(
        "%%oomsafe --fixes batch --force\n"
        "batch_size = 64\n"
        "tick()\n"
        "kept.append(batch_size)\n"
        'x = torch.randn(batch_size, 2 << 20, device="cuda")\n'
    )
    captured = capsys.readouterr()
    assert isinstance(result.error_in_exec, KeyboardInterrupt)
    # the interrupt came from the third call; the function's attribute is put back too, to what
    # the failed first run left (a counter on a notebook function is the notebook's state)
    assert shell.user_ns["tick"].calls == 1
    assert shell.user_ns["batch_size"] == 64  # as the failed first run left it
    assert shell.user_ns["kept"] == [1, 2, 64]
    assert "Interrupted: restored" in captured.err, captured
    # the hook is still there: the next OOM is diagnosed
    assert not shell.run_cell('z = torch.randn(64, 2 << 20, device="cuda")').success
    assert "GPU out of memory" in capsys.readouterr().out


def test_ctrl_c_while_the_diagnosis_is_built_keeps_the_hook(
    shell: Any, capsys: Any, monkeypatch: Any
) -> None:
    """The interrupt is injected where it would land (nothing real can press Ctrl-C at that
    instant): IPython drops a handler that raises, so the hook must swallow it."""
    import jupyter_gpumem.cells.failure as failure_mod

    shell.run_cell("%gpumem simulate 160MiB")
    shell.run_cell("import torch")

    def interrupted(*_a: Any, **_k: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(failure_mod, "diagnose", interrupted)
    assert not shell.run_cell('x = torch.randn(64, 2 << 20, device="cuda")').success
    err = capsys.readouterr().err
    assert "diagnosis interrupted" in err
    assert any(issubclass(RuntimeError, e) for e in shell.custom_exceptions)
    monkeypatch.undo()
    assert not shell.run_cell('x = torch.randn(64, 2 << 20, device="cuda")').success
    assert "GPU out of memory" in capsys.readouterr().out


def test_a_final_run_that_fails_puts_the_notebook_back(shell: Any, run: Any) -> None:
    """Clear cache cannot help here: its real run fails, and what it changed is undone."""
    shell.run_cell("%gpumem simulate 160MiB")
    shell.run_cell(
        "import torch\ncounter = {'n': 0}\nw = torch.zeros(4, device='cuda')\n"
        "hold = torch.zeros(15 << 20, device='cuda')  # 60 MiB another cell needs"
    )
    assert not shell.run_cell(
        "w.add_(1)\ncounter['n'] += 1\nbig = torch.randn(30 << 20, device='cuda')"
    ).success
    assert shell.user_ns["counter"] == {"n": 1}
    out = run(shell, "%gpumem retry clear --force", store_history=False).out
    assert "Still out of memory" in out, out
    assert "Nothing was kept" in out, out
    assert shell.user_ns["counter"] == {"n": 1}
    assert shell.user_ns["w"].cpu().tolist() == [1.0] * 4


@pytest.mark.slow
def test_oomsafe_on_a_training_loop_ends_as_one_clean_run(train: Any, capsys: Any) -> None:
    """Every fix %%oomsafe tries before its last is a rehearsal; the last runs once."""
    shell = train
    capsys.readouterr()
    assert shell.run_cell("%%oomsafe\n" + TRAIN).success
    out = capsys.readouterr().out
    assert "oomsafe: Fits at batch" in out or "fits" in out, out
    assert "--force" not in out, out
    batch = shell.user_ns["batch_size"]
    steps, weights, losses = _steps(shell), _weights(shell), list(shell.user_ns["history"])
    assert steps == len(losses)
    assert shell.run_cell(SETUP).success
    assert shell.run_cell(TRAIN.replace("2048\n", f"{batch}\n", 1)).success
    assert _steps(shell) == steps
    for a, b in zip(weights, _weights(shell), strict=True):
        assert torch.equal(a, b)


def test_no_room_in_host_memory_for_the_snapshot_refuses_with_a_line(
    train: Any, run: Any, monkeypatch: Any
) -> None:
    """Host memory is read from the machine; a machine with almost none cannot be made here."""
    import jupyter_gpumem.rescue.transaction as txn_mod

    shell = train
    assert not shell.run_cell(TRAIN).success
    before = _weights(shell)
    monkeypatch.setattr(txn_mod, "host_available_bytes", lambda: 64 << 10)
    out = run(shell, "%gpumem retry batch", store_history=False).out
    assert "Not re-run: undoing a re-run needs a copy of" in out, out
    assert "h" in shell.user_ns, "a refusal leaves even the failed run's leftovers in place"
    assert re.search(r"of model and optimizer state in host memory, and only 64(\.00)? KiB", out), (
        out
    )
    assert shell.user_ns["batch_size"] == 2048
    for a, b in zip(before, _weights(shell), strict=True):
        assert torch.equal(a, b)


def test_a_failure_inside_a_fix_is_one_line_and_the_notebook_is_put_back(
    shell: Any, capsys: Any, monkeypatch: Any
) -> None:
    """A bug of ours while a fix runs: one line naming it, the notebook as it was, the hook still
    installed (the next OOM is diagnosed)."""
    pytest.importorskip("torch")
    from jupyter_gpumem.fixes import FIXES

    shell.run_cell("%gpumem simulate 64MiB")
    shell.run_cell("import torch\nkept = [1]")
    cell = "kept.append(2)\nx = torch.empty(2**30, dtype=torch.uint8, device='cuda')\n"
    assert not shell.run_cell(cell).success

    def broken(ctx: Any) -> Any:
        ctx.user_ns["kept"].append(3)  # changed, then the bug: put back all the same
        raise ValueError("boom")

    monkeypatch.setattr(FIXES["cpu"], "apply", broken)
    capsys.readouterr()
    shell.run_cell("%gpumem retry cpu --force")
    out = capsys.readouterr()
    assert "jupyter_gpumem: Move to CPU failed (ValueError: boom). Nothing was kept:" in out.err, (
        out
    )
    assert "Traceback" not in out.out + out.err, out
    assert shell.user_ns["kept"] == [1, 2]  # as the failed cell left it
    assert not shell.run_cell(cell).success
    assert "GPU out of memory" in capsys.readouterr().out
