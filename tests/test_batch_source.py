"""Finding a cell's batch size and changing it, without touching anything else in the cell."""

from __future__ import annotations

from typing import Any

import pytest

from jupyter_gpumem.fixes.batch.source import (
    AccumulationPlan,
    BatchFinding,
    accumulation_plan,
    apply_batch,
    describe_change,
    find_batch,
    is_batch_name,
    try_accumulation,
)


def rewrite(source: str, new: int, namespace: dict[str, object] | None = None, **kw: Any) -> str:
    finding = find_batch(source, namespace, **kw)
    assert finding.sites, finding.reason_not_found
    return apply_batch(source, finding, new)[0]


@pytest.mark.parametrize(
    "name",
    [
        "batch_size",
        "BATCH_SIZE",
        "batchsize",
        "bs",
        "train_bs",
        "bsz",
        "micro_batch",
        "micro_batch_size",
        "per_device_train_batch_size",
        "per_device_eval_batch_size",
        "train_batch_size",
        "eval_batch_size",
    ],
)
def test_batch_names(name: str) -> None:
    assert is_batch_name(name)


@pytest.mark.parametrize(
    "name", ["abs", "obs", "jobs", "batch", "batches", "n_samples", "hidden_size", "epochs", "b"]
)
def test_not_batch_names(name: str) -> None:
    assert not is_batch_name(name)


# -- source sites -------------------------------------------------------------------------


def test_assignment_keeps_comments_and_formatting() -> None:
    src = "batch_size   =  64   # fits on a 24 GB card\nlr = 3e-4\n"
    finding = find_batch(src)
    assert finding.value == 64 and finding.reason_not_found is None
    assert finding.how == "batch_size = 64 on line 1 of the cell"
    (site,) = finding.sites
    assert (site.kind, site.name, site.lineno, site.col, site.end_col) == (
        "assign",
        "batch_size",
        1,
        16,
        18,
    )
    assert site.line_text == "batch_size   =  64   # fits on a 24 GB card"
    assert apply_batch(src, finding, 9) == (
        "batch_size   =  9   # fits on a 24 GB card\nlr = 3e-4\n",
        {},
    )


def test_annotated_tuple_and_attribute_assignments() -> None:
    assert rewrite("bs: int = 64\n", 8) == "bs: int = 8\n"
    assert rewrite("bs, lr = 64, 1e-3\n", 8) == "bs, lr = 8, 1e-3\n"
    finding = find_batch("args.batch_size = 64\n")
    assert finding.sites[0].name == "args.batch_size"


def test_keyword_arguments_and_dict_keys() -> None:
    src = "loader = DataLoader(ds, batch_size=64, shuffle=True)\n"
    finding = find_batch(src)
    assert finding.sites[0].kind == "kwarg"
    assert finding.how == "batch_size=64 on line 1 of the cell"
    assert apply_batch(src, finding, 9)[0] == (
        "loader = DataLoader(ds, batch_size=9, shuffle=True)\n"
    )
    assert rewrite("cfg = {'bsz': 32, 'lr': 1}\n", 5) == "cfg = {'bsz': 5, 'lr': 1}\n"


def test_training_batch_is_preferred_to_evaluation_batch() -> None:
    src = (
        "args = TrainingArguments(per_device_eval_batch_size=64, per_device_train_batch_size=32)\n"
    )
    finding = find_batch(src)
    assert finding.value == 32
    assert apply_batch(src, finding, 4)[0] == (
        "args = TrainingArguments(per_device_eval_batch_size=64, per_device_train_batch_size=4)\n"
    )


def test_first_of_equal_candidates_wins() -> None:
    src = "x = 1\nbs = 64\nmicro_bs = 16\n"
    assert find_batch(src).value == 64


def test_assignment_beats_keyword_with_another_value() -> None:
    src = "bs = 32\nval = DataLoader(v, batch_size=256)\ntrain = DataLoader(t, batch_size=bs)\n"
    finding = find_batch(src)
    assert finding.value == 32 and [s.lineno for s in finding.sites] == [1]


