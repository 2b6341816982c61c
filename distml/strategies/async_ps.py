"""Asynchronous SGD through parameter servers (Downpour SGD, ps-lite key ranges).

The first `servers` ranks are parameter servers; the others are workers, each
with a fixed shard of the training set. The flat parameter vector is cut into
one contiguous range per server. A worker waits for fresh parameters from
every server, computes a gradient on its next batch and sends each server its
range with Isend (tagged with the version it was computed from). A server
applies each gradient as it arrives with its own optimizer, subject to the
staleness bound (see `staleness.py`), and answers with its current range.

`--epochs` is a budget for the whole job: epochs x (batches of every shard)
gradients (or `--max-steps` gradients), served in one *segment* per epoch. Server 0 keeps the count and
asks for exactly a segment's share; a worker cycles over its own shard until
server 0 answers with STOP instead of parameters, then tells the other servers
DONE instead of sending a gradient. So a fast worker makes more passes over
its shard than a slow one and a straggler does not hold the job up (with
equal workers each makes about `--epochs` passes). Every send is matched by a
receive: at a segment's end nothing is pending, which is where the trainer
evaluates and checkpoints.

A stop signal travels in the tags: a server's reply carries its stop bit to
the worker, and the worker's next gradient carries its own or any server's to
every server; server 0 then ends the segment early (so does root's
checkpoint clock), and the segment's closing reduction tells every rank.

A non-finite loss or gradient never leaves its worker. With --on-nan skip the
worker drops that batch and computes the next; with stop it tells every server
NONFINITE instead of sending the gradient, which works as DONE plus the stop
bit. The closing reduction also sums the workers' counts of such gradients.
"""
import os
import time
from collections import Counter

import numpy as np
import torch

from ..api import broadcast_parameters
from ..comm import RankLost
from ..flat import FlatModel
from ..nonfinite import first_nonfinite
from ..schedule import lr_at, set_lr
from ..sharding import num_steps, shard_batches
from ..watchdog import Watchdog
from .base import EpochStats, Flags, Strategy, clip_grad_norm_, compute_phase, make_optimizer
from .staleness import StalenessScheduler

__all__ = ["AsyncStrategy", "server_ranges"]

_POLL_SLEEP = float(os.environ.get("DISTML_PS_SLEEP", "0"))  # experiment knob, see README
TAG_SPAN = 15000  # versions travel as tags 1..TAG_SPAN, plus TAG_SPAN with the stop bit (MPI: up to 32767)
TAG_STOP = 2 * TAG_SPAN + 1  # server 0 -> worker: the segment's share is asked for, compute no more
TAG_DONE = 2 * TAG_SPAN + 2  # worker -> other servers: stopped, no gradient follows
TAG_NONFINITE = 2 * TAG_SPAN + 3  # worker -> every server: a non-finite gradient, withheld; stop the job


def server_ranges(numel, servers):
    """[(start, stop)] of the flat parameter vector, one contiguous range per server."""
    bounds = np.linspace(0, numel, servers + 1).round().astype(int)
    return list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))


