"""The OOM parser against real and synthesised messages (tests/data/oom_messages/README.md says
which is which), cut anywhere, re-wrapped, or hostile; and find_oom on real torch exceptions.

Decided here: only torch's ``OutOfMemoryError`` (by class) and the ``RuntimeError`` family (by
message) count. A ``ValueError`` or ``MemoryError`` is never an OOM, whatever its text.
"""

from __future__ import annotations

import builtins
import dataclasses
import pathlib
import random
import re
import textwrap
from collections.abc import Callable
from typing import Any

import pytest

from jupyter_gpumem.oom.report import (
    OOMReport,
    ProcessUsage,
    find_oom,
    is_oom,
    parse_oom_message,
    walk_chain,
)

DATA = pathlib.Path(__file__).parent / "data" / "oom_messages"
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


def K(x: float) -> int:
    return int(x * KiB)


def M(x: float) -> int:
    return int(x * MiB)


def G(x: float) -> int:
    return int(x * GiB)


def procs(*pairs: tuple[int, int]) -> tuple[ProcessUsage, ...]:
    return tuple(ProcessUsage(pid, used) for pid, used in pairs)


V2_PLAIN: dict[str, Any] = dict(
    kind="alloc_v2",
    backend="CUDA",
    requested_bytes=G(400.00),
    device_index=0,
    total_bytes=G(79.18),
    free_bytes=G(78.66),
    process_used_bytes=M(518.00),
    allocated_bytes=0,
    reserved_unallocated_bytes=0,
    reserved_bytes=0,
    hint="expandable_segments",
)

