"""Asynchronous SGD through parameter servers (Downpour SGD, ps-lite key ranges).

The first `servers` ranks are parameter servers; the others are workers, each
with a fixed shard of the training set. The flat parameter vector is cut into
one contiguous range per server. A worker waits for fresh parameters from
every server, computes a gradient on its next batch and sends each server its
range with Isend (tagged with the version it was computed from). A server
applies each gradient as it arrives with its own optimizer, subject to the
staleness bound (see `staleness.py`), and answers with its current range.

`--epochs` is a budget for the whole job: epochs x (batches of every shard)
gradients. Server 0 keeps the count and asks for exactly that many; a worker
cycles over its own shard until server 0 answers with STOP instead of
parameters, then tells the other servers DONE instead of sending a gradient.
So a fast worker makes more passes over its shard than a slow one and a
straggler does not hold the job up (with equal workers each makes about
`--epochs` passes). Every send is matched by a receive: nothing is left pending.
"""
import itertools
import math
import os
import time
from collections import Counter

import numpy as np
import torch

from ..api import broadcast_parameters
from ..reducer import _Bucket, _zeros
from ..sharding import shard_batches
from ..watchdog import Watchdog
from .base import EpochStats, Strategy, batch_tensors, compute_phase, loss_sum, make_optimizer
from .staleness import StalenessScheduler

__all__ = ["AsyncStrategy", "FlatModel", "server_ranges"]

_POLL_SLEEP = float(os.environ.get("DISTML_PS_SLEEP", "0"))  # experiment knob, see README
TAG_SPAN = 30000  # versions travel as tags 1..TAG_SPAN (MPI guarantees tags up to 32767)
TAG_STOP = TAG_SPAN + 1  # server 0 -> worker: the budget is spent, compute no more
TAG_DONE = TAG_SPAN + 2  # worker -> other servers: stopped, no gradient follows


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
        self.budget = cfg.epochs * sum(math.ceil(len(s) / cfg.batch_size) for s in self.shards)
        self.is_server = comm.rank < cfg.servers
        if self.is_server:  # built here, not in run(): the first optimizer costs ~1 s of imports
            start, stop = self.ranges[comm.rank]
            self.param = torch.nn.Parameter(self.flat.data[start:stop].clone())
            self.optimizer = make_optimizer(cfg, [self.param])

    def run(self, progress):
        """Serve or work until the budget of gradients is spent; returns local stats."""
        if self.is_server:  # the bar (shown on rank 0, a server) counts updates applied
            return self._serve(iter(progress(range(self.budget), total=self.budget)))
        return self._work(progress)

    def finish(self):
        """Give every rank the final parameters, each server broadcasting its range.

        Buffers (BatchNorm statistics) are not served: floating-point ones are
        averaged over the workers (servers add zeros), others (counters) are
        the first worker's.
        """
        for server, (start, stop) in enumerate(self.ranges):
            self.comm.broadcast_(self.flat.data[start:stop], root=server)
        with torch.no_grad():
            for buffer in self.model.buffers():
                if not buffer.is_floating_point():
                    self.comm.broadcast_(buffer, root=self.cfg.servers)
                    continue
                if self.is_server:
                    buffer.zero_()
                self.comm.allreduce_(buffer).div_(len(self.workers))

    # -- worker -------------------------------------------------------------------
    def _work(self, progress):
        cfg, comm, data = self.cfg, self.comm, self.dataset
        index = comm.rank - cfg.servers
        shard, stats, started = self.shards[index], EpochStats(), time.perf_counter()
        versions = [0] * cfg.servers
        received = self._post_param_recvs()
        sends = []
        for indices in self._batches(shard, index):
            if self._wait_params(received, versions):
                break
            comm.waitall(sends)  # the gradient buffer is about to be overwritten
            self.flat.grad.zero_()
            with compute_phase(cfg, comm.rank):
                x, y = batch_tensors(data.X_train, data.y_train, indices)
                loss = loss_sum(self.model(x), y, data.task)
                (loss / len(indices)).backward()
            stats.loss_sum, stats.samples = stats.loss_sum + loss.item(), stats.samples + len(indices)
            sends = [comm.isend(self.flat.grad[a:b], dest=s, tag=1 + versions[s] % TAG_SPAN)
                     for s, (a, b) in enumerate(self.ranges)]
            received = self._post_param_recvs()
        comm.waitall(sends)
        # Server 0 said STOP; the others sent a range too and wait for a gradient: say DONE.
        comm.waitall([comm.isend(self.flat.grad[a:a], dest=s, tag=TAG_DONE)  # an empty message
                      for s, (a, b) in enumerate(self.ranges) if s > 0])
        self.samples_per_s = stats.samples / (time.perf_counter() - started)  # this worker's own pace
        self.samples = stats.samples
        return stats

    def _batches(self, shard, index):
        """This worker's batches, pass after pass over its shard, until told to stop."""
        stream = () if len(self.workers) == 1 else (index,)  # one worker: the sync order
        for epoch in itertools.count():
            for b in shard_batches(len(shard), self.cfg.batch_size, epoch=epoch, seed=self.cfg.seed,
                                   rank=0, size=1, stream=stream):
                yield shard[b.indices]

    def _post_param_recvs(self):
        return [self.comm.irecv(self.flat.data[a:b], source=s) for s, (a, b) in enumerate(self.ranges)]

    def _wait_params(self, requests, versions):
        """Wait for every server's range; the tags carry the servers' versions (mod TAG_SPAN).

        Returns True when server 0 said STOP.
        """
        stop = False
        for _ in requests:
            index, tag = self.comm.waitany(requests)
            stop |= tag == TAG_STOP
            versions[index] = tag - 1
        return stop

    # -- server -------------------------------------------------------------------
    def _serve(self, ticks):
        budget = self.budget if self.comm.rank == 0 else None
        server = _Server(self.comm, self.cfg, self.param, self.optimizer, self.workers, budget)
        self.histogram = server.serve(ticks)
        start, stop = self.ranges[self.comm.rank]
        self.flat.data[start:stop].copy_(self.param.detach())
        return EpochStats()

    def extra_metrics(self, train_time):
        """Server-side counts (from server 0) and every worker's speed; a collective."""
        mine = (dict(self.histogram) if self.is_server else None,
                None if self.is_server else (self.samples_per_s, self.samples))
        gathered = self.comm.allgather_object(mine)
        histogram = {int(k): v for k, v in sorted(gathered[0][0].items())}
        updates = sum(histogram.values())
        samples = [w[1] for _, w in gathered[self.cfg.servers:]]
        return {"updates_applied": updates, "updates_per_s": updates / train_time,
                "samples_per_s": sum(samples) / train_time,  # workers' passes differ: count, do not assume
                "staleness_mean": sum(k * v for k, v in histogram.items()) / max(updates, 1),
                "staleness_max": max(histogram, default=0), "staleness_histogram": histogram,
                "worker_samples_per_s": [w[0] for _, w in gathered[self.cfg.servers:]],
                "worker_samples": samples}


