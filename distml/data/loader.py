"""A rank's batches, from its lists of sample indices: made here, or ahead by loading workers.

`--data-workers N` gives each rank N worker processes (torch's DataLoader) that
collate the next batches while the rank computes. How they start matters under
MPI: Open MPI is not fork-safe ("may hang, crash, or produce silent data
corruption"), and a worker that imports mpi4py would initialise MPI and abort
under mpirun. So the workers come from a forkserver (a fresh interpreter
started with exec, never a fork of this MPI process), and everything they
start under has MPI4PY_RC_INITIALIZE=0: a dataset module that imports distml
or mpi4py still works, without MPI. The workers live as long as the Loader;
which batch comes next travels with its indices and the epoch (for data
sets whose items vary by epoch), so a batch is the same whatever N is.

A user's Dataset class defined in a FILE.py reaches the workers by name: the
file is imported there again before the data set is unpickled.
"""
import contextlib
import functools
import multiprocessing
import os
import pickle
import select
import signal
import threading
import time

import torch

from ..userfn import FILES, import_file
from .user import _generators_kept, _item_seed, _seed_generators

__all__ = ["Loader", "DataLoader", "check_picklable", "worker_start"]


class Loader:
    """Batches of `split` (an ArraySplit or ItemSplit) for index lists the caller names.

    `get(key, epoch, lists, position)` returns lists[position]'s (inputs, targets). Calls that walk a
    stream `key` in order are served by the workers' prefetching; a jump (a resume, a new stream)
    restarts the stream there. `calls`: a CallRecord whose context names a wait for the workers
    (the hang doctor's report).

    The split is a private copy where it has set_epoch (ItemSplit.detached): the epoch reaches
    neither the test split (which may share the user's Dataset) nor what the data fingerprint
    reads. Random augmentation is seeded per item by the split itself (ItemSplit.batch), so a
    batch is the same whichever process makes it.
    """

    def __init__(self, split, workers=0, *, calls=None):
        self.workers, self.calls = workers, calls
        self.batches = _Batches(split.detached() if hasattr(split, "detached") else split)
        self._loader = self._stream = None

    def start(self):
        """Start the workers now (set-up), not at the first batch (whose time they would count in)."""
        if self.workers and self._loader is None:
            self._start(None, [])

    def get(self, key, epoch, lists, position):
        at = (key, epoch, position)
        if not self.workers:
            return self.batches[epoch, lists[position]]
        if self._stream is None or self._stream[0] != at:
            self._start(at, [(epoch, lists[p]) for p in range(position, len(lists))])
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

    def _start(self, at, items):
        if self._loader is None:
            self._schedule = _Schedule()
            self._loader = torch.utils.data.DataLoader(
                self.batches, sampler=self._schedule, batch_size=None, collate_fn=_as_is,
                num_workers=self.workers, persistent_workers=True, prefetch_factor=2,
                multiprocessing_context=_context(), generator=torch.Generator().manual_seed(0),
                worker_init_fn=functools.partial(_end_with_rank, os.getpid()))
        self._schedule.items = items
        with worker_start():
            self._stream = (at, iter(self._loader))

    def close(self):
        """Stop the workers (they also stop with this process)."""
        if self._loader is not None and getattr(self._loader, "_iterator", None) is not None:
            self._loader._iterator._shutdown_workers()
        self._loader = self._stream = None


class _Schedule(torch.utils.data.Sampler):
    """The (epoch, indices) of the batches to load next; replaced before each stream starts."""

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
        epoch, indices = item
        if epoch != self.epoch and hasattr(self.split, "set_epoch"):
            self.split.set_epoch(epoch)
            self.epoch = epoch
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


def _end_with_rank(rank_pid, worker_id):
    """In a loading worker: block the stop signals; end as soon as the rank that started it is gone.

    torch's workers watch their parent, which here is the forkserver, and the forkserver waits
    for its children: after a SIGKILLed rank both would live on, holding the rank's stdout and
    stderr, and mpirun would wait for them forever. A thread waits on the rank's pidfd (Linux),
    or else checks every second that the rank is alive.
    """
    from ..signals import STOP_SIGNALS
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # where the forkserver was started by others
    try:
        pidfd = os.pidfd_open(rank_pid)
    except ProcessLookupError:
        os._exit(0)
    except (AttributeError, OSError):  # no pidfd here: poll
        pidfd = None
    threading.Thread(target=_wait_for_exit, args=(rank_pid, pidfd), daemon=True, name="distml-rank-watch").start()


