"""The fixes, `%gpumem retry` and `%%oomsafe`, in a real InteractiveShell on the simulated GPU."""

from __future__ import annotations

import functools
import re
from typing import Any

import pytest
from IPython.core.error import UsageError

import jupyter_gpumem

SETUP = (
    "import torch\n"
    "model = torch.nn.Sequential(torch.nn.Linear(1024, 2048), torch.nn.ReLU(),"
    " torch.nn.Linear(2048, 1024)).cuda()\n"
)
CELL = (
    "batch_size = 256  # samples per step (größe)\n"
    'x = torch.randn(batch_size, 32, 1024, device="cuda")\n'
    "out = model(x).sum()\n"
)
CARD = "160MiB"


def _clean(shell: Any) -> None:
    for n in ("x", "out", "batch_size"):
        shell.user_ns.pop(n, None)


@functools.cache
def largest_fit(runs: int = 1) -> int:
    """The largest batch that fits ``runs`` runs of the cell in a row, by bisection: each probe
    on a fresh simulated card with a fresh model (a probe in the test's own shell inherits the
    cached blocks of the probes before it: there 113 failed twice in a row where a fresh card
    fits it). The second run needs more than the first: the old ``out`` keeps the first run's
    autograd graph, and ``x``, until the new one is made. Measured (2-core x86_64, torch 2.13 CPU,
    the simulated card's ported caching allocator): one run 216 (217 does not fit); two runs in
    a row 120 (121 does not), three the same."""
    torch = pytest.importorskip("torch")

    def fits(batch: int) -> bool:
        ns: dict[str, Any] = {}
        with jupyter_gpumem.simulate(CARD):
            try:
                exec(SETUP, ns)
                for _ in range(runs):
                    exec(CELL.replace("256", str(batch)), ns)
                return True
            except torch.OutOfMemoryError:
                return False
            finally:
                ns.clear()

    lo, hi = 1, 256
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


@pytest.fixture(scope="module")
def steady_best() -> int:
    """The largest batch that fits the cell twice in a row (what Reduce batch sizes a cell
    without a loop for), measured before the test's own card starts."""
    return largest_fit(runs=2)


@pytest.fixture(scope="module")
def one_run_best() -> int:
    return largest_fit(runs=1)


@pytest.fixture
def sim(shell: Any) -> Any:
    shell.run_cell(f"%gpumem simulate {CARD}")
    shell.run_cell(SETUP)
    return shell


def _attempts(out: str) -> list[tuple[int, bool]]:
    return [
        (int(b), ok == "fits") for b, ok in re.findall(r"batch\s+batch (\d+)\s+(fits|OOM)", out)
    ]


@pytest.mark.slow
def test_retry_batch_lands_near_the_largest_fit_within_4_runs(
    steady_best: int, sim: Any, run: Any
) -> None:
    """Reduce batch sizes this cell without a loop for two runs in a row: at >= 95% of the largest
    batch that fits twice (bisected on fresh cards: 120), within 4 runs."""
    best = steady_best
    sim.run_cell(CELL)
    assert jupyter_gpumem.last_failure(sim) is not None
    out = run(sim, "%gpumem retry batch", store_history=False).out
    runs = _attempts(out)
    assert 1 <= len(runs) <= 4, out
    found = int(re.search(r"Fits at batch (\d+) \(was 256\)", out).group(1))
    assert found >= 0.95 * best and found <= best, (found, best)
    # the summary names the value to put in the cell, keeping the comment and non-ASCII text
    assert f"change line 1 to: batch_size = {found}  # samples per step (größe)" in out
    assert sim.user_ns["batch_size"] == found, "the namespace holds the run that fit"
    assert "peak" in out and "of 160 MiB" in out


@pytest.mark.slow
def test_oomsafe_rescues_and_says_what_to_change(
    steady_best: int, sim: Any, capsys: Any, run: Any
) -> None:
    """As Reduce batch: >= 95% of the largest batch that fits twice in a row, within 4 runs."""
    best = steady_best
    out = run(sim, "%%oomsafe --fixes batch\n" + CELL, store_history=False).out
    assert "oomsafe: out of memory" in out
    runs = _attempts(out)
    assert 1 <= len(runs) <= 4, out
    found = sim.user_ns["batch_size"]
    assert found >= 0.95 * best
    assert f"To make it permanent: change line 1 to: batch_size = {found}" in out
    # the same cell again starts at the batch that fit
    capsys.readouterr()
    _clean(sim)
    sim.run_cell("%%oomsafe --fixes batch\n" + CELL)
    out = capsys.readouterr().out
    assert f"starting at batch {found}, which fit this cell last time" in out
    assert "out of memory" not in out
    assert sim.user_ns["batch_size"] == found


