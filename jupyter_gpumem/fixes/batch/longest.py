"""The worst batch, not the first: Reduce batch's rehearsals run the largest batch the data makes.

A rehearsal stops after two passes of the failing loop, so it sees the loader's first two batches.
Where the batch's other dimensions follow the data (a ``collate_fn`` that pads to the longest
sequence in the batch, images of several sizes), those two say nothing about the longest batch of
the epoch: a batch found on them runs out later, on a long one (Lightning's BatchSizeFinder,
issues 8028, 20231 and 21154; tensor2tensor 581).

So while a rehearsal runs, a DataLoader over data whose items vary in size starts every epoch with
its worst batch, twice: the ``b`` largest samples (with the longest of each varying dimension among
them, so that a collate that pads each dimension to its longest pads them all), then the epoch from
its third batch in the loader's own order. Where the loader reads
in order (no shuffling) and more than one dimension varies, the batches it will make are known, and
the worst is the worst of those (a tall and a wide image pad each other only where they share a
batch); a shuffled loader can draw any items together, so there it is the longest of each
dimension at once. Why rehearse the worst shape rather than scale what the first batches needed by
worst/seen length:

- the need of a padded batch is not linear in its length (attention is quadratic, an LSTM's
  workspace and the allocator's block sizes step), and the part that does not grow with the length
  (weights, the optimizer's state) must not be scaled; a run at the worst shape measures all of it;
- the ``b`` largest samples are the largest batch of ``b`` the data can make, for a collate that
  pads (every row as long as the longest: a shape affine in ``b``, so the search's replay of the
  rehearsals' allocation logs, ``replay.py``, holds from one run to the next) and for one that
  concatenates (EmbeddingBag's offsets: the largest sum of lengths; ``b`` copies of the longest
  would be far more than any batch). A stream keeps only the largest few items it yielded: its
  batch is those, then copies of the largest, more than its epoch can make;
- the real run that follows is the user's own order, whole: it meets the worst batch where it lies.

The sizes come from the dataset itself where they can be read without running the notebook's code
(a list or tuple of tensors, token lists, tuples or dicts of them; a ``Subset`` of one; a
``SubsetRandomSampler``'s indices), else from ``dataset[i]`` over the loader's index order (the
dataset's own code runs, inside the rehearsal; all of it within a time budget, else a sample of it,
and the outcome says which). A stream (an ``IterableDataset``) is read through its own
``__iter__``, as it yields its items, within the same budget, and the few items that may make its
worst batch are kept to collate it. A one-shot stream (its ``__iter__`` hands out an iterator
made once: a generator, a file opened earlier) is not read, as reading would use it up; and as a
stream read again may yield other items, the outcome never says that every batch of one fits.
Through the dataset's code the budget is checked at every item (one may take a second). A loader
that makes its own batches (a ``batch_sampler``), whose items cannot be read (the notebook's own
classes) or that streams once only is not reordered: where its batches' shapes differ in the
rehearsal (a one-shot stream: always), the outcome says in one line that its largest batch cannot be
known and that it sized for the batches it saw.
"""

from __future__ import annotations

import math
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from jupyter_gpumem.backends import torch_objects
from jupyter_gpumem.oom.report import is_oom
from jupyter_gpumem.rescue import safe

Shape = tuple[int, ...]
Signature = tuple[Shape | None, ...]

# Reading item sizes without running code: at most this long per dataset (about 90,000 tuples of a
# tensor and a label a second, measured on the shared 2-core test machine); past it, the items read
# so far, in a seeded random order, and the outcome says how many.
_READ_BUDGET_S = 1.5
# Through ``dataset[i]`` (the dataset's own code): at most this long per dataset.
_SAMPLE_BUDGET_S = 3.0
# Above this many items (and always through ``dataset[i]``) the order read is shuffled (seeded), so
# that a budget cut short samples the whole epoch, not its start.
_SHUFFLE_ABOVE = 20_000
_MAX_FIELDS = 16
# Items of one shape this many times in a row (spread over the epoch: shuffled) end the reading: a
# dataset of images of one size is not read for seconds. Through ``dataset[i]`` (its own code) and
# without running code (a list of over ``_SHUFFLE_ABOVE`` items).
_FIRST_LOOK = 64
_FIRST_LOOK_READ = 4096
# At most this many items are read (a seeded random sample of them): what the budgets allow.
_MAX_READ = 300_000
# The longest batch is "rare" when at most this share of the items is over half its length.
_RARE_SHARE = 0.05
# The passes of each epoch that run the worst batch (a rehearsal sees two).
_WORST_PASSES = 2


