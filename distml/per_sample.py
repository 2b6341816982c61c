"""Per-sample gradients with torch.func, clipped and summed: the heart of a DP-SGD step.

`vmap(grad_and_value(loss of one sample))` gives every sample's gradient in
one batched pass, for any model built of ordinary layers (no module hooks, as
Opacus's `grad_sample_mode="functorch"`). BatchNorm is refused: it mixes the
samples of a batch, so one sample's gradient depends on the others and no
per-sample bound holds; GroupNorm (or LayerNorm) normalises each sample alone.
"""
import torch
from torch.func import functional_call, grad_and_value, vmap

from .config import UsageError
from .privacy import clip_factor

__all__ = ["check_private_model", "per_sample_grads", "add_clipped_grad_sum_"]


def check_private_model(model):
    """UsageError for layers that mix samples (BatchNorm), naming the replacement."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            raise UsageError(f"differential privacy bounds each sample's gradient, but {type(module).__name__} "
                             f"{name or 'the model'} mixes the samples of a batch: use GroupNorm (or LayerNorm) "
                             f"instead, e.g. torch.nn.GroupNorm(1, channels)")


def per_sample_grads(model, loss, x, y, precision="float32"):
    """({name: (batch, *shape) gradients} of each trainable parameter, per-sample losses (batch,))."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = dict(model.named_buffers())

    def sample_loss(params, xi, yi):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = functional_call(model, (params, buffers), (xi.unsqueeze(0),))
            return loss(out, yi.unsqueeze(0)).float().sum()

    # randomness="different": each sample its own dropout mask, as in an ordinary batch
    return vmap(grad_and_value(sample_loss), in_dims=(None, 0, 0), randomness="different")(params, x, y)


def add_clipped_grad_sum_(model, loss, x, y, clip, scale, precision="float32"):
    """Add scale x sum_i clip(g_i) to each trainable parameter's .grad; returns the summed loss.

    clip(g) = g x min(1, C / (||g|| + 1e-6)), the norm over all parameters at once.
    """
    grads, losses = per_sample_grads(model, loss, x, y, precision)
    norms = torch.linalg.vector_norm(torch.stack([g.reshape(len(x), -1).norm(dim=1) for g in grads.values()]), dim=0)
    factors = clip_factor(norms, clip) * scale
    named = dict(model.named_parameters())
    for name, g in grads.items():
        summed = torch.einsum("b,b...->...", factors.to(g.dtype), g)
        p = named[name]
        p.grad = summed if p.grad is None else p.grad.add_(summed)
    return losses.sum()
