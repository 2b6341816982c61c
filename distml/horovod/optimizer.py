"""Horovod's DistributedOptimizer over distml's fused zero-copy gradient buckets.

    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                         compression=hvd.Compression.fp16, backward_passes_per_step=2)

Horovod reduces each gradient from a hook as backward produces it, fusing
them in a background thread. Here the gradients already live in fused
buckets (`distml.reducer`: each `.grad` is a view into one flat buffer), and
`synchronize()` (called by `step()`) reduces each bucket in one negotiated
MPI call, so a rank that called `join()` can take part. Hooks only count
backward passes, for Horovod's check that `backward_passes_per_step` holds.
"""
import os
import warnings
from contextlib import contextmanager
from functools import partial

import torch

from ..optimizer import WrappingOptimizer, reduced_closure
from ..reducer import GradientReducer, weak_grad_hook
from . import mpi_ops
from .basics import Adasum, Average, Sum, _check_process_set, global_process_set, size
from .compression import Compression

__all__ = ["DistributedOptimizer"]

_DEFAULT_BUCKET_MB = 25.0  # distml.DistributedOptimizer's: the same buckets give the same sums bit for bit


class _Channel:
    """What the reducer sees as its communicator: each bucket compressed, negotiated, reduced, scaled."""

    def __init__(self, compression, prescale, postscale):
        self.compression, self.prescale, self.postscale = compression, prescale, postscale
        self.size = size()
        self._wire = {}  # bucket buffer's address -> its compressed twin, made once

    def allreduce_(self, buffer, what=None):
        wire = buffer
        if self.compression.wire_dtype is not None and buffer.dtype.is_floating_point:
            wire = self._wire.setdefault(buffer.data_ptr(), torch.empty_like(buffer, dtype=self.compression.wire_dtype))
            wire.copy_(buffer)
        mpi_ops.allreduce_(wire, name=f"DistributedOptimizer {what}", op=Sum, prescale_factor=self.prescale,
                           postscale_factor=self.postscale)
        if wire is not buffer:
            buffer.copy_(wire)
        return buffer


