"""Federated averaging: many simulated clients, periodic sample-weighted averaging.

Each round every rank draws the same sample of clients (seeded by round), runs
the sampled clients it owns one after another, each starting from the global
model with a fresh optimizer, and adds (local - global) x samples trained to
one flat buffer. One in-place Allreduce of that buffer gives the weighted
average update, which the server optimizer (`server_opt.py`) applies on every
rank alike. A client's work depends only on (seed, round, client), so the
result does not depend on the number of ranks. Each round's clients are dealt
to the ranks by size, evenly; only clients with state (SCAFFOLD's control
variates) always go to the rank that owns them.

Weights are the samples a client trained on this round: with local epochs
that is proportional to its data (McMahan et al.'s n_k), and with one local
step FedAvg is exactly mini-batch SGD on the union of the clients' batches.
"""
import heapq

import numpy as np
import torch

from ..api import broadcast_parameters
from ..flat import FlatModel, zeros
from ..nonfinite import first_nonfinite
from ..partition import natural, partition
from ..privacy import PrivateRun, poisson_sample
from ..schedule import lr_at, set_lr
from ..sharding import rng
from .base import Flags, Strategy, clip_grad_norm_, make_optimizer
from .server_opt import ServerOptimizer

__all__ = ["FederatedStrategy", "assign_clients", "sample_clients", "client_batches"]


def assign_clients(sizes, ranks):
    """Owner rank of each client: largest clients first, each to the least loaded rank (even load)."""
    owner = [0] * len(sizes)
    loads = [(0, r) for r in range(ranks)]
    for client in sorted(range(len(sizes)), key=lambda c: (-sizes[c], c)):
        load, rank = heapq.heappop(loads)
        owner[client] = rank
        heapq.heappush(loads, (load + sizes[client], rank))
    return owner


def sample_clients(seed, round_, num_clients, per_round, dropout=0.0):
    """(sampled, survivors) of a round: the same on every rank, whatever the world size."""
    sampled = np.sort(rng(seed, "sample", round_).choice(num_clients, per_round, replace=False)).tolist()
    return sampled, surviving(seed, round_, sampled, num_clients, dropout)


def surviving(seed, round_, sampled, num_clients, dropout):
    """The sampled clients that do not fail this round (each with probability `dropout`)."""
    fails = rng(seed, "dropout", round_).random(num_clients) < dropout
    return [c for c in sampled if not fails[c]]


def client_batches(num_samples, batch_size, *, seed, round_, client, epochs=1, steps=0):
    """A client's local batches this round (positions in its own data).

    `epochs` reshuffled passes, or exactly `steps` batches (passing over the
    data as often as needed) when steps > 0. batch_size 0: the whole data.
    A last batch of one sample joins the one before it.
    """
    size = batch_size or num_samples
    batches, epoch = [], 0
    while (len(batches) < steps) if steps else (epoch < epochs):
        order = rng(seed, "client", round_, client, epoch).permutation(num_samples)
        cuts = list(range(0, num_samples, size)) + [num_samples]
        if len(cuts) > 2 and cuts[-1] - cuts[-2] == 1:  # no 1-sample batch (BatchNorm cannot train on one)
            del cuts[-2]
        batches += [order[a:b] for a, b in zip(cuts, cuts[1:])]
        epoch += 1
    return batches[:steps] if steps else batches


