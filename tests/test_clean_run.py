"""One clean run means from before the failed cell (issue 19, item 4).

What the failed run changed before it ran out, and what the fix's re-run starts from:

- the failure record judges a first pass by what ran, not by what an optimizer from an earlier
  cell holds: a loop over a list whose target is its first item, a counter at its start even when
  its name existed before the cell;
- what the failed run changed in the models the cell names (BatchNorm running statistics and
  `num_batches_tracked`, gradients in ``.grad``) is put back from the hook's record of that cell
  before the fix runs, so the kept run is one clean run; a model the record did not see (reached
  through an object) is named instead, by a kept fix as by a failed one.

Each test drives a real IPython InteractiveShell with the extension loaded, on the simulated GPU.
"""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")

import jupyter_gpumem  # noqa: E402
from tests.conftest import extension  # noqa: E402

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
    trained: Any, run: Any
) -> None:
    """The loop over `batches` failed on its first item; Adam's state is from the earlier cell.
    The record says no earlier pass ran (was: "earlier passes ran", from the optimizer's state),
    so `%gpumem retry cpu` asks nothing about `opt.step()` and its run is one clean run."""
    assert not trained.run_cell(OVER_A_LIST).success
    failed = jupyter_gpumem.last_failure(trained)
    assert failed is not None and failed.earlier_passes is False
    out = run(trained, "%gpumem retry cpu", store_history=False).out
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


def _stats(model: Any) -> list[Any]:
    """The BatchNorm statistics, `num_batches_tracked` included, and the parameters."""
    return [t.detach().cpu().clone() for t in (*model.buffers(), *model.parameters())]


def _clean_run(shell: Any, *cells: str, card: str = "1GiB") -> None:
    """One clean run: the same cells from the start on a card where they fit."""
    shell.run_cell("%gpumem simulate off")
    shell.run_cell(f"%gpumem simulate {card}")
    for cell in cells:
        assert shell.run_cell(cell).success


@pytest.mark.slow
def test_batchnorm_statistics_the_failed_forward_moved_are_put_back_before_every_fix(
    shell: Any, capsys: Any, run: Any
) -> None:
    """The failed forward moved the BatchNorm's running statistics and `num_batches_tracked`
    before it ran out. The hook copied them before the cell: a fix that fails leaves them as
    they were before that cell, and one that fits keeps one clean run's (was: named, and the
    kept run started from them, `num_batches_tracked` 2 where one clean run has 1)."""
    shell.run_cell("%gpumem simulate 64MiB")
    assert shell.run_cell(BN_SETUP).success
    assert not shell.run_cell(BN_TRAIN).success
    bn = shell.user_ns["net"][1]
    assert int(bn.num_batches_tracked) == 1  # the failed run's forward got through it
    out = run(shell, "%gpumem retry autocast", store_history=False).out
    assert "Nothing was kept" in out, out
    assert "`net`'s BatchNorm running statistics as they were before the failed cell" in out, out
    assert int(bn.num_batches_tracked) == 0 and float(bn.running_var.sum()) == 64.0
    shell.run_cell("%gpumem retry cpu")
    out = capsys.readouterr().out
    assert "The cell ran on the CPU" in out, out
    # the failed fix left them as before the failed cell: this run starts there, nothing to say
    assert "Kept from the failed run" not in out and "BatchNorm" not in out, out
    fixed = _stats(shell.user_ns["net"])
    _clean_run(shell, BN_SETUP, BN_TRAIN)
    clean = shell.user_ns["net"]
    assert int(clean[1].num_batches_tracked) == 1
    assert _same(fixed, _stats(clean))  # running mean and variance too: one clean run's


def test_statistics_a_later_cell_moved_are_not_put_back(shell: Any, run: Any) -> None:
    """After the failure a cell of the user's trained the BatchNorm on: its work is not undone,
    and what the failed run left under it is named, as before the record existed."""
    shell.run_cell("%gpumem simulate 64MiB")
    assert shell.run_cell(BN_SETUP).success
    assert not shell.run_cell(BN_TRAIN).success
    assert shell.run_cell("net(torch.randn(8, 64, device='cuda'));").success
    bn = shell.user_ns["net"][1]
    assert int(bn.num_batches_tracked) == 2
    out = run(shell, "%gpumem retry cpu", store_history=False).out
    assert "The cell ran on the CPU" in out, out
    assert "Put back" not in out and "Kept from the failed run" in out, out
    assert int(bn.num_batches_tracked) == 3  # the later cell's forward and the re-run's