@pytest.mark.parametrize(
    ("src", "expected"),
    [
        ("x = torch.randn(64, 3, 224, 224)\n", "x = torch.randn(8, 3, 224, 224)\n"),
        ("x = torch.randn((64, 3))\n", "x = torch.randn((8, 3))\n"),
        ("x = torch.zeros(size=(64, 512))\n", "x = torch.zeros(size=(8, 512))\n"),
        ("x = torch.full((64, 3), 0.5)\n", "x = torch.full((8, 3), 0.5)\n"),
        ("x = th.rand([64, 10], device='cuda')\n", "x = th.rand([8, 10], device='cuda')\n"),
        ("x = randn(64, 10)\n", "x = randn(8, 10)\n"),
    ],
)
def test_leading_dimension_of_tensor_factories(src: str, expected: str) -> None:
    finding = find_batch(src)
    assert finding.sites[0].kind == "leading_dim" and finding.value == 64
    assert apply_batch(src, finding, 8)[0] == expected


@pytest.mark.parametrize(
    "src",
    [
        "b = torch.zeros(64)\n",  # one dimension: a bias as likely as a batch
        "y = torch.randint(0, 10, (64,))\n",  # labels only join a batch found elsewhere
        "w = torch.randn(64, 64, requires_grad=True)\n",  # a weight
        "w = nn.Parameter(torch.randn(64, 10))\n",
        "x = np.random.randn(64, 3)\n",  # not torch
        "x = torch.randn(bs, 3)\n",  # a name, not a literal (and bs is unknown)
    ],
)
def test_not_a_batch_on_its_own(src: str) -> None:
    finding = find_batch(src)
    assert finding.sites == () and finding.reason_not_found is not None


def test_leading_dims_join_only_with_the_same_value() -> None:
    src = (
        "bs = 64\n"
        "x = torch.randn(64, 3, 224, 224)\n"
        "y = torch.randint(0, 10, (64,))\n"
        "h = torch.zeros(2, 64, 512)\n"  # 64 is not the leading dimension
        "z = torch.randn(32, 10)\n"
        "labels = ['cat'] * 64\n"
    )
    assert rewrite(src, 9) == (
        "bs = 9\n"
        "x = torch.randn(9, 3, 224, 224)\n"
        "y = torch.randint(0, 10, (9,))\n"
        "h = torch.zeros(2, 64, 512)\n"
        "z = torch.randn(32, 10)\n"
        "labels = ['cat'] * 9\n"
    )
    assert find_batch(src).how == "bs = 64 on line 1 of the cell (and 3 more with the same value)"


def test_no_name_uses_the_leading_dimension_and_labels() -> None:
    src = "x = torch.randn(64, 3)\ny = torch.randint(10, (64,))\nn = [0] * 64\n"
    assert rewrite(src, 7) == "x = torch.randn(7, 3)\ny = torch.randint(10, (7,))\nn = [0] * 7\n"
    assert find_batch(src).how.startswith("the leading dimension 64 of torch.randn(...) on line 1")


def test_list_repeat_alone() -> None:
    assert rewrite("texts = ['hello'] * 32\n", 4) == "texts = ['hello'] * 4\n"
    assert rewrite("texts = 32 * ['hello']\n", 4) == "texts = 4 * ['hello']\n"


def test_strings_and_comments_are_not_touched() -> None:
    src = "s = 'batch_size = 64'\n# batch_size = 64\nbatch_size = 64  # was 64\nprint('64')\n"
    assert rewrite(src, 16) == (
        "s = 'batch_size = 64'\n# batch_size = 64\nbatch_size = 16  # was 64\nprint('64')\n"
    )
    assert find_batch("s = 'batch_size = 64'  # bs = 64\n").sites == ()


def test_non_ascii_columns_are_characters() -> None:
    src = "título = 'ñandú 🎉'; batch_size = 64  # 批量\n"
    finding = find_batch(src)
    (site,) = finding.sites
    assert site.line_text is not None and site.col is not None
    assert site.line_text[site.col : site.end_col] == "64"
    assert apply_batch(src, finding, 9)[0] == "título = 'ñandú 🎉'; batch_size = 9  # 批量\n"


def test_crlf_and_number_spellings() -> None:
    assert rewrite("bs = 1_024\r\nx = 1\r\n", 100) == "bs = 100\r\nx = 1\r\n"
    assert rewrite("bs = 0x40\n", 9) == "bs = 9\n"


def test_computed_batch_size_is_named_in_the_reason() -> None:
    finding = find_batch("bs = 2 ** 6\n")
    assert finding.sites == ()
    assert finding.reason_not_found == (
        "no batch size found in this cell (found bs = 2 ** 6 on line 1, not a plain number): "
        "use %gpumem retry batch --batch-var NAME"
    )


def test_nothing_found() -> None:
    finding = find_batch("y = model(x)\n")
    assert finding.sites == () and finding.value == 0 and finding.how == ""
    assert finding.reason_not_found == (
        "no batch size found in this cell: use %gpumem retry batch --batch-var NAME"
    )


