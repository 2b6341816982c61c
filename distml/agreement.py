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

__all__ = ["RankFailure", "agree", "check_same", "fingerprint", "data_fingerprint"]

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
    everywhere = len(failed) == comm.size and len(set(errors)) == 1
    if kind == "exit" and everywhere:
        raise SystemExit(message)
    if kind != "usage":
        raise RankFailure(rank, message if kind == "crash" else f"SystemExit: {message}")
    raise UsageError(message if everywhere else f"rank {rank}: {message}")


def check_same(comm, what, value):
    """Raise UsageError on every rank unless `value` (a short string) is equal on all ranks."""
    values = comm.allgather_object(value)
    odd = [rank for rank, v in enumerate(values) if v != values[0]]
    if odd:
        raise UsageError(f"ranks disagree on {what}: rank {odd[0]} differs from rank 0 "
                         f"(every rank must see the same flags, config and data files)")


def fingerprint(cfg, dataset, model):
    """A short digest of what must be identical on every rank: settings, data, model shapes."""
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _RANK_LOCAL_FIELDS}
    settings["checkpoints"] = cfg.checkpoint_dir is not None  # where they go is root's; whether, everyone's
    parts = [repr(sorted(settings.items())), data_fingerprint(dataset),
             repr([tuple(p.shape) for p in model.parameters()])]
    return "%08x" % zlib.crc32("|".join(parts).encode())


def data_fingerprint(dataset):
    """A short digest of the data's task, shapes and first and last rows (cheap for memory-mapped files)."""
    parts = [dataset.task, str(dataset.num_classes)]
    for array in (dataset.X_train, dataset.y_train, dataset.X_test, dataset.y_test):
        parts += [str(array.shape), str(array.dtype), _sample_crc(array)]
    return "%08x" % zlib.crc32("|".join(parts).encode())


def _sample_crc(array, rows=64):
    """crc32 of the first and last rows: cheap even for a memory-mapped file."""
    head, tail = np.ascontiguousarray(array[:rows]), np.ascontiguousarray(array[-rows:])
    return "%08x" % zlib.crc32(head.tobytes() + tail.tobytes())
