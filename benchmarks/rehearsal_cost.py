"""The cost of a rehearsal's undo: the time and host memory of the snapshot a fix takes before it
re-runs a cell (``Transaction``), and of ``rollback()`` after each probe, against the model's size.

A transformer encoder (about 10, 100 and 500 MiB of fp32 parameters, fixed seed) with AdamW whose
state exists after one real step, a StepLR scheduler, ``.grad`` from that step, a registered
buffer and a few Python containers, in a namespace the cell reads. Per size and repeat: take the
snapshot; roll back with nothing changed; run one training step (new batch from the RNG,
zero_grad, backward, AdamW step, scheduler step, history append); roll back, and check that
parameters, buffers, grads, Adam state, scheduler, containers and RNG are back (torch.equal), and
that the step's loss is the same in every repeat. Fails loudly if not.

On the simulated GPU by default (runs anywhere); on a CUDA GPU with --gpu (the same code, the
model on the card, the snapshot copied to host memory). Prints a Markdown table; --write puts it
in docs/benchmarks.md (replacing an earlier table of this benchmark for the same device kind).

    python benchmarks/rehearsal_cost.py [--gpu] [--repeats 5] [--sizes 10,100,500] [--write]
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import platform
import random
import statistics
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MiB = 1 << 20
VOCAB = 1000
BATCH, SEQ = 2, 16  # 32 tokens a step: the step is not what is measured
# target MiB of parameters -> (d_model, layers); 12*d^2 + 13*d per layer, plus embedding and head
SHAPES = {10: (256, 3), 100: (512, 8), 500: (1024, 10)}


def rss_bytes() -> int | None:
    """Resident set size of this process: psutil if installed, else /proc/self/status."""
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        pass
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc), so the RSS added by a snapshot is its own
    and not memory malloc kept from an earlier repeat."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build(target_mib: int, device: str) -> dict[str, Any]:
    """The notebook's namespace after one training step: model, optimizer, scheduler, containers."""
    import torch

    d, layers = SHAPES.get(target_mib, (max(64, int((target_mib * MiB / 48 / 10) ** 0.5)), 10))

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(VOCAB, d)
            self.register_buffer("pos", torch.randn(SEQ, d) * 0.02)
            layer = torch.nn.TransformerEncoderLayer(
                d, max(1, d // 64), 4 * d, dropout=0.0, batch_first=True
            )
            self.encoder = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
            self.head = torch.nn.Linear(d, VOCAB)

        def forward(self, tokens: Any) -> Any:
            return self.head(self.encoder(self.emb(tokens) + self.pos))

    torch.manual_seed(0)
    random.seed(0)
    model = Encoder().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)
    ns: dict[str, Any] = {
        "torch": torch,
        "model": model,
        "opt": opt,
        "sched": sched,
        "loss_fn": torch.nn.CrossEntropyLoss(),
        "history": [],
        "cfg": {"lr": 1e-4, "step": 0, "device": device},
        "device": device,
    }
    train_step(ns)
    return ns


def train_step(ns: dict[str, Any]) -> float:
    """What a rehearsal of a training cell changes: everything."""
    import torch

    model, opt, sched = ns["model"], ns["opt"], ns["sched"]
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), device=ns["device"])
    opt.zero_grad()  # set_to_none: backward makes new .grad tensors
    loss = ns["loss_fn"](model(tokens).flatten(0, 1), tokens.flatten())
    loss.backward()
    opt.step()
    sched.step()
    ns["history"].append(float(loss.detach()))
    ns["cfg"]["step"] += 1
    ns["last_loss"] = loss.detach()  # a new name the rollback must remove
    return float(loss.detach())