def test_bool_and_zero_are_not_batch_sizes() -> None:
    assert find_batch("bs = True\n").sites == ()
    assert find_batch("x = torch.randn(1, 3)\n").sites == ()


def test_apply_refuses_a_changed_source() -> None:
    finding = find_batch("bs = 64\n")
    with pytest.raises(ValueError, match="line 1 changed"):
        apply_batch("bs = 65\n", finding, 8)
    with pytest.raises(ValueError, match="must be >= 1"):
        apply_batch("bs = 64\n", finding, 0)


# -- IPython syntax -----------------------------------------------------------------------


def test_line_magics_and_shell_lines() -> None:
    src = "%time warm = 1\nbs = 16\n!nvidia-smi\nfiles = !ls\nout = model(torch.randn(bs, 3))\n"
    finding = find_batch(src)
    assert finding.sites[0].lineno == 2
    assert apply_batch(src, finding, 4)[0] == src.replace("bs = 16", "bs = 4")


def test_a_site_on_a_magic_line_is_not_edited() -> None:
    assert find_batch("%time x = torch.randn(64, 3)\nprint(1)\n").sites == ()


def test_python_cell_magic_body() -> None:
    src = "%%time\nbs = 16  # é\nx = torch.zeros(size=(16, 512))\n"
    finding = find_batch(src)
    assert [s.lineno for s in finding.sites] == [2, 3]
    assert apply_batch(src, finding, 4)[0] == (
        "%%time\nbs = 4  # é\nx = torch.zeros(size=(4, 512))\n"
    )


def test_other_cell_magic_and_syntax_error() -> None:
    finding = find_batch("%%bash\nBS=64 python train.py\n")
    assert finding.reason_not_found == (
        "this cell runs the cell magic %%bash, not Python: use %gpumem retry batch --batch-var NAME"
    )
    finding = find_batch("bs = 64\nfor x in\n")
    assert finding.reason_not_found is not None
    assert finding.reason_not_found.startswith("this cell does not parse (line 2: ")


# -- namespace sites ----------------------------------------------------------------------


def test_global_int_the_cell_reads() -> None:
    src = "x = torch.randn(batch_size, 3)\nout = model(x)\n"
    finding = find_batch(src, {"batch_size": 64, "model": object()})
    (site,) = finding.sites
    assert (site.kind, site.name, site.value, site.lineno) == ("global", "batch_size", 64, None)
    assert finding.how == "batch_size = 64, a global this cell reads"
    assert apply_batch(src, finding, 9) == (src, {"batch_size": 9})
    assert describe_change(finding, 9) == "set batch_size = 9 before the cell (it is a global)"


def test_global_assigned_in_the_cell_first_is_the_cells_own() -> None:
    src = "batch_size = 16\nx = torch.randn(batch_size, 3)\n"
    finding = find_batch(src, {"batch_size": 64})
    assert [(s.kind, s.value) for s in finding.sites] == [("assign", 16)]


def test_globals_that_are_not_batch_sizes() -> None:
    ns = {"n": 64, "bs": 1, "flag": True}
    assert find_batch("x = torch.randn(n, 3)\ny = bs + flag\n", ns).sites == ()


class FakeLoader:
    """Quacks like a DataLoader: a dataset and an int batch_size."""

    def __init__(self, dataset: object, batch_size: int = 1, shuffle: bool = False) -> None:
        self.dataset, self.batch_size, self.shuffle = dataset, batch_size, shuffle
        self.sampler = None


@pytest.mark.parametrize(
    "src",
    [
        "for x, y in loader:\n    pass\n",
        "for i, (x, y) in enumerate(tqdm(loader)):\n    pass\n",
        "batch = next(iter(loader))\n",
        "total = sum(len(x) for x in loader)\n",
    ],
)
def test_dataloader_the_cell_iterates(src: str) -> None:
    loader = FakeLoader([1, 2, 3], batch_size=32)
    finding = find_batch(src, {"loader": loader})
    (site,) = finding.sites
    assert (site.kind, site.name, site.value) == ("dataloader", "loader", 32)
    new_source, updates = apply_batch(src, finding, 8)
    assert new_source == src
    new = updates["loader"]
    assert isinstance(new, FakeLoader) and new is not loader
    assert new.batch_size == 8 and new.dataset is loader.dataset
    assert describe_change(finding, 8) == (
        "build loader with batch_size=8 (e.g. DataLoader(loader.dataset, batch_size=8, ...))"
    )


