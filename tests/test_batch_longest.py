"""Reduce batch sizes for the longest batch of the epoch, not the first two (issue 20, item 2).

A padded-sequence loader (a ``collate_fn`` that pads to the longest sequence in the batch) whose
longest sequence lies in its 5th batch: a rehearsal of two passes sees two short batches, and the
batch it finds runs out later in the epoch (was: "No batch fitted for the whole run in 9 runs" on
this loop, 6 real runs out of memory). Now the rehearsals run the data's largest batch first; the
batch found finishes the epoch in one real run, and the outcome says what it was sized for.
Measured against the largest batch whose whole epoch fits (bisection, each probe a fresh card).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest

torch = pytest.importorskip("torch")

MiB = 1 << 20
CARD = "32MiB"
N, LONG, START = 320, 280, 64  # at batch 64 the longest sequence is in the 5th batch

DATA = f"""\
import torch
from torch.utils.data import DataLoader
g = torch.Generator().manual_seed(0)
lengths = torch.randint(8, 40, ({N},), generator=g)
lengths[{LONG}] = 400
seqs = [torch.randint(1, 1000, (int(n),), generator=g) for n in lengths]
labels = torch.randint(0, 2, ({N},), generator=g)
dataset = list(zip(seqs, labels))

def pad_collate(batch):
    xs, ys = zip(*batch)
    return torch.nn.utils.rnn.pad_sequence(xs, batch_first=True), torch.stack(ys)
"""

MODEL = """\
import torch.nn.functional as F
torch.manual_seed(0)

class Classifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(1000, 32, padding_idx=0)
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(32, 128), torch.nn.ReLU(), torch.nn.Linear(128, 32)
        )
        self.out = torch.nn.Linear(32, 2)

    def forward(self, x):
        return self.out(self.mlp(self.emb(x)).mean(1))

model = Classifier().cuda()
opt = torch.optim.Adam(model.parameters())
"""

LOADER = "loader = DataLoader(dataset, batch_size={b}, collate_fn=pad_collate)\n"

# one epoch; `steps` counts the batches trained
TRAIN = """\
steps = 0
for x, y in loader:
    x, y = x.cuda(), y.cuda()
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    steps += 1
"""


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """On a shared 2-core machine torch's thread pool makes each step 30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _setup(shell: Any, loader: bool = True, b: int = START) -> None:
    shell.run_cell("%gpumem simulate off")
    assert shell.run_cell(DATA).success  # host data, made before the card
    shell.run_cell(f"%gpumem simulate {CARD}")
    assert shell.run_cell(
        MODEL + (LOADER.format(b=b) if loader else ""), store_history=True
    ).success


def _epoch_fits(shell: Any, b: int) -> bool:
    _setup(shell, b=b)
    return bool(shell.run_cell(TRAIN, silent=True).success)


@pytest.fixture(scope="module")
def largest_epoch() -> int:
    """The largest batch whose whole epoch fits, by bisection (a fresh card and model each)."""
    from tests.conftest import _end_shell, _new_shell

    sh = _new_shell()
    sh.run_cell("%load_ext jupyter_gpumem", store_history=False)
    try:
        lo, hi = 1, START
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if _epoch_fits(sh, mid) else (lo, mid)
        return lo
    finally:
        sh.run_cell("%unload_ext jupyter_gpumem", store_history=False)
        _end_shell(sh)


def _runs(out: str) -> tuple[int, int]:
    """(rehearsals, real runs) the outcome reports."""
    m = re.search(r"(\d+) rehearsals? \+ (\d+) real runs?", out)
    assert m, out
    return int(m.group(1)), int(m.group(2))


