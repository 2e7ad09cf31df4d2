# The parsing of CUDA_VISIBLE_DEVICES below (`parse_cuda_visible_devices`, `_identifier`) is ported
# from nvitop's `_parse_cuda_visible_devices` (its NVML path), nvitop/api/device.py,
# https://github.com/XuehaiPan/nvitop, Copyright 2021-2025 Xuehai Pan, licensed under the Apache
# License, Version 2.0 (http://www.apache.org/licenses/LICENSE-2.0). Changes: it works on a list
# of the GPUs NVML sees instead of calling NVML, returns NVML indices or MIG UUIDs, and does not
# start a subprocess to ask the CUDA driver; CUDA_DEVICE_ORDER and torch's UUIDs are added.
"""Which physical GPU each of torch's device indices is: ``CUDA_VISIBLE_DEVICES`` read as CUDA
reads it, and ``CUDA_DEVICE_ORDER`` taken into account.

NVML numbers GPUs in PCI bus order (what ``nvidia-smi`` shows). CUDA numbers them fastest first
unless ``CUDA_DEVICE_ORDER=PCI_BUS_ID``, and the integers in ``CUDA_VISIBLE_DEVICES`` are CUDA's
numbers. On a machine with different GPUs, torch's ``cuda:0`` may then be NVML's GPU 1: reading
NVML's GPU 0 for it would show another card's memory and processes. Where the two orders can
differ and nothing ties them (UUIDs in ``CUDA_VISIBLE_DEVICES``, or the UUIDs torch reports once
it has a context), the mapping is said to be uncertain rather than guessed.

CUDA's rules, as nvitop encodes them: entries are NVML indices or UUIDs (``GPU-…``, a unique
prefix is enough; ``MIG-…`` for a MIG device); parsing stops at the first invalid entry (an index
out of range, an unknown UUID, an integer after a UUID or the reverse); a duplicate makes the
whole list invalid (no device); an entry's leading digits are its index (``"1x"`` is ``1``); at
most one MIG device is visible, and a GPU in MIG mode shows its first MIG device only.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["Gpu", "Mapping", "Target", "map_devices", "parse_cuda_visible_devices"]

Target = int | str  # NVML's index of a whole GPU, or a MIG device's UUID ("MIG-…")

_UUID = re.compile(r"^(MIG-GPU-|MIG-|GPU-)([0-9a-fA-F-]+)(/\d+/\d+)?$")


@dataclass(frozen=True)
class Gpu:
    """A physical GPU as NVML lists it."""

    index: int  # NVML's index: PCI bus order, what nvidia-smi shows
    uuid: str  # "GPU-8a3f…"
    name: str | None = None
    mig_enabled: bool = False
    migs: tuple[str, ...] = field(default=())  # its MIG devices' UUIDs ("MIG-…"), NVML's order


@dataclass(frozen=True)
class Mapping:
    """torch's device ``i`` is ``targets[i]``; ``uncertain`` says why that may be wrong."""

    targets: tuple[Target, ...]
    uncertain: str | None = None


def _identifier(entry: str) -> str:
    """An entry as CUDA reads it: stripped, and cut after its leading digits (``"1x"`` is 1)."""
    entry = entry.strip()
    signed = len(entry) > 1 and entry[0] in "+-" and entry[1].isdigit()
    if entry and (entry[0].isdigit() or signed):
        end = 1 if signed else 0
        while end < len(entry) and entry[end].isdigit():
            end += 1
        entry = entry[:end]
    return entry


def _by_prefix(prefix: str, uuids: Sequence[str]) -> str | None:
    """The one UUID starting with ``prefix`` (CUDA accepts a unique prefix), else None."""
    found = [u for u in uuids if u.lower().startswith(prefix.lower())]
    return found[0] if len(found) == 1 else None


def _resolve(ident: str, gpus: Sequence[Gpu]) -> Target | None:
    if ident.isdigit():
        n = int(ident)
        return n if n < len(gpus) else None
    match = _UUID.match(ident)
    if match is None:
        return None
    kind, body, instance = match.groups()
    if kind == "GPU-" and instance is None:
        uuid = _by_prefix(ident, [g.uuid for g in gpus])
        return None if uuid is None else next(g.index for g in gpus if g.uuid == uuid)
    if kind == "MIG-" and instance is None:
        return _by_prefix(ident, [m for g in gpus for m in g.migs])
    if kind == "MIG-GPU-" and instance is not None:
        # the R450-R465 form, MIG-GPU-<GPU UUID>/<GPU instance>/<compute instance): NVML names MIG
        # devices by their own UUIDs only, so which one it is cannot be read here
        gpu = _by_prefix("GPU-" + body, [g.uuid for g in gpus])
        return None if gpu is None else ident
    return None


