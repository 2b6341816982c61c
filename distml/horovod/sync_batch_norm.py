"""Horovod's SyncBatchNorm: batch statistics over every rank's batch, as one BatchNorm on their union.

In training, each rank sums its count, sum and sum of squares per channel
(in float64), one Allreduce combines them, and every rank normalizes with the
global mean and variance; backward reduces the two per-channel sums the input
gradient needs. With each rank's loss the mean over its own batch and
DistributedOptimizer's average, the result is that of single-process BatchNorm
on the union batch (tested to float32 rounding at 2 and 3 ranks). In eval
mode, and with one rank, it is plain BatchNorm.
"""
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from . import mpi_ops
from .basics import Sum, _check_process_set, global_process_set, size

__all__ = ["SyncBatchNorm"]


class SyncBatchNorm(_BatchNorm):
    """BatchNorm whose training statistics are those of all ranks' batches together."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 process_set=global_process_set):
        if _check_process_set(process_set):
            raise NotImplementedError(_check_process_set(process_set))
        super().__init__(num_features, eps, momentum, affine, track_running_stats)

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input):
        self._check_input_dim(input)
        if not self.training or size() == 1:
            return super().forward(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # a cumulative average, as torch's BatchNorm
                factor = 1.0 / float(self.num_batches_tracked)
        running = (self.running_mean, self.running_var) if self.track_running_stats else (None, None)
        return _SyncBatchNorm.apply(input, self.weight, self.bias, *running, self.eps, factor)


def _channels_last(x):
    """x as (elements per channel, channels): what the per-channel sums run over."""
    return x.transpose(0, 1).reshape(x.shape[1], -1).t()


def _allreduce_sum(tensor, name):
    return mpi_ops.allreduce_(tensor, op=Sum, name=name)


class _SyncBatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, factor):
        flat = _channels_last(x).double()
        stats = torch.cat([torch.tensor([float(flat.shape[0])], dtype=torch.float64),
                           flat.sum(0), (flat * flat).sum(0)])
        _allreduce_sum(stats, "SyncBatchNorm.stats")
        count, channels = stats[0], x.shape[1]
        mean = stats[1:1 + channels] / count
        var = (stats[1 + channels:] / count - mean * mean).clamp_min(0)
        if running_mean is not None:
            running_mean.mul_(1 - factor).add_(mean.to(running_mean.dtype), alpha=factor)
            unbiased = var * count / max(float(count) - 1, 1.0)
            running_var.mul_(1 - factor).add_(unbiased.to(running_var.dtype), alpha=factor)
        shape = [1, channels] + [1] * (x.dim() - 2)
        invstd = (var + eps).rsqrt().to(x.dtype).view(shape)
        xhat = (x - mean.to(x.dtype).view(shape)) * invstd
        ctx.save_for_backward(xhat, invstd, weight)
        ctx.count = float(count)
        out = xhat if weight is None else xhat * weight.view(shape)
        return out if bias is None else out + bias.view(shape)

    @staticmethod
    def backward(ctx, grad_out):
        xhat, invstd, weight = ctx.saved_tensors
        channels = xhat.shape[1]
        shape = [1, channels] + [1] * (xhat.dim() - 2)
        local = torch.cat([_channels_last(grad_out).sum(0), _channels_last(grad_out * xhat).sum(0)])
        grad_weight = local[channels:].clone() if weight is not None and ctx.needs_input_grad[1] else None
        grad_bias = local[:channels].clone() if ctx.needs_input_grad[2] else None
        total = _allreduce_sum(local.double(), "SyncBatchNorm.grads").to(grad_out.dtype) / ctx.count
        mean_dy, mean_dy_xhat = total[:channels].view(shape), total[channels:].view(shape)
        scale = invstd if weight is None else invstd * weight.view(shape)
        grad_x = (grad_out - mean_dy - xhat * mean_dy_xhat) * scale
        return grad_x, grad_weight, grad_bias, None, None, None, None
