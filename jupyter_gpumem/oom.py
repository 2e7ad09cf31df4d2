"""Recognise an out-of-memory error and read the numbers its message carries.

Stdlib only, and torch is never imported: the hook calls :func:`find_oom` on every exception a cell
raises, torch or not. Torch's classes are recognised by name and module through the MRO.

Formats read (sizes as c10's ``format_size`` prints them; MPS's ``KB/MB/GB`` are binary too):

- ``alloc_v2``: torch >= 2.1 caching allocator (CUDA, HIP, XPU; 2.1 spelled it "total capacty"),
  and the ``cudaMallocAsync`` backend's "Allocation on device N would exceed allowed memory".
- ``alloc_v1``: torch 1.x "(GPU 0; X total capacity; ...)", "cached" up to 1.4.
- ``mps``, ``cpu`` (``DefaultCPUAllocator``), ``library`` (cuBLAS/cuDNN/cuFFT/... ``ALLOC_FAILED``),
  ``runtime`` (``CUDA error: out of memory``), ``nccl`` (``Cuda failure 'out of memory'``).
- ``maybe``: statuses that are often, not always, an OOM (``probable=True``).
- ``unparsed``: "CUDA out of memory" in no known layout, or a torch OOM class whose text is unknown.

Messages are read after collapsing whitespace (logs re-wrap them) and may be cut anywhere: a size is
kept only when its unit is complete and the text that must follow it is there, so a field is either
right or ``None``; ``truncated`` says the text stopped before its format's end.
"""

from __future__ import annotations

import builtins
import re
from collections.abc import Iterator
from dataclasses import dataclass

from .units import GiB, KiB, MiB

__all__ = [
    "OOMReport",
    "ProcessUsage",
    "find_oom",
    "is_oom",
    "parse_oom_message",
    "walk_chain",
]

_UNITS = {
    "bytes": 1, "KiB": KiB, "KB": KiB, "MiB": MiB, "MB": MiB,
    "GiB": GiB, "GB": GiB, "TiB": 1 << 40, "TB": 1 << 40,
}  # fmt: skip
# Every size pattern is preceded by literal text (or a boundary lookbehind), never scanned for
# bare: a leading ``\d+`` tried at every offset of a long digit run is quadratic.
_SIZE = r"\d+(?:\.\d+)? (?:bytes|[KMGT]i?B)"
_V = rf"(?P<v>{_SIZE})"
# cudaMallocAsync prints SIZE_MAX ("17179869184.00 GiB") when no fraction was set: no cap at all.
_NO_LIMIT = 1 << 63
_GPU_BACKENDS = ("CUDA", "HIP", "XPU")
_MAX_CHAIN = 32


@dataclass(frozen=True)
class ProcessUsage:
    """Another process on the device, as NVML listed it (in containers, a host pid)."""

    pid: int
    used_bytes: int


@dataclass(frozen=True)
class OOMReport:
    """What one OOM message says; ``None`` wherever the message does not say (or was cut)."""

    kind: str
    backend: str
    probable: bool
    message: str
    requested_bytes: int | None = None
    device_index: int | None = None
    total_bytes: int | None = None
    free_bytes: int | None = None
    allowed_bytes: int | None = None
    process_used_bytes: int | None = None
    allocated_bytes: int | None = None
    reserved_bytes: int | None = None
    reserved_unallocated_bytes: int | None = None
    private_pools_bytes: int | None = None
    other_allocations_bytes: int | None = None
    other_processes: tuple[ProcessUsage, ...] = ()
    status: str | None = None
    hint: str | None = None
    truncated: bool = False
    pool: str | None = None

    @property
    def device_label(self) -> str:
        """``CUDA GPU 0``, ``MPS``, ``CPU``; ``GPU`` when the message does not say."""
        if self.backend in ("MPS", "CPU"):
            return self.backend
        label = f"{self.backend} GPU" if self.backend else "GPU"
        return label if self.device_index is None else f"{label} {self.device_index}"


# --- patterns -------------------------------------------------------------------------------

_CLASS_PREFIX = re.compile(r"(?:[A-Za-z_][\w.]{0,100}(?:Error|Exception): )+")
# "Out of memory." with no backend word is how out-of-tree (PrivateUse1) allocators may word it.
_OOM_WORDS = re.compile(r"\b(?:(?P<backend>[A-Z][A-Z0-9]{1,7}) out of memory|Out of memory)\b")
_TRIED = ". Tried to allocate "
_REQUESTED = re.compile(rf"{_V}(?P<sep>\.| \(|\Z)")

