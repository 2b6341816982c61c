"""A user model that goes non-finite on cue, for `--model tests/mpi/nan_model.py:make` (not a test module).

Its DISTML_TEST_NAN_STEP-th training forward (counted from 1; default 3) on rank
DISTML_TEST_NAN_RANK (default 0; -1: every rank) multiplies the output by
DISTML_TEST_NAN_FACTOR (default nan). Factor 0 instead makes that step's
gradients exactly zero: with plain SGD, the same weights as skipping the step,
the reference the skip tests compare against. The rank is OMPI_COMM_WORLD_RANK
(0 without mpirun). Evaluation (eval mode) does not count.
"""
import math
import os

from torch import nn


class NanAt(nn.Module):
    def __init__(self, inner, *, at, rank, factor):
        super().__init__()
        self.inner, self.at, self.factor, self.forwards = inner, at, factor, 0
        self.armed = rank in (-1, int(os.environ.get("OMPI_COMM_WORLD_RANK", "0")))

    def forward(self, x):
        out = self.inner(x)
        if self.training:
            self.forwards += 1
            if self.armed and self.forwards == self.at:
                out = out * self.factor
        return out


def make(input_shape, num_outputs):
    inner = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), 32), nn.ReLU(),
                          nn.Linear(32, num_outputs))
    return NanAt(inner, at=int(os.environ.get("DISTML_TEST_NAN_STEP", "3")),
                 rank=int(os.environ.get("DISTML_TEST_NAN_RANK", "0")),
                 factor=float(os.environ.get("DISTML_TEST_NAN_FACTOR", "nan")))