def reference(ns: dict[str, Any]) -> dict[str, Any]:
    """An independent copy of what the rollback must put back (not the package's own)."""
    import torch

    model, opt = ns["model"], ns["opt"]
    return {
        "names": set(ns),
        "params": [(p, p.detach().clone()) for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()],
        "buffers": [(b, b.detach().clone()) for b in model.buffers()],
        "opt_state": {
            id(p): {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()}
            for p, s in opt.state.items()
        },
        "lrs": [g["lr"] for g in opt.param_groups],
        "group_params": [list(g["params"]) for g in opt.param_groups],
        "sched": copy.deepcopy(ns["sched"].state_dict()),
        "history": list(ns["history"]),
        "cfg": dict(ns["cfg"]),
        "rng": (torch.get_rng_state(), random.getstate()),
    }


def check(ns: dict[str, Any], ref: dict[str, Any], what: str) -> None:
    """Fail loudly unless the notebook is exactly as in ``ref``."""
    import torch

    def fail(detail: str) -> None:
        raise SystemExit(f"rollback is wrong ({what}): {detail}")

    model, opt = ns["model"], ns["opt"]
    if set(ns) != ref["names"]:
        fail(f"names differ: {sorted(set(ns) ^ ref['names'])}")
    params = list(model.parameters())
    if len(params) != len(ref["params"]):
        fail("the model has a different number of parameters")
    for i, (p, (p0, saved)) in enumerate(zip(params, ref["params"], strict=True)):
        if p is not p0:
            fail(f"parameter {i} is a new object")
        if not torch.equal(p.detach(), saved):
            fail(f"parameter {i} has other values")
        g0 = ref["grads"][i]
        if (p.grad is None) != (g0 is None) or (g0 is not None and not torch.equal(p.grad, g0)):
            fail(f"the .grad of parameter {i} differs")
    for i, (b, (b0, saved)) in enumerate(zip(model.buffers(), ref["buffers"], strict=True)):
        if b is not b0 or not torch.equal(b, saved):
            fail(f"buffer {i} differs")
    if {id(p) for p in opt.state} != set(ref["opt_state"]):
        fail("the optimizer has state for other parameters")
    for p, s in opt.state.items():
        saved_state = ref["opt_state"][id(p)]
        if set(s) != set(saved_state):
            fail(f"optimizer state keys {sorted(s)} != {sorted(saved_state)}")
        for k, v in s.items():
            v0 = saved_state[k]
            if torch.is_tensor(v) != torch.is_tensor(v0):
                fail(f"optimizer state {k!r} changed kind")
            if (torch.is_tensor(v) and not torch.equal(v, v0)) or (
                not torch.is_tensor(v) and v != v0
            ):
                fail(f"optimizer state {k!r} differs")
    if [g["lr"] for g in opt.param_groups] != ref["lrs"]:
        fail("learning rates differ")
    for g, ps in zip(opt.param_groups, ref["group_params"], strict=True):
        if len(g["params"]) != len(ps) or any(
            a is not b for a, b in zip(g["params"], ps, strict=False)
        ):
            fail("the optimizer's param groups hold other tensors")
    if ns["sched"].state_dict() != ref["sched"]:
        fail("the scheduler's state differs")
    if ns["history"] != ref["history"] or ns["cfg"] != ref["cfg"]:
        fail("a Python container differs")
    rng_torch, rng_py = ref["rng"]
    if not torch.equal(torch.get_rng_state(), rng_torch) or random.getstate() != rng_py:
        fail("the random generators differ")