def test_dataloader_not_iterated_is_not_a_site() -> None:
    assert find_batch("print(loader)\n", {"loader": FakeLoader([], 32)}).sites == ()


def test_real_dataloader_is_rebuilt_with_its_arguments() -> None:
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader, RandomSampler, SequentialSampler, TensorDataset

    def collate(batch: list[Any]) -> int:
        return len(batch)

    ds = TensorDataset(torch.arange(100))
    ns: dict[str, object] = {
        "train": DataLoader(ds, batch_size=32, shuffle=True, drop_last=True, collate_fn=collate),
        "val": DataLoader(ds, batch_size=50),
    }
    src = "for n in train:\n    pass\nfor n in val:\n    pass\n"
    finding = find_batch(src, ns)
    assert [s.name for s in finding.sites] == ["train"]
    new = apply_batch(src, finding, 9)[1]["train"]
    assert isinstance(new, DataLoader) and isinstance(new.sampler, RandomSampler)
    assert new.batch_size == 9 and new.drop_last and new.collate_fn is collate
    assert list(new) == [9] * 11
    finding = find_batch(src, ns, batch_var="val")
    new = apply_batch(src, finding, 20)[1]["val"]
    assert isinstance(new, DataLoader) and isinstance(new.sampler, SequentialSampler)
    assert [len(b[0]) for b in new] == [20] * 5


def test_real_dataloader_keeps_workers_and_custom_samplers() -> None:
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader, TensorDataset, WeightedRandomSampler

    from jupyter_gpumem.fixes.batch.source import rebuild_loader

    ds = TensorDataset(torch.arange(10))
    weighted = WeightedRandomSampler([1.0] * 10, num_samples=10)
    dl = DataLoader(ds, batch_size=4, sampler=weighted, num_workers=2, prefetch_factor=3)
    new = rebuild_loader(dl, 2)
    assert isinstance(new, DataLoader) and new.sampler is weighted
    assert (new.batch_size, new.num_workers, new.prefetch_factor) == (2, 2, 3)


# -- --batch-var --------------------------------------------------------------------------


def test_batch_var_in_the_cell() -> None:
    src = "nb = 12\nx = torch.randn(12, 4)\nbs = 64\n"
    finding = find_batch(src, batch_var="nb")
    assert [(s.kind, s.lineno) for s in finding.sites] == [("named", 1), ("leading_dim", 2)]
    assert apply_batch(src, finding, 3)[0] == "nb = 3\nx = torch.randn(3, 4)\nbs = 64\n"


def test_batch_var_global_int_and_loader() -> None:
    finding = find_batch("y = f(n)\n", {"n": 5}, batch_var="n")
    assert [(s.kind, s.value) for s in finding.sites] == [("named", 5)]
    assert apply_batch("y = f(n)\n", finding, 2)[1] == {"n": 2}
    finding = find_batch("y = 1\n", {"dl": FakeLoader([], 32)}, batch_var="dl")
    assert [(s.kind, s.value) for s in finding.sites] == [("dataloader", 32)]


@pytest.mark.parametrize(
    ("src", "ns", "reason"),
    [
        (
            "y = 1\n",
            {},
            "batch variable 'nb' not found: this cell assigns no int literal to nb, "
            "and the namespace has no nb",
        ),
        (
            "nb = 2 * k\n",
            None,
            "batch variable 'nb' not found: found nb = 2 * k on line 1, not a plain number, "
            "and the namespace has no nb",
        ),
        (
            "y = 1\n",
            {"nb": "64"},
            "batch variable 'nb' not found: this cell assigns no int literal to nb, "
            "and the global nb is a str, not an int > 1 or a DataLoader",
        ),
    ],
)
def test_batch_var_not_found_says_why(src: str, ns: dict[str, object] | None, reason: str) -> None:
    finding = find_batch(src, ns, batch_var="nb")
    assert finding.sites == () and finding.reason_not_found == reason


# -- describe_change ----------------------------------------------------------------------


def test_describe_change_for_source_sites() -> None:
    src = "batch_size = 64  # big\nx = torch.randn(64, 3)\n"
    assert describe_change(find_batch(src), 9) == (
        "change line 1 to: batch_size = 9  # big; line 2 to: x = torch.randn(9, 3)"
    )
    assert describe_change(find_batch("y = 1\n"), 9).startswith("no batch size found")


# -- gradient accumulation ----------------------------------------------------------------