# Every field not named here must come out as its default (None, (), False): no guessing.
EXPECTED: dict[str, dict[str, Any]] = {
    "torch-2.11-cuda13-h100-plain.txt": V2_PLAIN,
    "torch-2.11-cuda13-h100-fraction-cap.txt": dict(
        kind="alloc_v2",
        backend="CUDA",
        requested_bytes=G(10.00),
        device_index=0,
        total_bytes=G(79.18),
        free_bytes=G(70.66),
        process_used_bytes=G(8.51),
        allowed_bytes=G(15.84),
        allocated_bytes=G(8.00),
        reserved_unallocated_bytes=0,
        reserved_bytes=G(8.00),
        hint="expandable_segments",
    ),
    "torch-2.11-cuda13-h100-in-kernel-truncated.txt": dict(
        kind="alloc_v2",
        backend="CUDA",
        requested_bytes=G(9313.23),
        device_index=0,
        total_bytes=G(79.18),
        free_bytes=G(57.15),
        other_processes=procs((408, G(1.51))),
        process_used_bytes=G(20.51),
        allocated_bytes=G(20.00),
        truncated=True,  # cut at "and 0 byte": the unallocated size is not reported
    ),
    "torch-1.x-seed-bert-large-11GiB.txt": dict(
        kind="alloc_v1",
        backend="CUDA",
        requested_bytes=G(2.00),
        device_index=0,
        total_bytes=G(11.17),
        allocated_bytes=G(9.00),
        free_bytes=G(1.50),
        reserved_bytes=G(9.50),
    ),
    "torch-1.x-seed-training-8GiB.txt": dict(
        kind="alloc_v1",
        backend="CUDA",
        requested_bytes=M(512.00),
        device_index=0,
        total_bytes=G(8.00),
        allocated_bytes=G(6.50),
        free_bytes=M(256.00),
        reserved_bytes=G(6.70),
    ),
    "torch-2.13-cpu-linux-empty-1PiB.txt": dict(
        kind="cpu", backend="CPU", requested_bytes=1125899906842624
    ),
    "synth-torch-2.1-capacty-typo.txt": dict(
        kind="alloc_v2",
        backend="CUDA",
        requested_bytes=M(224.00),
        device_index=0,
        total_bytes=G(23.65),
        free_bytes=M(14.31),
        other_processes=procs((1024, G(20.00))),
        process_used_bytes=G(3.62),
        allocated_bytes=G(3.06),
        reserved_unallocated_bytes=M(106.73),
        reserved_bytes=G(3.06) + M(106.73),
        hint="max_split_size_mb",
    ),
    "synth-torch-2.x-allowed.txt": dict(
        kind="alloc_v2",
        backend="CUDA",
        requested_bytes=G(2.00),
        device_index=1,
        total_bytes=G(39.39),
        free_bytes=G(30.12),
        other_processes=procs((7781, G(1.02))),
        process_used_bytes=G(8.25),
        allowed_bytes=G(7.88),
        allocated_bytes=G(6.50),
        reserved_unallocated_bytes=G(1.20),
        reserved_bytes=G(6.50) + G(1.20),
        hint="expandable_segments",
    ),
    "synth-torch-2.x-private-pools.txt": dict(
        kind="alloc_v2",
        backend="CUDA",
        requested_bytes=G(1.50),
        device_index=0,
        total_bytes=G(79.18),
        free_bytes=G(1.05),
        process_used_bytes=G(78.11),
        allocated_bytes=G(74.25),
        private_pools_bytes=G(12.00),
        reserved_unallocated_bytes=G(3.12),
        reserved_bytes=G(74.25) + G(3.12),
        hint="expandable_segments",
    ),
    "synth-torch-2.x-many-processes.txt": dict(
        kind="alloc_v2",
        backend="CUDA",
        requested_bytes=M(512.00),
        device_index=3,
        total_bytes=G(23.57),
        free_bytes=M(96.44),
        other_processes=procs((2214, G(10.00)), (2290, G(4.25)), (31337, M(640.00))),
        process_used_bytes=G(8.61),
        allocated_bytes=G(7.90),
        reserved_unallocated_bytes=M(201.07),
        reserved_bytes=G(7.90) + M(201.07),
        hint="expandable_segments",
    ),
    "synth-torch-2.x-rewrapped.txt": V2_PLAIN,
    "synth-torch-2.x-class-prefix.txt": V2_PLAIN,
    "synth-torch-1.x-max-split-hint.txt": dict(
        kind="alloc_v1",
        backend="CUDA",
        requested_bytes=M(20.00),
        device_index=0,
        total_bytes=G(7.79),
        allocated_bytes=G(6.33),
        free_bytes=M(13.19),
        reserved_bytes=G(6.43),
        hint="max_split_size_mb",
    ),
    "synth-torch-1.x-allowed.txt": dict(
        kind="alloc_v1",
        backend="CUDA",
        requested_bytes=M(64.00),
        device_index=0,
        total_bytes=G(15.78),
        allocated_bytes=G(3.91),
        free_bytes=G(11.50),
        allowed_bytes=G(4.00),
        reserved_bytes=G(3.95),
        hint="max_split_size_mb",
    ),
    "synth-torch-1.4-cached.txt": dict(
        kind="alloc_v1",
        backend="CUDA",
        requested_bytes=M(12.50),
        device_index=0,
        total_bytes=G(10.92),
        allocated_bytes=G(10.28),
        free_bytes=M(8.56),
        reserved_bytes=G(10.35),
    ),
    "synth-hip-2.x.txt": dict(
        kind="alloc_v2",
        backend="HIP",
        requested_bytes=M(978.00),
        device_index=0,
        total_bytes=G(15.98),
        free_bytes=M(630.00),
        allocated_bytes=G(14.20),
        reserved_unallocated_bytes=M(96.00),
        reserved_bytes=G(14.20) + M(96.00),
        hint="expandable_segments",
    ),
    "synth-xpu-2.x.txt": dict(
        kind="alloc_v2",
        backend="XPU",
        requested_bytes=M(20.00),
        device_index=0,
        total_bytes=G(11.93),
        free_bytes=M(5.62),
        allocated_bytes=G(10.43),
        reserved_unallocated_bytes=M(94.57),
        reserved_bytes=G(10.43) + M(94.57),
    ),
    "synth-mps.txt": dict(
        kind="mps",
        backend="MPS",
        allocated_bytes=G(17.23),
        other_allocations_bytes=M(2.52),
        allowed_bytes=G(18.13),
        requested_bytes=G(1.07),
        pool="private",
        hint="PYTORCH_MPS_HIGH_WATERMARK_RATIO",
    ),
    "synth-cuda-malloc-async.txt": dict(
        kind="alloc_v2",
        backend="CUDA",
        device_index=0,
        allocated_bytes=G(9.43),
        requested_bytes=M(640.00),
        total_bytes=G(11.59),
        free_bytes=M(7.12),
        # "PyTorch limit ... : 17179869184.00 GiB" is SIZE_MAX, i.e. no cap: not an allowance.
    ),
    "synth-cuda-runtime-error.txt": dict(kind="runtime", backend="CUDA"),
    "synth-cublas-alloc-failed.txt": dict(
        kind="library", backend="CUDA", status="CUBLAS_STATUS_ALLOC_FAILED"
    ),
    "synth-cudnn-not-supported.txt": dict(
        kind="maybe", backend="CUDA", probable=True, status="CUDNN_STATUS_NOT_SUPPORTED"
    ),
    "synth-cudnn-internal-error.txt": dict(
        kind="maybe", backend="CUDA", probable=True, status="CUDNN_STATUS_INTERNAL_ERROR"
    ),
    "synth-cufft-alloc-failed.txt": dict(
        kind="library", backend="CUDA", status="CUFFT_ALLOC_FAILED"
    ),
    "synth-cpu-alloc.txt": dict(kind="cpu", backend="CPU", requested_bytes=85899345920),
    "synth-nccl-cuda-failure.txt": dict(kind="nccl", backend="CUDA"),
}

