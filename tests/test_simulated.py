"""The simulated GPU, with real torch: its OOMs, its counting, its redirects, its torch.cuda."""

from __future__ import annotations

import concurrent.futures
import gc
import os
import re
import threading
from collections.abc import Iterator
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack  # noqa: E402
from torch.utils._python_dispatch import (  # noqa: E402
    TorchDispatchMode,
    _get_current_dispatch_mode_stack,
)

from jupyter_gpumem.backends import cuda_to_cpu, simulated  # noqa: E402

MiB, GiB = 1 << 20, 1 << 30
UNITS = {"bytes": 1, "KiB": 1 << 10, "MiB": MiB, "GiB": GiB}
SIZE = r"(\d+(?:\.\d+)?) (bytes|KiB|MiB|GiB)"

# torch 2.11.0+cu130 on an H100, as str(exc) gave them (shared/data/oom_messages/)
REAL_PLAIN = (
    "CUDA out of memory. Tried to allocate 400.00 GiB. GPU 0 has a total capacity of 79.18 GiB of "
    "which 78.66 GiB is free. Including non-PyTorch memory, this process has 518.00 MiB memory in "
    "use. Of the allocated memory 0 bytes is allocated by PyTorch, and 0 bytes is reserved by "
    "PyTorch but unallocated. If reserved but unallocated memory is large try setting "
    "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  See documentation "
    "for Memory Management  (https://docs.pytorch.org/docs/stable/notes/cuda.html"
    "#optimizing-memory-usage-with-pytorch-cuda-alloc-conf)"
)
REAL_CAPPED = REAL_PLAIN.replace(
    "518.00 MiB memory in use. ", "8.51 GiB memory in use. 15.84 GiB allowed; "
)
REAL_OTHER_PROCESS_PREFIX = (
    "CUDA out of memory. Tried to allocate 9313.23 GiB. GPU 0 has a total capacity of 79.18 GiB of "
    "which 57.15 GiB is free. Process 408 has 1.51 GiB memory in use. Including non-PyTorch "
    "memory, this process has 20.51 GiB memory in use. Of the allocated memory 20.00 GiB is "
)

OOM = re.compile(
    rf"CUDA out of memory\. Tried to allocate {SIZE}\. GPU (\d+) has a total capacity of {SIZE} of "
    rf"which {SIZE} is free\. (?:Process \d+ has {SIZE} memory in use\. )*Including non-PyTorch "
    rf"memory, this process has {SIZE} memory in use\. (?:{SIZE} allowed; )?Of the allocated "
    rf"memory {SIZE} is allocated by PyTorch, and {SIZE} is reserved by PyTorch but unallocated\."
)


def shape_of(message: str) -> str:
    """The message with its numbers taken out: what must match torch's wording exactly."""
    return re.sub(r"Process \d+", "Process N", re.sub(SIZE, "SIZE", message))


def parse(message: str) -> dict[str, int | None]:
    m = OOM.match(message)
    assert m, message
    g = m.groups()

    def size(i: int) -> int | None:
        return None if g[i] is None else int(float(g[i]) * UNITS[g[i + 1]])

    return {
        "requested": size(0),
        "device": int(g[2]),
        "total": size(3),
        "free": size(5),
        "in_use": size(9),
        "allowed": size(11),
        "allocated": size(13),
        "unallocated": size(15),
    }


def close(printed: int | None, actual: int) -> bool:
    """Equal to the two decimals torch prints."""
    assert printed is not None
    unit = next(u for u in (GiB, MiB, 1 << 10, 1) if actual > u or u == 1)
    return abs(printed - actual) <= 0.006 * unit


@pytest.fixture(autouse=True)
def _stop_simulation() -> Iterator[None]:
    yield
    simulated.stop()


