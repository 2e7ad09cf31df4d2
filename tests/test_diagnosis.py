"""The causes as a table: one row per cause and per ranking rule. Pure: OOM reports built from
torch's own message format, holders built by hand (what a scan of the namespace would find)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from jupyter_gpumem.diagnosis.causes import RULES
from jupyter_gpumem.diagnosis.diagnose import diagnose
from jupyter_gpumem.diagnosis.facts import tensor_upper_bound
from jupyter_gpumem.oom.report import parse_oom_message
from jupyter_gpumem.readings.holders import Holder, HolderSet
from jupyter_gpumem.readings.snapshot import MemorySnapshot

MiB = 1 << 20


def cuda_message(
    req: float,
    free: float,
    total: float,
    allocated: float,
    unalloc: float,
    *,
    allowed: float | None = None,
    others: tuple[tuple[int, float], ...] = (),
) -> str:
    """torch 2.x's CUDA OOM text, sizes in MiB."""
    procs = "".join(f"Process {pid} has {mib:.2f} MiB memory in use. " for pid, mib in others)
    cap = f"{allowed:.2f} MiB allowed; " if allowed is not None else ""
    used = allocated + unalloc
    return (
        f"CUDA out of memory. Tried to allocate {req:.2f} MiB. GPU 0 has a total capacity of "
        f"{total:.2f} MiB of which {free:.2f} MiB is free. {procs}Including non-PyTorch memory, "
        f"this process has {used:.2f} MiB memory in use. Of the allocated memory {allocated:.2f} "
        f"MiB is allocated by PyTorch, {cap}and {unalloc:.2f} MiB is reserved by PyTorch but "
        "unallocated. If reserved but unallocated memory is large try setting "
        "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation."
    )


def var(name: str, mib: float, *, used: bool = True, recreated: bool = False) -> Holder:
    return Holder(
        name,
        "tensor",
        "variable",
        "cuda:0",
        tensor_bytes=int(mib * MiB),
        used_by_cell=used,
        recreated_by_cell=recreated,
    )


def gpus(*free_mib: float, total_mib: float = 1024) -> MemorySnapshot:
    """A reading of GPU 0 with every visible GPU's (free MiB each), as read_snapshot gives it."""
    devices = tuple(
        MemorySnapshot(
            device_index=i, device_name="GPU",
            total_bytes=int(total_mib * MiB), free_bytes=int(free * MiB),
            used_bytes=int((total_mib - free) * MiB), allocated_bytes=0, reserved_bytes=0,
            peak_allocated_bytes=0, peak_reserved_bytes=0, num_ooms=0, allowed_bytes=None,
        )
        for i, free in enumerate(free_mib)
    )  # fmt: skip
    return MemorySnapshot(**{**devices[0].__dict__, "devices": devices})


@dataclass
class Case:
    message: str
    holders: list[Holder] = field(default_factory=list)
    created: tuple[str, ...] = ()
    released: bool = True
    freed: int | None = None
    snapshot: MemorySnapshot | None = None


def causes(case: Case) -> list[Any]:
    report = parse_oom_message(case.message)
    assert report is not None
    d = diagnose(
        report,
        case.snapshot,
        HolderSet(holders=case.holders),
        released=case.released,
        freed_bytes=case.freed,
        created=case.created,
    )
    return d.causes