TRAIN = """\
batch_size = 64
loader = DataLoader(ds, batch_size=batch_size, shuffle=True)
for epoch in range(2):
    for x in loader:  # train
        optimizer.zero_grad()
        loss = model(x)
        loss.backward()
        optimizer.step()
        losses.append(loss)
"""


def test_accumulation_rewrites_the_loop() -> None:
    finding = find_batch(TRAIN)
    plan = accumulation_plan(TRAIN, finding, 16)
    assert isinstance(plan, AccumulationPlan)
    assert (plan.steps, plan.effective_batch) == (4, 64)
    assert plan.source == (
        "batch_size = 16\n"
        "loader = DataLoader(ds, batch_size=batch_size, shuffle=True)\n"
        "for epoch in range(2):\n"
        "    _gpumem_accum_i = 0\n"
        "    for x in loader:  # train\n"
        "        _gpumem_accum_i += 1\n"
        "        if (_gpumem_accum_i - 1) % 4 == 0:\n"
        "            optimizer.zero_grad()\n"
        "        loss = model(x)\n"
        "        (loss / 4).backward()\n"
        "        if _gpumem_accum_i % 4 == 0:\n"
        "            optimizer.step()\n"
        "        losses.append(loss)\n"
    )
    assert plan.explanation.startswith(
        "Gradient accumulation keeps the effective batch of 64: 4 batches of 16"
    )


class Recorder:
    def __init__(self, log: list[str], name: str) -> None:
        self.log, self.name = log, name

    def step(self, *args: object) -> None:
        self.log.append(f"{self.name}.step")

    def zero_grad(self, **kw: object) -> None:
        self.log.append("zero")

    def update(self) -> None:
        self.log.append("update")

    def scale(self, loss: Loss) -> Loss:
        return loss


class Loss:
    def __init__(self, log: list[str], value: float) -> None:
        self.log, self.value = log, value

    def __truediv__(self, n: int) -> Loss:
        return Loss(self.log, self.value / n)

    def backward(self) -> None:
        self.log.append(f"backward {self.value:g}")


def test_accumulated_loop_steps_every_n_batches() -> None:
    src = (
        "bs = 32\n"
        "for x in range(6):\n"
        "    loss = Loss(log, 1.0)\n"
        "    scaler.scale(loss).backward()\n"
        "    scaler.step(opt)\n"
        "    scaler.update()\n"
        "    opt.zero_grad(set_to_none=True)\n"
    )
    plan = try_accumulation(src, find_batch(src), 11)
    assert isinstance(plan, AccumulationPlan) and plan.steps == 3
    assert (
        plan.effective_batch == 33
        and "an effective batch of 33, the nearest to 32" in plan.explanation
    )
    assert "    if _gpumem_accum_i % 3 == 0:\n        scaler.step(opt)\n" in plan.source
    log: list[str] = []
    ns: dict[str, object] = {"Loss": Loss, "log": log, "opt": Recorder(log, "opt")}
    ns["scaler"] = Recorder(log, "scaler")
    exec(plan.source, ns)
    group = ["backward 0.333333"] * 3 + ["scaler.step", "update", "zero"]
    assert log == group * 2 and ns["bs"] == 11


@pytest.mark.parametrize(
    ("src", "reason"),
    [
        ("bs = 32\nfor x in dl:\n    y = model(x)\n", "no for loop calls .backward()"),
        (
            "bs = 32\nfor i, x in enumerate(dl):\n    f(x).backward()\n"
            "    if i % 4 == 0:\n        opt.step()\n        opt.zero_grad()\n",
            "the optimizer steps under a condition",
        ),
        (
            "bs = 32\naccum_steps = 2\nfor x in dl:\n    f(x).backward()\n    opt.step()\n"
            "    opt.zero_grad()\n",
            "the cell already mentions accumulation",
        ),
        (
            "bs = 32\nfor x in dl:\n    d(x).backward()\n    g(x).backward()\n    opt.step()\n"
            "    opt.zero_grad()\n",
            "the loop calls backward() more than once",
        ),
        (
            "bs = 32\nfor x in dl:\n    f(x).backward(); opt.step()\n    opt.zero_grad()\n",
            "the loop puts several statements on one line",
        ),
    ],
)
def test_accumulation_not_offered_says_why(src: str, reason: str) -> None:
    finding = find_batch(src)
    result = try_accumulation(src, finding, 8)
    assert isinstance(result, str) and result.startswith(reason)
    assert accumulation_plan(src, finding, 8) is None