FIELDS = [f.name for f in dataclasses.fields(OOMReport) if f.name != "message"]
DEFAULTS = {
    f.name: f.default for f in dataclasses.fields(OOMReport) if f.default is not dataclasses.MISSING
}


def read(name: str) -> str:
    return (DATA / name).read_text(encoding="utf-8")


def as_dict(report: OOMReport) -> dict[str, Any]:
    return {name: getattr(report, name) for name in FIELDS}


def parse(text: str) -> OOMReport:
    report = parse_oom_message(text)
    assert report is not None, text
    return report


# --- every message file ---------------------------------------------------------------------


def test_every_file_has_expected_fields_and_every_entry_a_file() -> None:
    files = {p.name for p in DATA.glob("*.txt")}
    assert files == set(EXPECTED)


def test_readme_lists_every_file() -> None:
    readme = read("README.md")
    listed = set(re.findall(r"^\| (\S+\.txt) \|", readme, flags=re.M))
    assert listed == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_message_file_parses_to_expected_fields(name: str) -> None:
    report = parse(read(name))
    assert as_dict(report) == {"probable": False, **DEFAULTS, **EXPECTED[name]}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_message_is_whitespace_normalised(name: str) -> None:
    report = parse(read(name))
    assert report.message == report.message.strip()
    assert "  " not in report.message and "\n" not in report.message


def test_class_prefix_and_wrapping_leave_the_same_message() -> None:
    plain = parse(read("torch-2.11-cuda13-h100-plain.txt"))
    assert parse(read("synth-torch-2.x-class-prefix.txt")).message == plain.message
    assert parse(read("synth-torch-2.x-rewrapped.txt")).message == plain.message
    assert parse("RuntimeError: torch.OutOfMemoryError: " + read("synth-mps.txt")).kind == "mps"


# --- truncation -----------------------------------------------------------------------------

TRUNCATION_CASES = [
    "torch-2.11-cuda13-h100-plain.txt",
    "torch-2.11-cuda13-h100-fraction-cap.txt",
    "synth-torch-2.x-many-processes.txt",
    "synth-torch-2.x-private-pools.txt",
    "synth-torch-2.1-capacty-typo.txt",
    "synth-hip-2.x.txt",
    "synth-xpu-2.x.txt",
    "synth-torch-1.x-allowed.txt",
    "synth-torch-1.x-max-split-hint.txt",
    "synth-mps.txt",
    "synth-cpu-alloc.txt",
    "synth-cuda-malloc-async.txt",
]
# Formats whose every proper prefix must say truncated=True (a closing text is always there).
ALWAYS_CLOSED = {
    "torch-2.11-cuda13-h100-plain.txt",
    "torch-2.11-cuda13-h100-fraction-cap.txt",
    "synth-torch-2.x-many-processes.txt",
    "synth-torch-2.x-private-pools.txt",
    "synth-torch-2.1-capacty-typo.txt",
    "synth-hip-2.x.txt",
    "synth-xpu-2.x.txt",
    "synth-mps.txt",
    "synth-cuda-malloc-async.txt",
}


# The words that say "this is an OOM": before they are complete, None is the right answer.
HEAD = re.compile(
    r"\w+ (?:backend )?out of memory|DefaultCPUAllocator: can't allocate memory"
    r"|Allocation on device 0 would exceed allowed memory"
)


