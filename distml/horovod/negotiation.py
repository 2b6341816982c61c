"""Before every collective the ranks check that they are about to make the same one.

Horovod negotiates each tensor by name in a background thread; distml issues
collectives in program order and checks them instead: each rank encodes its
operation (kind, dtype, shape, name, root, op, scale factors) in a few int64
values, and one Allreduce(MAX) of the values and their negatives gives every
rank the maximum and the minimum of each. Where they differ, or any rank
found a local error (a root that does not exist), every rank raises the same
error instead of starting a collective that would hang or reduce garbage. The
cost is one 240-byte Allreduce per operation.

One difference is allowed: Horovod lets a barrier pass operations that not
every rank has made yet, so where some ranks are in `barrier()` and the
others make operations that may wait (`_async` calls), the outcome says
`wait`: those park their operation and go on, the barrier ranks negotiate
again.

The same exchange serves `join()`: a rank that has joined sends the minimum
int64 (which changes no maximum) and learns from the others what they are
reducing, so it can take part with zeros. Another operation than allreduce or
barrier after a join raises on the ranks that make it; the joined ranks wait
on, as in Horovod.
"""
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from ..agreement import everywhere
from .basics import HorovodInternalError

__all__ = ["Kind", "Operation", "Outcome", "negotiate", "DTYPES"]

DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16, torch.bfloat16,
          torch.float32, torch.float64, torch.bool)
_NONE = np.iinfo(np.int64).min  # a joined rank's value: no effect on a maximum


def _crc(text):
    return zlib.crc32(text.encode())


class Kind:
    ALLREDUCE, ALLGATHER, BROADCAST, ALLTOALL, REDUCESCATTER, BARRIER = range(1, 7)
    NAMES = {1: "allreduce", 2: "allgather", 3: "broadcast", 4: "alltoall", 5: "reducescatter", 6: "barrier"}


@dataclass
class Operation:
    """What one rank is about to do: the fields every rank must agree on."""
    kind: int
    dtype: torch.dtype = None
    shape: tuple = ()          # what must match (allgather/alltoall: without the first dimension)
    numel: int = 0             # elements this rank reduces (what a joined rank must contribute)
    name: str = None
    root: int = -1
    op: int = -1
    scale: tuple = (1.0, 1.0)
    blocking: bool = False     # a blocking MPI call (which only a blocking call may match)

    def fields(self):
        dtype = DTYPES.index(self.dtype) if self.dtype in DTYPES else -1
        scale = zlib.crc32(struct.pack("dd", *self.scale))
        return [self.kind, dtype, self.numel, _crc(repr(tuple(self.shape))), _crc(self.name or ""),
                self.root, self.op, scale, int(self.blocking)]

    def describe(self):
        what = Kind.NAMES[self.kind]
        if self.dtype is not None:
            what += f" of {str(self.dtype).replace('torch.', '')} {list(self.shape)}"
        if self.name:
            what += f" named {self.name!r}"
        if self.root >= 0:
            what += f" from root {self.root}"
        return what


_FIELDS = len(Operation(0).fields())


@dataclass
class Outcome:
    kind: int = 0           # what the ranks that have not joined are doing
    dtype: torch.dtype = None
    numel: int = 0
    op: int = -1
    blocking: bool = False
    wait: bool = False       # some ranks are in barrier(), the others may park their operation
    refused: bool = False    # the others' operation is not allowed after a join (they raise)
    all_joined: bool = False
    last_joined: int = -1   # the highest rank among those whose join completed the set


def negotiate(comm, operation, *, error=None, joined=False, first_join_round=False, may_wait=False):
    """Check that every rank makes `operation`; raise on every rank if not. Returns the Outcome.

    error: this rank's own objection (a message), raised everywhere.
    joined: this rank has joined (operation is None): it learns what the others do.
    may_wait: `operation` may be parked while other ranks are in barrier().
    """
    if comm.size == 1:
        if error:
            raise everywhere(ValueError(error))
        if joined:
            return Outcome(all_joined=True, last_joined=comm.rank)
        return Outcome(operation.kind, operation.dtype, operation.numel, operation.op, operation.blocking)
    local = [_NONE] * _FIELDS if joined else operation.fields()
    flags = _flags(operation, error, joined, first_join_round, may_wait, comm.rank)
    negated = [_NONE] * _FIELDS if joined else [-v for v in local]  # a joined rank's: no effect either
    both = np.array(local + flags + negated + [-f for f in flags], dtype=np.int64)  # numpy: cheaper than torch
    comm.allreduce_max_(torch.from_numpy(both), what="negotiation")
    values = both.tolist()
    high, low = values[:_FIELDS + _FLAGS], [-v for v in values[_FIELDS + _FLAGS:]]
    any_error, any_joined, last_joined, any_barrier, any_other, _ = high[_FIELDS:]
    all_joined, all_may_wait = low[_FIELDS + 1], low[_FIELDS + 5]
    if all_joined:
        return Outcome(all_joined=True, last_joined=last_joined)
    if any_barrier and any_other and all_may_wait and not any_error:
        return Outcome(wait=True)
    kind = high[0]
    mismatch = high[:_FIELDS] != low[:_FIELDS]
    unsupported = any_joined and kind not in (Kind.ALLREDUCE, Kind.BARRIER)
    if any_error or mismatch or unsupported:
        _raise_everywhere(comm, operation, error, joined, unsupported and not (any_error or mismatch))
        return Outcome(refused=True)  # only a joined rank gets here: it stays in join(), as in Horovod
    dtype = DTYPES[high[1]] if 0 <= high[1] < len(DTYPES) else None
    return Outcome(kind, dtype, high[2], high[6], bool(high[8]))


def _flags(operation, error, joined, first_join_round, may_wait, rank):
    """[error, joined, rank if first join round, in barrier, in another call, may wait] as 0/1 (or rank)."""
    barrier = not joined and operation.kind == Kind.BARRIER
    return [1 if error else 0, 1 if joined else 0, rank if first_join_round else -1, int(barrier),
            int(not joined and not barrier), int(joined or barrier or may_wait)]


_FLAGS = len(_flags(Operation(0), None, False, False, False, 0))


def _raise_everywhere(comm, operation, error, joined, join_refused):
    """Gather every rank's view (rare, so pickled) and raise one error naming the ranks.

    Where only a join refuses the others' call, a joined rank returns instead.
    """
    mine = ("joined", None) if joined else (operation.describe(), error)
    views = comm.allgather_object(mine)
    errors = [(r, e) for r, (_, e) in enumerate(views) if e]
    if errors and len({e for _, e in errors}) == 1 and len(errors) == comm.size:
        raise everywhere(ValueError(errors[0][1]))
    if errors:
        lines = "; ".join(f"rank {r}: {e}" for r, e in errors)
        raise everywhere(HorovodInternalError(f"{lines} (every rank raises this)"))
    kinds = sorted({d for d, _ in views if d != "joined"})
    if join_refused:
        if joined:
            return  # only the ranks that made the call raise
        raise HorovodInternalError(
            f"{kinds[0].split()[0]} is not supported after a rank called join(): only allreduce and barrier are")
    listing = "; ".join(f"rank {r}: {d}" for r, (d, _) in enumerate(views))
    raise everywhere(HorovodInternalError(
        f"ranks disagree on a collective operation: {listing}. Every rank must make the same calls in the same "
        "order with the same dtypes, shapes, names, ops and root (distml matches operations by their order, "
        "not by name)"))
