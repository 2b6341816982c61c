"""Horovod's collectives on CPU tensors: names, signatures, defaults and handles as in `horovod.torch`.

Each call is checked against the other ranks first (`negotiation`), then
started as a nonblocking MPI collective on the tensor's own memory. The
`_async` forms return an integer handle for `poll()` and `synchronize()`,
which may be completed in any order; the others wait at once. `allreduce`,
`allgather`, `broadcast`, `alltoall` and `reducescatter` are differentiable
with Horovod's gradient formulas.
"""
import itertools
import warnings
from dataclasses import dataclass

import torch

from . import basics
from .basics import Adasum, Average, Max, Min, Product, Sum, global_process_set
from .compression import Compression
from .negotiation import DTYPES, Kind, Operation, negotiate

__all__ = ["allreduce", "allreduce_", "allreduce_async", "allreduce_async_", "grouped_allreduce",
           "grouped_allreduce_", "grouped_allreduce_async", "grouped_allreduce_async_", "allgather",
           "allgather_async", "grouped_allgather", "broadcast", "broadcast_", "broadcast_async",
           "broadcast_async_", "alltoall", "alltoall_async", "reducescatter", "reducescatter_async",
           "grouped_reducescatter", "grouped_reducescatter_async", "barrier", "join", "poll", "synchronize"]

_MPI_OP = {Average: "sum", Sum: "sum", Min: "min", Max: "max", Product: "prod"}


@dataclass
class _Pending:
    """An operation this rank has made: parked (`begin` set) until the others make it, then in flight."""
    operation: Operation
    begin: object             # comm -> (MPI requests, buffers MPI still reads or writes); None once started
    finish: object            # () -> the result synchronize() returns
    error: str = None         # this rank's objection, raised on every rank by the negotiation
    requests: list = ()       # assigned when it starts
    keep: list = ()


_pending = {}        # handle -> _Pending
_parked = []         # handles of operations waiting for ranks that were in barrier(), in call order
_names = {}          # name -> handle, for the names in flight
_handles = itertools.count(1)


def _reset():
    _pending.clear()
    _parked.clear()
    _names.clear()


def _comm():
    return basics._comm_checked()


def _start(operation, begin, finish, error=None, *, may_wait=False):
    """Register `operation` and start it once every rank makes it; returns its handle.

    may_wait (the `_async` calls): while other ranks are in barrier() the
    operation is parked, and starts at a later call on this rank, as Horovod
    lets a barrier pass operations not every rank has made yet.
    """
    if operation.name is not None and operation.name in _names:
        raise ValueError(f"Requested to {Kind.NAMES[operation.kind]} a tensor named {operation.name!r} while "
                         "another operation of that name is still in flight: synchronize() its handle first, "
                         "or use a different name")
    handle = next(_handles)
    _pending[handle] = _Pending(operation, begin, finish, error)
    if operation.name is not None:
        _names[operation.name] = handle
    may_wait = may_wait and error is None
    if _parked:  # it starts after them
        _parked.append(handle)
        _start_parked(until=handle, may_wait=may_wait)
    elif not _begin(handle, may_wait):
        _parked.append(handle)
    return handle


def _begin(handle, may_wait):
    """Negotiate and start one operation; False if it waits for ranks in barrier() (it is parked)."""
    pending = _pending[handle]
    try:
        if negotiate(_comm(), pending.operation, error=pending.error, may_wait=may_wait).wait:
            return False
        pending.requests, pending.keep = pending.begin(_comm())
    except BaseException:
        _drop_parked(handle)  # the ranks no longer agree on the order of what is parked
        raise
    pending.begin = None
    return True


def _start_parked(*, until=None, may_wait=True):
    """Start the parked operations in call order, up to `until`; False if they wait on."""
    while _parked:
        handle = _parked[0]
        if not _begin(handle, may_wait):
            return False
        _parked.pop(0)
        if handle == until:
            break
    return True


def _drop_parked(failed):
    for handle in dict.fromkeys([failed, *_parked]):
        _free_name(handle, _pending.pop(handle))
    _parked.clear()


def _free_name(handle, pending):
    name = pending.operation.name
    if name is not None and _names.get(name) == handle:
        del _names[name]


def poll(handle):
    """Whether the operation behind `handle` has completed (synchronize() will not block)."""
    pending = _pending.get(handle)
    if pending is None:
        return True
    if pending.begin is not None and not _start_parked(until=handle):
        return False
    done = all(_comm().test(r) for r in pending.requests)
    if done:
        _free_name(handle, pending)
    return done