_V2_DEVICE = re.compile(r"\bGPU (?P<d>\d+) has a total capac")
_V2_TOTAL = re.compile(rf"\bhas a total capac(?:i)?ty of {_V}(?= of which |\.)")
_V2_FREE = re.compile(rf"\bof which {_V} is free\b")
_V2_SELF = re.compile(rf"\bthis process has {_V} memory in use\b")
_V2_PROC = re.compile(rf"\bProcess (?P<pid>\d+) has {_V} memory in use\b")
_V2_ALLOWED = re.compile(rf"(?<![\w.]){_V} allowed;")
_V2_ALLOCATED = re.compile(rf"\bOf the allocated memory {_V} is allocated by PyTorch\b")
_V2_PRIVATE = re.compile(rf"\bwith {_V} allocated in private pools\b")
_V2_UNALLOCATED = re.compile(rf"\band {_V} is reserved by PyTorch but unallocated\b")

_V1_DEVICE = re.compile(r"\([A-Z]{2,5} (?P<d>\d+); ")
_V1_TOTAL = re.compile(rf"; {_V} total capacity;")
_V1_ALLOCATED = re.compile(rf"; {_V} already allocated;")
_V1_FREE = re.compile(rf"; {_V} free;")
_V1_ALLOWED = re.compile(rf"; {_V} allowed;")
_V1_RESERVED = re.compile(rf"; {_V} (?:reserved in total by PyTorch|cached)\)")

_ASYNC_HEAD = re.compile(r"\bAllocation on device (?P<d>\d+) would exceed allowed memory\b")
_ASYNC_ALLOCATED = re.compile(rf"\bCurrently allocated : {_V}(?= |\Z)")
_ASYNC_REQUESTED = re.compile(rf"\bRequested : {_V}(?= |\Z)")
_ASYNC_TOTAL = re.compile(rf"\bDevice limit : {_V}(?= |\Z)")
_ASYNC_FREE = re.compile(rf"\bFree \(according to CUDA\): {_V}(?= |\Z)")
_ASYNC_LIMIT = re.compile(
    rf"\bPyTorch limit \(set by user-supplied memory fraction\) : {_V}(?= |\Z)"
)

_MPS_HEAD = re.compile(r"\bMPS backend out of memory\b")
_MPS_ALLOCATED = re.compile(rf"\(MPS allocated: {_V}[,)]")
_MPS_OTHER = re.compile(rf"\bother allocations: {_V}[,)]")
_MPS_ALLOWED = re.compile(rf"\bmax allowed: {_V}\)")
_MPS_REQUESTED = re.compile(rf"\bTried to allocate {_V} on ")
_MPS_POOL = re.compile(r"\bon (?P<pool>shared|private) pool\b")

_CPU_HEAD = re.compile(r"\bDefaultCPUAllocator: (?:can't allocate memory|not enough memory)")
_CPU_REQUESTED = re.compile(r"\byou tried to allocate (?P<n>\d+) bytes\b")

