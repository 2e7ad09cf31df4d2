"""On a real CUDA GPU (skipped elsewhere): findings §1 reproduced in a real kernel, the readings,
and one real cell each for autocast and move-to-CPU. Run with ``pytest -m gpu -s`` to see numbers.
"""

from __future__ import annotations

import pytest

from tests.conftest import Kernel

pytestmark = pytest.mark.gpu

PINNING_CELL = (
    "def work():\n"
    "    held = torch.empty(8 * 2**30, dtype=torch.uint8, device='cuda')\n"
    "    more = torch.empty(10**15, dtype=torch.uint8, device='cuda')\n"
    "work()"
)
ALLOCATED = "print(torch.cuda.memory_allocated())"


def _allocated(k: Kernel) -> int:
    return int(Kernel.text(k.run(ALLOCATED)).strip())


@pytest.mark.parametrize("with_extension", [False, True])
def test_memory_pinned_by_a_failed_cell(kernel: Kernel, with_extension: bool) -> None:
    k = kernel
    if with_extension:
        k.run("%load_ext jupyter_gpumem")
    k.run("import torch, gc; torch.zeros(1, device='cuda')")
    before = _allocated(k)
    r = k.run(PINNING_CELL)
    assert r["reply"]["ename"] == "OutOfMemoryError"
    after = _allocated(k)
    k.run("gc.collect(); torch.cuda.empty_cache()")
    after_empty = _allocated(k)
    print(
        f"\nwith_extension={with_extension}: before {before / 2**30:.2f} GiB, after the OOM "
        f"{after / 2**30:.2f} GiB, after gc+empty_cache {after_empty / 2**30:.2f} GiB"
    )
    if with_extension:
        assert after == before
        plain = next(o for o in r["outputs"] if o["type"] == "display_data")["data"]["text/plain"]
        assert "Freed 8.00 GiB that the failed cell pinned" in plain
    else:
        assert after_empty >= before + 8 * 2**30, "the baseline: the frame pins the tensor"


def test_real_readings_and_diagnosis_numbers() -> None:
    import torch

    from jupyter_gpumem import find_oom, read_snapshot

    torch.zeros(1, device="cuda")
    snap = read_snapshot()
    assert snap.total_bytes and snap.free_bytes is not None and snap.allocated_bytes is not None
    try:
        torch.empty(10**15, dtype=torch.uint8, device="cuda")
    except torch.OutOfMemoryError as exc:
        found = find_oom(exc)
        assert found is not None
        report = found[1]
        assert report.total_bytes is not None
        assert abs(report.total_bytes - snap.total_bytes) < 0.01 * snap.total_bytes
        assert report.requested_bytes is not None and report.requested_bytes >= 10**15 * 0.99


AUTOCAST_MODEL = (
    "torch.manual_seed(0)\n"
    "model = torch.nn.Sequential(*[torch.nn.Linear({width}, {width}) for _ in range(8)]).cuda()"
)
AUTOCAST_CELL = (
    "torch.manual_seed(0)\n"
    "x = torch.randn({batch}, {width}, device='cuda')\n"
    "loss = model(x).sum()\n"
    "loss.backward()\n"
)


def autocast_against_fp32(shell, capsys, width: int, batch: int, cap: str) -> None:  # type: ignore[no-untyped-def]
    """An 8-layer MLP whose activations dominate (batch = 8 x width): under ``cap`` the fp32 cell
    runs out and `%gpumem retry autocast` fits; then, the cap lifted, the same cell in fp32 gives
    the reference. Its peak is above autocast's, and autocast's loss and gradients match it within
    half precision (a rehearsal's gradients left behind would add a quarter-batch's worth)."""
    import torch

    import jupyter_gpumem

    shell.run_cell("import torch; torch.zeros(1, device='cuda')")
    shell.run_cell(f"%gpumem limit {cap}")
    assert shell.run_cell(AUTOCAST_MODEL.format(width=width)).success
    cell = AUTOCAST_CELL.format(batch=batch, width=width)
    assert not shell.run_cell(cell).success, "fp32 runs out under the cap"
    assert jupyter_gpumem.last_failure(shell) is not None
    torch.cuda.reset_peak_memory_stats()
    capsys.readouterr()
    shell.run_cell("%gpumem retry autocast")
    out = capsys.readouterr().out
    assert "The cell fits under autocast" in out, out
    half = "bfloat16" if "(bfloat16)" in out else "float16"
    autocast_peak = torch.cuda.max_memory_allocated()
    ns = shell.user_ns
    autocast_loss = ns["loss"].float().item()
    autocast_grads = [p.grad.float().cpu() for p in ns["model"].parameters()]

    shell.run_cell("%gpumem limit off")
    shell.run_cell("model.zero_grad(set_to_none=True); x = loss = None; torch.cuda.empty_cache()")
    torch.cuda.reset_peak_memory_stats()
    assert shell.run_cell(cell).success
    fp32_peak = torch.cuda.max_memory_allocated()
    fp32_loss = ns["loss"].item()
    fp32_grads = [p.grad.cpu() for p in ns["model"].parameters()]
    pairs = zip(autocast_grads, fp32_grads, strict=True)
    errors = [float((a - b).norm() / b.norm()) for a, b in pairs]
    print(
        f"\nfp32 peak {fp32_peak / 2**30:.3f} GiB, autocast ({half}) peak "
        f"{autocast_peak / 2**30:.3f} GiB; loss {fp32_loss:.6g} vs {autocast_loss:.6g}; "
        f"gradients' relative error at most {max(errors):.2%}"
    )
    assert autocast_peak < fp32_peak
    # bfloat16 keeps 8 bits of mantissa, float16 11: a relative error of a few 2**-8 at most
    tol = 2e-2 if half == "bfloat16" else 5e-3
    assert abs(autocast_loss - fp32_loss) <= tol * abs(fp32_loss)
    assert max(errors) <= tol, errors


