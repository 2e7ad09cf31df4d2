"""Gradient accumulation: the cell rewritten so a smaller batch keeps the effective batch."""

from __future__ import annotations

import ast
import itertools
import math
import re
from collections.abc import Mapping

from jupyter_gpumem.cells.source import dotted as _dotted
from jupyter_gpumem.fixes.batch.edit import _batch_edits, _Edit, _splice
from jupyter_gpumem.fixes.batch.literals import _callee
from jupyter_gpumem.fixes.batch.sites import (
    _ACCUM,
    AccumulationPlan,
    BatchFinding,
    _char_cols,
    _parse,
    _split_lines,
)

# -- gradient accumulation ----------------------------------------------------------------


def _method_calls(stmt: ast.stmt, method: str) -> list[ast.Call]:
    """``X.method(...)`` calls that are the whole statement ``stmt``."""
    if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call):
        f = stmt.value.func
        if isinstance(f, ast.Attribute) and f.attr == method:
            return [stmt.value]
    return []


def _receiver(call: ast.Call) -> ast.expr:
    """``X`` of ``X.method(...)``."""
    return call.func.value if isinstance(call.func, ast.Attribute) else call.func


def _training_loop(tree: ast.Module, text: str) -> ast.For | str:
    """The one ``for`` loop that does backward, step and zero_grad in its body, or why not."""
    if re.search(r"accum", text, re.IGNORECASE):
        return "the cell already mentions accumulation"
    loops = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.For):
            continue
        body = node.body
        backward = [c for st in body for c in _method_calls(st, "backward")]
        step = [c for st in body for c in _method_calls(st, "step")]
        zero = [c for st in body for c in _method_calls(st, "zero_grad")]
        if backward and step and zero:
            loops.append(node)
        elif backward and any(
            isinstance(n, ast.Call) and _callee(n) in ("step", "zero_grad")
            for st in body
            if not isinstance(st, ast.Expr)
            for n in ast.walk(st)
        ):
            return "the optimizer steps under a condition in the loop (accumulation already?)"
    if not loops:
        return (
            "no for loop calls .backward(), optimizer.step() and optimizer.zero_grad() "
            "at the same level"
        )
    if len(loops) > 1:
        return "several loops train; which one to accumulate in is not clear"
    loop = loops[0]
    if sum(len(_method_calls(st, "backward")) for st in loop.body) > 1:
        return "the loop calls backward() more than once"
    if loop.body[0].lineno == loop.lineno:
        return "the loop body is on the same line as the for"
    return loop


def try_accumulation(source: str, finding: BatchFinding, new_value: int) -> AccumulationPlan | str:
    """The cell with the new batch and gradient accumulation, or why the cell does not allow it."""
    old = finding.value
    if not finding.sites or new_value >= old:
        return "the batch size does not shrink"
    tree, skip, why = _parse(source)
    if tree is None:
        return why or "the cell does not parse"
    lines = _split_lines(source)
    loop = _training_loop(tree, source)
    if isinstance(loop, str):
        return loop
    steps = math.ceil(old / new_value)
    # the smallest per-step batch that still reaches the old one in that many steps (<= the batch
    # that fit): 4096 at most 959 a step is 5 x 820 = 4100, not 5 x 959 = 4795
    new_value = math.ceil(old / steps)
    body = loop.body
    statements = {st.lineno for st in body}
    if (
        any(b.lineno == (a.end_lineno or a.lineno) for a, b in itertools.pairwise(body))
        or statements & skip
    ):
        return "the loop puts several statements on one line or holds IPython syntax"
    try:
        edits = _batch_edits(lines, finding, new_value)
    except ValueError as e:
        return str(e)
    backward = next(c for st in body for c in _method_calls(st, "backward"))
    divide = _divide_loss(backward, lines, steps)
    if isinstance(divide, str):
        return divide
    new_lines = _splice(lines, edits + divide)
    _gate(new_lines, lines, loop, backward, steps)
    new_source = "".join(new_lines)
    if _parse(new_source)[0] is None:
        return "the rewritten cell does not parse; not offered"
    return _plan(new_source, old, steps, new_value)


def _divide_loss(backward: ast.Call, lines: list[str], steps: int) -> list[_Edit] | str:
    """``(loss / steps).backward()``: the edits that divide what backward is called on, so that
    the gradients summed over ``steps`` batches average them, as one batch of the old size would;
    or why not."""
    recv = _receiver(backward)
    if recv.lineno != recv.end_lineno or recv.end_col_offset is None:
        return "the expression before .backward() spans several lines"
    line = lines[recv.lineno - 1]
    col, end = _char_cols(line, recv.col_offset, recv.end_col_offset)
    return [
        (recv.lineno, col, col, "("),
        (recv.lineno, end, end, f" / {steps})"),
    ]


