"""Run a cell's source in the user namespace under a plan (new source, context managers, namespace
changes), measure its peak, and turn an OOM into the next diagnosis.

This is what a fix button, ``%gpumem retry`` and ``%%oomsafe`` share. The source is executed here,
in the user namespace, as ``%%time`` does: a retry is not a nested ``run_cell``. A non-OOM error is
raised unchanged to the caller. A rehearsal (``Plan.rehearsal``) stops once the failing loop has
run two passes (``rehearsal.LoopStopper``), or at its first write outside the kernel's memory
(``sandbox``); undoing what it changed is the caller's transaction. Every run starts from the
random number generators the failed cell started from.

Peaks and capacity are read on the device that ran out of memory (``run_plan(device=...)``; when
not given, the device where the run allocated most), never merely the current one: a cell on
``cuda:1`` measured on ``cuda:0`` reads a peak of 0 B.

A cell with top-level ``await`` is compiled as IPython compiles it (``PyCF_ALLOW_TOP_LEVEL_AWAIT``)
and its coroutine run to the end on this thread, as IPython runs such a cell (``run_coroutine``).
"""

from __future__ import annotations

import ast
import contextlib
import inspect
import io
import time
import traceback
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from types import CodeType
from typing import Any

from jupyter_gpumem import backends
from jupyter_gpumem.backends.allocator import SizeLog
from jupyter_gpumem.backends.peaks import Peaks, PeakWatch
from jupyter_gpumem.backends.torch_state import RngState, read_rng, restore_rng
from jupyter_gpumem.cells import source as cellsource
from jupyter_gpumem.cells.failure import FailedCell, build_failure
from jupyter_gpumem.cells.loop import LoopSite, LoopStopper, RehearsalDone, relocate
from jupyter_gpumem.oom.report import OOMReport, find_oom
from jupyter_gpumem.readings.release import release_failed_cell
from jupyter_gpumem.rescue import sandbox

ContextFactory = Callable[[], AbstractContextManager[Any]]


@dataclass
class Plan:
    """What a fix changes for one run."""

    source: str
    contexts: list[ContextFactory] = field(default_factory=list)
    namespace_updates: dict[str, Any] = field(default_factory=dict)
    batch: int | None = None  # the batch size this run uses, for reduce-batch
    note: str = ""  # what this run does differently, shown on its line
    rehearsal: bool = False  # a probe: stopped once the fit is proven, then rolled back
    # a rehearsal that ran whole (no loop to stop) may turn out to be the run to keep: asked
    # with its result before it would be rolled back
    keep: Callable[[RunResult], bool] | None = None


@dataclass
class RunResult:
    ok: bool
    peak_bytes: int | None  # peak allocated during the run (torch's allocated_bytes.all.peak)
    capacity_bytes: int | None  # what the process may use: the card or its cap
    seconds: float
    failure: FailedCell | None = None  # the next diagnosis, when it ran out of memory again
    value: Any = None  # the value of the cell's last expression
    passes: int | None = None  # a rehearsal stopped after this many passes of the failing loop
    kept: bool = False  # a rehearsal kept as the real run (see Plan.keep)
    # a rehearsal cut short before a write outside the kernel's memory: what it was stopped
    # before ("`open('log.txt', 'a')`"); its peak is what it measured until then
    stopped: str | None = None
    device: int | None = None  # the device its peak and capacity were read on


def _split_last_expr(tree: ast.Module) -> tuple[ast.Module, ast.Expression | None]:
    """The statements, and the last expression whose value is shown; ``tree`` is not changed."""
    last = tree.body[-1] if tree.body else None
    if isinstance(last, ast.Expr):
        return ast.Module(body=tree.body[:-1], type_ignores=tree.type_ignores), ast.Expression(
            body=last.value
        )
    return tree, None


def capacity_bytes(device_index: int | None = None) -> int | None:
    """What this process may use on the device: free plus what PyTorch reserves (so the memory
    other processes and this process's context hold outside PyTorch is left out), capped by a
    per-process limit."""
    from jupyter_gpumem.readings.snapshot import read_snapshot

    snap = read_snapshot(device_index)
    if snap.free_bytes is not None and snap.reserved_bytes is not None:
        budget: int | None = snap.free_bytes + snap.reserved_bytes
    elif snap.total_bytes is not None:
        budget = snap.total_bytes - snap.other_processes_bytes
    else:
        budget = None
    if snap.allowed_bytes is not None:
        budget = snap.allowed_bytes if budget is None else min(budget, snap.allowed_bytes)
    return budget