@pytest.mark.parametrize("name", TRUNCATION_CASES)
def test_every_prefix_gives_right_fields_or_none(name: str) -> None:
    text = read(name).strip()
    full = as_dict(parse(text))
    head = HEAD.search(text)
    assert head is not None
    version_known = text.find(" (GPU") + 2 if full["kind"] == "alloc_v1" else 0
    for n in range(len(text)):
        cut = text[:n]
        report = parse_oom_message(cut)
        if n < head.end():
            continue
        assert report is not None, cut
        got = as_dict(report)
        for field, value in got.items():
            if field == "kind":
                # Before "(GPU" a 1.x message cannot be told from a 2.x one.
                assert value == full["kind"] or (n < version_known and value == "alloc_v2"), cut
            elif field == "backend":
                assert value == full["backend"], cut
            elif field == "other_processes":
                assert value == full[field][: len(value)], cut
            elif field == "truncated":
                if name in ALWAYS_CLOSED:
                    assert value, cut
            elif field != "probable":
                assert value is None or value == full[field], (field, cut)
    assert parse(text).truncated is False


def test_a_cut_number_is_never_reported() -> None:
    text = read("torch-2.11-cuda13-h100-in-kernel-truncated.txt").strip()
    cut = text[: text.index("20.51 GiB") + len("20.5")]
    report = parse(cut)
    assert report.process_used_bytes is None
    assert report.other_processes == procs((408, G(1.51)))
    assert report.truncated
    for cut_unit in ("20.51 Gi", "20.51 G", "20.51 ", "20.51 GiB memory in us"):
        report = parse(text[: text.index("20.51 GiB")] + cut_unit)
        assert report.process_used_bytes is None, cut_unit


def test_cut_inside_the_closing_link_is_truncated() -> None:
    text = read("torch-2.11-cuda13-h100-plain.txt").strip()
    assert parse(text[:-1]).truncated
    assert parse(text[: text.index("(https")]).truncated
    assert parse(text[: text.index("If reserved")]).truncated  # 2.x always closes with advice
    assert parse(text + " and more text a logger appended").truncated is False


def test_v1_without_advice_is_complete() -> None:
    text = read("synth-torch-1.x-allowed.txt").strip()
    assert parse(text[: text.index(")") + 1]).truncated is False
    assert parse(text[: text.index(")")]).truncated
    assert parse(text[: text.index("to avoid")]).truncated


def test_requested_size_at_the_very_end_is_kept() -> None:
    report = parse("XPU out of memory. Tried to allocate 2.00 GiB")
    assert (report.kind, report.backend, report.requested_bytes) == ("alloc_v2", "XPU", G(2))
    assert report.truncated
    assert parse("CUDA out of memory. Tried to allocate 2.00 Gi").requested_bytes is None


# --- re-wrapping ----------------------------------------------------------------------------

REAL = [
    "torch-2.11-cuda13-h100-plain.txt",
    "torch-2.11-cuda13-h100-fraction-cap.txt",
    "torch-2.11-cuda13-h100-in-kernel-truncated.txt",
    "torch-1.x-seed-bert-large-11GiB.txt",
    "torch-1.x-seed-training-8GiB.txt",
    "torch-2.13-cpu-linux-empty-1PiB.txt",
    "synth-mps.txt",
    "synth-torch-2.x-many-processes.txt",
]


@pytest.mark.parametrize("name", REAL)
@pytest.mark.parametrize("width", [20, 41, 79])
def test_rewrapped_message_parses_the_same(name: str, width: int) -> None:
    text = read(name)
    wrapped = "\n".join(textwrap.wrap(text, width, break_long_words=False, break_on_hyphens=False))
    assert parse(wrapped) == parse(text)
    indented = text.replace(" ", "\n    ").replace("; ", ";\r\n\t")
    assert parse(indented) == parse(text)


def test_wrap_inside_a_number_drops_that_number_only() -> None:
    text = read("torch-2.11-cuda13-h100-plain.txt").replace("78.66 GiB", "78.\n66 GiB")
    report = parse(text)
    assert report.free_bytes is None
    assert report.total_bytes == G(79.18) and report.process_used_bytes == M(518.00)


