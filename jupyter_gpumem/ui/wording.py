"""What the panel says, as plain functions of the diagnosis, the checks and the outcomes.

The panel shows a display copy of the diagnosis: the locals of library frames (``args in
_wrapped_call_impl() in module.py``) become one row, "locals of the failed call in torch", and
causes with nothing to do are folded away. The diagnosis itself is left as it is.
"""

from __future__ import annotations

import re
from html import escape, unescape

from jupyter_gpumem.diagnosis.model import Cause
from jupyter_gpumem.fixes import Attempt, FixOutcome
from jupyter_gpumem.fixes.base import Check
from jupyter_gpumem.units import format_bytes


def folded_html(folded: list[Cause]) -> str:
    if not folded:
        return ""
    items = "".join(
        f"<li><b>{escape(c.title)}.</b> {escape(c.evidence)} {escape(c.action)}</li>"
        for c in folded
    )
    n = len(folded)
    return (
        f"<details class='gpumem-why'><summary>{n} more finding{'s' if n > 1 else ''}, "
        f"nothing to do</summary><ul>{items}</ul></details>"
    )


# ---- buttons ------------------------------------------------------------------------------------


def shortfall_note(check: Check, shortfall_bytes: int | None) -> str:
    """ "not enough: saves ~X of Y needed" when the predicted saving is below the shortfall
    ("adds ~X" where the fix raises the need), with how it was predicted ("estimate",
    "replayed", "measured now")."""
    saving = check.predicted_saving_bytes
    if not check.applies or saving is None or not shortfall_bytes or saving >= shortfall_bytes:
        return ""
    basis = f", {check.basis}" if check.basis else ""
    short = format_bytes(shortfall_bytes)
    if saving < 0:  # autocast where the weights' half copies outweigh what it halves
        return f"not enough: adds ~{format_bytes(-saving)} to the {short} needed{basis}"
    return f"not enough: saves ~{format_bytes(saving)} of {short} needed{basis}"


def button_text(label: str, check: Check, shortfall_bytes: int | None, key: str = "") -> str:
    """The label with what its number is: "Reduce batch (saves ~42.00 MiB)"; Move to CPU's is
    what leaves the GPU, which may be more than the card ("takes ~180 MiB off the GPU")."""
    short = shortfall_note(check, shortfall_bytes)
    if short:
        return f"{label} ({short})"
    if check.applies and check.predicted_saving_bytes:
        size = format_bytes(check.predicted_saving_bytes)
        return (
            f"{label} (takes ~{size} off the GPU)"
            if key == "cpu"
            else f"{label} ({check.saving_text})"
        )
    return label


def sentence(text: str) -> str:
    """``text`` with its first letter capital and the rest as written ("MiB", not "mib")."""
    return text[:1].upper() + text[1:]


def diagnosis_html(html: str, host_memory: bool) -> str:
    """The rendered diagnosis as the panel shows it: the headline alone is the alert (a screen
    reader hears one sentence, not the whole diagnosis), and a host-memory failure is headed as
    one. ``html`` is ``render_html``'s, whose whole diagnosis is one ``role="alert"``."""
    html = html.replace(' role="alert"', "", 1)
    if host_memory:  # its headline says "Out of host memory (RAM): ..." itself
        html = html.replace("<h4>GPU out of memory: ", "<h4>", 1)
    return html.replace("<h4>", "<div role='alert' class='gpumem-headline'><h4>", 1).replace(
        "</h4>", "</h4></div>", 1
    )


def recommended(
    checks: dict[str, Check], top_cause: str, shortfall_bytes: int | None
) -> str | None:
    """The fix to show as primary: the first in order that applies and is predicted to be enough."""
    order = ["clear"] if top_cause in ("old_variables", "fragmentation", "output_cache") else []
    order += ["batch", "autocast", "clear", "cpu"]
    for key in order:
        check = checks.get(key)
        if check is not None and check.applies and not shortfall_note(check, shortfall_bytes):
            return key
    return None


