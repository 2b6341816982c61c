"""The sharded optimizer (ZeRO stage 1): each rank holds and steps 1/N of the optimizer state.

WORK IN PROGRESS (branch zero-wip, issue 23): the core step only. Not yet: stage 2's
freeing of the gradient outside this rank's slice, checkpoints in the full format,
clipping, compression, the trainer's --zero flag, lost ranks, the benchmark.

Each parameter group's trainable parameters live in one flat buffer, padded to
a multiple of the world size and cut into equal contiguous slices (a parameter
may span two ranks); their `.data` and `.grad` are views into flat buffers. A
step reduce-scatters the summed gradients so that each rank holds its slice's
sum, runs the user's optimizer class on that slice alone (one fused tensor per
group, so any element-wise update works: SGD, Adam, AdamW, Adagrad, RMSprop),
and all-gathers the updated slices in place. The bytes moved equal one
Allreduce's; the optimizer state and the step's work are 1/N of the replica's.
"""
import inspect
import math

import torch

__all__ = ["ShardedOptimizer", "NOT_ELEMENTWISE"]

NOT_ELEMENTWISE = (torch.optim.LBFGS,)  # updates that need the whole vector (line searches, ...)


class _FlatGroup:
    """One parameter group's parameters in a padded flat buffer, and this rank's slice of it."""

    def __init__(self, params, rank, size):
        self.params = params
        total = sum(p.numel() for p in params)
        self.slice_len = math.ceil(total / size)
        padded = self.slice_len * size
        self.data = torch.zeros(padded, dtype=params[0].dtype)
        self.grad = torch.zeros(padded, dtype=params[0].dtype)
        offset = 0
        for p in params:
            n = p.numel()
            self.data[offset:offset + n].copy_(p.detach().reshape(-1))
            p.data = self.data[offset:offset + n].view_as(p)
            p.grad = self.grad[offset:offset + n].view_as(p)
            offset += n
        start = rank * self.slice_len
        self.shard = torch.nn.Parameter(self.data[start:start + self.slice_len])  # shares data's memory
        self.shard.grad = torch.zeros(self.slice_len, dtype=params[0].dtype)


class ShardedOptimizer:
    """ZeRO stage 1 around `optimizer` (built over the model's parameters as usual).

    Call zero_grad(), backward (losses summed and divided by the global batch), step().
    """

    def __init__(self, optimizer, comm):
        if isinstance(optimizer, NOT_ELEMENTWISE):
            raise ValueError(f"{type(optimizer).__name__} cannot be sharded: its update needs the whole "
                             f"parameter vector, not one slice of it")
        self.comm = comm
        self.groups = []
        shard_groups = []
        for group in optimizer.param_groups:
            params = [p for p in group["params"] if p.requires_grad]
            if not params:
                continue
            flat = _FlatGroup(params, comm.rank, comm.size)
            self.groups.append(flat)
            shard_groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": [flat.shard]})
        accepted = inspect.signature(type(optimizer).__init__).parameters  # defaults hold derived keys too
        self.inner = type(optimizer)(shard_groups, **{k: v for k, v in optimizer.defaults.items() if k in accepted})

    @property
    def param_groups(self):
        return self.inner.param_groups

    def zero_grad(self):
        for flat in self.groups:
            flat.grad.zero_()

    def step(self):
        """Reduce-scatter the gradients, step this rank's slice, all-gather the parameters."""
        for flat in self.groups:
            counts = [flat.slice_len] * self.comm.size
            self.comm.wait(self.comm.ireduce_scatter(flat.grad, flat.shard.grad, counts),
                           what="the sharded optimizer's gradient slices")
        self.inner.step()
        for flat in self.groups:
            mine = flat.shard.detach().clone()  # MPI forbids a send buffer inside the receive buffer
            self.comm.allgather_(mine, flat.data)

    def state_bytes(self):
        """Bytes of optimizer state this rank holds (its slices' moments, momentum, ...)."""
        return sum(t.numel() * t.element_size() for state in self.inner.state.values()
                   for t in state.values() if torch.is_tensor(t))