def oom_of(fn: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(torch.OutOfMemoryError) as info:
        fn(*args, **kwargs)
    return str(info.value)


# ---- the OOM and its message -----------------------------------------------------------------


@pytest.mark.slow
def test_oom_message_is_torchs_wording_with_numbers_that_agree() -> None:
    gpu = simulated.start(1 * GiB)
    held = torch.empty(300 * MiB, dtype=torch.uint8, device="cuda")
    message = oom_of(lambda: torch.empty(900 * MiB, dtype=torch.uint8, device="cuda"))
    assert isinstance(torch.OutOfMemoryError("x"), RuntimeError)
    assert shape_of(message) == shape_of(REAL_PLAIN)
    n = parse(message)
    assert n["requested"] == 900 * MiB
    assert n["device"] == gpu.device_index == 0
    assert n["total"] == gpu.total_bytes
    assert close(n["free"], gpu.free_bytes) and gpu.free_bytes == 1 * GiB - 300 * MiB
    assert close(n["in_use"], gpu.reserved_bytes)
    assert close(n["allocated"], gpu.allocated_bytes) and gpu.allocated_bytes == 300 * MiB
    assert n["unallocated"] == gpu.reserved_bytes - gpu.allocated_bytes == 0
    assert n["allowed"] is None
    assert gpu.num_ooms == 1 and gpu.allocated_bytes == 300 * MiB
    del held


def test_requested_size_is_rounded_as_torch_prints_it() -> None:
    simulated.start(1 * GiB)
    keep = torch.empty(1023 * MiB, dtype=torch.uint8, device="cuda")  # reserves all 1024 MiB
    assert parse(oom_of(lambda: torch.empty(10, device="cuda")))["requested"] == 2 * MiB
    assert (
        parse(oom_of(lambda: torch.empty(3 * MiB, dtype=torch.uint8, device="cuda")))["requested"]
        == 20 * MiB
    )
    big = oom_of(lambda: torch.empty(25 * MiB + 1, dtype=torch.uint8, device="cuda"))
    assert parse(big)["requested"] == 26 * MiB
    assert simulated.allocation_size(100) == 2 * MiB
    assert simulated.format_size(0) == "0 bytes" and simulated.format_size(1024) == "1024 bytes"
    assert simulated.format_size(1536) == "1.50 KiB" and simulated.format_size(GiB) == "1024.00 MiB"
    del keep


def test_cap_adds_the_allowed_clause_where_torch_puts_it() -> None:
    gpu = simulated.start(2 * GiB, allowed_bytes=512 * MiB)
    keep = torch.empty(400 * MiB, dtype=torch.uint8, device="cuda")
    message = oom_of(lambda: torch.empty(200 * MiB, dtype=torch.uint8, device="cuda"))
    assert shape_of(message) == shape_of(REAL_CAPPED)
    assert "memory in use. 512.00 MiB allowed; Of the allocated memory" in message
    n = parse(message)
    assert n["allowed"] == 512 * MiB and close(n["free"], gpu.free_bytes)
    assert gpu.free_bytes == 2 * GiB - 400 * MiB  # the driver's free ignores the cap
    del keep


def test_other_processes_count_against_free_and_are_named() -> None:
    gpu = simulated.start(1 * GiB, other_processes=[(4242, 512 * MiB)])
    assert gpu.other_processes == ((4242, 512 * MiB),)
    assert gpu.free_bytes == 512 * MiB and gpu.mem_get_info() == (512 * MiB, GiB)
    message = oom_of(lambda: torch.empty(600 * MiB, dtype=torch.uint8, device="cuda"))
    assert "Process 4242 has 512.00 MiB memory in use. Including non-PyTorch" in message
    assert shape_of(message).startswith(shape_of(REAL_OTHER_PROCESS_PREFIX))
    assert parse(message)["free"] == 512 * MiB


@pytest.mark.parametrize(
    ("make", "nbytes"),
    [
        (lambda: torch.empty(400 * GiB, dtype=torch.uint8, device="cuda"), 400 * GiB),
        (lambda: torch.zeros(100 * GiB, device="cuda"), 400 * GiB),
        (lambda: torch.ones(10 * GiB, dtype=torch.float16, device="cuda"), 20 * GiB),
        (lambda: torch.full((50, GiB), 7, device="cuda"), 400 * GiB),  # an int: int64
        (lambda: torch.rand(100_000, 100_000, device="cuda"), 40_000_000_000),
        (lambda: torch.randn(100_000, 100_000, device="cuda"), 40_000_000_000),
        (lambda: torch.randint(0, 9, (50, GiB), device="cuda"), 400 * GiB),
        (lambda: torch.empty_strided((GiB, 4), (4, 1), device="cuda"), 16 * GiB),
        (lambda: torch.ones(2, device="cuda").new_zeros(GiB, 8), 32 * GiB),
        (lambda: torch.ones(2, device="cuda").new_full((GiB, 2), 1.0), 8 * GiB),
        (lambda: torch.ones(2, device="cuda").new_empty_strided((GiB, 2), (2, 1)), 8 * GiB),
        (lambda: torch.zeros_like(torch.ones(1, device="cuda").expand(10 * GiB)), 40 * GiB),
        (
            lambda: torch.randn_like(
                torch.ones(1, device="cuda").expand(10 * GiB), dtype=torch.float64
            ),
            80 * GiB,
        ),
    ],
)
def test_factories_are_refused_before_any_host_memory_is_touched(make: Any, nbytes: int) -> None:
    gpu = simulated.start(2 * GiB)
    message = oom_of(make)  # without the pre-check: tens of GiB filled on the host, or a crash
    assert close(parse(message)["requested"], simulated.allocation_size(nbytes))
    assert gpu.num_ooms == 1 and gpu.allocated_bytes < MiB


def test_other_ops_are_checked_after_and_their_output_dropped() -> None:
    gpu = simulated.start(64 * MiB)
    a = torch.ones(4 * MiB, dtype=torch.uint8, device="cuda")
    message = oom_of(a.repeat, 20)  # 80 MiB, no size known before it runs
    assert parse(message)["requested"] == 80 * MiB
    assert parse(message)["allocated"] == 4 * MiB
    assert gpu.allocated_bytes == 4 * MiB and gpu.num_ooms == 1
    b = a.repeat(2)  # and the next allocation that fits works
    assert gpu.allocated_bytes == 12 * MiB
    del a, b
    gc.collect()  # the caught OOM's traceback (a cycle through oom_of's frame) held `a`
    assert gpu.allocated_bytes == 0


def test_oom_inside_a_function_leaves_counts_right_once_its_frame_dies() -> None:
    gpu = simulated.start(1 * GiB)

    def step() -> None:
        activations = torch.empty(600 * MiB, dtype=torch.uint8, device="cuda")
        more = torch.empty(600 * MiB, dtype=torch.uint8, device="cuda")
        del activations, more

    try:
        step()
    except torch.OutOfMemoryError as exc:
        caught: BaseException | None = exc
    assert caught is not None
    assert gpu.allocated_bytes == 600 * MiB  # the traceback's frame still holds `activations`
    del caught
    gc.collect()
    # torch's allocator keeps the freed block cached until empty_cache
    assert gpu.allocated_bytes == 0 and gpu.reserved_bytes == 600 * MiB and gpu.num_ooms == 1
    torch.cuda.empty_cache()
    assert gpu.reserved_bytes == 0


def test_an_oom_in_backward_is_a_real_oom_and_counts_stay_right() -> None:
    gpu = simulated.start(100 * MiB)
    w = torch.randn(4096, 4096, device="cuda", requires_grad=True)  # 64 MiB
    x = torch.randn(16, 4096, device="cuda")
    loss = (x @ w).sum()
    before = gpu.allocated_bytes
    message = oom_of(loss.backward)  # the weight's grad needs 64 MiB more
    assert parse(message)["requested"] == 64 * MiB
    assert w.grad is None and gpu.num_ooms == 1
    gc.collect()
    assert gpu.allocated_bytes == before


# ---- counting --------------------------------------------------------------------------------


def test_linear_forward_backward_counts_params_activations_and_grads() -> None:
    gpu = simulated.start(1 * GiB)
    model = torch.nn.Linear(1024, 1024).cuda()
    params = (1024 * 1024 + 1024) * 4
    assert gpu.allocated_bytes == params
    x = torch.randn(256, 1024, device="cuda")
    inputs = 256 * 1024 * 4
    loss = model(x).square().mean()
    after_forward = gpu.allocated_bytes
    assert after_forward >= params + inputs + 256 * 1024 * 4  # the saved activation
    loss.backward()
    assert model.weight.grad is not None and model.bias.grad is not None
    assert gpu.holds(model.weight.grad) and gpu.holds(model.bias.grad)
    assert gpu.peak_allocated_bytes >= params * 2 + inputs
    del loss
    assert gpu.allocated_bytes == 2 * params + inputs  # grads stay, the graph is gone
    model.zero_grad(set_to_none=True)
    assert gpu.allocated_bytes == params + inputs
    assert torch.cuda.memory_allocated() == gpu.allocated_bytes


def test_deleting_the_last_reference_frees_and_views_count_once() -> None:
    gpu = simulated.start(1 * GiB)
    t = torch.empty(10 * MiB, dtype=torch.uint8, device="cuda")
    views = [t[1:], t.view(2, -1), t.view(torch.int32), t.as_strided((4,), (1,)), t.detach()]
    t.add_(1)
    assert gpu.allocated_bytes == 10 * MiB
    assert all(gpu.holds(v) for v in views)
    del t
    assert gpu.allocated_bytes == 10 * MiB  # the views keep the storage alive
    views.pop()
    views.clear()
    assert gpu.allocated_bytes == 0
    assert gpu.memory_stats()["allocation.all.current"] == 0


def test_freed_on_another_thread_is_released() -> None:
    gpu = simulated.start(1 * GiB)
    tensors = [torch.empty(MiB, dtype=torch.uint8, device="cuda") for _ in range(20)]
    assert gpu.allocated_bytes == 20 * MiB
    worker = threading.Thread(target=tensors.clear)
    worker.start()
    worker.join()
    assert gpu.allocated_bytes == 0


def test_tensors_made_on_the_host_count_nowhere() -> None:
    gpu = simulated.start(1 * GiB)
    t = torch.tensor([1.0, 2.0, 3.0])  # a host tensor, as torch makes it on a real machine
    assert not gpu.holds(t) and gpu.allocated_bytes == 0 and t.device.type == "cpu"
    c = torch.tensor([1.0, 2.0, 3.0], device="cuda")
    assert gpu.holds(c) and c.is_cuda and torch.cuda.memory_allocated() == gpu.allocated_bytes > 0


def test_storages_resized_in_place_count_at_their_new_size() -> None:
    gpu = simulated.start(1 * GiB)
    t = torch.empty(MiB, dtype=torch.uint8, device="cuda")
    t.resize_(30 * MiB)
    assert gpu.allocated_bytes == 30 * MiB
    out = torch.empty(0, device="cuda")
    torch.add(torch.ones(MiB, device="cuda"), 1, out=out)
    assert gpu.holds(out) and gpu.allocated_bytes == 34 * MiB  # the `ones` died


def test_reserved_models_torch_blocks() -> None:
    gpu = simulated.start(1 * GiB)
    small = [torch.empty(1000, dtype=torch.uint8, device="cuda") for _ in range(10)]
    assert gpu.allocated_bytes == 10 * 1024 and gpu.reserved_bytes == 2 * MiB  # 512-byte blocks
    mid = torch.empty(5 * MiB, dtype=torch.uint8, device="cuda")
    assert gpu.reserved_bytes == 2 * MiB + 20 * MiB
    fits = torch.empty(11 * MiB + 1, dtype=torch.uint8, device="cuda")
    assert gpu.reserved_bytes == 2 * MiB + 20 * MiB  # best fit: the 20 MiB segment's other 15
    large = torch.empty(21 * MiB + 1, dtype=torch.uint8, device="cuda")
    assert gpu.reserved_bytes == 2 * MiB + 20 * MiB + 22 * MiB  # its own, rounded to 2 MiB
    assert gpu.reserved_bytes >= gpu.allocated_bytes
    assert gpu.free_bytes == GiB - gpu.reserved_bytes
    del small, mid, fits, large
    assert gpu.reserved_bytes == 44 * MiB  # cached, as torch keeps them
    torch.cuda.empty_cache()
    assert gpu.reserved_bytes == 0 and gpu.peak_reserved_bytes == 44 * MiB


def test_peaks_and_reset_peak() -> None:
    gpu = simulated.start(1 * GiB)
    keep = torch.empty(10 * MiB, dtype=torch.uint8, device="cuda")
    temp = torch.empty(100 * MiB, dtype=torch.uint8, device="cuda")
    del temp
    assert gpu.allocated_bytes == 10 * MiB and gpu.peak_allocated_bytes == 110 * MiB
    assert gpu.peak_reserved_bytes == 110 * MiB
    assert torch.cuda.max_memory_allocated() == 110 * MiB
    torch.cuda.reset_peak_memory_stats()
    # the 100 MiB block stays cached (reserved) until empty_cache, as in torch
    assert gpu.peak_allocated_bytes == 10 * MiB and gpu.peak_reserved_bytes == 110 * MiB
    stats = torch.cuda.memory_stats()
    assert stats["allocated_bytes.all.peak"] == 10 * MiB
    assert stats["allocated_bytes.all.current"] == 10 * MiB
    assert stats["reserved_bytes.all.current"] == stats["reserved_bytes.all.peak"] == 110 * MiB
    assert stats["num_ooms"] == 0
    del keep


def test_track_untrack_and_paused() -> None:
    before = torch.ones(MiB, dtype=torch.uint8)  # made before the simulation
    gpu = simulated.start(8 * MiB)
    assert not gpu.holds(before)
    gpu.track(before)
    gpu.track(before, before[1:])  # counted once
    assert gpu.holds(before) and gpu.allocated_bytes == MiB
    assert gpu.untrack(before) is before and gpu.allocated_bytes == 0
    with simulated.paused():
        too_big = torch.ones(9 * MiB, dtype=torch.uint8, device="cuda")  # not counted
    assert too_big is not None and not gpu.holds(too_big) and gpu.allocated_bytes == 0
    with pytest.raises(torch.OutOfMemoryError):
        gpu.track(too_big)
    assert gpu.allocated_bytes == 0


# ---- the redirect ----------------------------------------------------------------------------

PLACEMENTS = {
    "x.cuda()": lambda x: x.cuda(),
    "x.cuda(0)": lambda x: x.cuda(0),
    "x.cuda(non_blocking=True)": lambda x: x.cuda(non_blocking=True),
    "x.to('cuda')": lambda x: x.to("cuda"),
    "x.to('cuda:0')": lambda x: x.to("cuda:0"),
    "x.to(0)": lambda x: x.to(0),
    "x.to(torch.device('cuda'))": lambda x: x.to(torch.device("cuda")),
    "x.to(device='cuda')": lambda x: x.to(device="cuda"),
    "x.to('cuda', torch.float64)": lambda x: x.to("cuda", torch.float64),
    "torch.as_tensor(x, device='cuda')": lambda x: torch.as_tensor(x, device="cuda"),
}


@pytest.mark.parametrize("place", PLACEMENTS.values(), ids=PLACEMENTS.keys())
def test_placements_of_a_host_tensor_copy_it_to_the_card(place: Any) -> None:
    host = torch.ones(1000)
    gpu = simulated.start(1 * GiB)
    placed = place(host)
    assert placed.device == torch.device("cuda", 0) and placed.is_cuda
    assert gpu.holds(placed) and not gpu.holds(host)
    assert placed.untyped_storage().data_ptr() != host.untyped_storage().data_ptr()
    placed.add_(1)
    assert host[0].item() == 1.0  # a copy, as a host-to-device transfer is
    assert place(placed) is placed or placed.dtype != torch.float32  # already there: itself


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.zeros(3, device="cuda"),
        lambda: torch.empty(3, device="cuda:0"),
        lambda: torch.arange(3, device=torch.device("cuda", 0)),
        lambda: torch.tensor([1, 2], device="cuda"),
        lambda: torch.randn(3, device=0),
        lambda: torch.nn.Linear(2, 2, device="cuda").weight,
    ],
)
def test_factories_with_a_cuda_device(make: Any) -> None:
    gpu = simulated.start(1 * GiB)
    t = make()
    assert t.device == torch.device("cuda", 0) and gpu.holds(t)