def _gate(
    new_lines: list[str],
    lines: list[str],
    loop: ast.For,
    backward: ast.Call,
    steps: int,
) -> None:
    """Put the loop's step and zero_grad under the counter, in ``new_lines`` (statement-level
    edits, made after the in-line ones: they add lines)."""
    body = loop.body
    # Statement-level edits, bottom up so that line numbers above stay valid.
    loop_indent = _indent(lines[loop.lineno - 1])
    body_indent = _indent(lines[body[0].lineno - 1])
    unit = body_indent[len(loop_indent) :] or "    "
    nl = "\n" if not lines[0].endswith("\r\n") else "\r\n"
    steppers = {_dotted(_receiver(c)) for st in body for c in _method_calls(st, "step")}
    step_gate = f"if {_ACCUM} % {steps} == 0:"
    gates: list[str | None] = []
    for st in body:
        if _method_calls(st, "step") or any(
            _dotted(_receiver(c)) in steppers for c in _method_calls(st, "update")
        ):
            gates.append(step_gate)
        elif _method_calls(st, "zero_grad"):
            # Zero at the first micro-batch of a group, or after the step at its last one.
            after = st.lineno > backward.lineno
            gates.append(step_gate if after else f"if ({_ACCUM} - 1) % {steps} == 0:")
        else:
            gates.append(None)
    # Consecutive statements under the same condition share one "if", bottom up.
    i = len(body) - 1
    while i >= 0:
        gate = gates[i]
        j = i
        while gate and j > 0 and gates[j - 1] == gate:
            j -= 1
        if gate:
            first, last = body[j].lineno, (body[i].end_lineno or 0)
            for n in range(first, last + 1):
                if new_lines[n - 1].strip():
                    new_lines[n - 1] = unit + new_lines[n - 1]
            new_lines[first - 1] = body_indent + gate + nl + new_lines[first - 1]
        i = j - 1
    first_body = body[0].lineno
    new_lines[first_body - 1] = f"{body_indent}{_ACCUM} += 1{nl}" + new_lines[first_body - 1]
    head = loop.lineno
    new_lines[head - 1] = f"{loop_indent}{_ACCUM} = 0{nl}" + new_lines[head - 1]


def _plan(new_source: str, old: int, steps: int, new_value: int) -> AccumulationPlan:
    """The rewritten cell with the words that say what it keeps."""
    effective = steps * new_value
    same = (
        f"keeps the effective batch of {old}"
        if effective == old
        else f"gives an effective batch of {effective}, the nearest to {old} it can"
    )
    explanation = (
        f"Gradient accumulation {same}: {steps} batches of {new_value}, "
        f"the loss divided by {steps}, and the optimizer stepped every {steps} batches "
        f"(counter {_ACCUM}); a last group of fewer than {steps} batches is not stepped."
    )
    return AccumulationPlan(new_source, steps, effective, explanation)


def _indent(line: str) -> str:
    return line[: len(line) - len(line.lstrip(" \t"))]


def accumulation_plan(
    source: str, finding: BatchFinding, new_value: int
) -> AccumulationPlan | None:
    """:func:`try_accumulation` for callers that only want a plan; None where none is possible."""
    plan = try_accumulation(source, finding, new_value)
    return plan if isinstance(plan, AccumulationPlan) else None


# -- accumulation the cell already does -------------------------------------------------------

_ACCUM_NAME = re.compile(r"(?i)accum")


def existing_accumulation(
    source: str, namespace: Mapping[str, object] | None = None
) -> tuple[int, str] | None:
    """(micro-batches per step, what sets it) where the cell already accumulates gradients:
    ``if (i + 1) % accum_steps == 0: optimizer.step()`` with the number written there, or held
    by the name there in the cell or the namespace; None where it does not, or the number cannot
    be read without running code."""
    tree = _parse(source)[0]
    if tree is None:
        return None
    assigned = _int_assignments(tree)
    for node in ast.walk(tree):
        if not isinstance(node, ast.If) or not any(
            isinstance(n, ast.Call) and _callee(n) == "step"
            for st in node.body
            for n in ast.walk(st)
        ):
            continue
        for cmp in ast.walk(node.test):
            if isinstance(cmp, ast.BinOp) and isinstance(cmp.op, ast.Mod):
                found = _steps_of(cmp.right, assigned, namespace or {})
                if found is not None:
                    return found
    return None


def _int_assignments(tree: ast.Module) -> dict[str, int]:
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            t, v = node.targets[0], node.value
            if isinstance(t, ast.Name) and isinstance(v, ast.Constant) and type(v.value) is int:
                out[t.id] = v.value
    return out


def _steps_of(
    node: ast.expr, assigned: Mapping[str, int], namespace: Mapping[str, object]
) -> tuple[int, str] | None:
    if isinstance(node, ast.Constant) and type(node.value) is int and node.value > 1:
        return node.value, f"`% {node.value}`"
    name = _dotted(node)
    if name is None:
        return None
    if name in assigned and assigned[name] > 1:
        return assigned[name], f"`{name}`"
    head, _, attr = name.partition(".")
    value = namespace.get(head)
    if attr and value is not None and "." not in attr:
        value = vars(value).get(attr) if hasattr(value, "__dict__") else None
    if type(value) is int and value > 1 and (_ACCUM_NAME.search(name) or not attr):
        return value, f"`{name}`"
    return None


def effective_batch_note(
    source: str,
    namespace: Mapping[str, object],
    old: int,
    new: int,
    asked: bool,
) -> str | None:
    """What the batch change did to the effective batch of a cell that already accumulates
    (was said as if it did not: "from 4096 to 1341" for 2 micro-batches of 4096, to 2 of 1341),
    and what keeps it; with ``--accumulate``, why the cell was not rewritten."""
    found = existing_accumulation(source, namespace)
    if found is None:
        return None
    steps, where = found
    keep = math.ceil(old * steps / new)
    change = (
        f"change {where} to `% {keep}`"
        if where.startswith("`%")
        else f"set {where.strip('`')} = {keep}"
    )
    note = (
        f"The effective batch changed from {old * steps} to {new * steps}: the cell accumulates "
        f"{steps} micro-batches ({where}), now of {new} instead of {old}. To keep "
        f"{old * steps}, accumulate {keep} micro-batches of {new} ({change}; the effective "
        f"batch is then {keep * new})."
    )
    if asked:
        note += " `--accumulate` did not rewrite the cell, which accumulates already."
    return note