@dataclass
class _Sizes:
    """One dataset's item sizes, as read: the worst batch and how it was found."""

    dataset: Any  # held, so that its id keys the cache for the whole fix
    name: str  # "`dataset`", "`tokenized_datasets['train']`", "`train_loader`'s dataset"
    total: int  # the items the loader draws from
    read: int  # of them, whose sizes were read
    ran_code: bool  # read through ``dataset[i]`` or the dataset's own ``__iter__``
    worst: list[int] = field(default_factory=list)  # positions: the largest first, then per dim
    longest: Shape = ()  # the varying field's shape in the largest item
    unit: str = ""  # "tokens" for integer sequences
    median: float = 0.0  # elements of that field, the median item
    over_half: int = 0  # items whose field is over half the longest
    collated: Shape | None = None  # the first tensor of the worst batch, as the collate made it

    # Where the loader reads in order (no shuffling) and more than one dimension varies: every
    # item's signature by position, so that the batches it will make are known (the tallest and
    # the widest image in one batch only where they share one).
    in_order: list[Signature] | None = None
    varying: list[int] = field(default_factory=list)
    main: int = 0
    padded: Shape | None = None  # the worst batch's sample, as a collate that pads makes it
    # A stream (an IterableDataset) cannot be indexed: the items that may make its worst batch,
    # kept as it yielded them, by position; ``total`` is -1 where it was not read to its end.
    items: dict[int, Any] | None = None
    ranked: list[int] | None = None  # positions by size, the largest first (not of a stream)

    def fetch(self, loader: Any) -> Callable[[int], Any]:
        """The item at a position: the kept item of a stream, else ``dataset[i]``."""
        if self.items is not None:
            return self.items.__getitem__
        dataset = loader.dataset
        return lambda i: dataset[i]

    def batch(self, b: int) -> list[int]:
        """``b`` positions: the worst items, the largest repeated to fill the batch."""
        worst = self.worst
        if self.in_order is not None:
            rows = list(enumerate(self.in_order))
            chunks = [rows[k : k + b] for k in range(0, len(rows), max(1, b))]
            chunk = max(chunks, key=lambda c: _padded_size(c, self.varying))
            worst = _worst_of(chunk, self.varying)
        head = worst[: max(1, b)]
        if self.in_order is None and self.ranked:
            # then the next largest: a collate that concatenates (EmbeddingBag's offsets) sums
            # the lengths, and b copies of the longest would be more than any batch can be
            taken = set(head)
            head += [p for p in self.ranked[: b + len(taken)] if p not in taken][: b - len(head)]
        positions = head + [worst[0]] * (b - len(head))
        shapes = [self.in_order[p] if self.in_order is not None else None for p in head]
        if all(sig is not None for sig in shapes):
            self.padded = _padded([sig[self.main] for sig in shapes if sig is not None])
        return positions

    def describe(self) -> str:
        """``400 tokens``, ``3×512×640``."""
        if len(self.longest) == 1:
            return f"{self.longest[0]} {self.unit}" if self.unit else f"length {self.longest[0]}"
        return "×".join(map(str, self.padded or self.longest))