def test_autocast_and_cpu_fixes_on_a_capped_card(shell, capsys) -> None:  # type: ignore[no-untyped-def]
    # fp32 needs ~5.1 GiB (weights 0.5, x and 8 activations of 0.5), autocast ~3.6 GiB: four
    # times what this test's body measured on the simulated card at half the width and batch
    # (2048, 16384; 2-core x86_64, torch 2.13 CPU, bf16): peaks 1.28 and 0.90 GiB (0.97 reserved
    # under a 1.12 GiB cap), loss 6844.9 against 6848, gradients within 0.7%. Was a 3 GiB cap,
    # where autocast needs more than the cap too, and the test only printed the peak.
    autocast_against_fp32(shell, capsys, width=4096, batch=32768, cap="4.5GiB")
    shell.run_cell("%gpumem limit 4.5GiB")
    shell.run_cell("model.zero_grad(set_to_none=True); x = None; loss = None")
    assert not shell.run_cell(AUTOCAST_CELL.format(batch=32768, width=4096)).success
    shell.run_cell("%gpumem retry cpu")
    assert next(shell.user_ns["model"].parameters()).device.type == "cpu"
    shell.run_cell("%gpumem limit off")


def test_reduce_batch_replays_a_real_cards_allocations(shell, capsys) -> None:  # type: ignore[no-untyped-def]
    """torch's allocation history read into a SizeLog on a real card; the replay of a run at a
    prime batch against the reserved peak the card measures at other batches (printed: how close
    the allocator's arithmetic comes on CUDA, with its cache); `%gpumem retry batch` on a card
    capped to 2 GiB, its runs and batch printed."""
    import re

    import torch
    import torch.nn.functional as F

    from jupyter_gpumem import backends
    from jupyter_gpumem.fixes.batch.replay import Replay

    torch.zeros(1, device="cuda")
    with backends.active().record_sizes() as log:
        keep = torch.ones(1000, device="cuda")
    assert log is not None and log.complete and any(s in (4000, 4096) for s in log.sizes())
    del keep

    def run(batch: int) -> tuple[int, object]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(512, 4096), torch.nn.ReLU(), torch.nn.Linear(4096, 10)
        ).cuda()
        opt = torch.optim.Adam(model.parameters())
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        with backends.active().record_sizes() as log:
            for _ in range(2):
                x = torch.randn(batch, 512, device="cuda")
                loss = F.cross_entropy(model(x), torch.randint(0, 10, (batch,), device="cuda"))
                opt.zero_grad()
                loss.backward()
                opt.step()
            del x, loss, opt, model
        return torch.cuda.memory_stats()["reserved_bytes.all.peak"], log

    peak, log = run(1021)
    replay = Replay.from_runs([(1021, peak, log)])  # type: ignore[list-item]
    assert replay is not None
    for batch in (2048, 4099, 8192):
        measured = run(batch)[0]
        predicted = replay.need(batch)
        print(
            f"\nbatch {batch}: measured {measured / 2**20:.0f} MiB, replay {predicted / 2**20:.0f}"
        )
        assert abs(predicted - measured) <= 0.15 * measured

    shell.run_cell("import torch, torch.nn.functional as F; torch.zeros(1, device='cuda')")
    shell.run_cell("%gpumem limit 2GiB")
    shell.run_cell(
        "model = torch.nn.Sequential(torch.nn.Linear(512, 4096), torch.nn.ReLU(),"
        " torch.nn.Linear(4096, 10)).cuda()\nopt = torch.optim.Adam(model.parameters())"
    )
    cell = (
        "batch_size = 262144\nfor step in range(2):\n"
        "    x = torch.randn(batch_size, 512, device='cuda')\n"
        "    loss = F.cross_entropy(model(x), torch.randint(0, 10, (batch_size,), device='cuda'))\n"
        "    opt.zero_grad(); loss.backward(); opt.step()\n"
    )
    assert not shell.run_cell(cell).success
    capsys.readouterr()
    shell.run_cell("%gpumem retry batch")
    out = capsys.readouterr().out
    print(out)
    assert re.search(r"Fits at batch \d+ \(was 262144\)", out), out
    shell.run_cell("%gpumem limit off")