class _Server:
    """One parameter server's state: its range's optimizer, the scheduler, one buffer pair per worker.

    `budget`: on server 0, the number of gradients to ask for in all; the
    other servers (None) learn that a worker stopped from its DONE message.
    """

    def __init__(self, comm, cfg, param, optimizer, workers, budget):
        self.comm, self.cfg, self.param, self.optimizer = comm, cfg, param, optimizer
        self.workers, self.budget = workers, budget
        self.active = set(range(len(workers)))
        self.scheduler = StalenessScheduler(len(workers), None if cfg.staleness < 0 else cfg.staleness)
        self.grads = [torch.zeros_like(param) for _ in workers]
        self.outbox = [torch.zeros_like(param) for _ in workers]
        self.recvs = [comm.request_null] * len(workers)
        self.sends = [comm.request_null] * len(workers)
        self.histogram = Counter()
        self.watchdog = None

    def serve(self, ticks):
        """Apply gradients as they arrive until every worker has stopped; returns the histogram."""
        self.watchdog = Watchdog(self.comm, self.cfg.timeout, self._computing, role="parameter server")
        try:
            self._advance(ticks)
            while self.active:
                w, tag = self.comm.waitany(self.recvs, sleep=_POLL_SLEEP)
                if tag == TAG_DONE:
                    self._retire(w)
                elif (tag - 1) != self.scheduler.base[w] % TAG_SPAN:
                    raise RuntimeError(f"worker {w} sent version {tag - 1}, expected {self.scheduler.base[w]}")
                else:
                    self.watchdog.heard_from()
                    self.scheduler.arrive(w)
                self._advance(ticks)
        finally:
            self.watchdog.stop()
        for _ in ticks:  # let the progress bar finish and clear itself
            pass
        self.comm.waitall(self.sends)
        return self.histogram

    def _advance(self, ticks):
        """Apply what the bound allows and release who may compute, until neither changes anything.

        (A retired worker loosens the bound, which can free held gradients and waiting workers.)
        """
        self._apply_ready(ticks)
        while self._release():
            self._apply_ready(ticks)

    def _apply_ready(self, ticks):
        """Apply every held or arrived gradient the staleness bound allows now."""
        while (w := self.scheduler.next_to_apply()) is not None:
            staleness = self.scheduler.apply(w)
            self.histogram[staleness] += 1
            if self.cfg.staleness_lr:
                for group in self.optimizer.param_groups:
                    group["lr"] = self.cfg.lr / (staleness + 1)
            self.param.grad = self.grads[w]
            self.optimizer.step()
            next(ticks, None)

    def _release(self):
        """Send the current range to every worker the scheduler lets compute, and listen for its reply.

        Server 0 sends STOP instead once it has asked for the whole budget.
        Returns whether it retired a worker (so more may be released now).
        """
        retired = False
        for w in self.scheduler.release():
            self.comm.waitall([self.sends[w]])  # the previous answer to w has left this buffer
            self.outbox[w].copy_(self.param.detach())
            stop = self.budget is not None and self.budget == 0
            tag = TAG_STOP if stop else 1 + self.scheduler.version % TAG_SPAN
            self.sends[w] = self.comm.isend(self.outbox[w], dest=self.workers[w], tag=tag)
            if stop:
                self._retire(w)
                retired = True
                continue
            if self.budget is not None:
                self.budget -= 1
            self.recvs[w] = self.comm.irecv(self.grads[w], source=self.workers[w])
        return retired

    def _computing(self):
        """Ranks of the workers this server waits on: released, gradient not yet here.

        Read by the watchdog thread: list() snapshots the dict in one step under the GIL.
        """
        arrived = list(self.scheduler.arrived)
        return [self.workers[w] for w in list(self.scheduler.base) if w not in arrived]

    def _retire(self, w):
        """Worker w computes no more: off the schedule (and so off the watchdog's suspects)."""
        self.scheduler.retire(w)
        self.active.discard(w)
        self.recvs[w] = self.comm.request_null
        self.watchdog.heard_from()
