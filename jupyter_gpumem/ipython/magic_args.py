"""The arguments of ``%gpumem`` and ``%%oomsafe``: one parser, IPython's ``MagicArgumentParser``
with argparse subcommands and ``type=`` converters.

Each mistake is one ``UsageError`` line that says what was expected, never a traceback: the
commands are typed by hand in a notebook, where a traceback for a typo reads as a crash.
``%gpumem --help`` lists every command with its options; ``%gpumem retry -h`` one command's.
"""

from __future__ import annotations

import argparse
import keyword
import shlex
from typing import NoReturn

from IPython.core.error import UsageError
from IPython.core.magic_arguments import MagicArgumentParser

from jupyter_gpumem.fixes import LADDER
from jupyter_gpumem.fixes.base import MAX_RUNS
from jupyter_gpumem.units import format_bytes, parse_size

# A simulated card is only counted, so any size "works"; past this it is a typo, not a GPU.
MAX_SIMULATED_BYTES = 16 << 40
MAX_SIMULATED_DEVICES = 16
HELP = ("-h", "--help")
OFF = "off"


class Parser(MagicArgumentParser):
    """A mistake is ``UsageError: %gpumem simulate: ...``, one line, naming the command."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"%{self.prog}: {message}")


def positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise UsageError(f"expected a whole number, got {text!r}") from None
    if n < 1:
        raise UsageError(f"expected a number >= 1, got {n}")
    return n


def _count(text: str) -> int:
    """A device index or a count typed in ASCII digits."""
    if not (text.isascii() and text.isdigit()):
        raise argparse.ArgumentTypeError(f"takes a number, not {text!r}")
    return int(text)


def _pid(text: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise argparse.ArgumentTypeError(f"not a pid: {text!r}")
    return int(text)


class _Once(argparse.Action):
    """An option given twice is a mistake, not "the last one wins"."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:  # fmt: skip
        if getattr(namespace, self.dest, None) is not None:
            raise argparse.ArgumentError(self, "given twice")
        setattr(namespace, self.dest, values)


def _devices(text: str) -> int:
    n = _count(text)
    if not 1 <= n <= MAX_SIMULATED_DEVICES:
        raise argparse.ArgumentTypeError(f"takes 1 to {MAX_SIMULATED_DEVICES}, not {n}")
    return n


def size_or_off(text: str, most: int | None = None) -> int | None:
    """``2GiB`` as bytes, ``off`` as None."""
    if text.lower() == OFF:
        return None
    if not text.isascii():
        # Python's int() and \d read any script's digits ("１GiB"); a size here is typed in ASCII
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (type digits 0-9, as in 2GiB)")
    try:
        size = parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if most is not None and size > most:
        raise argparse.ArgumentTypeError(
            f"{text} is larger than any GPU; at most {format_bytes(most)}"
        )
    return size


def _card(text: str) -> int | str | None:
    """``%gpumem simulate``'s card: a size, a profile name (``T4``), or off."""
    from jupyter_gpumem.backends import simulated_profiles

    names = {name.lower(): name for name in simulated_profiles()}
    if text.lower() in names:
        return names[text.lower()]
    try:
        return size_or_off(text, most=MAX_SIMULATED_BYTES)
    except argparse.ArgumentTypeError as exc:
        if names and not any(c.isdigit() for c in text):
            raise argparse.ArgumentTypeError(
                f"not a size nor a card: {text!r} (a size such as 2GiB, or one of "
                f"{', '.join(sorted(names.values()))})"
            ) from None
        raise exc


def _batch_var(text: str) -> str:
    """A name, or a name with attributes and subscripts: ``bs``, ``cfg.batch_size``,
    ``dataloaders['train']``."""
    head = text.split(".", 1)[0].split("[", 1)[0]
    if not head.isidentifier() or keyword.iskeyword(head):
        raise argparse.ArgumentTypeError(
            f"not a variable: {text!r} (a name such as bs, cfg.batch_size or loaders['train'])"
        )
    return text