def parse_cuda_visible_devices(value: str | None, gpus: Sequence[Gpu]) -> list[Target]:
    """What ``CUDA_VISIBLE_DEVICES=value`` makes visible, in CUDA's order, read against
    ``gpus`` (NVML's list): NVML indices of whole GPUs, or MIG UUIDs. None (unset): every GPU."""
    if value is None:
        value = ",".join(g.uuid for g in gpus)
    targets: list[Target] = []
    seen: set[str] = set()
    integers: bool | None = None
    for ident in map(_identifier, value.split(",")):
        if ident in seen:
            return []  # a duplicate: CUDA sees no device at all
        if integers is None:
            integers = ident.isdigit()
        target = _resolve(ident, gpus) if ident.isdigit() == integers else None
        if target is None:
            break  # CUDA stops at the first invalid entry
        targets.append(target)
        seen.add(ident)
    return _with_mig_rules(targets, gpus)


def _with_mig_rules(targets: list[Target], gpus: Sequence[Gpu]) -> list[Target]:
    migs: list[Target] = [t for t in targets if isinstance(t, str)]
    if migs:
        return migs[:1]  # at most one MIG device is visible
    out: list[Target] = []
    for t in targets:
        gpu = gpus[int(t)]
        if not gpu.mig_enabled:
            out.append(t)
        elif gpu.migs:
            return [gpu.migs[0]]  # a GPU in MIG mode: its first MIG device, and nothing else
    return out


def _bare(uuid: str) -> str:
    """A UUID without its ``GPU-``/``MIG-`` prefix, lower case (torch prints it bare)."""
    for prefix in ("MIG-", "GPU-"):
        if uuid.upper().startswith(prefix):
            uuid = uuid[len(prefix) :]
    return uuid.lower()


def map_devices(
    visible: str | None,
    order: str | None,
    gpus: Sequence[Gpu],
    torch_uuids: Sequence[str] | None = None,
) -> Mapping:
    """torch's indices mapped to NVML's, for ``CUDA_VISIBLE_DEVICES=visible`` and
    ``CUDA_DEVICE_ORDER=order`` (None: unset). ``torch_uuids``: the UUID of each of torch's
    devices (``torch.cuda.get_device_properties(i).uuid``), where torch has a context: they tie
    the orders whatever the environment says."""
    if torch_uuids:
        matched = _by_uuid(torch_uuids, gpus)
        if matched is not None:
            return Mapping(matched)
    targets = tuple(parse_cuda_visible_devices(visible, gpus))
    # UUIDs name GPUs whatever the order; CUDA's integers (or no list: all) follow its order
    by_integer = visible is None or _identifier(visible.split(",")[0]).isdigit()
    names = {g.name for g in gpus}
    if (
        by_integer
        and (order or "FASTEST_FIRST").strip().upper() != "PCI_BUS_ID"
        and len(gpus) > 1
        # identical cards tie on speed and CUDA then orders them by PCI bus, as NVML does
        and (len(names) > 1 or None in names)
    ):
        return Mapping(
            targets,
            "which NVML GPU each of torch's devices is is uncertain: CUDA numbers these different "
            "GPUs fastest first and NVML by PCI bus; set CUDA_DEVICE_ORDER=PCI_BUS_ID before "
            "torch starts (or name the GPUs by UUID in CUDA_VISIBLE_DEVICES)",
        )
    return Mapping(targets)


def _by_uuid(torch_uuids: Sequence[str], gpus: Sequence[Gpu]) -> tuple[Target, ...] | None:
    index: dict[str, Target] = {_bare(g.uuid): g.index for g in gpus}
    index.update({_bare(m): m for g in gpus for m in g.migs})
    found = [index.get(_bare(str(u))) for u in torch_uuids]
    if any(t is None for t in found):
        return None
    return tuple(t for t in found if t is not None)
