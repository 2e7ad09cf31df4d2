"""Where the memory was allocated, by notebook line and model module (jupyter_gpumem/readings/trace.py), on
the simulated GPU, in a real InteractiveShell and a real ipykernel."""

from __future__ import annotations

import pickle
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from jupyter_gpumem.backends import alloc_history
from jupyter_gpumem.readings import trace
from tests.conftest import Kernel

MiB = 1 << 20


@pytest.fixture(autouse=True)
def _trace_stopped() -> Iterator[None]:
    yield
    trace.stop()


def _cell(sh: Any, code: str) -> tuple[int, Any]:
    """Run a cell as a notebook would; (its number, the result)."""
    number = sh.execution_count
    return number, sh.run_cell(code, store_history=True)


@pytest.fixture
def traced(shell: Any) -> Any:
    shell.run_cell("%gpumem simulate 160MiB", store_history=False)
    shell.run_cell("import torch", store_history=False)
    trace.start(shell=shell)
    return shell


@pytest.mark.slow
def test_the_line_that_allocated_comes_first_not_the_line_that_failed(traced: Any) -> None:
    n, result = _cell(
        traced,
        "small = torch.ones(1000, device='cuda')\n"
        "acts = torch.empty(60 * 2**20, dtype=torch.uint8, device='cuda')\n"
        "boom = torch.empty(200 * 2**20, dtype=torch.uint8, device='cuda')\n",
    )
    assert type(result.error_in_exec).__name__ == "OutOfMemoryError"
    rows = trace.allocated_by_line(traced)
    assert rows[0] == trace.LineAlloc(f"In [{n}], line 2", None, 60 * MiB, 1)
    assert rows[1] == trace.LineAlloc(f"In [{n}], line 1", None, 4000, 1)
    lines = trace.summary_lines(shell=traced)
    assert lines[0] == f"In [{n}], line 2: 60.00 MiB in 1 tensor"


def test_a_notebook_function_is_named_with_the_cell_that_defined_it(traced: Any) -> None:
    defined, _ = _cell(
        traced,
        "def make(mib):\n"
        "    # a library call in between folds into this line\n"
        "    return torch.nn.functional.pad(torch.empty(mib * 2**20, dtype=torch.uint8, device='cuda'), (0, 0))\n",
    )
    called, result = _cell(traced, "kept = [make(8), make(8)]")
    assert result.error_in_exec is None
    rows = trace.allocated_by_line(traced)
    assert rows[0].where == f"`make` (In [{defined}]), line 3"
    assert (rows[0].bytes, rows[0].tensors) == (16 * MiB, 2)  # the pad's outputs; inputs died
    assert f"In [{called}]" not in {r.where for r in rows}


def test_a_layer_of_a_sequential_is_named_by_its_module_path(traced: Any) -> None:
    _cell(
        traced,
        "model = torch.nn.Sequential(\n"
        "    torch.nn.Linear(64, 64),\n"
        "    torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Linear(64, 4096)),\n"
        ").cuda()",
    )
    n, result = _cell(traced, "x = torch.randn(1024, 64, device='cuda')\nout = model(x)")
    assert result.error_in_exec is None
    rows = {(r.where, r.module): r for r in trace.allocated_by_line(traced)}
    top = rows[(f"In [{n}], line 2", "model.1.1")]
    assert (top.bytes, top.tensors) == (1024 * 4096 * 4, 1)  # the output, held by `out`
    assert (f"In [{n}], line 2", "model.1.0") in rows  # ReLU's output, saved for backward
    assert rows[(f"In [{n}], line 1", None)].bytes == 1024 * 64 * 4
    summary = trace.summary_lines(shell=traced)
    assert summary[0].startswith(f"In [{n}], line 2: 16.25 MiB in 2 tensors (model.1.1 16.00 MiB")


def test_a_model_defined_in_the_notebook_names_its_forward_and_module(traced: Any) -> None:
    defined, _ = _cell(
        traced,
        "class Net(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.body = torch.nn.Linear(16, 16)\n"
        "    def forward(self, x):\n"
        "        h = self.body(x)\n"
        "        return h, h * 2\n"
        "net = Net().cuda()",
    )
    _cell(traced, "y = net(torch.randn(4096, 16, device='cuda'))")
    rows = {(r.where, r.module) for r in trace.allocated_by_line(traced)}
    assert (f"`forward` (In [{defined}]), line 7", "net") in rows  # h * 2, in Net's own forward
    assert (f"`forward` (In [{defined}]), line 6", "net.body") in rows