def run_plan(
    shell: Any,
    plan: Plan,
    *,
    preexisting: frozenset[str] | None = None,
    display_result: bool = True,
    keep_traceback: bool = False,
    loop: LoopSite | None = None,
    rng: RngState | None = None,
    passes: int = 2,
    device: int | None = None,
) -> RunResult:
    """Run once. Returns ok / the measured peak on ``device`` (None: where the run allocated
    most), or the new FailedCell on an OOM."""
    user_ns = shell.user_ns
    if preexisting is None:
        preexisting = frozenset(user_ns)
    if rng is None:
        rng = read_rng()
    else:
        restore_rng(rng)
    user_ns.update(plan.namespace_updates)
    run = _compile(shell, plan, loop, passes)
    meter = _Meter(device)
    t0 = time.perf_counter()
    value = None
    try:
        with backends.active().on_this_thread(), meter, contextlib.ExitStack() as stack:
            sandboxed = _enter(stack, plan, run.stopper)
            value = _execute(shell, run, user_ns, plan)
    except RehearsalDone as done:
        # the fit is proven, or the rehearsal reached a write outside memory: the frames it
        # stopped (activations, the batch) go at once
        traceback.clear_frames(done.__traceback__)
        stopped = done.what if isinstance(done, sandbox.WorldTouched) else None
        del done
        return _stopped(plan, run, meter, time.perf_counter() - t0, passes, stopped)
    except Exception as exc:
        found = find_oom(exc)
        if found is None:
            raise
        elapsed = time.perf_counter() - t0
        failure = _failure(shell, plan, exc, found[1], preexisting, keep_traceback, rng)
        del exc
        meter.device = failure.report.device_index if meter.device is None else meter.device
        return meter.result(False, elapsed, failure=failure)
    elapsed = time.perf_counter() - t0
    if display_result and value is not None and not plan.rehearsal:
        from IPython.display import display

        display(value)
    if sandboxed is not None and sandboxed.stopped is not None:
        # the code caught WorldTouched and went on: it ran whole, but not everything it meant to
        return _stopped(plan, run, meter, elapsed, passes, sandboxed.stopped)
    # it ran whole (the loop, if any, ended before the rehearsal had seen enough): passes=None
    return meter.result(True, elapsed, value=value)


def _stopped(
    plan: Plan, run: _Compiled, meter: _Meter, elapsed: float, passes: int, what: str | None
) -> RunResult:
    """A rehearsal that ended early: its passes, and what it was stopped before (said on its
    line, and never kept as the real run)."""
    completed = run.stopper.completed if run.stopper is not None else 0
    if what is None:
        completed = completed or passes
    else:
        note = sandbox.stopped_text(what)
        plan.note = f"{plan.note}, {note}" if plan.note else note
    return meter.result(True, elapsed, passes=completed, stopped=what)


class _Meter:
    """Peaks read on the device the run used, without resetting the notebook's peak counters
    (``backends.peaks.PeakWatch``): around the run, each device's counters are read and its
    allocations logged (``record_sizes``); after it, the peak on ``device`` (None: the device
    whose allocations rose most). The log turns the counter, where an earlier peak (the OOM's)
    hides the run's, back into the run's own peak."""

    def __init__(self, device: int | None) -> None:
        self.device = device
        self.watches = {i: PeakWatch(i) for i in (_devices() if device is None else (device,))}
        self.peaks: dict[int | None, Peaks | None] = {}
        self._logs: dict[int | None, SizeLog | None] = {}
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> _Meter:
        gpu = backends.active()
        for index, watch in self.watches.items():
            try:
                self._logs[index] = self._stack.enter_context(gpu.record_sizes(index))
            except Exception:  # no log: a peak hidden by an earlier one is a bound
                self._logs[index] = None
            watch.start()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._stack.close()
        except Exception:
            self._logs.clear()
        for index, watch in self.watches.items():
            self.peaks[index] = watch.stop(self._logs.get(index))
        self._logs.clear()

    def _chosen(self) -> int | None:
        if self.device is not None or len(self.peaks) <= 1:
            return self.device if self.device is not None else next(iter(self.peaks), None)
        rise = {i: p.allocated_bytes - p.start_bytes for i, p in self.peaks.items() if p}
        return max(rise, key=lambda i: rise[i]) if rise else next(iter(self.peaks), None)

    def result(self, ok: bool, elapsed: float, **fields: Any) -> RunResult:
        device = self._chosen()
        peaks = self.peaks.get(device)
        peak = None if peaks is None else peaks.at_most_bytes  # exact, or the most it can be
        return RunResult(ok, peak, capacity_bytes(device), elapsed, device=device, **fields)


