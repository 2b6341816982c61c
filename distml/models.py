"""Models: a small registry, or the user's own `module:function` / `file.py:function`.

Every builder is called as `builder(input_shape, num_outputs, hidden)` and
returns an nn.Module; input and output sizes come from the data set. A user's
function is called as `function(input_shape, num_outputs)`.
"""
import importlib
import importlib.util
import math
import os
import sys

import numpy as np
import torch
from torch import nn

from .config import UsageError

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

REGISTRY = {"mlp": mlp, "cnn": cnn, "logreg": logreg, "linear": linear}


def build_model(name, dataset, hidden=(128, 64), seed=0):
    """The model named `name` for `dataset`, initialized from `seed`, checked on one sample."""
    if name == "logreg" and dataset.task != "classification":
        raise UsageError("--model logreg is for classification; use --model linear for regression")
    if name == "linear" and dataset.task != "regression":
        raise UsageError("--model linear is for regression; use --model logreg for classification")
    torch.manual_seed(seed)
    if name in REGISTRY:
        model = REGISTRY[name](dataset.input_shape, dataset.num_outputs, hidden)
    elif ":" in name:
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
    fn = _user_function(spec)
    try:
        return fn(dataset.input_shape, dataset.num_outputs)
    except Exception as e:  # their code, their mistake: one line, exit 2
        raise UsageError(f"--model {spec}({dataset.input_shape}, {dataset.num_outputs}) failed: "
                         f"{type(e).__name__}: {e}")


def _user_function(spec):
    where, _, func = spec.rpartition(":")
    try:
        if where.endswith(".py"):
            if not os.path.isfile(where):
                raise UsageError(f"--model: no such file: {where}")
            loader = importlib.util.spec_from_file_location("distml_user_model", where)
            module = importlib.util.module_from_spec(loader)
            sys.modules[loader.name] = module  # dataclasses and pickling look modules up here
            try:
                loader.loader.exec_module(module)
            except BaseException:
                del sys.modules[loader.name]
                raise
        else:
            module = importlib.import_module(where)
    except UsageError:
        raise
    except Exception as e:  # the user's module failed to import: report it as their mistake
        raise UsageError(f"--model {spec}: cannot import {where}: {type(e).__name__}: {e}")
    fn = getattr(module, func, None)
    if not callable(fn):
        raise UsageError(f"--model {spec}: {where} has no function {func!r}")
    return fn


def _check_output_shape(model, name, dataset):
    sample = torch.from_numpy(np.array(dataset.X_train[:1]))
    model.eval()  # one sample: BatchNorm in training mode would refuse it
    try:
        with torch.no_grad():
            out = model(sample)
    except Exception as e:
        raise UsageError(f"--model {name} does not accept samples of shape "
                         f"{tuple(dataset.input_shape)} from {dataset.name}: {e}")
    finally:
        model.train()
    want = (1, dataset.num_outputs)
    if tuple(out.shape) != want and not (dataset.task == "regression" and tuple(out.shape) == (1,)):
        raise UsageError(f"--model {name} outputs shape {tuple(out.shape)} per sample batch of 1; "
                         f"{dataset.name} needs {want} ({dataset.task})")