def _finished_the_epoch(shell: Any, batch: int, out: str, largest: int) -> None:
    ns = shell.user_ns
    assert 2 * batch <= LONG, "the longest batch must not be among the first two"
    assert ns["steps"] == len(ns["loader"]) == -(-N // batch), out  # the whole epoch ran
    assert _runs(out)[1] == 1, out  # the one real run finished: none ran out
    assert batch >= 0.9 * largest, (batch, largest, out)
    assert "Sized for the longest batch: 400 tokens a sample" in out, out
    assert "read without running its code" in out, out
    assert "sorting by length" in out, out  # 1 of 320 is that long: bucketing is offered


def test_retry_batch_padded_loop_finishes_the_epoch(
    shell: Any, capsys: Any, largest_epoch: int
) -> None:
    """Was: rehearsals fitted at 63 on two short batches, then 6 real runs ran out on the 400-token
    batch: 'No batch fitted for the whole run in 9 runs'."""
    _setup(shell)
    assert not shell.run_cell(TRAIN, store_history=True).success  # out in the 5th batch
    capsys.readouterr()
    shell.run_cell("%gpumem retry batch --force")  # four steps ran before the failure
    out = capsys.readouterr().out
    batch = shell.user_ns["loader"].batch_size
    assert f"Fits at batch {batch} (was {START})" in out, out
    _finished_the_epoch(shell, batch, out, largest_epoch)
    # the next epoch, run by the user, fits too
    assert shell.run_cell(TRAIN, store_history=True).success


def test_oomsafe_padded_loop_finishes_the_epoch(
    shell: Any, capsys: Any, largest_epoch: int
) -> None:
    _setup(shell)
    capsys.readouterr()
    assert shell.run_cell("%%oomsafe --fixes batch --force\n" + TRAIN).success
    out = capsys.readouterr().out
    batch = shell.user_ns["loader"].batch_size
    assert f"Fits at batch {batch} (was {START})" in out, out
    _finished_the_epoch(shell, batch, out, largest_epoch)


def test_loader_made_in_the_cell(shell: Any, run: Any, largest_epoch: int) -> None:
    """The batch is a literal of the failing cell and the loader is made there: the rehearsals'
    loader is the cell's own, reordered all the same."""
    _setup(shell, loader=False)
    cell = LOADER.format(b=START) + TRAIN
    assert not shell.run_cell(cell, store_history=True).success
    out = run(shell, "%gpumem retry batch --force", store_history=False).out
    m = re.search(rf"Fits at batch (\d+) \(was {START}\)", out)
    assert m, out
    _finished_the_epoch(shell, int(m.group(1)), out, largest_epoch)


DATASET_CLASS = """\
class Sequences(torch.utils.data.Dataset):
    def __init__(self, seqs, labels):
        self.seqs, self.labels = seqs, labels
    def __len__(self):
        return len(self.seqs)
    def __getitem__(self, i):
        return self.seqs[i], self.labels[i]

dataset = Sequences(seqs, labels)
"""


def test_a_dataset_with_its_own_getitem_is_read_through_it_and_says_so(
    shell: Any, run: Any, largest_epoch: int
) -> None:
    shell.run_cell("%gpumem simulate off")
    assert shell.run_cell(DATA + DATASET_CLASS).success
    shell.run_cell(f"%gpumem simulate {CARD}")
    assert shell.run_cell(MODEL + LOADER.format(b=START), store_history=True).success
    assert not shell.run_cell(TRAIN, store_history=True).success
    out = run(shell, "%gpumem retry batch --force", store_history=False).out
    batch = shell.user_ns["loader"].batch_size
    assert f"Fits at batch {batch} (was {START})" in out, out
    assert f"the largest of `dataset`'s {N} items, read through its own `__getitem__`" in out, out
    assert shell.user_ns["steps"] == len(shell.user_ns["loader"]), out
    assert _runs(out)[1] == 1 and batch >= 0.9 * largest_epoch, (batch, largest_epoch, out)


# ------------------------------------------------------------------------------------------------
# The Hugging Face course's full training loop (tests/data/fresh/hf_course_training_loop.py): its
# DataCollatorWithPadding-style collate, AdamW, a linear schedule, 3 epochs, shuffled; the data
# (seeded random token ids) made 96 examples of 16-64 tokens and one of 384.


def _hf() -> dict[str, str]:
    from tests.test_third_party_fresh import _cells

    cells = _cells("hf_course_training_loop.py")
    data = cells["data"]
    for old, new in (
        (
            "n = int(torch.randint(16, 129, ()).item())",
            "n = 384 if i == 70 else int(torch.randint(16, 65, ()).item())",
        ),
        ('"train": [_example(i) for i in range(24)]', '"train": [_example(i) for i in range(96)]'),
    ):
        assert old in data
        data = data.replace(old, new)
    return {**cells, "data": data}


def _hf_setup(shell: Any, cells: dict[str, str], b: int = 8) -> None:
    shell.run_cell("%gpumem simulate off")
    data = cells["data"].replace("shuffle=True, batch_size=8", f"shuffle=True, batch_size={b}")
    assert shell.run_cell(data).success
    shell.run_cell(f"%gpumem simulate {HF_CARD}")
    for name in ("scheduler", "setup"):
        assert shell.run_cell(cells[name]).success


def _hf_largest(cells: dict[str, str]) -> int:
    """The largest batch whose three epochs fit, by bisection, each on a fresh card."""
    from tests.conftest import _end_shell, _new_shell

    sh = _new_shell()
    sh.run_cell("%load_ext jupyter_gpumem", store_history=False)
    try:
        lo, hi = 1, 8
        while hi - lo > 1:
            mid = (lo + hi) // 2
            _hf_setup(sh, cells, mid)
            lo, hi = (mid, hi) if sh.run_cell(cells["train"], silent=True).success else (lo, mid)
        return lo
    finally:
        sh.run_cell("%unload_ext jupyter_gpumem", store_history=False)
        _end_shell(sh)


HF_CARD = "96MiB"


@pytest.mark.slow
def test_hf_course_loop_with_one_long_example_trains_three_epochs(shell: Any, capsys: Any) -> None:
    """Was (96 MiB): rehearsals fitted at 7 on short batches, three real runs ran out (7, 6, 5)
    and it settled at 3; the largest batch whose three epochs fit was 4."""
    cells = _hf()
    largest = _hf_largest(cells)
    _hf_setup(shell, cells)
    assert not shell.run_cell(cells["train"]).success
    capsys.readouterr()
    shell.run_cell("%gpumem retry batch --force")  # steps ran before the long example
    out = capsys.readouterr().out
    ns = shell.user_ns
    batch = ns["train_dataloader"].batch_size
    assert f"Fits at batch {batch} (was 8)" in out, out
    assert batch >= 0.9 * largest, (batch, largest, out)
    assert _runs(out)[1] == 1, out
    assert ns["progress_bar"].n == 3 * len(ns["train_dataloader"]), out  # every epoch whole
    assert "Sized for the longest batch: 384 tokens a sample" in out, out
    assert "`tokenized_datasets['train']`" in out, out


# ------------------------------------------------------------------------------------------------
# the readings alone


def _read(dataset: Any, sampler: Any = None) -> Any:
    from jupyter_gpumem.fixes.batch.longest import _read

    return _read(dataset, sampler, "`ds`")


def test_data_of_one_shape_is_not_reordered() -> None:
    from torch.utils.data import TensorDataset

    assert _read(TensorDataset(torch.zeros(10, 4), torch.zeros(10))) is None
    assert _read([(torch.zeros(4), 1) for _ in range(10)]) is None
    assert _read([]) is None


def test_token_lists_dicts_and_subsets_are_read_without_their_code() -> None:
    import numpy as np
    from torch.utils.data import Subset, SubsetRandomSampler

    lists = [[1] * n for n in (3, 9, 5)]
    s = _read(lists)
    assert (s.longest, s.unit, s.worst[0], s.ran_code) == ((9,), "tokens", 1, False)
    assert s.batch(4) == [1, 2, 0, 1]  # the largest first, then the next largest
    dicts = [{"input_ids": torch.ones(n, dtype=torch.long), "label": 0} for n in (3, 9, 5)]
    assert _read(dicts).longest == (9,)
    # a Subset: positions are the subset's own
    sub = _read(Subset(lists, [0, 2]))
    assert (sub.longest, sub.worst[0], sub.total) == ((5,), 1, 2)
    # a sampler that draws from some items only: the longest of those
    for indices in ([0, 2], torch.tensor([0, 2]), np.array([0, 2])):
        s = _read(lists, SubsetRandomSampler(indices))
        assert (s.longest, s.worst[0]) == ((5,), 2)
    assert _read(Subset(lists, torch.tensor([0, 2]))).longest == (5,)


def test_images_of_several_sizes_pad_every_dimension() -> None:
    """A collate that pads each dimension to its longest: the worst batch holds the tallest and
    the widest image, filled with the largest."""
    from torch.utils.data import RandomSampler, SequentialSampler

    images = [torch.zeros(3, h, w) for h, w in ((8, 8), (30, 10), (10, 28), (20, 20))]
    # shuffled: the tallest and the widest can meet in one batch
    s = _read(images, RandomSampler(images))
    assert s.worst[0] == 3 and set(s.worst) == {1, 2, 3}
    assert sorted(s.batch(5)) == [0, 1, 2, 3, 3]
    assert s.describe() == "3×30×28"
    # in order: the batches are known, and at 2 the worst is the second, (10, 28) with (20, 20)
    s = _read(images, SequentialSampler(images))
    assert sorted(s.batch(2)) == [2, 3] and s.describe() == "3×20×28"
    assert sorted(s.batch(3)) == [1, 1, 2] and s.describe() == "3×30×28"


def test_the_loader_class_is_put_back_after_a_rehearsal() -> None:
    from torch.utils.data import DataLoader

    from jupyter_gpumem.fixes.batch.longest import WorstFirst

    original = DataLoader.__dict__["__iter__"]
    data = [torch.zeros(n) for n in (2, 7, 3, 4)]
    worst = WorstFirst({"data": data})
    loader = DataLoader(data, batch_size=2, collate_fn=lambda b: [len(x) for x in b])
    with worst:
        assert list(loader) == [[7, 4], [7, 4]]  # two batches: both the worst
    assert worst.applied and DataLoader.__dict__["__iter__"] is original
    assert list(loader) == [[2, 7], [3, 4]]
    loader = DataLoader(data, batch_size=1, collate_fn=lambda b: [len(x) for x in b])
    with worst:
        assert list(loader) == [[7], [7], [3], [4]]  # an epoch is as long as the loader's


def test_a_collate_that_refuses_the_worst_batch_keeps_the_loaders_order() -> None:
    from torch.utils.data import DataLoader

    from jupyter_gpumem.fixes.batch.longest import WorstFirst

    def distinct(batch: list[Any]) -> list[int]:
        if sum(len(x) for x in batch) > 10:
            raise ValueError("too long together")
        return [len(x) for x in batch]

    data = [torch.zeros(n) for n in (2, 7, 3, 4)]
    worst = WorstFirst(
        {"data": data, "loader": (loader := DataLoader(data, 2, collate_fn=distinct))}
    )
    with worst:
        assert list(loader) == [[2, 7], [3, 4]]
    assert not worst.applied
    (line,) = worst.notes(2)
    assert (
        line.startswith("`loader`'s batches") and "refused its largest batch (ValueError)" in line
    )


def test_a_batch_sampler_is_not_reordered_and_says_it_cannot_know() -> None:
    """A loader that makes its own batches: the rehearsal runs them as they come, and where their
    shapes differ the outcome says in one line that the largest is unknown."""
    from torch.utils.data import DataLoader

    from jupyter_gpumem.fixes.batch.longest import WorstFirst

    data = [torch.zeros(n) for n in (2, 7, 3, 4)]

    def pad(batch: list[Any]) -> Any:
        return torch.nn.utils.rnn.pad_sequence(batch, batch_first=True)

    loader = DataLoader(data, batch_sampler=[[0, 2], [1, 3]], collate_fn=pad)
    worst = WorstFirst({"loader": loader})
    with worst:
        assert [tuple(b.shape) for b in loader] == [(2, 3), (2, 7)]
    assert not worst.applied
    (line,) = worst.notes(2)
    assert "`loader`'s batches differ in shape and its largest cannot be known" in line, line
    assert "its batch_sampler makes the batches" in line
    # batches of one sample shape, only fewer in the last: nothing to say
    fixed = DataLoader([torch.zeros(3)] * 5, batch_sampler=[[0, 1], [2, 3], [4]], collate_fn=pad)
    worst = WorstFirst({"fixed": fixed})
    with worst:
        assert len(list(fixed)) == 3
    assert worst.notes(2) == []


def test_a_collate_that_truncates_is_named_with_what_it_makes() -> None:
    from torch.utils.data import DataLoader

    from jupyter_gpumem.fixes.batch.longest import WorstFirst

    def pad_to_5(batch: list[Any]) -> Any:
        return torch.nn.utils.rnn.pad_sequence(batch, batch_first=True)[:, :5]

    data = [torch.zeros(n, dtype=torch.long) for n in (2, 70, 3, 4)]
    worst = WorstFirst({"data": data})
    with worst:
        assert [tuple(b.shape) for b in DataLoader(data, 2, collate_fn=pad_to_5)] == [(2, 5)] * 2
    line = worst.notes(2)[0]
    assert line.startswith("Sized for the longest batch: 70 tokens a sample, which the "), line
    assert "collate_fn makes 5 (the largest of `data`'s 4 items" in line, line


# ------------------------------------------------------------------------------------------------
# images of several sizes, padded to the tallest and the widest of each batch, read in order: a
# wide image in the 5th batch at 32 and a tall one in the 6th (never in one batch at 32 or below)

IMAGES = """\
import torch
from torch.utils.data import DataLoader
g = torch.Generator().manual_seed(0)
sizes = [(int(h), int(w)) for h, w in torch.randint(16, 40, (200, 2), generator=g)]
sizes[150], sizes[190] = (40, 160), (160, 40)
images = [(torch.randn(3, h, w, generator=g), i % 10) for i, (h, w) in enumerate(sizes)]

def pad_images(batch):
    h = max(x.shape[1] for x, _ in batch)
    w = max(x.shape[2] for x, _ in batch)
    out = torch.zeros(len(batch), 3, h, w)
    for i, (x, _) in enumerate(batch):
        out[i, :, : x.shape[1], : x.shape[2]] = x
    return out, torch.tensor([y for _, y in batch])
"""

CONVNET = """\
import torch.nn.functional as F
torch.manual_seed(0)
model = torch.nn.Sequential(
    torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
    torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU(),
    torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10),
).cuda()
opt = torch.optim.SGD(model.parameters(), lr=0.1)
loader = DataLoader(images, batch_size={b}, collate_fn=pad_images)
"""


def _images(shell: Any, b: int) -> None:
    shell.run_cell("%gpumem simulate off")
    assert shell.run_cell(IMAGES).success
    shell.run_cell(f"%gpumem simulate {CARD}")
    assert shell.run_cell(CONVNET.format(b=b), store_history=True).success


def test_images_of_several_sizes_finish_the_epoch(shell: Any, run: Any) -> None:
    from tests.conftest import _end_shell, _new_shell

    sh = _new_shell()  # the largest batch whose epoch fits, each probe on a fresh card
    sh.run_cell("%load_ext jupyter_gpumem", store_history=False)
    lo, hi = 1, 32
    while hi - lo > 1:
        mid = (lo + hi) // 2
        _images(sh, mid)
        lo, hi = (mid, hi) if sh.run_cell(TRAIN, silent=True).success else (lo, mid)
    sh.run_cell("%unload_ext jupyter_gpumem", store_history=False)
    _end_shell(sh)

    _images(shell, 32)
    assert not shell.run_cell(TRAIN, store_history=True).success
    out = run(shell, "%gpumem retry batch --force", store_history=False).out
    batch = shell.user_ns["loader"].batch_size
    assert f"Fits at batch {batch} (was 32)" in out, out
    assert 2 * batch <= 150 and shell.user_ns["steps"] == len(shell.user_ns["loader"]), out
    assert _runs(out)[1] == 1 and batch >= 0.9 * lo, (batch, lo, out)
    # in order, the wide and the tall image never share a batch: not sized for 160×160
    assert "Sized for the largest batch: 3×" in out and "160×160" not in out, out
    assert "sorting by size" in out, out


def _stream(shell: Any, run: Any, stream: str, collate: str = "pad_collate") -> str:
    shell.run_cell("%gpumem simulate off")
    assert shell.run_cell(DATA + stream).success
    shell.run_cell(f"%gpumem simulate {CARD}")
    loader = f"loader = DataLoader(Stream(), batch_size={START}, collate_fn={collate})\n"
    assert shell.run_cell(MODEL + loader, store_history=True).success
    assert not shell.run_cell(TRAIN, store_history=True).success
    return str(run(shell, "%gpumem retry batch --force").out)


def test_a_streamed_dataset_is_read_through_its_iter(
    shell: Any, run: Any, largest_epoch: int
) -> None:
    """An IterableDataset cannot be indexed: its items are read as it yields them, and the
    rehearsals collate the longest of them."""
    stream = "class Stream(torch.utils.data.IterableDataset):\n"
    stream += "    def __iter__(self):\n        return iter(dataset)\n"
    out = _stream(shell, run, stream)
    m = re.search(rf"Fits at batch (\d+) \(was {START}\)", out)
    assert m, out
    batch = int(m.group(1))
    assert shell.user_ns["steps"] == -(-N // batch), out  # the whole epoch ran
    assert _runs(out)[1] == 1 and batch >= 0.9 * largest_epoch, (batch, largest_epoch, out)
    assert "Sized for the longest batch: 400 tokens a sample (the largest of the 320 items" in out
    assert "read through its own `__iter__`" in out, out


def test_a_stream_it_cannot_read_says_so_in_one_line(shell: Any, run: Any) -> None:
    """Items of the notebook's own class are not read (their code would run): the rehearsals see
    two short batches, and the outcome says the largest batch cannot be known instead of claiming
    a size."""
    stream = """\
class Sample:
    def __init__(self, tokens, label):
        self.tokens, self.label = tokens, label

class Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        return (Sample(x, y) for x, y in dataset)

def pad_samples(batch):
    return pad_collate([(s.tokens, s.label) for s in batch])
"""
    out = _stream(shell, run, stream, "pad_samples")
    line = "`loader`'s batches differ in shape and its largest cannot be known (it streams an "
    assert out.count(line + "IterableDataset)") == 1, out
    assert "Sized for" not in out, out
    assert "ran out where its rehearsal (the first passes of the loop) fitted" in out, out


@pytest.mark.parametrize(
    "iter_body",
    ["return self.src  # a generator it holds", "return source  # a generator made once"],
)
def test_a_one_shot_stream_is_not_used_up_by_reading(shell: Any, run: Any, iter_body: str) -> None:
    """A stream whose ``__iter__`` hands out an iterator made once (a generator, a file opened
    earlier) is not read ahead: reading it would use up the user's data, and the kept run would
    train nothing while the outcome said every batch fits (was: 0 steps, 'so every batch fits').
    The outcome says in one line that its largest batch cannot be known."""
    stream = f"""\
source = (item for _ in range(3) for item in dataset)  # one pass over three copies, made once

class Stream(torch.utils.data.IterableDataset):
    def __init__(self):
        self.src = source
    def __iter__(self):
        {iter_body}
"""
    out = _stream(shell, run, stream)
    line = (
        "`loader`'s largest batch cannot be known (it streams an IterableDataset that can be "
        "read once only, not read ahead so as not to use it up)"
    )
    assert out.count(line) == 1, out
    assert "every batch fits" not in out and "Sized for" not in out, out
    if "Fits at batch" in out:
        assert shell.user_ns["steps"] > 0, out  # the kept run trained on what was left


SLOW_DATASET = """\
lengths[::2] = 400  # every other sequence is long: a sample of a few finds the longest
seqs = [torch.randint(1, 1000, (int(n),), generator=g) for n in lengths]
clock = [0.0]

class Slow(torch.utils.data.Dataset):
    calls = 0
    def __len__(self):
        return len(seqs)
    def __getitem__(self, i):  # a quarter of a second an item (decoding an image, tokenizing)
        Slow.calls += 1
        clock[0] += 0.25
        return seqs[i], labels[i]

dataset = Slow()
"""


def test_reading_through_a_slow_getitem_stays_within_its_budget(
    shell: Any, run: Any, monkeypatch: Any
) -> None:
    """Reading sizes through ``dataset[i]`` checks its time budget at every item: items of a
    quarter of a second are read for about the budget, not 64 of them (16 s) before the first
    check. The clock is the dataset's own: each item moves it on by 0.25 s."""
    from types import SimpleNamespace

    from jupyter_gpumem.fixes.batch import longest

    shell.run_cell("%gpumem simulate off")
    assert shell.run_cell(DATA + SLOW_DATASET).success
    shell.run_cell(f"%gpumem simulate {CARD}")
    assert shell.run_cell(MODEL + LOADER.format(b=START), store_history=True).success
    assert not shell.run_cell(TRAIN, store_history=True).success
    ns = shell.user_ns
    monkeypatch.setattr(longest, "time", SimpleNamespace(perf_counter=lambda: ns["clock"][0]))
    calls: list[int] = []
    read = longest._read

    def counted(*args: Any) -> Any:
        before = ns["Slow"].calls
        try:
            return read(*args)
        finally:
            calls.append(ns["Slow"].calls - before)

    monkeypatch.setattr(longest, "_read", counted)
    out = run(shell, "%gpumem retry batch --force", store_history=False).out
    m = re.search(rf"the largest of (\d+) of `dataset`'s {N} items, sampled through its own", out)
    assert m, out
    sampled = int(m.group(1))  # items read: those the budget allows, the last one past it
    assert 2 <= sampled <= longest._SAMPLE_BUDGET_S / 0.25 + 1, (sampled, out)
    assert len(calls) == 1, (calls, out)  # read once for the whole fix
    assert calls[0] <= sampled + 1, (calls, out)  # and the longest again, for its dtype
    assert "Sized for the longest batch: 400 tokens a sample" in out, out
    assert shell.user_ns["steps"] == len(shell.user_ns["loader"]), out
