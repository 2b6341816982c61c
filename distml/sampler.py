"""Data for your own loop: this rank's part of each global batch, for torch's DataLoader, and of a token stream.

    sampler = distml.ShardSampler(train_set, 32, seed=0)     # 32 per rank; global batch 32 x ranks
    loader = distml.DataLoader(train_set, batch_sampler=sampler, num_workers=2)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for x, y in loader:
            loss = loss_fn(model(x), y, reduction="sum") / sampler.global_size   # exact, also uneven

Each epoch a seeded permutation of all samples (the CLI's, independent of the
world size) is cut into global batches; the last may be partial and is kept,
split as evenly as possible. So N ranks x batch b train on exactly what 1 rank
x batch N*b does, and a checkpoint resumes on any world size with the same
global batch.
"""
import sys
import weakref

import numpy as np
import torch

from . import comm as _comm
from .sharding import rng

__all__ = ["ShardSampler", "Indices", "bptt_columns"]


class Indices(list):
    """A batch's sample indices, with the epoch and seed they were drawn for (distml.DataLoader seeds
    each item's random transforms from them)."""

    def __init__(self, indices, epoch, seed):
        super().__init__(indices)
        self.epoch, self.seed = epoch, seed

    def __reduce__(self):  # to a loading worker with its attributes
        return Indices, (list(self), self.epoch, self.seed)


class ShardSampler:
    """A batch sampler: this rank's sample indices of each global batch of `dataset` (or a length).

    `batch_size` per rank (global batch `batch_size` x ranks), or `global_batch`
    to split a fixed global batch over however many ranks there are. Each
    epoch a seeded permutation (the same on every rank, whatever their number)
    is cut into global batches; the last is kept and split as evenly as the
    others, and if it has fewer samples than there are ranks it joins the
    batch before it, so that no rank ever gets an empty batch (the same cuts,
    and so the same training, on every world size it does not reach; BatchNorm,
    which cannot train on one sample, may want `drop_last=True`: whole global
    batches only, on any world size).
    `set_epoch(e)` before each epoch, as torch's DistributedSampler. The place
    in the epoch is the number of batches the DataLoader has handed to your loop
    (not those its workers fetched ahead): `state_dict()` and the Checkpointer
    save it, and after `load_state_dict` the epoch saved continues from there.
    distml.DataLoader counts them itself; torch's is asked while its iterator
    lives, so with its workers save inside the loop, not after a `break`.
    `global_size`: the global batch size of the batch last handed to your loop.
    """

    def __init__(self, dataset, batch_size=None, *, shuffle=True, seed=0, global_batch=None, drop_last=False,
                 comm=None):
        world = comm or _comm.world()
        self.num_samples = dataset if isinstance(dataset, int) else len(dataset)
        if global_batch is None:
            if batch_size is None or batch_size < 1:
                raise ValueError(f"batch_size must be >= 1, got {batch_size}")
            global_batch = batch_size * world.size
        if global_batch < world.size:
            raise ValueError(f"a global batch of {global_batch} leaves some of the {world.size} ranks no sample")
        if self.num_samples < world.size:
            raise ValueError(f"{self.num_samples} samples leave some of the {world.size} ranks no sample")
        self.rank, self.size, self.global_batch = world.rank, world.size, global_batch
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        if drop_last and self.num_samples < global_batch:
            raise ValueError(f"drop_last: {self.num_samples} samples make no whole global batch of {global_batch}")
        self.epoch, self._resume = 0, None  # _resume: (epoch, step) to continue from
        self._start, self._handed, self._reader = 0, 0, None
        self._sizes, self._rng = [], None
        self.counted = None  # batches distml.DataLoader has handed to your loop in this pass

    def set_epoch(self, epoch):
        """Draw epoch `epoch`'s order; the epoch a loaded state saved continues where it stopped."""
        self.epoch = epoch
        self._start = self._resume[1] if self._resume and self._resume[0] == epoch else 0
        self._resume = None
        self._rng = torch.get_rng_state() if self._start else None  # see _indices
        self._handed, self._reader, self.counted = 0, None, None

    def _cuts(self):
        """Where the epoch's global batches start, and its end (drop_last: the last whole batch's);
        a last batch smaller than the world joins the one before it (the same cuts on any world
        size it does not reach)."""
        cuts = list(range(0, self.num_samples, self.global_batch)) + [self.num_samples]
        if self.drop_last and cuts[-1] - cuts[-2] < self.global_batch:
            del cuts[-1]
        elif len(cuts) > 2 and cuts[-1] - cuts[-2] < self.size:
            del cuts[-2]
        return cuts

    @property
    def steps_per_epoch(self):
        """Global batches in a whole epoch (len() counts those left in this one)."""
        return len(self._cuts()) - 1

    def _batches(self):
        """[(this rank's indices, the global batch size)] of the epoch."""
        order = (rng(self.seed, "shuffle", self.epoch).permutation(self.num_samples) if self.shuffle
                 else np.arange(self.num_samples))
        cuts = self._cuts()
        return [(np.array_split(order[a:b], self.size)[self.rank], b - a) for a, b in zip(cuts, cuts[1:])]

    def __iter__(self):
        caller = sys._getframe(1).f_locals.get("self")  # a DataLoader's iterator asks from its own method
        reader = isinstance(caller, torch.utils.data.dataloader._BaseDataLoaderIter)
        self._reader = weakref.ref(caller) if reader else None  # weak: it refers to this sampler
        batches = self._batches()[self._start:]
        self._sizes, self._handed, self.counted = [size for _, size in batches], 0, None
        return self._indices(batches)

    def _indices(self, batches):
        """The index lists; a pass that continues a saved epoch first puts back the torch RNG state
        set_epoch() found. A DataLoader's iterator draws its workers' base seed from that generator
        after asking for this iterator: the uninterrupted run drew it at the epoch's start, before
        the state the checkpoint saved, so drawn again on resuming it would shift every later draw
        (dropout masks)."""
        if self._rng is not None:
            torch.set_rng_state(self._rng)
            self._rng = None
        for indices, _ in batches:
            self._handed += 1
            yield Indices(indices.tolist(), self.epoch, self.seed)

    def __len__(self):
        """The batches left in this epoch (all of them, unless it continues a saved one)."""
        return self.steps_per_epoch - self._start

    def _taken(self):
        """Batches of this pass your loop has received: distml.DataLoader counts them (`counted`); torch's
        own, while its iterator lives, in `_num_yielded` (its workers fetch ahead); else those handed out."""
        if self.counted is not None:
            return self.counted
        reader = self._reader() if self._reader is not None else None
        return reader._num_yielded if reader is not None else self._handed

    @property
    def step(self):
        """Batches of this epoch your loop has had (the place a checkpoint saves)."""
        return self._start + self._taken()

    @property
    def global_size(self):
        """The global batch size of the batch your loop had last (divide a summed loss by it)."""
        taken = self._taken()
        if taken == 0:
            raise RuntimeError("ShardSampler.global_size: no batch of this epoch has been handed out yet")
        return self._sizes[taken - 1]

    def state_dict(self):
        return {"epoch": self.epoch, "step": self.step, "num_samples": self.num_samples,
                "global_batch": self.global_batch, "shuffle": self.shuffle, "seed": self.seed,
                "drop_last": self.drop_last, "steps_per_epoch": self.steps_per_epoch}

    def check_state(self, state):
        """ValueError unless this sampler can continue `state`: the data, global batch, shuffle and seed
        must be the saved ones (the world size may differ, where it cuts epochs alike)."""
        for key in ("num_samples", "global_batch", "shuffle", "seed", "drop_last", "steps_per_epoch"):
            if state[key] != getattr(self, key):
                raise ValueError(f"ShardSampler: the checkpoint was saved with {key} {state[key]}, this sampler "
                                 f"has {getattr(self, key)}" + _HINTS.get(key, ""))

    def load_state_dict(self, state):
        """Continue from `state`'s place at the next set_epoch(state["epoch"]) (see check_state)."""
        self.check_state(state)
        self._resume = (state["epoch"], state["step"])
        self.set_epoch(state["epoch"])
        self._resume = (state["epoch"], state["step"])


