"""``torch.compile`` on the simulated GPU (issue 20 item 8), in a real InteractiveShell.

Dynamo compiles under the simulation as on CUDA (backends/simulated/compiled.py): graphs are
compiled and counted, a new batch size recompiles once and the batch dimension is then dynamic,
and the graphs run op by op through the counting mode, so a compiled step's peak on the card is
its eager peak (measured here against the same step run eagerly). Before, dynamo skipped every
frame under the counting mode and compiled code ran eagerly (0 graphs).
"""

from __future__ import annotations

import re
from typing import Any

import pytest

torch = pytest.importorskip("torch")

MiB = 1 << 20

SETUP = """\
import torch
import torch.nn.functional as F
from jupyter_gpumem.backends import torch_objects
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(512, 2048), torch.nn.ReLU(),
                            torch.nn.Linear(2048, 10)).cuda()
opt = torch.optim.Adam(model.parameters(), lr=1e-3)

def train_step(x, y):
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss

step = torch.compile(train_step)
"""

# the peak a step adds to what is resident before it, on the simulated card
PEAK = """\
def peak_of(f, batch):
    x = torch.randn(batch, 512, device="cuda")
    y = torch.randint(0, 10, (batch,), device="cuda")
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    f(x, y)
    return torch.cuda.max_memory_allocated() - base
"""


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> None:
    """Dynamo keeps what it learnt of a frame by its file, line and name (automatic dynamic
    shapes): cells of an earlier test at the same line would start this one dynamic."""
    import torch._dynamo

    torch._dynamo.reset()


def _ok(shell: Any, source: str) -> None:
    result = shell.run_cell(source)
    assert result.success, result.error_in_exec or result.error_before_exec


@pytest.mark.slow
def test_a_compiled_step_compiles_and_takes_its_eager_memory(shell: Any) -> None:
    _ok(shell, "%gpumem simulate 256MiB")
    _ok(shell, SETUP + PEAK)
    _ok(shell, "g0 = torch_objects.compiled_graphs() or 0\nwarm = peak_of(step, 8)")
    _ok(shell, "g1 = torch_objects.compiled_graphs()\nheld = torch.cuda.memory_allocated()")
    ns = shell.user_ns
    assert ns["g1"] > ns["g0"], "nothing was compiled under the simulated GPU"
    # Adam's state, which dynamo makes while it traces, is on the card: weights + 2 moments
    weights = sum(p.numel() * p.element_size() for p in ns["model"].parameters())
    assert ns["held"] >= 3 * weights, (ns["held"], weights)
    _ok(shell, "eager = peak_of(train_step, 2048)\ncompiled = peak_of(step, 2048)")
    eager, compiled = ns["eager"], ns["compiled"]
    assert eager > 16 * MiB  # the activations at 2048 (2048 x 2048 floats)
    assert abs(compiled - eager) <= 0.02 * eager, (compiled, eager)


def test_a_fused_optimizer_s_state_made_while_tracing_counts_on_the_card(shell: Any) -> None:
    """nanoGPT's configure_optimizers on CUDA: AdamW(fused=True), which dynamo does not put in a
    graph; the state it made while tracing (on the host, modes off) is read by the eager fused
    kernel next to the card's parameters. Was: 'Expected all tensors to be on the same device,
    but got exp_avgs is on cpu'."""
    _ok(shell, "%gpumem simulate 256MiB")
    _ok(
        shell,
        SETUP.replace(
            "torch.optim.Adam(model.parameters(), lr=1e-3)",
            "torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)",
        )
        + PEAK,
    )
    _ok(shell, "peak_of(step, 8)\nheld = torch.cuda.memory_allocated()")
    ns = shell.user_ns
    weights = sum(p.numel() * p.element_size() for p in ns["model"].parameters())
    assert ns["held"] >= 3 * weights, (ns["held"], weights)  # weights + 2 moments


def test_a_new_batch_recompiles_once_then_the_batch_is_dynamic(shell: Any) -> None:
    _ok(shell, "%gpumem simulate 256MiB")
    _ok(shell, SETUP + PEAK)
    _ok(shell, "peak_of(step, 8)\ng1 = torch_objects.compiled_graphs()")
    _ok(shell, "peak_of(step, 8)\ng2 = torch_objects.compiled_graphs()")
    _ok(shell, "peak_of(step, 1024)\ng3 = torch_objects.compiled_graphs()")
    _ok(
        shell,
        "for b in (300, 2000, 777):\n    peak_of(step, b)\ng4 = torch_objects.compiled_graphs()",
    )
    ns = shell.user_ns
    assert ns["g2"] == ns["g1"], "the same batch compiled again"
    assert ns["g3"] > ns["g2"], "a new batch size did not recompile (dynamo's first guess)"
    assert ns["g4"] == ns["g3"], "batches after the first change recompiled: not dynamic"


