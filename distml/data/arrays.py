"""Data sets: the bundled ones, synthetic data, and the user's .npz or .csv files.

Every loader returns a `Dataset` of numpy arrays with a train and a test split.
Integer targets mean classification (labels mapped to 0..K-1), floating-point
targets mean regression. Loading is deterministic given the config, so every
rank loads the same arrays and no data is sent over MPI.

Set-up cost grows with a rank's shard, not with the file: an uncompressed .npz
is memory-mapped, and each rank checks only its own block of rows for NaN and
infinity (`rows_of`); the trainer makes the ranks agree, so a bad value
anywhere is one usage error on every rank. Labels (one number a sample) are
read whole: every rank needs the classes.
"""
import csv
import mmap
import os
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..config import UsageError
from ..sharding import rng

__all__ = ["Dataset", "ArraySplit", "from_arrays", "load_arrays", "rows_of", "read_rows", "check_finite", "BUILTIN"]

BUILTIN = ("digits", "diabetes", "synthetic")


class ArraySplit(torch.utils.data.Dataset):
    """One split held as arrays: a map-style Dataset whose batches are one indexed read.

    `batch(indices)` reads the rows at once (read_rows: plain reads on a memory map), where
    collating items one by one would cost a Python call per sample. Pickled for loading
    workers, a memory-mapped array travels as its file, offset and shape, not its bytes.
    """

    deterministic = True  # a batch draws no random numbers: the loader need not seed it

    def __init__(self, X, y):
        self.X, self.y = X, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return torch.from_numpy(np.array(self.X[i])), torch.as_tensor(self.y[i])

    def batch(self, indices):
        """(inputs, targets) tensors of the samples `indices` (ascending or not)."""
        return torch.from_numpy(np.ascontiguousarray(self.X[indices])), torch.from_numpy(np.asarray(self.y[indices]))

    @property
    def targets(self):
        return self.y

    def __getstate__(self):
        return {k: _MappedArray(v) if _mapped(v) else np.asarray(v) for k, v in self.__dict__.items()}

    def __setstate__(self, state):
        self.__dict__.update({k: v.open() if isinstance(v, _MappedArray) else v for k, v in state.items()})


def _mapped(array):
    """Whether `array` is a whole memory map of a file (not a copy or a view of one)."""
    return isinstance(array, np.memmap) and bool(array.filename) and isinstance(array.base, mmap.mmap)


class _MappedArray:
    """A memory-mapped array by reference (file, offset, shape), for pickling."""

    def __init__(self, array):
        self.args = (array.filename, array.dtype, array.offset, array.shape, "F" if array.flags.f_contiguous
                     and not array.flags.c_contiguous else "C")

    def open(self):
        filename, dtype, offset, shape, order = self.args
        return np.memmap(filename, dtype=dtype, mode="r", offset=offset, shape=shape, order=order)


@dataclass
class Dataset:
    """A run's data: train and test splits (map-style torch Datasets with a `batch(indices)` method),
    the task ("classification": integer class targets; "regression"), and what partitions need."""
    name: str
    train: torch.utils.data.Dataset
    test: torch.utils.data.Dataset
    task: str  # "classification" or "regression"
    num_classes: int = 0
    source: str = ""  # checksums of the file's whole content as written (see _npz_checksums); "" for built-ins
    groups: Optional[np.ndarray] = None  # per training sample, its natural client (--partition natural)
    input_shape: tuple = ()  # one sample's input
    target_shape: tuple = ()  # one sample's target: () for a class or a number, (T,) for a sequence

    @property
    def num_outputs(self):
        return self.num_classes if self.task == "classification" else 1

    @property
    def labels(self):
        """Per training sample class labels (the label-based partitions), or None where unknown."""
        return getattr(self.train, "targets", None) if self.task == "classification" else None

    # Array data's arrays (tests, scripts): train.X, train.y, test.X, test.y
    X_train = property(lambda self: self.train.X)
    y_train = property(lambda self: self.train.y)
    X_test = property(lambda self: self.test.X)
    y_test = property(lambda self: self.test.y)


def from_arrays(name, X, y, X_test, y_test, task, num_classes=0, source=""):
    """A Dataset over numpy arrays (one sample a row)."""
    return Dataset(name, ArraySplit(X, y), ArraySplit(X_test, y_test), task, num_classes, source,
                   input_shape=tuple(X.shape[1:]), target_shape=tuple(y.shape[1:]))


