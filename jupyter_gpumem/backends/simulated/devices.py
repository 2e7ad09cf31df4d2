"""Devices on the simulated GPU: which tensors an op may mix, and torch's error when they do not.

A tensor is on ``cuda:N`` while its storage is counted on card N (``gpu.py``); every other tensor
is a host tensor. An op that reads tensors on two devices fails as CUDA fails, with torch's own
words, in one of the two forms torch 2.13 has (``libtorch_cpu``'s strings):

- the operators torch's code generator checks (``c10::impl::check_and_update_common_device``, in
  ``aten/src/ATen/core/adaption.cpp``): ``Expected all tensors to be on the same device, but got
  mat1 is on cpu, different from other tensors on cuda:0 (when checking argument in method
  wrapper_CUDA_addmm)``. Which operators those are, their arguments' names and the wrapper's name
  are read from ``native_functions.yaml`` (shipped with torch in ``torchgen``) as torchgen names
  them (``torchgen/dest/register_dispatch_key.py``: ``device_check``, ``wrapper_CUDA_...``);
- the others (``TensorIterator``'s, ``device_check: NoCheck``): ``Expected all tensors to be on the
  same device, but found at least two devices, cuda:0 and cpu!``.

As on CUDA, a 0-dim host tensor goes with any device (a CPU scalar), and the operators that move
data between devices (``copy_``, ``_to_copy``) or take host indices (``index``, ``index_put_``)
mix freely, as do those neither check covers (``may_mix``: composite kernels without a device
guard, such as ``_pack_padded_sequence``, whose lengths stay on the CPU).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
from typing import Any

__all__ = ["HOST_OUTPUTS", "MIXES", "may_mix", "mixing_error"]

# aten operators that take tensors on different devices on CUDA too
MIXES = frozenset(
    {
        "aten::copy_", "aten::copy", "aten::_copy_from", "aten::_copy_from_and_resize",
        "aten::_to_copy", "aten::to", "aten::index", "aten::index_put_", "aten::index_put",
        "aten::_index_put_impl_", "aten::_unsafe_index", "aten::_unsafe_index_put",
        "aten::set_", "aten::lift_fresh", "aten::lift_fresh_copy", "aten::detach",
        "aten::_local_scalar_dense", "aten::_has_compatible_shallow_copy_type",
    }
)  # fmt: skip

# aten operators whose outputs at these positions torch makes on the CPU whatever the inputs'
# device (aten/src/ATen/native/PackedSequence.cpp: batch_sizes and lengths are CPU tensors)
HOST_OUTPUTS: dict[str, tuple[int, ...]] = {
    "aten::_pack_padded_sequence": (1,),
    "aten::_pad_packed_sequence": (1,),
}

_ENTRY = re.compile(r"^- func: ([\w.]+)\(")


@functools.cache
def _checked_ops() -> dict[str, str]:
    """``name.overload`` -> the CUDA wrapper's name, for the operators whose generated CUDA kernel
    checks its arguments' devices, and -> "" for ``TensorIterator``'s (``device_check: NoCheck  #
    TensorIterator``: it checks them itself, CPU scalars allowed); read once. Empty where torch
    came without ``torchgen``."""
    spec = importlib.util.find_spec("torchgen")
    if spec is None or spec.origin is None:
        return {}
    path = os.path.join(
        os.path.dirname(spec.origin), "packaged", "ATen", "native", "native_functions.yaml"
    )
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        return {}
    checked: dict[str, str] = {}
    entry: list[str] = []
    for line in [*lines, "- func: end("]:
        if line.startswith("- func:"):
            if entry:
                _read_entry(entry, checked)
            entry = [line]
        elif entry:
            entry.append(line)
    return checked


def _read_entry(entry: list[str], checked: dict[str, str]) -> None:
    m = _ENTRY.match(entry[0])
    if m is None:
        return
    body = "\n".join(entry[1:])
    no_check = re.search(r"device_check: NoCheck(.*)", body)
    if no_check is not None:
        if "TensorIterator" in no_check.group(1):
            checked[m.group(1)] = ""
        return
    full = m.group(1)
    name, _, overload = full.partition(".")
    structured = "structured: True" in body or "structured_delegate:" in body
    cuda = re.search(r"^\s{4}[\w, ]*\bCUDA\b[\w, ]*:", body, re.M) is not None
    if not (structured or cuda):
        return
    is_out = re.search(r"\*,.*Tensor\([a-z]!\)", entry[0].split("->")[0]) is not None
    cpp_name = name + ("_out" if is_out else "")
    if structured:  # gen_structured: NativeSignature(prefix="wrapper_CUDA_")
        checked[full] = f"wrapper_CUDA_{cpp_name}"
    else:  # gen_unstructured: wrapper_kernel_sig, prefix="wrapper_CUDA_{overload}_"
        checked[full] = f"wrapper_CUDA_{overload}_{cpp_name}"


def may_mix(func: Any) -> bool:
    """Whether the aten op takes tensors on different devices without an error on CUDA: the
    ones that move data (``MIXES``), and those neither torchgen's check nor ``TensorIterator``
    covers (``_pack_padded_sequence``'s lengths stay on the CPU). Without ``torchgen``: only
    ``MIXES``."""
    if func._schema.name in MIXES:
        return True
    rules = _checked_ops()
    return bool(rules) and _op_key(func) not in rules


def _op_key(func: Any) -> str:
    name = func._schema.name.partition("::")[2]
    overload = func._schema.overload_name
    return f"{name}.{overload}" if overload else name


def _named_tensors(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], tensor: type) -> Any:
    """(argument name, tensor) in the order torch's generated check reads them: outputs, then
    the positional arguments."""
    schema = func._schema
    outs: list[tuple[str, Any]] = []
    positional: list[tuple[str, Any]] = []
    for i, arg in enumerate(schema.arguments):
        value = args[i] if i < len(args) else kwargs.get(arg.name)
        items = value if isinstance(value, (list, tuple)) else (value,)
        for v in items:
            if isinstance(v, tensor):
                (outs if arg.is_out else positional).append((arg.name, v))
    return [*outs, *positional]


def mixing_error(
    func: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    device_of: Any,
    first: str,
    second: str,
    tensor: type,
) -> RuntimeError:
    """torch's error for ``func`` reading tensors on ``first`` and ``second``."""
    method = _checked_ops().get(_op_key(func))
    if method:
        common = None
        for name, t in _named_tensors(func, args, kwargs, tensor):
            device = device_of(t)
            if common is None:
                common = device
            elif device != common:
                return RuntimeError(
                    f"Expected all tensors to be on the same device, but got {name} is on "
                    f"{device}, different from other tensors on {common} (when checking "
                    f"argument in method {method})"
                )
    return RuntimeError(
        "Expected all tensors to be on the same device, but found at least two devices, "
        f"{first} and {second}!"
    )