# ---- outcomes -----------------------------------------------------------------------------------


def measured_line(o: FixOutcome) -> str:
    """The prediction, then what the re-run measured: its peak against the card, never a saving
    set against a peak. Empty where there is nothing on the GPU to measure (Move to CPU)."""
    fits = [a for a in o.attempts if a.ok]
    peak = fits[-1].peak_bytes if fits else None
    cap = fits[-1].capacity_bytes if fits else None
    parts = []
    said = any(n.startswith("Predicted") or "Predicted saving" in n for n in o.notes)
    if o.predicted_saving_bytes and not said:  # a fix's own prediction note says it better
        parts.append(f"Predicted saving ~{format_bytes(o.predicted_saving_bytes)}.")
    if peak:
        of = f" of {format_bytes(cap)} ({100 * peak / cap:.0f}%)" if cap else ""
        parts.append(f"The re-run peaked at {format_bytes(peak)}{of}.")
    return " ".join(parts)


def prediction_note(o: FixOutcome) -> str:
    """The fix's prediction set beside what it measured ("Predicted peak ~X (...), measured Y"),
    where it made one: shown with the outcome whether the re-run fitted or not."""
    return next((n for n in o.notes if n.startswith("Predicted")), "")


def cancelled_line(exc: BaseException) -> str:
    """How a cancelled fix ended (Cancel, or the kernel's ■): what the transaction put back, or
    that nothing had changed yet (stopped before the re-run began)."""
    undone = str(getattr(exc, "message", "") or "").strip()
    if undone.lower().startswith("interrupted:"):
        undone = undone[len("interrupted:") :].strip()
    if not undone:
        return "Cancelled: nothing changed (stopped before the re-run began)."
    undone = undone[0].upper() + undone[1:]
    if getattr(exc, "whole", False):
        return f"Cancelled: nothing changed. {undone}"
    return f"Cancelled. {undone}"


def unique_notes(notes: list[str]) -> list[str]:
    return list(dict.fromkeys(n.strip() for n in notes if n.strip()))


def attempt_line(a: Attempt) -> str:
    """One re-run, in words: "batch 7: fits, peak 138 MiB of 160 MiB (86%), 1.20 s, kept"."""
    head = f"batch {a.batch}" if a.batch is not None else FIX_RUN_NAMES.get(a.fix, a.fix)
    parts = ["fits" if a.ok else "out of memory"]
    if a.peak_bytes:
        of = (
            f" of {format_bytes(a.capacity_bytes)} ({100 * a.peak_bytes / a.capacity_bytes:.0f}%)"
            if a.capacity_bytes
            else ""
        )
        parts.append(f"peak {format_bytes(a.peak_bytes)}{of}")
    parts.append(f"{a.seconds:.2f} s")
    if a.note:
        parts.append(a.note)
    if a.rehearsal:
        parts.append("rehearsal, rolled back")
    else:
        parts.append("kept" if a.ok else "rolled back")
    return f"{head}: {', '.join(parts)}"


FIX_RUN_NAMES = {
    "clear": "after clearing the cache",
    "autocast": "under autocast",
    "cpu": "on the CPU",
}


_HEADLINE = re.compile(r"<div role='alert' class='gpumem-headline'>.*?</h4></div>", re.S)


def split_headline(html: str) -> tuple[str, str]:
    """``diagnosis_html``'s output as (the headline, the rest): the panel shows the fix buttons
    between them, so the answer is in view right under the traceback."""
    m = _HEADLINE.search(html)
    if m is None:
        return "", html
    return f"<div class='gpumem-diag gpumem-top'>{m.group(0)}</div>", html[: m.start()] + html[
        m.end() :
    ]


def plain(html: str) -> str:
    """What a screen reader hears of a status line: its first line, as text."""
    first = re.split(r"<br|<pre|<details|<span class='gpumem-why'", html, maxsplit=1)[0]
    return " ".join(unescape(re.sub(r"<[^>]+>", " ", first)).split())