class TimedGC:
    """Stands in for the gc module inside jupyter_gpumem.rescue.transaction: a rollback's collect()
    timed apart from its copies."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def collect(self, *args: Any) -> int:
        t0 = time.perf_counter()
        try:
            return gc.collect(*args)
        finally:
            self.seconds += time.perf_counter() - t0

    def __getattr__(self, name: str) -> Any:
        return getattr(gc, name)


def measure(target_mib: int, repeats: int, gpu: bool) -> dict[str, Any]:
    import torch

    from jupyter_gpumem.backends import simulated
    from jupyter_gpumem.rescue import transaction
    from jupyter_gpumem.rescue.transaction import Transaction

    device = "cuda"  # the simulated GPU runs the same code on the CPU

    def sync() -> None:
        if gpu:
            torch.cuda.synchronize()

    def gpu_allocated() -> int:
        if gpu:
            return int(torch.cuda.memory_allocated())
        sim = simulated.current()
        assert sim is not None
        return sim.allocated_bytes

    ns = build(target_mib, device)
    names = [n for n in ns if n != "torch"] + ["torch"]
    model = ns["model"]
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    ref = reference(ns)
    out: dict[str, Any] = {
        "target": target_mib,
        "params": sum(p.numel() for p in model.parameters()),
        "param_bytes": param_bytes,
        "tensors": len(list(model.parameters())) + len(list(model.buffers())),
        "snap": [],
        "noop": [],
        "changed": [],
        "gc": [],
        "rss": [],
        "losses": [],
    }
    timed_gc = TimedGC()
    transaction.gc = timed_gc  # type: ignore[assignment]
    try:
        for _ in range(repeats):
            trim_heap()
            sync()
            before_gpu, before_rss = gpu_allocated(), rss_bytes()
            t0 = time.perf_counter()
            txn = Transaction(ns, names)
            sync()
            t1 = time.perf_counter()
            after_rss = rss_bytes()
            if gpu_allocated() != before_gpu:
                raise SystemExit(
                    f"the snapshot changed GPU allocated memory: {before_gpu} -> {gpu_allocated()}"
                )
            out["snap"].append(t1 - t0)
            out["bytes"] = txn.snapshot.bytes
            if before_rss is not None and after_rss is not None:
                out["rss"].append(after_rss - before_rss)

            t0 = time.perf_counter()
            txn.rollback()
            sync()
            out["noop"].append(time.perf_counter() - t0)
            check(ns, ref, "nothing changed")

            out["losses"].append(train_step(ns))
            sync()
            timed_gc.seconds = 0.0
            t0 = time.perf_counter()
            txn.rollback()
            sync()
            out["changed"].append(time.perf_counter() - t0)
            out["gc"].append(timed_gc.seconds)
            check(ns, ref, "after a training step")
            if txn.problems:
                raise SystemExit(f"rollback reported problems: {txn.problems}")
            if gpu_allocated() != before_gpu:
                raise SystemExit(
                    f"GPU allocated after the rollback {gpu_allocated()} != before {before_gpu}"
                )
            del txn
    finally:
        transaction.gc = gc
    if len(set(out["losses"])) != 1:
        raise SystemExit(f"the rolled-back step gave different losses: {out['losses']}")
    ns.clear()
    gc.collect()
    return out


def row(r: dict[str, Any]) -> str:
    med = statistics.median
    snap, noop, changed = med(r["snap"]), med(r["noop"]), med(r["changed"])
    copies = med([c - g for c, g in zip(r["changed"], r["gc"], strict=True)])
    nbytes, pbytes = r["bytes"], r["param_bytes"]
    rss = f"{med(r['rss']) / MiB:,.0f}" if r["rss"] else "n/a"
    return (
        f"| {r['params'] / 1e6:.1f} M ({pbytes / MiB:,.0f} MiB, {r['tensors']} tensors) "
        f"| {nbytes / MiB:,.0f} ({nbytes / pbytes:.2f}×) | {rss} "
        f"| {1000 * snap:,.0f} ({nbytes / snap / 1e9:.2f} GB/s) "
        f"| {1000 * changed:,.0f} | {1000 * copies:,.0f} ({nbytes / copies / 1e9:.2f} GB/s) "
        f"| {1000 * noop:,.1f} |"
    )


def gc_cost(repeats: int = 5) -> tuple[float, int]:
    """Median time of a full gc.collect() in this process, and the objects it tracks: what a
    rollback pays even when nothing changed."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        gc.collect()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), len(gc.get_objects())