@pytest.mark.parametrize("move", [lambda m: m.cuda(), lambda m: m.to("cuda")])
def test_a_module_made_before_moves_onto_the_card(move: Any) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.BatchNorm1d(64))
    gpu = simulated.start(1 * GiB)
    assert move(model) is model
    tensors = [*model.parameters(), *model.buffers()]
    assert all(gpu.holds(t) for t in tensors)
    # each storage takes a block: its size rounded up to 512 bytes (torch's round_size)
    blocks = [max(512, -(-t.untyped_storage().nbytes() // 512) * 512) for t in tensors]
    assert gpu.allocated_bytes == sum(blocks)
    redirected = simulated.lifecycle._modes[0].redirected
    assert sum(redirected.values()) == len(tensors)


def test_default_device_cuda() -> None:
    gpu = simulated.start(1 * GiB)
    torch.set_default_device("cuda")
    try:
        t = torch.zeros(4)
        layer = torch.nn.Linear(3, 3)
    finally:
        torch.set_default_device(None)
    assert t.device.type == "cuda" and gpu.holds(t) and gpu.holds(layer.weight)
    with torch.device("cuda"):
        u = torch.ones(2)
    assert gpu.holds(u)
    assert simulated.lifecycle._modes[0].redirected["torch.zeros"] == 1


def test_default_device_set_before_the_simulation() -> None:
    torch.set_default_device("cuda")  # fine without CUDA until a tensor is made
    try:
        gpu = simulated.start(1 * GiB)
        t = torch.ones(3)
    finally:
        torch.set_default_device(None)
    assert t.device.type == "cuda" and gpu.holds(t)


def test_pin_memory_does_nothing() -> None:
    simulated.start(1 * GiB)
    assert torch.empty(2, pin_memory=True).device.type == "cpu"
    x = torch.ones(2)
    assert x.pin_memory() is x


def test_cuda_to_cpu_on_its_own_moves_without_copying_and_says_what_it_moved() -> None:
    x = torch.ones(3)
    with cuda_to_cpu.cuda_to_cpu() as mode:
        assert x.to("cuda") is x and x.cuda() is x
        assert torch.zeros(2, device="cuda").device.type == "cpu"
        assert x.to(torch.float64).dtype == torch.float64  # untouched
    assert mode.redirected == {"torch.Tensor.to": 1, "torch.Tensor.cuda": 1, "torch.zeros": 1}
    assert isinstance(mode, cuda_to_cpu.cuda_to_cpu_mode_class())
    assert cuda_to_cpu.is_cuda_device("cuda:1") and not cuda_to_cpu.is_cuda_device(True)
    assert not cuda_to_cpu.is_cuda_device("cpu") and not cuda_to_cpu.is_cuda_device(None)


# ---- torch.cuda ------------------------------------------------------------------------------


def test_torch_cuda_reports_the_simulation_and_is_restored_after() -> None:
    originals = {name: getattr(torch.cuda, name) for name in simulated._CUDA}
    gpu = simulated.start(2 * GiB, other_processes=[(1, 256 * MiB)])
    x = torch.empty(100 * MiB, dtype=torch.uint8, device="cuda")
    assert torch.cuda.is_available() and torch.cuda.device_count() == 1
    assert torch.cuda.current_device() == 0
    assert torch.cuda.get_device_name(0) == gpu.name == "Simulated GPU (2.00 GiB)"
    assert torch.cuda.get_device_properties(0).total_memory == 2 * GiB
    assert torch.cuda.is_bf16_supported()
    assert torch.cuda.memory_allocated() == torch.cuda.memory_allocated(0) == 100 * MiB
    assert torch.cuda.memory_reserved() == gpu.reserved_bytes == 100 * MiB
    assert torch.cuda.max_memory_reserved() == 100 * MiB
    assert torch.cuda.mem_get_info() == (2 * GiB - 356 * MiB, 2 * GiB)
    assert torch.cuda.memory_stats() == gpu.memory_stats()
    assert "Simulated GPU" in torch.cuda.memory_summary()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    assert torch.cuda.memory_allocated() == 100 * MiB  # nothing cached to give back
    torch.cuda.set_per_process_memory_fraction(0.25)
    assert gpu.allowed_bytes == 512 * MiB
    assert torch.cuda.get_per_process_memory_fraction() == 0.25
    assert "512.00 MiB allowed;" in oom_of(lambda: torch.empty(500 * MiB, device="cuda"))
    with pytest.raises(ValueError):
        torch.cuda.set_per_process_memory_fraction(1.5)
    del x
    simulated.stop()
    assert all(getattr(torch.cuda, name) is fn for name, fn in originals.items())
    assert torch.cuda.memory_allocated is originals["memory_allocated"]
    assert torch.cuda.is_available() == originals["is_available"]()


def test_set_limit() -> None:
    with pytest.raises(RuntimeError):
        simulated.set_limit(MiB)
    gpu = simulated.start(1 * GiB)
    simulated.set_limit(100 * MiB)
    assert gpu.allowed_bytes == 100 * MiB
    assert "100.00 MiB allowed;" in oom_of(
        lambda: torch.empty(101 * MiB, dtype=torch.uint8, device="cuda")
    )
    simulated.set_limit(None)
    keep = torch.empty(101 * MiB, dtype=torch.uint8, device="cuda")
    assert gpu.allocated_bytes == 102 * MiB  # a 102 MiB segment, its last 1 MiB not split off
    with pytest.raises(ValueError):
        simulated.set_limit(-1)
    del keep


# ---- lifecycle -------------------------------------------------------------------------------


def ours(stack: list[Any]) -> list[Any]:
    kinds = (cuda_to_cpu.cuda_to_cpu_mode_class(), simulated._counting_mode_class())
    return [m for m in stack if isinstance(m, kinds)]


def test_start_replaces_and_stop_is_idempotent() -> None:
    first = simulated.start(1 * GiB)
    a = torch.empty(MiB, device="cuda")
    second = simulated.start(2 * GiB)
    assert simulated.current() is second and first is not second
    assert len(ours(_get_current_dispatch_mode_stack())) == 1
    assert len(ours(_get_current_function_mode_stack())) == 1
    b = torch.empty(MiB, device="cuda")
    assert first.allocated_bytes == 4 * MiB and not second.holds(a)
    assert second.holds(b) and second.allocated_bytes == 4 * MiB
    simulated.stop()
    simulated.stop()
    assert simulated.current() is None
    assert not ours(_get_current_dispatch_mode_stack())
    assert not ours(_get_current_function_mode_stack())
    c = torch.empty(MiB)
    assert not second.holds(c) and second.allocated_bytes == 4 * MiB


def test_stop_with_another_mode_above_ours_leaves_that_one_in_place() -> None:
    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None):
            return func(*args, **(kwargs or {}))

    class Plain(TorchFunctionMode):
        def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None):
            return func(*args, **(kwargs or {}))

    simulated.start(1 * GiB)
    watch, plain = Watch(), Plain()
    watch.__enter__()
    plain.__enter__()
    try:
        simulated.stop()
        assert _get_current_dispatch_mode_stack() == [watch]
        assert _get_current_function_mode_stack() == [plain]
        assert torch.ones(2).sum().item() == 2.0
    finally:
        plain.__exit__(None, None, None)
        watch.__exit__(None, None, None)
    assert _get_current_dispatch_mode_stack() == []
    assert _get_current_function_mode_stack() == []


def test_stop_from_another_thread_makes_the_modes_inert_until_the_next_start() -> None:
    gpu = simulated.start(16 * MiB)
    worker = threading.Thread(target=simulated.stop)
    worker.start()
    worker.join()
    assert simulated.current() is None
    big = torch.empty(32 * MiB, dtype=torch.uint8)  # inert: neither counted nor refused
    assert not gpu.holds(big) and gpu.allocated_bytes == 0
    assert len(ours(_get_current_dispatch_mode_stack())) == 1
    simulated.start(16 * MiB)
    assert len(ours(_get_current_dispatch_mode_stack())) == 1
    assert len(ours(_get_current_function_mode_stack())) == 1


def test_threads_started_during_the_simulation_count_as_on_a_real_card() -> None:
    gpu = simulated.start(64 * MiB)
    keep = torch.empty(MiB, dtype=torch.uint8, device="cuda")
    seen: list[Any] = []

    def elsewhere() -> None:
        seen.append(simulated.current())
        seen.append(torch.cuda.memory_allocated())
        seen.append(torch.empty(10 * MiB, dtype=torch.uint8, device="cuda"))
        seen.append(oom_of(torch.empty, 128 * MiB, dtype=torch.uint8, device="cuda"))

    worker = threading.Thread(target=elsewhere)
    worker.start()
    worker.join()
    assert seen[0] is gpu and seen[1] == MiB
    assert gpu.holds(seen[2]) and gpu.allocated_bytes == 11 * MiB
    assert parse(seen[3])["total"] == 64 * MiB
    del keep


def test_a_thread_running_before_the_start_counts_only_under_on_this_thread() -> None:
    go, done = threading.Event(), threading.Event()
    seen: list[Any] = []

    def elsewhere() -> None:
        go.wait()
        seen.append(torch.empty(MiB, dtype=torch.uint8))  # no modes here: a host tensor
        with simulated.on_this_thread():
            seen.append(torch.empty(MiB, dtype=torch.uint8, device="cuda"))
        done.set()

    worker = threading.Thread(target=elsewhere)
    worker.start()
    gpu = simulated.start(64 * MiB)
    go.set()
    worker.join()
    assert not gpu.holds(seen[0]) and gpu.holds(seen[1])


def test_a_threads_profile_function_is_kept_and_restored() -> None:
    calls: list[str] = []

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "call":
            calls.append(frame.f_code.co_name)

    threading.setprofile(profile)
    try:
        gpu = simulated.start(64 * MiB)
        seen: list[Any] = []

        def counted_here() -> None:
            seen.append(torch.empty(MiB, dtype=torch.uint8, device="cuda"))

        worker = threading.Thread(target=counted_here)
        worker.start()
        worker.join()
        assert gpu.holds(seen[0]) and "counted_here" in calls
        simulated.stop()
        assert threading.getprofile() is profile
    finally:
        threading.setprofile(None)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_children_redirect_but_count_nothing() -> None:
    gpu = simulated.start(16 * MiB)
    pid = os.fork()
    if pid == 0:  # a DataLoader worker, say: its copy of the card must not run out on its own
        try:
            t = torch.empty(64 * MiB, dtype=torch.uint8, device="cuda")
            os._exit(0 if t.device.type == "cpu" and not gpu.holds(t) else 2)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert simulated.current() is gpu
    assert (
        parse(oom_of(torch.empty, 64 * MiB, dtype=torch.uint8, device="cuda"))["total"] == 16 * MiB
    )


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError):
        simulated.start(0)
    with pytest.raises(ValueError):
        simulated.start(GiB, allowed_bytes=-1)
    assert simulated.current() is None


