"""Models: a small registry, or the user's own `module:function` / `file.py:function`.

Every builder is called as `builder(input_shape, num_outputs, hidden)` and
returns an nn.Module; input and output sizes come from the data set (gpt: the
block length and the vocabulary). A user's function is called as
`function(input_shape, num_outputs)`.
"""
import math

import numpy as np
import torch
from torch import nn

from .config import UsageError
from .userfn import is_function_spec, load_function

__all__ = ["build_model", "REGISTRY"]


def mlp(input_shape, num_outputs, hidden=(128, 64)):
    layers, width = [nn.Flatten()], math.prod(input_shape)
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    return nn.Sequential(*layers, nn.Linear(width, num_outputs))


def cnn(input_shape, num_outputs, hidden=(128,)):
    """Two 3x3 convolutions, a 2x2 max-pool and a dense head; needs (C, H, W) inputs."""
    if len(input_shape) != 3:
        raise UsageError(f"--model cnn needs image-shaped samples (C, H, W); this data set's samples "
                         f"have shape {tuple(input_shape)} (use mlp, or a data set such as digits)")
    channels, height, width = input_shape
    if min(height, width) < 2:
        raise UsageError(f"--model cnn needs images of at least 2x2, got {height}x{width}")
    head = hidden[0] if hidden else 128
    return nn.Sequential(
        nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(32 * (height // 2) * (width // 2), head), nn.ReLU(),
        nn.Linear(head, num_outputs))


def logreg(input_shape, num_outputs, hidden=()):
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_outputs))


linear = logreg  # the same layer; the loss (cross-entropy or MSE) makes the difference

def gpt(input_shape, num_outputs, hidden=(), *, layers=4, heads=4, embed=128):
    """A character-level decoder-only transformer (distml.gpt): tokens (B, T) -> logits (B, T, vocab)."""
    from .gpt import gpt as build
    if len(input_shape) != 1:
        raise UsageError(f"--model gpt needs token sequences (samples of shape (T,)), got {tuple(input_shape)} "
                         f"(use --dataset text or a Dataset of token blocks)")
    if num_outputs < 2:
        raise UsageError("--model gpt needs class (token) targets and a vocabulary: give the Dataset a "
                         "num_classes attribute")
    try:
        return build(num_outputs, input_shape[0], layers=layers, heads=heads, embed=embed)
    except ValueError as e:
        raise UsageError(f"--model gpt: {e}")


REGISTRY = {"mlp": mlp, "cnn": cnn, "logreg": logreg, "linear": linear, "gpt": gpt}


def build_model(name, dataset, hidden=(128, 64), seed=0, **arch):
    """The model named `name` for `dataset`, initialized from `seed`, checked on two samples.

    `arch`: the transformer's layers, heads and embed (--model gpt).
    """
    if name == "logreg" and dataset.task != "classification":
        raise UsageError("--model logreg is for classification; use --model linear for regression")
    if name == "linear" and dataset.task != "regression":
        raise UsageError("--model linear is for regression; use --model logreg for classification")
    torch.manual_seed(seed)
    if name == "gpt":
        model = gpt(dataset.input_shape, dataset.num_outputs, **arch)
    elif name in REGISTRY:
        model = REGISTRY[name](dataset.input_shape, dataset.num_outputs, hidden)
    elif is_function_spec(name):
        model = _call_user_function(name, dataset)
    else:
        raise UsageError(f"--model must be one of {', '.join(REGISTRY)} or module:function "
                         f"or path/to/file.py:function, got {name!r}")
    if not isinstance(model, nn.Module):
        raise UsageError(f"--model {name} returned {type(model).__name__}, not a torch.nn.Module")
    if not any(p.requires_grad for p in model.parameters()):
        raise UsageError(f"--model {name} has no trainable parameters")
    _check_output_shape(model, name, dataset)
    return model


def _call_user_function(spec, dataset):
    fn = load_function(spec, "model")
    try:
        return fn(dataset.input_shape, dataset.num_outputs)
    except Exception as e:  # their code, their mistake: one line, exit 2
        raise UsageError(f"--model {spec}({dataset.input_shape}, {dataset.num_outputs}) failed: "
                         f"{type(e).__name__}: {e}")


def probe_batch(dataset):
    """The first two training samples as a batch (one where there is one): what set-up checks run on."""
    return dataset.train.batch(np.arange(min(2, len(dataset.train))))


@torch.no_grad()
def probe_output(model, x):
    """The model's output on the probe inputs `x`, in eval mode (BatchNorm would refuse one sample)."""
    model.eval()
    try:
        return model(x)
    finally:
        model.train()


def _check_output_shape(model, name, dataset):
    x, _ = probe_batch(dataset)
    try:
        out = probe_output(model, x)
    except Exception as e:
        raise UsageError(f"--model {name} does not accept samples of shape "
                         f"{tuple(dataset.input_shape)} from {dataset.name}: {type(e).__name__}: {e}")
    if not isinstance(out, torch.Tensor):
        raise UsageError(f"--model {name} returned {type(out).__name__}, not a tensor")
    if dataset.target_shape:  # sequences and other shapes: the loss's check (losses.check_loss) decides
        return
    want = (len(x), dataset.num_outputs)
    if tuple(out.shape) != want and not (dataset.task == "regression" and tuple(out.shape) == (len(x),)):
        raise UsageError(f"--model {name} outputs shape {tuple(out.shape)} for a batch of {len(x)}; "
                         f"{dataset.name} needs {want} ({dataset.task})")
