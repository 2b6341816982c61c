"""Data for your own loop: this rank's part of each global batch, for torch's DataLoader, and of a token stream.

    sampler = distml.ShardSampler(train_set, 32, seed=0)     # 32 per rank; global batch 32 x ranks
    loader = torch.utils.data.DataLoader(train_set, batch_sampler=sampler, num_workers=2)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for x, y in loader:
            loss = loss_fn(model(x), y, reduction="sum") / sampler.global_size   # exact, also uneven

The batches are `shard_batches`' (the CLI's): each epoch a seeded permutation
of all samples, independent of the world size, cut into global batches; the
last may be partial and is kept, split as evenly as possible. So N ranks x
batch b train on exactly what 1 rank x batch N*b does, and a checkpoint
resumes on any world size with the same global batch.
"""
import sys
import weakref

import torch

from . import comm as _comm
from .sharding import shard_batches

__all__ = ["ShardSampler", "bptt_columns"]


class ShardSampler:
    """A batch sampler: this rank's sample indices of each global batch of `dataset` (or a length).

    `batch_size` per rank (global batch `batch_size` x ranks), or `global_batch`
    to split a fixed global batch over however many ranks there are.
    `set_epoch(e)` before each epoch, as torch's DistributedSampler. The place
    in the epoch is the number of batches the DataLoader has handed to your loop
    (not those its workers fetched ahead): `state_dict()` and the Checkpointer
    save it, and after `load_state_dict` the epoch saved continues from there.
    `global_size`: the global batch size of the batch last handed to your loop.
    """

    def __init__(self, dataset, batch_size=None, *, shuffle=True, seed=0, global_batch=None, comm=None):
        world = comm or _comm.world()
        self.num_samples = dataset if isinstance(dataset, int) else len(dataset)
        if global_batch is None:
            if batch_size is None or batch_size < 1:
                raise ValueError(f"batch_size must be >= 1, got {batch_size}")
            global_batch = batch_size * world.size
        if global_batch < world.size:
            raise ValueError(f"a global batch of {global_batch} leaves some of the {world.size} ranks no sample")
        self.rank, self.size, self.global_batch = world.rank, world.size, global_batch
        self.shuffle, self.seed = shuffle, seed
        self.epoch, self._resume = 0, None  # _resume: (epoch, step) to continue from
        self._start, self._handed, self._reader = 0, 0, None
        self._sizes, self._rng = [], None

    def set_epoch(self, epoch):
        """Draw epoch `epoch`'s order; the epoch a loaded state saved continues where it stopped."""
        self.epoch = epoch
        self._start = self._resume[1] if self._resume and self._resume[0] == epoch else 0
        self._resume = None
        self._rng = torch.get_rng_state() if self._start else None  # see _indices
        self._handed, self._reader = 0, None

    def _batches(self):
        return shard_batches(self.num_samples, 1, epoch=self.epoch, seed=self.seed, rank=self.rank,
                             size=self.size, shuffle=self.shuffle, global_batch=self.global_batch)

    def __iter__(self):
        caller = sys._getframe(1).f_locals.get("self")  # a DataLoader's iterator asks from its own method
        reader = isinstance(caller, torch.utils.data.dataloader._BaseDataLoaderIter)
        self._reader = weakref.ref(caller) if reader else None
        batches = self._batches()[self._start:]
        self._sizes, self._handed = [b.global_size for b in batches], 0
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
        for batch in batches:
            self._handed += 1
            yield batch.indices.tolist()

    def __len__(self):
        """The batches left in this epoch (all of them, unless it continues a saved one)."""
        return len(self._batches()) - self._start

    def _taken(self):
        """Batches of this pass your loop has received: the DataLoader's count where a DataLoader reads
        this sampler (its workers fetch ahead), else those this sampler handed out."""
        reader = self._reader() if self._reader else None
        return getattr(reader, "_num_yielded", self._handed) if reader is not None else self._handed

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
                "global_batch": self.global_batch, "shuffle": self.shuffle, "seed": self.seed}

    def load_state_dict(self, state):
        """Continue from `state`'s place at the next set_epoch(state["epoch"]). The data, global batch,
        shuffle and seed must be the saved ones (the world size may differ)."""
        for key in ("num_samples", "global_batch", "shuffle", "seed"):
            if state[key] != getattr(self, key):
                raise ValueError(f"ShardSampler: the checkpoint was saved with {key} {state[key]}, this sampler "
                                 f"has {getattr(self, key)}" + (" (its global batch is batch_size x ranks: "
                                                                "pass global_batch= to keep it on another world "
                                                                "size)" if key == "global_batch" else ""))
        self._resume = (state["epoch"], state["step"])
        self.set_epoch(state["epoch"])
        self._resume = (state["epoch"], state["step"])


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