def _add_fix_options(p: argparse.ArgumentParser, max_runs: int) -> None:
    p.add_argument("--batch-var", type=_batch_var, metavar="NAME", help="the batch size is NAME")
    p.add_argument("--min-batch", type=positive, default=1, metavar="N", help="smallest batch")
    p.add_argument(
        "--max-retries", type=positive, default=max_runs, metavar="N", help="at most N re-runs"
    )
    p.add_argument("--force", action="store_true", help="re-run despite side effects")


def _gpumem_parser() -> Parser:
    parser = Parser(
        prog="gpumem",
        usage="%(prog)s [command] [arguments]",
        description="Show and control GPU memory from a notebook (jupyter_gpumem).",
        add_help=False,
    )
    sub = parser.add_subparsers(
        dest="command", metavar="command", parser_class=Parser, prog="gpumem"
    )
    parser.set_defaults(command="status")

    def command(name: str, text: str) -> Parser:
        p: Parser = sub.add_parser(
            name, help=text.replace("%", "%%"), description=text, add_help=False
        )
        return p

    command("status", "the GPU's memory now (the default)")
    retry = command(
        "retry", "re-run the last cell that ran out of memory with one fix (what every fix prints)"
    )
    retry.add_argument("fix", choices=LADDER, help="the fix: " + ", ".join(LADDER))
    _add_fix_options(retry, MAX_RUNS)
    retry.add_argument("--drop", action="append", metavar="NAME", help="clear: delete NAME first")
    retry.add_argument("--drop-output-cache", action="store_true", help="clear: empty Out and _")
    retry.add_argument(
        "--accumulate", action="store_true", help="batch: keep the effective batch (accumulation)"
    )
    command("gauge", "a live memory gauge under this cell")
    sidebar = command("sidebar", "the gauge in JupyterLab's right sidebar; off closes it")
    sidebar.add_argument("off", nargs="?", choices=[OFF], help="close it")
    simulate = command(
        "simulate",
        "simulate SIZE|CARD|off [--devices N]: run the next cells on a simulated GPU of that size "
        "or card (T4, A100-40GB, ...); N cards: cuda:0 ... cuda:N-1",
    )
    simulate.add_argument("card", type=_card, metavar="SIZE|CARD|off")
    simulate.add_argument(
        "--devices", type=_devices, action=_Once, metavar="N", help="how many cards"
    )
    limit = command(
        "limit", "cap what this process may use on every GPU (or GPU N), to rehearse a smaller card"
    )
    limit.add_argument("size", type=size_or_off, metavar="SIZE|off")
    limit.add_argument("--device", type=_count, action=_Once, metavar="N", help="GPU N only")
    command("release", "free what the last failed cell pinned (when keep_traceback is on)")
    cells = command("cells", "after each cell: what it added to GPU memory, its peak and time")
    cells.add_argument("switch", choices=["on", OFF])
    cells.add_argument("--quiet", action="store_true", help="no line after each cell")
    command("history", "those numbers for every cell since `%gpumem cells on`")
    shutdown = command("shutdown", "shut down another notebook's kernel that holds GPU memory")
    shutdown.add_argument("pid", type=_pid, metavar="PID")
    shutdown.add_argument("--yes", action="store_true", help="confirm")
    trace = command(
        "trace",
        "record which source line allocates each tensor; save writes PyTorch's memory-viewer file",
    )
    trace.add_argument("action", choices=["on", OFF, "save"])
    trace.add_argument("path", nargs="?", metavar="PATH", help="save: where")
    trace.add_argument("--no-modules", action="store_true", help="on: not which module's forward")
    command("help", "this text")
    return parser


GPUMEM_PARSER = _gpumem_parser()


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


COMMANDS = tuple(_subparsers(GPUMEM_PARSER))


def full_help() -> str:
    """Every command, then every command's options."""
    lines = [GPUMEM_PARSER.format_help().rstrip(), "", "each command's options:"]
    lines += [
        "  " + p.format_usage().replace("::", "").strip()
        for p in _subparsers(GPUMEM_PARSER).values()
    ]
    return "\n".join(lines)


