"""The layouts of the out-of-memory messages ``oom`` reads, as patterns; stdlib only.

Formats read (sizes as c10's ``format_size`` prints them; MPS's ``KB/MB/GB`` are binary too):

- ``alloc_v2``: torch >= 2.1 caching allocator (CUDA, HIP, XPU; 2.1 spelled it "total capacty"),
  and the ``cudaMallocAsync`` backend's "Allocation on device N would exceed allowed memory".
- ``alloc_v1``: torch 1.x "(GPU 0; X total capacity; ...)", "cached" up to 1.4.
- ``mps``, ``cpu`` (``DefaultCPUAllocator``), ``library`` (cuBLAS/cuDNN/cuFFT/... ``ALLOC_FAILED``),
  ``runtime`` (``CUDA error: out of memory``), ``nccl`` (``Cuda failure 'out of memory'``).
- ``maybe``: statuses that are often, not always, an OOM (``probable=True``).
- ``unparsed``: "CUDA out of memory" in no known layout, or a torch OOM class whose text is unknown.

Apart from the parsing (``oom``) so that each layout reads whole, next to the ones it must not be
taken for; a pattern's name is its format and field (``V2_FREE``: torch 2's "of which X is free").
"""

from __future__ import annotations

import re

from jupyter_gpumem.units import GiB, KiB, MiB

UNITS = {
    "bytes": 1, "KiB": KiB, "KB": KiB, "MiB": MiB, "MB": MiB,
    "GiB": GiB, "GB": GiB, "TiB": 1 << 40, "TB": 1 << 40,
}  # fmt: skip
# Every size pattern is preceded by literal text (or a boundary lookbehind), never scanned for
# bare: a leading ``\d+`` tried at every offset of a long digit run is quadratic.
SIZE = r"\d+(?:\.\d+)? (?:bytes|[KMGT]i?B)"
V = rf"(?P<v>{SIZE})"
# cudaMallocAsync prints SIZE_MAX ("17179869184.00 GiB") when no fraction was set: no cap at all.
NO_LIMIT = 1 << 63
GPU_BACKENDS = ("CUDA", "HIP", "XPU")


CLASS_PREFIX = re.compile(r"(?:[A-Za-z_][\w.]{0,100}(?:Error|Exception): )+")
# "Out of memory." with no backend word is how out-of-tree (PrivateUse1) allocators may word it.
OOM_WORDS = re.compile(r"\b(?:(?P<backend>[A-Z][A-Z0-9]{1,7}) out of memory|Out of memory)\b")
TRIED = ". Tried to allocate "
REQUESTED = re.compile(rf"{V}(?P<sep>\.| \(|\Z)")

V2_DEVICE = re.compile(r"\bGPU (?P<d>\d+) has a total capac")
V2_TOTAL = re.compile(rf"\bhas a total capac(?:i)?ty of {V}(?= of which |\.)")
V2_FREE = re.compile(rf"\bof which {V} is free\b")
V2_SELF = re.compile(rf"\bthis process has {V} memory in use\b")
V2_PROC = re.compile(rf"\bProcess (?P<pid>\d+) has {V} memory in use\b")
V2_ALLOWED = re.compile(rf"(?<![\w.]){V} allowed;")
V2_ALLOCATED = re.compile(rf"\bOf the allocated memory {V} is allocated by PyTorch\b")
V2_PRIVATE = re.compile(rf"\bwith {V} allocated in private pools\b")
V2_UNALLOCATED = re.compile(rf"\band {V} is reserved by PyTorch but unallocated\b")

V1_DEVICE = re.compile(r"\([A-Z]{2,5} (?P<d>\d+); ")
V1_TOTAL = re.compile(rf"; {V} total capacity;")
V1_ALLOCATED = re.compile(rf"; {V} already allocated;")
V1_FREE = re.compile(rf"; {V} free;")
V1_ALLOWED = re.compile(rf"; {V} allowed;")
V1_RESERVED = re.compile(rf"; {V} (?:reserved in total by PyTorch|cached)\)")