class WorstFirst:
    """A rehearsal's context (``Plan.contexts``): DataLoaders over data of varying sizes start
    each epoch with their worst batch. One per fix: sizes read once, kept across its runs."""

    def __init__(self, user_ns: Mapping[str, Any]) -> None:
        self.user_ns = user_ns
        self._sizes: dict[int, tuple[Any, _Sizes | None]] = {}  # id -> (dataset, its sizes)
        self.applied = False  # in the last run entered
        self.used: dict[int, _Sizes] = {}  # over every run
        self.unknown: dict[str, str] = {}  # loader -> why its largest batch cannot be known
        self._patched: tuple[type, Any] | None = None

    def __call__(self) -> WorstFirst:
        return self

    def __enter__(self) -> WorstFirst:
        self.applied = False
        cls = _loader_class()
        if cls is None:
            return self
        original = safe.class_attr(cls, "__iter__")
        if not callable(original):
            return self
        own = "__iter__" in safe.class_dict(cls)
        owner = self

        def __iter__(loader: Any) -> Any:  # DataLoader.__iter__ while a rehearsal runs
            return owner._iterate(loader, original)

        type.__setattr__(cls, "__iter__", __iter__)
        self._patched = (cls, original if own else None)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._patched is not None:
            cls, original = self._patched
            if original is not None:
                type.__setattr__(cls, "__iter__", original)
            else:
                type.__delattr__(cls, "__iter__")
            self._patched = None

    # -- one loader ------------------------------------------------------------------------

    def _iterate(self, loader: Any, original: Callable[[Any], Any]) -> Any:
        try:
            sizes, b = self._for(loader)
        except Exception:  # reading the data is ours: never a reason for the cell to fail
            sizes, b = None, None
        if sizes is None or b is None:
            it = original(loader)
            why = self._unknown_why(loader)
            return it if why is None else self._watch(loader, it, why)
        return self._worst_then_rest(loader, original, sizes, b)

    def _worst_then_rest(
        self, loader: Any, original: Callable[[Any], Any], sizes: _Sizes, b: int
    ) -> Iterator[Any]:
        """The worst batch for the first passes, then the loader's own batches from the next one
        on (an epoch of as many batches as the loader has). A collate that refuses the worst
        batch (not out of memory) leaves the loader's own order, and says so."""
        try:
            fetch = sizes.fetch(loader)
            worst = loader.collate_fn([fetch(i) for i in sizes.batch(b)])
        except Exception as exc:
            if is_oom(exc):
                raise
            self.unknown.setdefault(
                self._name(loader, None, own=True),
                f"its collate_fn refused its largest batch ({type(exc).__name__})",
            )
            yield from original(loader)
            return
        self.applied = True
        self.used[id(sizes.dataset)] = sizes
        sizes.collated = _first_shape(worst)
        try:
            passes = min(_WORST_PASSES, len(loader))
        except TypeError:
            passes = _WORST_PASSES
        for n in range(passes):
            yield worst
            if n + 1 < passes:
                worst = loader.collate_fn([fetch(i) for i in sizes.batch(b)])
        del worst
        for k, batch in enumerate(original(loader)):
            if k >= passes:
                yield batch

    def _for(self, loader: Any) -> tuple[_Sizes | None, int | None]:
        attrs = safe.instance_dict(loader) or {}
        b = attrs.get("batch_size")
        dataset = attrs.get("dataset")
        if type(b) is not int or b < 1 or dataset is None:
            return None, None
        key = id(dataset)
        if key not in self._sizes:
            self._sizes[key] = (dataset, None)  # read once per fix, even where it fails
            name = self._name(loader, dataset)
            if _iterable_style(dataset):
                try:
                    self._sizes[key] = (dataset, _read_stream(dataset, name))
                except _UsedUp:
                    self.unknown.setdefault(self._name(loader, None, own=True), _ONE_SHOT)
            else:
                self._sizes[key] = (dataset, _read(dataset, attrs.get("sampler"), name))
        return self._sizes[key][1], b

    def _unknown_why(self, loader: Any) -> str | None:
        attrs = safe.instance_dict(loader) or {}
        dataset = attrs.get("dataset")
        if dataset is not None and _iterable_style(dataset):
            return "it streams an IterableDataset"
        if attrs.get("batch_size") is None and dataset is not None:
            return "its batch_sampler makes the batches"
        return None

    def _watch(self, loader: Any, it: Any, why: str) -> Iterator[Any]:
        """The loader's own batches, noting when their samples' shapes differ (the largest is
        unknown); how many samples a batch holds may differ (the last one of an epoch)."""
        seen: set[Shape] = set()
        for batch in it:
            shape = _first_shape(batch) if len(seen) < 2 else None
            if shape is not None:
                seen.add(shape[1:])
                if len(seen) > 1:
                    self.unknown.setdefault(self._name(loader, None, own=True), why)
            yield batch

    def _name(self, loader: Any, dataset: Any, own: bool = False) -> str:
        for target in (dataset, loader) if not own else (loader,):
            if target is None:
                continue
            found = _name_in(self.user_ns, target)
            if found is not None:
                return f"`{found}`" if target is dataset or own else f"`{found}`'s dataset"
        return "the loader" if own else "the loader's dataset"

    # -- for people ------------------------------------------------------------------------

    def notes(self, batch: int) -> list[str]:
        """What the batch was sized for, and what to do when that size is rare; then
        ``unknown_notes``."""
        out = []
        for sizes in self.used.values():
            out.extend(_sized_notes(sizes, batch))
        return out + self.unknown_notes()

    def unknown_notes(self) -> list[str]:
        """One line for each loader whose largest batch could not be known."""
        return [
            f"{name}'s largest batch cannot be known ({why}): sized for the batches the "
            "rehearsals ran (which, like the failed run, used up part of it); a larger one later "
            "may still run out."
            if why == _ONE_SHOT
            else f"{name}'s batches differ in shape and its largest cannot be known ({why}): "
            "sized for the batches the rehearsals ran; a larger one later may still run out."
            for name, why in self.unknown.items()
        ]