def split(line: str, prog: str) -> list[str]:
    """The line as arguments, split as a shell would, except that quotes inside an argument
    stay (``--batch-var dataloaders['train']`` is that expression, not ``dataloaders[train]``);
    an argument that is all one quoted string loses its quotes. An unbalanced quote is a
    one-line UsageError."""
    lexer = shlex.shlex(line, posix=False)
    lexer.whitespace_split = True
    lexer.commenters = ""
    try:
        words = list(lexer)
    except ValueError as exc:  # shlex: "No closing quotation"
        raise UsageError(f"%{prog}: {exc}: {line.strip()}") from None
    return [w[1:-1] if len(w) >= 2 and w[0] == w[-1] and w[0] in "'\"" else w for w in words]


def parse_gpumem(line: str) -> argparse.Namespace | str:
    """``%gpumem``'s options, or the help text to print (``-h`` anywhere)."""
    args = split(line.split(" #", 1)[0], "gpumem")  # a trailing comment is not an argument
    if not args or args[0] in HELP or args[0] == "help":
        if args[1:] and args[0] == "help":
            raise UsageError(f"%gpumem help takes no arguments (got {' '.join(args[1:])!r})")
        return full_help() if args else GPUMEM_PARSER.parse_args(["status"])
    commands = _subparsers(GPUMEM_PARSER)
    if args[0] not in commands:
        raise UsageError(f"%gpumem: unknown command {args[0]!r}; try one of: {', '.join(COMMANDS)}")
    if any(a in HELP for a in args[1:]):
        return commands[args[0]].format_help()
    opts = GPUMEM_PARSER.parse_args(args)
    _check_retry(opts)
    return opts


def _check_retry(opts: argparse.Namespace) -> None:
    """Options that mean something only for one fix are refused with the others, not ignored."""
    if opts.command != "retry":
        return
    only = {
        "batch": {"--batch-var": opts.batch_var, "--min-batch": opts.min_batch != 1,
                  "--accumulate": opts.accumulate},
        "clear": {"--drop": opts.drop, "--drop-output-cache": opts.drop_output_cache},
    }  # fmt: skip
    for fix, options in only.items():
        given = [name for name, value in options.items() if value]
        if given and opts.fix != fix:
            raise UsageError(
                f"%gpumem retry {opts.fix}: {', '.join(given)} "
                f"{'is' if len(given) == 1 else 'are'} for `retry {fix}` only"
            )


def fix_list(text: str) -> list[str]:
    """``--fixes``'s converter: "clear, batch" -> ["clear", "batch"], each one of the ladder's."""
    # IPython's splitter keeps the quotes of --fixes "clear, batch"
    fixes = [f for f in (f.strip(" \t'\"") for f in text.split(",")) if f]
    unknown = [f for f in fixes if f not in LADDER]
    if unknown or not fixes:
        raise UsageError(
            f"%%oomsafe --fixes: unknown fix {', '.join(unknown) or '(none)'}; "
            f"choose from {','.join(LADDER)}"
        )
    return fixes


def oomsafe_parser() -> Parser:
    parser = Parser(
        prog="%oomsafe",  # shown as %%oomsafe: IPython's help formatter prefixes one %
        description="Run the cell; on out-of-memory, apply fixes in order until one fits, then "
        "say what worked and what to change in the cell. Before re-running, a cell that already "
        "changed state (`step += 1`, `opt.step()`, `history.append(...)`, file writes) up to the "
        "failing line stops with an explanation, unless --force. Errors other than "
        "out-of-memory pass through unchanged.",
        add_help=False,
    )
    parser.add_argument(
        "--fixes",
        type=fix_list,
        default=",".join(LADDER),
        metavar="LIST",
        help=f"the fixes to try, in order, comma-separated (default: {','.join(LADDER)})",
    )
    _add_fix_options(parser, MAX_RUNS)
    parser.add_argument("--quiet", action="store_true", help="say only what worked")
    return parser


OOMSAFE_PARSER = oomsafe_parser()


def parse_oomsafe(line: str) -> argparse.Namespace | str:
    """``%%oomsafe``'s options (``--fixes`` a checked list, by its converter), or the help text."""
    args = split(line, "%oomsafe")
    if any(a in HELP for a in args):
        return OOMSAFE_PARSER.format_help()
    return OOMSAFE_PARSER.parse_args(args)


def doc(parser: argparse.ArgumentParser, first: str) -> str:
    """A magic's docstring: its first line, then the parser's help (what ``%gpumem?`` shows)."""
    return first + "\n\n" + parser.format_help()