@pytest.mark.slow
def test_oomsafe_ladder_order_and_clear_rebuilt_variables(
    one_run_best: int, sim: Any, run: Any
) -> None:
    """At the largest batch one run fits (216, bisected on fresh cards), the run leaves `x` and
    `out` (with its autograd graph) behind and the same cell again needs room for both: Clear
    cache, which drops the old `x` and `out` the cell rebuilds, is the first fix that works."""
    best = one_run_best
    sim.run_cell(CELL.replace("256", str(best)))
    out = run(sim, "%%oomsafe\n" + CELL.replace("256", str(best)), store_history=False).out
    lines = [ln for ln in out.splitlines() if ln.startswith("oomsafe:")]
    assert lines[1].startswith("oomsafe: clear cache"), lines
    assert "fits after clearing" in out
    assert "dropped the old `x` (the cell rebuilds it)" in out
    assert "reduce batch" not in out, "the ladder stops at the first fix that works"


@pytest.mark.slow
def test_oomsafe_order_follows_fixes_option(sim: Any, run: Any) -> None:
    out = run(sim, "%%oomsafe --fixes autocast,batch\n" + CELL, store_history=False).out
    names = re.findall(r"^oomsafe: (enable autocast|reduce batch)", out, re.M)
    assert names and names[0] == "enable autocast", out


GLOBAL_STEP = "step = 0\nhistory = []\n"
SIDE_EFFECT_CELL = (
    "step += 1\n"
    "history.append(step)\n"
    "batch_size = 256\n"
    'x = torch.randn(batch_size, 32, 1024, device="cuda")\n'
    "out = model(x).sum()\n"
)


@pytest.mark.slow
def test_retry_refuses_a_cell_with_side_effects(sim: Any, capsys: Any, run: Any) -> None:
    sim.run_cell(GLOBAL_STEP)
    sim.run_cell(SIDE_EFFECT_CELL)
    assert sim.user_ns["step"] == 1
    out = run(sim, "%gpumem retry batch", store_history=False).out
    assert "step" in out and "history" in out
    assert "Re-run anyway?" in out
    assert "`%gpumem retry batch --force` re-runs it anyway." in out, out  # how, in a terminal
    assert sim.user_ns["step"] == 1, "not re-run silently"
    assert "Fits at batch" not in out
    sim.run_cell("%gpumem retry batch --force")
    assert "Fits at batch" in capsys.readouterr().out
    assert sim.user_ns["step"] > 1, "--force re-runs, and the user asked for it"


@pytest.mark.slow
def test_oomsafe_stops_before_repeating_side_effects(sim: Any, capsys: Any, run: Any) -> None:
    sim.run_cell(GLOBAL_STEP)
    out = run(sim, "%%oomsafe\n" + SIDE_EFFECT_CELL, store_history=False).out
    assert "oomsafe: stopped before re-running" in out
    assert "--force" in out
    assert sim.user_ns["step"] == 1 and sim.user_ns["history"] == [1]
    sim.run_cell("%%oomsafe --force --fixes batch\n" + SIDE_EFFECT_CELL)
    assert "Fits at batch" in capsys.readouterr().out


@pytest.mark.slow
def test_autocast_fix_measures_its_saving(sim: Any, run: Any) -> None:
    sim.run_cell(CELL.replace("256", "236"))
    out = run(sim, "%gpumem retry autocast", store_history=False).out
    assert "Numerics change" in out
    assert "The cell fits under autocast (bfloat16)" in out, out
    assert str(sim.user_ns["out"].dtype) in ("torch.bfloat16", "torch.float32")


