"""Recognise an out-of-memory error and read the numbers its message carries.

Stdlib only, and torch is never imported: the hook calls :func:`find_oom` on every exception a cell
raises, torch or not. Torch's classes are recognised by name and module through the MRO.

The formats read, and their patterns, are ``oom_formats``'. Messages are read after collapsing
whitespace (logs re-wrap them) and may be cut anywhere: a size is kept only when its unit is
complete and the text that must follow it is there, so a field is either right or ``None``;
``truncated`` says the text stopped before its format's end.
"""

from __future__ import annotations

import builtins
import re
from collections.abc import Iterator
from dataclasses import dataclass

from jupyter_gpumem.oom import formats as fmt

__all__ = [
    "OOMReport",
    "ProcessUsage",
    "find_oom",
    "is_oom",
    "parse_oom_message",
    "walk_chain",
]

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


# --- parsing --------------------------------------------------------------------------------


def _to_bytes(size: str) -> int:
    num, unit = size.split(" ")
    return int(float(num) * fmt.UNITS[unit])


def _size(rx: re.Pattern[str], text: str, start: int, end: int) -> int | None:
    m = rx.search(text, start, end)
    return _to_bytes(m.group("v")) if m else None


def _int(rx: re.Pattern[str], text: str, start: int, end: int) -> int | None:
    m = rx.search(text, start, end)
    return int(m.group("d")) if m else None


def _hint(text: str, start: int, end: int) -> str | None:
    m = fmt.HINT.search(text, start, end)
    return (m.group("a") or m.group("b") or m.group("c")) if m else None


def _cut_short(text: str, body_end: int, trailer_expected: bool) -> bool:
    """Whether the text after a complete body stops inside torch's own closing words."""
    rest = text[body_end:].lstrip(". ")
    if not rest:
        return trailer_expected
    for fixed, closing in fmt.TRAILERS:
        if rest.startswith(fixed):
            return bool(closing) and closing not in rest[len(fixed) :]
        if fixed.startswith(rest):
            return True
    return False


def _normalise(message: str) -> str:
    text = " ".join(message.split())
    m = fmt.CLASS_PREFIX.match(text)
    return text[m.end() :] if m else text


def _parse_mps(text: str) -> OOMReport | None:
    head = fmt.MPS_HEAD.search(text)
    if head is None:
        return None
    start = head.end()
    nxt = fmt.MPS_HEAD.search(text, start)
    end = nxt.start() if nxt else len(text)
    allowed = _size(fmt.MPS_ALLOWED, text, start, end)
    pool = fmt.MPS_POOL.search(text, start, end)
    return OOMReport(
        kind="mps",
        backend="MPS",
        probable=False,
        message=text,
        requested_bytes=_size(fmt.MPS_REQUESTED, text, start, end),
        allocated_bytes=_size(fmt.MPS_ALLOCATED, text, start, end),
        other_allocations_bytes=_size(fmt.MPS_OTHER, text, start, end),
        allowed_bytes=allowed,
        pool=pool.group("pool") if pool else None,
        hint=_hint(text, start, end),
        # Only the capped allocator (a "max allowed") goes on to name the watermark variable.
        truncated=pool is None or _cut_short(text, pool.end(), allowed is not None),
    )


def _parse_alloc(text: str) -> OOMReport | None:
    loose: OOMReport | None = None
    for m in fmt.OOM_WORDS.finditer(text):
        word = m.group("backend")
        backend = word if word in fmt.GPU_BACKENDS else ""
        at = m.end()
        if text.startswith(fmt.TRIED, at):
            return _parse_allocator(text, at + len(fmt.TRIED), backend)
        if len(text) - at < len(fmt.TRIED) and fmt.TRIED.startswith(text[at:]):
            return OOMReport("alloc_v2", backend, False, text, truncated=True)
        if backend and loose is None:
            loose = OOMReport("unparsed", backend, False, text)
    return loose


