"""Reduce batch vs accelerate.find_executable_batch_size on real workloads (needs a CUDA GPU).

bert-large (24 layers, hidden 1024, seq 512, AdamW, random init from a config: no download) from
batch 64, and resnet50 (224 px, SGD with momentum) from batch 512, on a card capped to 11.17 GiB with
set_per_process_memory_fraction. For each: the largest batch that fits (bisection), our search
(jupyter_gpumem.fixes.batch_search with measured peaks, freeing each failed attempt the way the
extension does), and accelerate's decorator; then one real cell each for autocast and move-to-CPU.

    python benchmarks/batch_search.py [--write]

On the GPU machine: see ../shared/gpu/README.md for the command prefix.
"""

from __future__ import annotations

import argparse
import gc
import platform
import sys
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CAP_BYTES = int(11.17 * 2**30)


def _free() -> None:
    import torch

    gc.collect()
    torch.cuda.empty_cache()


def bert_step() -> tuple[Callable[[int], None], int]:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096
    )
    model = BertForSequenceClassification(cfg).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step(b: int) -> None:
        x = torch.randint(0, cfg.vocab_size, (b, 512), device="cuda")
        y = torch.randint(0, 2, (b,), device="cuda")
        loss = model(input_ids=x, labels=y).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, 64


def resnet_step() -> tuple[Callable[[int], None], int]:
    import torch
    import torchvision

    model = torchvision.models.resnet50().cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step(b: int) -> None:
        x = torch.randn(b, 3, 224, 224, device="cuda")
        y = torch.randint(0, 1000, (b,), device="cuda")
        loss_fn(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, 512


def try_step(step: Callable[[int], None], b: int) -> tuple[bool, int, int | None, int | None]:
    """(fit, peak, requested, allocated at failure) for one run at batch b, freed afterwards."""
    import torch

    from jupyter_gpumem.oom import find_oom
    from jupyter_gpumem.release import clear_frames

    torch.cuda.reset_peak_memory_stats()
    try:
        step(b)
        torch.cuda.synchronize()
        return True, torch.cuda.max_memory_allocated(), None, None
    except torch.OutOfMemoryError as exc:
        found = find_oom(exc)
        rep = found[1] if found else None
        clear_frames(exc.__traceback__)
        del exc
        _free()
        return (
            False,
            torch.cuda.max_memory_allocated(),
            rep and rep.requested_bytes,
            rep and rep.allocated_bytes,
        )


def largest_fit(step: Callable[[int], None], start: int) -> int:
    lo, hi = 0, start
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if try_step(step, mid)[0]:
            lo = mid
        else:
            hi = mid
    return lo


def ours(step: Callable[[int], None], start: int) -> tuple[int, int, int, float]:
    import torch

    from jupyter_gpumem.fixes.batch_search import BatchSearch, Observation

    baseline = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    ok, peak, req, alloc = try_step(step, start)
    runs, ooms = 1, int(not ok)
    search = BatchSearch(capacity_bytes=CAP_BYTES, baseline_bytes=baseline, max_batch=start - 1)
    search.observe(Observation(start, ok, peak if ok else None, req, alloc))
    while (b := search.next_batch()) is not None:
        ok, peak, req, alloc = try_step(step, b)
        runs += 1
        ooms += int(not ok)
        search.observe(Observation(b, ok, peak if ok else None, req, alloc))
    return search.best() or 0, runs, ooms, time.perf_counter() - t0


def accelerate_find(step: Callable[[int], None], start: int) -> tuple[int, int, int, float]:
    from accelerate.utils import find_executable_batch_size

    calls: list[int] = []

    @find_executable_batch_size(starting_batch_size=start)
    def inner(batch_size: int) -> int:
        calls.append(batch_size)
        step(batch_size)
        return batch_size

    t0 = time.perf_counter()
    found = inner()
    return found, len(calls), len(calls) - 1, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("needs a CUDA GPU: nothing measured")
        return
    total = torch.cuda.mem_get_info()[1]
    torch.cuda.set_per_process_memory_fraction(CAP_BYTES / total)
    rows = []
    for name, make in (
        ("bert-large, seq 512, AdamW", bert_step),
        ("resnet50, 224 px, SGD+momentum", resnet_step),
    ):
        step, start = make()
        best = largest_fit(step, start)
        _free()
        for tool, fn in (("jupyter_gpumem", ours), ("accelerate", accelerate_find)):
            found, runs, ooms, secs = fn(step, start)
            _free()
            pct = 100 * found / best if best else 0
            rows.append(
                f"| {name} | {tool} | {runs} | {ooms} | {found} | {best} | {pct:.0f}% | {secs:.1f} |"
            )
            print(rows[-1], flush=True)
        del step
        _free()
    text = "\n".join(
        [
            "### Reduce batch on a GPU capped to 11.17 GiB",
            "",
            f"{date.today()}, {torch.cuda.get_device_name()}, torch {torch.__version__}, Python "
            f"{platform.python_version()}; `benchmarks/batch_search.py`.",
            "",
            "| workload | tool | runs | OOMs | batch found | largest that fits | % | seconds |",
            "|---|---|---|---|---|---|---|---|",
            *rows,
            "",
        ]
    )
    print(text)
    if args.write:
        doc = ROOT / "docs" / "benchmarks.md"
        doc.write_text(doc.read_text() + "\n" + text)


if __name__ == "__main__":
    main()