class FederatedStrategy(Strategy):
    """Each of the trainer's epochs is one round (one unit of work); evaluate after share_model()."""

    unit = "round"

    def setup(self):
        cfg, comm, data = self.cfg, self.comm, self.dataset
        broadcast_parameters(self.model, comm=comm)
        self.flat = FlatModel(self.model)
        self.buffers = list(self.model.buffers())  # BatchNorm statistics and counters
        self.global_params = self.flat.data.clone()  # x: never a view of the model (see tests)
        self.global_buffers = self._buffer_vector().clone()
        self.num_clients = cfg.num_clients(comm.size)
        self.per_round = cfg.clients_each_round(comm.size)
        self.parts = (natural(data.groups) if cfg.partition == "natural" else
                      partition(data.labels if cfg.partition != "iid" else np.zeros(len(data.train)),
                                self.num_clients, cfg.partition, alpha=cfg.alpha,
                                shards_per_client=cfg.shards_per_client, seed=cfg.seed))
        self.owner = assign_clients([len(p) for p in self.parts], comm.size)
        self.server = ServerOptimizer(cfg.server_opt, cfg.server_learning_rate(), cfg.server_momentum,
                                      self.global_params)
        self.scaffold = cfg.algorithm == "scaffold"
        p, b = self.global_params.numel(), self.global_buffers.numel()
        self.slices = {"params": slice(0, p), "buffers": slice(p, p + b)}
        if self.scaffold:  # control variates: the server's c, and each owned client's c_i (from 0)
            self.slices["control"] = slice(p + b, 2 * p + b)
            self.control = torch.zeros_like(self.global_params)
            self.client_control = {}
        end = self.slices.get("control", self.slices["buffers"]).stop
        self.private = None  # DP-FedAvg: Poisson-sampled clients, clipped unweighted updates, noise once
        if cfg.dp:
            self.private = PrivateRun(cfg, self.per_round / self.num_clients, cfg.rounds, self.per_round, comm)
            self.slices["dp"] = slice(end, end + 2)  # clients counted, updates that fitted under the clip - 1/2
            end += 2
        self.masked = end  # secure aggregation masks each client's part up to here
        self.secure = cfg.secure_aggregation
        self.slices["totals"] = slice(end, end + 2)  # samples trained, summed loss
        self.slices["flags"] = slice(end + 2, end + 5)  # stop, checkpoint, nonfinite: in the same Allreduce
        self.sums = zeros(end + 5, torch.float64)  # float64: rank counts change the order of summing
        self.optimizer = make_optimizer(cfg, self.model.named_parameters())  # reset for each client, see _train_client
        self.lr = cfg.lr  # this round's client learning rate (--lr-schedule), set by run_unit
        self.lost_clients = {}  # round -> clients dealt to a rank lost in it (they count as dropped)
        control = p if self.scaffold else 0  # SCAFFOLD ships c down and c_i's change up, one per parameter
        self.bytes_per_client = (p + b + control) * self.global_params.element_size()

    # -- one round ----------------------------------------------------------------
    def units_in(self, round_):
        return 1

    def run_unit(self, round_, index, wants):
        """Train the sampled clients and apply the averaged update (the round's record: end_epoch).

        A non-finite loss or gradient in any client (agreed in the round's Allreduce) skips the
        round on every rank: no server step, no client's control variate changes, no samples.
        """
        sampled, survivors = self._sample(round_)
        survivors = [c for c in survivors if c not in self.lost_clients.get(round_, ())]
        self.lr = lr_at(self.cfg.lr, self.cfg.schedule(), round_, self.cfg.rounds, self.cfg.warmup_epochs)
        self.sums.zero_()
        self.model.train()
        self.nonfinite, self.control_updates, self.contributions = None, {}, {}
        alive = set(survivors)
        dealt = self._trainers(sampled if self.secure else survivors)  # secure: dropped clients hold shares
        for client, rank in dealt.items():
            if rank == self.comm.rank and client in alive and self.nonfinite is None:  # after a non-finite one
                self._train_client(client, round_)                                       # the round is lost
        mine = wants()
        mine.nonfinite = self.nonfinite is not None
        self.sums[self.slices["flags"]] = torch.tensor(mine.values(), dtype=self.sums.dtype)
        agreed, failed = self._aggregate(round_, sampled, survivors, dealt)
        samples, loss = self.sums[self.slices["totals"]].tolist() if not agreed.nonfinite else (0, 0.0)
        clip = self.private.clip if self.private else None
        if not agreed.nonfinite and not failed and (samples > 0 or self.private):
            self._apply(samples, len(survivors))  # DP: a round without clients still releases its noise
        self.record = self._round_record(sampled, survivors, samples, loss)
        if self.private:
            self.record.update(self.private.record(round_ + 1), dp_clip_used=clip)
        if failed:
            self.record["round_failed"] = failed
        if round_ in self.lost_clients:
            self.record["clients_lost"] = len(self.lost_clients[round_])
        return agreed, True

    def _sample(self, round_):
        """(sampled, survivors): DP samples each client with probability q (Poisson), as accounted."""
        if not self.private:
            return sample_clients(self.cfg.seed, round_, self.num_clients, self.per_round, self.cfg.dropout)
        sampled = poisson_sample(self.private.sample_seed, "dp-clients", (round_,), self.num_clients,
                                 self.private.sample_rate).tolist()
        return sampled, surviving(self.cfg.seed, round_, sampled, self.num_clients, self.cfg.dropout)

    def _aggregate(self, round_, sampled, survivors, dealt):
        """Sum the clients' parts over ranks (root adds the DP noise once); returns (agreed Flags,
        why secure aggregation failed or None)."""
        noise = self._noise(round_) if self.private and self.comm.is_root else None
        if not self.secure:
            if noise is not None:
                self.sums[:self.masked].add_(noise)
            self.comm.allreduce_(self.sums, what="the clients' summed updates")  # the only collective of a round
            return Flags.summed(self.sums[self.slices["flags"]].tolist()), None
        clear = self.sums[self.masked:]  # totals and flags travel in the clear
        self.comm.allreduce_(clear, what="the round's totals and flags")
        agreed = Flags.summed(self.sums[self.slices["flags"]].tolist())
        if agreed.nonfinite:
            return agreed, None
        from ..secagg import TooFewSurvivors, default_neighbors  # cryptography: the privacy extra
        from .secure import secure_sum
        k = self.cfg.secagg_neighbors or default_neighbors(len(sampled), self.cfg.dropout)
        try:
            total, self.masked_part = secure_sum(self.comm, self.contributions, self.masked, sampled, survivors,
                                                 dealt, k=k, seed=self.cfg.seed, round_=round_,
                                                 extra=None if noise is None else noise.numpy())
        except TooFewSurvivors as e:
            return agreed, f"secure aggregation cannot go on: {e} (no update this round)"
        self.sums[:self.masked] = torch.from_numpy(total)
        return agreed, None

    def _noise(self, round_):
        """N(0, (z_update C)^2) on the summed update, N(0, sigma_b^2) on the count of fitting updates."""
        noise = torch.zeros(self.masked, dtype=torch.float64)
        params = self.slices["params"]
        noise[params] = self.private.noise.gaussian((params.stop,), self.private.update_std(), round_)
        if self.private.adaptive:
            noise[self.slices["dp"].stop - 1] = self.private.noise.gaussian((1,), self.private.count_std(),
                                                                           (round_, 1))[0]
        return noise

    def end_epoch(self, round_):
        return self.record

    def describe(self, round_, index):
        return f"round {round_ + 1}"

    def train_round(self, round_):
        """One round outside the trainer's loop (tests, experiments); returns its record."""
        self.run_unit(round_, 0, Flags)
        return self.record

    def epochs(self):
        return self.cfg.rounds

    def _round_record(self, sampled, survivors, samples, loss):
        return {"clients_sampled": len(sampled), "clients_participating": len(survivors),
                "clients_dropped": len(sampled) - len(survivors),
                "train_loss": loss / samples if samples else None,
                "samples": int(samples), "bytes_down": len(sampled) * self.bytes_per_client,
                "bytes_up": len(survivors) * self.bytes_per_client}

    def _trainers(self, clients, size=None):
        """The rank that trains each of this round's clients (dealt over `size` ranks, default all).

        A client with state (SCAFFOLD's c_i) is trained by its owner; stateless
        clients are dealt out afresh each round, so the ranks share this
        round's work evenly.
        """
        if self.scaffold:
            return {c: self.owner[c] for c in clients}
        return dict(zip(clients, assign_clients([len(self.parts[c]) for c in clients], size or self.comm.size)))

    def _train_client(self, client, round_):
        """Local training from the global model; adds the weighted update to self.sums.

        torch's global generator (dropout layers in a user's model) is seeded
        per (round, client), so it does not matter which rank trains whom.
        """
        with torch.random.fork_rng(devices=[]):
            # The CPU generator only: torch.manual_seed also queues CUDA/XPU seeding, ~0.2 ms each.
            # A tuple of ints hashes the same in every process (unlike str, see PYTHONHASHSEED).
            torch.default_generator.manual_seed(hash((self.cfg.seed, round_, client)))
            self._train_client_seeded(client, round_)

    def _train_client_seeded(self, client, round_):
        cfg, flat = self.cfg, self.flat
        self.load_global()
        optimizer = self.optimizer
        optimizer.state.clear()  # a fresh client optimizer (momentum, Adam moments) each round
        set_lr(optimizer, self.lr)
        own = self.parts[client]
        batches = client_batches(len(own), cfg.batch_size, seed=cfg.seed, round_=round_, client=client,
                                 epochs=cfg.local_epochs, steps=cfg.local_steps)
        if self.scaffold:
            correction = self.control - self.client_control.get(client, 0)
        trained, loss_total = 0, 0.0
        lists = [own[positions] for positions in batches]
        for i, positions in enumerate(batches):
            flat.grad.zero_()  # not optimizer.zero_grad(): .grad must stay a view of flat.grad
            x, y = self.loader.get(("client", round_, client), round_, lists, i)
            summed = self.summed_loss(x, y)
            (summed / len(positions)).backward()
            loss = summed.item()
            self.nonfinite = first_nonfinite(loss, [flat.grad], self.model)
            if self.nonfinite:  # the round will be skipped: no use training on
                return
            if cfg.algorithm == "fedprox":  # gradient of (mu / 2) ||w - x||^2
                flat.grad.add_(flat.data - self.global_params, alpha=cfg.prox_mu)
            if self.scaffold:
                flat.grad.add_(correction)
            if cfg.clip_norm:  # each local step's gradient, as the client would alone
                clip_grad_norm_([flat.grad], cfg.clip_norm)
            optimizer.step()
            trained, loss_total = trained + len(positions), loss_total + loss
        with torch.no_grad():
            part = self._client_part(client, trained, len(batches))
            if not torch.isfinite(part).all():  # finite gradients can still make infinite weights
                self.nonfinite = "the client's update"
                return
            self._contribute(client, part)
            self.sums[self.slices["totals"]] += torch.tensor([trained, loss_total], dtype=self.sums.dtype)

    def _client_part(self, client, trained, steps):
        """What a client sends: its update weighted by samples trained (DP: clipped to C, weight 1),
        its buffers' change, SCAFFOLD's control change, DP's counts."""
        part = torch.zeros(self.masked, dtype=torch.float64)
        update = (self.flat.data - self.global_params).double()
        weight = trained
        if self.private:
            norm = clip_grad_norm_([update], self.private.clip)  # the same factor as DP-SGD's per sample
            fitted = float(norm <= self.private.clip) - 0.5  # centred: one client moves the count by 0.5
            part[self.slices["dp"]] = torch.tensor([1.0, fitted], dtype=torch.float64)
            weight = 1
        part[self.slices["params"]] = update * weight
        part[self.slices["buffers"]] = (self._buffer_vector() - self.global_buffers).double() * trained
        if self.scaffold:
            part[self.slices["control"]] = self._update_control(client, steps).double()
        return part

    def _contribute(self, client, part):
        """Into the rank's sum, or (secure aggregation) kept apart to be masked."""
        if self.secure:
            self.contributions[client] = part.numpy()
        else:
            self.sums[:self.masked].add_(part)

    def _update_control(self, client, steps):
        """SCAFFOLD option II: c_i+ = c_i - c + (x - y) / (K lr); returns c_i+ - c_i (kept in
        control_updates until _apply: a skipped round changes no c_i)."""
        delta = (self.global_params - self.flat.data) / (steps * self.lr) - self.control
        self.control_updates[client] = delta
        return delta

    def _apply(self, samples, survivors):
        """Server step with the weighted average update (DP: the noised sum over the expected number
        of clients, a fixed denominator); buffers are averaged by samples."""
        sums, dtype = self.sums, self.global_params.dtype
        denominator = self.private.expected if self.private else samples
        self.server.step(self.global_params, (sums[self.slices["params"]] / denominator).to(dtype))
        if samples > 0:
            self.global_buffers.add_((sums[self.slices["buffers"]] / samples).to(dtype))
        if self.private and self.private.adaptive:
            self.private.adaptive.update(float(sums[self.slices["dp"]][1]))
        if self.scaffold:  # c += (1 / N) sum over participants of (c_i+ - c_i)
            self.control.add_((sums[self.slices["control"]] / self.num_clients).to(dtype))
            for client, delta in self.control_updates.items():
                self.client_control[client] = self.client_control.get(client, 0) + delta

    # -- the global model ---------------------------------------------------------
    def load_global(self):
        """Put the global weights (and buffers) into the model, by copy."""
        with torch.no_grad():
            self.flat.data.copy_(self.global_params)
            offset = 0
            for b in self.buffers:
                value = self.global_buffers[offset:offset + b.numel()].view_as(b)
                b.copy_(value if b.is_floating_point() else value.round())  # averaged counters
                offset += b.numel()

    def _buffer_vector(self):
        if not self.buffers:
            return torch.zeros(0, dtype=self.global_params.dtype)
        return torch.cat([b.detach().reshape(-1).to(self.global_params.dtype) for b in self.buffers])

    def share_model(self):
        self.load_global()

    def model_state(self):
        self.load_global()
        return self.model.state_dict()

    def state_dict(self):
        """The global model, the server optimizer's moments, SCAFFOLD's c and every client's c_i."""
        owned = self.comm.gather_object(getattr(self, "client_control", {})) or []  # root's; rare
        return {"global_params": self.global_params, "global_buffers": self.global_buffers,
                "server_m": self.server.m, "server_v": self.server.v, "record": getattr(self, "record", None),
                "control": getattr(self, "control", None),
                "client_control": {c: v for part in owned for c, v in part.items()},
                "privacy": self.private.state_dict() if self.private else None}

    def load_state_dict(self, state, own):
        """Also on another world size: each rank takes the client variates of the clients it owns now."""
        with torch.no_grad():
            for name in ("global_params", "global_buffers"):
                getattr(self, name).copy_(state[name])
            self.server.m.copy_(state["server_m"])
            self.server.v.copy_(state["server_v"])
            self.record = state["record"]  # a round done but not yet recorded (checkpoint inside the epoch)
            if self.scaffold:
                self.control.copy_(state["control"])
                self.client_control = {c: v for c, v in state["client_control"].items()
                                       if self.owner[c] == self.comm.rank}
            if self.private:
                self.private.load_state_dict(state["privacy"])
        self.load_global()

    # -- a lost rank: its clients drop out of the round, later rounds go to the survivors --
    def replica_state(self):
        return {"global_params": self.global_params, "global_buffers": self.global_buffers,
                "server_m": self.server.m, "server_v": self.server.v, "record": getattr(self, "record", None)}

    def load_replica_state(self, state):
        with torch.no_grad():
            for name in ("global_params", "global_buffers"):
                getattr(self, name).copy_(state[name])
            self.server.m.copy_(state["server_m"])
            self.server.v.copy_(state["server_v"])
        self.record = state["record"]
        self.load_global()

    def survive(self, lost, old_size, position):
        """The clients the lost ranks were training this round drop out of it (unless it completed)."""
        round_, done, _ = position
        if not done:
            _, survivors = self._sample(round_)
            dealt = self._trainers(survivors, old_size)
            self.lost_clients[round_] = sorted(c for c, rank in dealt.items() if rank in lost)
        self.owner = assign_clients([len(p) for p in self.parts], self.comm.size)  # who scores whom

    def check_resume(self, saved, world_size, state=None):
        """Any world size, as long as the clients are the same (--clients 0 means one per rank)."""
        from ..config import Config
        then = Config(**{**saved, "config": None})
        if (then.num_clients(world_size), then.clients_each_round(world_size)) != (self.num_clients, self.per_round):
            return (f"has {then.num_clients(world_size)} clients, {then.clients_each_round(world_size)} a round "
                    f"(made on {world_size} ranks); this run has {self.num_clients}, {self.per_round}: give "
                    f"--clients {then.num_clients(world_size)} (and the same --clients-per-round) to resume on "
                    f"{self.comm.size} ranks")
        if self.private:
            problem = self.private.check_resume((state or {}).get("privacy"))
            if problem:
                return problem
        return super().check_resume(saved, world_size)

    def evaluate_extra(self):
        """Per-client scores on the clients' own data (not under DP: they are not private)."""
        return {} if self.private else self.client_scores()

    @torch.no_grad()
    def client_scores(self):
        """Accuracy of the global model on each client's own data: mean, min, 10th percentile.

        Each rank scores the clients it owns; one Allreduce gathers them.
        """
        if self.dataset.task != "classification" or self.dataset.target_shape:  # one class per sample only
            return {}
        self.load_global()
        self.model.eval()
        scores = torch.zeros(self.num_clients, dtype=torch.float64)
        for client, own in enumerate(self.parts):
            if self.owner[client] == self.comm.rank:
                for start in range(0, len(own), 1024):
                    x, y = self.dataset.train.batch(own[start:start + 1024])
                    scores[client] += (self.model(x).argmax(dim=1) == y).sum().item()
                scores[client] /= len(own)
        scores = self.comm.allreduce_(scores).numpy()
        return {"client_acc_mean": float(scores.mean()), "client_acc_min": float(scores.min()),
                "client_acc_p10": float(np.percentile(scores, 10))}

    def summary(self, history, train_time):
        """Rounds, bytes, and the first round (and bytes) at --target-accuracy."""
        reached, sent = {}, 0
        for r in history:
            sent += r["bytes_up"] + r["bytes_down"]
            if not reached and self.cfg.target_accuracy is not None \
                    and r.get("test_accuracy", -1) >= self.cfg.target_accuracy:
                reached = {"rounds_to_target": r["round"], "bytes_to_target": sent}
        return {"rounds": len(history), "round_time_s": train_time / max(len(history), 1),
                "bytes_up": sum(r["bytes_up"] for r in history),
                "bytes_down": sum(r["bytes_down"] for r in history),
                "rounds_to_target": None, "bytes_to_target": None, **reached,
                "clients": self.num_clients, "clients_per_round": self.per_round,
                **({"clients_lost": {r + 1: c for r, c in self.lost_clients.items()}} if self.lost_clients else {}),
                "algorithm": self.cfg.algorithm, "server_opt": self.cfg.server_opt,
                "partition": self.cfg.partition, **(self.private.record(len(history)) if self.private else {}),
                **({"rounds_failed": sum("round_failed" in r for r in history)} if self.secure else {})}
