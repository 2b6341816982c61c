"""The user's own data: `--dataset FILE.py:fn` (or `module:fn`), where fn() returns a map-style
torch Dataset, or a (train, test) pair of them.

Each item is `(input, target)`: tensors, arrays or numbers. Attributes used where present:
`num_classes`; `targets` (per-sample labels, for the label-based federated partitions);
`groups` (per-sample client id, for `--partition natural`); `collate` (a list of items -> an
(inputs, targets) batch, for items that differ in shape). Without a test set, `--test-fraction`
of the samples is held out, as for arrays.

Everything is checked before training, on a sample of items (a full pass could mean reading
every image file): that they are pairs, that targets are numbers, and that items collate.
"""
import collections.abc
import contextlib
import copy
import random

import numpy as np
import torch

from ..config import UsageError
from ..userfn import load_function
from .arrays import Dataset, held_out

__all__ = ["ItemSplit", "load_user", "from_datasets"]

_CHECKED_ITEMS = 32  # items looked at before training, spread over the data set


class ItemSplit(torch.utils.data.Dataset):
    """A map-style Dataset (or the samples `indices` of one) whose batches are collated from items.

    Floating-point inputs and targets become float32, as the model's weights; integer targets int64.
    Each item is read with torch's, numpy's and random's global generators seeded from (seed,
    epoch, the item's index), so random augmentation in `__getitem__` draws the same numbers
    whichever rank, loading worker or resumed run reads the item, and whatever the batch it is
    in: equivalences and exact resume hold for augmented data too. A Dataset that draws no random
    numbers can say so (`deterministic = True`) and skip the seeding (about 10 us an item).
    """

    def __init__(self, dataset, indices=None, collate=None, seed=0):
        self.dataset, self.indices, self.seed, self.epoch = dataset, indices, seed, 0
        self.collate = collate or torch.utils.data.default_collate
        self.deterministic = bool(getattr(dataset, "deterministic", False))

    def __len__(self):
        return len(self.dataset) if self.indices is None else len(self.indices)

    def __getitem__(self, i):
        return self.dataset[int(i) if self.indices is None else int(self.indices[i])]

    def batch(self, indices):
        """(inputs, targets) tensors of the samples `indices`."""
        batch = self.collate(self._items(np.asarray(indices).tolist()))
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise TypeError(f"collate returned {type(batch).__name__}, not an (inputs, targets) pair")
        x, y = (torch.as_tensor(part) for part in batch)
        return (x.float() if x.is_floating_point() else x), _standard(y)

    def _items(self, positions):
        if self.deterministic:
            return [self[i] for i in positions]
        items = []
        with _generators_kept():
            for i in positions:
                _seed_generators(_item_seed(self.seed, self.epoch, i if self.indices is None else self.indices[i]))
                items.append(self[i])
        return items

    def detached(self):
        """A split over a shallow copy of a Dataset with set_epoch, whose epochs then leave this one
        (and the test split, which may share the Dataset) as they are; itself where no copy is
        needed, or where the Dataset cannot be copied (a set_epoch that changes shared state in
        place is not isolated either: it should rebind attributes, as TextBlocks does)."""
        if not hasattr(self.dataset, "set_epoch"):
            return self
        try:
            dataset = copy.copy(self.dataset)
        except Exception:  # noqa: BLE001  (e.g. a wrapper forwarding __getattr__ to a member not yet set)
            return self
        return ItemSplit(dataset, self.indices, self.collate, self.seed)

    def set_epoch(self, epoch):
        """The epoch the next items belong to (a Dataset with set_epoch varies by epoch, e.g. text offsets)."""
        self.epoch = epoch
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    @property
    def targets(self):
        targets = getattr(self.dataset, "targets", None)
        if targets is None:
            return None
        targets = np.asarray(targets)
        return targets if self.indices is None else targets[self.indices]


