"""The cost of allocation tracing (``jupyter_gpumem.readings.trace``) on a training step.

A ResNet built from torch.nn (torchvision is not a dependency): on the simulated GPU by default, a
small one (basic blocks [2, 2, 2, 2], width 16, batch 16 of 3x64x64) so a step takes a fraction of
a second on a CPU; with --gpu, ResNet-50 (bottleneck blocks [3, 4, 6, 3], batch 64 of 3x224x224)
on the CUDA card, synchronised after each step. One step is forward, cross-entropy, backward and
an SGD step.

Settings, interleaved in blocks so drift hits all of them alike: tracing off; tracing with stacks
only (``trace.start(modules=False)``); tracing with stacks and the model's modules (the default).
Per setting: the median step time over all blocks and the median of per-block ratios to "off".
Also measured directly: what recording one allocation costs (``torch.empty`` under the simulated
GPU) and what the module hooks add to one module call, with the counts per step, so the overhead
can be read as a sum and not only as a noisy difference.

    python benchmarks/trace_cost.py [--gpu] [--blocks 7] [--steps 5] [--write]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SETTINGS = ("off", "stacks", "stacks + modules")


def resnet(torch: Any, bottleneck: bool, layers: list[int], width: int, classes: int) -> Any:
    nn = torch.nn

    class Block(nn.Module):
        expansion = 4 if bottleneck else 1

        def __init__(self, cin: int, mid: int, stride: int) -> None:
            super().__init__()
            cout = mid * self.expansion
            if bottleneck:
                self.body = nn.Sequential(
                    nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
                    nn.Conv2d(mid, mid, 3, stride, 1, bias=False), nn.BatchNorm2d(mid),
                    nn.ReLU(inplace=True),
                    nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout),
                )  # fmt: skip
            else:
                self.body = nn.Sequential(
                    nn.Conv2d(cin, mid, 3, stride, 1, bias=False), nn.BatchNorm2d(mid),
                    nn.ReLU(inplace=True),
                    nn.Conv2d(mid, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout),
                )  # fmt: skip
            self.down = None
            if stride != 1 or cin != cout:
                self.down = nn.Sequential(
                    nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
                )
            self.relu = nn.ReLU(inplace=True)

        def forward(self, x: Any) -> Any:
            skip = x if self.down is None else self.down(x)
            return self.relu(self.body(x) + skip)

    stages: list[Any] = []
    cin = width
    for i, n in enumerate(layers):
        mid = width * 2**i
        blocks = []
        for j in range(n):
            blocks.append(Block(cin, mid, 2 if (j == 0 and i > 0) else 1))
            cin = mid * Block.expansion
        stages.append(nn.Sequential(*blocks))
    return nn.Sequential(
        nn.Conv2d(3, width, 7, 2, 3, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, 1),
        *stages,
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(cin, classes),
    )


def setup(gpu: bool) -> dict[str, Any]:
    import torch

    torch.manual_seed(0)
    if gpu:
        model = resnet(torch, True, [3, 4, 6, 3], 64, 1000).cuda()
        batch, size, classes = 64, 224, 1000
    else:
        from jupyter_gpumem.backends import simulated

        torch.set_num_threads(1)
        simulated.start(16 << 30)
        model = resnet(torch, False, [2, 2, 2, 2], 16, 10).cuda()
        batch, size, classes = 16, 64, 10
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, size, size, device="cuda")
    y = torch.randint(0, classes, (batch,), device="cuda")
    return {"torch": torch, "model": model, "opt": opt, "x": x, "y": y, "gpu": gpu}


def step(env: dict[str, Any]) -> None:
    torch = env["torch"]
    env["opt"].zero_grad()
    loss = torch.nn.functional.cross_entropy(env["model"](env["x"]), env["y"])
    loss.backward()
    env["opt"].step()
    if env["gpu"]:
        torch.cuda.synchronize()


def timed_steps(env: dict[str, Any], setting: str, steps: int) -> list[float]:
    from jupyter_gpumem.readings import trace

    if setting != "off":
        trace.start(modules=setting == "stacks + modules")
    try:
        step(env)  # warm: the optimizer's state, the recorder's stacks
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            step(env)
            times.append(time.perf_counter() - t0)
        return times
    finally:
        trace.stop()


def counts(env: dict[str, Any]) -> tuple[int, int]:
    """(allocations, module calls) in one step."""
    from jupyter_gpumem.backends import simulated

    torch = env["torch"]
    calls = 0

    def count(_m: Any, _a: Any) -> None:
        nonlocal calls
        calls += 1

    handle = torch.nn.modules.module.register_module_forward_pre_hook(count)

    class Recorder:
        allocs = 0

        def alloc(self, new: dict[int, Any]) -> None:
            Recorder.allocs += len(new)

        def free(self, key: int, nbytes: int) -> None: ...

        def oom(self, size: int, free: int) -> None: ...

    try:
        if env["gpu"]:
            before = torch.cuda.memory_stats().get("allocation.all.allocated", 0)
            step(env)
            allocs = torch.cuda.memory_stats().get("allocation.all.allocated", 0) - before
        else:
            simulated.record_history(Recorder())
            step(env)
            allocs = Recorder.allocs
    finally:
        handle.remove()
        simulated.record_history(None)
    return allocs, calls


def per_call_costs(env: dict[str, Any], n: int = 20000) -> tuple[float | None, float]:
    """(µs to record one allocation on the simulated GPU, µs the hooks add to one module call)."""
    from jupyter_gpumem.readings import trace

    torch = env["torch"]

    def best(fn: Any) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t0) / n

    def added(fn: Any, **start: Any) -> float:
        """µs tracing adds to fn: the fastest of 5 alternating runs each way (drift hits both)."""
        plain, traced = [], []
        for _ in range(5):
            plain.append(best(fn))
            trace.start(**start)
            traced.append(best(fn))
            trace.stop()
        return (min(traced) - min(plain)) * 1e6

    alloc = None
    if not env["gpu"]:
        alloc = added(lambda: torch.empty(16, device="cuda"), modules=False)
    ident, x = torch.nn.Identity(), env["x"]
    return alloc, added(lambda: ident(x), modules=True)


def run(gpu: bool, blocks: int, steps: int) -> str:
    import IPython
    import torch

    env = setup(gpu)
    per: dict[str, list[float]] = {s: [] for s in SETTINGS}
    ratios: dict[str, list[float]] = {s: [] for s in SETTINGS}
    for b in range(blocks):
        order = SETTINGS if b % 2 == 0 else tuple(reversed(SETTINGS))
        medians = {}
        for setting in order:
            times = timed_steps(env, setting, steps)
            per[setting].extend(times)
            medians[setting] = statistics.median(times)
        for setting in SETTINGS:
            ratios[setting].append(medians[setting] / medians["off"] - 1)
    allocs, calls = counts(env)
    alloc_us, hook_us = per_call_costs(env)
    off = statistics.median(per["off"])
    if gpu:
        machine = f"{torch.cuda.get_device_name()}, CUDA {torch.version.cuda}"
        workload = "ResNet-50 (bottleneck [3,4,6,3]) batch 64 of 3x224x224, SGD, synchronised"
    else:
        machine = f"CPU ({platform.machine()}, 1 torch thread), simulated GPU"
        workload = "ResNet (basic [2,2,2,2], width 16) batch 16 of 3x64x64, SGD"
    lines = [
        f"{date.today().isoformat()}, {machine}; {workload}; torch {torch.__version__}, "
        f"Python {platform.python_version()}, IPython {IPython.__version__}; {blocks} interleaved "
        f"blocks of {steps} steps per setting; `benchmarks/trace_cost.py{' --gpu' if gpu else ''}`.",
        "",
        "| tracing | step ms (median) | vs off | median of per-block ratios |",
        "|---|---|---|---|",
    ]
    for setting in SETTINGS:
        med = statistics.median(per[setting])
        lines.append(
            f"| {setting} | {med * 1e3:.1f} | {(med / off - 1) * 100:+.2f}% | "
            f"{statistics.median(ratios[setting]) * 100:+.2f}% |"
        )
    lines.append("")
    parts = [f"One step makes {allocs} allocations and {calls} module calls."]
    if alloc_us is not None:
        parts.append(
            f"Recording one allocation costs {alloc_us:.1f} µs "
            f"({allocs * alloc_us / 1e3:.2f} ms a step, {allocs * alloc_us / 1e3 / (off * 1e3) * 100:.2f}% of it)."
        )
    parts.append(
        f"The module hooks add {hook_us:.1f} µs to a module call "
        f"({calls * hook_us / 1e3:.2f} ms a step, {calls * hook_us / 1e3 / (off * 1e3) * 100:.2f}% of it)."
    )
    lines.append(" ".join(parts))
    return "\n".join(lines)


def write(table: str, gpu: bool) -> None:
    """Replace this benchmark's table for the device kind between its markers."""
    kind = "gpu" if gpu else "cpu"
    start, end = f"<!-- trace_cost {kind} -->", f"<!-- /trace_cost {kind} -->"
    path = ROOT / "docs" / "benchmarks.md"
    text = path.read_text(encoding="utf-8")
    if start not in text or end not in text:
        raise SystemExit(f"no {start} ... {end} markers in {path}")
    head, rest = text.split(start, 1)
    _old, tail = rest.split(end, 1)
    path.write_text(f"{head}{start}\n{table}\n{end}{tail}", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true", help="ResNet-50 on the CUDA card")
    parser.add_argument("--blocks", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--write", action="store_true", help="put the table in docs/benchmarks.md")
    args = parser.parse_args()
    table = run(args.gpu, args.blocks, args.steps)
    print(table)
    if args.write:
        write(table, args.gpu)


if __name__ == "__main__":
    main()