def _parse_allocator(text: str, at: int, backend: str) -> OOMReport:
    nxt = fmt.OOM_WORDS.search(text, at)
    end = nxt.start() if nxt else len(text)
    req = fmt.REQUESTED.match(text, at, end)
    requested = _to_bytes(req.group("v")) if req else None
    if req is not None and req.group("sep") == " (":
        return _parse_v1(text, at, end, backend, requested)
    body = fmt.V2_UNALLOCATED.search(text, at, end)
    body_end = body.end() if body else end
    allocated = _size(fmt.V2_ALLOCATED, text, at, body_end)
    unallocated = _to_bytes(body.group("v")) if body else None
    reserved = None if allocated is None or unallocated is None else allocated + unallocated
    procs = tuple(
        ProcessUsage(int(p.group("pid")), _to_bytes(p.group("v")))
        for p in fmt.V2_PROC.finditer(text, at, body_end)
    )
    return OOMReport(
        kind="alloc_v2",
        backend=backend,
        probable=False,
        message=text,
        requested_bytes=requested,
        device_index=_int(fmt.V2_DEVICE, text, at, body_end),
        total_bytes=_size(fmt.V2_TOTAL, text, at, body_end),
        free_bytes=_size(fmt.V2_FREE, text, at, body_end),
        allowed_bytes=_size(fmt.V2_ALLOWED, text, at, body_end),
        process_used_bytes=_size(fmt.V2_SELF, text, at, body_end),
        allocated_bytes=allocated,
        reserved_bytes=reserved,
        reserved_unallocated_bytes=unallocated,
        private_pools_bytes=_size(fmt.V2_PRIVATE, text, at, body_end),
        other_processes=procs,
        hint=_hint(text, body_end, end) if body else None,
        truncated=body is None or _cut_short(text[:end], body_end, True),
    )


def _parse_v1(text: str, at: int, end: int, backend: str, requested: int | None) -> OOMReport:
    body = fmt.V1_RESERVED.search(text, at, end)
    body_end = body.end() if body else end
    return OOMReport(
        kind="alloc_v1",
        backend=backend,
        probable=False,
        message=text,
        requested_bytes=requested,
        device_index=_int(fmt.V1_DEVICE, text, at, body_end),
        total_bytes=_size(fmt.V1_TOTAL, text, at, body_end),
        free_bytes=_size(fmt.V1_FREE, text, at, body_end),
        allowed_bytes=_size(fmt.V1_ALLOWED, text, at, body_end),
        allocated_bytes=_size(fmt.V1_ALLOCATED, text, at, body_end),
        reserved_bytes=_to_bytes(body.group("v")) if body else None,
        hint=_hint(text, body_end, end) if body else None,
        truncated=body is None or _cut_short(text[:end], body_end, False),
    )


def _parse_async(text: str) -> OOMReport | None:
    head = fmt.ASYNC_HEAD.search(text)
    if head is None:
        return None
    start = head.end()
    nxt = fmt.ASYNC_HEAD.search(text, start)
    end = nxt.start() if nxt else len(text)
    limit = fmt.ASYNC_LIMIT.search(text, start, end)
    allowed = _to_bytes(limit.group("v")) if limit else None
    return OOMReport(
        kind="alloc_v2",
        backend="CUDA",
        probable=False,
        message=text,
        requested_bytes=_size(fmt.ASYNC_REQUESTED, text, start, end),
        device_index=int(head.group("d")),
        total_bytes=_size(fmt.ASYNC_TOTAL, text, start, end),
        free_bytes=_size(fmt.ASYNC_FREE, text, start, end),
        allowed_bytes=allowed if allowed is not None and allowed < fmt.NO_LIMIT else None,
        allocated_bytes=_size(fmt.ASYNC_ALLOCATED, text, start, end),
        truncated=limit is None,
    )


def _parse_cpu(text: str) -> OOMReport | None:
    head = fmt.CPU_HEAD.search(text)
    if head is None:
        return None
    req = fmt.CPU_REQUESTED.search(text, head.end())
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
    m = fmt.LIBRARY.search(text)
    if m:
        return OOMReport("library", _backend_of(m.group(0)), False, text, status=m.group(0))
    m = fmt.RUNTIME.search(text)
    if m:
        return OOMReport("runtime", _backend_of(m.group(0)), False, text, status=m.group("code"))
    if fmt.NCCL.search(text):
        return OOMReport("nccl", "CUDA", False, text)
    m = fmt.MAYBE.search(text)
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