# ---- other threads: on_this_thread -------------------------------------------------------------


# A thread that was running before any simulation started (threads started during one count
# on their own): the kernel's comm thread, say.
_OLD_THREAD = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="old")
_OLD_THREAD.submit(lambda: None).result()


def in_thread(fn: Any) -> Any:
    """Run ``fn`` on the thread that predates the simulation; its result, or what it raised."""

    def body() -> Any:
        try:
            return fn()
        except BaseException as exc:
            return exc

    return _OLD_THREAD.submit(body).result(timeout=60)


def stacks() -> tuple[list[Any], list[Any]]:
    return list(_get_current_function_mode_stack()), list(_get_current_dispatch_mode_stack())


def test_on_this_thread_counts_work_on_another_thread_and_leaves_its_stacks_as_they_were() -> None:
    gpu = simulated.start(64 * MiB)
    main_before = stacks()

    def elsewhere() -> Any:
        before = stacks()
        with simulated.on_this_thread() as sim:
            x = torch.randn(4 * MiB, device="cuda")  # 16 MiB, counted
            counted = gpu.holds(x) and gpu.allocated_bytes == 16 * MiB and sim is gpu
            moved = torch.ones(8, device="cpu").cuda()  # .cuda() works: a copy, counted
            counted = counted and gpu.holds(moved)
            message = oom_of(torch.randn, 32 * MiB, device="cuda")  # 128 MiB: the simulated OOM
        after = stacks()
        outside = torch.empty(MiB, dtype=torch.uint8)  # not counted any more
        return counted, message, before == after == ([], []), gpu.holds(outside), x

    counted, message, unchanged, held_outside, x = in_thread(elsewhere)
    assert counted and unchanged and not held_outside
    assert parse(message)["total"] == 64 * MiB
    assert gpu.num_ooms == 1 and gpu.holds(x)
    assert stacks() == main_before and len(ours(main_before[1])) == 1
    assert simulated.current() is gpu
    del x
    gc.collect()  # the OOM's traceback held the worker's frame in a cycle
    assert gpu.allocated_bytes == 0