def load_user(cfg):
    """The Dataset that `cfg.dataset` (FILE.py:fn or module:fn) returns, checked before training."""
    spec = cfg.dataset
    fn = load_function(spec, "dataset")
    try:
        made = fn()
    except Exception as e:  # their code, their mistake: one line, exit 2
        raise UsageError(f"--dataset {spec}: {fn.__name__}() failed: {type(e).__name__}: {e}")
    train, test = made if isinstance(made, tuple) and len(made) == 2 else (made, None)
    return from_datasets(spec, train, test, test_fraction=cfg.test_fraction, seed=cfg.seed)


def from_datasets(name, train, test=None, *, test_fraction=0.2, seed=0):
    """A distml Dataset over torch Datasets `train` and `test` (None: hold out `test_fraction`)."""
    for role, data in (("train", train), ("test", test)):
        if data is not None:
            _check_map_style(data, name, role)
    collate = getattr(train, "collate", None)
    if collate is not None and not callable(collate):
        raise UsageError(f"--dataset {name}: its collate attribute is {type(collate).__name__}, not a function")
    if test is None:
        kept, test_indices = held_out(len(train), test_fraction, seed, f"--dataset {name}",
                                      "; return a (train, test) pair")
        train_split, test_split = ItemSplit(train, kept, collate, seed), ItemSplit(train, test_indices, collate, seed)
    else:
        train_split, test_split = ItemSplit(train, None, collate, seed), ItemSplit(test, None, collate, seed)
    (x, y), seen = _check_items(train_split, name, "train", collate)
    (x_test, y_test), seen_test = _check_items(test_split, name, "test", collate)
    if (x_test.shape[1:], y_test.shape[1:]) != (x.shape[1:], y.shape[1:]) and collate is None:
        raise UsageError(f"--dataset {name}: test items have inputs {tuple(x_test.shape[1:])} and targets "
                         f"{tuple(y_test.shape[1:])}, training items {tuple(x.shape[1:])} and {tuple(y.shape[1:])}")
    if y_test.is_floating_point() != y.is_floating_point():
        raise UsageError(f"--dataset {name}: training targets are {y.dtype}, test targets {y_test.dtype}: both "
                         f"classes (integers) or both real numbers")
    task = "classification" if not y.is_floating_point() else "regression"
    num_classes = 0
    if task == "classification":
        targets = [_per_sample(data, split, "targets", name)
                   for data, split in ((train, train_split), (test if test is not None else train, test_split))]
        num_classes = _num_classes(train, train_split, targets, name)
        _check_classes(name, seen + seen_test + [torch.as_tensor(t) for t in targets if t is not None],
                       num_classes)
    return Dataset(name, train_split, test_split, task, num_classes,
                   groups=_per_sample(train, train_split, "groups", name),
                   input_shape=tuple(x.shape[1:]), target_shape=tuple(y.shape[1:]))


def _check_map_style(data, name, role):
    sequence = isinstance(data, collections.abc.Sequence) and not isinstance(data, (str, bytes))
    if isinstance(data, torch.utils.data.IterableDataset) or not (isinstance(data, torch.utils.data.Dataset)
                                                                  or sequence) or not hasattr(data, "__len__"):
        raise UsageError(f"--dataset {name}: the {role} set is a {type(data).__name__}, not a map-style "
                         f"torch.utils.data.Dataset (with __len__ and __getitem__)")
    if len(data) == 0:
        raise UsageError(f"--dataset {name}: the {role} set is empty")


