"""A user model that misbehaves on one rank, for the fault tests (`--model tests/mpi/fault_model.py:make`).

DISTML_TEST_FAULT says how: `sleep` (its forward sleeps an hour: a stalled rank), `kill` (SIGKILL
to itself: a lost node), `raise` (an exception), `pause` (sleeps 2 s and goes on: time for a test to
cut a link or kill a host at a known step); on rank DISTML_TEST_FAULT_RANK (default 1) at its
DISTML_TEST_FAULT_STEP-th training forward (default 3, counted from 1); first it writes the time
to the file DISTML_TEST_FAULT_MARK if that is set. Not a test module.
"""
import math
import os
import signal
import time

from torch import nn


class FaultyMLP(nn.Module):
    def __init__(self, input_shape, num_outputs):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), 16), nn.ReLU(),
                                 nn.Linear(16, num_outputs))
        self.forwards = 0
        self.fault = os.environ.get("DISTML_TEST_FAULT", "")
        self.mine = int(os.environ.get("OMPI_COMM_WORLD_RANK", "0")) == int(os.environ.get("DISTML_TEST_FAULT_RANK", "1"))
        self.at = int(os.environ.get("DISTML_TEST_FAULT_STEP", "3"))

    def forward(self, x):
        if self.training and self.mine:
            self.forwards += 1
            if self.forwards == self.at:
                _misbehave(self.fault)
        return self.net(x)


def _misbehave(fault):
    mark = os.environ.get("DISTML_TEST_FAULT_MARK")
    if mark:
        with open(mark, "w") as f:
            f.write(repr(time.time()))
    if fault == "sleep":
        time.sleep(3600)
    elif fault == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif fault == "pause":
        time.sleep(2)
    elif fault == "raise":
        raise RuntimeError("the test model failed on purpose")


def make(input_shape, num_outputs):
    return FaultyMLP(input_shape, num_outputs)
