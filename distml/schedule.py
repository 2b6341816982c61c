"""Learning-rate schedules: the learning rate as a pure function of the step.

Because the rate depends only on (step, total steps), a resumed run sets
exactly the rate the uninterrupted run would have, with nothing to save but
the position. A step is a sync step, a parameter-server update or a
federated round.

- constant: --lr throughout.
- cosine: --lr * (1 + cos(pi * t)) / 2, t going from 0 to 1 over the steps
  after warm-up (Loshchilov and Hutter's SGDR without restarts).
- step: --lr, x0.1 from half-way, x0.01 from three quarters of the run.

--warmup-epochs W ramps linearly from --lr / (warm-up steps) up to --lr over
the first W epochs (Goyal et al.'s gradual warm-up for large global batches).
"""
import math

__all__ = ["lr_at", "set_lr"]


def lr_at(base_lr, schedule, step, total, warmup=0):
    """The learning rate for 0-based `step` of `total`, with `warmup` steps of linear warm-up."""
    if not 0 <= step < total:
        raise ValueError(f"step must be in [0, {total}), got {step}")
    warmup = min(int(round(warmup)), total - 1)
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if schedule == "constant":
        return base_lr
    if schedule == "cosine":
        return base_lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
    if schedule == "step":
        return base_lr * 0.1 ** ((step >= total // 2) + (step >= (3 * total) // 4))
    raise ValueError(f"schedule must be constant, cosine or step, got {schedule!r}")


def set_lr(optimizer, lr):
    """Give every parameter group of `optimizer` the learning rate `lr`."""
    for group in optimizer.param_groups:
        group["lr"] = lr
