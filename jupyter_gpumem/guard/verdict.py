"""What the guard found: the side effects a re-run would repeat, and how the panel and
``%gpumem retry`` say them (a one-line summary, a confirm-button question)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from jupyter_gpumem.cells import source as cellsource

__all__ = ["GuardVerdict", "SideEffect", "quoted", "third", "unknown"]


@dataclass(frozen=True)
class SideEffect:
    lineno: int  # 1-based line in the cell
    kind: str  # augassign_global, global_rebind, mutate_global, append, delete_global,
    # optimizer_step, backward, file_write, io_call, iterator, queue, database, exec, unknown
    name: str  # the global or object involved: "step", "history", "open('log.txt', 'a')"
    text: str  # the source line, stripped
    why: str  # "adds to `step`, which existed before the cell: a re-run adds again"
    again: str = ""  # what a re-run would do, for questions: "add to `step` again"
    # not run by the failed run: a rehearsal would run it, and nothing stops or undoes it
    rehearsal: bool = False


@dataclass(frozen=True)
class GuardVerdict:
    effects: tuple[SideEffect, ...]
    failed_lineno: int | None = None
    in_loop: bool = False  # the failing line is in a loop: all of the loop may have run

    @property
    def safe(self) -> bool:
        return not self.effects

    @property
    def ran(self) -> tuple[SideEffect, ...]:
        """What the failed run did that a re-run would do again."""
        return tuple(e for e in self.effects if not e.rehearsal)

    @property
    def ahead(self) -> tuple[SideEffect, ...]:
        """What a rehearsal would do that nothing stops or undoes."""
        return tuple(e for e in self.effects if e.rehearsal)

    def summary(self) -> str:
        """One line: which lines already ran with side effects, and what each would repeat; then
        what a rehearsal would do that nothing stops or undoes."""
        if self.safe:
            return "this cell changed nothing that a re-run would change again."
        if self.effects[0].kind == "unknown":
            return self.effects[0].why + "."
        parts = []
        if self.ran:
            parts.append(self._ran())
        if self.ahead:
            lines, n = _by_line(self.ahead, lambda e: third(_ahead(e.again or e.why)))
            head = "Its rehearsals" if self.ran else "this cell's rehearsals"
            more = f", and {n - 4} more" if n > 4 else ""
            parts.append(
                f"{head} would run {lines}{more}, which no rollback puts back and nothing stops."
            )
        return " ".join(parts)

    def _ran(self) -> str:
        lines, n = _by_line(self.ran, lambda e: third(e.again) if e.again else e.why)
        plural = "line" if n == 1 else "lines"
        if self.failed_lineno is None:
            head = f"this cell may have run {n} {plural} with side effects before it failed"
        else:
            head = f"this cell already ran {n} {plural} with side effects before it failed"
            head += f" at line {self.failed_lineno}"
            if self.in_loop:
                head += ", inside a loop whose earlier passes ran all of it"
        more = f", and {n - 4} more" if n > 4 else ""
        return f"{head}: {lines}{more}."

    def question(self) -> str:
        """The confirm-button question: what a re-run would repeat, and what its rehearsals would
        do that nothing undoes."""
        if self.safe:
            return "Re-run the cell?"
        if self.effects[0].kind == "unknown":
            return (
                "Re-run anyway? The cell would run again from the top, repeating what it changed."
            )
        said = []
        if self.ran:
            said.append("the cell would " + _listed([e.again or e.why for e in self.ran]))
        if self.ahead:
            ahead = _listed([_ahead(e.again or e.why) for e in self.ahead], "more things")
            said.append(f"its rehearsals would {ahead}, which nothing undoes")
        text = "; ".join(said)
        return f"Re-run anyway? {text[:1].upper()}{text[1:]}."


def _listed(phrases: list[str], rest: str = "more things again") -> str:
    """'a, b and c': the first three, and a count past four."""
    phrases = list(dict.fromkeys(phrases))
    if len(phrases) > 4:
        phrases = [*phrases[:3], f"{len(phrases) - 3} {rest}"]
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _by_line(effects: tuple[SideEffect, ...], say: Callable[[SideEffect], str]) -> tuple[str, int]:
    """``line 3 `text` (what it does; ...)`` for the first four lines, and how many lines."""
    by_line: dict[int, list[SideEffect]] = {}
    for e in effects:
        by_line.setdefault(e.lineno, []).append(e)
    parts = []
    for lineno, group in list(by_line.items())[:4]:
        what = "; ".join(dict.fromkeys(say(e) for e in group))
        parts.append(f"line {lineno} `{quoted(group[0].text)}` ({what})")
    return ", ".join(parts), len(by_line)


def _ahead(phrase: str) -> str:
    """'advance `it` again, skipping what it took' -> 'advance `it`, skipping what it took'."""
    return phrase.replace(" again", "", 1)


def unknown(limit: int | None, why: str) -> GuardVerdict:
    again = "run again from the top, repeating what it changed"
    return GuardVerdict((SideEffect(limit or 1, "unknown", "", "", why, again),), limit)


def third(phrase: str) -> str:
    """'add to `x` again' -> 'adds to `x` again'."""
    verb, _, rest = phrase.partition(" ")
    if verb.endswith("y") and verb[-2:-1] not in ("a", "e", "o", "u", ""):
        verb = verb[:-1] + "ies"
    elif verb.endswith(("s", "sh", "ch", "x", "z")):
        verb += "es"
    else:
        verb += "s"
    return f"{verb} {rest}".rstrip()


def quoted(text: str, width: int = 60) -> str:
    """Shown between backticks in a message: its own backticks become quotes."""
    return cellsource.short(text.replace("`", "'"), width)