def test_a_cell_pays_for_a_record_only_while_it_runs_and_only_for_models_it_names(
    shell: Any,
) -> None:
    """A cell that fits keeps no copy after it; a cell naming no model takes none; a failed
    cell's record travels with its failure."""
    from jupyter_gpumem.rescue import before_cell

    shell.run_cell("%gpumem simulate 64MiB")
    assert shell.run_cell(BN_SETUP).success
    hook = extension(shell).hook
    seen: list[Any] = []
    shell.events.register("pre_run_cell", lambda info: seen.append(hook._cell_before))
    assert shell.run_cell("y = net(torch.randn(8, 64, device='cuda'))").success
    assert shell.run_cell("z = 1 + 1").success
    assert hook._cell_before is None  # released after the cell
    assert before_cell.take("z = 1 + 1\nprint('net')", shell.user_ns) is None
    assert not shell.run_cell(BN_TRAIN).success
    failed = jupyter_gpumem.last_failure(shell)
    assert failed is not None and isinstance(failed.before, before_cell.Before)
    assert hook._cell_before is None


# the same model, reached only through an object the cell names: no record of it before the cell
BOXED = """class Box:
    pass
box = Box()
box.net = net
"""
BOXED_TRAIN = BN_TRAIN.replace("net(x)", "box.net(x)")


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


def test_gradients_a_failed_backward_left_are_put_back_and_the_run_is_one_clean_run(
    shell: Any, capsys: Any, run: Any
) -> None:
    """The backward ran out of memory after it wrote the last layer's gradients: the re-run's
    backward would add to them. The guard asks first; forced, Move to CPU's run starts from the
    gradients as they were before the cell (none) and its `.grad` is one clean run's (was: kept
    the failed run's and said so). A cell that zeroes the gradients first gets one clean run's,
    unasked."""
    shell.run_cell("%gpumem simulate 40MiB")
    assert shell.run_cell(GRAD_SETUP).success
    assert not shell.run_cell(GRAD_TRAIN).success
    written = [p.grad is not None for p in shell.user_ns["net"].parameters()]
    assert written == [False, False, True, True]  # part way through the backward
    out = run(shell, "%gpumem retry cpu", store_history=False).out
    assert "`.grad`" in out and "--force" in out, out  # asked first
    shell.run_cell("%gpumem retry cpu --force")
    out = capsys.readouterr().out
    assert "The cell ran on the CPU" in out, out
    assert "Put back before the re-run" in out and "the gradients in `net`'s `.grad`" in out, out
    assert "Kept from the failed run" not in out, out
    fixed = _grads(shell)
    _clean_run(shell, GRAD_SETUP, GRAD_TRAIN)
    assert _same(fixed, _grads(shell))
    # zeroed first: whatever the failed run left, the kept run's gradients are one clean run's
    zeroed = "sgd.zero_grad()\n" + GRAD_TRAIN
    _clean_run(shell, GRAD_SETUP, card="40MiB")
    assert not shell.run_cell(zeroed).success
    out = run(shell, "%gpumem retry cpu", store_history=False).out
    assert "The cell ran on the CPU" in out and "--force" not in out, out
    fixed = _grads(shell)
    _clean_run(shell, GRAD_SETUP, zeroed)
    assert _same(fixed, _grads(shell))


def test_a_kept_reduce_batch_run_names_the_statistics_it_could_not_put_back(
    shell: Any, run: Any
) -> None:
    """A model the cell reaches only through an object had no record before the cell: its
    statistics as the failed run moved them are named by every fix whose run is kept (not only
    Move to CPU's), once, and not as something the rehearsals could not undo."""
    shell.run_cell("%gpumem simulate 64MiB")
    assert shell.run_cell(BN_SETUP).success and shell.run_cell(BOXED).success
    assert not shell.run_cell(BOXED_TRAIN).success
    out = run(shell, "%gpumem retry batch", store_history=False).out
    assert "Kept from the failed run" in out and "Put back" not in out, out
    assert out.count("BatchNorm running statistics") == 1, out
    assert "could not undo" not in out, out