# --- other wordings and non-OOM text --------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "kind", "backend", "status"),
    [
        ("CUDA driver error: out of memory", "runtime", "CUDA", None),
        ("HIP error: out of memory", "runtime", "HIP", None),
        (
            "cuda runtime error (2) : out of memory at /pytorch/aten/src/THC/THCGeneral.cpp:844",
            "runtime",
            "CUDA",
            None,
        ),
        ("CUDA_ERROR_OUT_OF_MEMORY", "runtime", "CUDA", "CUDA_ERROR_OUT_OF_MEMORY"),
        ("hipErrorOutOfMemory: out of memory", "runtime", "HIP", "hipErrorOutOfMemory"),
        (
            "UR_RESULT_ERROR_OUT_OF_DEVICE_MEMORY",
            "runtime",
            "XPU",
            "UR_RESULT_ERROR_OUT_OF_DEVICE_MEMORY",
        ),
        (
            "cuSOLVER error: CUSOLVER_STATUS_ALLOC_FAILED",
            "library",
            "CUDA",
            "CUSOLVER_STATUS_ALLOC_FAILED",
        ),
        ("CURAND_STATUS_ALLOCATION_FAILED", "library", "CUDA", "CURAND_STATUS_ALLOCATION_FAILED"),
        (
            "cuDNN error: CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED",
            "library",
            "CUDA",
            "CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED",
        ),
        ("HIPBLAS_STATUS_ALLOC_FAILED", "library", "HIP", "HIPBLAS_STATUS_ALLOC_FAILED"),
        ("rocblas_status_memory_error", "library", "HIP", "rocblas_status_memory_error"),
        ("CUDNN_STATUS_NOT_INITIALIZED", "maybe", "CUDA", "CUDNN_STATUS_NOT_INITIALIZED"),
        (
            "CUDA error: CUBLAS_STATUS_NOT_INITIALIZED when calling `cublasCreate(handle)`",
            "maybe",
            "CUDA",
            "CUBLAS_STATUS_NOT_INITIALIZED",
        ),
        (
            "NCCL error: unhandled cuda error, NCCL version 2.19.3 ncclUnhandledCudaError",
            "maybe",
            "CUDA",
            "ncclUnhandledCudaError",
        ),
        ("include/alloc.h:103 NCCL WARN Failed to CUDA calloc 6291456 bytes", "nccl", "CUDA", None),
        ("CUDA out of memory while allocating the KV cache", "unparsed", "CUDA", None),
        ("NPU out of memory. Tried to allocate 2.00 GiB", "alloc_v2", "", None),
    ],
)
def test_other_wordings(text: str, kind: str, backend: str, status: str | None) -> None:
    report = parse(text)
    assert (report.kind, report.backend, report.status) == (kind, backend, status)
    assert report.probable is (kind == "maybe")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   \n ",
        "shape mismatch: mat1 and mat2 shapes cannot be multiplied (64x512 and 1024x10)",
        "out of memory",
        "the tokenizer ran out of memory",
        "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.00GiB.",
        "cuDNN error: CUDNN_STATUS_BAD_PARAM",
        "cuDNN error: CUDNN_STATUS_NOT_SUPPORTED_GRAPH_PATTERN",
        "CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasSgemm( handle, opa, ...)`",
        "CUDA error: device-side assert triggered",
        "CUDA error: an illegal memory access was encountered",
        "Expected all tensors to be on the same device, but found at least two devices",
    ],
)
def test_not_an_oom(text: str) -> None:
    assert parse_oom_message(text) is None


def test_a_known_layout_later_beats_a_loose_phrase() -> None:
    text = "CUDA out of memory during warm-up; cuDNN error: CUFFT_ALLOC_FAILED"
    assert parse(text).kind == "library"


def test_two_messages_in_one_text_read_the_first() -> None:
    first = read("synth-torch-2.x-allowed.txt")
    second = read("torch-2.11-cuda13-h100-plain.txt")
    report = parse("During handling: " + first + "\n\n" + second)
    assert as_dict(report) == {
        "probable": False,
        **DEFAULTS,
        **EXPECTED["synth-torch-2.x-allowed.txt"],
    }


def test_two_messages_with_the_first_cut_take_nothing_from_the_second() -> None:
    first = read("synth-torch-2.x-allowed.txt")
    second = read("torch-2.11-cuda13-h100-plain.txt")
    report = parse(first[: first.index("Of the")] + second)
    assert report.allowed_bytes == G(7.88)
    assert report.allocated_bytes is None and report.reserved_unallocated_bytes is None
    assert report.truncated


