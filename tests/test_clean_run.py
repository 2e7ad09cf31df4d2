"""One clean run means from before the failed cell (issue 19, item 4).

What the failed run changed before it ran out, and what the fix's re-run starts from:

- the failure record judges a first pass by what ran, not by what an optimizer from an earlier
  cell holds: a loop over a list whose target is its first item, a counter at its start even when
  its name existed before the cell;
- what the failed run left in the models (BatchNorm running statistics, gradients in ``.grad``)
  cannot be put back, since no copy from before that cell exists: a kept fix says so, as a failed
  one does, and where the cell makes it irrelevant the result is that of one clean run.

Each test drives a real IPython InteractiveShell with the extension loaded, on the simulated GPU.
"""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")

import jupyter_gpumem  # noqa: E402

SETUP = """\
import torch
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256)).cuda()
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
"""
# an earlier cell that trained: Adam has state, `xb` and `i` exist
EARLIER = """\
for i in range(2):
    xb = torch.randn(8, 256)
    model(xb.cuda()).square().mean().backward()
    opt.step()
    opt.zero_grad()
"""
# the first batch does not fit: 40000 x 256 floats is 39 MiB, its output as much again
OVER_A_LIST = """\
batches = [torch.randn(n, 256, generator=torch.Generator().manual_seed(n)) for n in (40000, 8)]
for xb in batches:
    out = model(xb.cuda())
    loss = out.square().mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
"""


def _params(model: Any) -> list[Any]:
    return [p.detach().cpu().clone() for p in model.parameters()]