def _devices() -> tuple[int | None, ...]:
    try:
        visible: tuple[int | None, ...] = tuple(backends.active().visible_devices())
    except Exception:
        visible = ()
    return visible or (None,)


@dataclass
class _Compiled:
    """A plan's source made ready to run: compiled once, before the clock starts."""

    body: CodeType  # the statements
    last: CodeType | None  # the last expression, whose value is shown
    stopper: LoopStopper | None  # a rehearsal's, where the failing loop is found again


def _compile(shell: Any, plan: Plan, loop: LoopSite | None, passes: int) -> _Compiled:
    """The shell's own Python for the source, registered with its compile cache as a cell is
    (tracebacks and ``linecache`` show the re-run's lines), and the failing loop found again in
    it: a fix's edits may have moved it."""
    code = cellsource.to_python(plan.source, shell)
    filename = shell.compile.cache(code, shell.execution_count, raw_code=plan.source)
    tree = cellsource.parse(code, filename)
    body, last = _split_last_expr(tree)
    # the flags the shell compiles its cells with (the notebook's own ``from __future__``
    # imports, not this module's), and top-level await where the shell allows it, as it does
    flags = getattr(shell.compile, "flags", 0) & ~ast.PyCF_ONLY_AST
    if getattr(shell, "autoawait", True):
        flags |= ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
    body_code = compile(body, filename, "exec", flags, dont_inherit=True)
    last_code = None if last is None else compile(last, filename, "eval", flags, dont_inherit=True)
    stopper = None
    if plan.rehearsal and loop is not None:
        site = relocate(loop, code, filename)
        if site is not None:
            stopper = LoopStopper(site.filename if not site.in_cell else filename, site, passes)
    return _Compiled(body_code, last_code, stopper)


def _execute(shell: Any, run: _Compiled, user_ns: dict[str, Any], plan: Plan) -> Any:
    """Run the compiled cell in the namespace; returns its last expression's value. A cell that
    awaits (its code is a coroutine's, as IPython tells it) runs as one coroutine, each part
    awaited in turn as IPython's ``run_cell_async`` does, so a task its statements start is
    still running when its last line awaits it."""
    parts = (run.body,) if run.last is None else (run.body, run.last)
    if not any(code.co_flags & inspect.CO_COROUTINE for code in parts):
        exec(run.body, user_ns)
        return None if run.last is None else eval(run.last, user_ns)

    async def cell() -> Any:
        value = None
        for code in parts:
            value = eval(code, user_ns)
            if code.co_flags & inspect.CO_COROUTINE:
                value = await value
        return value if run.last is not None else None

    cancelled: list[int] = []
    value = run_coroutine(shell, cell(), rehearsal=plan.rehearsal, cancelled=cancelled)
    if cancelled:
        n = sum(cancelled)
        note = f"{n} task{'s' if n > 1 else ''} it started and did not await cancelled"
        if not plan.rehearsal:  # in a kernel: IPython's loop, which runs no more after the fix
            note += " (a fix runs an await cell on an event loop that stops with it)"
        plan.note = f"{plan.note}, {note}" if plan.note else note
    return value


