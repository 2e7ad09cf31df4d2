"""Time from an OOM to the diagnosis on screen, with 1k, 10k and 100k objects in the namespace,
and the cost the extension adds to a cell that does not fail.

The namespace is hostile on purpose: a tenth of it is objects whose own code raises, sleeps or
counts its calls when touched (dead ``weakref.proxy``, ``__class__``/``__dict__`` properties,
``__getattribute__``, list and dict subclasses with their own ``__iter__``/``values()``), beside a
lazy Mapping (10 ms per item), objects with a 3 s ``__getattr__`` and ``__dict__``, and a model
with its own ``parameters()``. The diagnosis must still be built every time, with none of that
code run (the script fails otherwise).

Runs anywhere: a real IPython InteractiveShell on the simulated GPU (on a real GPU machine, pass
--real to fail on the card instead). Prints a Markdown table; --write replaces the table's section
in docs/benchmarks.md (or appends it).

    python benchmarks/diagnosis_latency.py [--reps 15] [--write]
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import sys
import time
from contextlib import redirect_stdout
from datetime import date
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

POPULATE = """\
import time, weakref
import torch
from collections.abc import Mapping
_ran = [0]  # calls into the objects' own code while the diagnosis is built: must stay 0
class _Obj:
    def __init__(self, i):
        self.i = i
        self.name = str(i)
        self.t = torch.zeros(2)
class _Gone:
    pass
class _NoClass(_Obj):
    @property
    def __class__(self):
        _ran[0] += 1
        raise RuntimeError("__class__")
class _NoDict(_Obj):
    @property
    def __dict__(self):
        _ran[0] += 1
        raise RuntimeError("__dict__")
class _NoAttrs(_Obj):
    def __getattribute__(self, name):
        _ran[0] += 1
        raise RuntimeError(name)
class _NoIter(list):
    def __iter__(self):
        _ran[0] += 1
        raise RuntimeError("__iter__")
    def __len__(self):
        _ran[0] += 1
        return 0
class _OwnValues(dict):
    def values(self):
        _ran[0] += 1
        return super().values()
class _Lazy(Mapping):  # a lazy dataset: 10 ms per item
    def __init__(self, n): self.n = n
    def __getitem__(self, k):
        _ran[0] += 1
        time.sleep(0.01)
        return torch.zeros(2)
    def __iter__(self): return iter(range(self.n))
    def __len__(self): return self.n
class _SlowAttr:
    def __getattr__(self, name):
        _ran[0] += 1
        time.sleep(3)
        return 0
class _SlowDict:
    @property
    def __dict__(self):
        _ran[0] += 1
        time.sleep(3)
        return {{}}
class _OwnParameters(torch.nn.Linear):
    def parameters(self, recurse=True):
        _ran[0] += 1
        return super().parameters(recurse)
_gone = _Gone()
for _i in range({n}):
    _k = _i % 10
    globals()[f"v{{_i}}"] = (
        _i if _k == 0 else [_i, _i] if _k == 1 else {{"a": _i}} if _k == 2
        else torch.zeros(2) if _k == 3 else _Obj(_i) if _k == 4
        else weakref.proxy(_gone) if _k == 5 else _NoClass(_i) if _k == 6
        else _NoDict(_i) if _k == 7 else _NoAttrs(_i) if _k == 8
        else (_NoIter if _i % 20 == 9 else _OwnValues)([_i, _i] if _i % 20 == 9 else {{"a": _i}})
    )