def synchronize(handle):
    """Wait for the operation behind `handle`; returns its result (None for an unknown handle)."""
    pending = _pending.get(handle)
    if pending is None:
        return None
    if pending.begin is not None:
        _start_parked(until=handle, may_wait=False)  # the others must make it now, not after a barrier
    del _pending[handle]
    _free_name(handle, pending)
    for request in pending.requests:
        _comm().wait(request, what=f"synchronize({handle})")
    return pending.finish()


def _complete_started():
    """Wait for every operation started so far; their names are free again (results stay for synchronize())."""
    for handle, pending in list(_pending.items()):
        if pending.begin is None:
            for request in pending.requests:
                _comm().wait(request, what="barrier")
            pending.requests = []
            _free_name(handle, pending)


# -- checks every rank makes before it negotiates ------------------------------------------------------
def _tensor_error(tensor, process_set=global_process_set, *, in_place=False):
    """This rank's objection to `tensor` (a message), or None."""
    if not isinstance(tensor, torch.Tensor):
        return f"expected a torch.Tensor, got {type(tensor).__name__}"
    if tensor.device.type != "cpu":
        return (f"distml.horovod works on CPU tensors, got one on {tensor.device}: move it with .cpu() (and "
                "the result back with .to(device)), or use Horovod built with NCCL or PyTorch DDP for GPU training")
    if tensor.dtype not in DTYPES:
        return f"tensor type {tensor.dtype} is not supported"
    if in_place and not tensor.is_contiguous():
        return "Tensor is required to be contiguous."
    return basics._check_process_set(process_set)


def _op_error(op):
    if op == Adasum:
        return ("op=hvd.Adasum is not supported by distml.horovod: use op=hvd.Average (the default) or "
                "hvd.Sum; Adasum's adaptive summation needs Horovod's own implementation")
    return None if op in _MPI_OP else f"unknown reduction op {op!r}: use hvd.Average, Sum, Min, Max or Product"


def _reduce_op(op, average):
    """Horovod's `average=` (deprecated) and `op=` arguments as one op."""
    if op is not None:
        if average is not None:
            raise ValueError("The op parameter supersedes average. Please provide only one of them.")
        return op
    if average is not None:
        warnings.warn("Parameter `average` has been replaced with `op` and will be removed in v1.0",
                      DeprecationWarning)
        return Average if average else Sum
    return Average


def _scale_(tensor, factor):
    """tensor *= factor in place; integer tensors are truncated, as Horovod does."""
    if factor == 1.0:
        return tensor
    if tensor.dtype.is_floating_point:
        return tensor.mul_(factor)
    return tensor.copy_((tensor.double() * factor).trunc())


def _finish_reduction(tensor, op, postscale, size):
    """The scaling after a sum: the average's division and the postscale factor."""
    if op == Average and size > 1:
        if tensor.dtype.is_floating_point:
            tensor.div_(size)
        else:
            _scale_(tensor, 1.0 / size)
    return _scale_(tensor, postscale)


# -- allreduce ----------------------------------------------------------------------------------------
def _allreduce_start(tensor, name, op, prescale_factor, postscale_factor, process_set, *, in_place,
                     blocking=False):
    error = _tensor_error(tensor, process_set, in_place=in_place) or _op_error(op)
    if error is None and tensor.dtype == torch.bool:
        error = "allreduce of bool tensors is not supported: convert to torch.uint8"
    buffer = tensor if in_place or error else tensor.detach().clone(memory_format=torch.contiguous_format)
    shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else ()
    operation = Operation(Kind.ALLREDUCE, getattr(tensor, "dtype", None), shape,
                          getattr(tensor, "numel", lambda: 0)(), name, op=int(op),
                          scale=(prescale_factor, postscale_factor), blocking=blocking)

    def begin(comm):
        with torch.no_grad():
            _scale_(buffer, prescale_factor)
            if blocking:
                comm.allreduce_(buffer.detach(), _MPI_OP[op], what=name)
                return [], [buffer]
            return [comm.iallreduce_(buffer.detach(), _MPI_OP[op])], [buffer]

    def finish():
        with torch.no_grad():
            return _finish_reduction(buffer, op, postscale_factor, _comm().size)
    return _start(operation, begin, finish, error, may_wait=not blocking)


