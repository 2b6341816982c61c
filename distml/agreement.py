"""Set-up steps that every rank must pass, or fail, together.

Before training, each rank runs the same set-up on its own files. If one rank
fails (a file missing on one host) or sees something different (another
config or data file), the others must not go on into a collective and wait
forever: these helpers turn every such case into the same error on all ranks.
"""
import dataclasses
import zlib

import numpy as np

from .config import UsageError
from .data import read_rows
from .sharding import rng

__all__ = ["RankFailure", "agree", "check_same", "fingerprint", "data_fingerprint", "sample_rows"]

_RANK_LOCAL_FIELDS = ("save_model", "metrics", "quiet", "config", "threads", "checkpoint_dir", "resume")


class RankFailure(Exception):
    """An unexpected error during set-up on `rank`, re-raised on every rank."""

    def __init__(self, rank, message):
        super().__init__(f"rank {rank}: {message}")
        self.rank, self.message = rank, message


def agree(comm, fn):
    """Run `fn` on every rank; an error on any rank is raised on all of them.

    UsageError stays UsageError (exit 2); SystemExit alike on every rank (--help,
    --version) stays SystemExit; anything else becomes RankFailure.
    """
    error, value = None, None
    try:
        value = fn()
    except UsageError as e:
        error = ("usage", str(e))
    except SystemExit as e:
        error = ("exit", e.code if e.code is None or isinstance(e.code, int) else str(e.code))
    except Exception as e:  # noqa: BLE001  (reported on every rank below)
        error = ("crash", f"{type(e).__name__}: {e}")
    errors = comm.allgather_object(error)
    failed = [(rank, e) for rank, e in enumerate(errors) if e is not None]
    if not failed:
        return value
    rank, (kind, message) = failed[0]
    alike = len(failed) == comm.size and len(set(errors)) == 1
    if kind == "exit" and alike:
        raise SystemExit(message)
    if kind != "usage":
        raise everywhere(RankFailure(rank, message if kind == "crash" else f"SystemExit: {message}"))
    raise everywhere(UsageError(message if alike else f"rank {rank}: {message}"))


def everywhere(error):
    """Mark an error every rank raises alike, so that one rank reports it (api.aborting_excepthook)."""
    error.everywhere = True
    return error


def check_same(comm, what, value):
    """Raise UsageError on every rank unless `value` (a short string) is equal on all ranks."""
    values = comm.allgather_object(value)
    odd = [rank for rank, v in enumerate(values) if v != values[0]]
    if odd:
        raise everywhere(UsageError(f"ranks disagree on {what}: rank {odd[0]} differs from rank 0 "
                                f"(every rank must see the same flags, config and data files)"))


def fingerprint(cfg, dataset, model, salt=0):
    """A short digest of what must be identical on every rank: settings, data, model shapes.

    `salt`: which rows of the data are sampled (data_fingerprint); the same on every rank.
    """
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _RANK_LOCAL_FIELDS}
    settings["checkpoints"] = cfg.checkpoint_dir is not None  # where they go is root's; whether, everyone's
    parts = [repr(sorted(settings.items())), data_fingerprint(dataset, salt),
             repr([tuple(p.shape) for p in model.parameters()])]
    return "%08x" % zlib.crc32("|".join(parts).encode())


def data_fingerprint(dataset, salt=0, *, samples=4096):
    """A short digest of the data: task, shapes, dtypes, the file's checksums, and sampled rows.

    Costs O(samples) rows whatever the file's size, and catches a difference
    anywhere in two ways:

    - `dataset.source`: an .npz's zip records the CRC-32 of each member's whole
      content when written, so two files written with different values differ
      here (a CRC-32 misses a random change with probability 2**-32, and no
      change confined to 32 consecutive bits), at no read at all. A .csv's
      checksum is of its bytes.
    - Sampled rows, for what the checksums cannot see (a file changed after it
      was written; built-in sets): each array's rows are cut into `samples`
      equal strata and one row is drawn in each (generator seeded by `salt`).
      A run of changed rows at least two strata long (2 n / samples rows)
      always contains a whole stratum, so it is always caught. Changed rows
      anywhere, a fraction f of all, are missed with probability
      prod_j (1 - f_j) <= (1 - f) ** samples <= exp(-f * samples) (f_j: the
      changed fraction of stratum j, averaging f): 1.7% at f = 0.1%, below
      1e-17 at f = 1%. An array of at most `samples` rows is hashed whole.
      The rows are read with data.read_rows: a page fault would read ahead
      around each (8 MiB here), pulling in the whole file.

    The trainer draws `salt` afresh at each launch (agreed by every rank), so a
    difference the sample missed once is drawn for again the next time;
    checkpoints use salt 0, so their fingerprint is a function of the data alone.
    """
    parts = [dataset.task, str(dataset.num_classes), dataset.source]
    for split in (dataset.train, dataset.test):
        if hasattr(split, "X"):  # arrays
            for array in (split.X, split.y):
                rows = sample_rows(len(array), samples, salt)
                sample = np.ascontiguousarray(array if rows is None else read_rows(array, rows))
                parts += [str(array.shape), str(array.dtype), "%08x" % zlib.crc32(sample.tobytes())]
        else:  # a Dataset of items: each may cost a file read, so fewer are sampled
            parts.append(str(len(split)))
            rows = sample_rows(len(split), samples // 64, salt)
            x, y = split.batch(np.arange(len(split)) if rows is None else rows)  # items seeded: the same everywhere
            parts += [f"{x.dtype}{tuple(x.shape)}", "%08x" % zlib.crc32(x.contiguous().numpy().tobytes()),
                      f"{y.dtype}{tuple(y.shape)}", "%08x" % zlib.crc32(y.contiguous().numpy().tobytes())]
    return "%08x" % zlib.crc32("|".join(parts).encode())


def sample_rows(num_rows, samples, salt):
    """One row drawn in each of `samples` equal strata of range(num_rows), ascending; None (all rows)
    when there are no more rows than samples."""
    if num_rows <= samples:
        return None
    starts = np.arange(samples + 1, dtype=np.int64) * num_rows // samples
    drawn = rng(salt, "data-fingerprint").random(samples)
    return starts[:-1] + (drawn * np.diff(starts)).astype(np.int64)
