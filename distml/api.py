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
import torch

from . import comm as _comm
from .reducer import DEFAULT_CHUNK_MB, GradientReducer

__all__ = ["init", "rank", "size", "is_root", "allreduce", "broadcast_parameters",
           "broadcast_buffers", "DistributedOptimizer"]


def init():
    """Start MPI (idempotent) and return the world communicator."""
    return _comm.world()


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
        """Reduce the gradients now; the next step() does not reduce them again.

        For `backward(); synchronize(); clip_grad_norm_(...); step()`: clipping
        before it would see this rank's share, not the average.
        """
        self.reducer.allreduce_grads()
        self._synchronized = True

    def step(self, closure=None):
        """Reduce the gradients (unless synchronize() did since the last step), then step.

        A closure (LBFGS evaluates several) is reduced after each evaluation, and
        the loss it returns combined over the ranks by `op`, so that every rank
        takes the same decisions from the same numbers.
        """
        if closure is not None:
            return self.optimizer.step(self._reduced(closure))
        if not self._synchronized:
            self.synchronize()
        self._synchronized = False
        return self.optimizer.step()

    def _reduced(self, closure):
        def evaluate():
            loss = closure()
            self.reducer.allreduce_grads()
            if loss is None:
                return None
            total = self.reducer.comm.allreduce_(torch.tensor([float(loss.detach())], dtype=torch.float64), what="the loss")
            return total[0] / (self.reducer.comm.size if self.reducer.op == "average" else 1)
        return evaluate

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, state):
        self.optimizer.load_state_dict(state)