def run_coroutine(
    shell: Any, coro: Any, *, rehearsal: bool = False, cancelled: list[int] | None = None
) -> Any:
    """Run a cell's coroutine to its end on this thread and return its value.

    On the shell's ``loop_runner``: for asyncio (the default), IPython's own event loop, the one
    the terminal runs ``await`` cells on (``get_asyncio_loop``). In ipykernel the kernel's loop is
    running this very call (a fix runs inside a cell or a click) and cannot be entered again, so
    it is set aside on this thread while the coroutine runs on IPython's loop, then put back.

    Tasks the run started and left running are cancelled (their number added to ``cancelled``)
    unless it is a real run that ended well in a terminal, where IPython's loop runs them on at
    the next await cell as it would have: a rehearsal's, or a failed run's, would go on after
    the rollback, and in a kernel IPython's loop does not run again after the fix."""
    import asyncio

    running = asyncio.events._get_running_loop()
    asyncio.events._set_running_loop(None)
    try:
        runner = getattr(shell, "loop_runner", None)
        if runner is not None and str(runner) != "asyncio":
            return runner(coro)  # %autoawait trio / curio / a runner of the user's
        keep = not rehearsal and running is None
        return _run_on_asyncio(coro, keep_tasks=keep, cancelled=cancelled)
    finally:
        asyncio.events._set_running_loop(running)


def _run_on_asyncio(coro: Any, *, keep_tasks: bool, cancelled: list[int] | None) -> Any:
    import asyncio

    from IPython.core.async_helpers import get_asyncio_loop

    loop = get_asyncio_loop()
    private = loop.is_running()  # a fix started from inside an await cell: not that loop
    if private:
        loop = asyncio.new_event_loop()
    before = asyncio.all_tasks(loop)
    task = loop.create_task(coro)
    ended_well = False
    try:
        value = loop.run_until_complete(task)
        ended_well = True
        return value
    finally:
        if task.done() and not task.cancelled():
            task.exception()  # read: no "Task exception was never retrieved" later
        left = [t for t in asyncio.all_tasks(loop) - before if not t.done()]
        if left and not (keep_tasks and ended_well and not private):
            _cancel(loop, left)
            if cancelled is not None and ended_well:
                cancelled.append(len(left))
        if private:
            loop.close()
        del task


def _cancel(loop: Any, tasks: list[Any]) -> None:
    """Cancel what a run left running and let it finish (a second at most), as ``asyncio.run``
    does on its way out."""
    import asyncio

    for t in tasks:
        t.cancel()
    with contextlib.suppress(Exception, RehearsalDone):
        loop.run_until_complete(asyncio.wait(tasks, timeout=1.0))
    for t in tasks:
        if t.done() and not t.cancelled():
            t.exception()


def _enter(stack: contextlib.ExitStack[Any], plan: Plan, stopper: LoopStopper | None) -> Any | None:
    """The fix's context managers, then the rehearsal's stopper, its sandbox and its silence;
    returns the sandbox's state (None for a real run)."""
    for factory in plan.contexts:
        stack.enter_context(factory())
    if stopper is not None:
        stack.enter_context(stopper)
    if not plan.rehearsal:
        stack.enter_context(sandbox.journaling())  # undone if this real run is rolled back
        return None
    state = stack.enter_context(sandbox.rehearsing())
    # a rehearsal's prints (losses, progress bars) are not results: not shown
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
    return state


def _failure(
    shell: Any,
    plan: Plan,
    exc: BaseException,
    report: OOMReport,
    preexisting: frozenset[str],
    keep_traceback: bool,
    rng: RngState,
) -> FailedCell:
    """The OOM of a re-run as the next diagnosis; its frames freed unless the caller keeps the
    traceback."""
    return build_failure(
        shell,
        exc,
        report,
        exc.__traceback__,
        source=plan.source,
        preexisting=preexisting,
        release=None if keep_traceback else lambda e: release_failed_cell(None, e),
        rng=rng,
        execution_count=getattr(shell, "execution_count", None),
    )


def failed_run_leftovers(user_ns: dict[str, Any], created: dict[str, int]) -> list[str]:
    """The variables the failed run itself created that still hold what it left.

    A re-run makes them again, and while the old `x = torch.randn(...)` is alive the re-run
    needs room for both. Only names the failed run created (as recorded when it failed), and only
    while they still hold that value: a name a later cell made, or set again, is the user's.
    """
    return [n for n, ident in created.items() if n in user_ns and id(user_ns[n]) == ident]