def test_xpu_without_free_clause() -> None:
    text = (
        "XPU out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 15.11 GiB. "
        "Of the allocated memory 13.50 GiB is allocated by PyTorch, and 102.00 MiB is reserved by "
        "PyTorch but unallocated. Please use `empty_cache` to release all unoccupied cached memory."
    )
    report = parse(text)
    assert (report.total_bytes, report.free_bytes) == (G(15.11), None)
    assert report.reserved_bytes == G(13.50) + M(102.00)
    assert report.truncated is False


def test_mps_without_watermark_and_with_binary_units() -> None:
    report = parse(
        "MPS backend out of memory (MPS allocated: 42.28 GiB, other allocations: 720.00 KiB). "
        "Tried to allocate 384.00 MiB on shared pool."
    )
    assert (report.allocated_bytes, report.other_allocations_bytes) == (G(42.28), K(720.00))
    assert (report.allowed_bytes, report.requested_bytes, report.pool) == (None, M(384), "shared")
    assert (report.hint, report.truncated) == (None, False)


def test_malloc_async_with_a_fraction_set() -> None:
    text = read("synth-cuda-malloc-async.txt").replace("17179869184.00 GiB", "8.00 GiB")
    assert parse(text).allowed_bytes == G(8)
    assert parse(text[: text.index("PyTorch limit")]).truncated


def test_sizes_in_bytes_kib_and_tib() -> None:
    report = parse(
        "CUDA out of memory. Tried to allocate 512 bytes. GPU 0 has a total capacity of 1.50 TiB "
        "of which 1023.99 KiB is free."
    )
    assert (report.requested_bytes, report.total_bytes) == (512, int(1.5 * (1 << 40)))
    assert report.free_bytes == K(1023.99)


@pytest.mark.parametrize(
    ("report", "label"),
    [
        (OOMReport("alloc_v2", "CUDA", False, "", device_index=0), "CUDA GPU 0"),
        (OOMReport("alloc_v1", "HIP", False, "", device_index=3), "HIP GPU 3"),
        (OOMReport("runtime", "CUDA", False, ""), "CUDA GPU"),
        (OOMReport("mps", "MPS", False, ""), "MPS"),
        (OOMReport("cpu", "CPU", False, ""), "CPU"),
        (OOMReport("alloc_v2", "", False, "", device_index=1), "GPU 1"),
        (OOMReport("maybe", "", True, ""), "GPU"),
    ],
)
def test_device_label(report: OOMReport, label: str) -> None:
    assert report.device_label == label


# --- hostile input --------------------------------------------------------------------------


def _random_junk() -> str:
    rng = random.Random(7)
    return "".join(rng.choice("0123456789. ;:()GiBMKbytesCUDAoutfmry,\n") for _ in range(1_000_000))


JUNK: dict[str, Callable[[], str]] = {
    "digits": lambda: "1" * 1_000_000,
    "dotted digits": lambda: "1." * 500_000,
    "endless request": lambda: "CUDA out of memory. Tried to allocate " + "9" * 1_000_000,
    "process clauses": lambda: (
        "CUDA out of memory. Tried to allocate 1 bytes. " + "Process 1 has 2" * 70_000
    ),
    "repeated head": lambda: "CUDA out of memory " * 55_000,
    "v1 sizes": lambda: (
        "CUDA out of memory. Tried to allocate 1.00 GiB (GPU 0; " + "1.5 GiB " * 125_000
    ),
    "mps sizes": lambda: "MPS backend out of memory (MPS allocated: " + "1.0 " * 250_000,
    "allowed": lambda: " 1.5 GiB allowed" * 62_500,
    "class prefixes": lambda: "Error: " * 150_000 + "CUDA error: out of memory",
    "cpu digits": lambda: (
        "DefaultCPUAllocator: can't allocate memory: you tried to allocate " + "7" * 1_000_000
    ),
    "random": _random_junk,
}


@pytest.mark.parametrize("name", sorted(JUNK))
def test_a_megabyte_of_junk_completes(name: str) -> None:
    text = JUNK[name]()
    # It must complete (no catastrophic backtracking); how fast is not asserted.
    report = parse_oom_message(text)
    assert (find_oom(RuntimeError(text)) is None) == (report is None)