def load_arrays(cfg, *, rank=0, size=1):
    """The Dataset named by `cfg.dataset`: a built-in name or a path to .npz / .csv.

    A file's values are checked for NaN and infinity in block `rank` of `size`
    (`rows_of`) only; the default checks them all. Built-in sets are checked whole.
    """
    name = cfg.dataset
    if name == "digits":
        return _digits(cfg)
    if name == "diabetes":
        return _diabetes(cfg)
    if name == "synthetic":
        return _synthetic(cfg)
    if name.endswith((".npz", ".csv")):
        if not os.path.isfile(name):
            raise UsageError(f"--dataset: no such file: {name}")
        X, y, X_test, y_test, source = _read_npz(name) if name.endswith(".npz") else _read_csv(name, cfg.target)
        dataset = _finish(name, X, y, X_test, y_test, cfg, block=(rank, size))
        dataset.source = source
        return dataset
    raise UsageError(f"--dataset must be one of {', '.join(BUILTIN)}, a .npz/.csv file, text or text:PATH, or "
                     f"FILE.py:function / module:function returning a torch Dataset, got {name!r}")


def _digits(cfg):
    data, target = bundled("digits")
    X = (data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    return _finish("digits", X, target.astype(np.int64), None, None, cfg)


def _diabetes(cfg):
    data, target = bundled("diabetes")
    return _finish("diabetes", data, target.astype(np.float32), None, None, cfg, standardize=True)


def bundled(name):
    """(data, target) of scikit-learn's bundled data set `name` ("digits", "diabetes").

    Importing sklearn.datasets costs every rank of every launch about 0.8 s, more than the
    training of a small model: the arrays are kept in ~/.cache/distml (or $DISTML_CACHE), one
    .npz per scikit-learn version, written atomically; where that fails they are loaded anew.
    """
    from importlib.metadata import version
    cache = Path(os.environ.get("DISTML_CACHE") or Path.home() / ".cache" / "distml")
    path = cache / f"{name}-scikit-learn-{version('scikit-learn')}.npz"
    try:
        with np.load(path) as saved:  # allow_pickle stays False
            return saved["data"], saved["target"]
    except (OSError, KeyError, ValueError):
        pass
    from sklearn import datasets
    bunch = getattr(datasets, f"load_{name}")()
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=cache, suffix=".npz", delete=False) as tmp:
            np.savez(tmp, data=bunch.data, target=bunch.target)
        os.replace(tmp.name, path)  # ranks writing at once each replace it whole
    except OSError:
        pass
    return bunch.data, bunch.target