def allreduce_async_(tensor, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0,
                     process_set=global_process_set):
    """Start averaging (or summing, ...) `tensor` in place over all ranks; returns a handle."""
    op = _reduce_op(op, average)
    return _allreduce_start(tensor, name, op, prescale_factor, postscale_factor, process_set, in_place=True)


def allreduce_async(tensor, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0,
                    process_set=global_process_set):
    """Start reducing a copy of `tensor` (left unchanged); synchronize() returns the result."""
    op = _reduce_op(op, average)
    return _allreduce_start(tensor, name, op, prescale_factor, postscale_factor, process_set, in_place=False)


def allreduce_(tensor, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0,
               process_set=global_process_set):
    """Average (or sum, ...) `tensor` in place over all ranks; returns it.

    The synchronous forms make blocking MPI calls: a nonblocking collective and
    its wait cost more for small messages, and a blocking Allreduce sums in the
    order `distml.DistributedOptimizer`'s does.
    """
    return synchronize(_allreduce_start(tensor, name, _reduce_op(op, average), prescale_factor, postscale_factor,
                                        process_set, in_place=True, blocking=True))


class _Allreduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, average, name, op, prescale_factor, postscale_factor, process_set):
        ctx.args = (average, op, prescale_factor, postscale_factor, process_set)
        return synchronize(_allreduce_start(tensor, name, _reduce_op(op, average), prescale_factor,
                                            postscale_factor, process_set, in_place=False, blocking=True))

    @staticmethod
    def backward(ctx, grad_output):
        average, op, pre, post, process_set = ctx.args
        return (allreduce(grad_output, average=average, op=op, prescale_factor=pre, postscale_factor=post,
                          process_set=process_set), None, None, None, None, None, None)


def allreduce(tensor, average=None, name=None, compression=Compression.none, op=None, prescale_factor=1.0,
              postscale_factor=1.0, process_set=global_process_set):
    """The average (or sum, ...) of `tensor` over all ranks, as a new tensor; differentiable."""
    compressed, ctx = compression.compress(tensor)
    reduced = _Allreduce.apply(compressed, average, name, op, prescale_factor, postscale_factor, process_set)
    return compression.decompress(reduced, ctx)


# -- grouped allreduce: one fused buffer, one negotiation, one MPI call ----------------------------------
def _grouped_start(tensors, name, op, prescale_factor, postscale_factor, process_set, *, in_place,
                   blocking=False):
    tensors = list(tensors)
    error = next((e for e in (_tensor_error(t, process_set, in_place=in_place) for t in tensors) if e), None)
    error = error or _op_error(op) or ("grouped_allreduce needs at least one tensor" if not tensors else None)
    if error is None and len({t.dtype for t in tensors}) > 1:
        error = "grouped_allreduce needs tensors of one dtype: call it once per dtype"
    dtype = tensors[0].dtype if tensors and not error else None
    fused = torch.cat([t.detach().reshape(-1) for t in tensors]) if dtype is not None else torch.zeros(0)
    operation = Operation(Kind.ALLREDUCE, dtype, tuple(tuple(t.shape) for t in tensors) if dtype else (),
                          fused.numel(), name, op=int(op), scale=(prescale_factor, postscale_factor),
                          blocking=blocking)

    def begin(comm):
        _scale_(fused, prescale_factor)
        if blocking:
            comm.allreduce_(fused, _MPI_OP[op], what=name)
            return [], [fused]
        return [comm.iallreduce_(fused, _MPI_OP[op])], [fused]

    def finish():
        _finish_reduction(fused, op, postscale_factor, _comm().size)
        pieces = [piece.view_as(t) for piece, t in zip(fused.split([t.numel() for t in tensors]), tensors)]
        if not in_place:
            return pieces
        with torch.no_grad():
            for t, piece in zip(tensors, pieces):
                t.copy_(piece)
        return tensors
    return _start(operation, begin, finish, error, may_wait=not blocking)


def grouped_allreduce_async_(tensors, average=None, name=None, op=None, prescale_factor=1.0,
                             postscale_factor=1.0, process_set=global_process_set):
    """Start reducing every tensor of the list in place, fused into one message; returns a handle."""
    return _grouped_start(tensors, name, _reduce_op(op, average), prescale_factor, postscale_factor,
                          process_set, in_place=True)


