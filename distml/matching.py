"""Collectives that can never be matched with a different operation.

MPI does not check that the ranks' matched collectives agree: a rank in a
1-value Allreduce matched with another's 1M-value gradient Allreduce has its
buffer overwritten (a user's loop crashed with `malloc_consolidate(): invalid
chunk size`). Two rules keep the Python API safe:

- each purpose has its own communicator (`Comm.dup`): the calls of your loop
  (`distml.allreduce`, `barrier`, the Checkpointer's), each DistributedOptimizer's
  gradient reduction and its control messages. Calls of different purposes
  never match; a rank in one and another rank in the other wait, and the hang
  doctor reports both calls;
- on a communicator whose calls differ in size (your loop's), every call
  first reduces its signature, 16 bytes (`negotiate`): ranks in different
  calls all raise `CollectiveMismatch` naming each rank's call, before any
  payload moves. The gradient reduction needs none: its buckets are checked
  alike on every rank once, when the optimizer is made, and then every step
  repeats the same calls.
"""
import zlib

import torch

from .agreement import everywhere

__all__ = ["CollectiveMismatch", "negotiate"]


class CollectiveMismatch(RuntimeError):
    """The ranks entered different collectives on one communicator; raised on every rank alike."""


def negotiate(comm, call):
    """Check that every rank of `comm` is in the same `call` (a description such as
    "distml.allreduce(op=sum, float64 [3])"); CollectiveMismatch on every rank if not.

    One Allreduce (MAX) of (crc, -crc): the ranks agree exactly when max == -max(-crc).
    On a mismatch every rank is here, so a gather of the descriptions follows safely.
    """
    if comm.size == 1:
        return
    code = zlib.crc32(call.encode())
    header = torch.tensor([code, -code], dtype=torch.int64)
    comm.allreduce_max_(header, what=call)
    if header[0].item() == -header[1].item():
        return
    calls = comm.allgather_object(call)
    lines = "; ".join(f"rank {comm.members[r]}: {c}" for r, c in enumerate(calls))
    raise everywhere(CollectiveMismatch(f"the ranks called different collectives (on one rank this would have "
                                        f"corrupted memory; each rank's call: {lines})"))
