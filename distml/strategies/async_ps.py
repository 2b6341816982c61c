"""Asynchronous SGD through parameter servers (Downpour SGD, ps-lite key ranges).

The first `servers` ranks are parameter servers; the others are workers, each
with a fixed shard of the training set. The flat parameter vector is cut into
one contiguous range per server. A worker waits for fresh parameters from
every server, computes a gradient on its next batch and sends each server its
range with Isend (tagged with the version it was computed from). A server
applies each gradient as it arrives with its own optimizer, subject to the
staleness bound (see `staleness.py`), and answers with its current range.
Every rank knows how many gradients each worker sends (epochs x batches of its
shard), so servers stop after the last one and no message is left pending.
"""
import math
import os
import time
from collections import Counter

import numpy as np
import torch

from ..api import broadcast_buffers, broadcast_parameters
from ..reducer import _Bucket, _zeros
from ..sharding import shard_batches
from ..watchdog import Watchdog
from .base import EpochStats, Strategy, batch_tensors, compute_phase, loss_sum, make_optimizer
from .staleness import StalenessScheduler

__all__ = ["AsyncStrategy", "FlatModel", "server_ranges"]

_POLL_SLEEP = float(os.environ.get("DISTML_PS_SLEEP", "0"))  # experiment knob, see README
TAG_SPAN = 30000  # versions travel as tags modulo this (MPI guarantees tags up to 32767)


def server_ranges(numel, servers):
    """[(start, stop)] of the flat parameter vector, one contiguous range per server."""
    bounds = np.linspace(0, numel, servers + 1).round().astype(int)
    return list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))


class FlatModel:
    """The model's trainable parameters and gradients as views into two flat buffers.

    The gradients are one reducer bucket (`.grad` views into its buffer); the
    parameters get the same layout in `data`, so a server's range of one is
    the same range of the other.
    """

    def __init__(self, model):
        params = [p for p in model.parameters() if p.requires_grad]
        bucket = _Bucket(params)
        self.grad = bucket.buffer
        self.data = _zeros(self.grad.numel(), self.grad.dtype)
        offset = 0
        for p in params:  # the bucket's order and offsets
            view = self.data[offset:offset + p.numel()].view_as(p)
            view.copy_(p.detach())
            p.data = view
            offset += p.numel()


class AsyncStrategy(Strategy):
    """Runs the whole training in `run()`; the trainer evaluates the assembled model after."""

    def setup(self):
        cfg, comm = self.cfg, self.comm
        broadcast_parameters(self.model, comm=comm)
        self.flat = FlatModel(self.model)
        self.ranges = server_ranges(self.flat.data.numel(), cfg.servers)
        self.workers = list(range(cfg.servers, comm.size))
        n = len(self.dataset.y_train)
        self.shards = np.array_split(np.arange(n), len(self.workers))
        self.steps = [cfg.epochs * math.ceil(len(s) / cfg.batch_size) for s in self.shards]
        self.is_server = comm.rank < cfg.servers
        if self.is_server:  # built here, not in run(): the first optimizer costs ~1 s of imports
            start, stop = self.ranges[comm.rank]
            self.param = torch.nn.Parameter(self.flat.data[start:stop].clone())
            self.optimizer = make_optimizer(cfg, [self.param])

    def run(self, progress):
        """Serve or work until every worker has sent its last gradient; returns local stats."""
        if self.is_server:  # the bar (shown on rank 0, a server) counts updates applied
            return self._serve(iter(progress(range(sum(self.steps)), total=sum(self.steps))))
        return self._work(progress)

    def finish(self):
        """Give every rank the final parameters, each server broadcasting its range.

        Buffers (BatchNorm statistics) are not served; the first worker's are kept.
        """
        for server, (start, stop) in enumerate(self.ranges):
            self.comm.broadcast_(self.flat.data[start:stop], root=server)
        broadcast_buffers(self.model, root=self.cfg.servers, comm=self.comm)

    # -- worker -------------------------------------------------------------------
    def _work(self, progress):
        cfg, comm, data = self.cfg, self.comm, self.dataset
        index = comm.rank - cfg.servers
        shard, stats, started = self.shards[index], EpochStats(), time.perf_counter()
        stream = () if len(self.workers) == 1 else (index,)  # one worker: the sync order
        versions = [0] * cfg.servers
        received = self._post_param_recvs()
        batches = [shard[b.indices] for epoch in range(cfg.epochs)
                   for b in shard_batches(len(shard), cfg.batch_size, epoch=epoch, seed=cfg.seed,
                                          rank=0, size=1, stream=stream)]
        sends = []
        for step, indices in enumerate(progress(batches, total=len(batches))):
            self._wait_params(received, versions)
            comm.waitall(sends)  # the gradient buffer is about to be overwritten
            self.flat.grad.zero_()
            with compute_phase(cfg, comm.rank):
                x, y = batch_tensors(data.X_train, data.y_train, indices)
                loss = loss_sum(self.model(x), y, data.task)
                (loss / len(indices)).backward()
            stats.loss_sum, stats.samples = stats.loss_sum + loss.item(), stats.samples + len(indices)
            sends = [comm.isend(self.flat.grad[a:b], dest=s, tag=1 + versions[s] % TAG_SPAN)
                     for s, (a, b) in enumerate(self.ranges)]
            if step + 1 < len(batches):
                received = self._post_param_recvs()
        comm.waitall(sends)
        self.samples_per_s = stats.samples / (time.perf_counter() - started)  # this worker's own pace
        return stats

    def _post_param_recvs(self):
        return [self.comm.irecv(self.flat.data[a:b], source=s) for s, (a, b) in enumerate(self.ranges)]

    def _wait_params(self, requests, versions):
        """Wait for every server's range; the tags carry the servers' versions (mod TAG_SPAN)."""
        for _ in requests:
            index, tag = self.comm.waitany(requests)
            versions[index] = tag - 1

    # -- server -------------------------------------------------------------------
    def _serve(self, ticks):
        server = _Server(self.comm, self.cfg, self.param, self.optimizer, self.workers, self.steps)
        self.histogram = server.serve(ticks)
        start, stop = self.ranges[self.comm.rank]
        self.flat.data[start:stop].copy_(self.param.detach())
        return EpochStats()

    def extra_metrics(self, train_time):
        """Server-side counts (from server 0) and every worker's speed; a collective."""
        mine = (dict(self.histogram) if self.is_server else None,
                None if self.is_server else self.samples_per_s)
        gathered = self.comm.allgather_object(mine)
        histogram = {int(k): v for k, v in sorted(gathered[0][0].items())}
        updates = sum(histogram.values())
        return {"updates_applied": updates, "updates_per_s": updates / train_time,
                "staleness_mean": sum(k * v for k, v in histogram.items()) / max(updates, 1),
                "staleness_max": max(histogram, default=0), "staleness_histogram": histogram,
                "worker_samples_per_s": [speed for _, speed in gathered[self.cfg.servers:]]}


