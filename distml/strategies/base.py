"""The interface every mode implements, and the small pieces modes share."""
import time
from contextlib import contextmanager

import torch

from ..data.loader import Loader
from ..losses import make_loss

__all__ = ["Strategy", "EpochStats", "Flags", "make_optimizer", "summed_loss", "clip_grad_norm_", "compute_phase"]


class EpochStats:
    """This rank's share of an epoch so far: summed loss and samples."""

    __slots__ = ("loss_sum", "samples")

    def __init__(self):
        self.loss_sum, self.samples = 0.0, 0


class Flags:
    """What ranks agree on between units of work: stop (a signal), checkpoint now (root's clock), and
    `nonfinite`: the updates of this unit withheld for a non-finite loss or gradient (0: none)."""

    __slots__ = ("stop", "checkpoint", "nonfinite")

    def __init__(self, stop=False, checkpoint=False, nonfinite=0):
        self.stop, self.checkpoint, self.nonfinite = bool(stop), bool(checkpoint), int(nonfinite)

    def values(self):
        return [float(self.stop), float(self.checkpoint), float(self.nonfinite)]

    @classmethod
    def summed(cls, values):
        """The agreement from the flags' sums over ranks (any rank's stop; root's checkpoint; any
        rank's non-finite value withholds the one update of a sync step or a federated round)."""
        return cls(values[0] > 0, values[1] > 0, values[2] > 0)


class Strategy:
    """One mode of training, driven by the one loop in `trainer.run`:

        setup()                              once, a collective (e.g. broadcast the initial weights)
        units_in(epoch)                      units of work in an epoch: sync steps, one async
                                             segment of updates, one federated round
        run_unit(epoch, index, wants)        one unit; returns (agreed Flags, whether it finished).
                                             `wants()` gives this rank's Flags now; they travel
                                             inside the unit's own communication
        end_epoch(epoch)                     the epoch's training record (a collective)
        share_model()                        every rank holds the model to evaluate and save
        model_state(), state_dict(),         collectives that give root what a checkpoint needs to
        rank_state()                         continue exactly (rank_state: this rank's own part)
        load_state_dict(state, own)          the reverse, on every rank (own: this rank's part, or
                                             None on another world size)
        summary(history, train_time)         mode-specific summary fields (may be a collective)
        describe(epoch, index)               where the training is, for the hang doctor's record
        replica_state(), load_replica_state  what one rank hands the others after a lost rank
        survive(lost, old_size, position)    re-split the work over the survivors (after shrink)

    A unit whose agreed Flags.nonfinite > 0 has made no update with non-finite
    values on any rank; `nonfinite` then names what this rank saw first in it
    ('loss', 'NAME.grad'; None: nothing), for the trainer's message.

    A strategy never parses flags and never prints: it gets the config, data,
    model and communicator, and hands back numbers.
    """

    unit = "epoch"  # what the trainer calls an epoch of this mode in its lines and summary
    nonfinite = None  # this rank's first non-finite tensor in the last unit, or None

    def __init__(self, cfg, dataset, model, comm, loss=None):
        self.cfg, self.dataset, self.model, self.comm = cfg, dataset, model, comm
        self.loss = loss or make_loss(cfg.loss, dataset.task)  # per sample (losses.py)
        self.loader = Loader(dataset.train, cfg.data_workers, calls=comm.calls)

    def summed_loss(self, x, y):
        """This batch's loss summed over its samples (float32, --precision's forward)."""
        return summed_loss(self.model, self.loss, x, y, self.cfg.precision)

    def setup(self):
        raise NotImplementedError

    def epochs(self):
        """How many of the trainer's epochs the run has."""
        return self.cfg.epochs

    def work_done(self, epoch, step):
        """Units of work done in all at (epoch, step): a checkpoint's number."""
        return sum(self.units_in(e) for e in range(epoch)) + step

    def check_resume(self, saved, world_size, state=None):
        """Why a checkpoint made with config dict `saved` on `world_size` ranks cannot continue here, or None."""
        return None if saved["batch_size"] == self.cfg.batch_size else \
            f"was made with --batch-size {saved['batch_size']}, this run has {self.cfg.batch_size}"

    def loads_data(self):
        """Whether this rank reads training batches (an async parameter server does not)."""
        return True

    def evaluate_extra(self):
        """Mode-specific scores of the shared model (a collective)."""
        return {}

    def units_in(self, epoch):
        raise NotImplementedError

    def run_unit(self, epoch, index, wants):
        raise NotImplementedError

    def end_epoch(self, epoch):
        raise NotImplementedError

    def share_model(self):
        """By default the replicas already agree."""

    def model_state(self):
        return self.model.state_dict()

    def state_dict(self):
        return {}

    def rank_state(self):
        return {}

    def load_state_dict(self, state, own):
        """Restore from `state` (the model is already loaded); `own` is rank_state() or None."""

    def summary(self, history, train_time):
        return {}

    # -- losing a rank (--on-rank-failure continue) ------------------------------------
    def describe(self, epoch, index):
        return f"{self.unit} {epoch + 1} step {index + 1}"

    def replica_state(self):
        """What every rank holds alike (model, optimizer): the furthest rank's goes to the others."""
        raise NotImplementedError(f"{type(self).__name__} cannot go on without a lost rank")

    def load_replica_state(self, state):
        raise NotImplementedError(f"{type(self).__name__} cannot go on without a lost rank")

    def survive(self, lost, old_size, position):
        """The ranks `lost` (numbers in the communicator of `old_size` ranks) are gone; `self.comm`
        already holds the survivors; training goes on from `position` (epoch, unit, recorded)."""
        raise NotImplementedError(f"{type(self).__name__} cannot go on without a lost rank")