_LIBRARY = re.compile(
    r"\b(?:(?:CUBLAS|CUSOLVER|CUSPARSE|CUDNN|CURAND|HIPBLAS|HIPSOLVER|HIPSPARSE)_STATUS_"
    r"(?:ALLOC_FAILED|ALLOCATION_FAILED|NOT_ENOUGH_WORKSPACE"
    r"|INTERNAL_ERROR_(?:DEVICE|HOST)_ALLOCATION_FAILED)"
    r"|(?:CUFFT|HIPFFT)_ALLOC_FAILED|miopenStatusAllocFailed|rocblas_status_memory_error)\b"
)
_RUNTIME = re.compile(
    r"\b(?:CUDA|HIP|cuda)(?: driver| runtime)? error(?: \(2\) ?)?:? out of memory\b"
    r"|\b(?P<code>cudaErrorMemoryAllocation|CUDA_ERROR_OUT_OF_MEMORY|hipErrorOutOfMemory"
    r"|UR_RESULT_ERROR_OUT_OF_DEVICE_MEMORY)\b|\bMODULE:PT_DEVMEM Allocation failed\b"
)
_NCCL = re.compile(r"\bCuda failure (?:\d+ )?'out of memory'|\bFailed to CUDA calloc\b")
# Raised when a library cannot get its workspace, but also for bad inputs or broken installs:
# CUBLAS_STATUS_EXECUTION_FAILED is left out, it is nearly always a bad index, not memory.
_MAYBE = re.compile(
    r"\b(?:CUDNN_STATUS_(?:NOT_INITIALIZED|INTERNAL_ERROR|EXECUTION_FAILED|NOT_SUPPORTED)"
    r"|CUBLAS_STATUS_NOT_INITIALIZED|ncclUnhandledCudaError)\b"
)
_HINT = re.compile(
    r"\btry setting (?:PYTORCH_(?:CUDA_|HIP_|XPU_)?ALLOC_CONF=(?P<a>expandable_segments)\b"
    r"|(?P<b>max_split_size_mb)\b)|\b(?P<c>PYTORCH_MPS_HIGH_WATERMARK_RATIO)\b"
)
# What torch writes after the numbers, and what closes a part that varies (a URL): a text that
# stops inside one of these was cut. Anything else after the numbers is someone else's text.
_TRAILERS = (
    (
        "If reserved but unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF="
        "expandable_segments:True to avoid fragmentation. See documentation for Memory Management (",
        ")",
    ),
    (
        "If reserved but unallocated memory is large try setting PYTORCH_HIP_ALLOC_CONF="
        "expandable_segments:True to avoid fragmentation. See documentation for Memory Management (",
        ")",
    ),
    (
        "If reserved but unallocated memory is large try setting max_split_size_mb to avoid "
        "fragmentation. See documentation for Memory Management and PYTORCH_CUDA_ALLOC_CONF",
        "",
    ),
    (
        "If reserved memory is >> allocated memory try setting max_split_size_mb to avoid "
        "fragmentation. See documentation for Memory Management and PYTORCH_CUDA_ALLOC_CONF",
        "",
    ),
    ("Please use `empty_cache` to release all unoccupied cached memory.", ""),
    (
        "Use PYTORCH_MPS_HIGH_WATERMARK_RATIO=0.0 to disable upper limit for memory allocations "
        "(may cause system failure).",
        "",
    ),
    ("Error code ", ")"),
)


# --- parsing --------------------------------------------------------------------------------


def _to_bytes(size: str) -> int:
    num, unit = size.split(" ")
    return int(float(num) * _UNITS[unit])


def _size(rx: re.Pattern[str], text: str, start: int, end: int) -> int | None:
    m = rx.search(text, start, end)
    return _to_bytes(m.group("v")) if m else None


def _int(rx: re.Pattern[str], text: str, start: int, end: int) -> int | None:
    m = rx.search(text, start, end)
    return int(m.group("d")) if m else None


def _hint(text: str, start: int, end: int) -> str | None:
    m = _HINT.search(text, start, end)
    return (m.group("a") or m.group("b") or m.group("c")) if m else None


def _cut_short(text: str, body_end: int, trailer_expected: bool) -> bool:
    """Whether the text after a complete body stops inside torch's own closing words."""
    rest = text[body_end:].lstrip(". ")
    if not rest:
        return trailer_expected
    for fixed, closing in _TRAILERS:
        if rest.startswith(fixed):
            return bool(closing) and closing not in rest[len(fixed) :]
        if fixed.startswith(rest):
            return True
    return False


def _normalise(message: str) -> str:
    text = " ".join(message.split())
    m = _CLASS_PREFIX.match(text)
    return text[m.end() :] if m else text


def _parse_mps(text: str) -> OOMReport | None:
    head = _MPS_HEAD.search(text)
    if head is None:
        return None
    start = head.end()
    nxt = _MPS_HEAD.search(text, start)
    end = nxt.start() if nxt else len(text)
    allowed = _size(_MPS_ALLOWED, text, start, end)
    pool = _MPS_POOL.search(text, start, end)
    return OOMReport(
        kind="mps",
        backend="MPS",
        probable=False,
        message=text,
        requested_bytes=_size(_MPS_REQUESTED, text, start, end),
        allocated_bytes=_size(_MPS_ALLOCATED, text, start, end),
        other_allocations_bytes=_size(_MPS_OTHER, text, start, end),
        allowed_bytes=allowed,
        pool=pool.group("pool") if pool else None,
        hint=_hint(text, start, end),
        # Only the capped allocator (a "max allowed") goes on to name the watermark variable.
        truncated=pool is None or _cut_short(text, pool.end(), allowed is not None),
    )


