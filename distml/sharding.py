"""Which samples each rank trains on, step by step.

Each epoch a seeded permutation of all samples (the same on every rank, and
independent of the world size) is cut into global batches of
`size * batch_size`; rank r takes its part of each. The last global batch may
be partial: it is split as evenly as possible and kept, not dropped. A rank
that gets no sample in it still joins the step with zero gradients. Losses
summed and divided by the global batch size, then summed over ranks, give
exactly the gradient of single-process training with batch `size * batch_size`.
"""
import zlib

import numpy as np

__all__ = ["rng", "Batch", "shard_batches"]


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
                  stream=()):
    """This rank's list of `Batch`es for `epoch` (rank and size default to the world's).

    `stream`: extra keys for the shuffling generator, for callers that need
    several independent orders (e.g. one per parameter-server worker).
    """
    if rank is None or size is None:
        from . import comm
        world = comm.world()
        rank, size = world.rank, world.size
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = rng(seed, "shuffle", epoch, *stream).permutation(num_samples) if shuffle else np.arange(num_samples)
    global_batch = size * batch_size
    batches = []
    for start in range(0, num_samples, global_batch):
        chunk = order[start:start + global_batch]
        batches.append(Batch(np.array_split(chunk, size)[rank], len(chunk)))
    return batches
