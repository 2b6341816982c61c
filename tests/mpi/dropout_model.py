"""A user model with dropout, for `--model tests/mpi/dropout_model.py:make` (not a test module)."""
import math

from torch import nn


def make(input_shape, num_outputs):
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), 32), nn.ReLU(), nn.Dropout(0.3),
                         nn.Linear(32, num_outputs))
