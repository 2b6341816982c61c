"""Broadcasting parameters, optimizer state and Python objects, as `horovod.torch.functions` does."""
import pickle

import torch

from .basics import global_process_set, rank, size
from .mpi_ops import allgather, broadcast_, broadcast_async_, synchronize

__all__ = ["broadcast_parameters", "broadcast_optimizer_state", "broadcast_object", "allgather_object"]


def broadcast_parameters(params, root_rank):
    """Copy root_rank's tensors into every rank's, in place.

    params: a `state_dict()` (broadcast in sorted key order), or a list or
    iterator of `named_parameters()` pairs or plain parameters.
    """
    if isinstance(params, dict):
        params = sorted(params.items())
    elif isinstance(params, (list, tuple)) or hasattr(params, "__next__"):
        params = [p if isinstance(p, tuple) else (None, p) for p in params]
    else:
        raise ValueError("invalid params of type: %s" % type(params))
    with torch.no_grad():
        handles = [broadcast_async_(p, root_rank, name) for name, p in params]
        for handle in handles:
            synchronize(handle)


def broadcast_optimizer_state(optimizer, root_rank, model=None):
    """Copy root_rank's optimizer state (tensors, hyperparameters) into every rank's optimizer.

    As in Horovod, an optimizer that has not stepped yet first takes one step
    with zero gradients so that its state exists to receive root's: with
    weight decay that step moves the parameters, and Adam's step count starts
    at 1 (see the README). `model` is accepted for Horovod's signature.
    """
    inner = getattr(optimizer, "optimizer", optimizer)  # a DistributedOptimizer's wrapped optimizer
    if isinstance(inner, torch.optim.LBFGS):
        raise ValueError("cannot broadcast torch.optim.LBFGS state")
    params = [p for group in inner.param_groups for p in group["params"]]
    if not inner.state:
        _create_state(inner, params)
    tensors, scalars = [], {}
    for i, p in enumerate(params):
        for key, value in sorted(inner.state.get(p, {}).items()):
            if torch.is_tensor(value):
                tensors.append((f"optimizer.state.{i}.{key}", value))
            else:
                scalars[(i, key)] = value
    broadcast_parameters(tensors, root_rank)
    options = [{k: v for k, v in group.items() if k != "params"} for group in inner.param_groups]
    options, scalars = broadcast_object((options, scalars), root_rank, name="optimizer.options")
    for group, values in zip(inner.param_groups, options):
        group.update(values)
    for (i, key), value in scalars.items():
        inner.state[params[i]][key] = value


def _create_state(optimizer, params):
    """One step with zero gradients, which makes a stateful optimizer allocate its state (Horovod's way)."""
    for p in params:
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    optimizer.step()


def broadcast_object(obj, root_rank=0, name=None, process_set=global_process_set):
    """root_rank's `obj` on every rank (pickled: for small, rare objects).

    The default name is "broadcast_object", not Horovod's type(obj).__name__,
    which differs where other ranks pass None (and Horovod then waits forever).
    """
    name = name or "broadcast_object"
    payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8) if rank() == root_rank else None
    length = torch.tensor([payload.numel() if payload is not None else 0])
    broadcast_(length, root_rank, name + ".sz", process_set)
    if payload is None:
        payload = torch.empty(int(length), dtype=torch.uint8)
    broadcast_(payload, root_rank, name + ".t", process_set)
    return obj if rank() == root_rank else pickle.loads(payload.numpy().tobytes())


def allgather_object(obj, name=None):
    """Every rank's `obj`, in rank order (pickled: for small, rare objects). Default name as broadcast_object."""
    name = name or "allgather_object"
    payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
    lengths = allgather(torch.tensor([payload.numel()]), name=name + ".sz").tolist()
    gathered = allgather(payload, name=name + ".t").numpy().tobytes()
    offsets = [sum(lengths[:r]) for r in range(size())]
    return [pickle.loads(gathered[o:o + n]) for o, n in zip(offsets, lengths)]