class AsyncStrategy(Strategy):
    """One trainer unit is one segment (an epoch's share of the budget); the servers count updates."""

    def setup(self):
        cfg, comm = self.cfg, self.comm
        broadcast_parameters(self.model, comm=comm)
        self.flat = FlatModel(self.model)
        self.ranges = server_ranges(self.flat.data.numel(), cfg.servers)
        self.workers = list(range(cfg.servers, comm.size))
        n = len(self.dataset.train)
        self.shards = np.array_split(np.arange(n), len(self.workers))
        self.per_epoch = sum(num_steps(len(s), cfg.batch_size) for s in self.shards)
        self.budget = cfg.max_steps or cfg.epochs * self.per_epoch
        self.asked = 0  # server 0: gradients asked for so far (the job's position in updates)
        self.stats = EpochStats()
        self.is_server = comm.rank < cfg.servers
        if self.is_server:  # built here: the first optimizer costs ~1 s of imports
            start, stop = self.ranges[comm.rank]
            self.param = torch.nn.Parameter(self.flat.data[start:stop].clone())
            self.optimizer = make_optimizer(cfg, [self.param])  # a flat range: adamw decays all of it
            self.applied, self.histogram = 0, Counter()  # this server's updates, by staleness
        else:
            self.index = comm.rank - cfg.servers  # its shard, kept if a lost worker renumbers the ranks
            self.consumed = 0  # batches this worker has trained on: its place in its batch stream
            self.trained = 0  # samples in those batches
            self.busy_s = 0.0  # time spent in segments, for the worker's own pace

    def units_in(self, epoch):
        return 1

    def loads_data(self):
        return not self.is_server

    def epochs(self):
        """--epochs, or as many segments as --max-steps gradients fill (the last one shorter)."""
        return -(-self.budget // self.per_epoch)

    def run_unit(self, epoch, index, wants):
        """Serve or work until server 0 has asked for this epoch's share (or stops early)."""
        started = time.perf_counter()
        target = min((epoch + 1) * self.per_epoch, self.budget)
        self.nonfinite, self.withheld = None, 0  # this segment's non-finite gradients (workers)
        if self.is_server:
            stop_seen = self._serve(target, wants)
        else:
            stop_seen = self._work(wants)
            self.busy_s += time.perf_counter() - started
        mine = wants()
        asked = self.asked if self.comm.rank == 0 else 0
        stop, checkpoint, asked, withheld = self.comm.allreduce_array(  # the segment's closing agreement
            [float(stop_seen or mine.stop), float(self.comm.is_root and mine.checkpoint), asked, self.withheld],
            what="the segment's closing agreement")
        self.asked = int(asked)
        return Flags(stop > 0, checkpoint > 0, withheld), self.asked == target

    def work_done(self, epoch, step):
        return self.asked

    def describe(self, epoch, index):
        return f"segment {epoch + 1}"

    def survive(self, lost, old_size, position):
        """A lost worker's share of the budget went to the others (see _Server.lose); a lost server ends the job."""
        servers = [r for r in lost if r < self.cfg.servers]
        if servers:
            raise RankLost(servers, f"parameter server {servers[0]}: its range of the parameters is gone, so the "
                                    f"job cannot go on")
        self.workers = list(range(self.cfg.servers, self.comm.size))

    def check_resume(self, saved, world_size, state=None):
        """Servers, workers and shards must be the same: the same world size and --servers."""
        if world_size != self.comm.size or saved["servers"] != self.cfg.servers:
            return (f"was made by {saved['servers']} server(s) on {world_size} ranks; async resumes only on the "
                    f"same layout (mpirun -n {world_size} ... --servers {saved['servers']})")
        return super().check_resume(saved, world_size)

    def end_epoch(self, epoch):
        loss, samples = self.comm.allreduce_array([self.stats.loss_sum, self.stats.samples])
        self.stats = EpochStats()
        return {"train_loss": loss / max(samples, 1), "samples": int(samples)}

    def share_model(self):
        """Give every rank the current parameters, each server broadcasting its range.

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

    # -- checkpoints: taken between segments, when no message is in flight ----------
    def model_state(self):
        """The servers' ranges assembled on root (workers' own buffers travel in rank_state)."""
        ranges = self.comm.gather_object(self.param.detach().clone() if self.is_server else None)
        state = self.model.state_dict()
        if self.comm.is_root:
            flat = torch.cat(ranges[:self.cfg.servers])
            params = [name for name, p in self.model.named_parameters() if p.requires_grad]
            offset = 0
            for name in params:
                numel = state[name].numel()
                state[name] = flat[offset:offset + numel].view_as(state[name]).clone()
                offset += numel
        return state

    def state_dict(self):
        servers = self.comm.gather_object(
            (self.optimizer.state_dict(), self.applied, dict(self.histogram)) if self.is_server else None)
        return {"asked": self.asked, "servers": servers[:self.cfg.servers] if servers else None}

    def rank_state(self):
        if self.is_server:
            return {}
        return {"consumed": self.consumed, "trained": self.trained, "busy_s": self.busy_s,
                "loss_sum": self.stats.loss_sum, "samples": self.stats.samples}

    def load_state_dict(self, state, own):
        """Same world size only (the trainer checks): each rank takes its own part back."""
        self.asked = state["asked"]
        if self.is_server:
            optimizer, self.applied, histogram = state["servers"][self.comm.rank]
            self.optimizer.load_state_dict(optimizer)
            self.histogram = Counter(histogram)
            start, stop = self.ranges[self.comm.rank]
            with torch.no_grad():
                self.param.copy_(self.flat.data[start:stop])
        else:
            self.consumed, self.trained, self.busy_s = own["consumed"], own["trained"], own["busy_s"]
            self.stats.loss_sum, self.stats.samples = own["loss_sum"], own["samples"]

    # -- worker -------------------------------------------------------------------
    def _work(self, wants):
        """Compute gradients until server 0 says STOP; returns whether any stop bit was seen."""
        cfg, comm = self.cfg, self.comm
        self.model.train()  # evaluation after the last segment left it in eval mode
        versions = [0] * cfg.servers
        received, sends, stop_seen = self._post_param_recvs(), [], False
        while True:
            stop, flagged = self._wait_params(received, versions)
            stop_seen |= flagged
            if stop:
                break
            comm.waitall(sends)  # the gradient buffer is about to be overwritten
            if not self._finite_gradient():  # --on-nan stop: withheld; the servers retire this worker
                comm.waitall([comm.isend(self.flat.grad[:0], dest=s, tag=TAG_NONFINITE) for s in range(cfg.servers)])
                return True
            stop_seen |= wants().stop
            sends = [comm.isend(self.flat.grad[a:b], dest=s, tag=_tag(versions[s], stop_seen))
                     for s, (a, b) in enumerate(self.ranges)]
            received = self._post_param_recvs()
        comm.waitall(sends)
        # Server 0 said STOP; the others sent a range too and wait for a gradient: say DONE.
        comm.waitall([comm.isend(self.flat.grad[a:a], dest=s, tag=TAG_DONE)  # an empty message
                      for s, (a, b) in enumerate(self.ranges) if s > 0])
        return stop_seen

    def _finite_gradient(self):
        """Compute the gradient of the next batch into flat.grad; returns whether it may be sent.

        A non-finite one is counted in `withheld`; with --on-nan skip the worker drops that batch and
        tries the next, for at most a pass over its shard (then its weights must be non-finite).
        """
        for _ in range(self._per_pass()):
            loss, samples = self._gradient(self.consumed)
            self.consumed += 1
            seen = first_nonfinite(loss, [self.flat.grad], self.model)
            if seen is None:
                self.trained += samples
                self.stats.loss_sum, self.stats.samples = self.stats.loss_sum + loss, self.stats.samples + samples
                return True
            self.nonfinite, self.withheld = self.nonfinite or seen, self.withheld + 1
            if self.cfg.on_nan == "stop":
                return False
        raise RuntimeError(f"a whole pass over this worker's shard gave non-finite losses or gradients "
                           f"(first: {self.nonfinite}): the weights from the servers are not finite")

    def _gradient(self, k):
        """(summed loss, samples) of this worker's k-th batch; its gradient in flat.grad."""
        self.flat.grad.zero_()
        epoch, position = divmod(k, self._per_pass())
        with compute_phase(self.cfg, self.comm.rank):
            x, y = self.loader.get("train", epoch, self._batches(epoch), position)
            loss = self.summed_loss(x, y)
            (loss / len(y)).backward()
        if self.cfg.clip_norm:  # each pushed gradient, as its worker computed it
            clip_grad_norm_([self.flat.grad], self.cfg.clip_norm)
        return loss.item(), len(y)

    def _batches(self, epoch):
        """This worker's batches (sample indices) in pass `epoch` over its shard, reshuffled each pass."""
        shard = self.shards[self.index]
        if getattr(self, "_pass", (None,))[0] != epoch:
            stream = () if len(self.shards) == 1 else (self.index,)  # one worker: the sync order
            self._pass = (epoch, [shard[b.indices] for b in shard_batches(
                len(shard), self.cfg.batch_size, epoch=epoch, seed=self.cfg.seed, rank=0, size=1, stream=stream)])
        return self._pass[1]

    def _per_pass(self):
        return num_steps(len(self.shards[self.index]), self.cfg.batch_size)

    def _post_param_recvs(self):
        return [self.comm.irecv(self.flat.data[a:b], source=s) for s, (a, b) in enumerate(self.ranges)]

    def _wait_params(self, requests, versions):
        """Wait for every server's range; the tags carry the servers' versions and stop bits.

        Returns (server 0 said STOP, some server's stop bit was set).
        """
        stop = flagged = False
        for _ in requests:
            index, tag = self.comm.waitany(requests, what="a worker waiting for parameters")
            if tag == TAG_STOP:
                stop = True
                continue
            versions[index], bit = _untag(tag)
            flagged |= bit
        return stop, flagged

    # -- server -------------------------------------------------------------------
    def _serve(self, target, wants):
        server = _Server(self, target if self.comm.rank == 0 else None, wants)
        try:
            return server.serve()
        finally:  # also when the communicator was revoked (a lost rank): the trainer reruns the segment
            if self.comm.rank == 0:
                self.asked = server.asked - len(server.owed)  # gradients asked for and never applied: ask again
            start, stop = self.ranges[self.comm.rank]
            self.flat.data[start:stop].copy_(self.param.detach())

    def summary(self, history, train_time):
        """Server-side counts (from server 0) and every worker's speed; a collective."""
        mine = (dict(self.histogram) if self.is_server else None,
                None if self.is_server else (self.trained / max(self.busy_s, 1e-9), self.trained))
        gathered = self.comm.allgather_object(mine)
        histogram = {int(k): v for k, v in sorted(gathered[0][0].items())}
        updates = sum(histogram.values())
        samples = [w[1] for _, w in gathered[self.cfg.servers:]]
        return {"epochs": self.epochs(), "global_batch_size": self.cfg.batch_size * len(self.workers),
                "updates_applied": updates, "updates_per_s": updates / train_time,
                "samples_per_s": sum(samples) / train_time,  # workers' passes differ: count, do not assume
                "staleness_mean": sum(k * v for k, v in histogram.items()) / max(updates, 1),
                "staleness_max": max(histogram, default=0), "staleness_histogram": histogram,
                "worker_samples_per_s": [w[0] for _, w in gathered[self.cfg.servers:]],
                "worker_samples": samples}


