"""The caching allocator as it stood at the failure: its settings as torch parsed them, whether a
change would need a restart, and its free blocks measured against the request.

The settings: torch's own record where it keeps one (``memory_snapshot()["allocator_settings"]``
on CUDA: the string the allocator was configured with and whether ``expandable_segments`` is on),
else ``PYTORCH_CUDA_ALLOC_CONF`` (and its siblings) read as torch reads it
(``backends.alloc_conf``). The two can differ: a variable set after CUDA started is in the
environment but not in the allocator, which read it once.

The blocks: the snapshot's segments, each a run of blocks ``active_allocated`` or ``inactive``.
Fragmentation is what is reserved but unallocated in blocks too small for the request, in the pool
the request comes from (small: up to 1 MiB; large: the rest): what ``expandable_segments`` would
have let the allocator use, and what a bare "reserved but unallocated" number does not say. A
segment with no live block is returned to the driver by ``empty_cache`` (torch already did so
before raising the OOM); a free block inside a segment that holds live tensors is not.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from jupyter_gpumem.backends import MemoryBackend, active, alloc_history
from jupyter_gpumem.backends.alloc_conf import (
    AllocConf,
    AllocConfError,
    parse_alloc_conf,
    read_alloc_conf,
)
from jupyter_gpumem.backends.torch_objects import torch_module

__all__ = ["AllocatorState", "FreeBlocks", "measure_blocks", "read_allocator_state"]

SMALL_SIZE = 1 << 20  # kSmallSize: requests up to 1 MiB come from the small pool
_SETTINGS_KEYS = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")  # the snapshot's, new and old


@dataclass(frozen=True)
class FreeBlocks:
    """The allocator's free (inactive) blocks on one device, against one request."""

    request_bytes: int
    pool: str  # "small" | "large": the pool the request comes from
    unallocated_bytes: int  # reserved but unallocated, every pool
    pool_free_bytes: int  # free in the request's pool
    too_small_bytes: int  # of that, in blocks smaller than the request: the fragmentation
    too_small_blocks: int
    largest_bytes: int  # the largest free block in the request's pool
    releasable_bytes: int  # in segments with no live block: what empty_cache gives back


@dataclass(frozen=True)
class AllocatorState:
    """The allocator's settings and free blocks at the failure; what cannot be read is None."""

    conf: AllocConf | None  # the settings the allocator runs with (None: torch refuses them)
    env_conf: AllocConf | None  # the environment now, as torch would read it
    conf_error: str | None  # torch's words for a setting it refuses
    from_allocator: bool  # conf is torch's own record, not the environment
    cuda_started: bool  # the allocator has read its settings: a new one needs a restart
    blocks: FreeBlocks | None

    @property
    def expandable(self) -> bool:
        return self.conf is not None and self.conf.expandable_segments

    @property
    def restart_pending(self) -> bool:
        """The environment asks for expandable segments the running allocator does not have."""
        return (
            self.env_conf is not None
            and self.env_conf.expandable_segments
            and self.conf is not None
            and not self.conf.expandable_segments
        )


def measure_blocks(
    segments: Iterable[Mapping[str, Any]], request_bytes: int, device: int | None = None
) -> FreeBlocks:
    """The free blocks of ``memory_snapshot()``'s segments (on ``device``, None: all) against a
    request of ``request_bytes``."""
    pool = "small" if request_bytes <= SMALL_SIZE else "large"
    unallocated = pool_free = too_small = blocks = largest = releasable = 0
    for seg in segments:
        if device is not None and seg.get("device", device) != device:
            continue
        seg_pool = seg.get("segment_type") or (
            "small" if int(seg.get("total_size", 0)) <= 2 * SMALL_SIZE else "large"
        )
        live = False
        for block in seg.get("blocks", ()):
            size = int(block.get("size", 0))
            if block.get("state") != "inactive":
                live = True
                continue
            unallocated += size
            if seg_pool != pool:
                continue
            pool_free += size
            largest = max(largest, size)
            if size < request_bytes:
                too_small += size
                blocks += 1
        if not live:
            releasable += sum(int(b.get("size", 0)) for b in seg.get("blocks", ()))
    return FreeBlocks(
        request_bytes, pool, unallocated, pool_free, too_small, blocks, largest, releasable
    )


def _from_settings(settings: Mapping[str, Any]) -> AllocConf | None:
    """The allocator's own record of its settings, parsed; None when it keeps none."""
    text = next((settings[k] for k in _SETTINGS_KEYS if isinstance(settings.get(k), str)), None)
    if text is None and "expandable_segments" not in settings:
        return None
    try:
        conf = parse_alloc_conf(text or "")
    except AllocConfError:
        conf = AllocConf()
    expandable = settings.get("expandable_segments")
    if isinstance(expandable, bool) and expandable != conf.expandable_segments:
        # set at run time (torch.cuda.memory._set_allocator_settings): the flag is the truth
        conf = replace(conf, expandable_segments=expandable)
    return conf


def read_allocator_state(
    request_bytes: int | None,
    device: int | None = None,
    *,
    env: Mapping[str, str] | None = None,
    backend: MemoryBackend | None = None,
) -> AllocatorState:
    """Read at the failure, before anything is released or the cache emptied. ``env``: the
    environment to read the variables from (default ``os.environ``)."""
    backend = backend or active()
    env_conf: AllocConf | None = None
    error = None
    try:
        env_conf = read_alloc_conf(env)
    except AllocConfError as exc:
        error = str(exc)
    snapshot: Mapping[str, Any] = {}
    if torch_module() is not None:
        try:
            snapshot = alloc_history.snapshot()
        except Exception:  # no CUDA, cudaMallocAsync, an older torch: no blocks to read
            snapshot = {}
    own = _from_settings(snapshot.get("allocator_settings") or {})
    segments = snapshot.get("segments")
    # no request (a library's failed workspace): the blocks still say what Clear cache returns
    blocks = measure_blocks(segments, request_bytes or 0, device) if segments else None
    return AllocatorState(
        conf=own if own is not None else env_conf,
        env_conf=env_conf,
        conf_error=error if own is None else None,
        from_allocator=own is not None,
        # the allocator counts: it has started, and read its settings
        cuda_started=backend.allocator_stats(device) is not None,
        blocks=blocks,
    )