# --- find_oom -------------------------------------------------------------------------------

V2_TEXT = read("torch-2.11-cuda13-h100-plain.txt")


def raised(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as e:
        return e


def test_torch_out_of_memory_error() -> None:
    torch = pytest.importorskip("torch")
    exc = torch.OutOfMemoryError(V2_TEXT)
    found = find_oom(exc)
    assert found is not None and found[0] is exc
    assert as_dict(found[1]) == {"probable": False, **DEFAULTS, **V2_PLAIN}
    assert torch.cuda.OutOfMemoryError is torch.OutOfMemoryError
    assert is_oom(exc)


def test_torch_oom_with_unknown_text_is_unparsed_cuda() -> None:
    torch = pytest.importorskip("torch")
    exc = torch.OutOfMemoryError("out of  memory")
    found = find_oom(exc)
    assert found is not None and found[0] is exc
    assert (found[1].kind, found[1].backend, found[1].message) == (
        "unparsed",
        "CUDA",
        "out of memory",
    )
    assert found[1].requested_bytes is None


def test_real_cpu_allocation_failure() -> None:
    torch = pytest.importorskip("torch")
    with pytest.raises(RuntimeError) as info:
        torch.empty(1 << 50, dtype=torch.uint8)
    found = find_oom(info.value)
    assert found is not None and found[0] is info.value
    assert (found[1].kind, found[1].backend, found[1].requested_bytes) == ("cpu", "CPU", 1 << 50)


def test_accelerator_error_with_runtime_text() -> None:
    torch = pytest.importorskip("torch")
    exc = torch.AcceleratorError(read("synth-cuda-runtime-error.txt"))
    found = find_oom(exc)
    assert found is not None and found[1].kind == "runtime"


def test_oom_behind_a_wrapper_raised_from_it() -> None:
    torch = pytest.importorskip("torch")
    oom = torch.OutOfMemoryError(V2_TEXT)
    try:
        try:
            raise oom
        except RuntimeError as e:
            raise RuntimeError("wrapper") from e
    except RuntimeError as wrapper:
        found = find_oom(wrapper)
    assert found is not None and found[0] is oom


def test_oom_in_the_context_of_another_error() -> None:
    torch = pytest.importorskip("torch")
    oom = torch.OutOfMemoryError(V2_TEXT)
    try:
        try:
            raise oom
        except RuntimeError:
            raise ValueError("while cleaning up") from None
    except ValueError as outer:
        found = find_oom(outer)  # a suppressed context still pins the failed frames
    assert found is not None and found[0] is oom


def test_torch_class_wins_over_a_wrapper_quoting_its_text() -> None:
    torch = pytest.importorskip("torch")
    oom = torch.OutOfMemoryError(V2_TEXT)
    wrapper = RuntimeError(f"batch 3 failed: {V2_TEXT}")
    wrapper.__cause__ = oom
    found = find_oom(wrapper)
    assert found is not None and found[0] is oom


def test_runtime_error_with_oom_text_counts() -> None:
    exc = RuntimeError(V2_TEXT)
    found = find_oom(exc)
    assert found is not None and found[0] is exc and found[1].kind == "alloc_v2"


def test_probable_status_counts_and_says_so() -> None:
    found = find_oom(RuntimeError(read("synth-cudnn-not-supported.txt")))
    assert found is not None and found[1].probable and found[1].kind == "maybe"
    assert is_oom(RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR"))


@pytest.mark.parametrize(
    "exc",
    [
        ZeroDivisionError("division by zero"),
        MemoryError(),
        MemoryError(V2_TEXT),
        ValueError(V2_TEXT),
        TypeError("CUDA error: out of memory"),
        KeyboardInterrupt(),
        RuntimeError("shape mismatch"),
        Exception(V2_TEXT),
    ],
)
def test_not_an_oom_exception(exc: BaseException) -> None:
    assert find_oom(exc) is None
    assert is_oom(exc) is False


def test_none() -> None:
    assert find_oom(None) is None and is_oom(None) is False


def test_torch_class_recognised_by_name_and_module_through_the_mro() -> None:
    lookalike = type("OutOfMemoryError", (RuntimeError,), {"__module__": "torch.cuda"})
    found = find_oom(lookalike("?"))
    assert found is not None and found[1].kind == "unparsed"
    stranger = type("OutOfMemoryError", (RuntimeError,), {"__module__": "torchvision_extras"})
    assert find_oom(stranger("?")) is None
    assert find_oom(stranger(V2_TEXT)) is not None  # still a RuntimeError with an OOM text


def test_subclass_of_torch_oom() -> None:
    torch = pytest.importorskip("torch")

    class MyOOM(torch.OutOfMemoryError):
        pass

    found = find_oom(MyOOM("no numbers here"))
    assert found is not None and found[1].kind == "unparsed"


def test_cycle_in_the_chain_ends() -> None:
    a, b = ValueError("a"), ValueError("b")
    a.__context__, b.__context__ = b, a
    b.__cause__ = a
    assert find_oom(a) is None


def test_chain_is_bounded() -> None:
    bottom = RuntimeError(V2_TEXT)
    near, top = bottom, bottom
    for i in range(1000):
        top = ValueError(i)
        top.__context__ = near
        near = top
        if i == 5:
            shallow = top
    assert find_oom(shallow) is not None
    assert find_oom(top) is None  # more than 32 links deep: not looked for


def test_oom_inside_an_exception_group() -> None:
    group_cls = getattr(builtins, "ExceptionGroup", None)
    if group_cls is None:
        pytest.skip("no ExceptionGroup before Python 3.11")
    group = group_cls("tasks", [ValueError("x"), RuntimeError(V2_TEXT)])
    found = find_oom(group)
    assert found is not None and found[1].kind == "alloc_v2"


def test_a_broken_str_does_not_break_find_oom() -> None:
    class Broken(RuntimeError):
        def __str__(self) -> str:
            raise RuntimeError("no")

    assert find_oom(Broken()) is None
    lookalike = type("OutOfMemoryError", (Broken,), {"__module__": "torch"})
    found = find_oom(lookalike())
    assert found is not None and found[1].kind == "unparsed" and found[1].message == ""


def test_raised_exception_with_traceback() -> None:
    exc = raised(RuntimeError(read("synth-cpu-alloc.txt")))
    assert exc.__traceback__ is not None
    found = find_oom(exc)
    assert found is not None and found[1].requested_bytes == 85899345920


# --- the one chain walker, shared with the release ----------------------------------------------


def test_walk_chain_follows_cause_context_and_group_members_once_each() -> None:
    group_cls = getattr(builtins, "BaseExceptionGroup", None)
    cause, context, member = ValueError("cause"), KeyError("context"), RuntimeError("member")
    top = RuntimeError("top")
    top.__cause__, top.__context__ = cause, context
    cause.__context__ = context  # reached twice, walked once
    walked = list(walk_chain(top))
    assert walked == [top, cause, context]
    if group_cls is not None:
        group = group_cls("g", [member, cause])
        assert list(walk_chain(group)) == [group, member, cause, context]
    assert list(walk_chain(None)) == []


def test_walk_chain_is_bounded_and_cycle_safe() -> None:
    a, b = ValueError("a"), ValueError("b")
    a.__context__, b.__cause__ = b, a
    assert list(walk_chain(a)) == [a, b]
    top: BaseException = ValueError(0)
    for i in range(1, 100):
        nxt = ValueError(i)
        nxt.__context__ = top
        top = nxt
    assert len(list(walk_chain(top))) == 32
    assert len(list(walk_chain(top, limit=5))) == 5


def _frame_holding(obj: object, exc: BaseException) -> BaseException:
    def fail(held: object) -> None:
        raise exc

    try:
        fail(obj)
    except BaseException as e:
        return e
    raise AssertionError


def test_the_release_frees_every_exception_the_walker_finds() -> None:
    """Plain objects, no torch: a cause's and a context's frames are both cleared."""
    import gc
    import weakref

    from jupyter_gpumem.readings.release import release_failed_cell

    class Big:
        pass

    a, b = Big(), Big()
    refs = [weakref.ref(a), weakref.ref(b)]
    context = _frame_holding(a, RuntimeError("CUDA out of memory."))
    cause = _frame_holding(b, ValueError("bad batch"))
    top = RuntimeError("step failed")
    top.__cause__, top.__context__ = cause, context
    del a, b
    gc.collect()
    assert all(r() is not None for r in refs)
    result = release_failed_cell(None, top)
    assert "frame locals" in result.cleared
    assert [r() for r in refs] == [None, None]