def grouped_allreduce_async(tensors, average=None, name=None, op=None, prescale_factor=1.0,
                            postscale_factor=1.0, process_set=global_process_set):
    """Start reducing copies of the tensors; synchronize() returns the list of results."""
    return _grouped_start(tensors, name, _reduce_op(op, average), prescale_factor, postscale_factor,
                          process_set, in_place=False)


def grouped_allreduce_(tensors, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0,
                       process_set=global_process_set):
    return synchronize(_grouped_start(tensors, name, _reduce_op(op, average), prescale_factor, postscale_factor,
                                      process_set, in_place=True, blocking=True))


class _GroupedAllreduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, average, name, op, prescale_factor, postscale_factor, process_set, *tensors):
        ctx.args = (average, op, prescale_factor, postscale_factor, process_set)
        return tuple(synchronize(_grouped_start(list(tensors), name, _reduce_op(op, average), prescale_factor,
                                                postscale_factor, process_set, in_place=False, blocking=True)))

    @staticmethod
    def backward(ctx, *grads):
        average, op, pre, post, process_set = ctx.args
        reduced = grouped_allreduce(list(grads), average=average, op=op, prescale_factor=pre,
                                    postscale_factor=post, process_set=process_set)
        return (None,) * 6 + tuple(reduced)


def grouped_allreduce(tensors, average=None, name=None, compression=Compression.none, op=None,
                      prescale_factor=1.0, postscale_factor=1.0, process_set=global_process_set):
    """The reductions of a list of tensors, as new tensors; differentiable."""
    compressed, ctxs = zip(*[compression.compress(t) for t in tensors]) if tensors else ((), ())
    reduced = _GroupedAllreduce.apply(average, name, op, prescale_factor, postscale_factor, process_set,
                                      *compressed)
    return [compression.decompress(t, ctx) for t, ctx in zip(reduced, ctxs)]


# -- allgather ----------------------------------------------------------------------------------------
def allgather_async(tensor, name=None, process_set=global_process_set):
    """Start concatenating every rank's `tensor` along dimension 0 (first dimensions may differ)."""
    error = _tensor_error(tensor, process_set)
    if error is None and tensor.dim() == 0:
        error = "allgather needs a tensor of at least one dimension, got a scalar"
    ok = error is None
    rows = tuple(tensor.shape[1:]) if ok else ()
    operation = Operation(Kind.ALLGATHER, tensor.dtype if ok else None, rows, 0, name)
    state = {}

    def begin(comm):
        data = tensor.detach().contiguous()
        firsts = comm.allgather_(torch.tensor([data.shape[0]]), torch.zeros(comm.size, dtype=torch.int64))
        state["out"] = data.new_empty((int(firsts.sum()), *rows))
        row = _numel(rows)
        return [comm.iallgatherv(data, state["out"], [int(f) * row for f in firsts])], [data]
    return _start(operation, begin, lambda: state["out"], error, may_wait=True)


def _numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


class _Allgather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, name, process_set):
        ctx.first, ctx.process_set = tensor.shape[0], process_set
        return synchronize(allgather_async(tensor, name, process_set))

    @staticmethod
    def backward(ctx, grad_output):
        reduced = allreduce(grad_output, op=Average, process_set=ctx.process_set)
        firsts = allgather(torch.tensor([ctx.first]), process_set=ctx.process_set)
        offset = int(firsts[:_comm().rank].sum())
        return reduced.narrow(0, offset, ctx.first), None, None


def allgather(tensor, name=None, process_set=global_process_set):
    """Every rank's `tensor` concatenated along dimension 0, in rank order; differentiable."""
    return _Allgather.apply(tensor, name, process_set)


def grouped_allgather(tensors, name=None, process_set=global_process_set):
    """allgather() of each tensor of a list."""
    return [allgather(t, None if name is None else f"{name}.{i}", process_set) for i, t in enumerate(tensors)]


# -- broadcast ----------------------------------------------------------------------------------------
def _broadcast_start(tensor, root_rank, name, process_set, *, in_place, blocking=False):
    size = _comm().size
    error = _tensor_error(tensor, process_set, in_place=in_place)
    if error is None and not (isinstance(root_rank, int) and 0 <= root_rank < size):
        error = f"broadcast root_rank {root_rank!r} does not exist: the job has {size} rank(s), 0 to {size - 1}"
    ok = error is None
    buffer = tensor if in_place or not ok else tensor.detach().clone(memory_format=torch.contiguous_format)
    operation = Operation(Kind.BROADCAST, tensor.dtype if ok else None, tuple(tensor.shape) if ok else (),
                          0, name, root=root_rank if ok else -1, blocking=blocking)

    def begin(comm):
        if blocking:
            comm.broadcast_(buffer.detach(), root_rank, what=name)
            return [], [buffer]
        return [comm.ibroadcast_(buffer.detach(), root_rank)], [buffer]
    return _start(operation, begin, lambda: buffer, error, may_wait=not blocking)