def _parse_alloc(text: str) -> OOMReport | None:
    loose: OOMReport | None = None
    for m in _OOM_WORDS.finditer(text):
        word = m.group("backend")
        backend = word if word in _GPU_BACKENDS else ""
        at = m.end()
        if text.startswith(_TRIED, at):
            return _parse_allocator(text, at + len(_TRIED), backend)
        if len(text) - at < len(_TRIED) and _TRIED.startswith(text[at:]):
            return OOMReport("alloc_v2", backend, False, text, truncated=True)
        if backend and loose is None:
            loose = OOMReport("unparsed", backend, False, text)
    return loose


def _parse_allocator(text: str, at: int, backend: str) -> OOMReport:
    nxt = _OOM_WORDS.search(text, at)
    end = nxt.start() if nxt else len(text)
    req = _REQUESTED.match(text, at, end)
    requested = _to_bytes(req.group("v")) if req else None
    if req is not None and req.group("sep") == " (":
        return _parse_v1(text, at, end, backend, requested)
    body = _V2_UNALLOCATED.search(text, at, end)
    body_end = body.end() if body else end
    allocated = _size(_V2_ALLOCATED, text, at, body_end)
    unallocated = _to_bytes(body.group("v")) if body else None
    reserved = None if allocated is None or unallocated is None else allocated + unallocated
    procs = tuple(
        ProcessUsage(int(p.group("pid")), _to_bytes(p.group("v")))
        for p in _V2_PROC.finditer(text, at, body_end)
    )
    return OOMReport(
        kind="alloc_v2",
        backend=backend,
        probable=False,
        message=text,
        requested_bytes=requested,
        device_index=_int(_V2_DEVICE, text, at, body_end),
        total_bytes=_size(_V2_TOTAL, text, at, body_end),
        free_bytes=_size(_V2_FREE, text, at, body_end),
        allowed_bytes=_size(_V2_ALLOWED, text, at, body_end),
        process_used_bytes=_size(_V2_SELF, text, at, body_end),
        allocated_bytes=allocated,
        reserved_bytes=reserved,
        reserved_unallocated_bytes=unallocated,
        private_pools_bytes=_size(_V2_PRIVATE, text, at, body_end),
        other_processes=procs,
        hint=_hint(text, body_end, end) if body else None,
        truncated=body is None or _cut_short(text[:end], body_end, True),
    )


def _parse_v1(text: str, at: int, end: int, backend: str, requested: int | None) -> OOMReport:
    body = _V1_RESERVED.search(text, at, end)
    body_end = body.end() if body else end
    return OOMReport(
        kind="alloc_v1",
        backend=backend,
        probable=False,
        message=text,
        requested_bytes=requested,
        device_index=_int(_V1_DEVICE, text, at, body_end),
        total_bytes=_size(_V1_TOTAL, text, at, body_end),
        free_bytes=_size(_V1_FREE, text, at, body_end),
        allowed_bytes=_size(_V1_ALLOWED, text, at, body_end),
        allocated_bytes=_size(_V1_ALLOCATED, text, at, body_end),
        reserved_bytes=_to_bytes(body.group("v")) if body else None,
        hint=_hint(text, body_end, end) if body else None,
        truncated=body is None or _cut_short(text[:end], body_end, False),
    )


def _parse_async(text: str) -> OOMReport | None:
    head = _ASYNC_HEAD.search(text)
    if head is None:
        return None
    start = head.end()
    nxt = _ASYNC_HEAD.search(text, start)
    end = nxt.start() if nxt else len(text)
    limit = _ASYNC_LIMIT.search(text, start, end)
    allowed = _to_bytes(limit.group("v")) if limit else None
    return OOMReport(
        kind="alloc_v2",
        backend="CUDA",
        probable=False,
        message=text,
        requested_bytes=_size(_ASYNC_REQUESTED, text, start, end),
        device_index=int(head.group("d")),
        total_bytes=_size(_ASYNC_TOTAL, text, start, end),
        free_bytes=_size(_ASYNC_FREE, text, start, end),
        allowed_bytes=allowed if allowed is not None and allowed < _NO_LIMIT else None,
        allocated_bytes=_size(_ASYNC_ALLOCATED, text, start, end),
        truncated=limit is None,
    )