def _check_items(split, name, role, collate):
    """Look at up to _CHECKED_ITEMS items spread over `split`; returns the collated first two as (x, y),
    and the targets looked at."""
    n = len(split)
    positions = sorted({int(p) for p in np.linspace(0, n - 1, min(n, _CHECKED_ITEMS))})
    shapes, targets = {}, []
    for i in positions:
        try:
            item = split[i]
        except Exception as e:
            raise UsageError(f"--dataset {name}: {role} item {i} cannot be read: {type(e).__name__}: {e}")
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise UsageError(f"--dataset {name}: {role} item {i} is a {type(item).__name__}, not an "
                             f"(input, target) pair")
        x, y = (_as_tensor(part, name, role, i, what) for part, what in zip(item, ("input", "target")))
        if not (y.is_floating_point() or _is_integer(y)):
            raise UsageError(f"--dataset {name}: {role} item {i}'s target is {y.dtype}, not a number (give "
                             f"integer classes or real values)")
        shapes.setdefault((tuple(x.shape), tuple(y.shape)), i)
        targets.append(y)
    if len(shapes) > 1 and collate is None:
        (a, i), (b, j) = list(shapes.items())[:2]
        raise UsageError(f"--dataset {name}: {role} items differ in shape (item {i}: input {a[0]}, target {a[1]}; "
                         f"item {j}: input {b[0]}, target {b[1]}); give the Dataset a collate function "
                         f"(a list of items -> an (inputs, targets) batch), e.g. one that pads")
    try:
        return split.batch(np.arange(min(2, n))), targets
    except Exception as e:
        raise UsageError(f"--dataset {name}: {role} items do not collate into a batch: {type(e).__name__}: {e}")


def _as_tensor(part, name, role, i, what):
    try:
        return torch.as_tensor(np.asarray(part) if not isinstance(part, torch.Tensor) else part)
    except Exception as e:
        raise UsageError(f"--dataset {name}: {role} item {i}'s {what} is not a tensor, array or number "
                         f"({type(part).__name__}: {e})")


def _is_integer(t):
    return not t.is_floating_point() and t.dtype != torch.bool and not t.is_complex()


def _num_classes(dataset, split, targets, name):
    """`num_classes`, else from the `targets` of both splits, else from every training target (a pass
    over the items)."""
    given = getattr(dataset, "num_classes", None)
    if given is not None:
        if not (isinstance(given, (int, np.integer)) and given >= 2):
            raise UsageError(f"--dataset {name}: num_classes must be an integer >= 2, got {given!r}")
        return int(given)
    if all(t is not None for t in targets):
        return max(2, int(max(t.max() for t in targets)) + 1)
    return max(2, max(int(torch.as_tensor(split[i][1]).max()) for i in range(len(split))) + 1)


def _per_sample(dataset, split, attribute, name):
    """The Dataset's `attribute` (`targets`, `groups`: one integer per sample) for `split`'s samples,
    as int64; None where the Dataset has none."""
    values = getattr(dataset, attribute, None)
    if values is None:
        return None
    values = np.asarray(values)
    if values.shape != (len(dataset),) or not np.issubdtype(values.dtype, np.integer):
        raise UsageError(f"--dataset {name}: {attribute} must hold one integer per sample ({len(dataset)}), "
                         f"got {values.dtype} of shape {values.shape}")
    values = values.astype(np.int64, copy=False)
    return values if split.indices is None else values[split.indices]


def _check_classes(name, targets, num_classes):
    """Every target looked at (and every label of a `targets` attribute) is a class in [0, num_classes)."""
    low, high = min(int(t.min()) for t in targets), max(int(t.max()) for t in targets)
    if low < 0 or high >= num_classes:
        raise UsageError(f"--dataset {name}: class targets must lie in [0, {num_classes}) (num_classes "
                         f"{num_classes}), found {low if low < 0 else high}")


_MASK = 2**64 - 1


def _item_seed(seed, epoch, index):
    """A 64-bit seed from (seed, epoch, index): splitmix64 of their combination (1 us, no allocation)."""
    x = (seed * 0x9E3779B97F4A7C15 + (epoch + 1) * 0xBF58476D1CE4E5B9 + (int(index) + 1) * 0x94D049BB133111EB) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def _seed_generators(seed):
    torch.default_generator.manual_seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    random.seed(seed)


@contextlib.contextmanager
def _generators_kept():
    """torch's (CPU), numpy's and random's global generators as they were, after what runs inside."""
    numpy_state, python_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            np.random.set_state(numpy_state)
            random.setstate(python_state)


def _standard(t):
    """Targets: float32 for real values (the model's dtype), int64 for classes (what losses index with)."""
    if t.is_floating_point():
        return t if t.dtype == torch.float32 else t.float()
    return t.long() if _is_integer(t) and t.dtype != torch.int64 else t