def write_section(text: str, heading: str) -> None:
    """Replace this benchmark's section for the same device kind, or append it."""
    doc = ROOT / "docs" / "benchmarks.md"
    old = doc.read_text() if doc.exists() else "# Benchmarks\n"
    lines = old.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == heading), None)
    if start is None:
        doc.write_text(old.rstrip("\n") + "\n\n" + text)
        return
    end = next(
        (i for i in range(start + 1, len(lines)) if lines[i].startswith(("# ", "## ", "### "))),
        len(lines),
    )
    rest = "".join(lines[end:])
    doc.write_text("".join(lines[:start]) + text + ("\n" + rest if rest else ""))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpu", action="store_true", help="on the CUDA GPU, not a simulated one")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sizes", default="10,100,500", help="MiB of parameters, comma-separated")
    ap.add_argument("--write", action="store_true", help="put the table in docs/benchmarks.md")
    args = ap.parse_args()
    import torch

    import jupyter_gpumem
    from jupyter_gpumem.backends import simulated

    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu: torch sees no CUDA device")
    if not args.gpu:
        # one thread: on a small shared machine a second OpenMP thread that is not scheduled
        # makes every copy wait for it (10x slower copies on the 2-core VM)
        torch.set_num_threads(1)
        simulated.start(64 << 30)  # counting only: the card never runs out here
    rows = []
    try:
        for size in [int(s) for s in args.sizes.split(",")]:
            r = measure(size, args.repeats, args.gpu)
            rows.append(row(r))
            print(rows[-1], flush=True)
    finally:
        simulated.stop()
    gc_s, gc_objects = gc_cost()
    where = (
        f"{torch.cuda.get_device_name()}, host {cpu_name()}"
        if args.gpu
        else f"simulated GPU on the CPU ({cpu_name()}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch thread{'s' if torch.get_num_threads() > 1 else ''})"
    )
    heading = f"### Cost of a rehearsal: snapshot and rollback ({'GPU' if args.gpu else 'CPU'})"
    text = "\n".join(
        [
            heading,
            "",
            f"{date.today()}, {where}; Python {platform.python_version()}, torch "
            f"{torch.__version__}, jupyter_gpumem {jupyter_gpumem.__version__}; median of "
            f"{args.repeats} repeats; `benchmarks/rehearsal_cost.py"
            f"{' --gpu' if args.gpu else ''}`. A transformer encoder (fp32, seed 0) after one "
            "AdamW step (so `.grad` and Adam's two moments exist), a StepLR scheduler and a few "
            "Python containers, all read by the cell. *Snapshot*: `Transaction(ns, names)`, "
            "copying into host memory; *rollback after a step*: `txn.rollback()` after one "
            "training step changed parameters, grads, Adam state, the scheduler, the containers "
            "and the RNG; *rollback, nothing changed*: right after the snapshot. GB/s is snapshot "
            "bytes over time; a rollback's own `gc.collect()` is timed apart (*without gc*). The snapshot writes into newly allocated host memory (heap "
            "trimmed before each repeat, so *RSS added* is the snapshot's own), the rollback into "
            "tensors that exist. After every rollback the script checks with `torch.equal` that "
            "all of it is back, and that the next step's loss is the same in every repeat.",
            "",
            "| parameters | snapshot MiB (× parameter bytes) | RSS added, MiB | snapshot ms "
            "| rollback after a step, ms | of which without gc, ms "
            "| rollback, nothing changed, ms |",
            "|---|---|---|---|---|---|---|",
            *rows,
            "",
            f"Every rollback ends with a full `gc.collect()`: {1000 * gc_s:.0f} ms in this "
            f"process, {gc_objects:,} objects tracked (load average {os.getloadavg()[0]:.1f} on "
            f"{os.cpu_count()} cores at the end of the run). It is most of a rollback when "
            "nothing changed, and it grows with the notebook's objects, not with the model.",
            "",
        ]
    )
    if not args.gpu:
        text += (
            "\nNot measured on a GPU: none was lent to the session that wrote this table. On a "
            "CUDA machine, `python benchmarks/rehearsal_cost.py --gpu --write` measures the same "
            "(device-to-host copies for the snapshot, host-to-device for the rollback) and adds "
            "its own table.\n"
        )
    print(text)
    if args.write:
        write_section(text, heading)


if __name__ == "__main__":
    main()