del _gone  # every proxy above is now dead
lazy_dataset = _Lazy(1000)
slow_attr, slow_dict = _SlowAttr(), _SlowDict()
own_parameters = _OwnParameters(256, 256).to("cuda")
model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(4)]).to("cuda")
gpu_tensors = [torch.zeros(1024, device="cuda") for _ in range(100)]
_ran[0] = 0
"""
FAIL = "import time as _time\n_t0[:] = _time.perf_counter(), _time.process_time()\nx = torch.empty(2**40, dtype=torch.uint8, device='cuda')"


def _shell(real: bool) -> Any:
    from IPython.core.interactiveshell import InteractiveShell

    InteractiveShell.clear_instance()
    sh = InteractiveShell.instance(colors="nocolor")
    sh.run_cell("%load_ext jupyter_gpumem")
    if not real:
        sh.run_cell("%gpumem simulate 4GiB")
    return sh


def time_to_diagnosis(
    n: int, reps: int, real: bool
) -> tuple[list[float], list[float], list[float], Any]:
    """(OOM to diagnosis shown, s; the same in this process's CPU time, s; of which building the
    diagnosis, s; the last HolderSet)."""
    import jupyter_gpumem

    sh = _shell(real)
    sh.run_cell(POPULATE.format(n=n))
    assert len(sh.user_ns) > n
    ext = jupyter_gpumem._extension_for(sh)
    assert ext is not None
    shown: list[float] = []
    cpu: list[float] = []
    original = ext.present

    def timed_present(failed: Any) -> None:
        original(failed)
        shown.append(time.perf_counter())
        cpu.append(time.process_time())

    ext.hook.present = timed_present
    sh.user_ns["_t0"] = [0.0, 0.0]
    out, out_cpu, built = [], [], []
    for i in range(reps):
        with redirect_stdout(io.StringIO()):
            sh.run_cell(FAIL)
        assert len(shown) == i + 1, "no diagnosis was shown"
        out.append(shown[-1] - sh.user_ns["_t0"][0])
        out_cpu.append(cpu[-1] - sh.user_ns["_t0"][1])
        built.append(ext.hook.last_failure.elapsed_s)
    ran = sh.user_ns["_ran"][0]
    assert ran == 0, f"the diagnosis ran the namespace's own code {ran} times"
    holders = ext.hook.last_failure.diagnosis.holders
    sh.run_cell("%unload_ext jupyter_gpumem")
    return out, out_cpu, built, holders


def cell_overhead(reps: int) -> tuple[float, float]:
    from IPython.core.interactiveshell import InteractiveShell

    def bench(sh: Any) -> float:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            sh.run_cell("y = 1 + 1", store_history=False)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    InteractiveShell.clear_instance()
    sh = InteractiveShell.instance(colors="nocolor")
    sh.run_cell("x = [0] * 10")
    bench(sh)
    without = bench(sh)
    sh.run_cell("%load_ext jupyter_gpumem")
    with_ext = bench(sh)
    sh.run_cell("%unload_ext jupyter_gpumem")
    return without, with_ext


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--sizes", default="1000,10000,100000")
    ap.add_argument("--real", action="store_true", help="fail on the real GPU, not a simulated one")
    ap.add_argument("--write", action="store_true", help="append the table to docs/benchmarks.md")
    args = ap.parse_args()
    import IPython
    import torch

    rows = []
    load = [os.getloadavg()[0]]
    for n in [int(s) for s in args.sizes.split(",")]:
        ts, ts_cpu, built, holders = time_to_diagnosis(n, args.reps, args.real)
        q = statistics.quantiles(ts, n=10, method="inclusive")
        rows.append(
            f"| {n:,} | {1000 * statistics.median(ts):.1f} | {1000 * q[-1]:.1f} "
            f"| {1000 * max(ts):.1f} | {1000 * statistics.median(ts_cpu):.1f} "
            f"| {1000 * statistics.median(built):.1f} "
            f"| {holders.cut_short} | {holders.skipped} |"
        )
        print(rows[-1], flush=True)
        load.append(os.getloadavg()[0])
    without, with_ext = cell_overhead(max(args.reps * 40, 400))
    where = "real GPU" if args.real else "simulated GPU"
    text = "\n".join(
        [
            f"### Time from the OOM to the diagnosis on screen ({where})",
            "",
            f"{date.today()}, {platform.processor() or platform.machine()}, Python "
            f"{platform.python_version()}, torch {torch.__version__}, IPython {IPython.__version__}, "
            f"{os.cpu_count()} cores (1-minute load average {min(load):.1f} to {max(load):.1f} "
            f"while it ran), {args.reps} OOMs per size; `benchmarks/diagnosis_latency.py`. "
            "From the failing "
            "allocation to the diagnosis displayed (holders, release, diagnosis, rendering). "
            "A tenth of the namespace is hostile objects (dead `weakref.proxy`, `__class__` and "
            "`__dict__` properties that raise, `__getattribute__` that raises, list and dict "
            "subclasses with their own `__iter__`/`values()`), beside a lazy Mapping "
            "(10 ms per item), objects with a 3 s `__getattr__` and `__dict__`, and a model "
            "with its own `parameters()`: their code ran 0 times. *CPU*: the same span in this "
            "process's CPU time (what a busy machine does not inflate); *building*: the "
            "diagnosis without rendering, wall time; *cut short*: containers not looked into "
            "once the scan's 50 ms budget ran out; *skipped*: objects that could not be read "
            "without running their code.",
            "",
            "| objects in the namespace | median ms | p90 ms | max ms | CPU, median ms "
            "| building, median ms | cut short | skipped |",
            "|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            "A cell that does not fail (`y = 1 + 1`, median of "
            f"{max(args.reps * 40, 400)} runs): {1e6 * without:.0f} µs without the extension, "
            f"{1e6 * with_ext:.0f} µs with it ({1e6 * (with_ext - without):+.0f} µs: the "
            "extension's per-cell event callbacks).",
            "",
        ]
    )
    print(text)
    if args.write:
        _write(ROOT / "docs" / "benchmarks.md", text)


def _write(doc: Path, text: str) -> None:
    """Replace this table's own section (from its heading to the next one), or append it."""
    old = doc.read_text() if doc.exists() else "# Benchmarks\n"
    heading = text.split("\n", 1)[0] + "\n"
    start = old.find(heading)
    if start < 0:
        doc.write_text(old.rstrip("\n") + "\n\n" + text)
        return
    end = old.find("\n### ", start + len(heading))
    rest = old[end + 1 :] if end >= 0 else ""
    doc.write_text(old[:start] + text + ("\n" + rest if rest else ""))


if __name__ == "__main__":
    main()
