"""The small interface every mode implements, and what modes share."""
import time
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

__all__ = ["Strategy", "EpochStats", "loss_sum", "make_optimizer", "batch_tensors", "compute_phase"]


class EpochStats:
    """This rank's share of an epoch: summed loss and samples."""

    __slots__ = ("loss_sum", "samples")

    def __init__(self):
        self.loss_sum, self.samples = 0.0, 0


class Strategy:
    """One mode of training. The trainer calls setup() once, then train_epoch() per epoch.

    A strategy never parses flags and never prints: it gets the config, data,
    model and communicator, and hands back numbers.
    """

    def __init__(self, cfg, dataset, model, comm):
        self.cfg, self.dataset, self.model, self.comm = cfg, dataset, model, comm

    def setup(self):
        """Collective start-up (e.g. broadcast the initial weights)."""

    def train_epoch(self, epoch, progress):
        """Train one epoch; `progress(iterable, total)` wraps the step loop. Returns EpochStats.

        A mode whose ranks do not move through epochs together (async) defines
        run(progress) for the whole training and finish() to share the result instead.
        """
        raise NotImplementedError

    def extra_metrics(self, train_time):
        """Mode-specific summary fields (called on every rank; may be a collective)."""
        return {}


def loss_sum(output, target, task):
    """The summed (not averaged) loss, so callers can divide by a global batch size."""
    if task == "classification":
        return nn.functional.cross_entropy(output, target, reduction="sum")
    return nn.functional.mse_loss(output.reshape(target.shape), target, reduction="sum")


def make_optimizer(cfg, params):
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def batch_tensors(X, y, indices):
    """Tensors for the samples `indices` (works on memory-mapped arrays too)."""
    return torch.from_numpy(np.ascontiguousarray(X[indices])), torch.from_numpy(np.asarray(y[indices]))


@contextmanager
def compute_phase(cfg, rank):
    """Wraps one step's computation; on --slow-rank it then sleeps to make it --slow-factor x slower.

    A benchmark aid (straggler experiments), off unless asked for.
    """
    start = time.perf_counter()
    yield
    if rank == cfg.slow_rank and cfg.slow_factor > 1:
        time.sleep((cfg.slow_factor - 1) * (time.perf_counter() - start))