_ONE_SHOT = (
    "it streams an IterableDataset that can be read once only, not read ahead so as not to use "
    "it up"
)


def _sized_notes(s: _Sizes, batch: int) -> list[str]:
    s.batch(batch)  # the worst batch at the batch kept: its padded shape
    median = f"{_round(s.median)} {s.unit}".rstrip() if len(s.longest) == 1 else None
    if s.items is not None:
        which = (
            f"the largest of the {s.read:,} items {s.name} streamed, read through its own "
            "`__iter__`"
            + ("" if s.read == s.total else " in the time allowed; a later item could be larger")
        )
    elif s.ran_code and s.read < s.total:
        which = (
            f"the largest of {s.read:,} of {s.name}'s {s.total:,} items, sampled through its "
            "own `__getitem__` across the loader's order; an item not sampled could be larger"
        )
    elif s.ran_code:
        which = f"the largest of {s.name}'s {s.total:,} items, read through its own `__getitem__`"
    elif s.read < s.total:
        which = (
            f"the largest of {s.read:,} of {s.name}'s {s.total:,} items read in the time allowed; "
            "an item not read could be larger"
        )
    else:
        which = f"the largest of {s.name}'s {s.total:,} items, read without running its code"
    what = "longest" if len(s.longest) == 1 else "largest"
    sample = f"{s.describe()} a sample"
    if len(s.longest) > 1 and s.in_order is None and s.padded not in (None, s.longest):
        sample += (
            " (the longest of each dimension in one batch, as a shuffled loader can draw them)"
        )
    if s.collated and s.longest and max(s.longest) not in s.collated[1:]:
        sample += f", which the collate_fn makes {'×'.join(map(str, s.collated[1:]))}"
    notes = [
        f"Sized for the {what} batch: {sample} ({which}"
        + (f"; the median is {median}" if median else "")
        + f"). The rehearsals ran the data's largest batch of {batch} first"
        # a stream yields afresh each time it is read: what the run reads may not be what was read
        + (", so every batch fits." if s.read == s.total and s.items is None else ".")
    ]
    half = math.prod(s.longest) / 2
    if s.over_half and s.over_half <= _RARE_SHARE * s.read:
        over = f"{_round(half)} {s.unit}".rstrip() if len(s.longest) == 1 else "half of it"
        notes.append(
            f"That size is rare ({s.over_half:,} of {s.read:,} items "
            f"{'is' if s.over_half == 1 else 'are'} over {over}): sorting by "
            + (
                "length, or batches of similar lengths"
                if len(s.longest) == 1
                else "size, or batches of similar sizes"
            )
            + " (a `batch_sampler` that buckets them), "
            f"would let the other batches run larger than {batch}."
        )
    return notes