def _synthetic(cfg):
    from sklearn.datasets import make_classification, make_regression
    if cfg.classes == 0:
        X, y = make_regression(n_samples=cfg.samples, n_features=cfg.features, noise=0.1,
                               random_state=cfg.seed)
        return _finish("synthetic", X, y.astype(np.float32), None, None, cfg, standardize=True)
    informative = max(2, cfg.features // 2, int(np.ceil(np.log2(cfg.classes))))
    if informative > cfg.features:
        raise UsageError(f"--features {cfg.features} is too few for --classes {cfg.classes}; "
                         f"use --features >= {informative}")
    X, y = make_classification(n_samples=cfg.samples, n_features=cfg.features,
                               n_informative=informative, n_redundant=0,
                               n_classes=cfg.classes, n_clusters_per_class=1, random_state=cfg.seed)
    return _finish("synthetic", X, y.astype(np.int64), None, None, cfg)


def _finish(name, X, y, X_test, y_test, cfg, standardize=False, block=(0, 1)):
    """Check shapes and (in `block`, see rows_of) values, hold out a test split if needed, set dtypes and the task."""
    _check_pair(X, y, "X", "y", name, block)
    if X_test is None:
        X, y, X_test, y_test = _hold_out(X, y, cfg.test_fraction, cfg.seed, name)
    else:
        _check_pair(X_test, y_test, "X_test", "y_test", name, block)
        if X_test.shape[1:] != X.shape[1:]:
            raise UsageError(f"{name}: X_test has sample shape {X_test.shape[1:]}, X has {X.shape[1:]}")
    task = "classification" if np.issubdtype(y.dtype, np.integer) else "regression"
    X, X_test = _as_float32(X), _as_float32(X_test)
    if task == "regression":
        y, y_test = y.astype(np.float32), y_test.astype(np.float32)
        if standardize:
            X, X_test = _standardize(X, X_test)
            y, y_test = _standardize(y, y_test)
        return from_arrays(name, X, y, X_test, y_test, task)
    y, y_test, num_classes = _labels(y, y_test, name)
    return from_arrays(name, X, y, X_test, y_test, task, num_classes)


def _check_pair(X, y, xname, yname, name, block):
    if len(X) == 0:
        raise UsageError(f"{name}: {xname} has no samples")
    if X.ndim < 2:
        raise UsageError(f"{name}: {xname} must have a sample axis and features, got shape {X.shape}")
    if y.ndim != 1 or len(y) != len(X):
        raise UsageError(f"{name}: {yname} must be 1-D with one target per row of {xname}; "
                         f"got {xname} {X.shape} and {yname} {y.shape}")
    if not (np.issubdtype(X.dtype, np.number) and np.issubdtype(y.dtype, np.number)):
        raise UsageError(f"{name}: {xname} and {yname} must be numeric, got {X.dtype} and {y.dtype}")
    for array, label in ((X, xname), (y, yname)):
        check_finite(array, rows_of(len(array), *block), f"{name}: {label}")


def rows_of(num_rows, rank, size):
    """Rank `rank`'s block of `size` contiguous, nearly equal blocks of range(num_rows).

    The blocks cover every row once, so when each rank checks its block and the
    ranks agree (agreement.agree), the whole file is checked, each rank paying
    for 1/size of it.
    """
    return range(num_rows * rank // size, num_rows * (rank + 1) // size)


_CHUNK_BYTES = 16 << 20  # values checked at a time: bounds the temporary, not the work


def check_finite(array, rows, what):
    """UsageError naming the first row of `rows` (a range) where `array` holds NaN or infinity.

    Reads only those rows, a chunk at a time (on a memory map: only their pages).
    """
    if not np.issubdtype(array.dtype, np.floating) or not rows or array.size == 0:
        return
    step = max(1, _CHUNK_BYTES // (array.size // len(array) * array.itemsize))
    for start in range(rows.start, rows.stop, step):
        chunk = read_rows(array, range(start, min(start + step, rows.stop)))
        finite = np.isfinite(chunk).reshape(len(chunk), -1).all(axis=1)
        if not finite.all():
            raise UsageError(f"{what} contains NaN or infinite values (row {start + int(np.argmin(finite))})")


def read_rows(array, rows):
    """array[rows], `rows` a range or ascending row numbers; a whole memory-mapped array by plain reads.

    os.pread is faster than faulting the pages in (0.84 s against 1.13 s for a 2 GiB block here),
    maps none into this rank (its RSS stays its own memory), and for scattered rows reads just those
    pages, where a page fault reads ahead around each (8 MiB on this machine's disk).
    """
    if not (isinstance(array, np.memmap) and isinstance(array.base, mmap.mmap) and array.flags.c_contiguous):
        return array[rows.start:rows.stop] if isinstance(rows, range) else array[rows]  # in memory, or a view
    row_bytes = array.nbytes // len(array)
    spans = [(rows.start, rows.stop)] if isinstance(rows, range) else [(r, r + 1) for r in rows.tolist()]
    with open(array.filename, "rb", buffering=0) as f:
        data = b"".join(os.pread(f.fileno(), (stop - start) * row_bytes, array.offset + start * row_bytes)
                        for start, stop in spans)
    return np.frombuffer(data, array.dtype).reshape(-1, *array.shape[1:])


def held_out(n, fraction, seed, name, hint=""):
    """(train, test) sorted sample indices: a seeded `fraction` of range(n) held out for testing."""
    n_test = int(round(n * fraction))
    if n_test < 1 or n_test >= n:
        raise UsageError(f"{name}: {n} samples cannot be split with --test-fraction {fraction}{hint}")
    order = rng(seed, "test-split").permutation(n)
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def _hold_out(X, y, fraction, seed, name):
    train, test = held_out(len(X), fraction, seed, name)
    return X[train], y[train], X[test], y[test]


def _labels(y, y_test, name):
    classes = np.unique(np.concatenate([y, y_test]))
    if len(classes) < 2:
        raise UsageError(f"{name}: classification needs at least 2 classes, found {len(classes)}")
    if len(classes) > 2 and len(classes) > len(y) / 2:
        raise UsageError(f"{name}: integer targets mean classification, but {len(classes)} classes for "
                         f"{len(y)} training samples looks like regression; store the target as "
                         f"floating point (e.g. 3.0) to train a regression")
    if classes[0] == 0 and classes[-1] == len(classes) - 1:
        return y.astype(np.int64, copy=False), y_test.astype(np.int64, copy=False), len(classes)
    return np.searchsorted(classes, y), np.searchsorted(classes, y_test), len(classes)


def _as_float32(X):
    """float32 without copying when it already is (keeps memory maps mapped)."""
    return X if X.dtype == np.float32 else X.astype(np.float32)


def _standardize(train, test):
    mean, std = train.mean(axis=0), train.std(axis=0)
    std = np.where(std > 0, std, 1.0).astype(np.float32)
    return (train - mean) / std, (test - mean) / std


def _read_npz(path):
    try:
        members = _map_npz(path)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise UsageError(f"--dataset {path}: not a readable .npz file ({e})")
    missing = [k for k in ("X", "y") if k not in members]
    if missing:
        raise UsageError(f"--dataset {path}: missing array(s) {', '.join(missing)}; "
                         f"found {', '.join(sorted(members)) or 'none'}")
    if ("X_test" in members) != ("y_test" in members):
        raise UsageError(f"--dataset {path}: give both X_test and y_test, or neither")
    return (members["X"], members["y"], members.get("X_test"), members.get("y_test"),
            _npz_checksums(path, [f"{k}.npy" for k in ("X", "y", "X_test", "y_test") if k in members]))


def _npz_checksums(path, names):
    """The CRC-32 and size of each named member, from the zip's central directory.

    A zip records the CRC-32 of every member's whole content when it is written
    (np.savez does), so this digest of all the data costs no data read. It
    describes the file as written: a file changed in place afterwards keeps its
    old checksums (agreement.data_fingerprint's sampled rows look at the values).
    """
    with zipfile.ZipFile(path) as archive:
        return " ".join(f"{n}:{archive.getinfo(n).CRC:08x}:{archive.getinfo(n).file_size}" for n in names)


def _map_npz(path):
    """The arrays of an .npz; stored (uncompressed) members are memory-mapped, not read.

    numpy ignores mmap_mode for .npz archives, so this finds each member's data
    inside the zip and maps it with np.memmap; compressed members are loaded.
    """
    arrays = {}
    with zipfile.ZipFile(path) as archive, open(path, "rb") as raw:
        for info in archive.infolist():
            if not info.filename.endswith(".npy"):
                continue
            key = info.filename[:-4]
            if info.compress_type != zipfile.ZIP_STORED:
                with archive.open(info) as member:
                    arrays[key] = np.lib.format.read_array(member, allow_pickle=False)
                continue
            arrays[key] = _map_member(path, raw, info, key)
    return arrays


def _map_member(path, raw, info, key):
    """np.memmap over one stored .npy member, after checking it lies inside the member."""
    if info.flag_bits & 0x1:
        raise ValueError(f"member {info.filename} is encrypted")
    raw.seek(info.header_offset)
    local = raw.read(30)
    name_len, extra_len = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
    start = info.header_offset + 30 + name_len + extra_len
    raw.seek(start)
    version = np.lib.format.read_magic(raw)
    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                   else np.lib.format.read_array_header_2_0)
    shape, fortran, dtype = read_header(raw)
    if dtype.hasobject:
        raise ValueError(f"array {key!r} holds Python objects")
    offset = raw.tell()
    if offset - start + int(np.prod(shape)) * dtype.itemsize > info.file_size:
        raise ValueError(f"array {key!r} is shorter than its header says")
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


def _read_csv(path, target):
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: tolerate a BOM
            reader = csv.reader(f)
            numbered = [(reader.line_num, row) for row in reader if any(cell.strip() for cell in row)]
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--dataset {path}: cannot read ({e})")
    if len(numbered) < 3:
        raise UsageError(f"--dataset {path}: needs a header row and at least 2 data rows")
    header = [h.strip() for h in numbered[0][1]]
    lines, body = [n for n, _ in numbered[1:]], [row for _, row in numbered[1:]]
    if target is None:
        column = len(header) - 1
    elif target in header:
        column = header.index(target)
    else:
        raise UsageError(f"--target {target!r} is not a column of {path}; columns: {', '.join(header)}")
    for line, row in zip(lines, body):
        if len(row) != len(header):
            raise UsageError(f"--dataset {path}: line {line} has {len(row)} fields, header has {len(header)}")
    values = _parse_floats(body, lines, path)
    features = np.delete(values, column, axis=1)
    if features.shape[1] == 0:
        raise UsageError(f"--dataset {path}: no feature columns besides the target")
    y_text = [row[column].strip() for row in body]
    y = values[:, column]
    if all(_is_int(v) for v in y_text):
        y = y.astype(np.int64)
    with open(path, "rb") as f:  # parsed whole on every rank anyway: its checksum costs less than that
        source = "csv:%08x" % zlib.crc32(f.read())
    return features, y, None, None, source


def _parse_floats(body, lines, path):
    try:
        return np.array(body, dtype=np.float64)
    except ValueError:
        for line, row in zip(lines, body):
            for value in row:
                try:
                    float(value)
                except ValueError:
                    raise UsageError(f"--dataset {path}: line {line}: {value!r} is not a number")
        raise


def _is_int(text):
    try:
        int(text)
        return True
    except ValueError:
        return False
