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
        self.comm, self.full = comm, optimizer  # full: never stepped; it keeps the groups' layout for checkpoints
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
        self.reduce_gradients()
        self.step_and_gather()

    def reduce_gradients(self):
        """Each rank's slice of every group's summed gradient into its shard's .grad."""
        for flat in self.groups:
            counts = [flat.slice_len] * self.comm.size
            self.comm.wait(self.comm.ireduce_scatter(flat.grad, flat.shard.grad, counts),
                           what="the sharded optimizer's gradient slices")

    def clip_grad_norm_(self, max_norm):
        """Scale the reduced gradient to global L2 norm max_norm, from the slices' squared norms; returns the norm."""
        squares = torch.tensor([sum(float(flat.shard.grad.double().pow(2).sum()) for flat in self.groups)],
                               dtype=torch.float64)
        norm = float(self.comm.allreduce_(squares, what="the gradient's squared norm")[0]) ** 0.5
        scale = max_norm / (norm + 1e-6)
        if scale < 1:
            for flat in self.groups:
                flat.shard.grad.mul_(scale)
        return norm

    def step_and_gather(self):
        self.inner.step()
        for flat in self.groups:
            mine = flat.shard.detach().clone()  # MPI forbids a send buffer inside the receive buffer
            self.comm.allgather_(mine, flat.data)

    # -- checkpoints: the whole state, per parameter, in the unsharded optimizer's format --
    def state_dict(self):
        """The full optimizer's state_dict (a collective): each state tensor gathered and cut per parameter."""
        self.full.state.clear()
        for flat, shard_state in zip(self.groups, (self.inner.state.get(f.shard, {}) for f in self.groups)):
            for key, value in shard_state.items():
                whole = self._gather(flat, value) if torch.is_tensor(value) and value.dim() == 1 else None
                offset = 0
                for p in flat.params:
                    n = p.numel()
                    self.full.state.setdefault(p, {})[key] = (  # a step counter each: optimizers add to it in place
                        whole[offset:offset + n].view_as(p).clone() if whole is not None else
                        value.clone() if torch.is_tensor(value) else value)
                    offset += n
        for full_group, group in zip(self.full.param_groups, self._inner_groups_by_full()):
            full_group.update({k: v for k, v in group.items() if k != "params"})
        state = self.full.state_dict()
        self.full.state.clear()
        return state

    def load_state_dict(self, state):
        """From a full optimizer's state_dict (any world size, sharded or not): this rank's slices."""
        self.full.load_state_dict(state)
        for flat in self.groups:
            shard_state = {}
            for key in self.full.state.get(flat.params[0], {}):
                values = [self.full.state[p][key] for p in flat.params]
                if torch.is_tensor(values[0]) and values[0].dim() > 0:
                    whole = torch.zeros_like(flat.data)
                    whole[:sum(v.numel() for v in values)] = torch.cat([v.reshape(-1) for v in values])
                    start = self.comm.rank * flat.slice_len
                    shard_state[key] = whole[start:start + flat.slice_len].clone()
                else:
                    shard_state[key] = values[0].clone() if torch.is_tensor(values[0]) else values[0]
            self.inner.state[flat.shard] = shard_state
        for full_group, group in zip(self.full.param_groups, self._inner_groups_by_full()):
            group.update({k: v for k, v in full_group.items() if k != "params"})
        self.full.state.clear()

    def _inner_groups_by_full(self):
        """The inner group of each full group (full groups without trainable parameters get a dummy)."""
        inner = iter(self.inner.param_groups)
        return [next(inner) if any(p.requires_grad for p in g["params"]) else {} for g in self.full.param_groups]

    def _gather(self, flat, value):
        whole = torch.zeros(flat.slice_len * self.comm.size, dtype=value.dtype)
        self.comm.allgather_(value.contiguous(), whole)
        return whole

    def state_bytes(self):
        """Bytes of optimizer state this rank holds (its slices' moments, momentum, ...)."""
        return sum(t.numel() * t.element_size() for state in self.inner.state.values()
                   for t in state.values() if torch.is_tensor(t))