def test_move_to_cpu_fix_moves_the_model_and_runs(sim: Any, run: Any) -> None:
    sim.run_cell(CELL)
    before = sim.run_cell("torch.cuda.memory_allocated()").result
    out = run(sim, "%gpumem retry cpu", store_history=False).out
    assert "The cell ran on the CPU" in out, out
    moved = next(ln for ln in out.splitlines() if "Moved to the CPU:" in ln)
    # `x` was the failed run's own: dropped before the re-run, which makes it on the CPU
    assert "`model`" in moved and "`x`" not in moved
    assert "much slower" in out
    after = sim.run_cell("torch.cuda.memory_allocated()").result
    assert after < before, "the model no longer counts against the GPU"


def test_cpu_allocator_failure_gets_its_own_message(sim: Any, run: Any) -> None:
    sim.run_cell("x = torch.empty(2**46, dtype=torch.uint8, device='cuda')")
    out = run(sim, "%gpumem retry cpu", store_history=False).out
    assert "The CPU ran out of memory too" in out, out


def test_clear_with_drop_deletes_a_named_variable(sim: Any, run: Any) -> None:
    sim.run_cell("leftover = torch.empty(60 * 2**20, dtype=torch.uint8, device='cuda')")
    sim.run_cell(CELL.replace("256", "150"))
    out = run(sim, "%gpumem retry clear --drop leftover", store_history=False).out
    assert "deleted `leftover`" in out
    assert "fits after clearing" in out, out
    assert "leftover" not in sim.user_ns


def test_a_fix_that_does_not_apply_says_why(sim: Any, run: Any) -> None:
    sim.run_cell("n_rows = 4096")
    sim.run_cell("y = model(torch.randn(n_rows, 32, 1024, device='cuda'))")
    out = run(sim, "%gpumem retry batch", store_history=False).out
    assert "Reduce batch does not apply: no batch size found in this cell" in out
    assert "--batch-var" in out


def test_oomsafe_passes_other_errors_through(sim: Any) -> None:
    result = sim.run_cell("%%oomsafe\nraise KeyError('mine')\n")
    assert isinstance(result.error_in_exec, KeyError)


def test_oomsafe_cell_that_fits_runs_once_quietly(sim: Any, capsys: Any) -> None:
    capsys.readouterr()
    sim.run_cell("%%oomsafe\ncount = globals().get('count', 0) + 1\n")
    assert sim.user_ns["count"] == 1
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize(
    "line",
    [
        "retry",
        "retry bogus",
        "retry batch --min-batch 0",
        "retry batch --max-retries x",
        "retry batch --nope",
        "limit 3 apples",
        "sidebar now",
        "gauge",
    ],
)
def test_retry_and_other_argument_errors(sim: Any, line: str) -> None:
    sim.run_cell(CELL)
    magic = sim.magics_manager.magics["line"]["gpumem"]
    with pytest.raises(UsageError) as info:
        magic(line)
    assert "\n" not in str(info.value).strip(), line


def test_retry_before_any_failure_is_a_usage_error(shell: Any) -> None:
    magic = shell.magics_manager.magics["line"]["gpumem"]
    with pytest.raises(UsageError, match="no cell has run out of memory yet"):
        magic("retry batch")


@pytest.mark.parametrize("line", ["--fixes nope", "--fixes ''", "--max-retries 0", "--what"])
def test_oomsafe_argument_errors(shell: Any, line: str) -> None:
    magic = shell.magics_manager.magics["cell"]["oomsafe"]
    with pytest.raises(UsageError):
        magic(line, "x = 1\n")


TRAIN_CELL = (
    "batch_size = 256\n"
    "opt = torch.optim.SGD(model.parameters(), lr=0.01)\n"
    "for i in range(2):\n"
    "    opt.zero_grad()\n"
    '    loss = model(torch.randn(batch_size, 32, 1024, device="cuda")).sum()\n'
    "    loss.backward()\n"
    "    opt.step()\n"
)


@pytest.mark.slow
def test_reduce_batch_offers_and_applies_gradient_accumulation(sim: Any, run: Any) -> None:
    sim.run_cell(TRAIN_CELL)
    out = run(sim, "%gpumem retry batch --force", store_history=False).out
    assert "Gradient accumulation " in out and "--accumulate" in out
    sim.run_cell(TRAIN_CELL)
    out = run(sim, "%gpumem retry batch --force --accumulate", store_history=False).out
    assert "with gradient accumulation" in out
    assert "_gpumem_accum_i" in out, "the rewritten cell is shown"
    assert "loss" in out and "/ " in out