# (id, case, the keys that must appear, the key ranked first)
TABLE = [
    (
        "request_exceeds_card",
        Case(cuda_message(4096, 100, 1024, 20, 4)),
        {"request_exceeds_card"},
        "request_exceeds_card",
    ),
    (
        # a 1.2 MB weight on a 16 MiB card: torch names the 20 MiB segment, the tensor may fit
        "rounded_segment_is_not_larger_than_the_card",
        Case(cuda_message(20, 2, 16, 12, 1)),
        {"working_set"},
        "working_set",
    ),
    (
        "process_cap",
        Case(cuda_message(64, 10, 1024, 480, 10, allowed=512)),
        {"process_cap", "working_set"},
        "process_cap",
    ),
    (
        "old_variables_close_the_gap",
        Case(
            cuda_message(64, 30, 1024, 900, 10),
            [var("old", 400, used=False), var("x", 20)],
        ),
        {"old_variables"},
        "old_variables",
    ),
    (
        "recreated_variables_from_an_earlier_run",
        Case(cuda_message(200, 30, 1024, 900, 10), [var("x", 400, recreated=True)]),
        {"recreated_variables"},
        "recreated_variables",
    ),
    (
        "other_processes",
        Case(cuda_message(300, 10, 1024, 100, 4, others=((4242, 700.0),))),
        {"other_processes"},
        "other_processes",
    ),
    (
        # GPU 0 has 100 MiB allocated and needs 300 MiB more; GPU 1 has 900 MiB free
        "other_gpu_has_room",
        Case(cuda_message(300, 10, 1024, 100, 4), snapshot=gpus(10, 900)),
        {"other_gpu", "working_set"},
        "other_gpu",
    ),
    (
        "fragmentation_that_closes_the_gap",
        Case(cuda_message(64, 20, 1024, 700, 300)),
        {"fragmentation"},
        "fragmentation",
    ),
    (
        # nanoGPT: 1.75 MiB cached + 18 MiB free < 20 MiB requested: clearing cannot make it fit
        "fragmentation_that_cannot_close_the_gap_is_not_first",
        Case(cuda_message(20, 18, 256, 200, 1.75)),
        {"working_set"},
        "working_set",
    ),
    (
        "pinned_by_failure_needs_nothing_and_comes_last",
        Case(
            cuda_message(64, 30, 1024, 900, 10),
            [Holder("x in f()", "tensor", "failed frame", "cuda:0", tensor_bytes=300 * MiB)],
            freed=300 * MiB,
        ),
        {"pinned_by_failure", "working_set"},
        "working_set",
    ),
    (
        # 120M-parameter model in fp32 with AdamW on a 1 GiB card: weights 480 MiB + grads
        # 480 MiB + Adam's two moments 960 MiB, before any activation
        "model_states_exceed_card",
        Case(
            cuda_message(480, 20, 1024, 980, 4),
            [
                Holder(
                    "model",
                    "model",
                    "variable",
                    "cuda:0",
                    parameters_bytes=480 * MiB,
                    detail="GPT, 125.8M parameters",
                    used_by_cell=True,
                ),
                Holder(
                    "opt", "optimizer", "variable", "cuda:0", detail="AdamW, state for 0 parameters"
                ),
            ],
        ),
        {"model_states_exceed_card", "working_set"},
        "model_states_exceed_card",
    ),
    (
        "working_set",
        Case(cuda_message(256, 60, 1024, 700, 10)),
        {"working_set"},
        "working_set",
    ),
    (
        "probable",
        Case("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR"),
        {"probable"},
        "probable",
    ),
    (
        "library",
        Case("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
        {"library"},
        "library",
    ),
    (
        "output_cache",
        Case(
            cuda_message(64, 30, 1024, 900, 10),
            [Holder("Out[3]", "tensor", "output cache", "cuda:0", tensor_bytes=200 * MiB)],
        ),
        {"output_cache", "working_set"},
        "output_cache",
    ),
    (
        "host_memory",
        Case(
            "DefaultCPUAllocator: can't allocate memory: you tried to allocate 68719476736 "
            "bytes. Error code 12 (Cannot allocate memory)"
        ),
        {"host_memory"},
        "host_memory",
    ),
]


@pytest.mark.parametrize(
    ("case", "keys", "first"), [t[1:] for t in TABLE], ids=[t[0] for t in TABLE]
)
def test_causes_table(case: Case, keys: set[str], first: str) -> None:
    found = causes(case)
    assert keys <= {c.key for c in found}, [c.key for c in found]
    assert found[0].key == first, [(c.key, c.closes_gap, c.weight) for c in found]


def test_another_gpu_with_room_for_the_failed_tensor_only_says_that() -> None:
    """100 MiB + 300 MiB do not fit the 350 MiB free on GPU 1, the 300 MiB asked for does: put
    that tensor there (issue 21); with 250 MiB free there, GPU 1 is no cause at all."""
    found = causes(Case(cuda_message(300, 10, 1024, 100, 4), snapshot=gpus(10, 350)))
    other = next(c for c in found if c.key == "other_gpu")
    assert other.title == "GPU 1 has room for the tensor that did not fit"
    assert "`device='cuda:1'`" in other.action
    found = causes(Case(cuda_message(300, 10, 1024, 100, 4), snapshot=gpus(10, 250)))
    assert "other_gpu" not in {c.key for c in found}


def test_every_rule_has_a_row() -> None:
    covered = {t[3] for t in TABLE} | set().union(*(t[2] for t in TABLE))
    assert {r.__name__ for r in RULES} <= covered


def test_a_variable_this_run_made_is_not_from_an_earlier_run() -> None:
    """A cell that makes `a` (100 MiB) and then fails on `b`, on its first run: `a` is this
    run's, so its working set, not an old value needed twice."""
    case = Case(cuda_message(200, 30, 512, 400, 10), [var("a", 100)], created=("a",))
    found = causes(case)
    assert "recreated_variables" not in {c.key for c in found}
    ws = next(c for c in found if c.key == "working_set")
    assert "This cell had allocated 400 MiB when it asked for 200 MiB more" in ws.evidence


def test_working_set_numbers_agree_with_the_headline() -> None:
    """Never "needed 160 MiB beyond what was resident" on a 160 MiB card next to "tried to
    allocate 64 MiB with 30 MiB free": what was held before the cell is said apart."""
    case = Case(cuda_message(64, 30, 160, 120, 10), [var("model_w", 100)])
    d_causes = causes(case)
    ws = next(c for c in d_causes if c.key == "working_set")
    assert "had allocated 20.00 MiB (on top of 100 MiB held before it ran) when it asked" in (
        ws.evidence
    )
    assert "asked for 64.00 MiB more" in ws.evidence
    assert "34.00 MiB more than there was room for" in ws.evidence


def test_a_cause_that_is_not_enough_says_so() -> None:
    """20 MiB reserved but unallocated (more than 5% of the card: named) against 54 MiB missing:
    reported, with what it gives of the gap, and ranked after what closes it."""
    found = causes(Case(cuda_message(64, 10, 256, 150, 20)))
    frag = next(c for c in found if c.key == "fragmentation")
    assert frag.closes_gap is False
    assert "Returning it gives 20.00 MiB of the 54.00 MiB missing." in frag.evidence
    assert found[0].key != "fragmentation"


def test_fragmentation_below_what_matters_is_not_named() -> None:
    """nanoGPT's numbers: 1.75 MiB cached, 20 MiB asked on a 256 MiB card."""
    found = causes(Case(cuda_message(20, 18, 256, 200, 1.75)))
    assert "fragmentation" not in {c.key for c in found}


def test_host_memory_failure_has_its_own_headline() -> None:
    report = parse_oom_message(
        "DefaultCPUAllocator: can't allocate memory: you tried to allocate 68719476736 bytes. "
        "Error code 12 (Cannot allocate memory)"
    )
    assert report is not None
    d = diagnose(report, None, HolderSet())
    assert d.headline.startswith("Out of host memory (RAM)")
    assert "GPU" not in d.headline


@pytest.mark.parametrize(
    ("requested", "bound"), [(2 * MiB, MiB), (20 * MiB, 10 * MiB), (64 * MiB, 64 * MiB)]
)
def test_tensor_upper_bound(requested: int, bound: int) -> None:
    assert tensor_upper_bound(requested) == bound


def test_past_one_gpu_gives_the_numbers_per_gpu_and_a_ready_cell() -> None:
    row = next(t for t in TABLE if t[0] == "model_states_exceed_card")
    cause = causes(row[1])[0]
    assert "Weights 480 MiB + gradients 480 MiB + optimizer state 960 MiB = 1.88 GiB" in (
        cause.evidence
    )
    assert "2 GPUs 960 MiB each, 4 GPUs 480 MiB each, 8 GPUs 240 MiB each" in cause.action
    assert "notebook_launcher" in cause.cell and "FullyShardedDataParallelPlugin" in cause.cell


def _model_too_big_for_the_card(shell: Any, capsys: Any) -> None:
    """A model plus AdamW whose states exceed a 96 MiB simulated card, then its training step,
    which runs out (what it printed before the step is read away)."""
    shell.run_cell("%gpumem simulate 96MiB")
    assert shell.run_cell(
        "import torch\n"
        "model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(6)]).cuda()\n"
        "opt = torch.optim.AdamW(model.parameters())"
    ).success
    capsys.readouterr()
    assert not shell.run_cell(
        "x = torch.randn(64, 1024, device='cuda')\nmodel(x).sum().backward()\nopt.step()"
    ).success


def test_a_model_too_big_for_the_card_is_diagnosed_end_to_end(shell: Any, capsys: Any) -> None:
    """A real shell, the simulated GPU: a model plus AdamW whose states exceed the card."""
    pytest.importorskip("torch")
    _model_too_big_for_the_card(shell, capsys)
    out = capsys.readouterr().out
    assert "The model's own states do not fit this card, whatever the batch" in out, out
    assert "A cell that launches the training on several GPUs" in out
    assert "notebook_launcher(training_function" in out


def test_request_larger_than_the_card_at_this_batch_is_reduce_batchs_case() -> None:
    """The same failing request, once Reduce batch has found the number that sized it (mnist's
    `test_loader.batch_size` = 1000): no longer a dead end ranked above every fix, but a cause whose
    action (a smaller batch) closes the gap; the working set names the batch too."""
    report = parse_oom_message(cuda_message(4096, 100, 1024, 20, 4))
    assert report is not None
    d = diagnose(report, None, HolderSet(holders=[]), released=True)
    assert d.causes[0].key == "request_exceeds_card" and d.causes[0].tier == 0
    evidence = "`test_loader.batch_size` = 1000 sizes `data` (1000, 1, 28, 28) in test()"
    d = diagnose(**d.evidence.arguments(), batch=evidence)
    first = d.causes[0]
    assert first.key == "request_exceeds_card"
    assert first.title == "At this batch, one allocation is larger than the card"
    assert evidence in first.evidence and first.closes_gap and first.tier == 1
    assert "No fix here" not in first.action and "Reduce the batch" in first.action
    ws = next(c for c in d.causes if c.key == "working_set")
    assert f"The batch: {evidence}." in ws.evidence


def test_past_one_gpu_before_the_optimizers_first_step(shell: Any, capsys: Any) -> None:
    """The common case: `backward()` runs out before AdamW ever stepped, so the optimizer holds
    nothing yet. Its moments are coming, and the diagnosis counts them. A local of a library's
    `__init__.py` frame is named by its package (torch), not by whichever `__init__.py` was loaded
    first ("encodings")."""
    pytest.importorskip("torch")
    shell.run_cell("%gpumem simulate 512MiB")
    assert shell.run_cell(
        "import torch\n"
        "model = torch.nn.Sequential(*[torch.nn.Linear(4096, 4096) for _ in range(4)]).cuda()\n"
        "opt = torch.optim.AdamW(model.parameters())"
    ).success
    capsys.readouterr()
    assert not shell.run_cell(
        "x = torch.randn(64, 4096, device='cuda')\n"
        "loss = model(x).pow(2).mean()\n"
        "loss.backward()\n"
        "opt.step()"
    ).success
    out = capsys.readouterr().out
    first = out.split("Likely causes", 1)[1].split("\n  2. ", 1)[0]
    assert "The model's own states do not fit this card, whatever the batch" in first, out
    assert "+ optimizer state 512.12 MiB" in first, out
    assert "in encodings" not in out and "locals of the failed call in torch" in out
    # what the cell found held is the allocator's count at its start (the weights): the
    # gradients its backward made are the cell's own, though `model` is an older variable
    assert "This cell had allocated 194.05 MiB (on top of 256.06 MiB held before it ran)" in out


def test_diagnose_returns_the_finished_diagnosis() -> None:
    """What the presentation learns (the batch, a note, whether a cell can be inserted) goes into
    diagnose() with what was read at the failure: the causes ranked and the notes said, once each,
    however often it is diagnosed."""
    row = next(t for t in TABLE if t[0] == "model_states_exceed_card")
    report = parse_oom_message(row[1].message)
    assert report is not None
    d = diagnose(report, None, HolderSet(holders=row[1].holders), released=True)
    assert d.notes == []
    batch = "`batch_size` = 64 sizes `x` (64, 1024)"
    learnt = {"batch": batch, "notes": ["The card filled over cells 3-5."]}
    done = diagnose(**d.evidence.arguments(), **learnt, insert_cells=True)
    assert done.notes == [
        "The card filled over cells 3-5.",
        "A ready cell that launches the training on several GPUs is inserted below (not run).",
    ]
    ws = next(c for c in done.causes if c.key == "working_set")
    assert f"The batch: {batch}." in ws.evidence
    again = diagnose(**done.evidence.arguments(), **learnt, insert_cells=False)
    assert again.notes[0] == "The card filled over cells 3-5." and len(again.notes) == 2
    assert again.notes[1].startswith("A cell that launches the training on several GPUs:\n")
    assert "notebook_launcher" in again.notes[1]
    assert again.causes == done.causes


def test_the_evidence_kept_is_every_argument_read_at_the_failure() -> None:
    """A Diagnosis keeps all of diagnose()'s arguments but the presentation's: one added to
    diagnose() and not to Evidence would be dropped when the panel diagnoses again."""
    import inspect
    from dataclasses import fields

    from jupyter_gpumem.diagnosis.model import Evidence

    presentation = {"batch", "notes", "insert_cells"}
    arguments = set(inspect.signature(diagnose).parameters) - presentation
    assert arguments == {f.name for f in fields(Evidence)}
    report = parse_oom_message(cuda_message(300, 10, 1024, 100, 4, others=((4242, 700.0),)))
    assert report is not None
    d = diagnose(
        report, None, HolderSet(), held_at_start=64 * MiB, process_names={4242: "a trainer"}
    )
    assert diagnose(**d.evidence.arguments()) == d


def test_a_ready_cell_is_inserted_below_and_the_diagnosis_says_so(shell: Any, capsys: Any) -> None:
    """Where the front end can take a new cell (a kernel), the multi-GPU launch goes in below the
    failed cell, not run, and the diagnosis shown says it is there instead of printing it."""
    pytest.importorskip("torch")
    inserted: list[tuple[str, bool]] = []
    shell.kernel = object()  # what the extension looks for: a front end that takes new cells
    shell.set_next_input = lambda text, replace=False: inserted.append((text, replace))
    try:
        shell.run_cell("%config GpuMem.display = 'text'")
        _model_too_big_for_the_card(shell, capsys)
    finally:
        del shell.kernel, shell.set_next_input
    out = capsys.readouterr().out
    assert len(inserted) == 1 and not inserted[0][1], inserted
    assert "notebook_launcher(training_function" in inserted[0][0]
    assert "is inserted below (not run)" in out, out
    assert "notebook_launcher(training_function" not in out


def test_processes_the_message_names_are_described_by_the_caller(monkeypatch: Any) -> None:
    """diagnose() asks nobody (no /proc, no server): the readings' names come in, else none."""
    from jupyter_gpumem.readings import kernels, snapshot

    def refuse(*_: Any) -> str:
        raise AssertionError("the diagnosis looked a process up itself")

    monkeypatch.setattr(snapshot, "describe_process", refuse)
    monkeypatch.setattr(kernels, "find_kernel", refuse)
    report = parse_oom_message(cuda_message(300, 10, 1024, 100, 4, others=((4242, 700.0),)))
    assert report is not None
    named = diagnose(
        report, None, HolderSet(), process_names={4242: "the kernel of notebook `a.ipynb`"}
    )
    other = next(c for c in named.causes if c.key == "other_processes")
    assert "pid 4242 (the kernel of notebook `a.ipynb`) 700 MiB" in other.evidence
    assert "`%gpumem shutdown 4242`" in other.action
    bare = next(c for c in diagnose(report, None, HolderSet()).causes if c.key == "other_processes")
    assert "pid 4242 700 MiB" in bare.evidence


def test_the_diagnosis_modules_reach_no_system_or_server() -> None:
    """Pure: no module of diagnosis/ imports what reads /proc, files or the network."""
    import ast
    from pathlib import Path

    import jupyter_gpumem.diagnosis as pkg

    banned = {"os", "pathlib", "urllib", "socket", "http", "subprocess", "requests"}
    banned_names = {"describe_process", "find_kernel", "kernels"}
    for path in Path(pkg.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                mods = {a.name.split(".")[0] for a in node.names}
                assert not mods & banned, (path.name, mods)
            elif isinstance(node, ast.ImportFrom):
                assert (node.module or "").split(".")[0] not in banned, (path.name, node.module)
                assert not {a.name for a in node.names} & banned_names, (path.name, node.module)


def test_the_frames_kept_for_debug_are_said_with_their_host_cost() -> None:
    from jupyter_gpumem.diagnosis.render import render_html, render_text
    from jupyter_gpumem.readings.release import MovedLocal, ReleaseResult

    release = ReleaseResult(
        96 * MiB,
        900 * MiB,
        804 * MiB,
        moved=[
            MovedLocal("h in forward()", "cuda:0 float32 [256, 1024]", MiB, MiB, True),
            MovedLocal("x in work()", "cuda:0 float32 [4096, 4096]", 32 * MiB, 32 * MiB, True),
            MovedLocal(
                "a in work()",
                "cuda:0 float32 [4096, 4096]",
                64 * MiB,
                0,
                False,
                "host memory too small",
            ),
        ],
        frames_kept=True,
    )
    report = parse_oom_message(cuda_message(64, 30, 1024, 900, 10))
    assert report is not None
    d = diagnose(report, None, HolderSet(), release=release)
    assert d.released and d.freed_bytes == 96 * MiB
    text = render_text(d)
    assert (
        "Freed 96.00 MiB that the failed cell pinned; PyTorch now has 804 MiB allocated. "
        "Moved 33.00 MiB of the failed frames' tensors to host memory (%debug still works). "
        "Not kept in host memory, described in their place: `a in work()` "
        "(cuda:0 float32 [4096, 4096], 64.00 MiB: host memory too small)."
    ) in text
    assert "Moved 33.00 MiB of the failed frames&#x27; tensors to host memory" in render_html(d)


def test_with_keep_traceback_the_text_says_how_to_get_the_memory_back() -> None:
    from jupyter_gpumem.diagnosis.render import render_text

    report = parse_oom_message(cuda_message(64, 30, 1024, 900, 10))
    assert report is not None
    text = render_text(diagnose(report, None, HolderSet(), released=False))
    assert "`%gpumem release` moves them to host memory, and %debug still shows them" in text


def test_which_card_a_variable_is_on_comes_with_its_device_not_its_words() -> None:
    """An OOM on GPU 0: a variable on card 1 is not one this card could free, whatever its device
    is called (backends.DeviceLabel carries the index; the diagnosis no longer reads 'cuda:N' out
    of the text, so a label without it counted on every card)."""
    from dataclasses import replace

    from jupyter_gpumem.backends import DeviceLabel

    report = parse_oom_message(cuda_message(300, 10, 1024, 900, 4))
    assert report is not None and report.device_index == 0
    here = replace(var("here", 400, used=False), device=DeviceLabel("cuda:0 (simulated)", 0))
    there = replace(var("there", 400, used=False), device=DeviceLabel("the second card", 1))
    d = diagnose(report, None, HolderSet(holders=[here, there]), released=True)
    assert [h.name for h in d.unused_variables()] == ["here"]
    old = next(c for c in d.causes if c.key == "old_variables")
    assert "`here`" in old.evidence and "`there`" not in old.evidence