_HINTS = {"global_batch": " (its global batch is batch_size x ranks: pass global_batch= to keep it on another "
                          "world size)",
          "steps_per_epoch": " (an epoch's last global batch smaller than the number of ranks joins the one "
                             "before it: on this world size the epoch is cut otherwise)"}


def bptt_columns(tokens, batch_size, *, global_batch=None, comm=None):
    """This rank's columns of a token stream for truncated backpropagation through time.

    The stream is laid out as in a single process with `global_batch` columns
    (default batch_size x ranks): column c holds tokens[c*T:(c+1)*T] with
    T = len(tokens) // global_batch (the rest is dropped). Rank r takes columns
    r*b to (r+1)*b - 1, b = global_batch / ranks. Returns a (T, b) tensor: rows
    i..i+bptt are a step's inputs, as in PyTorch's word_language_model. Every
    rank holds as many tokens, so averaging the ranks' mean losses is exact.
    """
    world = comm or _comm.world()
    global_batch = global_batch or batch_size * world.size
    if global_batch % world.size:
        raise ValueError(f"bptt_columns: a global batch of {global_batch} columns does not split evenly over "
                         f"{world.size} ranks")
    length = len(tokens) // global_batch
    if length < 2:
        raise ValueError(f"bptt_columns: {len(tokens)} tokens make columns of {length} in {global_batch} columns")
    columns = torch.as_tensor(tokens)[:length * global_batch].view(global_batch, length).t()
    mine = global_batch // world.size
    return columns[:, world.rank * mine:(world.rank + 1) * mine].contiguous()
