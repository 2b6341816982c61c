"""Non-finite loss or gradients: every rank stops at the same step (exit 65), or skips it alike.

Each rank checks what only it can see before anything is reduced: its own
loss (the float it already has from `loss.item()`) and its own gradients (one
sum per bucket). It puts a 1 into a spare element of communication that
happens anyway, as the stop signal does (`signals.py`): sync's last gradient
bucket, the federated round's Allreduce, async's segment-closing reduction.
So all ranks learn of it at the same step without a message of their own, and
no non-finite update reaches the weights on any rank. Only on that rare path
do the ranks exchange where each saw it (one allgather of a short name), so
the one line can name the ranks and the first non-finite tensor.

`--on-nan stop` (the default) then raises NonFinite on every rank and the CLI
exits EX_DATAERR (65) without writing a checkpoint: the newest checkpoint is the
last good state. `--on-nan skip` drops the step's update everywhere and counts it.
"""
import math

import torch

__all__ = ["EXIT_NONFINITE", "NonFinite", "grads_finite", "first_nonfinite", "describe_ranks", "diagnosis"]

EXIT_NONFINITE = 65  # EX_DATAERR from sysexits.h: the data (or what training made of it) is bad


class NonFinite(Exception):
    """Raised on every rank after the agreed non-finite stop; the CLI exits 65."""

    everywhere = True  # raised alike on every rank: one reports it (api.aborting_excepthook)

    def __init__(self, where, ranks, tensor):
        super().__init__(f"non-finite {tensor} at {where} on {describe_ranks(ranks)}: every rank stopped there, "
                         f"no checkpoint written (the newest one is the last good state)")
        self.where, self.ranks, self.tensor = where, list(ranks), tensor


def grads_finite(buffers):
    """Whether every gradient in these flat buffers is finite: one sum per buffer and no buffer-sized
    temporary (a NaN or infinity makes the sum non-finite; so would an overflow of huge finite
    gradients, which would wreck the step anyway)."""
    return all(math.isfinite(b.sum().item()) for b in buffers if b.numel())


def first_nonfinite(loss, buffers, model):
    """None when `loss` (a float) and the gradients in the flat `buffers` are finite (the cheap check,
    every step); else the name the message gives: 'loss', or 'NAME.grad' of the first non-finite
    gradient (the rare path scans them all)."""
    if math.isfinite(loss) and grads_finite(buffers):
        return None
    if not math.isfinite(loss):
        return "loss"
    for name, p in model.named_parameters():
        if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
            return f"{name}.grad"
    return "gradient sum"  # finite gradients whose sum overflowed


def describe_ranks(ranks):
    """'rank 1' or 'ranks 0, 2'."""
    ranks = list(ranks)
    return f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"


def diagnosis(seen):
    """(ranks that saw a non-finite value, the lowest such rank's tensor) from every rank's name or None."""
    ranks = [r for r, name in enumerate(seen) if name]
    return ranks, seen[ranks[0]] if ranks else "value"
