"""Losses as one value per sample: the trainer sums them and divides by the *global* batch.

A loss of shape (batch,) rather than a mean is what keeps training exact
across rank counts: each rank sums its samples' losses, the sum over ranks is
the sum over the global batch, and one division by its size gives what a
single process computes on that whole batch, also for a partial last batch.

    --loss cross_entropy   class targets; over the last dimension for sequences
                           ((B, T, V) against (B, T): a sample's mean over its T positions)
    --loss mse             squared error, a sample's mean over its values
    --loss FILE.py:fn      fn(output, target) -> tensor of shape (batch,)
"""
import torch
from torch.nn import functional as F

from .config import UsageError
from .userfn import load_function

__all__ = ["LOSSES", "make_loss", "check_loss", "cross_entropy", "mse"]


def cross_entropy(output, target):
    """Per-sample cross-entropy; for sequences the mean over a sample's positions."""
    if output.dim() > 2:
        per_position = F.cross_entropy(output.flatten(0, -2).float(), target.flatten(), reduction="none")
        return per_position.view(len(target), -1).mean(1)
    return F.cross_entropy(output.float(), target, reduction="none")


def mse(output, target):
    """Per-sample squared error (a sample's mean over its values); (B, 1) outputs against (B,) targets."""
    error = F.mse_loss(output.float().reshape(target.shape), target.float(), reduction="none")
    return error.reshape(len(target), -1).mean(1)


LOSSES = {"cross_entropy": cross_entropy, "mse": mse}


def make_loss(spec, task):
    """The per-sample loss `spec` names (None: cross-entropy for class targets, else MSE)."""
    if spec is None:
        return cross_entropy if task == "classification" else mse
    if spec == "cross_entropy" and task != "classification":
        raise UsageError("--loss cross_entropy needs class (integer) targets; these are real numbers "
                         "(use --loss mse, or your own)")
    return LOSSES.get(spec) or load_function(spec, "loss")


@torch.no_grad()
def check_loss(loss, spec, out, y):
    """UsageError unless `loss` gives a float tensor of shape (B,) on the model's output `out` for targets `y`."""
    name = spec or loss.__name__
    try:
        value = loss(out, y)
    except Exception as e:  # their code or a shape mismatch: one line
        raise UsageError(f"--loss {name} failed on the model's output {tuple(out.shape)} and targets "
                         f"{tuple(y.shape)}: {type(e).__name__}: {e}")
    if not isinstance(value, torch.Tensor):
        raise UsageError(f"--loss {name} returned {type(value).__name__}, not a tensor")
    if tuple(value.shape) != (len(y),) or not value.is_floating_point():
        raise UsageError(f"--loss {name} returned a {value.dtype} tensor of shape {tuple(value.shape)} for a batch "
                         f"of {len(y)}; it must return one loss per sample, a float tensor of shape ({len(y)},) "
                         f"(reduction='none', and the mean over any other dimensions)")
