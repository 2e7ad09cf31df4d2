"""The four fixes, in the order ``%%oomsafe`` tries them."""

from __future__ import annotations

from .autocast import Autocast
from .base import Attempt, Check, Fix, FixContext, FixOutcome
from .batch import ReduceBatch
from .clear_cache import ClearCache
from .cpu import MoveToCpu

FIXES: dict[str, Fix] = {f.key: f for f in (ClearCache(), ReduceBatch(), Autocast(), MoveToCpu())}
LADDER: tuple[str, ...] = tuple(FIXES)

__all__ = ["FIXES", "LADDER", "Attempt", "Check", "Fix", "FixContext", "FixOutcome"]