def _round(x: float) -> str:
    return f"{x:.0f}" if x >= 10 else f"{x:.1f}".rstrip("0").rstrip(".")


# -- reading sizes --------------------------------------------------------------------------


def _read(dataset: Any, sampler: Any, name: str) -> _Sizes | None:
    """The dataset's item sizes, without running its code where it can be read so; None when its
    items do not vary in size (nothing to rehearse) or cannot be read."""
    getter, total, ran_code = _getter(dataset)
    if getter is None:
        return None
    positions = _positions(sampler, total)
    if not positions:
        return None
    order: Sequence[int] = positions
    spread = ran_code or len(order) > _SHUFFLE_ABOVE
    if spread:
        order = random.Random(0).sample(order, min(len(order), _MAX_READ))
    deadline = time.perf_counter() + (_SAMPLE_BUDGET_S if ran_code else _READ_BUDGET_S)
    read: list[tuple[int, Signature]] = []
    for n, i in enumerate(order):
        # through the dataset's own code an item may take long (decoding an image): every item
        if read and (ran_code or n % 64 == 0):
            if time.perf_counter() > deadline:
                break
            look = _FIRST_LOOK if ran_code else _FIRST_LOOK_READ
            if spread and n == look and len({sig for _, sig in read}) == 1:
                return None  # one shape so far, spread over the epoch: not worth seconds
        read.append((i, _signature(getter(i))))
    in_order = safe.type_name(type(sampler)) == "SequentialSampler" and positions == range(total)
    return _summarise(dataset, name, len(positions), read, ran_code, in_order)


def _read_stream(dataset: Any, name: str) -> _Sizes | None:
    """An IterableDataset's item sizes, read through its own ``__iter__`` as it yields them
    (within the time budget; a stream may not end), keeping the items that may make its worst
    batch: each new largest, and each new longest of any dimension.

    Raises ``_UsedUp`` where the stream is one-shot (see ``_holds_an_iterator``, ``_FRESH_REFS``): reading it would use up
    the user's data, so it is not read."""
    if _holds_an_iterator(dataset):
        raise _UsedUp
    deadline = time.perf_counter() + _SAMPLE_BUDGET_S
    it = iter(dataset)  # its own __iter__, once, as the loader calls it
    if it is dataset or sys.getrefcount(it) > _FRESH_REFS:
        raise _UsedUp  # an iterator someone else holds too: what it yields, theirs is missing
    read: list[tuple[int, Signature]] = []
    kept: dict[int, Any] = {}
    top: dict[object, int] = {}
    ended = True
    for n, item in enumerate(it):
        if n and (n >= _MAX_READ or time.perf_counter() > deadline):  # its code, every item
            ended = False
            break
        if n == _FIRST_LOOK and len({sig for _, sig in read}) == 1:
            return None  # one shape so far: not worth seconds
        sig = _signature(item)
        read.append((n, sig))
        marks: list[tuple[object, int]] = [("size", sum(math.prod(x) for x in sig if x))]
        marks += [((f, d), v) for f, x in enumerate(sig) if x for d, v in enumerate(x)]
        for key, value in marks:
            if value > top.get(key, -1):
                top[key] = value
                kept[n] = item
    total = len(read) if ended else -1
    return _summarise(dataset, name, total, read, True, items=kept)


class _UsedUp(Exception):
    """A stream that reading would use up: not read."""


def _fresh_refs() -> int:
    it = iter(())
    return sys.getrefcount(it)


