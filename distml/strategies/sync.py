"""Synchronous data parallelism: every step, gradients are summed over ranks.

Each rank's loss is summed over its samples and divided by the *global*
batch size, and the reducer sums those gradients with Allreduce. The result is
the gradient of single-process training on the whole global batch, also for
the last, partial batch where ranks hold different sample counts. Three spare
elements at the end of the last gradient bucket carry the ranks' stop,
checkpoint and non-finite flags, so agreeing on them costs 12 bytes a step and
no message.

Nothing here depends on the world size but the split of each global batch,
so a checkpoint resumes on any number of ranks with the same global batch, and
after a lost rank (--on-rank-failure continue) the survivors split each global
batch among themselves, redo the interrupted step and end with the weights of
the uninterrupted run.
"""
import math
import resource

import numpy as np
import torch

from ..api import broadcast_buffers, broadcast_parameters
from ..nonfinite import first_nonfinite
from ..per_sample import add_clipped_grad_sum_
from ..privacy import PrivateRun, poisson_sample
from ..reducer import GradientReducer
from ..schedule import lr_at, set_lr
from ..zero import ShardedOptimizer
from ..sharding import num_steps, shard_batches
from .base import EpochStats, Flags, Strategy, clip_grad_norm_, compute_phase, make_optimizer