def test_accumulation_needs_a_smaller_batch() -> None:
    finding = find_batch(TRAIN)
    assert try_accumulation(TRAIN, finding, 64) == "the batch size does not shrink"
    empty = BatchFinding((), 0, "", "none")
    assert accumulation_plan(TRAIN, empty, 8) is None


# -- by what it sizes ---------------------------------------------------------------------


def test_evidence_picks_the_number_that_sizes_the_failing_tensors() -> None:
    from jupyter_gpumem.fixes.batch.evidence import SizedTensor

    ev = (SizedTensor("input in forward() in linear.py", (1024, 3, 32, 32)),)
    src = "epochs = 2\nbatch = 1024\nx = torch.randn(batch, 3, 32, 32)\n"
    finding = find_batch(src, {}, evidence=ev)
    assert [s.name for s in finding.sites] == ["batch"] and finding.value == 1024
    assert "sizes `input` (1024, 3, 32, 32)" in finding.evidence


def test_evidence_refuses_a_decoy_and_finds_settings() -> None:
    import argparse

    from jupyter_gpumem.fixes.batch.evidence import SizedTensor

    ev = (SizedTensor("x in train()", (128, 784)),)
    decoy = "train(args)\nsample = torch.randn(64, 20)\n"
    assert find_batch(decoy, {}, evidence=ev).sites == ()
    args = argparse.Namespace(batch_size=128, test_batch_size=1000)
    finding = find_batch(decoy, {"args": args}, evidence=ev)
    assert [s.name for s in finding.sites] == ["args.batch_size"]
    new_source, updates = apply_batch(decoy, finding, 50)
    assert new_source == decoy and updates["args"].batch_size == 50 and args.batch_size == 128
    cfg = {"batch_size": 128}
    finding = find_batch("run(cfg['batch_size'])\n", {"cfg": cfg}, evidence=ev)
    assert apply_batch("run(cfg['batch_size'])\n", finding, 7)[1]["cfg"] == {"batch_size": 7}


def test_a_number_passed_to_a_notebook_function_is_the_batch_only_by_what_it_sizes() -> None:
    """`train_steps(4096, 2)`: the 4096 sizes the failing `x`, the 2 nothing; numbers passed to
    builtins (`range`, `print`) or classes (`Linear(4096, 10)`: weight sizes) are never the batch."""
    from jupyter_gpumem.fixes.batch.evidence import SizedTensor

    ev = (SizedTensor("x in train_steps()", (4096, 64)),)
    finding = find_batch("train_steps(4096, 2)\n", {}, evidence=ev)
    assert [s.name for s in finding.sites] == ["argument 1 of train_steps()"]
    assert (
        finding.evidence
        == "`argument 1 of train_steps()` = 4096 sizes `x` (4096, 64) in train_steps()"
    )
    assert apply_batch("train_steps(4096, 2)\n", finding, 1000)[0] == "train_steps(1000, 2)\n"
    assert describe_change(finding, 1000) == "change line 1 to: train_steps(1000, 2)"
    others = "print(4096)\nfor i in range(4096):\n    pass\nlayer = Linear(4096, 10)\n"
    assert find_batch(others, {}, evidence=ev).sites == ()
    # without the failing tensors' shapes an anonymous number is never offered
    assert find_batch("train_steps(4096, 2)\n", {}).sites == ()


def test_make_it_permanent_names_the_cell_and_line() -> None:
    history = [
        "",
        "import torch\n",
        "ds = make()\ntrain_loader = DataLoader(ds, batch_size=2048)\n",
        "for x in train_loader:\n    step(x)\n",
    ]

    class Loader:
        batch_size = 2048
        dataset = ()

    ns = {"In": history, "train_loader": Loader()}
    finding = find_batch(history[-1], ns)
    assert describe_change(finding, 144) == (
        "change In [2], line 2 to: train_loader = DataLoader(ds, batch_size=144)"
    )


def test_accumulation_comes_as_close_to_the_old_batch_as_it_can() -> None:
    """4096 at most 959 a step: 5 batches of 820 (4100), not 5 of 959 (4795)."""
    src = (
        "bs = 4096\nfor x in range(6):\n    loss = f(x)\n    loss.backward()\n"
        "    opt.step()\n    opt.zero_grad()\n"
    )
    plan = try_accumulation(src, find_batch(src), 959)
    assert isinstance(plan, AccumulationPlan)
    assert (plan.steps, plan.effective_batch) == (5, 4100)
    assert "5 batches of 820" in plan.explanation