def test_an_oom_inside_forward_leaves_no_module_running(traced: Any) -> None:
    _cell(traced, "big = torch.nn.Sequential(torch.nn.Linear(8, 2**20)).cuda()")
    _n, result = _cell(traced, "big(torch.randn(64, 8, device='cuda'))")
    assert type(result.error_in_exec).__name__ == "OutOfMemoryError"
    assert alloc_history.current_module() is None
    n, _ = _cell(traced, "after = torch.empty(2**20, dtype=torch.uint8, device='cuda')")
    assert (f"In [{n}], line 1", None) in {
        (r.where, r.module) for r in trace.allocated_by_line(traced)
    }


def test_freed_memory_leaves_and_earlier_memory_comes_last(shell: Any) -> None:
    shell.run_cell("%gpumem simulate 160MiB", store_history=False)
    _cell(shell, "import torch\nbefore = torch.empty(40 * 2**20, dtype=torch.uint8, device='cuda')")
    trace.start(shell=shell)
    n, _ = _cell(
        shell, "a = torch.empty(2**20, device='cuda')\nb = torch.empty(2**20, device='cuda')"
    )
    rows = trace.allocated_by_line(shell)
    assert [r.where for r in rows] == [
        f"In [{n}], line 1",
        f"In [{n}], line 2",
        trace.BEFORE_TRACING,
    ]
    _cell(shell, "del a")
    rows = trace.allocated_by_line(shell)
    assert [r.where for r in rows] == [f"In [{n}], line 2", trace.BEFORE_TRACING]
    assert rows[-1].bytes == 40 * MiB


def test_stop_forgets_and_removes_the_hooks(traced: Any) -> None:
    import torch

    modules = torch.nn.modules.module
    assert trace.active() and modules._global_forward_pre_hooks
    _cell(traced, "t = torch.empty(2**20, device='cuda')")
    trace.stop()
    assert not trace.active()
    assert trace.allocated_by_line(traced) == [] and trace.summary_lines(shell=traced) == []
    assert not modules._global_forward_pre_hooks and not modules._global_forward_hooks
    from jupyter_gpumem.backends import simulated

    assert simulated.current()._history is None  # type: ignore[union-attr]


def test_the_history_is_a_ring_of_max_entries(shell: Any) -> None:
    shell.run_cell("%gpumem simulate 160MiB\nimport torch", store_history=False)
    trace.start(max_entries=10, shell=shell)
    _cell(shell, "for _ in range(20):\n    t = torch.empty(1000, device='cuda')")
    data = alloc_history.snapshot()
    assert len(data["device_traces"][0]) == 10


def test_the_snapshot_opens_in_torchs_memory_viz(traced: Any, tmp_path: Path) -> None:
    from torch.cuda import _memory_viz as viz

    _cell(traced, "model = torch.nn.Sequential(torch.nn.Linear(64, 64)).cuda()")
    n, _ = _cell(
        traced,
        "x = torch.randn(256, 64, device='cuda')\n"
        "out = model(x)\n"
        "gone = torch.empty(30 * 2**20, dtype=torch.uint8, device='cuda')\n"
        "del gone\n"
        "torch.empty(400 * 2**20, dtype=torch.uint8, device='cuda')",
    )
    path = trace.save_snapshot(str(tmp_path / "snap.pickle"), shell=traced)
    assert Path(path).is_absolute()
    with open(path, "rb") as f:
        data = pickle.load(f)
    from jupyter_gpumem.backends import simulated

    sim = simulated.current()
    assert sim is not None
    # segsum checks that blocks add up to each segment, and segments to what is reserved
    summary = viz.segsum(data)
    reserved = sum(seg["total_size"] for seg in data["segments"])
    assert reserved == sim.reserved_bytes
    # torch's `allocated` counts the blocks' sizes (requests rounded up to 512 bytes)
    allocated = sum(
        b["size"]
        for seg in data["segments"]
        for b in seg["blocks"]
        if b["state"] == "active_allocated"
    )
    assert allocated == sim.allocated_bytes
    assert "total_reserved" in summary
    events = viz.trace(data)
    assert "raise OutOfMemoryError # 400.0MiB requested" in events
    assert "cudaFree(" in events and "del " in events  # `gone` came and went
    flame = viz.memory(data, format_flamegraph=lambda lines: lines)
    assert f"In [{n}]:2:<module>" in flame  # cells carry their number, as in the notebook
    assert "<ipython-input-" not in flame
    for html in (viz.trace_plot(data), viz.segment_plot(data)):
        assert "MemoryViz.js" in html
    # what the viewer's JavaScript reads
    assert {"device", "address", "total_size", "stream", "blocks"} <= set(data["segments"][0])
    entry = data["device_traces"][0][0]
    assert {"action", "addr", "size", "stream", "frames", "time_us"} <= set(entry)


