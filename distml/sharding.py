"""Which samples each rank trains on, step by step.

Each epoch a seeded permutation of all samples (the same on every rank, and
independent of the world size) is cut into global batches of
`size * batch_size`; rank r takes its part of each. The last global batch may
be partial: it is split as evenly as possible and kept, not dropped (one of a
single sample joins the batch before it). A rank that gets no sample in it
still joins the step with zero gradients. Losses
summed and divided by the global batch size, then summed over ranks, give
exactly the gradient of single-process training with batch `size * batch_size`.
"""
import zlib

import numpy as np

__all__ = ["rng", "Batch", "shard_batches", "num_steps"]


def rng(seed, purpose, *keys):
    """A numpy Generator derived from (seed, purpose, keys...), e.g. ("shuffle", epoch)."""
    return np.random.default_rng([seed, zlib.crc32(purpose.encode()), *keys])


class Batch:
    """This rank's sample indices for one step, and the global batch size they belong to."""

    __slots__ = ("indices", "global_size")

    def __init__(self, indices, global_size):
        self.indices = indices
        self.global_size = global_size

    def __repr__(self):
        return f"Batch({self.indices.tolist()}, global_size={self.global_size})"


def shard_batches(num_samples, batch_size, *, epoch, seed=0, rank=None, size=None, shuffle=True,
                  stream=(), global_batch=None):
    """This rank's list of `Batch`es for `epoch` (rank and size default to the world's).

    `stream`: extra keys for the shuffling generator, for callers that need
    several independent orders (e.g. one per parameter-server worker).
    `global_batch`: split global batches of this size (default size x batch_size)
    over the ranks: after a lost rank, the survivors keep the global batch.
    """
    if rank is None or size is None:
        from . import comm
        world = comm.world()
        rank, size = world.rank, world.size
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = rng(seed, "shuffle", epoch, *stream).permutation(num_samples) if shuffle else np.arange(num_samples)
    cuts = _cuts(num_samples, global_batch or size * batch_size)
    return [Batch(_split(order[a:b], size)[rank], b - a) for a, b in zip(cuts, cuts[1:])]


def num_steps(num_samples, global_batch):
    """Steps in an epoch of `num_samples` with global batches of `global_batch` (as shard_batches cuts)."""
    return len(_cuts(num_samples, global_batch)) - 1


def _cuts(num_samples, global_batch):
    """Where global batches start, and the end; a last batch of one sample joins the one before it
    (BatchNorm cannot train on one), unless every batch is of one sample."""
    cuts = list(range(0, num_samples, global_batch)) + [num_samples]
    if global_batch > 1 and len(cuts) > 2 and cuts[-1] - cuts[-2] == 1:
        del cuts[-2]
    return cuts


def _split(chunk, size):
    """`chunk` in `size` parts as even as possible, but no part of exactly one sample where avoidable.

    BatchNorm cannot train on one sample, so a small last batch (fewer than
    2 per rank) goes out in twos (one three) to the first ranks, the rest none.
    """
    if len(chunk) >= 2 * size or len(chunk) < 2:
        return np.array_split(chunk, size)
    pairs = len(chunk) // 2
    bounds = [2 * i for i in range(pairs)] + [len(chunk)] * (size - pairs + 1)
    return [chunk[a:b] for a, b in zip(bounds, bounds[1:])]