# References to an iterator that only its maker's caller holds (``iter(self.items)``, a generator
# ``__iter__`` made): an iterator returned with more is held elsewhere too (``return self.src``, a
# generator or a file the notebook made once), and whatever reading takes from it is gone for the
# run. Counted in the same shape as ``_read_stream`` holds it.
_FRESH_REFS = _fresh_refs()


def _holds_an_iterator(dataset: Any) -> bool:
    """Whether a stream is its own iterator or keeps one among its attributes (a generator, a
    file opened once, ``iter(data)``): its ``__iter__`` may hand it out or read from it, and what
    reading takes is then gone for the run. Told by types, without running its code."""
    attrs = safe.instance_dict(dataset) or {}
    return any(
        safe.class_attr(type(value), "__next__") is not safe.MISSING
        for value in (dataset, *attrs.values())
    )


def _getter(dataset: Any) -> tuple[Callable[[int], Any] | None, int, bool]:
    """(item at a position, how many, whether reading runs the dataset's code)."""
    tp = type(dataset)
    if tp is list or tp is tuple:
        return (lambda i: tp.__getitem__(dataset, i)), tp.__len__(dataset), False
    attrs = safe.instance_dict(dataset)
    torch = torch_objects.torch_module()
    data = getattr(getattr(torch, "utils", None), "data", None)
    subset = getattr(data, "Subset", None)
    if attrs is not None and subset is not None and safe.is_a(tp, subset):
        inner, inner_len, ran = _getter(attrs.get("dataset"))
        idx = _index_list(attrs.get("indices"))
        if (
            inner is not None
            and not ran
            and idx is not None
            and all(0 <= i < inner_len for i in idx)
        ):
            return (lambda i, get=inner: get(idx[i])), len(idx), False
    tensor_dataset = getattr(data, "TensorDataset", None)
    if tensor_dataset is not None and safe.is_a(tp, tensor_dataset):
        return None, 0, False  # every item the same shape
    if safe.class_attr(tp, "__getitem__") is safe.MISSING:
        return None, 0, False
    try:
        total = len(dataset)
    except Exception:
        return None, 0, True
    return (lambda i: dataset[i]), total, True


def _positions(sampler: Any, total: int) -> list[int] | range:
    """The positions the loader draws from: a ``SubsetRandomSampler``'s indices, else all."""
    attrs = safe.instance_dict(sampler) if sampler is not None else None
    indices = _index_list((attrs or {}).get("indices"))
    if safe.type_name(type(sampler)) == "SubsetRandomSampler" and indices is not None:
        return [i for i in indices if 0 <= i < total]
    return range(total)


def _index_list(indices: Any) -> list[int] | None:
    """Indices as ints: a list, tuple or range, or a tensor or NumPy array of integers (read by
    torch's and NumPy's ``tolist``); None for anything else."""
    tp = type(indices)
    if tp not in (list, tuple, range):
        module = safe.type_module(tp)
        if not (_is_tensor_type(tp) or (module == "numpy" and safe.type_name(tp) == "ndarray")):
            return None
        try:
            indices = indices.tolist()
        except Exception:
            return None
        if type(indices) is not list:
            return None
    out = list(indices)
    return out if all(type(i) is int for i in out) else None


def _signature(item: Any) -> Signature:
    """The shapes of an item's fields: a tensor, a token list, a tuple or dict of them."""
    if type(item) is dict:
        values = [v for _, v in sorted(dict.items(item), key=lambda kv: str(kv[0]))]
        return tuple(_shape(v) for v in values[:_MAX_FIELDS])
    if type(item) in (list, tuple) and not _scalars(item):
        return tuple(_shape(v) for v in item[:_MAX_FIELDS])
    return (_shape(item),)


def _scalars(seq: list[Any] | tuple[Any, ...]) -> bool:
    return bool(seq) and all(type(v) in (int, float, bool) for v in (seq[0], seq[-1]))


_READERS: dict[str, Any] = {}