ASYNC_HEAD = re.compile(r"\bAllocation on device (?P<d>\d+) would exceed allowed memory\b")
ASYNC_ALLOCATED = re.compile(rf"\bCurrently allocated : {V}(?= |\Z)")
ASYNC_REQUESTED = re.compile(rf"\bRequested : {V}(?= |\Z)")
ASYNC_TOTAL = re.compile(rf"\bDevice limit : {V}(?= |\Z)")
ASYNC_FREE = re.compile(rf"\bFree \(according to CUDA\): {V}(?= |\Z)")
ASYNC_LIMIT = re.compile(rf"\bPyTorch limit \(set by user-supplied memory fraction\) : {V}(?= |\Z)")

MPS_HEAD = re.compile(r"\bMPS backend out of memory\b")
MPS_ALLOCATED = re.compile(rf"\(MPS allocated: {V}[,)]")
MPS_OTHER = re.compile(rf"\bother allocations: {V}[,)]")
MPS_ALLOWED = re.compile(rf"\bmax allowed: {V}\)")
MPS_REQUESTED = re.compile(rf"\bTried to allocate {V} on ")
MPS_POOL = re.compile(r"\bon (?P<pool>shared|private) pool\b")

CPU_HEAD = re.compile(r"\bDefaultCPUAllocator: (?:can't allocate memory|not enough memory)")
CPU_REQUESTED = re.compile(r"\byou tried to allocate (?P<n>\d+) bytes\b")

LIBRARY = re.compile(
    r"\b(?:(?:CUBLAS|CUSOLVER|CUSPARSE|CUDNN|CURAND|HIPBLAS|HIPSOLVER|HIPSPARSE)_STATUS_"
    r"(?:ALLOC_FAILED|ALLOCATION_FAILED|NOT_ENOUGH_WORKSPACE"
    r"|INTERNAL_ERROR_(?:DEVICE|HOST)_ALLOCATION_FAILED)"
    r"|(?:CUFFT|HIPFFT)_ALLOC_FAILED|miopenStatusAllocFailed|rocblas_status_memory_error)\b"
)
RUNTIME = re.compile(
    r"\b(?:CUDA|HIP|cuda)(?: driver| runtime)? error(?: \(2\) ?)?:? out of memory\b"
    r"|\b(?P<code>cudaErrorMemoryAllocation|CUDA_ERROR_OUT_OF_MEMORY|hipErrorOutOfMemory"
    r"|UR_RESULT_ERROR_OUT_OF_DEVICE_MEMORY)\b|\bMODULE:PT_DEVMEM Allocation failed\b"
)
NCCL = re.compile(r"\bCuda failure (?:\d+ )?'out of memory'|\bFailed to CUDA calloc\b")
# Raised when a library cannot get its workspace, but also for bad inputs or broken installs:
# CUBLAS_STATUS_EXECUTION_FAILED is left out, it is nearly always a bad index, not memory.
MAYBE = re.compile(
    r"\b(?:CUDNN_STATUS_(?:NOT_INITIALIZED|INTERNAL_ERROR|EXECUTION_FAILED|NOT_SUPPORTED)"
    r"|CUBLAS_STATUS_NOT_INITIALIZED|ncclUnhandledCudaError)\b"
)
HINT = re.compile(
    r"\btry setting (?:PYTORCH_(?:CUDA_|HIP_|XPU_)?ALLOC_CONF=(?P<a>expandable_segments)\b"
    r"|(?P<b>max_split_size_mb)\b)|\b(?P<c>PYTORCH_MPS_HIGH_WATERMARK_RATIO)\b"
)
# What torch writes after the numbers, and what closes a part that varies (a URL): a text that
# stops inside one of these was cut. Anything else after the numbers is someone else's text.
TRAILERS = (
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
