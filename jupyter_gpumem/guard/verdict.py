"""What the guard found: the side effects a re-run would repeat, and how the panel and
``%gpumem retry`` say them (a one-line summary, a confirm-button question)."""

from __future__ import annotations

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


@dataclass(frozen=True)
class GuardVerdict:
    effects: tuple[SideEffect, ...]
    failed_lineno: int | None = None
    in_loop: bool = False  # the failing line is in a loop: all of the loop may have run

    @property
    def safe(self) -> bool:
        return not self.effects

    def summary(self) -> str:
        """One line: which lines already ran with side effects, and what each would repeat."""
        if self.safe:
            return "this cell changed nothing that a re-run would change again."
        if self.effects[0].kind == "unknown":
            return self.effects[0].why + "."
        by_line: dict[int, list[SideEffect]] = {}
        for e in self.effects:
            by_line.setdefault(e.lineno, []).append(e)
        n = len(by_line)
        lines = "line" if n == 1 else "lines"
        if self.failed_lineno is None:
            head = f"this cell may have run {n} {lines} with side effects before it failed"
        else:
            head = f"this cell already ran {n} {lines} with side effects before it failed"
            head += f" at line {self.failed_lineno}"
            if self.in_loop:
                head += ", inside a loop whose earlier passes ran all of it"
        parts = []
        for lineno, group in list(by_line.items())[:4]:
            what = "; ".join(dict.fromkeys(third(e.again) if e.again else e.why for e in group))
            parts.append(f"line {lineno} `{quoted(group[0].text)}` ({what})")
        more = f", and {n - 4} more" if n > 4 else ""
        return f"{head}: {', '.join(parts)}{more}."

    def question(self) -> str:
        """The confirm-button question: what a re-run would repeat."""
        if self.safe:
            return "Re-run the cell?"
        if self.effects[0].kind == "unknown":
            return (
                "Re-run anyway? The cell would run again from the top, repeating what it changed."
            )
        phrases = list(dict.fromkeys(e.again or e.why for e in self.effects))
        if len(phrases) > 4:
            phrases = [*phrases[:3], f"{len(phrases) - 3} more things again"]
        said = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
        return f"Re-run anyway? The cell would {said}."


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
