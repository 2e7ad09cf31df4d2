"""The arguments of ``%gpumem``'s commands and ``%%oomsafe``: sizes, ``--devices``, counts, the
``retry`` parser.

Each mistake is one ``UsageError`` line that says what was expected, never a traceback: the
commands are typed by hand in a notebook, where a traceback for a typo reads as a crash.
"""

from __future__ import annotations

from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic_arguments import MagicArgumentParser, parse_argstring

from jupyter_gpumem.fixes import LADDER
from jupyter_gpumem.units import format_bytes, parse_size

# A simulated card is only counted, so any size "works"; past this it is a typo, not a GPU.
MAX_SIMULATED_BYTES = 16 << 40
MAX_SIMULATED_DEVICES = 16
HELP = ("-h", "--help")


def devices_option(args: list[str]) -> tuple[list[str], int | None]:
    """``--devices N`` (or ``--devices=N``) taken out of ``%gpumem simulate``'s arguments."""
    rest, devices = number_option(args, "simulate", "--devices", "--devices 2")
    if devices is not None and not 1 <= devices <= MAX_SIMULATED_DEVICES:
        raise UsageError(
            f"%gpumem simulate: --devices takes 1 to {MAX_SIMULATED_DEVICES}, not {devices}"
        )
    return rest, devices


def number_option(
    args: list[str], command: str, option: str, example: str
) -> tuple[list[str], int | None]:
    """``OPTION N`` (or ``OPTION=N``, once) taken out of ``%gpumem COMMAND``'s arguments: the
    other arguments and N (None when absent). ``--device 1`` names a GPU for ``%gpumem limit``."""
    rest, number = [], None
    it = iter(args)
    for a in it:
        if a == option or a.startswith(option + "="):
            value = a.partition("=")[2] if "=" in a else next(it, "")
            if number is not None or not (value.isascii() and value.isdigit()):
                raise UsageError(f"%gpumem {command}: {option} takes a number, as in {example}")
            number = int(value)
        else:
            rest.append(a)
    return rest, number


def size_or_off(command: str, args: list[str], most: int | None = None) -> int | None:
    if len(args) != 1:
        raise UsageError(f"%gpumem {command} takes one argument: a size such as 2GiB, or off")
    if args[0].lower() == "off":
        return None
    if not args[0].isascii():
        # Python's int() and \d read any script's digits ("１GiB"); a size here is typed in ASCII
        raise UsageError(
            f"%gpumem {command}: not a size: {args[0]!r} (type digits 0-9, as in 2GiB)"
        )
    try:
        size = parse_size(args[0])
    except ValueError as exc:
        raise UsageError(f"%gpumem {command}: {exc}") from None
    if most is not None and size > most:
        raise UsageError(
            f"%gpumem {command}: {args[0]} is larger than any GPU; at most {format_bytes(most)}"
        )
    return size


def positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise UsageError(f"expected a whole number, got {text!r}") from None
    if n < 1:
        raise UsageError(f"expected a number >= 1, got {n}")
    return n


def parse_line(func: Any, line: str) -> Any:
    """``parse_argstring``, with an unbalanced quote as a one-line UsageError, not a traceback."""
    try:
        return parse_argstring(func, line)
    except ValueError as exc:  # shlex: "No closing quotation"
        raise UsageError(f"%{func.parser.prog}: {exc}: {line.strip()}") from None


def parse_or_help(parser: MagicArgumentParser, args: list[str]) -> Any:
    """The options, or None when -h/--help asked for the help (shown)."""
    if any(a in HELP for a in args):
        print(parser.format_help())
        return None
    return parser.parse_args(args)


# prog without its %: IPython's help formatter puts one in front
RETRY_PARSER = MagicArgumentParser(prog="gpumem retry", add_help=False)
RETRY_PARSER.add_argument(
    "fix", choices=LADDER, help="which fix to re-run the last failed cell with"
)
RETRY_PARSER.add_argument("--batch-var", metavar="NAME", help="the batch size is this variable")
RETRY_PARSER.add_argument("--min-batch", type=positive, default=1, metavar="N")
RETRY_PARSER.add_argument("--max-retries", type=positive, default=6, metavar="N")
RETRY_PARSER.add_argument("--force", action="store_true", help="re-run despite side effects")
RETRY_PARSER.add_argument("--drop", action="append", metavar="NAME", help="clear: delete NAME")
RETRY_PARSER.add_argument("--drop-output-cache", action="store_true", help="clear: empty Out/_")
RETRY_PARSER.add_argument(
    "--accumulate", action="store_true", help="batch: keep the effective batch (grad accumulation)"
)