def _same(a: list[Any], b: list[Any]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.fixture
def trained(shell: Any) -> Any:
    """The model and its Adam state on a 64 MiB simulated card, after an earlier training cell."""
    shell.run_cell("%gpumem simulate 64MiB")
    assert shell.run_cell(SETUP).success
    assert shell.run_cell(EARLIER).success
    assert shell.user_ns["opt"].state
    return shell


@pytest.mark.slow
def test_a_first_pass_over_a_list_is_first_whatever_the_optimizer_held_before(
    trained: Any, capsys: Any
) -> None:
    """The loop over `batches` failed on its first item; Adam's state is from the earlier cell.
    The record says no earlier pass ran (was: "earlier passes ran", from the optimizer's state),
    so `%gpumem retry cpu` asks nothing about `opt.step()` and its run is one clean run."""
    assert not trained.run_cell(OVER_A_LIST).success
    failed = jupyter_gpumem.last_failure(trained)
    assert failed is not None and failed.earlier_passes is False
    capsys.readouterr()
    trained.run_cell("%gpumem retry cpu")
    out = capsys.readouterr().out
    assert "The cell ran on the CPU" in out, out
    assert "opt.step()" not in out and "--force" not in out, out
    fixed = _params(trained.user_ns["model"])
    trained.run_cell("%gpumem simulate off")
    trained.run_cell("%gpumem simulate 1GiB")  # one clean run: the same cells on a card that fits
    assert trained.run_cell(SETUP).success and trained.run_cell(EARLIER).success
    assert trained.run_cell(OVER_A_LIST).success
    assert _same(fixed, _params(trained.user_ns["model"]))


def test_a_second_pass_over_the_list_is_not_first(trained: Any) -> None:
    """The same loop failing on its second item (the first fits): earlier passes ran."""
    cell = OVER_A_LIST.replace("(40000, 8)", "(8, 40000)")
    assert not trained.run_cell(cell).success
    failed = jupyter_gpumem.last_failure(trained)
    assert failed is not None and failed.earlier_passes is True


def test_a_first_pass_over_a_list_of_pairs(trained: Any) -> None:
    """`for xb, yb in pairs`: the pass is where `xb` stands among the pairs' first items."""
    cell = """\
pairs = [(torch.randn(n, 256), torch.randn(n, 256)) for n in (40000, 8)]
for xb, yb in pairs:
    loss = (model(xb.cuda()) - yb.cuda()).square().mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
"""
    assert not trained.run_cell(cell).success
    failed = jupyter_gpumem.last_failure(trained)
    assert failed is not None and failed.earlier_passes is False
    assert not trained.run_cell(cell.replace("(40000, 8)", "(8, 40000)")).success
    failed = jupyter_gpumem.last_failure(trained)
    assert failed is not None and failed.earlier_passes is True


def test_a_counter_whose_name_existed_before_the_cell(trained: Any) -> None:
    """`i` exists from the earlier cell and Adam has state: the counter, 0 at the failure, says
    the first pass (was: the name's existing before the cell hid the counter, and the optimizer's
    state said "earlier passes ran")."""
    cell = """\
for i in range(2):
    xb = torch.randn(40000, 256, device='cuda')
    loss = model(xb).square().mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
"""
    assert not trained.run_cell(cell).success
    failed = jupyter_gpumem.last_failure(trained)
    assert failed is not None and failed.earlier_passes is False


def test_an_optimizer_the_cell_made_again_tells_by_its_state(trained: Any) -> None:
    """The cell rebinds `opt` before the loop: its state is this run's, so an empty one says no
    pass stepped, although the name existed before the cell."""
    cell = """\
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
k = 0
while k < 2:
    xb = torch.randn(40000, 256, device='cuda')
    loss = model(xb).square().mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
    k += 1
"""
    assert not trained.run_cell(cell).success
    failed = jupyter_gpumem.last_failure(trained)
    assert failed is not None and failed.earlier_passes is False


# ---- what the failed run left in the models -----------------------------------------------------

BN_SETUP = """\
import torch
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.BatchNorm1d(64), torch.nn.Linear(64, 64)).cuda()
sgd = torch.optim.SGD(net.parameters(), lr=0.1)
"""
# the first Linear and the BatchNorm run, then the second Linear's output does not fit
BN_TRAIN = """\
x = torch.randn(120000, 64, device='cuda')
loss = net(x).square().mean()
loss.backward()
sgd.step()
"""


@pytest.mark.slow
def test_batchnorm_statistics_the_failed_forward_moved_are_named_by_every_kept_fix(
    shell: Any, capsys: Any
) -> None:
    """The failed forward moved the BatchNorm's running statistics and `num_batches_tracked`
    before it ran out; nothing copied them before the cell. Move to CPU keeps a run that starts
    from them, and says so; a fix that fails says it could not put them back."""
    shell.run_cell("%gpumem simulate 64MiB")
    assert shell.run_cell(BN_SETUP).success
    assert not shell.run_cell(BN_TRAIN).success
    bn = shell.user_ns["net"][1]
    assert int(bn.num_batches_tracked) == 1  # the failed run's forward got through it
    capsys.readouterr()
    shell.run_cell("%gpumem retry autocast")
    out = capsys.readouterr().out
    assert "not put back" in out and "`net`'s BatchNorm running statistics" in out, out
    capsys.readouterr()
    shell.run_cell("%gpumem retry cpu")
    out = capsys.readouterr().out
    assert "The cell ran on the CPU" in out, out
    assert "Kept from the failed run" in out, out
    assert "`net`'s BatchNorm running statistics" in out, out
    assert int(bn.num_batches_tracked) == 2  # one clean run would have 1: said, not hidden


GRAD_SETUP = """\
import torch
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Linear(64, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 8)).cuda()
sgd = torch.optim.SGD(net.parameters(), lr=0.1)
"""
# the last layer's backward fits and its gradients are accumulated; the ReLU's does not fit
GRAD_TRAIN = """\
x = torch.randn(4000, 64, device='cuda')
loss = net(x).square().mean()
loss.backward()
"""


def _grads(shell: Any) -> list[Any]:
    return [p.grad.detach().cpu().clone() for p in shell.user_ns["net"].parameters()]


def test_gradients_a_failed_backward_left_are_named_or_as_one_clean_run(
    shell: Any, capsys: Any
) -> None:
    """The backward ran out of memory after it wrote the last layer's gradients: the re-run's
    backward adds to them. The guard asks first; forced, Move to CPU's run is kept and says that
    the failed run's gradients stayed in `.grad`. A cell that zeroes the gradients first gets one
    clean run's, unasked."""
    shell.run_cell("%gpumem simulate 40MiB")
    assert shell.run_cell(GRAD_SETUP).success
    assert not shell.run_cell(GRAD_TRAIN).success
    written = [p.grad is not None for p in shell.user_ns["net"].parameters()]
    assert written == [False, False, True, True]  # part way through the backward
    capsys.readouterr()
    shell.run_cell("%gpumem retry cpu")
    out = capsys.readouterr().out
    assert "`.grad`" in out and "--force" in out, out  # asked first
    shell.run_cell("%gpumem retry cpu --force")
    out = capsys.readouterr().out
    assert "The cell ran on the CPU" in out, out
    assert "Kept from the failed run" in out and "the gradients in `net`'s `.grad`" in out, out
    # zeroed first: whatever the failed run left, the kept run's gradients are one clean run's
    zeroed = "sgd.zero_grad()\n" + GRAD_TRAIN
    shell.run_cell("%gpumem simulate off")
    shell.run_cell("%gpumem simulate 40MiB")
    assert shell.run_cell(GRAD_SETUP).success
    assert not shell.run_cell(zeroed).success
    capsys.readouterr()
    shell.run_cell("%gpumem retry cpu")
    out = capsys.readouterr().out
    assert "The cell ran on the CPU" in out and "--force" not in out, out
    fixed = _grads(shell)
    shell.run_cell("%gpumem simulate off")
    shell.run_cell("%gpumem simulate 1GiB")
    assert shell.run_cell(GRAD_SETUP).success and shell.run_cell(zeroed).success
    assert _same(fixed, _grads(shell))


def test_a_kept_reduce_batch_run_names_the_statistics_the_failed_run_moved(
    shell: Any, capsys: Any
) -> None:
    """Every fix whose run is kept says what that run started from that the failed run left (not
    only Move to CPU's), once, and not as something the rehearsals could not undo."""
    shell.run_cell("%gpumem simulate 64MiB")
    assert shell.run_cell(BN_SETUP).success
    assert not shell.run_cell(BN_TRAIN).success
    capsys.readouterr()
    shell.run_cell("%gpumem retry batch")
    out = capsys.readouterr().out
    assert "Kept from the failed run" in out, out
    assert out.count("`net`'s BatchNorm running statistics") == 1, out
    assert "could not undo" not in out, out
