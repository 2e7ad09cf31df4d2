"""One failed cell, as the fixes see it: its source, where it failed, what was diagnosed, what was
freed. Built the same way for a cell the hook caught and for a re-run that ran out of memory again.
"""

from __future__ import annotations

import ast
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any

from jupyter_gpumem.backends import torch_objects
from jupyter_gpumem.cells import source as cellsource
from jupyter_gpumem.cells.loop import LoopSite, find_loop
from jupyter_gpumem.diagnosis.diagnose import diagnose
from jupyter_gpumem.diagnosis.model import Diagnosis
from jupyter_gpumem.oom.report import OOMReport
from jupyter_gpumem.readings import holders as holders_mod
from jupyter_gpumem.readings import trace
from jupyter_gpumem.readings.allocator_state import read_allocator_state
from jupyter_gpumem.readings.release import ReleaseResult
from jupyter_gpumem.readings.snapshot import MemorySnapshot, describe_process, read_snapshot

if TYPE_CHECKING:
    from jupyter_gpumem.backends.torch_state import RngState


# the values a failed cell's names held that the guard may read as constants (immutable, plain)
PLAIN = (int, float, bool, str, bytes, type(None))


@dataclass
class NamespaceMark:
    """Where the user namespace ended before a cell ran: O(1) to take, on every cell.

    dicts keep insertion order, so the names a cell created are the ones after ``last_key``.
    """

    size: int
    last_key: str | None

    @classmethod
    def take(cls, ns: dict[str, Any]) -> NamespaceMark:
        return cls(len(ns), next(reversed(ns), None) if ns else None)

    def preexisting(self, ns: dict[str, Any]) -> frozenset[str]:
        keys = list(ns)
        if self.last_key is not None and self.last_key in ns:
            # min(): a name deleted before the mark shifts it left; a re-created last key moves right
            cut = min(keys.index(self.last_key) + 1, self.size)
        else:
            cut = min(self.size, len(keys))
        return frozenset(keys[:cut])


@dataclass
class FailedCell:
    """One failed cell, kept for the fixes: what ran, where it failed, what was diagnosed."""

    source: str
    exc_type: type[BaseException]
    report: OOMReport
    diagnosis: Diagnosis | None
    failed_lineno: int | None
    preexisting: frozenset[str]
    release: ReleaseResult | None = None
    snapshot: MemorySnapshot | None = None
    when: float = field(default_factory=time.time)
    diagnosis_error: str | None = None
    elapsed_s: float = 0.0
    # the shell's execution_count while the failed cell ran: a panel compares it with the latest
    execution_count: int | None = None
    # names the failed run itself created, with id() of their values: a re-run removes only these,
    # and only while they still hold what the failed run left (a later cell's value stays)
    created: dict[str, int] = field(default_factory=dict)
    # the loop a rehearsal stops on, and whether earlier passes of it had run when it failed
    loop: LoopSite | None = None
    earlier_passes: bool | None = None
    # the random number generators as the cell found them: every re-run starts from them, so the
    # final run is the run the user would have had on a card that fit
    rng: RngState | None = None
    # (qualified name, line) of the notebook functions the failure went through, below the cell
    frames: tuple[tuple[str, int], ...] = ()
    # the notebook cell's id (JupyterLab 4, Notebook 7), so "Apply to cell" can edit that cell
    cell_id: str | None = None
    fixed_by: str | None = None  # the fix that settled this failure (kept), by its label
    # the names the cell uses that held a plain value (int, float, bool, str, bytes, None) when
    # it failed: the guard reads ``if iter_num > 0:`` from these, not from what a later cell set
    plain_values: dict[str, Any] | None = None
    # the plain locals of each notebook function it failed in (as ``frames``), for the guard
    frame_values: tuple[dict[str, Any], ...] = ()
    # the BatchNorm statistics and gradients of the models the cell names, as the cell found them
    # (``rescue.before_cell.Before``, sealed when it failed): a fix puts them back before it runs
    before: Any = None


def cell_lineno(tb: TracebackType | None, user_ns: dict[str, Any]) -> int | None:
    """The line of the cell that was running when the exception left it."""
    line = None
    while tb is not None:
        f = tb.tb_frame
        if f.f_code.co_name == "<module>" and f.f_globals is user_ns:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def names_used(source: str, ns: dict[str, Any]) -> set[str]:
    """The notebook's names the cell uses, and the globals the notebook code it calls reads
    (``cells.source.names_used``, the one reading), and what a ``torch.compile``d function among
    them reads through the function it wraps (its optimizer, its model), and through the
    notebook functions that one calls."""
    names = cellsource.names_used(source, ns)
    for _ in range(3):  # a compiled step calling a notebook helper that calls a compiled one
        found = torch_objects.read_by_compiled(ns, names) - names
        if not found:
            break
        # what the notebook code those names reach reads: the same reading, of a cell that
        # reads just them
        names |= cellsource.names_used("\n".join(sorted(found)), ns)
    return names


def names_recreated(source: str) -> set[str]:
    """Top-level names the cell assigns from scratch before it reads them (`x = torch.randn(...)`).

    Their old values are dead weight during a re-run: they stay allocated until the new value is
    built, so the cell needs room for both.
    """
    tree = cellsource.read(source).tree
    if tree is None:
        return set()
    read: set[str] = set()
    fresh: set[str] = set()
    for stmt in tree.body:
        if isinstance(stmt, (ast.Assign, ast.AnnAssign)) and stmt.value is not None:
            value_reads = {n.id for n in ast.walk(stmt.value) if isinstance(n, ast.Name)}
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
            for t in targets:
                for el in t.elts if isinstance(t, (ast.Tuple, ast.List)) else [t]:
                    if isinstance(el, ast.Name) and el.id not in read | value_reads:
                        fresh.add(el.id)
            read |= value_reads
        else:
            read |= {n.id for n in ast.walk(stmt) if isinstance(n, ast.Name)}
    return fresh