def _parse_cpu(text: str) -> OOMReport | None:
    head = _CPU_HEAD.search(text)
    if head is None:
        return None
    req = _CPU_REQUESTED.search(text, head.end())
    return OOMReport(
        kind="cpu",
        backend="CPU",
        probable=False,
        message=text,
        requested_bytes=int(req.group("n")) if req else None,
        truncated=req is None or _cut_short(text, req.end(), False),
    )


def _backend_of(word: str) -> str:
    word = word.upper()
    if word.startswith(("CU", "NCCL")):
        return "CUDA"
    if word.startswith(("HIP", "MIOPEN", "ROCBLAS")):
        return "HIP"
    return "XPU" if word.startswith("UR_") else ""


def _parse_status(text: str) -> OOMReport | None:
    m = _LIBRARY.search(text)
    if m:
        return OOMReport("library", _backend_of(m.group(0)), False, text, status=m.group(0))
    m = _RUNTIME.search(text)
    if m:
        return OOMReport("runtime", _backend_of(m.group(0)), False, text, status=m.group("code"))
    if _NCCL.search(text):
        return OOMReport("nccl", "CUDA", False, text)
    m = _MAYBE.search(text)
    if m:
        return OOMReport("maybe", _backend_of(m.group(0)), True, text, status=m.group(0))
    return None


def parse_oom_message(message: str) -> OOMReport | None:
    """``None`` when the text is not an OOM (nor a probable one).

    ``message`` in the report is the text with whitespace collapsed and any leading class names
    (``torch.OutOfMemoryError: ``) removed.
    """
    text = _normalise(message)
    loose: OOMReport | None = None
    for parse in (_parse_mps, _parse_alloc, _parse_async, _parse_cpu, _parse_status):
        report = parse(text)
        if report is not None and report.kind != "unparsed":
            return report
        # A loose "CUDA out of memory" loses to any known layout found further on.
        loose = loose or report
    return loose


# --- exceptions -----------------------------------------------------------------------------


def _is_torch_oom(cls: type) -> bool:
    for c in cls.__mro__:
        module = getattr(c, "__module__", "") or ""
        if c.__name__ == "OutOfMemoryError" and (module == "torch" or module.startswith("torch.")):
            return True
    return False


_GROUP: type | None = getattr(builtins, "BaseExceptionGroup", None)


def walk_chain(exc: BaseException | None, limit: int = _MAX_CHAIN) -> Iterator[BaseException]:
    """``exc``, then its causes, contexts and (for a group) members, depth first, once each.

    The one walker of an exception chain: what :func:`find_oom` searches is what the release
    frees. At most ``limit`` exceptions, so a cycle or a 1000-deep chain ends. Suppressed contexts
    (``raise X from None``) are walked too: the OOM still happened and its frames still pin memory.
    """
    seen: set[int] = set()
    stack = [exc] if isinstance(exc, BaseException) else []
    while stack and len(seen) < limit:
        e = stack.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        nxt: list[object] = [e.__cause__, e.__context__]
        if _GROUP is not None and isinstance(e, _GROUP):
            nxt.extend(getattr(e, "exceptions", ()))
        stack.extend(n for n in reversed(nxt) if isinstance(n, BaseException))


def _text(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:  # a broken __str__ must not break the hook
        return ""


def find_oom(exc: BaseException | None) -> tuple[BaseException, OOMReport] | None:
    """The OOM in ``exc`` or its ``__cause__``/``__context__`` chain, and its report.

    A torch ``OutOfMemoryError`` anywhere in the chain wins (``kind="unparsed"`` if its text is
    unknown); otherwise the first ``RuntimeError`` (torch raises every other OOM as one, e.g.
    ``AcceleratorError``) whose message parses. Other classes never count, whatever their text:
    Python's ``MemoryError`` is host memory, and a library that re-raises an OOM as a
    ``ValueError`` keeps the original in the chain, where it is found.
    """
    if exc is None:
        return None
    fallback: tuple[BaseException, OOMReport] | None = None
    for e in walk_chain(exc):
        if _is_torch_oom(type(e)):
            text = _text(e)
            report = parse_oom_message(text)
            return e, report or OOMReport("unparsed", "CUDA", False, _normalise(text))
        if fallback is None and isinstance(e, RuntimeError):
            report = parse_oom_message(_text(e))
            if report is not None:
                fallback = (e, report)
    return fallback


def is_oom(exc: BaseException | None) -> bool:
    """Whether :func:`find_oom` finds one (probable OOMs included)."""
    return find_oom(exc) is not None
