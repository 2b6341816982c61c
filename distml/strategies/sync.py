"""Synchronous data parallelism: every step, gradients are summed over ranks.

Each rank's loss is summed over its samples and divided by the *global*
batch size, and the reducer sums those gradients with Allreduce. The result is
the gradient of single-process training on the whole global batch, also for
the last, partial batch where ranks hold different sample counts.
"""
from ..api import DistributedOptimizer, broadcast_parameters
from ..sharding import shard_batches
from .base import EpochStats, Strategy, batch_tensors, compute_phase, loss_sum, make_optimizer


class SyncStrategy(Strategy):
    def setup(self):
        broadcast_parameters(self.model, comm=self.comm)  # distributed: all start from root's weights
        self.optimizer = DistributedOptimizer(make_optimizer(self.cfg, self.model.parameters()),
                                              bucket_mb=self.cfg.bucket_mb, op="sum", comm=self.comm)

    def train_epoch(self, epoch, progress):
        cfg, data, stats = self.cfg, self.dataset, EpochStats()
        batches = shard_batches(len(data.y_train), cfg.batch_size, epoch=epoch, seed=cfg.seed,
                                rank=self.comm.rank, size=self.comm.size)
        self.model.train()
        for batch in progress(batches, total=len(batches)):
            self.optimizer.zero_grad()
            if len(batch.indices):  # the last global batch can leave a rank with none
                with compute_phase(cfg, self.comm.rank):
                    x, y = batch_tensors(data.X_train, data.y_train, batch.indices)
                    loss = loss_sum(self.model(x), y, data.task)
                    (loss / batch.global_size).backward()
                stats.loss_sum += loss.item()
                stats.samples += len(batch.indices)
            self.optimizer.step()  # distributed: Allreduce (sum) of the fused gradient buckets
        return stats