def test_an_oom_in_a_compiled_graph_is_torch_s_and_diagnosed(shell: Any, capsys: Any) -> None:
    _ok(shell, "%gpumem simulate 128MiB")
    _ok(shell, SETUP + PEAK)
    _ok(shell, "peak_of(step, 8)")  # compiled, Adam's state made
    capsys.readouterr()
    cell = (
        "x = torch.randn(16384, 512, device='cuda')\n"
        "y = torch.randint(0, 10, (16384,), device='cuda')\n"
        "loss = step(x, y)\n"
    )
    result = shell.run_cell(cell)
    assert isinstance(result.error_in_exec, torch.OutOfMemoryError)
    out = capsys.readouterr().out
    assert "GPU out of memory" in out, out
    # Adam's state, reached only through the function the compiled step wraps, is the cell's
    assert re.search(r"\n  opt +[\d.]+ MiB +optimizer, variable, used by this cell", out), out
    assert "%gpumem retry batch" in out, out


HELPER_STEP = """\
def apply_update():
    opt.step()
    opt.zero_grad()

def train_step(x, y):
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    apply_update()
    return loss

step = torch.compile(train_step)
"""


def test_the_diagnosis_follows_a_compiled_step_into_the_notebook_functions_it_calls(
    shell: Any, capsys: Any
) -> None:
    """Was: only the compiled function's own code was read; the optimizer a helper it calls
    steps was "not used by this cell"."""
    setup = SETUP.split("def train_step")[0] + HELPER_STEP
    _ok(shell, "%gpumem simulate 128MiB")
    _ok(shell, setup + PEAK)
    _ok(shell, "peak_of(step, 8)")
    capsys.readouterr()
    cell = (
        "x = torch.randn(16384, 512, device='cuda')\n"
        "y = torch.randint(0, 10, (16384,), device='cuda')\n"
        "loss = step(x, y)\n"
    )
    assert isinstance(shell.run_cell(cell).error_in_exec, torch.OutOfMemoryError)
    out = capsys.readouterr().out
    assert re.search(r"\n  opt +[\d.]+ MiB +optimizer, variable, used by this cell", out), out


def test_compiled_code_compiles_again_for_the_real_device_after_the_simulation(
    shell: Any,
) -> None:
    import torch._dynamo.config as config

    before = config.debug_backend_override
    _ok(shell, "%gpumem simulate 64MiB")
    _ok(
        shell,
        "import torch\nfrom jupyter_gpumem.backends import torch_objects\n"
        "g = torch.compile(lambda t: t * 2 + 1, backend='eager')\n"
        "a = g(torch.ones(1024, device='cuda'))\n"
        "was_cuda = a.is_cuda\non_card = torch.cuda.memory_allocated()\nn1 = torch_objects.compiled_graphs()",
    )
    _ok(shell, "%gpumem simulate off")
    assert config.debug_backend_override == before
    _ok(shell, "b = g(torch.ones(1024))\nn2 = torch_objects.compiled_graphs()")
    ns = shell.user_ns
    assert ns["on_card"] >= 4096 and ns["was_cuda"]  # the result, counted on the card
    assert ns["n2"] == ns["n1"] + 1  # guarded on the simulation's mode: compiled again
    assert ns["b"].device.type == "cpu" and float(ns["b"][0]) == 3.0


# ---- Reduce batch and %%oomsafe on a compiled step --------------------------------------------

STEP_CELL = """\
batch = {b}
x = torch.randn(batch, 512, device="cuda")
y = torch.randint(0, 10, (batch,), device="cuda")
loss = step(x, y)
"""
COMPILED_SETUP = SETUP.replace(
    "model = torch.nn.Sequential", "model = torch.compile(torch.nn.Sequential"
).replace("torch.nn.Linear(2048, 10)).cuda()", "torch.nn.Linear(2048, 10)).cuda())")


def _two_more_runs(shell: Any, batch: int) -> None:
    from jupyter_gpumem.backends import torch_objects

    graphs = torch_objects.compiled_graphs()
    for n in range(2):
        result = shell.run_cell(STEP_CELL.format(b=batch))
        assert result.success, f"run {n + 2} of the compiled step at batch {batch} failed"
    assert torch_objects.compiled_graphs() == graphs  # the batch found compiles nothing more