def make_optimizer(cfg, params):
    """The optimizer --optimizer names over `params` (a module's named parameters, or tensors).

    adamw decays only parameters of two or more dimensions (weights), not biases and norms'
    gains: nanoGPT's and most transformer recipes' rule. Given plain tensors (a parameter
    server's flat range) it has no shapes to go by and decays all of them.
    """
    params = list(params)
    if cfg.optimizer == "adamw":
        named = params and isinstance(params[0], tuple)
        groups = ([{"params": [p for _, p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                   {"params": [p for _, p in params if p.dim() < 2], "weight_decay": 0.0}] if named else params)
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.beta_values(), weight_decay=cfg.weight_decay)
    params = [p for _, p in params] if params and isinstance(params[0], tuple) else params
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=cfg.beta_values(), weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def summed_loss(model, loss, x, y, precision="float32"):
    """The loss of batch (x, y) summed over its samples, a float32 0-d tensor to call backward on.

    bf16: forward and loss under CPU autocast (matrix products in bfloat16); the per-sample
    losses, and so the gradients' scale, stay float32, as do the weights and gradients.
    """
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        per_sample = loss(model(x), y)
    return per_sample.float().sum()


def clip_grad_norm_(grads, max_norm):
    """Scale the gradient tensors `grads` in place so their global L2 norm is at most `max_norm`.

    As torch.nn.utils.clip_grad_norm_ (the same 1e-6 guard), over flat buffers or `.grad`s.
    Returns the norm before clipping.
    """
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    scale = max_norm / (norm + 1e-6)
    if scale < 1:
        for g in grads:
            g.mul_(scale)
    return float(norm)


@contextmanager
def compute_phase(cfg, rank):
    """Wraps one step's computation; on --slow-rank it then sleeps to make it --slow-factor x slower.

    A benchmark aid (straggler experiments), off unless asked for.
    """
    start = time.perf_counter()
    yield
    if rank == cfg.slow_rank and cfg.slow_factor > 1:
        time.sleep((cfg.slow_factor - 1) * (time.perf_counter() - start))