class _Server:
    """One parameter server's state: its range's optimizer, the scheduler, one buffer pair per worker."""

    def __init__(self, comm, cfg, param, optimizer, workers, steps):
        self.comm, self.cfg, self.param, self.optimizer = comm, cfg, param, optimizer
        self.workers, self.left = workers, list(steps)
        self.scheduler = StalenessScheduler(len(workers), None if cfg.staleness < 0 else cfg.staleness)
        self.grads = [torch.zeros_like(param) for _ in workers]
        self.outbox = [torch.zeros_like(param) for _ in workers]
        self.recvs = [comm.request_null] * len(workers)
        self.sends = [comm.request_null] * len(workers)
        self.histogram = Counter()

    def serve(self, ticks):
        """Apply gradients as they arrive until every worker has sent its last one; returns the histogram."""
        self._release()
        watchdog = Watchdog(self.comm, self.cfg.timeout, self.workers, role="parameter server")
        try:
            while any(self.left):
                w, tag = self.comm.waitany(self.recvs, sleep=_POLL_SLEEP)
                if (tag - 1) != self.scheduler.base[w] % TAG_SPAN:
                    raise RuntimeError(f"worker {w} sent version {tag - 1}, expected {self.scheduler.base[w]}")
                watchdog.heard_from(self.workers[w], finished=self.left[w] == 1)  # its last gradient
                self.scheduler.arrive(w)
                self._apply_ready(ticks)
                self._release()
        finally:
            watchdog.stop()
        for _ in ticks:  # let the progress bar finish and clear itself
            pass
        self.comm.waitall(self.sends)
        return self.histogram

    def _apply_ready(self, ticks):
        """Apply every held or arrived gradient the staleness bound allows now."""
        while (w := self.scheduler.next_to_apply()) is not None:
            self.left[w] -= 1
            staleness = self.scheduler.apply(w, done=self.left[w] == 0)
            self.histogram[staleness] += 1
            if self.cfg.staleness_lr:
                for group in self.optimizer.param_groups:
                    group["lr"] = self.cfg.lr / (staleness + 1)
            self.param.grad = self.grads[w]
            self.optimizer.step()
            next(ticks, None)

    def _release(self):
        """Send the current range to every worker the scheduler lets compute, and listen for its reply."""
        for w in self.scheduler.release():
            self.comm.waitall([self.sends[w]])  # the previous answer to w has left this buffer
            self.outbox[w].copy_(self.param.detach())
            tag = 1 + self.scheduler.version % TAG_SPAN
            self.sends[w] = self.comm.isend(self.outbox[w], dest=self.workers[w], tag=tag)
            self.recvs[w] = self.comm.irecv(self.grads[w], source=self.workers[w])
