"""The Horovod-style Python API for users who keep their own training loop.

    import distml
    distml.init()                                            # distributed: start MPI
    model = Net()
    distml.broadcast_parameters(model)                       # distributed: same start everywhere
    opt = distml.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    for x, y in batches(distml.shard_batches(n, 32, epoch=e)):  # distributed: this rank's part
        opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()

The CLI trainer uses exactly these pieces.
"""
import sys
import time

import torch

from . import comm as _comm
from .reducer import DEFAULT_CHUNK_MB, GradientReducer

__all__ = ["init", "rank", "size", "is_root", "allreduce", "broadcast_parameters",
           "broadcast_buffers", "DistributedOptimizer"]


def init():
    """Start MPI (idempotent) and return the world communicator.

    With several ranks, an uncaught exception then ends the whole job: its
    traceback, one line naming the rank, MPI Abort. Without that the failed
    rank finalizes MPI and exits, and the others wait in their next collective
    forever (mpirun was still waiting after 60 s).
    """
    world = _comm.world()
    if world.size > 1 and sys.excepthook is sys.__excepthook__:
        sys.excepthook = aborting_excepthook(lambda: world)
    return world


_REPORT_WAIT_S = 10.0


def aborting_excepthook(comm_of, name="distml"):
    """A sys.excepthook ending the whole job: the traceback, one line naming the rank, MPI Abort.

    `comm_of()` gives the communicator to abort. An error every rank raises
    alike (marked `error.everywhere`, as distml.horovod's disagreements are)
    is printed by rank 0 only; the others wait for its abort, since aborting
    first could end rank 0 before it has printed.
    """
    def hook(kind, error, tb):
        comm = comm_of()
        if getattr(error, "everywhere", False) and comm.rank != 0:
            time.sleep(_REPORT_WAIT_S)  # rank 0's MPI Abort ends this process; if it never comes, abort
            comm.abort(1)
        sys.__excepthook__(kind, error, tb)
        what = f"{kind.__name__}: {error}" if str(error) else kind.__name__
        print(f"{name}: rank {comm.rank} of {comm.size} failed: {what} (aborting all ranks)", file=sys.stderr,
              flush=True)
        comm.abort(130 if issubclass(kind, KeyboardInterrupt) else 1)
    return hook


def rank():
    return _comm.world().rank


def size():
    return _comm.world().size


def is_root():
    return _comm.world().is_root


def allreduce(value, op="average"):
    """A float or tensor summed or averaged over ranks (a copy; for metrics and small values)."""
    if op not in ("average", "sum", "max", "min"):
        raise ValueError(f"op must be 'average', 'sum', 'max' or 'min', got {op!r}")
    world = _comm.world()
    tensor = torch.as_tensor(value, dtype=torch.float64).clone().contiguous()
    world.allreduce_(tensor, op="sum" if op == "average" else op)
    if op == "average":
        tensor /= world.size
    return tensor.item() if tensor.dim() == 0 else tensor


def broadcast_parameters(model, root=0, *, comm=None):
    """Copy root's parameters and buffers into every rank's `model`, in place."""
    comm = comm or _comm.world()
    with torch.no_grad():
        for tensor in model.parameters():
            comm.broadcast_(tensor, root=root)
    broadcast_buffers(model, root, comm=comm)


def broadcast_buffers(model, root=0, *, comm=None):
    """Copy root's buffers (e.g. BatchNorm running statistics) into every rank's `model`."""
    comm = comm or _comm.world()
    with torch.no_grad():
        for buffer in model.buffers():
            comm.broadcast_(buffer, root=root)


class DistributedOptimizer:
    """Wraps any torch optimizer: step() first reduces the gradients over all ranks.

    It reduces the gradients of the parameters the optimizer updates; `model`
    is accepted for Horovod-style call sites and not needed.
    The gradients live in fused bucket buffers (see `reducer`): after
    zero_grad() they are None, and backward writes them into the buffers, for
    op="average" already divided by the world size (this rank's share: read or
    change gradients after synchronize()). op="sum" is for losses already
    divided by the global batch size (uneven last batches).
    chunk_mb, compression ("fp16", "bf16") and overlap as `distml train`'s --chunk-mb, --compression
    and --overlap (overlap needs one backward() per step).
    """

    def __init__(self, optimizer, model=None, *, bucket_mb=25.0, op="average", comm=None,
                 chunk_mb=DEFAULT_CHUNK_MB, compression="none", overlap=False):
        self.optimizer = optimizer
        params = [p for group in optimizer.param_groups for p in group["params"]]
        self.reducer = GradientReducer(params, comm or _comm.world(), bucket_mb=bucket_mb, op=op,
                                       chunk_mb=chunk_mb, compression=compression, overlap=overlap)
        self._synchronized = False

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none=True):
        """As torch's: None (the fast path, see `reducer`), or zeroed in place with set_to_none=False."""
        self.reducer.zero_grad(set_to_none)
        self._synchronized = False

    def synchronize(self):
        """Reduce the gradients now; step() then steps on them without reducing again.

        For `backward(); synchronize(); clip_grad_norm_(...); step()`: clipping
        before it would see this rank's share, not the average. A backward (or
        a `.grad` replaced) after synchronize() is reduced by step() as usual.
        """
        self.reducer.allreduce_grads()
        self._synchronized = True

    def step(self, closure=None):
        """Reduce the gradients (unless synchronize() did and nothing changed since), then step.

        A closure (LBFGS evaluates several) is reduced after each evaluation,
        and the loss it returns combined over the ranks by `op`, so that every
        rank takes the same decisions from the same numbers.
        """
        synchronized, self._synchronized = self._synchronized, False
        if closure is not None:
            comm = self.reducer.comm
            return self.optimizer.step(reduced_closure(closure, self._reduce_unless_reduced, comm.allreduce_,
                                                       comm.size, average=self.reducer.op == "average"))
        if synchronized:
            self._reduce_unless_reduced()
        else:
            self.reducer.allreduce_grads()
        return self.optimizer.step()

    def _reduce_unless_reduced(self):
        """Reduce unless every rank's buckets still hold the last result.

        The ranks agree first (one int64 MAX): a rank without data may have
        skipped its backward, and deciding alone it would skip an Allreduce
        the others wait in.
        """
        changed = torch.tensor([0 if self.reducer.reduced() else 1], dtype=torch.int64)
        if self.reducer.comm.allreduce_max_(changed, what="whether gradients changed since the reduction").item():
            self.reducer.allreduce_grads()

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, state):
        self._synchronized = False
        self.optimizer.load_state_dict(state)


def reduced_closure(closure, reduce, allreduce_sum, size, *, average):
    """`closure` for an optimizer's step(): gradients reduced after each evaluation, the loss combined.

    Every rank then sees the same gradients and the same loss, so an optimizer
    that decides from them (LBFGS's line search and stopping tests) takes the
    same path everywhere. The loss comes back detached, as the closure's type:
    a tensor of its dtype, or a float.
    """
    def evaluate():
        loss = closure()
        reduce()
        value = 0.0 if loss is None else float(loss.detach() if torch.is_tensor(loss) else loss)
        total = allreduce_sum(torch.tensor([value, loss is not None], dtype=torch.float64))
        if total[1].item() not in (0, size):  # the same sum everywhere, so every rank raises
            raise ValueError("the closure returned a loss on some ranks and None on others")
        if loss is None:
            return None
        combined = total[0].item() / (size if average else 1)
        return torch.tensor(combined, dtype=loss.dtype) if torch.is_tensor(loss) else combined
    return evaluate