def build_failure(
    shell: Any,
    value: BaseException,
    report: OOMReport,
    tb: TracebackType | None,
    *,
    source: str,
    preexisting: frozenset[str],
    release: Callable[[BaseException], ReleaseResult] | None,
    rng: RngState | None = None,
    execution_count: int | None = None,
    held_at_start: tuple[int, int] | None = None,
) -> FailedCell:
    """Read what the diagnosis needs from the frames, then (unless ``release`` is None) free them."""
    t0 = time.perf_counter()
    user_ns = shell.user_ns
    snapshot = read_snapshot()
    # before anything is released: the cache's free blocks as the failure left them
    allocator = read_allocator_state(report.requested_bytes, report.device_index)
    known = {p.pid for p in snapshot.processes} if snapshot is not None else set()
    process_names = {
        p.pid: describe_process(p.pid) for p in report.other_processes if p.pid not in known
    }
    created = {n: id(v) for n, v in user_ns.items() if n not in preexisting and n[:1] != "_"}
    used = names_used(source, user_ns)
    found = _find_holders(shell, tb, source, created, used)
    lineno = cell_lineno(tb, user_ns)
    tracing = trace.active()
    allocated_by, allocated_rows = _traced(shell, report.device_index) if tracing else ([], [])
    loop, earlier = _failing_loop(tb, user_ns, preexisting)
    notebook_frames = _notebook_frames(tb, user_ns)
    frame_values = _frame_values(tb, user_ns)  # before the release moves or clears the locals
    released = release(value) if release is not None else None
    diag = diagnose(
        report,
        snapshot,
        found,
        release=released,
        released=released is not None,
        created=created,
        held_at_start=_held_on(held_at_start, report, snapshot),
        allocator=allocator,
        process_names=process_names,
        allocated_by=allocated_by,
        allocated_lines=trace.by_line(allocated_rows),
        tracing=tracing,
    )
    return FailedCell(
        source=source,
        exc_type=type(value),
        report=report,
        diagnosis=diag,
        failed_lineno=lineno,
        preexisting=preexisting,
        release=released,
        snapshot=snapshot,
        elapsed_s=time.perf_counter() - t0,
        execution_count=execution_count,
        created=created,
        loop=loop,
        earlier_passes=earlier,
        rng=rng,
        frames=notebook_frames,
        plain_values={n: v for n in used if type(v := user_ns.get(n, PLAIN)) in PLAIN},
        frame_values=frame_values,
    )


def _find_holders(
    shell: Any, tb: TracebackType | None, source: str, created: dict[str, int], used: set[str]
) -> holders_mod.HolderSet:
    """Who holds memory, the failed frames' locals included; the frames are let go on return, so
    that releasing them afterwards frees what they held."""
    user_ns = shell.user_ns
    return holders_mod.find_holders(
        user_ns,
        hidden=getattr(shell, "user_ns_hidden", ()),
        frames=holders_mod.failed_frames(tb, user_ns),
        cell_names=used,
        # only a value from before this run is "an old value": one this run made is its own
        recreated=names_recreated(source) - set(created),
    )


def _traced(shell: Any, device: int | None) -> tuple[list[str], list[trace.LineAlloc]]:
    """Live memory on the failing device by the line that allocated it (tracing on): the summary
    and the rows. Read while the failed frames' tensors are still alive; nothing when it cannot
    be read."""
    try:
        rows = trace.allocated_by_line(shell, device)
        return trace.summary_lines(5, rows=rows), rows
    except Exception:
        return [], []


def _failing_loop(
    tb: TracebackType | None, user_ns: dict[str, Any], preexisting: frozenset[str]
) -> tuple[LoopSite | None, bool | None]:
    """The loop a rehearsal stops on, and whether earlier passes of it ran."""
    try:
        return find_loop(tb, user_ns, preexisting)
    except Exception:  # a reading, never a reason to lose the diagnosis
        return None, None


def _notebook_frames(
    tb: TracebackType | None, user_ns: dict[str, Any]
) -> tuple[tuple[str, int], ...]:
    """(qualified name, line) of the notebook functions the failure went through, below the cell."""
    found = []
    while tb is not None:
        code = tb.tb_frame.f_code
        if tb.tb_frame.f_globals is user_ns and code.co_name != "<module>":
            found.append((getattr(code, "co_qualname", code.co_name), tb.tb_lineno))
        tb = tb.tb_next
    return tuple(found)


def _frame_values(tb: TracebackType | None, user_ns: dict[str, Any]) -> tuple[dict[str, Any], ...]:
    """The plain locals (int, float, str, ...) of each notebook function the failure went
    through, in the order of ``_notebook_frames``: the guard counts a loop's passes from them."""
    found = []
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_globals is user_ns and frame.f_code.co_name != "<module>":
            try:
                local = dict(frame.f_locals)
            except Exception:
                local = {}
            found.append({n: v for n, v in local.items() if type(v) in PLAIN})
        tb = tb.tb_next
    return tuple(found)


def _held_on(
    held: tuple[int, int] | None, report: OOMReport, snapshot: MemorySnapshot | None
) -> int | None:
    """What the cell found allocated, if it was read on the device that ran out."""
    if held is None:
        return None
    device = report.device_index
    if device is None and snapshot is not None:
        device = snapshot.device_index
    return held[1] if device is None or device == held[0] else None