def broadcast_async_(tensor, root_rank, name=None, process_set=global_process_set):
    """Start overwriting `tensor` with root_rank's values; returns a handle."""
    return _broadcast_start(tensor, root_rank, name, process_set, in_place=True)


def broadcast_async(tensor, root_rank, name=None, process_set=global_process_set):
    """Start broadcasting into a copy of `tensor`; synchronize() returns it."""
    return _broadcast_start(tensor, root_rank, name, process_set, in_place=False)


def broadcast_(tensor, root_rank, name=None, process_set=global_process_set):
    """Overwrite `tensor` with root_rank's values on every rank; returns it."""
    with torch.no_grad():
        return synchronize(_broadcast_start(tensor, root_rank, name, process_set, in_place=True, blocking=True))


class _Broadcast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, root_rank, name, process_set):
        ctx.root_rank, ctx.process_set = root_rank, process_set
        return synchronize(_broadcast_start(tensor, root_rank, name, process_set, in_place=False, blocking=True))

    @staticmethod
    def backward(ctx, grad_output):
        reduced = allreduce(grad_output, op=Average, process_set=ctx.process_set)
        if _comm().rank != ctx.root_rank:
            reduced = reduced * 0
        return reduced, None, None, None


def broadcast(tensor, root_rank, name=None, process_set=global_process_set):
    """root_rank's `tensor` on every rank, as a new tensor; differentiable."""
    return _Broadcast.apply(tensor, root_rank, name, process_set)


# -- alltoall -----------------------------------------------------------------------------------------
def _splits_error(tensor, splits, size):
    first = tensor.shape[0] if tensor.dim() else 0
    if tensor.dim() == 0:
        return "alltoall needs a tensor of at least one dimension, got a scalar"
    if splits is None:
        if first % size:
            return ("splits not provided, but first dimension of tensor is not an even multiple of the "
                    "number of workers.")
        return None
    if len(splits) != size:
        return "Number of entries in splits does not equal number of workers."
    if any(s < 0 for s in splits):
        return "splits must not be negative"
    if sum(splits) > first:
        return "Sum of splits entries is greater than the first dimension of tensor."
    return None


def _split_counts(splits):
    """`splits` as a list of ints, and the error if they are not integers (Horovod refuses those too)."""
    counts = splits if isinstance(splits, torch.Tensor) else torch.as_tensor(splits)
    if counts.dtype.is_floating_point or counts.dtype.is_complex or counts.dtype == torch.bool:
        return None, (f"alltoall expects splits to contain integers, got {counts.dtype}: pass a list of ints "
                      "or a torch.int32 tensor")
    if counts.dim() > 1:
        return None, f"alltoall expects a 1D splits tensor, got {counts.dim()} dimensions"
    return counts.reshape(-1).tolist(), None