def test_where_reads_both_kinds_of_cell_file() -> None:
    files = {"/tmp/ipykernel_42/123.py": 5}
    assert trace._where((("/tmp/ipykernel_42/123.py", 3, "<module>"),), files) == "In [5], line 3"
    stack = (
        ("/x/site-packages/torch/nn/functional.py", 10, "pad"),
        ("<ipython-input-7-abc>", 12, "train"),
        ("<ipython-input-9-def>", 1, "<module>"),
    )
    assert trace._where(stack, {}) == "`train` (In [7]), line 12"
    assert trace._where((("/home/me/proj/train.py", 4, "step"),), {}) == "`step` (train.py), line 4"
    assert trace._where((), {}) == trace.BEFORE_TRACING


@pytest.mark.kernel
def test_cells_are_named_in_a_real_kernel(kernel: Kernel, tmp_path: Path) -> None:
    k = kernel
    k.run("%load_ext jupyter_gpumem")
    k.run("%gpumem simulate 160MiB")
    k.run("import torch\nfrom jupyter_gpumem.readings import trace\ntrace.start()")
    defined = k.run("def make():\n    return torch.empty(2**20, dtype=torch.uint8, device='cuda')")
    called = k.run(
        "x = 1\nkept = make()\nacts = torch.empty(3 * 2**20, dtype=torch.uint8, device='cuda')"
    )
    assert called["reply"]["status"] == "ok"
    out = k.run(
        "print('cell files:', *{f.split('/')[-2][:10] for f in get_ipython().compile._filename_map})\n"
        "print(*trace.summary_lines(), sep='\\n')\n"
        f"print(trace.save_snapshot({str(tmp_path / 's.pickle')!r}))"
    )
    text = Kernel.text(out)
    d, c = defined["reply"]["execution_count"], called["reply"]["execution_count"]
    assert "cell files: ipykernel_" in text  # /tmp/ipykernel_PID/HASH.py, not <ipython-input-N-…>
    assert f"In [{c}], line 3: 3.00 MiB in 1 tensor" in text
    assert f"`make` (In [{d}]), line 2: 1.00 MiB in 1 tensor" in text
    with open(tmp_path / "s.pickle", "rb") as f:
        data = pickle.load(f)
    blocks = [b for seg in data["segments"] for b in seg["blocks"]]
    files = {fr["filename"] for b in blocks for fr in b.get("frames", ())}
    assert f"In [{c}]" in files and not any("ipykernel_" in name for name in files)


def test_trace_magic_puts_the_lines_in_the_diagnosis_and_saves(
    shell: Any, capsys: Any, tmp_path: Any
) -> None:
    """Through the user's surface: `%gpumem trace on`, an OOM, `%gpumem trace save`, `off`."""
    shell.run_cell("%gpumem simulate 160MiB")
    shell.run_cell("import torch")
    shell.run_cell("%gpumem trace on")
    capsys.readouterr()
    assert not shell.run_cell(
        "a = torch.zeros(15 << 20, device='cuda')  # 60 MiB\n"
        "b = torch.zeros(15 << 20, device='cuda')  # 60 MiB\n"
        "c = torch.zeros(15 << 20, device='cuda')  # 60 MiB: out of memory\n",
        store_history=True,
    ).success
    out = capsys.readouterr().out
    assert "Allocated by (tracing on)" in out, out
    assert re.search(r"In \[\d+\], line 1: 60\.00 MiB", out), out
    path = tmp_path / "snap.pickle"
    shell.run_line_magic("gpumem", f"trace save {path}")
    assert path.exists() and "memory_viz" in capsys.readouterr().out
    shell.run_line_magic("gpumem", "trace off")
    assert not shell.run_cell("d = torch.zeros(60 << 20, device='cuda')").success
    out = capsys.readouterr().out
    assert "Allocated by" not in out


def test_allocated_by_lists_the_card_that_ran_out(shell: Any, capsys: Any) -> None:
    """Two cards, tracing on: the memory a line holds on cuda:0 is not where cuda:1's OOM went."""
    shell.run_cell("%gpumem simulate 160MiB --devices 2")
    shell.run_cell("import torch")
    shell.run_cell("%gpumem trace on")
    capsys.readouterr()
    assert not shell.run_cell(
        "a = torch.zeros(10 << 20, device='cuda:0')  # 40 MiB on the other card\n"
        "b = torch.zeros(15 << 20, device='cuda:1')  # 60 MiB\n"
        "c = torch.zeros(30 << 20, device='cuda:1')  # 120 MiB: out of memory on cuda:1\n",
        store_history=True,
    ).success
    out = capsys.readouterr().out
    assert "Allocated by (tracing on)" in out, out
    assert re.search(r"In \[\d+\], line 2: 60\.00 MiB", out), out
    assert not re.search(r"In \[\d+\], line 1: 40\.00 MiB", out), out
    shell.run_line_magic("gpumem", "trace off")
