"""Reduce batch sizes for the allocator's steady state, not for the passes it rehearsed (issue 20).

A rehearsal stops after two passes of the loop, and the caching allocator's blocks are not always
settled by then: on PyTorch's CIFAR-10 tutorial at 1448 on 128 MiB, two steps fit and the third
runs out (26 MiB asked with 42.76 MiB of the 106 MiB reserved free in pieces). The replay
(``fixes/batch/replay.py``) finds the recorded run's last pass in its log and plays it again until
the peak stops rising (``Cycle``), which costs no run. Checked here against the simulated card
(PyTorch's caching allocator, ported): the smallest card on which four steps fit, at batches the
replay never ran; and through ``%%oomsafe`` on the tutorial.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import jupyter_gpumem  # noqa: E402
from jupyter_gpumem.backends.allocator import SizeLog  # noqa: E402
from jupyter_gpumem.fixes.batch.replay import Cycle, Replay  # noqa: E402
from tests.test_real_batch import CIFAR_LARGEST_128  # noqa: E402
from tests.test_real_code import CIFAR_DATA, CIFAR_NET, CIFAR_TRAIN  # noqa: E402

MiB = 1 << 20


def _steps(gpu: Any, batch: int, steps: int) -> tuple[int, SizeLog | None]:
    """``steps`` training steps of the CIFAR-10 tutorial's Net (SGD with momentum: its buffers
    made at the first step) at ``batch`` on the card: (reserved peak, the log of the run)."""
    torch.manual_seed(0)
    ns: dict[str, Any] = {"torch": torch, "nn": torch.nn, "F": torch.nn.functional}
    ns["optim"] = torch.optim
    exec(CIFAR_NET, ns)
    net, criterion, opt = ns["net"], ns["criterion"], ns["optimizer"]
    host = torch.randn(batch, 3, 32, 32)
    labels = torch.randint(0, 10, (batch,))
    torch.cuda.reset_peak_memory_stats()
    with gpu.record_sizes() as log:
        for _ in range(steps):
            inputs, target = host.to("cuda"), labels.to("cuda")
            opt.zero_grad()
            loss = criterion(net(inputs), target)
            loss.backward()
            opt.step()
    return torch.cuda.memory_stats()["reserved_bytes.all.peak"], log


def _card_need(batch: int, steps: int) -> int:
    """The smallest card (to 1 MiB) on which ``steps`` steps fit: at the limit, where the
    allocator gives its free segments back before it reserves a new one."""
    lo, hi = 48, 256  # MiB; fits at hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        try:
            with jupyter_gpumem.simulate(mid * MiB) as gpu:
                _steps(gpu, batch, steps)
            hi = mid
        except torch.OutOfMemoryError:
            lo = mid
    return hi * MiB


@pytest.mark.slow
def test_the_replay_of_two_steps_predicts_the_card_after_four() -> None:
    """From one rehearsal-like run of two steps at a prime batch: the need of four steps (the
    card's, bisected) at batches it never ran, where the third step needs more than the first
    two (1448: two steps fit 120 MiB, four need 134)."""
    with jupyter_gpumem.simulate("512MiB") as gpu:
        _, log = _steps(gpu, 1021, 2)
    assert log is not None and log.complete
    replay = Replay.from_runs([(1021, _card_need(1021, 2), log)])
    assert replay is not None and replay.cycle is not None
    later_needs_more = False
    for batch in (1300, 1448):
        card = _card_need(batch, 4)
        assert abs(replay.need(batch) - card) <= 2 * MiB, (batch, replay.need(batch), card)
        later_needs_more |= card > _card_need(batch, 2)
        assert replay.recorded_need(batch) <= replay.need(batch)
    assert later_needs_more  # else this test would not show the steady state matters


def _log(events: list[tuple[int, int]]) -> SizeLog:
    log = SizeLog(resident=[])
    for n, v in events:
        if n >= 0:
            log.alloc(v)
        else:
            log.events.append((n, v))
    return log


def _passes(
    batch: int, passes: int = 2, keep: bool = False, forget: bool = False, grads: bool = False
) -> SizeLog:
    """A loop's log at ``batch``: each pass makes an input (1 MiB a sample), an activation (512
    KiB a sample) freed in the pass, and a loss (4 bytes) kept until the next pass frees it; the
    first pass ends by making an optimizer state (16 MiB and 4 bytes). ``keep``: each pass also
    keeps an output (256 KiB a sample) the next does not free (a list of outputs growing); ``forget``: the last pass
    also frees the state, which no pass makes again; ``grads``: each pass ends by making a
    gradient (3 MiB), and the next starts by freeing it before it allocates anything (a
    ``zero_grad()`` at the top of the loop)."""
    events: list[tuple[int, int]] = []
    n = 0
    held: list[int] = []  # the last pass's input and loss
    grad = None
    for p in range(passes):
        if grad is not None:
            events.append((-1, grad))
        x, a, loss = n, n + 1, n + 2
        events += [(x, batch * MiB), (a, batch * MiB // 2), (loss, 4), (-1, a)]
        n += 3
        events += [(-1, m) for m in held]
        held = [x, loss]
        if keep:
            events.append((n, batch * MiB // 4))
            n += 1
        if forget and p == passes - 1:
            events.append((-1, 3))
        if grads:
            grad = n
            events.append((n, 3 * MiB + 4))
            n += 1
        if p == 0:
            events.append((n, 16 * MiB + 4))
            n += 1
    return _log(events)


def test_the_last_pass_is_found_past_a_first_pass_that_does_more() -> None:
    cycle = Cycle.last_of(_passes(7))
    assert cycle is not None
    assert cycle.ops[:3] == ((0, 4), (0, 5), (0, 6))  # the second pass, after the state
    # what it freed from the first pass (its input and loss) it frees from itself next time
    assert sorted(n for op, n in cycle.ops if op == 2) == [4, 6]


def test_the_frees_that_start_a_pass_are_part_of_it() -> None:
    """A pass that starts by freeing the last pass's gradients (before its first allocation):
    the repeated pass frees its own; left out, every pass replayed kept its gradients
    (word_language_model's `model.zero_grad()`: the search stopped at 7 of 16)."""
    log = _passes(7, grads=True)
    cycle = Cycle.last_of(log)
    assert cycle is not None and cycle.ops[0] == (2, 8)  # the second pass's gradient, freed
    replay = Replay.from_runs([(7, 40 * MiB, log)])
    assert replay is not None
    assert replay.need(300) == replay.recorded_need(300)


def test_a_pass_that_frees_what_it_does_not_make_again_is_no_steady_state() -> None:
    assert Cycle.last_of(_passes(7, forget=True)) is None
    assert Cycle.last_of(_log([(0, MiB)])) is None  # one allocation: no pass to repeat


def test_what_each_pass_keeps_is_counted_for_the_passes_after() -> None:
    steady = Replay.from_runs([(7, 40 * MiB, _passes(7))])
    growing = Replay.from_runs([(7, 40 * MiB, _passes(7, keep=True))])
    assert steady is not None and growing is not None and growing.cycle is not None
    # a steady loop needs what its two passes did
    assert steady.need(7) == steady.recorded_need(7)
    assert steady.need(300) == steady.recorded_need(300)
    # one that keeps an output each pass needs more with each pass after the two it ran
    assert growing.need(300) > growing.recorded_need(300)


def _cifar(shell: Any, batch: int) -> None:
    shell.run_cell("%gpumem simulate off")
    cell = CIFAR_DATA.replace("batch_size=512", f"batch_size={batch}").replace("N", "8192")
    assert shell.run_cell(cell).success
    shell.run_cell("%gpumem simulate 128MiB")
    assert shell.run_cell(CIFAR_NET).success


@pytest.mark.slow
def test_oomsafe_cifar_tutorial_lands_on_a_batch_whose_whole_run_fits(
    shell: Any, capsys: Any
) -> None:
    """Was (``%gpumem retry batch``, the same search): a rehearsal at 1448 fitted its two steps,
    the real run ran out at its third, and real runs then kept 1234, 87% of the largest, in 4
    runs. The steady state puts the largest at 1419 from the first fit."""
    _cifar(shell, 8192)
    capsys.readouterr()
    assert shell.run_cell("%%oomsafe --fixes batch\n" + CIFAR_TRAIN).success
    out = capsys.readouterr().out
    batch = shell.user_ns["trainloader"].batch_size
    assert f"Fits at batch {batch} (was 8192)" in out, out
    assert 0.9 * CIFAR_LARGEST_128 <= batch <= CIFAR_LARGEST_128, out
    m = re.search(r"(\d+) rehearsals? \+ (\d+) real runs?", out)
    assert m and int(m.group(1)) + int(m.group(2)) <= 4, out
    assert "ran out where its rehearsal" not in out, out  # no real run failed
    assert "Finished Training" in out, out


def test_after_a_whole_run_fails_where_its_rehearsal_fitted_the_steady_state_aims() -> None:
    """The real run at a batch whose two rehearsed passes fitted ran out: where the replay's
    steady state says that batch does not fit either, the next probe is the largest batch that
    fits in the steady state, not the bisection's midpoint."""
    from jupyter_gpumem.fixes.batch.replay import REPLAY_MARGIN
    from jupyter_gpumem.fixes.batch.search import BatchSearch, Observation

    card = 128 * MiB
    log = _passes(7, keep=True)
    uncalibrated = Replay.from_runs([(7, 0, log)])
    assert uncalibrated is not None
    peak = -uncalibrated.offset  # what the card measures, as the replay counts it
    replay = Replay.from_runs([(7, peak, log)])
    assert replay is not None
    # a batch whose two passes fit and whose steady state does not
    failed = next(b for b in range(8, 256) if replay.recorded_need(b) <= card < replay.need(b))
    search = BatchSearch(capacity_bytes=card, max_batch=255, replay_logs=True)
    search.observe(Observation(256, False, None))
    search.observe(Observation(7, True, peak, log=log))
    search.observe(Observation(failed, True, replay.recorded_need(failed)))  # the rehearsal
    search.observe(Observation(failed, False, None))  # the whole run
    search.bisect_from_now()
    largest = replay.largest(card * (1 - REPLAY_MARGIN), 7, failed)
    assert largest > (7 + failed) / 2  # else the bisection would propose it as well
    assert search.next_batch() == largest
