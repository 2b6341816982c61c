"""A user model with BatchNorm, for `--model tests/mpi/bn_model.py:make` (not a test module)."""
import math

from torch import nn


def make(input_shape, num_outputs):
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), 16), nn.BatchNorm1d(16),
                         nn.ReLU(), nn.Linear(16, num_outputs))
