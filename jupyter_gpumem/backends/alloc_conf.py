"""``PYTORCH_CUDA_ALLOC_CONF`` read as torch reads it: the caching allocator's settings.

A port of torch 2.13's parsers, token for token: ``c10/core/AllocatorConfig.{h,cpp}``
(``ConfigTokenizer``; ``AcceleratorAllocatorConfig::parseArgs``: the settings every accelerator
shares) followed by ``c10/cuda/CUDAAllocatorConfig.cpp`` (``CUDAAllocatorConfig::parseArgs``: the
backend and CUDA's own keys), in that order, as ``setAllocatorSettings`` calls them on a CUDA build.
``PYTORCH_ALLOC_CONF`` wins over ``PYTORCH_CUDA_ALLOC_CONF``, which wins over
``PYTORCH_HIP_ALLOC_CONF`` (``AcceleratorAllocatorConfig::instance``).

What torch refuses, :func:`read_alloc_conf` refuses with torch's own words
(:class:`AllocConfError`, a ``ValueError`` as torch's ``TORCH_CHECK_VALUE``); what torch lets pass
(a value with trailing junk read as its leading number, ``stoull`` wrapping a negative number, a
stray comma) passes here too. Stdlib only.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = [
    "ENV_NAMES",
    "UNLIMITED",
    "AllocConf",
    "AllocConfError",
    "parse_alloc_conf",
    "read_alloc_conf",
]

MiB = 1 << 20
UNLIMITED = (1 << 64) - 1  # SIZE_MAX: torch's "no limit" for max_split_size
_SIZE_MAX = UNLIMITED
K_LARGE_BUFFER = 20 * MiB  # kLargeBuffer
K_MIN_LARGE_ALLOC = 10 * MiB  # kMinLargeAlloc
ROUNDUP_INTERVALS = 16  # kRoundUpPowerOfTwoIntervals: 1 MiB .. 64 GiB, one per power of two
PINNED_MAX_REGISTER_THREADS = 128  # CUDAAllocatorConfig::pinned_max_register_threads()

ENV_NAMES = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_HIP_ALLOC_CONF")

# AcceleratorAllocatorConfig's keys, then those CUDAAllocatorConfig registers (getKeys()).
_ACCELERATOR_KEYS = frozenset(
    {
        "max_split_size_mb",
        "max_non_split_rounding_mb",
        "large_segment_size_mb",
        "garbage_collection_threshold",
        "roundup_power2_divisions",
        "expandable_segments",
        "pinned_use_background_threads",
        "pinned_max_round_threshold_mb",
        "pinned_max_cached_size_mb",
    }
)
_CUDA_KEYS = frozenset(
    {
        "backend",
        "release_lock_on_cudamalloc",
        "release_lock_on_hipmalloc",
        "pinned_use_cuda_host_register",
        "pinned_use_hip_host_register",
        "pinned_num_register_threads",
        "pinned_reserve_segment_size_mb",
        "graph_capture_record_stream_reuse",
        "per_process_memory_fraction",
    }
)
KEYS = _ACCELERATOR_KEYS | _CUDA_KEYS


class AllocConfError(ValueError):
    """An allocator setting torch refuses; the message is torch's, after the variable's name."""


@dataclass(frozen=True)
class AllocConf:
    """The caching allocator's settings (defaults: no variable set). Sizes in bytes."""

    backend: str = "native"  # or "cudaMallocAsync"
    max_split_size: int = UNLIMITED  # blocks this large or larger are never split
    max_non_split_rounding_size: int = K_LARGE_BUFFER
    large_segment_size: int = K_LARGE_BUFFER  # kLargeBuffer unless large_segment_size_mb
    roundup_power2_divisions: tuple[int, ...] = (0,) * ROUNDUP_INTERVALS
    garbage_collection_threshold: float = 0.0  # 0: off
    expandable_segments: bool = False
    release_lock_on_cudamalloc: bool = False
    pinned_use_cuda_host_register: bool = False
    pinned_num_register_threads: int = 1
    pinned_use_background_threads: bool = False
    pinned_max_round_threshold_mb: int | None = None
    pinned_max_cached_size_mb: int | None = None
    pinned_reserve_segment_size_mb: int = 0
    graph_capture_record_stream_reuse: bool = False
    per_process_memory_fraction: float = 1.0
    source: str | None = None  # the variable it came from; None: none was set
    text: str = ""
    warnings: tuple[str, ...] = field(default=(), compare=False)

    @property
    def native(self) -> bool:
        return self.backend == "native"

    @property
    def split_limited(self) -> bool:
        """Whether ``max_split_size_mb`` limits splitting (torch: ``max_split_size() != SIZE_MAX``)."""
        return self.max_split_size < UNLIMITED

    def divisions_for(self, size: int) -> int:
        """``roundup_power2_divisions(size)``: the divisions for the power-of-two interval of size."""
        index = max(size.bit_length() - 1 - 20, 0)  # log2(size) - log2(1 MiB)
        return self.roundup_power2_divisions[min(index, ROUNDUP_INTERVALS - 1)]


