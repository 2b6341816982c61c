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
import torch

from ..api import broadcast_buffers, broadcast_parameters
from ..nonfinite import first_nonfinite
from ..reducer import GradientReducer
from ..schedule import lr_at, set_lr
from ..sharding import num_steps, shard_batches
from .base import EpochStats, Flags, Strategy, batch_tensors, compute_phase, loss_sum, make_optimizer


class SyncStrategy(Strategy):
    def setup(self):
        cfg, comm = self.cfg, self.comm
        broadcast_parameters(self.model, comm=comm)  # distributed: all start from root's weights
        self.optimizer = make_optimizer(cfg, self.model.parameters())
        self.reducer = GradientReducer(self.model.parameters(), comm, bucket_mb=cfg.bucket_mb, op="sum",
                                       control=3,  # Flags: stop, checkpoint, nonfinite
                                       chunk_mb=cfg.chunk_mb, compression=cfg.compression, overlap=cfg.overlap)
        self.global_batch = cfg.batch_size * comm.size  # kept when ranks are lost
        self.steps_per_epoch = num_steps(len(self.dataset.y_train), self.global_batch)
        self.stats = EpochStats()
        self._batches = (None, None)  # (epoch, this rank's batches of it)

    def units_in(self, epoch):
        return self.steps_per_epoch

    def run_unit(self, epoch, step, wants):
        """One step: gradients of this rank's part of global batch `step`, summed over ranks.

        A non-finite loss or gradient on any rank (agreed in the reduction) means no update on
        any rank, and the step's loss and samples do not count.
        """
        cfg, data = self.cfg, self.dataset
        batch = self._epoch_batches(epoch)[step]
        self.model.train()
        self.reducer.zero_grad()
        loss = 0.0
        if len(batch.indices):  # the last global batch can leave a rank with none
            with compute_phase(cfg, self.comm.rank):
                x, y = batch_tensors(data.X_train, data.y_train, batch.indices)
                summed = loss_sum(self.model(x), y, data.task)
                (summed / batch.global_size).backward()
            loss = summed.item()
        self.reducer.attach_grads()  # the buckets hold this step's gradients (zero where backward gave none)
        self.nonfinite = first_nonfinite(loss, [b.grads for b in self.reducer.buckets], self.model)
        mine = wants()
        mine.nonfinite = self.nonfinite is not None
        self.reducer.control.copy_(torch.tensor(mine.values()))
        self.reducer.allreduce_grads()  # distributed: Allreduce (sum) of the buckets, flags included
        agreed = Flags.summed(self.reducer.control.tolist())
        if not agreed.nonfinite:
            self.stats.loss_sum += loss
            self.stats.samples += len(batch.indices)
            self._step(epoch * self.steps_per_epoch + step)
        return agreed, True

    def _step(self, position):
        cfg = self.cfg
        set_lr(self.optimizer, lr_at(cfg.lr, cfg.schedule(), position, cfg.epochs * self.steps_per_epoch,
                                     cfg.warmup_epochs * self.steps_per_epoch))
        self.optimizer.step()

    def _epoch_batches(self, epoch):
        if self._batches[0] != epoch:
            self._batches = (epoch, shard_batches(len(self.dataset.y_train), self.cfg.batch_size, epoch=epoch,
                                                  seed=self.cfg.seed, rank=self.comm.rank, size=self.comm.size,
                                                  global_batch=self.global_batch))
        return self._batches[1]

    def end_epoch(self, epoch):
        loss, samples = self._totals()
        self.stats = EpochStats()
        return {"train_loss": loss / max(samples, 1), "samples": int(samples)}

    def _totals(self):
        return self.comm.allreduce_array([self.stats.loss_sum, self.stats.samples])

    def share_model(self):
        broadcast_buffers(self.model, comm=self.comm)  # BatchNorm statistics: evaluate and save rank 0's

    def state_dict(self):
        loss, samples = self._totals()  # the epoch so far, so its record comes out the same
        return {"optimizer": self.optimizer.state_dict(), "epoch_loss": float(loss), "epoch_samples": int(samples),
                "global_batch": self.global_batch}

    def load_state_dict(self, state, own):
        self.optimizer.load_state_dict(state["optimizer"])
        if self.comm.is_root:  # the epoch's totals so far count once, on root
            self.stats.loss_sum, self.stats.samples = state["epoch_loss"], state["epoch_samples"]

    def check_resume(self, saved, world_size, state=None):
        """Any world size with the same global batch: the result does not depend on the split."""
        then = (state or {}).get("global_batch", saved["batch_size"] * world_size)  # kept after a lost rank
        now = self.global_batch
        if then != now:
            return (f"has global batch {then} ({world_size} ranks x --batch-size {saved['batch_size']}); this run "
                    f"has {now}: resume on ranks x --batch-size = {then}")
        return None

    def summary(self, history, train_time):
        return {"epochs": self.cfg.epochs, "global_batch_size": self.global_batch}

    # -- a lost rank: the survivors share each global batch ---------------------------
    def replica_state(self):
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_replica_state(self, state):
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def survive(self, lost, old_size, position):
        self._batches = (None, None)  # split anew over the survivors
