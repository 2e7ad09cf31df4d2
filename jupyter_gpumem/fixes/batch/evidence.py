"""What the failing tensors say about the batch: the numbers that size them.

At the failure, the batch is a dimension of the tensors the failing code was working on: the
locals of the failed frames (the inputs of the module that failed), and the tensors the failed run
itself made in the notebook (``xb``, ``seq``). Their shapes come from the diagnosis's holders. A
candidate batch whose value sizes none of them is not the batch (``torch.randn(64, 20)``: 64
samples to draw, while the loader's 128 sizes every activation).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from jupyter_gpumem.cells.failure import FailedCell

_SHAPE = re.compile(r"^\((\d+(?:, \d+)*),?\) ")


@dataclass(frozen=True)
class SizedTensor:
    """A tensor of the failure: how the user reaches it and its shape."""

    name: str  # "seq", "input in forward() in linear.py"
    shape: tuple[int, ...]

    def text(self) -> str:
        return f"`{self.name.split(' in ', 1)[0]}` {self.shape}"


def _shape(detail: str) -> tuple[int, ...] | None:
    """``(64, 512, 128) float32`` -> (64, 512, 128)."""
    m = _SHAPE.match(detail)
    return tuple(int(x) for x in m.group(1).split(", ")) if m else None


def failing_tensors(
    failed: FailedCell | None, frames_only: bool = False
) -> tuple[SizedTensor, ...]:
    """Tensors of the failed frames, and (unless ``frames_only``) those the failed run made, with
    their shapes."""
    if failed is None or failed.diagnosis is None:
        return ()
    made = set(failed.created)
    out = []
    for h in failed.diagnosis.holders.holders:
        if h.kind != "tensor":
            continue
        if h.where == "failed frame" or (
            not frames_only and h.where == "variable" and h.name in made
        ):
            shape = _shape(h.detail)
            if shape and len(shape) >= 2:  # a 1-d tensor (labels, a loss) says little
                out.append(SizedTensor(h.name, shape))
    return tuple(out)


def variables_sized_by(failed: FailedCell | None, value: int) -> tuple[SizedTensor, ...]:
    """The notebook's tensor variables that ``value`` sizes (``fixed_noise`` (512, 100, 1, 1))."""
    if failed is None or failed.diagnosis is None:
        return ()
    out = []
    for h in failed.diagnosis.holders.holders:
        shape = _shape(h.detail) if h.kind == "tensor" and h.where == "variable" else None
        if shape and value in shape:
            out.append(SizedTensor(h.name, shape))
    return tuple(out)


def sized_by(value: int, tensors: Iterable[SizedTensor]) -> SizedTensor | None:
    """The first tensor that ``value`` sizes (any dimension), if any."""
    return next((t for t in tensors if value in t.shape), None)