class SyncStrategy(Strategy):
    def setup(self):
        cfg, comm = self.cfg, self.comm
        broadcast_parameters(self.model, comm=comm)  # distributed: all start from root's weights
        self.optimizer = make_optimizer(cfg, self.model.named_parameters())
        self.reducer = None
        if cfg.zero:  # ZeRO: the optimizer's own flat, sliced buffers replace the reducer's buckets
            self.optimizer = ShardedOptimizer(self.optimizer, comm, stage=cfg.zero, compression=cfg.compression,
                                              bucket_mb=cfg.bucket_mb, chunk_mb=cfg.chunk_mb, check_finite=True,
                                              model=self.model)
            self._names = {id(p): name for name, p in self.model.named_parameters()}
        else:
            self.reducer = GradientReducer(self.model.parameters(), comm, bucket_mb=cfg.bucket_mb, op="sum",
                                           control=3,  # Flags: stop, checkpoint, nonfinite
                                           chunk_mb=cfg.chunk_mb, compression=cfg.compression,
                                           overlap=cfg.overlap)
        self.global_batch = cfg.batch_size * cfg.accumulate * comm.size  # kept when ranks are lost
        self.steps_per_epoch = num_steps(len(self.dataset.train), self.global_batch)
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch
        self.stats = EpochStats()
        self._batches = (None, None)  # (epoch, _epoch_batches(epoch))
        self.private = None  # DP-SGD (--dp-clip): Poisson batches of expected size global_batch
        if cfg.dp:
            self.private = PrivateRun(cfg, self.global_batch / len(self.dataset.train), self.total_steps,
                                      self.global_batch, comm)

    def epochs(self):
        """--epochs, or as many as --max-steps begins (the last one cut short)."""
        return -(-self.total_steps // self.steps_per_epoch)

    def units_in(self, epoch):
        return min(self.steps_per_epoch, self.total_steps - epoch * self.steps_per_epoch)

    def run_unit(self, epoch, step, wants):
        """One step: gradients of this rank's part of global batch `step`, summed over ranks.

        The part is --accumulate micro-batches; their gradients add up in the buckets, and one
        reduction follows. A non-finite loss or gradient on any rank (agreed in the reduction)
        means no update on any rank, and the step's loss and samples do not count.
        """
        micro, starts, global_sizes = self._epoch_batches(epoch)
        self.model.train()
        (self.optimizer if self.cfg.zero else self.reducer).zero_grad()
        if self.cfg.zero:  # stage 2 reduces a bucket in this rank's last backward of the step
            self.optimizer.passes = starts[step + 1] - starts[step]
        loss, samples = 0.0, 0
        for position in range(starts[step], starts[step + 1]):  # none: the last global batch left this rank none
            with compute_phase(self.cfg, self.comm.rank):
                x, y = self.loader.get("train", epoch, micro, position)
                if self.private:  # sum of the samples' clipped gradients / the expected global batch
                    summed = add_clipped_grad_sum_(self.model, self.loss, x, y, self.private.clip,
                                                   1.0 / global_sizes[step], self.cfg.precision)
                else:
                    summed = self.summed_loss(x, y)
                    (summed / global_sizes[step]).backward()
            loss, samples = loss + summed.item(), samples + len(micro[position])
        agreed = (self._reduce_sharded if self.cfg.zero else self._reduce)(loss, wants(),
                                                                         epoch * self.steps_per_epoch + step,
                                                                         global_sizes[step])
        if not agreed.nonfinite:
            if self.cfg.clip_norm:  # the reduced gradient's norm: the same on every rank, as in one process
                if self.cfg.zero:
                    self.optimizer.clip_grad_norm_(self.cfg.clip_norm)
                else:
                    clip_grad_norm_([b.grads for b in self.reducer.buckets], self.cfg.clip_norm)
            self.stats.loss_sum += loss
            self.stats.samples += samples
            self._step(epoch * self.steps_per_epoch + step)
        return agreed, True

    def _reduce(self, loss, mine, position, expected):
        """Allreduce (sum) the buckets, the flags riding in the last one's spare elements."""
        self.reducer.attach_grads()  # the buckets hold this step's gradients (zero where backward gave none)
        self.nonfinite = first_nonfinite(loss, [b.grads for b in self.reducer.buckets], self.model)
        if self.private and self.comm.is_root:  # the noise, once: root's part of the sum carries it
            self._add_noise(position, expected)
        mine.nonfinite = self.nonfinite is not None
        self.reducer.control.copy_(torch.tensor(mine.values()))
        self.reducer.allreduce_grads()  # distributed: Allreduce (sum) of the buckets, flags included
        return Flags.summed(self.reducer.control.tolist())

    def _reduce_sharded(self, loss, mine, position, expected):
        """Reduce-scatter each rank's slice of the gradients (stage 2: what backward left), then agree
        on the flags in a small Allreduce of their own (each rank holds a different slice)."""
        if self.private and self.comm.is_root:
            self._add_noise(position, expected)
        self.optimizer.reduce_gradients()
        seen = self.optimizer.nonfinite
        self.nonfinite = ("loss" if not math.isfinite(loss) else
                          f"{self._names.get(id(seen), 'gradient')}.grad" if seen is not None else None)
        mine.nonfinite = self.nonfinite is not None
        flags = torch.tensor(mine.values(), dtype=torch.float64)
        return Flags.summed(self.comm.allreduce_(flags, what="the step's flags").tolist())

    def _add_noise(self, position, expected):
        """N(0, (zC)^2) on each coordinate of the summed gradient, divided by the expected batch like it."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        noise = self.private.noise.gaussian((sum(p.numel() for p in params),), self.private.update_std() / expected,
                                            position, dtype=torch.float32)
        offset = 0
        for p in params:
            part = noise[offset:offset + p.numel()].view_as(p)
            p.grad = part.clone() if p.grad is None else p.grad.add_(part)  # None: root drew no sample
            offset += p.numel()

    def _step(self, position):
        cfg = self.cfg
        set_lr(self.optimizer, lr_at(cfg.lr, cfg.schedule(), position, self.total_steps,
                                     cfg.warmup_epochs * self.steps_per_epoch))
        self.optimizer.step_and_gather() if self.cfg.zero else self.optimizer.step()

    def _epoch_batches(self, epoch):
        """This rank's micro-batches of `epoch` (index arrays), where each step's begin, and each
        step's global batch size.

        A step's share of the global batch is cut into --accumulate nearly equal micro-batches;
        empty ones (a small last batch) are left out.
        """
        if self._batches[0] != epoch:
            parts, sizes = self._poisson_parts(epoch) if self.private else self._shuffled_parts(epoch)
            micro, starts = [], [0]
            for part in parts:
                micro += [m for m in np.array_split(part, self.cfg.accumulate) if len(m)]
                starts.append(len(micro))
            self._batches = (epoch, (micro, starts, sizes))
        return self._batches[1]

    def _shuffled_parts(self, epoch):
        """This rank's part of each global batch of the epoch's shuffle, and each global batch's size."""
        steps = shard_batches(len(self.dataset.train), self.cfg.batch_size * self.cfg.accumulate, epoch=epoch,
                              seed=self.cfg.seed, rank=self.comm.rank, size=self.comm.size,
                              global_batch=self.global_batch)
        return [batch.indices for batch in steps], [batch.global_size for batch in steps]

    def _poisson_parts(self, epoch):
        """DP-SGD: each step's global batch takes each sample with probability q (the accounted event),
        split over the ranks; its expected size, not its drawn one, divides the summed gradient."""
        n = len(self.dataset.train)
        drawn = [poisson_sample(self.private.sample_seed, "dp-batch", (epoch, step), n, self.private.sample_rate)
                 for step in range(self.steps_per_epoch)]
        return ([np.array_split(d, self.comm.size)[self.comm.rank] for d in drawn],
                [self.global_batch] * self.steps_per_epoch)

    def end_epoch(self, epoch):
        loss, samples = self._totals()
        self.stats = EpochStats()
        record = {"train_loss": loss / max(samples, 1), "samples": int(samples)}
        if self.private:
            record.update(self.private.record(epoch * self.steps_per_epoch + self.units_in(epoch)))
        return record

    def _totals(self):
        return self.comm.allreduce_array([self.stats.loss_sum, self.stats.samples])

    def share_model(self):
        broadcast_buffers(self.model, comm=self.comm)  # BatchNorm statistics: evaluate and save rank 0's

    def state_dict(self):
        loss, samples = self._totals()  # the epoch so far, so its record comes out the same
        return {"optimizer": self.optimizer.state_dict(), "epoch_loss": float(loss), "epoch_samples": int(samples),
                "global_batch": self.global_batch, "privacy": self.private.state_dict() if self.private else None}

    def load_state_dict(self, state, own):
        self.optimizer.load_state_dict(state["optimizer"])
        if self.comm.is_root:  # the epoch's totals so far count once, on root
            self.stats.loss_sum, self.stats.samples = state["epoch_loss"], state["epoch_samples"]

    def check_resume(self, saved, world_size, state=None):
        """Any world size with the same global batch: the result does not depend on the split."""
        then = (state or {}).get("global_batch", saved["batch_size"] * world_size)  # kept after a lost rank
        now = self.global_batch
        if then != now:
            accumulate = saved.get("accumulate", 1)
            micro = f" x --accumulate {accumulate}" if accumulate > 1 else ""
            return (f"has global batch {then} ({world_size} ranks x --batch-size {saved['batch_size']}{micro}); this "
                    f"run has {now}: resume on ranks x --batch-size x --accumulate = {then}")
        return self.private.check_resume((state or {}).get("privacy")) if self.private else None

    def summary(self, history, train_time):
        """Also the optimizer-state and gradient bytes (the most any rank holds between steps; gradients also
        at their peak, whole ones included) and the peak RSS (a collective)."""
        if self.cfg.zero:
            state, grads, peak = (self.optimizer.state_bytes(), self.optimizer.gradient_bytes(),
                                  self.optimizer.gradient_peak_bytes())
        else:
            state = _state_bytes(self.optimizer)
            grads = peak = sum(b.buffer.numel() * b.buffer.element_size() for b in self.reducer.buckets)
        rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        most = self.comm.allreduce_max_(torch.tensor([state, grads, peak, rss_kib], dtype=torch.int64)).tolist()
        return {"epochs": self.epochs(), "steps": self.total_steps, "global_batch_size": self.global_batch,
                "optimizer_state_bytes": most[0], "gradient_bytes": most[1], "gradient_peak_bytes": most[2],
                "peak_rss_mib": most[3] / 1024,
                **(self.private.record(self.total_steps) if self.private else {})}

    # -- a lost rank: the survivors share each global batch ---------------------------
    def replica_state(self):
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_replica_state(self, state):
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def survive(self, lost, old_size, position):
        self._batches = (None, None)  # split anew over the survivors
        self.loader.close()


def _state_bytes(optimizer):
    """Bytes of tensor state (momentum, moments) an optimizer holds."""
    return sum(t.numel() * t.element_size() for state in optimizer.state.values()
               for t in state.values() if torch.is_tensor(t))
