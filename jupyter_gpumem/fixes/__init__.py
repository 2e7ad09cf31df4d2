"""The four fixes, in the order ``%%oomsafe`` tries them."""

from __future__ import annotations

from jupyter_gpumem.fixes.autocast import Autocast
from jupyter_gpumem.fixes.base import Attempt, Check, Fix, FixContext, FixOutcome
from jupyter_gpumem.fixes.batch.reduce import ReduceBatch
from jupyter_gpumem.fixes.clear_cache import ClearCache
from jupyter_gpumem.fixes.cpu import MoveToCpu

FIXES: dict[str, Fix] = {f.key: f for f in (ClearCache(), ReduceBatch(), Autocast(), MoveToCpu())}
LADDER: tuple[str, ...] = tuple(FIXES)

__all__ = ["FIXES", "LADDER", "Attempt", "Check", "Fix", "FixContext", "FixOutcome"]