def _tag(version, stop_bit):
    """A gradient's or a range's tag: its version (mod TAG_SPAN) and a stop bit."""
    return 1 + version % TAG_SPAN + TAG_SPAN * bool(stop_bit)


def _untag(tag):
    """(version mod TAG_SPAN, stop bit) of a tag made by _tag."""
    return (tag - 1) % TAG_SPAN, (tag - 1) >= TAG_SPAN


class _Server:
    """One parameter server's segment: the scheduler and one buffer pair per worker.

    `target`: on server 0, the count of gradients asked for at which this
    segment ends (lowered to "now" by a stop bit or root's checkpoint clock);
    the other servers (None) learn that a worker stopped from its DONE message.
    """

    def __init__(self, strategy, target, wants):
        self.s, self.cfg, self.comm = strategy, strategy.cfg, strategy.comm
        self.param, self.optimizer, self.workers = strategy.param, strategy.optimizer, strategy.workers
        self.target, self.asked, self.wants = target, strategy.asked, wants
        self.started = strategy.asked  # a checkpoint ends a segment only after one gradient more
        self.stop_seen = False
        self.active = set(range(len(self.workers)))
        self.scheduler = StalenessScheduler(len(self.workers), None if self.cfg.staleness < 0 else self.cfg.staleness)
        self.scheduler.version = strategy.applied
        self.grads = [torch.zeros_like(self.param) for _ in self.workers]
        self.outbox = [torch.zeros_like(self.param) for _ in self.workers]
        self.recvs = [self.comm.request_null] * len(self.workers)
        self.sends = [self.comm.request_null] * len(self.workers)
        self.dead = set()  # workers lost in this segment (--on-rank-failure continue)
        self.owed = set()  # workers asked for a gradient that has not come yet
        self.watchdog = None

    def serve(self):
        """Apply gradients as they arrive until every worker has stopped; returns whether a stop bit came."""
        self.watchdog = Watchdog(self.comm, self.cfg.timeout, self._computing, role="parameter server")
        try:
            self._advance()
            while self.active:
                try:
                    self._receive()
                except RankLost as lost:  # a worker died: under --on-rank-failure continue, serve the others
                    self.lose(lost)
                self._advance()
            while True:  # the last answers have left (a dead worker's are abandoned)
                try:
                    self.comm.waitall(self.sends)
                    break
                except RankLost as lost:
                    self.lose(lost)
        finally:
            self.watchdog.stop()
        return self.stop_seen

    def _receive(self):
        w, tag = self.comm.waitany(self.recvs, sleep=_POLL_SLEEP, what="a server waiting for gradients")
        self.owed.discard(w)
        if tag in (TAG_DONE, TAG_NONFINITE):
            self.stop_seen |= tag == TAG_NONFINITE  # withheld a non-finite gradient: stop the job
            self._retire(w)
            return
        version, bit = _untag(tag)
        if version != self.scheduler.base[w] % TAG_SPAN:
            raise RuntimeError(f"worker {w} sent version {version}, expected {self.scheduler.base[w]}")
        self.stop_seen |= bit
        self.watchdog.heard_from()
        self.scheduler.arrive(w)

    def lose(self, lost):
        """Retire the dead workers; server 0 asks the others for the gradients they owed (the budget holds)."""
        dead = set(lost.ranks) or set(self.comm.failed_ranks())
        workers = {self.comm.members[rank]: w for w, rank in enumerate(self.workers)}
        if self.cfg.on_rank_failure != "continue" or lost.revoked or not dead or not dead <= set(workers):
            raise lost  # abort; or the communicator is revoked (the trainer reruns the segment); or a server is gone
        for w in (workers[r] for r in dead if workers[r] not in self.dead):
            self.dead.add(w)
            self.sends[w] = self.recvs[w] = self.comm.request_null  # abandoned: the peer is gone
            if w in self.scheduler.base and w not in self.scheduler.arrived:  # released, no gradient will come
                self.scheduler.retire(w)
            if w in self.owed:  # server 0 asks someone else for the gradient w owed
                self.owed.discard(w)
                self.asked -= self.target is not None
            self.active.discard(w)

    def _advance(self):
        """Apply what the bound allows and release who may compute, until neither changes anything.

        (A retired worker loosens the bound, which can free held gradients and waiting workers.)
        """
        self._apply_ready()
        while self._release():
            self._apply_ready()

    def _apply_ready(self):
        """Apply every held or arrived gradient the staleness bound allows now."""
        cfg, s = self.cfg, self.s
        while (w := self.scheduler.next_to_apply()) is not None:
            staleness = self.scheduler.apply(w)
            s.histogram[staleness] += 1
            lr = lr_at(cfg.lr, cfg.schedule(), min(s.applied, s.budget - 1), s.budget,
                       cfg.warmup_epochs * s.per_epoch)
            set_lr(self.optimizer, lr / (staleness + 1) if cfg.staleness_lr else lr)
            self.param.grad = self.grads[w]
            self.optimizer.step()
            s.applied += 1

    def _release(self):
        """Send the current range to every worker the scheduler lets compute, and listen for its reply.

        Server 0 sends STOP instead once it has asked for the segment's share
        (or at once after a stop bit or root's checkpoint clock).
        Returns whether it retired a worker (so more may be released now).
        """
        mine = self.wants()
        self.stop_seen |= mine.stop
        if self.target is not None and (self.stop_seen or (mine.checkpoint and self.asked > self.started)):
            self.target = min(self.target, self.asked)  # end the segment now
        retired = False
        for w in self.scheduler.release():
            try:
                retired |= self._answer(w)
            except RankLost as lost:  # w is gone (--on-rank-failure continue): lose() retires it
                self.lose(lost)
                retired = True
        return retired

    def _answer(self, w):
        """Send worker w the current range (or STOP) and listen for its gradient; returns whether w retired."""
        if w in self.dead:  # lost after its last gradient arrived: released no more
            self.scheduler.retire(w)
            return True
        self.comm.waitall([self.sends[w]])  # the previous answer to w has left this buffer
        self.outbox[w].copy_(self.param.detach())
        stop = self.target is not None and self.asked >= self.target
        if not stop:
            self.asked += 1
            self.owed.add(w)
        tag = TAG_STOP if stop else _tag(self.scheduler.version, self.stop_seen)
        self.sends[w] = self.comm.isend(self.outbox[w], dest=self.workers[w], tag=tag)
        if stop:
            self._retire(w)
            return True
        self.recvs[w] = self.comm.irecv(self.grads[w], source=self.workers[w])
        return False

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