def read_alloc_conf(env: Mapping[str, str] | None = None) -> AllocConf:
    """The settings from ``env`` (default ``os.environ``), as torch reads them at start-up."""
    env = os.environ if env is None else env
    for name in ENV_NAMES:
        text = env.get(name)
        if text is not None:
            return parse_alloc_conf(text, source=name)
    return AllocConf()


def parse_alloc_conf(text: str, *, source: str = "PYTORCH_CUDA_ALLOC_CONF") -> AllocConf:
    """One variable's value parsed; :class:`AllocConfError` for what torch refuses."""
    tokens = _tokenize(text)
    values: dict[str, object] = {"source": source, "text": text}
    warnings: list[str] = []
    try:
        _parse_accelerator(tokens, values, warnings)
        _parse_cuda(tokens, values, warnings)
    except _Refused as refused:
        raise AllocConfError(f"{source}={text!r}: {refused}") from None
    return AllocConf(warnings=tuple(warnings), **values)  # type: ignore[arg-type]


class _Refused(Exception):
    pass


class _Tokens:
    """``ConfigTokenizer``: keys, values and the characters ``,:[]``; whitespace dropped."""

    def __init__(self, items: list[str]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> str:
        if i >= len(self.items):  # torch: an internal assert, "Index out of bounds"
            last = self.items[-1] if self.items else ""
            raise _Refused(f"the setting ends early after {last!r} (expected a value)")
        return self.items[i]

    def check(self, i: int, token: str) -> bool:
        # torch's checkToken asserts the index but only *returns* whether the token matches
        return self[i] == token

    def size_t(self, i: int) -> int:
        return _stoull(self[i])

    def double(self, i: int) -> float:
        return _stod(self[i])

    def boolean(self, i: int) -> bool:
        token = self[i]
        if token in ("True", "False"):
            return token == "True"
        raise _Refused(
            f"Expected 'True' or 'False' at index {i} in ConfigTokenizer but got '{token}'"
        )

    def skip_key(self, i: int) -> int:
        self.check(i + 1, ":")
        i += 2
        if self[i] != "[":
            return i
        i += 1
        while i < len(self.items) and self.items[i] != "]":
            i += 1
        if i >= len(self.items):
            raise _Refused(
                "Expected closing bracket ']' in ConfigTokenizer but reached end of config"
            )
        return i


def _tokenize(text: str) -> _Tokens:
    items: list[str] = []
    buffer = ""
    for ch in text:
        if ch in ",:[]":
            if buffer:
                items.append(buffer)
                buffer = ""
            items.append(ch)
        elif ch not in " \t\n\v\f\r":  # std::isspace in the C locale
            buffer += ch
    if buffer:
        items.append(buffer)
    return _Tokens(items)


_INTEGER = re.compile(r"\s*([+-]?)(\d+)")
_FLOAT = re.compile(
    r"\s*[+-]?(?:(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|inf(?:inity)?|nan)", re.IGNORECASE
)


def _stoull(token: str) -> int:
    """``std::stoull``: the leading integer, a negative one wrapped modulo 2**64."""
    match = _INTEGER.match(token)
    if match is None:
        raise _Refused(f"stoull: {token!r} is not a number")
    value = int(match.group(2))
    if value > _SIZE_MAX:
        raise _Refused(f"stoull: {token!r} is out of range")
    return (-value) % (1 << 64) if match.group(1) == "-" else value


def _stod(token: str) -> float:
    """``std::stod``: the leading floating-point number."""
    match = _FLOAT.match(token)
    if match is None:
        raise _Refused(f"stod: {token!r} is not a number")
    value = float(match.group(0))
    if math.isinf(value) and "inf" not in match.group(0).lower():
        raise _Refused(f"stod: {token!r} is out of range")
    return value


def _power_of_2(n: int) -> bool:  # llvm::isPowerOf2_64
    return n > 0 and n & (n - 1) == 0


# ---- AcceleratorAllocatorConfig::parseArgs ------------------------------------------------------


def _parse_accelerator(tokens: _Tokens, values: dict[str, object], warnings: list[str]) -> None:
    # large_segment_size_mb first: the split and rounding limits must be at least it
    i = 0
    while i < len(tokens):
        if tokens[i] == "large_segment_size_mb":
            i = _mb_at_least(
                tokens, i, values, "large_segment_size", K_MIN_LARGE_ALLOC, strict=True
            )
        i += 1
    large = int(values.get("large_segment_size", K_LARGE_BUFFER))  # type: ignore[call-overload]
    values["max_non_split_rounding_size"] = large
    parsers = {
        "max_split_size_mb": lambda i: _mb_at_least(tokens, i, values, "max_split_size", large),
        "max_non_split_rounding_mb": lambda i: _mb_at_least(
            tokens, i, values, "max_non_split_rounding_size", large
        ),
        "garbage_collection_threshold": lambda i: _gc_threshold(tokens, i, values),
        "roundup_power2_divisions": lambda i: _roundup(tokens, i, values),
        "expandable_segments": lambda i: _flag(tokens, i, values, "expandable_segments"),
        "pinned_use_background_threads": lambda i: _flag(
            tokens, i, values, "pinned_use_background_threads"
        ),
        "pinned_max_round_threshold_mb": lambda i: _plain(
            tokens, i, values, "pinned_max_round_threshold_mb"
        ),
        "pinned_max_cached_size_mb": lambda i: _plain(
            tokens, i, values, "pinned_max_cached_size_mb"
        ),
    }
    i = 0
    while i < len(tokens):
        key = tokens[i]
        parse = parsers.get(key)
        if parse is not None:
            i = parse(i)
        elif key == "large_segment_size_mb":
            i = tokens.skip_key(i)
        else:  # on a CUDA build the CUDA parser's hook is registered: unknown keys are refused
            if key not in KEYS:
                raise _Refused(f"Unrecognized key '{key}' in Accelerator allocator config.")
            i = tokens.skip_key(i)
        if i + 1 < len(tokens):
            tokens.check(i + 1, ",")
            i += 1
        i += 1
    rounding, cached = (
        values.get("pinned_max_round_threshold_mb"),
        values.get("pinned_max_cached_size_mb"),
    )
    if isinstance(rounding, int) and isinstance(cached, int) and rounding > cached:
        warnings.append(
            f"pinned_max_round_threshold_mb ({rounding}) > pinned_max_cached_size_mb ({cached}). "
            "The cache size limit takes precedence: allocations above pinned_max_cached_size_mb "
            "are never rounded up."
        )


def _mb_at_least(
    tokens: _Tokens,
    i: int,
    values: dict[str, object],
    name: str,
    least: int,
    *,
    strict: bool = False,
) -> int:
    key = tokens[i]
    tokens.check(i + 1, ":")
    i += 2
    value = tokens.size_t(i)
    least_mb = least // MiB
    if strict and value <= least_mb:
        raise _Refused(f"CachingAllocator option {key} must be > {least_mb} MB")
    if not strict and value < least_mb:
        raise _Refused(f"CachingAllocator option {key} too small, must be >= {least_mb}")
    values[name] = min(value, _SIZE_MAX // MiB) * MiB
    return i


def _gc_threshold(tokens: _Tokens, i: int, values: dict[str, object]) -> int:
    tokens.check(i + 1, ":")
    i += 2
    value = tokens.double(i)
    if not 0 < value < 1.0:
        raise _Refused("garbage_collect_threshold is invalid, set it in (0.0, 1.0)")
    values["garbage_collection_threshold"] = value
    return i


def _flag(tokens: _Tokens, i: int, values: dict[str, object], name: str) -> int:
    tokens.check(i + 1, ":")
    values[name] = tokens.boolean(i + 2)
    return i + 2


def _plain(tokens: _Tokens, i: int, values: dict[str, object], name: str) -> int:
    tokens.check(i + 1, ":")
    values[name] = tokens.size_t(i + 2)
    return i + 2


def _roundup(tokens: _Tokens, i: int, values: dict[str, object]) -> int:
    """``parseRoundUpPower2Divisions``: ``N`` for every interval, or ``[256:1,512:2,>:4]``."""
    tokens.check(i + 1, ":")
    i += 2
    divisions = [0] * ROUNDUP_INTERVALS
    if tokens[i] != "[":  # the old form, one number for every interval
        value = tokens.size_t(i)
        if not _power_of_2(value):
            raise _Refused("For roundups, the divisions has to be power of 2 ")
        values["roundup_power2_divisions"] = (value,) * ROUNDUP_INTERVALS
        return i
    first, last_index = True, 0
    i += 1
    while i < len(tokens) and tokens[i] != "]":
        value_index = i
        tokens.check(i + 1, ":")
        i += 2
        value = tokens.size_t(i)
        if value != 0 and not _power_of_2(value):
            raise _Refused(
                "For roundups, the divisions has to be power of 2 or 0 to disable roundup "
            )
        if tokens[value_index] == ">":
            divisions[last_index + 1 :] = [value] * (ROUNDUP_INTERVALS - last_index - 1)
        else:
            boundary = tokens.size_t(value_index)
            if not _power_of_2(boundary):
                raise _Refused("For roundups, the intervals have to be power of 2 ")
            index = min(boundary.bit_length() - 1, ROUNDUP_INTERVALS - 1)
            if first:
                divisions[:index] = [value] * index
                first = False
            divisions[index] = value
            last_index = index
        if tokens[i + 1] != "]":
            tokens.check(i + 1, ",")
            i += 1
        i += 1
    if i >= len(tokens):
        raise _Refused("Expected closing bracket ']' in ConfigTokenizer but reached end of config")
    values["roundup_power2_divisions"] = tuple(divisions)
    return i


# ---- CUDAAllocatorConfig::parseArgs --------------------------------------------------------------


def _parse_cuda(tokens: _Tokens, values: dict[str, object], warnings: list[str]) -> None:
    native_option = False
    i = 0
    while i < len(tokens):
        key = tokens[i]
        if key == "backend":
            tokens.check(i + 1, ":")
            i += 2
            if tokens[i] not in ("native", "cudaMallocAsync"):
                raise _Refused("Unknown allocator backend, options are native and cudaMallocAsync")
            values["backend"] = tokens[i]
        elif key in ("release_lock_on_cudamalloc", "release_lock_on_hipmalloc"):
            native_option = True
            i = _flag(tokens, i, values, "release_lock_on_cudamalloc")
        elif key in ("pinned_use_cuda_host_register", "pinned_use_hip_host_register"):
            native_option = True
            i = _flag(tokens, i, values, "pinned_use_cuda_host_register")
        elif key == "pinned_num_register_threads":
            native_option = True
            i = _register_threads(tokens, i, values)
        elif key == "pinned_reserve_segment_size_mb":
            native_option = True
            i = _plain(tokens, i, values, "pinned_reserve_segment_size_mb")
            if values["pinned_reserve_segment_size_mb"] == 0:
                raise _Refused("Pinned reserve segment size has to be greater than 0")
        elif key == "graph_capture_record_stream_reuse":
            native_option = True
            i = _flag(tokens, i, values, "graph_capture_record_stream_reuse")
        elif key == "per_process_memory_fraction":
            native_option = True
            tokens.check(i + 1, ":")
            i += 2
            fraction = tokens.double(i)
            if not 0.0 <= fraction <= 1.0:
                raise _Refused("per_process_memory_fraction is invalid, set it in [0.0, 1.0]")
            values["per_process_memory_fraction"] = fraction
        else:
            i = tokens.skip_key(i)  # known: the accelerator parser refused the unknown ones
        if i + 1 < len(tokens):
            tokens.check(i + 1, ",")
            i += 1
        i += 1
    if values.get("backend") == "cudaMallocAsync" and native_option:
        warnings.append(
            "backend:cudaMallocAsync ignores max_split_size_mb,"
            "roundup_power2_divisions, and garbage_collect_threshold."
        )


def _register_threads(tokens: _Tokens, i: int, values: dict[str, object]) -> int:
    tokens.check(i + 1, ":")
    i += 2
    threads = tokens.size_t(i)
    if not _power_of_2(threads):
        raise _Refused(f"Number of register threads has to be power of 2, got {threads}")
    if threads > PINNED_MAX_REGISTER_THREADS:
        raise _Refused(
            "Number of register threads should be less than or equal to "
            f"{PINNED_MAX_REGISTER_THREADS}, got {threads}"
        )
    values["pinned_num_register_threads"] = threads
    return i
