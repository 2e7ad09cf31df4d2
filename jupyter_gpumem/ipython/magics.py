"""``%gpumem``: status, simulate, limit, release and help."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments

from jupyter_gpumem import backends
from jupyter_gpumem.backends import active
from jupyter_gpumem.diagnosis.render import render_snapshot_text
from jupyter_gpumem.fixes import FIXES, LADDER
from jupyter_gpumem.fixes.ladder import (
    Interrupted,
    Options,
    RerunRaised,
    apply_fix,
    report_raised,
    run_ladder,
)
from jupyter_gpumem.ipython.magic_args import (
    MAX_SIMULATED_BYTES,
    RETRY_PARSER,
    devices_option,
    number_option,
    parse_line,
    parse_or_help,
    positive,
    size_or_off,
)
from jupyter_gpumem.readings.release import release_failed_cell
from jupyter_gpumem.readings.snapshot import read_snapshot
from jupyter_gpumem.units import format_bytes

if TYPE_CHECKING:
    from jupyter_gpumem.ipython.extension import Extension

COMMANDS = (
    "status",
    "retry",
    "gauge",
    "sidebar",
    "simulate",
    "limit",
    "release",
    "cells",
    "history",
    "shutdown",
    "trace",
    "help",
)


@magics_class
class GpuMemMagics(Magics):
    def __init__(self, shell: Any, ext: Extension) -> None:
        super().__init__(shell)
        self.ext = ext

    @magic_arguments()
    @argument(
        "command",
        nargs="?",
        default="status",
        help="status (default): the GPU's memory now. "
        "gauge: a live memory gauge under this cell. "
        "sidebar [off]: the gauge in JupyterLab's right sidebar. "
        "simulate SIZE|off [--devices N]: run the following cells on a simulated GPU of that "
        "size (N cards of that size: cuda:0 ... cuda:N-1). "
        "limit SIZE|off [--device N]: cap what this process may use on every GPU (or GPU N "
        "only), to rehearse a smaller card. "
        "release: free what the last failed cell pinned (when keep_traceback is on). "
        "cells on|off [--quiet]: after each cell, what it added to GPU memory, its peak and time. "
        "history: those numbers for every cell since. "
        "shutdown PID [--yes]: shut down another notebook's kernel that holds GPU memory. "
        "trace on|off|save [PATH]: record which source line allocates each tensor; an OOM then "
        "says which lines hold the memory; save writes PyTorch's memory-viewer snapshot. "
        "help: this text.",
    )
    @argument("args", nargs=argparse.REMAINDER, help="the command's arguments and options")
    @line_magic
    def gpumem(self, line: str = "") -> None:
        """Show and control GPU memory from a notebook (jupyter_gpumem)."""
        line = line.split(" #", 1)[0]  # a trailing comment is not an argument
        if line.split()[:1] in (["-h"], ["--help"]):
            line = "help"
        opts = parse_line(self.gpumem, line)
        command, args = opts.command, list(opts.args)
        handler = getattr(self, f"_cmd_{command}", None)
        if command not in self.ext.commands() or handler is None:
            raise UsageError(
                f"%gpumem: unknown command {command!r}; try one of: {', '.join(self.ext.commands())}"
            )
        handler(args)

    def _no_args(self, command: str, args: list[str]) -> None:
        if args:
            raise UsageError(f"%gpumem {command} takes no arguments (got {' '.join(args)!r})")

    def _cmd_help(self, args: list[str]) -> None:
        self._no_args("help", args)
        print(self.gpumem.__doc__)  # @magic_arguments made it the full help

    def _cmd_status(self, args: list[str]) -> None:
        self._no_args("status", args)
        last = self.ext.hook.last_failure
        marked = last.report.device_index if last is not None else None
        print(render_snapshot_text(read_snapshot(), marked=marked))

    def _cmd_cells(self, args: list[str]) -> None:
        if args not in (["on"], ["off"], ["on", "--quiet"]):
            raise UsageError("%gpumem cells takes on [--quiet], or off")
        stats = self.ext.cell_stats()
        if args[0] == "off":
            stats.stop()
            print("Per-cell GPU memory off (`%gpumem history` keeps what was recorded).")
            return
        stats.start(quiet="--quiet" in args)
        print(
            "Per-cell GPU memory on: one line after each cell (its change, peak and time); "
            "`%gpumem history` for the table. It resets PyTorch's peak counter before each cell."
        )

    def _cmd_history(self, args: list[str]) -> None:
        self._no_args("history", args)
        print(self.ext.cell_stats().table())

    def _cmd_trace(self, args: list[str]) -> None:
        from jupyter_gpumem.readings import trace

        if args == ["on"] or args == ["on", "--no-modules"]:
            trace.start(modules="--no-modules" not in args, shell=self.shell)
            print(
                "Tracing allocations: an OOM now says which lines of your cells hold the memory; "
                "`%gpumem trace save` writes a snapshot for pytorch.org/memory_viz. It slows each "
                "allocation a little; `%gpumem trace off` ends it."
            )
        elif args == ["off"]:
            was = trace.active()
            trace.stop()
            print("Tracing off." if was else "Tracing was not on.")
        elif args[:1] == ["save"] and len(args) <= 2:
            if not trace.active():
                raise UsageError("%gpumem trace save: tracing is off (`%gpumem trace on` first)")
            path = trace.save_snapshot(
                args[1] if len(args) == 2 else "gpumem_snapshot.pickle", shell=self.shell
            )
            print(f"Saved {path}: open it at https://pytorch.org/memory_viz (nothing is uploaded).")
        else:
            raise UsageError("%gpumem trace takes on [--no-modules], off, or save [PATH]")

    def _cmd_shutdown(self, args: list[str]) -> None:
        from jupyter_gpumem.readings.kernels import find_kernel, shutdown

        if not args or len(args) > 2 or (len(args) == 2 and args[1] != "--yes"):
            raise UsageError("%gpumem shutdown takes a pid, then --yes to confirm")
        if not args[0].isascii() or not args[0].isdigit():
            raise UsageError(f"%gpumem shutdown: not a pid: {args[0]!r}")
        pid = int(args[0])
        if pid == os.getpid():
            raise UsageError("%gpumem shutdown: that is this kernel")
        info = find_kernel(pid)
        if info is None:
            raise UsageError(f"%gpumem shutdown: pid {pid} is not a Jupyter kernel seen from here")
        if not info.notebook:
            raise UsageError(f"%gpumem shutdown: pid {pid} is {info.describe()}")
        if args[1:] != ["--yes"]:
            print(
                f"This would shut down {info.describe()}: its variables are lost. "
                f"To confirm: %gpumem shutdown {pid} --yes"
            )
            return
        try:
            shutdown(info)
        except Exception as exc:
            raise UsageError(f"%gpumem shutdown: {type(exc).__name__}: {exc}") from None
        print(f"Shut down {info.describe()}.")

    def _needs_widgets(self, command: str) -> None:
        if not self.ext.widgets_available():
            raise UsageError(
                f"%gpumem {command} needs Jupyter with ipywidgets (this is a terminal): "
                "use %gpumem status"
            )

    def _cmd_gauge(self, args: list[str]) -> None:
        self._no_args("gauge", args)
        self._needs_widgets("gauge")
        self.ext.show_gauge()

    def _cmd_sidebar(self, args: list[str]) -> None:
        if args not in ([], ["off"]):
            raise UsageError("%gpumem sidebar takes no argument, or off")
        if args == ["off"]:
            closed = self.ext.close_sidebar()
            print("Sidebar gauge closed." if closed else "No sidebar gauge was open.")
            return
        self._needs_widgets("sidebar")
        print(self.ext.open_sidebar())

    def _cmd_simulate(self, args: list[str]) -> None:
        args, asked = devices_option(args)
        size = size_or_off("simulate", args, most=MAX_SIMULATED_BYTES)
        if size is None and asked is not None:
            raise UsageError("%gpumem simulate off takes no --devices")
        devices = asked or 1
        if size is None:
            was = backends.simulation()
            backends.stop_simulation()
            self.ext.simulation = None
            print("Simulated GPU off." if was else "No simulated GPU was running.")
            return
        sim = backends.simulate(size, devices=devices)
        self.ext.simulation = sim
        cards = (
            f"{devices} simulated GPUs of {format_bytes(sim.total_bytes)} each (cuda:0 to "
            f"cuda:{devices - 1})"
            if devices > 1
            else f"Simulated GPU of {format_bytes(sim.total_bytes)}"
        )
        print(
            f"{cards}: cells that place tensors on `cuda` now run on the CPU and count against "
            "it. `%gpumem simulate off` ends it."
        )

    def _cmd_limit(self, args: list[str]) -> None:
        args, device = number_option(args, "limit", "--device", "--device 1")
        size = size_or_off("limit", args)
        backend = active()
        try:
            total = backend.set_limit(size, device)
            count = len(backend.visible_devices())
        except RuntimeError as exc:
            raise UsageError(f"%gpumem limit: {exc}") from None
        if size is not None:
            self.ext.limited = backend  # lifted on every device when the extension unloads
        elif device is None:
            self.ext.limited = None
        where = (
            f" on GPU {device}" if device is not None
            else f" on each of the {count} GPUs" if count > 1
            else ""
        )  # fmt: skip
        if size is None:
            print(f"No cap{where}: this process may use the whole {format_bytes(total)}.")
        else:
            print(
                f"This process may now use {format_bytes(min(size, total))} of "
                f"{format_bytes(total)}{where} (a rehearsal of a smaller card). "
                "`%gpumem limit off` lifts it."
            )

    def _cmd_release(self, args: list[str]) -> None:
        self._no_args("release", args)
        exc = getattr(sys, "last_value", None)
        result = release_failed_cell(self.shell, exc)
        if self.ext.hook.last_failure is not None:
            self.ext.hook.last_failure.release = result
        if result.freed_bytes is None:
            print("Released the last failure's frames (no GPU reading to measure what was freed).")
        else:
            print(
                f"Freed {format_bytes(result.freed_bytes)}; PyTorch now has "
                f"{format_bytes(result.allocated_after_bytes)} allocated."
            )

    def _cmd_retry(self, args: list[str]) -> None:
        opts = parse_or_help(RETRY_PARSER, args)
        if opts is None:
            return
        failed = self.ext.hook.last_failure
        if failed is None:
            raise UsageError("%gpumem retry: no cell has run out of memory yet")
        options = Options(
            batch_var=opts.batch_var,
            min_batch=opts.min_batch,
            max_runs=opts.max_retries,
            force=opts.force,
            drop=tuple(opts.drop or ()),
            drop_output_cache=opts.drop_output_cache,
            accumulate=opts.accumulate,
        )
        try:
            outcome = apply_fix(
                self.shell,
                failed,
                opts.fix,
                options,
                self.ext.remembered,
                on_attempt=lambda a: print("  " + a.line()),
            )
        except Interrupted as exc:
            print(exc.message, file=sys.stderr)
            raise KeyboardInterrupt from None
        except RerunRaised as raised:  # the cell's error as the cell shows it, then one line
            print(report_raised(self.shell, FIXES[opts.fix].label, raised), file=sys.stderr)
            return
        self.ext.report_outcome(outcome, failed)

    @magic_arguments(name="%oomsafe")  # shown as %%oomsafe: IPython's help prefixes one %
    @argument(
        "--fixes",
        default=",".join(LADDER),
        metavar="LIST",
        help=f"the fixes to try, in order, comma-separated (default: {','.join(LADDER)})",
    )
    @argument("--max-retries", type=positive, default=8, metavar="N", help="at most N re-runs")
    @argument("--batch-var", metavar="NAME", help="the batch size is this variable")
    @argument("--min-batch", type=positive, default=1, metavar="N", help="smallest batch to try")
    @argument("--force", action="store_true", help="re-run despite side effects")
    @argument("--quiet", action="store_true", help="say only what worked")
    @cell_magic
    def oomsafe(self, line: str, cell: str) -> None:
        """Run the cell; on out-of-memory, apply fixes in order until one fits, then say what
        worked and what to change in the cell.

        Before re-running, a cell that already changed state (`step += 1`, `opt.step()`,
        `history.append(...)`, file writes) up to the failing line stops with an explanation,
        unless --force. Errors other than out-of-memory pass through unchanged.
        """
        if line.split()[:1] in (["-h"], ["--help"]):
            print(self.oomsafe.__doc__)
            return
        opts = parse_line(self.oomsafe, line)
        # IPython's splitter keeps the quotes of --fixes "clear, batch"
        fixes = [f.strip(" \t'\"") for f in opts.fixes.split(",")]
        fixes = [f for f in fixes if f]
        unknown = [f for f in fixes if f not in FIXES]
        if unknown or not fixes:
            raise UsageError(
                f"%%oomsafe --fixes: unknown fix {', '.join(unknown) or '(none)'}; "
                f"choose from {','.join(LADDER)}"
            )
        try:
            result = run_ladder(
                self.shell,
                cell,
                fixes=fixes,
                options=Options(
                    batch_var=opts.batch_var,
                    min_batch=opts.min_batch,
                    max_runs=opts.max_retries,
                    force=opts.force,
                ),
                remembered=self.ext.remembered,
                say=print,
                quiet=opts.quiet,
            )
        except Interrupted as exc:
            print(f"oomsafe: {exc.message}", file=sys.stderr)
            raise KeyboardInterrupt from None
        except RerunRaised as raised:
            print("oomsafe: " + report_raised(self.shell, "a fix", raised), file=sys.stderr)
            return
        if not result.ok and result.failure is not None:
            self.ext.hook.last_failure = result.failure
            if result.refused is None:
                self.ext.present(result.failure)