def _tensor_reader(name: str) -> Any:
    """``TensorBase``'s own getter (``shape``, ``dtype``): no subclass's code runs."""
    if name not in _READERS:
        torch = torch_objects.torch_module()
        base = getattr(getattr(torch, "_C", None), "TensorBase", None)
        _READERS[name] = safe.class_dict(base).get(name) if base is not None else None
    return _READERS[name]


# id(type) -> (the type, is it a tensor): told by the MRO once per type (``isinstance`` would ask
# a subclass's ``__class__``); the type is held so that its id keeps meaning it
_TENSOR_TYPES: dict[int, tuple[type, bool]] = {}


def _is_tensor_type(tp: type) -> bool:
    known = _TENSOR_TYPES.get(id(tp))
    if known is None:
        torch = torch_objects.torch_module()
        known = (tp, torch is not None and safe.is_a(tp, torch.Tensor))
        _TENSOR_TYPES[id(tp)] = known
    return known[1]


def _shape(value: Any) -> Shape | None:
    tp = type(value)
    if tp is int or tp is float or tp is bool:
        return ()
    if tp is list or tp is tuple:
        return (len(value),) if _scalars(value) else None
    if not _is_tensor_type(tp):
        return None
    getter = _tensor_reader("shape")
    try:
        return tuple(getter.__get__(value)) if getter is not None else None
    except Exception:
        return None


def _is_integer(value: Any) -> bool:
    if type(value) in (list, tuple):
        return bool(value) and type(value[0]) is int
    getter = _tensor_reader("dtype")
    try:
        return getter is not None and not getter.__get__(value).is_floating_point
    except Exception:
        return False


def _summarise(
    dataset: Any,
    name: str,
    total: int,
    read: list[tuple[int, Signature]],
    ran_code: bool,
    in_order: bool = False,
    items: dict[int, Any] | None = None,
) -> _Sizes | None:
    """The worst items of those read; None when no field's shape varies."""
    if not read:
        return None
    common = statistics.mode(len(sig) for _, sig in read)
    rows = [(i, sig) for i, sig in read if len(sig) == common]
    varying = _varying_fields(rows, common)
    if not varying:
        return None

    worst = _worst_of(rows, varying)
    if items is not None:
        worst = [p for p in worst if p in items]  # a stream: only what was kept can be used
        if not worst:
            return None
    largest = dict(rows)[worst[0]]
    main = max(varying, key=lambda f: math.prod(largest[f] or ()))
    longest = largest[main] or ()
    numels = [math.prod(sig[main] or ()) for _, sig in rows]
    half = math.prod(longest) / 2
    first = (
        _field_of(items[worst[0]], main)
        if items
        else _item_field(dataset, worst[0], main, ran_code)
    )
    sigs = dict(rows)
    dims = sum(len(largest[f] or ()) for f in varying)
    ordered = in_order and len(rows) == len(read) == total and dims > 1
    return _Sizes(
        dataset=dataset,
        name=name,
        total=total,
        read=len(read),
        ran_code=ran_code,
        worst=worst,
        longest=longest,
        unit="tokens" if len(longest) == 1 and first is not None and _is_integer(first) else "",
        median=statistics.median(numels),
        over_half=sum(1 for n in numels if n > half),
        in_order=[sigs[p] for p in range(total)] if ordered else None,
        varying=varying,
        main=main,
        padded=_padded([sigs[p][main] for p in worst]),
        items=None if items is None else {p: items[p] for p in worst},
        ranked=None if items is not None or ordered else _ranked(rows, varying),
    )


def _ranked(rows: list[tuple[int, Signature]], varying: list[int]) -> list[int]:
    """Positions by the elements of their varying fields, the largest first (ties in order)."""
    sizes = [(-sum(math.prod(sig[f] or ()) for f in varying), p) for p, sig in rows]
    return [p for _, p in sorted(sizes)]