@pytest.mark.slow
def test_retry_batch_on_a_compiled_step_lands_on_a_batch_that_fits(shell: Any, capsys: Any) -> None:
    from jupyter_gpumem.backends import torch_objects

    _ok(shell, "%gpumem simulate 128MiB")
    _ok(shell, COMPILED_SETUP)
    assert not shell.run_cell(STEP_CELL.format(b=16384)).success
    before = torch_objects.compiled_graphs() or 0
    assert before > 0  # the failed run compiled
    capsys.readouterr()
    shell.run_cell("%gpumem retry batch")
    out = capsys.readouterr().out
    batch = shell.user_ns["batch"]
    assert f"Fits at batch {batch} (was 16384)" in out, out
    compiled = (torch_objects.compiled_graphs() or 0) - before
    assert compiled > 0  # the re-runs compiled, and the outcome counts it
    s = "s" if compiled != 1 else ""
    assert f"torch.compile compiled {compiled} graph{s} during the re-runs" in out, out
    _two_more_runs(shell, batch)


@pytest.mark.slow
def test_oomsafe_on_a_compiled_step_lands_on_a_batch_that_fits(shell: Any, capsys: Any) -> None:
    _ok(shell, "%gpumem simulate 128MiB")
    _ok(shell, COMPILED_SETUP)
    capsys.readouterr()
    assert shell.run_cell("%%oomsafe --fixes batch\n" + STEP_CELL.format(b=16384)).success
    out = capsys.readouterr().out
    batch = shell.user_ns["batch"]
    assert f"Fits at batch {batch} (was 16384)" in out, out
    _two_more_runs(shell, batch)


# ---- what a rollback needs from backends/torch_objects ---------------------------------------

ROLLED_BACK = """\
import torch
net = torch.nn.Linear(64, 64)
opt = torch.optim.Adam(net.parameters())

def train_step(x):
    opt.zero_grad()
    net(x).sum().backward()
    opt.step()

step = torch.compile(train_step, backend="eager")
"""


def test_forget_compiled_frees_a_compiled_optimizer_s_state_and_compiles_again() -> None:
    import gc
    import weakref

    from jupyter_gpumem.backends import torch_objects

    ns: dict[str, Any] = {"__name__": "__main__"}
    exec(ROLLED_BACK, ns)
    before = set(ns)
    ns["step"](torch.randn(4, 64))
    added = set(ns) - before  # dynamo's globals: compiled graphs, resume functions, ...
    assert added
    exp_avg = weakref.ref(ns["opt"].state[ns["net"].weight]["exp_avg"])
    # a rollback: the optimizer's state as before the first step, the run's names gone
    ns["opt"].state.clear()
    for k in added:
        del ns[k]
    gc.collect()
    assert exp_avg() is not None  # the compiled step's graph holds it while `opt` lives
    graphs = torch_objects.compiled_graphs() or 0
    assert torch_objects.forget_compiled([ns["opt"]])
    gc.collect()
    assert exp_avg() is None
    ns["step"](torch.randn(4, 64))  # no NameError: compiled again
    assert (torch_objects.compiled_graphs() or 0) > graphs
    assert "exp_avg" in ns["opt"].state[ns["net"].weight]


def test_where_the_backend_cannot_be_installed_compiled_code_runs_eagerly_and_counted(
    shell: Any, monkeypatch: Any
) -> None:
    import torch._dynamo.config as config

    from jupyter_gpumem.backends.simulated import compiled

    monkeypatch.setattr(compiled, "_ready", False)  # as where registering the backend failed
    _ok(shell, "%gpumem simulate 64MiB")
    _ok(
        shell,
        "import torch\nfrom jupyter_gpumem.backends import torch_objects\n"
        "n0 = torch_objects.compiled_graphs() or 0\n"
        "g = torch.compile(lambda t: t * 2 + 1)\n"
        "a = g(torch.ones(1024, device='cuda'))\n"
        "on_card = torch.cuda.memory_allocated()\nn1 = torch_objects.compiled_graphs() or 0",
    )
    ns = shell.user_ns
    assert ns["n1"] == ns["n0"]  # nothing compiled for a backend that would count nothing
    assert ns["on_card"] >= 4096  # the result, counted
    _ok(shell, "%gpumem simulate off")
    assert config.disable is False
