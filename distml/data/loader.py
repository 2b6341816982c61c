"""A rank's batches, from its lists of sample indices: made here, or ahead by loading workers.

`--data-workers N` gives each rank N worker processes (torch's DataLoader) that
collate the next batches while the rank computes. How they start matters under
MPI: Open MPI is not fork-safe ("may hang, crash, or produce silent data
corruption"), and a worker that imports mpi4py would initialise MPI and abort
under mpirun. So the workers come from a forkserver (a fresh interpreter
started with exec, never a fork of this MPI process), and everything they
start under has MPI4PY_RC_INITIALIZE=0: a dataset module that imports distml
or mpi4py still works, without MPI. The workers live as long as the Loader;
which batch comes next travels with its indices, the epoch (for data sets
whose items vary by epoch) and a seed for the batch, so a batch is the same
whatever N is, and no random number is drawn from this process's generators
for them.

A user's Dataset class defined in a FILE.py reaches the workers by name: the
file is imported there again before the data set is unpickled.
"""
import contextlib
import multiprocessing
import os
import pickle
import random
import zlib

import numpy as np
import torch

from ..sharding import rng
from ..userfn import FILES, import_file

__all__ = ["Loader", "seeded", "check_picklable"]


class Loader:
    """Batches of `split` (an ArraySplit or ItemSplit) for index lists the caller names.

    `get(key, epoch, lists, position)` returns lists[position]'s (inputs, targets). Calls that walk a
    stream `key` in order are served by the workers' prefetching; a jump (a resume, a new stream)
    restarts the stream there. `calls`: a CallRecord whose context names a wait for the workers
    (the hang doctor's report).

    Every batch is made with torch's, numpy's and random's generators seeded from (seed, key,
    epoch, position) (see `seeded`), so an item's random augmentation is the same whichever
    process makes it, and a resumed run makes it again. The split is a private copy: its
    set_epoch() reaches neither the test split (which may share the user's Dataset) nor what
    the data fingerprint reads.
    """

    def __init__(self, split, workers=0, *, seed=0, calls=None):
        self.workers, self.seed, self.calls = workers, seed, calls
        self.batches = _Batches(split.detached() if hasattr(split, "detached") else split)
        self._loader = self._stream = None

    def start(self):
        """Start the workers now (set-up), not at the first batch (whose time they would count in)."""
        if self.workers and self._loader is None:
            self._start(None, [])

    def get(self, key, epoch, lists, position):
        at = (key, epoch, position)
        if not self.workers:
            return self.batches[self._item(at, lists[position])]
        if self._stream is None or self._stream[0] != at:
            self._start(at, [self._item((key, epoch, p), lists[p]) for p in range(position, len(lists))])
        at, batches = self._stream
        self._stream = ((key, epoch, position + 1), batches)
        context = self.calls.context if self.calls else None
        if self.calls:
            self.calls.context = f"{context}, waiting for its data-loading workers"
        try:
            return next(batches)
        finally:
            if self.calls:
                self.calls.context = context

    def _item(self, at, indices):
        """What a worker is sent for one batch: (epoch, indices, the batch's seed)."""
        return at[1], indices, int(rng(self.seed, "batch", zlib.crc32(repr(at[0]).encode()), *at[1:]).integers(2**63))

    def _start(self, at, items):
        if self._loader is None:
            self._schedule = _Schedule()
            self._loader = torch.utils.data.DataLoader(
                self.batches, sampler=self._schedule, batch_size=None, collate_fn=_as_is,
                num_workers=self.workers, persistent_workers=True, prefetch_factor=2,
                multiprocessing_context=_context(), generator=torch.Generator().manual_seed(0))
        self._schedule.items = items
        with _without_mpi():
            self._stream = (at, iter(self._loader))

    def close(self):
        """Stop the workers (they also stop with this process)."""
        if self._loader is not None and getattr(self._loader, "_iterator", None) is not None:
            self._loader._iterator._shutdown_workers()
        self._loader = self._stream = None


@contextlib.contextmanager
def seeded(seed):
    """torch's (CPU), numpy's and random's global generators seeded from `seed` inside; restored after."""
    numpy_state, python_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)
        try:
            yield
        finally:
            np.random.set_state(numpy_state)
            random.setstate(python_state)


class _Schedule(torch.utils.data.Sampler):
    """The (epoch, indices, seed) of the batches to load next; replaced before each stream starts."""

    def __init__(self):
        self.items = []

    def __iter__(self):
        return iter(list(self.items))

    def __len__(self):
        return len(self.items)


class _Batches(torch.utils.data.Dataset):
    """What a worker holds: the split, indexed by (epoch, indices) -> one collated batch."""

    def __init__(self, split):
        self.split, self.epoch = split, None

    def __getitem__(self, item):
        epoch, indices, seed = item
        if epoch != self.epoch and hasattr(self.split, "set_epoch"):
            self.split.set_epoch(epoch)
            self.epoch = epoch
        if getattr(self.split, "deterministic", False):  # arrays: no augmentation to seed (0.2 ms saved)
            return self.split.batch(indices)
        with seeded(seed):
            return self.split.batch(indices)

    def __len__(self):
        return len(self.split)

    def __getstate__(self):
        return {"files": dict(FILES), "split": pickle.dumps(self.split)}

    def __setstate__(self, state):
        for path in state["files"].values():  # the user's FILE.py modules, by the names their classes carry
            import_file(path)
        self.split, self.epoch = pickle.loads(state["split"]), None


def _as_is(batch):
    return batch


def _context():
    """A forkserver context whose server preloads torch (workers fork from it with torch imported)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "numpy"])
    return context


@contextlib.contextmanager
def _without_mpi():
    """Processes started in here (the forkserver, its workers) do not initialise MPI on importing mpi4py."""
    before = os.environ.get("MPI4PY_RC_INITIALIZE")
    os.environ["MPI4PY_RC_INITIALIZE"] = "false"
    try:
        yield
    finally:
        if before is None:
            del os.environ["MPI4PY_RC_INITIALIZE"]
        else:
            os.environ["MPI4PY_RC_INITIALIZE"] = before


def check_picklable(split):
    """UsageError unless `split` can be sent to loading workers (its Dataset pickles)."""
    from ..config import UsageError
    try:
        pickle.dumps(_Batches(split))
    except Exception as e:
        raise UsageError(f"--data-workers: the Dataset cannot be sent to loading workers ({type(e).__name__}: {e}); "
                         f"define its class and functions at module level (no lambdas or local functions), or "
                         f"use --data-workers 0")
