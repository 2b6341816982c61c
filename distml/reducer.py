"""Gradient averaging over fused flat buckets, copying nothing.

Like PyTorch DDP with `gradient_as_bucket_view=True`: each parameter's `.grad`
is made a view into a flat bucket buffer, so backward() accumulates straight
into the buffers MPI reduces, and one in-place Allreduce per bucket averages
every gradient in it. A gather-copy-scatter reducer spends most of MPI's
advantage on the copies.
"""
import torch

from .flat import Bucket

__all__ = ["plan_buckets", "GradientReducer"]


def plan_buckets(params, bucket_bytes):
    """Group parameters into buckets of at most `bucket_bytes` (one dtype per bucket).

    A parameter larger than the cap gets a bucket of its own. Order follows
    `params`, so every rank builds the same plan from the same model.
    """
    buckets, current, current_bytes = [], [], 0
    for p in params:
        nbytes = p.numel() * p.element_size()
        fits = current_bytes + nbytes <= bucket_bytes and (not current or current[0].dtype == p.dtype)
        if current and not fits:
            buckets.append(current)
            current, current_bytes = [], 0
        current.append(p)
        current_bytes += nbytes
    if current:
        buckets.append(current)
    return buckets


class GradientReducer:
    """Sums or averages the gradients of `params` over `comm`, one Allreduce per bucket.

    op="average" divides by the world size (Horovod's default); op="sum" leaves
    the sum, for callers that already scaled their loss by the global batch size.
    `control` extra elements ride at the end of the last bucket (`self.control`):
    a caller writes per-rank values there before `allreduce_grads()` and reads
    their sum after, with no message of its own (the trainer's stop flag).
    """

    def __init__(self, params, comm, *, bucket_mb=25.0, op="average", control=0):
        if bucket_mb <= 0:
            raise ValueError(f"bucket_mb must be > 0, got {bucket_mb}")
        if op not in ("average", "sum"):
            raise ValueError(f"op must be 'average' or 'sum', got {op!r}")
        params = list({id(p): p for p in params if p.requires_grad}.values())  # each once
        if any(p.device.type != "cpu" for p in params):
            raise ValueError("distml reduces CPU tensors; move the model to the CPU")
        self.comm = comm
        self.op = op
        plan = plan_buckets(params, int(bucket_mb * 2**20))
        self.buckets = [Bucket(b, extra=control if i == len(plan) - 1 else 0) for i, b in enumerate(plan)]
        self.control = self.buckets[-1].extra if self.buckets else torch.zeros(0)
        self._labels = [f"bucket {i + 1} of {len(self.buckets)}" for i in range(len(self.buckets))]  # the call record's

    def zero_grad(self):
        """Zero the buckets in place (set_to_none would detach the grads from them)."""
        for bucket in self.buckets:
            bucket.attach_grads()  # before zeroing: it copies a replaced .grad into the buffer
            bucket.buffer.zero_()

    def allreduce_grads(self):
        """Reduce every bucket in place; afterwards each `.grad` holds the result."""
        for i, bucket in enumerate(self.buckets):
            if not bucket.grads_attached():  # user set grads to None or replaced them
                bucket.attach_grads()
            self.comm.allreduce_(bucket.buffer, what=self._labels[i])
            if self.op == "average" and self.comm.size > 1:
                bucket.grads.div_(self.comm.size)