def alltoall_async(tensor, splits=None, name=None, process_set=global_process_set):
    """Start sending splits[r] rows of `tensor` to rank r (equal parts without splits).

    synchronize() returns (received rows, received splits as an int32 tensor).
    """
    size = _comm().size
    wanted, error = (None, None) if splits is None else _split_counts(splits)
    error = _tensor_error(tensor, process_set) or error or _splits_error(tensor, wanted, size)
    ok = error is None
    operation = Operation(Kind.ALLTOALL, tensor.dtype if ok else None, tuple(tensor.shape[1:]) if ok else (),
                          0, name)
    state = {}

    def begin(comm):
        data = tensor.detach().contiguous()
        send = wanted if wanted is not None else [data.shape[0] // size] * size
        received = comm.alltoall_(torch.tensor(send, dtype=torch.int64), torch.zeros(size, dtype=torch.int64))
        state["splits"] = received.to(torch.int32)
        state["out"] = data.new_empty((int(received.sum()), *data.shape[1:]))
        row = _numel(data.shape[1:])
        return [comm.ialltoallv(data, [s * row for s in send], state["out"],
                                [int(r) * row for r in received])], [data]
    return _start(operation, begin, lambda: (state["out"], state["splits"]), error, may_wait=True)


class _Alltoall(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, splits, name, process_set):
        output, received = synchronize(alltoall_async(tensor, splits, name, process_set))
        ctx.received, ctx.process_set = received, process_set
        if splits is None:
            return output
        ctx.mark_non_differentiable(received)
        return output, received

    @staticmethod
    def backward(ctx, grad_output, *unused):
        grad, _ = alltoall(grad_output, splits=ctx.received, process_set=ctx.process_set)
        return grad, None, None, None


def alltoall(tensor, splits=None, name=None, process_set=global_process_set):
    """Rows of `tensor` scattered to the ranks and gathered from them; differentiable.

    Returns the received rows, and with `splits` also how many came from each rank.
    """
    return _Alltoall.apply(tensor, splits, name, process_set)


# -- reducescatter ------------------------------------------------------------------------------------
def _rows_per_rank(first, size):
    """Horovod's split: the first (first % size) ranks get one row more."""
    return [first // size + (1 if r < first % size else 0) for r in range(size)]


def _reducescatter_error(tensors, op, process_set, what):
    error = next((e for e in (_tensor_error(t, process_set) for t in tensors) if e), None) or _op_error(op)
    if error is None and not tensors:
        error = f"{what} needs at least one tensor"
    if error is None and any(t.dim() == 0 for t in tensors):
        error = f"{what} needs tensors of at least one dimension, got a scalar"
    if error is None and len({t.dtype for t in tensors}) > 1:
        error = f"{what} needs tensors of one dtype: call it once per dtype"
    if error is None and tensors[0].dtype == torch.bool:
        error = f"{what} of bool tensors is not supported: convert to torch.uint8"
    return error


def _reducescatter_start(tensors, name, op, prescale_factor, postscale_factor, process_set, *, what, one=False):
    """One negotiation and one Ireduce_scatter for a list of tensors; synchronize() gives this rank's rows of each.

    The send buffer holds rank 0's rows of every tensor, then rank 1's, ...:
    each rank receives its rows of all the tensors as one contiguous piece.
    """
    tensors = list(tensors)
    error = _reducescatter_error(tensors, op, process_set, what)
    shapes = () if error else tuple(tuple(t.shape) for t in tensors)
    operation = Operation(Kind.REDUCESCATTER, None if error else tensors[0].dtype,
                          shapes[0] if len(shapes) == 1 else shapes, 0, name, op=int(op),
                          scale=(prescale_factor, postscale_factor))
    state = {}

    def begin(comm):
        rows = [_rows_per_rank(t.shape[0], comm.size) for t in tensors]
        parts = [t.detach().split(r) for t, r in zip(tensors, rows)]
        send = _scale_(torch.cat([p[q].reshape(-1) for q in range(comm.size) for p in parts]), prescale_factor)
        counts = [sum(p[q].numel() for p in parts) for q in range(comm.size)]
        state["out"] = send.new_empty(counts[comm.rank])
        state["shapes"] = [p[comm.rank].shape for p in parts]
        return [comm.ireduce_scatter(send, state["out"], counts, _MPI_OP[op])], [send]

    def finish():
        out = _finish_reduction(state["out"], op, postscale_factor, _comm().size)
        shares = [piece.view(shape) for piece, shape in zip(out.split([s.numel() for s in state["shapes"]]),
                                                            state["shapes"])]
        return shares[0] if one else shares
    return _start(operation, begin, finish, error, may_wait=True)


def reducescatter_async(tensor, name=None, op=Average, process_set=global_process_set, prescale_factor=1.0,
                        postscale_factor=1.0):
    """Start reducing `tensor` over all ranks; each keeps its share of the rows (the first ranks one more)."""
    return _reducescatter_start([tensor], name, op, prescale_factor, postscale_factor, process_set,
                                what="reducescatter", one=True)


def grouped_reducescatter_async(tensors, name=None, op=Average, process_set=global_process_set,
                                prescale_factor=1.0, postscale_factor=1.0):
    """Start reduce-scattering every tensor of the list in one message; synchronize() returns the list of shares."""
    return _reducescatter_start(tensors, name, op, prescale_factor, postscale_factor, process_set,
                                what="grouped_reducescatter")


def _reducescatter_grad_scale(op, prescale_factor, postscale_factor):
    """Horovod's gradient of a reduce-scatter: the allgather of the output's gradient times this."""
    return (_comm().size if op == Sum else 1) * prescale_factor * postscale_factor


class _Reducescatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, name, op, process_set, prescale_factor, postscale_factor):
        ctx.scale, ctx.process_set = _reducescatter_grad_scale(op, prescale_factor, postscale_factor), process_set
        return synchronize(reducescatter_async(tensor, name, op, process_set, prescale_factor,
                                               postscale_factor))

    @staticmethod
    def backward(ctx, grad_output):
        return allgather(grad_output * ctx.scale, process_set=ctx.process_set), None, None, None, None, None


def reducescatter(tensor, name=None, compression=Compression.none, op=Average, process_set=global_process_set,
                  prescale_factor=1.0, postscale_factor=1.0):
    """This rank's share of the rows of the reduction of `tensor` over all ranks; differentiable."""
    compressed, ctx = compression.compress(tensor)
    reduced = _Reducescatter.apply(compressed, name, op, process_set, prescale_factor, postscale_factor)
    return compression.decompress(reduced, ctx)


class _GroupedReducescatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, name, op, process_set, prescale_factor, postscale_factor, *tensors):
        ctx.scale, ctx.process_set = _reducescatter_grad_scale(op, prescale_factor, postscale_factor), process_set
        return tuple(synchronize(grouped_reducescatter_async(list(tensors), name, op, process_set,
                                                             prescale_factor, postscale_factor)))

    @staticmethod
    def backward(ctx, *grads):
        return (None,) * 5 + tuple(grouped_allgather([g * ctx.scale for g in grads], process_set=ctx.process_set))