def _worst_of(rows: list[tuple[int, Signature]], varying: list[int]) -> list[int]:
    """The positions of the worst batch's items: the largest first, then the longest of each
    dimension that varies among ``rows``."""

    def size(sig: Signature) -> int:
        return sum(math.prod(sig[f] or ()) for f in varying)

    largest = max(rows, key=lambda r: size(r[1]))
    worst = [largest[0]]
    for f in varying:
        for d in range(len(largest[1][f] or ())):
            if len({_dim(sig, f, d) for _, sig in rows}) < 2:
                continue  # the channels of every image: no item is the widest
            top = max(rows, key=lambda r: _dim(r[1], f, d))
            if top[0] not in worst:
                worst.append(top[0])
    return worst


def _padded(shapes: list[Shape | None]) -> Shape | None:
    """Each dimension's longest: what a collate that pads makes of these samples."""
    known = [s for s in shapes if s is not None]
    if not known or len({len(s) for s in known}) != 1:
        return None
    return tuple(max(dims) for dims in zip(*known, strict=True))


def _padded_size(rows: list[tuple[int, Signature]], varying: list[int]) -> int:
    """Elements of a batch of ``rows`` padded: what sizes the batch's activations."""
    total = 0
    for f in varying:
        shape = _padded([sig[f] for _, sig in rows])
        total += len(rows) * math.prod(shape or ())
    return total


def _dim(sig: Signature, f: int, d: int) -> int:
    shape = sig[f]
    return shape[d] if shape is not None and d < len(shape) else 0


def _varying_fields(rows: list[tuple[int, Signature]], width: int) -> list[int]:
    """The fields whose shape differs between items (the same number of dimensions in all)."""
    out = []
    for f in range(width):
        shapes = {sig[f] for _, sig in rows}
        if None in shapes or len(shapes) < 2 or len({len(s or ()) for s in shapes}) != 1:
            continue
        if all(len(s or ()) for s in shapes):
            out.append(f)
    return out


def _item_field(dataset: Any, position: int, f: int, ran_code: bool) -> Any:
    """Field ``f`` of the item at ``position``, read again the way its size was."""
    getter, _, ran = _getter(dataset)
    if getter is None or ran != ran_code:
        return None
    try:
        item = getter(position)
    except Exception:
        return None
    return _field_of(item, f)


def _field_of(item: Any, f: int) -> Any:
    """Field ``f`` of an item, as ``_signature`` numbers them."""
    if type(item) is dict:
        values = [v for _, v in sorted(dict.items(item), key=lambda kv: str(kv[0]))]
        return values[f] if f < len(values) else None
    if type(item) in (list, tuple) and not _scalars(item):
        return item[f] if f < len(item) else None
    return item


# -- small readings -------------------------------------------------------------------------


def _loader_class() -> type | None:
    torch = torch_objects.torch_module()
    data = getattr(getattr(torch, "utils", None), "data", None)
    cls = getattr(data, "DataLoader", None)
    return cls if isinstance(cls, type) else None


def _iterable_style(dataset: Any) -> bool:
    torch = torch_objects.torch_module()
    data = getattr(getattr(torch, "utils", None), "data", None)
    return safe.is_a(type(dataset), getattr(data, "IterableDataset", None))


def _first_shape(batch: Any) -> Shape | None:
    """The shape of the first tensor in a batch (a tensor, a tuple, list or dict of them)."""
    if type(batch) is dict:
        batch = [v for _, v in dict.items(batch)]
    if type(batch) in (list, tuple):
        return next((s for v in batch[:_MAX_FIELDS] if (s := _shape(v))), None)
    return _shape(batch)


def _name_in(user_ns: Mapping[str, Any], target: Any) -> str | None:
    """How the notebook reaches ``target``: a name, or a name's dict entry."""
    items = list(dict.items(user_ns)) if type(user_ns) is dict else list(user_ns.items())
    for name, value in items:
        if value is target and not name.startswith("_"):
            return name
    for name, value in items:
        if type(value) is dict and not name.startswith("_"):
            for key, entry in list(dict.items(value))[:64]:
                if entry is target:
                    return f"{name}[{key!r}]"
    return None
