"""The live gauge's cost to a training loop: steps per second with the gauge off, at 1 Hz and at
10 Hz, as ratios measured in one run (blocks interleaved, so drift hits every setting alike).

On the CPU: a small MLP (runs anywhere, the simulated GPU's readings). On a CUDA GPU (--gpu):
resnet50 at batch 64, with NVML and allocator readings.

    python benchmarks/gauge_overhead.py [--gpu] [--blocks 8] [--write]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_step(gpu: bool):  # type: ignore[no-untyped-def]
    import torch

    if gpu:
        import torchvision

        model = torchvision.models.resnet50().cuda()
        x = torch.randn(64, 3, 224, 224, device="cuda")
        y = torch.randint(0, 1000, (64,), device="cuda")
    else:
        torch.set_num_threads(1)
        model = torch.nn.Sequential(
            torch.nn.Linear(512, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 10)
        )
        x = torch.randn(64, 512)
        y = torch.randint(0, 10, (64,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step() -> None:
        loss_fn(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if gpu:
            torch.cuda.synchronize()

    return step


def steps_per_s(step, seconds: float) -> float:  # type: ignore[no-untyped-def]
    n = 0
    t0 = time.perf_counter()
    while (t := time.perf_counter()) - t0 < seconds:
        step()
        n += 1
    return n / (t - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=4.0, help="per block and setting")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    import plotly
    import torch

    from jupyter_gpumem.backends import simulated
    from jupyter_gpumem.ui.gauge import Gauge

    if not args.gpu:
        simulated.start(4 << 30)  # the gauge reads the simulated GPU: allocator + readings path
    step = make_step(args.gpu)
    for _ in range(20):
        step()
    rates: dict[str, list[float]] = {"off": [], "1 Hz": [], "10 Hz": []}
    updates = {"1 Hz": 0, "10 Hz": 0}
    for _ in range(args.blocks):
        for setting in rates:
            gauge = None
            if setting != "off":
                gauge = Gauge(interval=1.0 if setting == "1 Hz" else 0.1).start()
            rates[setting].append(steps_per_s(step, args.seconds))
            if gauge is not None:
                gauge.stop()
                updates[setting] += gauge.updates
    simulated.stop()
    base = statistics.median(rates["off"])
    lines = []
    for setting, rs in rates.items():
        med = statistics.median(rs)
        ratios = [r / o for r, o in zip(rs, rates["off"], strict=True)]
        lines.append(
            f"| {setting} | {med:.1f} | {100 * (med / base - 1):+.2f}% | "
            f"{100 * (statistics.median(ratios) - 1):+.2f}% |"
        )
        print(lines[-1], flush=True)
    where = (
        f"{torch.cuda.get_device_name()}, resnet50 batch 64"
        if args.gpu
        else f"CPU ({platform.machine()}, 1 torch thread), MLP 512-1024-10 batch 64, simulated GPU"
    )
    text = "\n".join(
        [
            f"### Gauge overhead on a training loop ({'GPU' if args.gpu else 'CPU'})",
            "",
            f"{date.today()}, {where}; torch {torch.__version__}, plotly {plotly.__version__}, "
            f"Python {platform.python_version()}; {args.blocks} interleaved blocks of "
            f"{args.seconds:.0f} s per setting; `benchmarks/gauge_overhead.py`.",
            "",
            "| gauge | steps/s (median) | vs off | median of per-block ratios |",
            "|---|---|---|---|",
            *lines,
            "",
        ]
    )
    print(text)
    if args.write:
        doc = ROOT / "docs" / "benchmarks.md"
        doc.write_text(doc.read_text() + "\n" + text)


if __name__ == "__main__":
    main()