def grouped_reducescatter(tensors, name=None, compression=Compression.none, op=Average,
                          process_set=global_process_set, prescale_factor=1.0, postscale_factor=1.0):
    """reducescatter() of each tensor of a list, in one negotiation and one MPI call; differentiable."""
    compressed, ctxs = zip(*[compression.compress(t) for t in tensors]) if tensors else ((), ())
    reduced = _GroupedReducescatter.apply(name, op, process_set, prescale_factor, postscale_factor, *compressed)
    return [compression.decompress(t, ctx) for t, ctx in zip(reduced, ctxs)]


# -- barrier and join ---------------------------------------------------------------------------------
def barrier(process_set=global_process_set):
    """Return once every rank has called barrier()."""
    error = basics._check_process_set(process_set)
    _start_parked()  # what still waits is made by the ranks that are here after this barrier
    _complete_started()
    while negotiate(_comm(), Operation(Kind.BARRIER), error=error).wait:
        pass  # other ranks parked an operation of theirs: they come here next
    _comm().barrier(what="barrier")


def join(device=-1):
    """This rank has no more data: it takes part in the others' allreduces with zeros until all join.

    Returns the rank that joined last. Only allreduce and barrier may follow
    another rank's join() (Horovod's rule); anything else raises on the ranks
    that make it, while the joined ranks wait on, as in Horovod.
    """
    comm = _comm()
    _start_parked(may_wait=False)
    contributions = []  # (request, buffer) of the allreduces this rank joined in
    first = True
    while True:
        outcome = negotiate(comm, None, joined=True, first_join_round=first)
        first = False
        if outcome.all_joined:
            break
        if outcome.wait or outcome.refused:
            continue
        if outcome.kind == Kind.BARRIER:
            comm.barrier(what="barrier (joined)")
            continue
        identity = _identity(outcome.op, outcome.dtype, outcome.numel)
        if outcome.blocking:
            comm.allreduce_(identity, _MPI_OP[outcome.op], what="allreduce (joined)")
        else:
            contributions.append((comm.iallreduce_(identity, _MPI_OP[outcome.op]), identity))
    for request, _ in contributions:
        comm.wait(request, what="join")
    return outcome.last_joined


def _identity(op, dtype, numel):
    """What a joined rank contributes: zeros for sums (as Horovod), the op's neutral value otherwise."""
    if op == Product:
        return torch.ones(numel, dtype=dtype)
    if op in (Min, Max):
        info = torch.finfo(dtype) if dtype.is_floating_point else torch.iinfo(dtype)
        return torch.full((numel,), info.max if op == Min else info.min, dtype=dtype)
    return torch.zeros(numel, dtype=dtype)