def test_on_this_thread_is_a_no_op_without_a_simulation_or_where_it_is_active() -> None:
    def plain() -> Any:
        with simulated.on_this_thread() as sim:
            return sim, stacks()

    assert in_thread(plain) == (None, ([], []))
    gpu = simulated.start(64 * MiB)
    before = stacks()
    with simulated.on_this_thread() as sim:  # the starting thread: already active
        assert sim is gpu and stacks() == before

    def nested() -> Any:
        with simulated.on_this_thread():
            once = stacks()
            with simulated.on_this_thread() as inner:  # re-entrant: nothing more pushed
                twice = stacks()
            return inner is gpu and once == twice and len(once[0]) == len(once[1]) == 1

    assert in_thread(nested) is True


def test_on_this_thread_pops_exactly_its_own_modes_even_under_a_mode_pushed_later() -> None:
    gpu = simulated.start(64 * MiB)

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(
            self, func: Any, types: Any, args: Any = (), kwargs: Any = None
        ) -> Any:
            return func(*args, **(kwargs or {}))

    def elsewhere() -> Any:
        watch = Watch()
        with simulated.on_this_thread():
            watch.__enter__()  # pushed above ours, left on when the block ends
        left = stacks()
        watch.__exit__(None, None, None)
        return left, stacks(), watch

    left, finally_, watch = in_thread(elsewhere)
    assert left == ([], [watch]) and finally_ == ([], [])
    assert gpu.allocated_bytes == 0


def test_on_this_thread_follows_pause_and_stop_from_the_starting_thread() -> None:
    gpu = simulated.start(64 * MiB)
    entered, go_on = threading.Event(), threading.Event()
    seen: list[Any] = []

    def elsewhere() -> None:
        with simulated.on_this_thread():
            entered.set()
            go_on.wait(10)
            t = torch.empty(128 * MiB, dtype=torch.uint8)  # stopped: neither counted nor refused
            seen.append(gpu.holds(t))
        seen.append(stacks())

    worker = _OLD_THREAD.submit(elsewhere)
    assert entered.wait(10)
    with simulated.paused():
        assert all(m.holds is None for m in simulated._borrowed)  # paused there too
    assert all(m.holds is not None for m in simulated._borrowed) and simulated._borrowed
    simulated.stop()
    go_on.set()
    worker.result(timeout=60)
    assert seen == [False, ([], [])] and not simulated._borrowed


def test_a_small_card_is_named_in_mib() -> None:
    """A 24 MiB card was "Simulated GPU (0.02 GiB)"."""
    import jupyter_gpumem

    with jupyter_gpumem.simulate("24MiB") as gpu:
        assert torch.cuda.get_device_name(0) == gpu.name == "Simulated GPU (24.00 MiB)"
