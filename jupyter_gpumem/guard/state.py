"""What the guard's walk knows at one point of the cell (``State``: which names are the cell's own,
which were deleted, what each is made from), and what it shares while it reads the notebook
functions a cell calls (``Reach``, with its limits).

Kept apart from ``effects`` (the calls judged) and ``walk`` (the statements): both read
and change a ``State``, and a branch copies it and merges the copies (``State.merge``), so it is
plain data with no walking in it.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from jupyter_gpumem.guard.calls import NotebookFunction


@dataclass
class State:
    """What the walk knows at one point of the cell."""

    fresh: set[str] = field(default_factory=set)  # bound by the cell from scratch
    gone: set[str] = field(default_factory=set)  # pre-existing names the cell deleted
    alias: dict[str, str] = field(default_factory=dict)  # cell name -> pre-existing object it is
    deps: dict[str, frozenset[str]] = field(default_factory=dict)  # pre-existing state it came from
    zeroed: bool = False  # gradients were zeroed before this point
    # add = L.append: name -> L.append
    methods: dict[str, ast.expr] = field(default_factory=dict)
    # bufs = [history]: a container the cell made -> a pre-existing object in it
    holds: dict[str, str] = field(default_factory=dict)
    threads: set[str] = field(default_factory=set)  # names of threads and processes made here
    # def get(): ... in the code walked: name -> the function, read where it is called
    defs: dict[str, ast.FunctionDef | ast.AsyncFunctionDef] = field(default_factory=dict)

    def copy(self) -> State:
        return State(
            set(self.fresh),
            set(self.gone),
            dict(self.alias),
            dict(self.deps),
            self.zeroed,
            dict(self.methods),
            dict(self.holds),
            set(self.threads),
            dict(self.defs),
        )

    def forget(self, name: str) -> None:
        """``name`` is bound to something new: what was known of its old value goes."""
        for d in (self.alias, self.methods, self.holds, self.defs, self.deps):
            d.pop(name, None)
        self.threads.discard(name)

    @staticmethod
    def merge(states: list[State]) -> State:
        """After branches of which any one ran: fresh only if fresh in all of them."""
        out = states[0].copy()
        for s in states[1:]:
            out.fresh &= s.fresh
            out.gone |= s.gone
            out.alias.update(s.alias)
            for k, v in s.deps.items():
                out.deps[k] = out.deps.get(k, frozenset()) | v
            out.zeroed = out.zeroed and s.zeroed
            out.methods.update(s.methods)
            out.holds.update(s.holds)
            out.threads |= s.threads
            out.defs.update(s.defs)
        return out


@dataclass
class Reach:
    """What a walk needs to read the notebook functions a cell calls, shared by all depths."""

    namespace: Mapping[str, Any]
    # the plain values the cell's names held at the failure (FailedCell.plain_values): what an
    # ``if`` test said then, whatever a later cell set since; None: read them from ``namespace``
    at_failure: Mapping[str, Any] | None = None
    # the plain values of the locals of each notebook function the failure went through, by its
    # failing frame (qualname, line): what its loop counters and tests said there
    frame_values: Mapping[tuple[str, int], Mapping[str, Any]] = field(default_factory=dict)
    cache: dict[int, NotebookFunction | None] = field(default_factory=dict)
    walks: int = 0  # function bodies walked so far
    rebound: frozenset[str] | None = None  # globals notebook code may rebind (None: any)
    rebound_read: bool = False  # ``rebound`` was read


DEPTH = 5  # calls followed into notebook code, one inside another
WALKS = 100  # function bodies walked for one cell, all depths together