class DistributedOptimizer(WrappingOptimizer):
    """Wraps a torch optimizer: step() first averages (or sums) the gradients over all ranks.

    Horovod's arguments and checks; `groups`, `num_groups` and
    `sparse_as_dense` are accepted (buckets already fuse every gradient, and a
    sparse gradient is reduced as a dense one). Unlike Horovod, this wraps the
    optimizer you pass, keeping its state, instead of building a new one of a
    dynamically made subclass: `isinstance(opt, torch.optim.SGD)` is False,
    `opt.optimizer` is yours, and everything else is forwarded to it.
    """

    def __init__(self, optimizer, named_parameters=None, compression=Compression.none,
                 backward_passes_per_step=1, op=Average, gradient_predivide_factor=1.0, num_groups=0,
                 groups=None, sparse_as_dense=False, process_set=global_process_set):
        if gradient_predivide_factor != 1.0 and op != Average:
            raise ValueError("gradient_predivide_factor not supported with op != Average")
        if backward_passes_per_step <= 0:
            raise ValueError("backward_passes_per_step must be > 0")
        if op not in (Average, Sum, Adasum):
            raise ValueError(f"op must be hvd.Average, hvd.Sum or hvd.Adasum, got {op!r}")
        if op == Adasum and size() > 1:
            raise ValueError(mpi_ops._op_error(Adasum))
        if _check_process_set(process_set):
            raise NotImplementedError(_check_process_set(process_set))
        self.__dict__["optimizer"] = optimizer  # before anything reaches __getattr__
        self._parameter_names = _names(optimizer, named_parameters)
        self.backward_passes_per_step = backward_passes_per_step
        self.op = op
        self._compression = compression
        self._scale = (1.0 / gradient_predivide_factor, gradient_predivide_factor)
        self._should_synchronize, self._synchronized = True, False
        self._passes, self._hooks = {}, []
        self._build()

    def _build(self):
        """The buckets, and (with several ranks, as Horovod) the hooks that count backward passes."""
        params = [p for group in self.optimizer.param_groups for p in group["params"] if p.requires_grad]
        bucket_mb = float(os.environ.get("HOROVOD_FUSION_THRESHOLD", _DEFAULT_BUCKET_MB * 2**20)) / 2**20
        channel = _Channel(self._compression, *self._scale)
        self._reducer = GradientReducer(params, channel, bucket_mb=max(bucket_mb, 1e-6),
                                        op="average" if self.op == Average else "sum")
        for hook in self._hooks:
            hook.remove()
        hooks = size() > 1
        self._hooks = [p.register_post_accumulate_grad_hook(weak_grad_hook(self, "_count")) for p in params if hooks]
        self._passes = dict.fromkeys(params, 0)

    def _count(self, param):
        self._passes[param] += 1
        if self._passes[param] > self.backward_passes_per_step:
            raise AssertionError("Gradients were computed more than backward_passes_per_step times before call "
                                 "to step(). Increase backward_passes_per_step to accumulate gradients locally.")

    # -- Horovod's methods ------------------------------------------------------------------------------
    def synchronize(self):
        """Reduce the gradients now (step() calls this unless inside skip_synchronize())."""
        self._reducer.allreduce_grads()
        self._passes = dict.fromkeys(self._passes, 0)
        self._synchronized = True

    @contextmanager
    def skip_synchronize(self):
        """For `synchronize(); clip gradients; with skip_synchronize(): step()`."""
        self._should_synchronize = False
        try:
            yield
        finally:
            self._should_synchronize = True

    def step(self, closure=None):
        """Horovod's, except that a closure is reduced after each evaluation (see distml.optimizer.reduced_closure).

        Horovod reduces before the closure runs, so LBFGS stepped on unreduced gradients.
        """
        if closure is not None:
            loss_sum = partial(mpi_ops.allreduce, op=Sum, name="DistributedOptimizer closure loss")
            try:
                return self.optimizer.step(reduced_closure(closure, self.synchronize, loss_sum, size(),
                                                           average=self.op == Average))
            finally:
                self._synchronized = False
        if self._should_synchronize:
            if self._synchronized:
                warnings.warn("optimizer.step() called without optimizer.skip_synchronize() context after "
                              "optimizer.synchronize(). This can cause training slowdown. You may want to "
                              "consider using optimizer.skip_synchronize() context if you use "
                              "optimizer.synchronize() in your code.")
            self.synchronize()
        self._synchronized = False
        return self.optimizer.step()

    def zero_grad(self, set_to_none=True):
        """As torch's: None, and backward writes the next gradients into the buckets (see distml.reducer)."""
        self._reducer.zero_grad(set_to_none)
        self._passes = dict.fromkeys(self._passes, 0)

    def set_backward_passes_per_step(self, passes):
        self.backward_passes_per_step = passes
        self._passes = dict.fromkeys(self._passes, 0)

    def _forget(self):
        self._passes = dict.fromkeys(self._passes, 0)
        self._synchronized, self._should_synchronize = False, True


def _names(optimizer, named_parameters):
    """{parameter: name}, with Horovod's checks: (name, parameter) pairs, unique, covering every parameter."""
    if named_parameters is None:
        return {p: f"allreduce.noname.{i}.{j}" for i, group in enumerate(optimizer.param_groups)
                for j, p in enumerate(group["params"])}
    named_parameters = list(named_parameters)
    if any(not isinstance(p, tuple) for p in named_parameters):
        raise ValueError("named_parameters should be a sequence of tuples (name, parameter), usually produced by "
                         "model.named_parameters().")
    seen, duplicates = set(), set()
    for name, _ in named_parameters:
        (duplicates if name in seen else seen).add(name)
    if duplicates:
        raise ValueError("Parameter names in named_parameters must be unique. Found duplicates: %s"
                         % ", ".join(sorted(duplicates)))
    named = {id(p) for _, p in named_parameters}
    unnamed = [id(p) for group in optimizer.param_groups for p in group["params"] if id(p) not in named]
    if unnamed:
        raise ValueError("named_parameters was specified, but one or more model parameters were not named. "
                         "Python object ids: %s" % ", ".join(map(str, unnamed)))
    return {p: name for name, p in named_parameters}