# ---- issue 18: what the simulated GPU cannot show ----------------------------------------------


def test_a_history_the_user_records_survives_record_sizes() -> None:
    import torch

    from jupyter_gpumem import backends

    torch.zeros(1, device="cuda")
    memory = torch.cuda.memory
    memory._record_memory_history(max_entries=100_000)
    try:
        before = torch.ones(4096, device="cuda")
        theirs = memory._snapshot()["device_traces"][torch.cuda.current_device()]
        with backends.active().record_sizes() as log:
            ours = torch.ones(8192, device="cuda")
        assert torch._C._cuda_isHistoryEnabled()
        trace = memory._snapshot()["device_traces"][torch.cuda.current_device()]
        assert trace[: len(theirs)] == theirs  # nothing cleared
        assert log is not None and log.complete and len(log.sizes()) == 1
        del before, ours
    finally:
        memory._record_memory_history(None)


def test_cell_stats_leave_max_memory_allocated_alone(shell, capsys) -> None:  # type: ignore[no-untyped-def]
    shell.run_cell("import torch; torch.cuda.reset_peak_memory_stats()")
    shell.run_cell("big = torch.empty(2**30, dtype=torch.uint8, device='cuda'); del big")
    shell.run_cell("%gpumem cells on")
    shell.run_cell("small = torch.empty(2**20, dtype=torch.uint8, device='cuda')")
    shell.run_cell("seen = torch.cuda.max_memory_allocated()")
    assert shell.user_ns["seen"] >= 2**30
    assert "peak ≤" in capsys.readouterr().out


def test_bf16_is_native_from_compute_capability_8() -> None:
    import torch

    from jupyter_gpumem import backends

    torch.zeros(1, device="cuda")
    major = torch.cuda.get_device_capability()[0]
    assert backends.active().supports_bf16() == (major >= 8)


def test_nvml_reads_the_gpu_torch_uses() -> None:
    import torch

    from jupyter_gpumem import backends

    torch.zeros(1, device="cuda")
    reading = backends.active().read(0)
    torch_uuid = str(torch.cuda.get_device_properties(0).uuid).removeprefix("GPU-")
    assert reading.uuid is None or reading.uuid.removeprefix("GPU-") == torch_uuid


CPU_SETUP = """
import dataclasses, torch
@dataclasses.dataclass
class Trainer:
    model: torch.nn.Module
trainer = Trainer(torch.nn.Sequential(*[torch.nn.Linear(4096, 4096) for _ in range(4)]).cuda())
opt = torch.optim.Adam(trainer.model.parameters())
cache = {"bias": torch.zeros(4096, device="cuda")}
def step(x):
    loss = (trainer.model(x) + cache["bias"]).sum()
    loss.backward(); opt.step(); opt.zero_grad()
step(torch.randn(8, 4096, device="cuda"))
"""


@pytest.mark.parametrize("compiled", [False, True])
def test_move_to_cpu_on_cuda_moves_what_the_cell_reaches(shell, capsys, compiled) -> None:  # type: ignore[no-untyped-def]
    setup = CPU_SETUP + ("step = torch.compile(step)\n" if compiled else "")
    shell.run_cell(setup)
    shell.run_cell("%gpumem limit 1GiB")
    assert not shell.run_cell("x = torch.randn(65536, 4096, device='cuda')\nstep(x)\n").success
    capsys.readouterr()
    shell.run_cell("%gpumem retry cpu")
    out = capsys.readouterr().out
    shell.run_cell("%gpumem limit off")
    assert "The cell ran on the CPU" in out and "same device" not in out, out
    assert next(shell.user_ns["trainer"].model.parameters()).device.type == "cpu"
    assert shell.user_ns["cache"]["bias"].device.type == "cpu"