def test_a_fix_that_does_not_fit_leaves_the_statistics_as_before_the_failed_cell(
    shell: Any, run: Any
) -> None:
    """The forward ran, then a later line of the cell ran out: Clear cache does not help, and
    what it puts back is the notebook before the fix with the BatchNorm statistics as they were
    before the failed cell, said so ("Nothing was kept" is true: was "not put back: `model`'s
    BatchNorm running statistics")."""
    shell.run_cell("%gpumem simulate 160MiB")
    shell.run_cell(
        "import torch\nmodel = torch.nn.Sequential(torch.nn.Linear(16, 16), "
        "torch.nn.BatchNorm1d(16)).cuda()\nhold = torch.zeros(15 << 20, device='cuda')"
    )
    cell = "out = model(torch.randn(64, 16, device='cuda'))\nbig = torch.randn(30 << 20, device='cuda')"
    assert not shell.run_cell(cell).success
    bn = shell.user_ns["model"][1]
    assert int(bn.num_batches_tracked) == 1
    out = run(shell, "%gpumem retry clear --force", store_history=False).out
    assert "Nothing was kept" in out, out
    assert "`model`'s BatchNorm running statistics as they were before the failed cell" in out
    assert int(bn.num_batches_tracked) == 0 and float(bn.running_mean.abs().sum()) == 0.0


def test_the_record_puts_back_after_each_rehearsal_and_an_interrupt_keeps_the_fix_exact() -> None:
    """The transaction with a cell's record, as a fix drives it: the failed run's statistics and
    gradients (there before the cell, small: copied) are put back before the first run and after
    each rehearsal; a rollback of everything (Ctrl-C, an error) leaves the notebook exactly as
    before the fix, and the next fix puts them back again."""
    from jupyter_gpumem.rescue import before_cell
    from jupyter_gpumem.rescue.transaction import Transaction

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8))
    net(torch.randn(4, 8)).sum().backward()  # an earlier cell: gradients left in .grad
    ns: dict[str, Any] = {"net": net}
    start = _stats(net) + [p.grad.clone() for p in net.parameters()]
    record = before_cell.take("net(x).sum().backward()", ns)
    assert record is not None
    net(torch.randn(4, 8)).sum().backward()  # the failed run got through its backward
    record.seal()
    failed = _stats(net) + [p.grad.clone() for p in net.parameters()]

    def now() -> list[Any]:
        return _stats(net) + [p.grad.clone() for p in net.parameters()]

    txn = Transaction(ns, ["net"], check_host=False, before=record)
    assert _same(now(), start) and not txn.failed_run
    net(torch.randn(4, 8)).sum().backward()  # a rehearsal
    txn.rollback()
    assert _same(now(), start)
    net(torch.randn(4, 8)).sum().backward()  # the final run, interrupted
    txn.rollback(everything=True)
    assert _same(now(), failed)  # exactly as before the fix
    Transaction(ns, ["net"], check_host=False, before=record)
    assert _same(now(), start)


def test_oomsafe_puts_back_the_statistics_its_first_run_moved(shell: Any, run: Any) -> None:
    """`%%oomsafe` runs the body itself: its first run's forward moved the statistics before it
    ran out, and the fix that fits starts from before it (`num_batches_tracked` of one run)."""
    shell.run_cell("%gpumem simulate 64MiB")
    assert shell.run_cell(BN_SETUP).success
    out = run(shell, "%%oomsafe --fixes cpu\n" + BN_TRAIN, store_history=False).out
    assert "oomsafe: move to cpu" in out.lower(), out
    assert int(shell.user_ns["net"][1].num_batches_tracked) == 1, out


def test_the_record_before_a_cell_allocates_nothing_on_the_card(
    shell: Any, monkeypatch: Any
) -> None:
    """The statistics are copied to host memory straight from the card, never joined there
    first: on a real card (where nothing keeps new tensors off the card, unlike the simulated
    one's host_only, replaced here by CUDA's) the record before each cell must not raise the peak."""
    import contextlib

    from jupyter_gpumem import backends

    shell.run_cell("%gpumem simulate 64MiB")
    assert shell.run_cell(
        "import torch\n"
        "m = torch.nn.Sequential(*[torch.nn.BatchNorm1d(1 << 18) for _ in range(4)]).cuda()\n"
        "torch.cuda.reset_peak_memory_stats()\n"
        "start = torch.cuda.memory_allocated()"
    ).success
    monkeypatch.setattr(backends.active(), "host_only", contextlib.nullcontext)
    assert shell.run_cell("m.eval()\npeak = torch.cuda.max_memory_allocated()").success
    assert shell.user_ns["peak"] == shell.user_ns["start"]
