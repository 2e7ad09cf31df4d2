"""Time from an OOM to the diagnosis on screen, with 1k, 10k and 100k objects in the namespace,
and the cost the extension adds to a cell that does not fail.

Runs anywhere: a real IPython InteractiveShell on the simulated GPU (on a real GPU machine, pass
--real to fail on the card instead). Prints a Markdown table; --write appends it to
docs/benchmarks.md.

    python benchmarks/diagnosis_latency.py [--reps 15] [--write]
"""

from __future__ import annotations

import argparse
import io
import platform
import statistics
import sys
import time
from contextlib import redirect_stdout
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

POPULATE = """\
import torch
class _Obj:
    def __init__(self, i):
        self.i = i
        self.name = str(i)
        self.t = torch.zeros(2)
for _i in range({n}):
    _k = _i % 5
    globals()[f"v{{_i}}"] = (
        _i if _k == 0 else [_i, _i] if _k == 1 else {{"a": _i}} if _k == 2
        else torch.zeros(2) if _k == 3 else _Obj(_i)
    )
model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(4)]).to("cuda")
gpu_tensors = [torch.zeros(1024, device="cuda") for _ in range(100)]
"""
FAIL = "import time as _time\n_t0[0] = _time.perf_counter()\nx = torch.empty(2**40, dtype=torch.uint8, device='cuda')"


def _shell(real: bool):  # type: ignore[no-untyped-def]
    from IPython.core.interactiveshell import InteractiveShell

    InteractiveShell.clear_instance()
    sh = InteractiveShell.instance(colors="nocolor")
    sh.run_cell("%load_ext jupyter_gpumem")
    if not real:
        sh.run_cell("%gpumem simulate 4GiB")
    return sh


def time_to_diagnosis(n: int, reps: int, real: bool) -> list[float]:
    import jupyter_gpumem

    sh = _shell(real)
    sh.run_cell(POPULATE.format(n=n))
    assert len(sh.user_ns) > n
    ext = jupyter_gpumem._extension_for(sh)
    shown: list[float] = []
    original = ext.present

    def timed_present(failed):  # type: ignore[no-untyped-def]
        original(failed)
        shown.append(time.perf_counter())

    ext.hook.present = timed_present
    sh.user_ns["_t0"] = [0.0]
    out = []
    for _ in range(reps):
        with redirect_stdout(io.StringIO()):
            sh.run_cell(FAIL)
        out.append(shown[-1] - sh.user_ns["_t0"][0])
    sh.run_cell("%unload_ext jupyter_gpumem")
    return out


def cell_overhead(reps: int) -> tuple[float, float]:
    from IPython.core.interactiveshell import InteractiveShell

    def bench(sh) -> float:  # type: ignore[no-untyped-def]
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
    for n in [int(s) for s in args.sizes.split(",")]:
        ts = time_to_diagnosis(n, args.reps, args.real)
        q = statistics.quantiles(ts, n=10)
        rows.append(
            f"| {n:,} | {1000 * statistics.median(ts):.1f} | {1000 * q[-1]:.1f} | {1000 * max(ts):.1f} |"
        )
        print(rows[-1], flush=True)
    without, with_ext = cell_overhead(max(args.reps * 40, 400))
    where = "real GPU" if args.real else "simulated GPU"
    text = "\n".join(
        [
            f"### Time from the OOM to the diagnosis on screen ({where})",
            "",
            f"{date.today()}, {platform.processor() or platform.machine()}, Python "
            f"{platform.python_version()}, torch {torch.__version__}, IPython {IPython.__version__}, "
            f"{args.reps} OOMs per size; `benchmarks/diagnosis_latency.py`. From the failing "
            "allocation to the diagnosis displayed (holders, release, diagnosis, rendering).",
            "",
            "| objects in the namespace | median ms | p90 ms | max ms |",
            "|---|---|---|---|",
            *rows,
            "",
            "A cell that does not fail (`y = 1 + 1`, median of "
            f"{max(args.reps * 40, 400)} runs): {1e6 * without:.0f} µs without the extension, "
            f"{1e6 * with_ext:.0f} µs with it ({1e6 * (with_ext - without):+.0f} µs: two O(1) event "
            "callbacks; within run-to-run noise).",
            "",
        ]
    )
    print(text)
    if args.write:
        doc = ROOT / "docs" / "benchmarks.md"
        doc.write_text(doc.read_text() + "\n" + text if doc.exists() else "# Benchmarks\n\n" + text)


if __name__ == "__main__":
    main()