def _wait_for_exit(pid, pidfd):
    if pidfd is not None:
        select.select([pidfd], [], [])
    else:
        while _alive(pid):
            time.sleep(1.0)
    os._exit(0)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _context():
    """A forkserver context whose server preloads torch (workers fork from it with torch imported)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "numpy"])
    return context


class DataLoader(torch.utils.data.DataLoader):
    """torch's DataLoader, its workers started safely under MPI (distml.DataLoader, for your own loop).

    With num_workers > 0 the workers come from a forkserver (never a fork of this
    MPI process), never initialise MPI, never see the stop signals that
    distml.stop_requested() catches (mpirun and SLURM signal a rank's whole
    process group), and end when their rank ends (even SIGKILLed). Your
    worker_init_fn, if any, runs after that.

    With a distml.ShardSampler, each item is read with torch's, numpy's and
    random's generators seeded from (seed, epoch, sample index), as `distml
    train` reads a Dataset: random transforms are then the same whichever
    rank, worker or resumed run reads the item. Neither they nor the
    iterator (whose workers' base seed torch draws from your loop's
    generator) move your loop's generators: its dropout masks are the same
    with any number of workers. A Dataset with `deterministic = True` is
    read as is.
    """

    def __init__(self, dataset, *args, num_workers=0, worker_init_fn=None, multiprocessing_context=None, **kwargs):
        if num_workers > 0:
            multiprocessing_context = multiprocessing_context or _context()
            worker_init_fn = functools.partial(_worker_init, os.getpid(), worker_init_fn)
        if not getattr(dataset, "deterministic", False) and not isinstance(dataset, torch.utils.data.IterableDataset):
            dataset = _SeededItems(dataset)
        if hasattr(kwargs.get("batch_sampler"), "check_state"):  # a ShardSampler: the workers' base seed from a
            kwargs.setdefault("generator", torch.Generator().manual_seed(0))  # generator of its own, not your loop's
        super().__init__(dataset, *args, num_workers=num_workers, worker_init_fn=worker_init_fn,
                         multiprocessing_context=multiprocessing_context, **kwargs)

    def __iter__(self):
        with worker_start():
            batches = super().__iter__()
        if hasattr(self.batch_sampler, "counted"):  # a ShardSampler: it learns how many batches your loop had
            return _counted(batches, self.batch_sampler)
        return batches


class _SeededItems(torch.utils.data.Dataset):
    """`dataset`, each item of a ShardSampler's batch read with the generators seeded for it."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return self.dataset[i]

    def __getitems__(self, indices):  # torch's fetcher reads a batch through this, where it is defined
        epoch = getattr(indices, "epoch", None)
        if epoch is None:  # not a ShardSampler's batch
            return [self.dataset[i] for i in indices]
        items = []
        with _generators_kept():
            for i in indices:
                _seed_generators(_item_seed(indices.seed, epoch, i))
                items.append(self.dataset[i])
        return items


def _counted(batches, sampler):
    """`batches`, each counted in `sampler.counted` as it reaches your loop (also when the loop breaks)."""
    sampler.counted = 0
    for batch in batches:
        sampler.counted += 1
        yield batch


def _worker_init(rank_pid, user_init, worker_id):
    _end_with_rank(rank_pid, worker_id)
    if user_init is not None:
        user_init(worker_id)


@contextlib.contextmanager
def worker_start():
    """Processes started in here (the forkserver, loading workers) do not initialise MPI and never get the
    stop signals: those stay blocked in them (a mask survives fork and exec), while this process gets
    any that arrive meanwhile as soon as the block ends here."""
    from ..signals import STOP_SIGNALS
    with _without_mpi():
        before = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, before)


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
