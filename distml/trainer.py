"""The training run, top to bottom: set-up, units of work, summary.

    mpirun -n 2 distml train                       # digits, mlp, 2 ranks
    python -m distml train --dataset diabetes --model linear
    mpirun -n 2 distml train --checkpoint-dir ckpt --resume   # continue where a stopped run left off

`run(cfg)` is a pure function of the config and the world size; where
mathematics allows (sync, federated), of the config alone. Every mode goes
through the same loop: epochs of units of work (see `strategies.base`),
between any two units a point where the job may stop or checkpoint, and
after each epoch a record (and every --eval-every epochs an evaluation).
"""
import json
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from . import comm as _comm
from .agreement import agree, check_same, data_fingerprint, fingerprint
from .comm import RankLost
from .cluster import default_threads
from .checkpoint import (Checkpoint, checkpoint_number, list_checkpoints, newest_checkpoint, read_checkpoint,
                         save_state_dict, set_aside, write_checkpoint)
from .config import RESUME_NEWEST, UsageError
from .data import load_dataset
from .data.loader import check_picklable
from .metrics import Reporter, Timer
from .losses import check_loss, make_loss
from .models import build_model, probe_batch, probe_output
from .nonfinite import NonFinite, describe_ranks, diagnosis
from .sharding import rng
from .signals import Preempted, StopFlag
from .strategies import STRATEGIES
from .strategies.base import Flags
from .watchdog import HangDoctor

__all__ = ["run", "Result", "default_threads", "evaluate"]

# Settings that do not change what is computed: a resumed run may give them anew.
_FREE_ON_RESUME = ("threads", "save_model", "metrics", "quiet", "config", "checkpoint_dir", "checkpoint_every",
                   "checkpoint_every_s", "keep", "resume", "requeue", "timeout", "watchdog", "on_rank_failure",
                   "on_nan", "slow_rank", "slow_factor",
                   "bucket_mb", "chunk_mb", "overlap", "eval_every", "dataset", "batch_size",  # data: by content;
                   "accumulate", "data_workers",  # batch and accumulate: per mode (sync: the global batch)
                   "zero")  # the sharded optimizer saves and loads the whole state, in the unsharded format


@dataclass
class Result:
    summary: dict
    history: list = field(default_factory=list)
    model: torch.nn.Module = None


def run(cfg, comm=None, *, signals=None):
    """Train as `cfg` says on every rank of `comm`; returns the same Result on every rank.

    Raises signals.Preempted on every rank after a stop signal (and the checkpoint), and
    nonfinite.NonFinite after a non-finite loss or gradient with --on-nan stop. `signals`:
    a StopFlag the caller holds (the CLI's, active from its start); by default one of run's own.
    """
    comm = comm or _comm.world()
    if signals is not None:
        return _run(cfg, comm, signals)
    with StopFlag() as signals:  # from the start: a stop signal during set-up is acted on at the first step
        return _run(cfg, comm, signals)


def _run(cfg, comm, signals):
    wall = Timer()
    bytes_before = comm.bytes_sent  # a second run in one process counts only its own
    report = Reporter(enabled=comm.is_root, quiet=cfg.quiet, metrics_path=cfg.metrics)

    # -- set-up: every usage error surfaces here, on all ranks, before training --
    agree(comm, lambda: cfg.validate(writes_outputs=comm.is_root).validate_world(comm.size))
    agree(comm, lambda: _check_fault_tolerance(cfg, comm))
    dataset, model, loss = agree(comm, lambda: _load(cfg, comm))  # each rank checks its block of the data's values
    salt = comm.bcast_object(int.from_bytes(os.urandom(8), "little") if comm.is_root else None)
    check_same(comm, "settings, data or model", fingerprint(cfg, dataset, model, salt))  # rows sampled by salt
    default = default_threads(comm)  # a collective: every rank calls it
    threads = cfg.threads or default
    torch.set_num_threads(threads)
    strategy = STRATEGIES[cfg.mode](cfg, dataset, model, comm, loss)
    strategy.setup()
    _seed_rank(cfg, comm, work_done=0)  # dropout masks differ by rank (the initial weights do not)
    path, ckpt = agree(comm, lambda: _find_resume(cfg, comm, strategy, dataset, model, report))
    path, ckpt = comm.bcast_object((path, ckpt))  # rare and small next to training: pickled
    epoch, step, history = _restore(ckpt, cfg, comm, strategy, model) if ckpt else (0, 0, [])
    report.open_metrics(keep_bytes=ckpt.metrics_bytes if ckpt else 0)
    report.say(f"distml: {cfg.mode} on {comm.size} rank(s), {dataset.name} ({len(dataset.train)} train / "
               f"{len(dataset.test)} test, {dataset.task}), model {cfg.model} "
               f"({sum(p.numel() for p in model.parameters()):,} parameters), {threads} thread(s) per rank")
    if path:
        report.say(f"distml: resumed from {path} at {strategy.unit} {epoch + 1}, unit {step}")

    # -- units of work; between any two, the job may stop, checkpoint or lose a rank
    with (HangDoctor(comm, cfg.watchdog) if cfg.watchdog and comm.size > 1 else nullcontext()) as doctor:
        loop = _Loop(cfg, comm, strategy, model, dataset, report, signals, doctor, bytes_before)
        try:
            if strategy.loads_data():
                strategy.loader.start()  # loading workers, if any: their start-up is not the first epoch's time
            loop.run(epoch, step, history, ckpt.position["elapsed_s"] if ckpt else 0.0,
                     ckpt.position.get("nonfinite_skipped", 0) if ckpt else 0)
        finally:
            strategy.loader.close()  # the loading workers, if any

        # -- summary and outputs (root only writes) -----------------------------
        comm.calls.context = "summary"
        strategy.share_model()
        summary = _summary(cfg, comm, dataset, strategy, history, threads, wall, bytes_before)
        if loop.lost:
            summary["ranks_lost"] = loop.lost
    if comm.is_root and cfg.save_model:
        save_state_dict(model, cfg.save_model)
    report.record(**summary)
    report.close()
    report.say(_summary_line(summary, strategy.unit))
    return Result(summary, history, model)


class _Loop:
    """Epochs of units of work, recording each epoch into `history`; between units, what may happen.

    After a unit, the agreed flags may report non-finite values (NonFinite, or a skipped update),
    ask for a checkpoint (root's clock) or a stop (a signal on any rank: checkpoint, then
    Preempted); after an epoch, --checkpoint-every may. Under --on-rank-failure continue, a lost
    rank (RankLost) is survived: see `survive`.
    """

    def __init__(self, cfg, comm, strategy, model, dataset, report, signals, doctor, bytes_before):
        self.cfg, self.comm, self.strategy, self.model, self.dataset = cfg, comm, strategy, model, dataset
        self.bytes_before = bytes_before  # this rank's count when the run began
        self.report, self.signals, self.doctor = report, signals, doctor
        self.saver = _Saver(cfg, comm, strategy, model, dataset, report)
        self.lost = []  # what the summary says of each lost rank
        self.wall = Timer()

    def run(self, epoch, step, history, elapsed_s, skipped):
        """From (epoch, step) to the end; `elapsed_s` and `skipped` (non-finite updates) of the epoch so far."""
        strategy, epochs = self.strategy, self.strategy.epochs()
        self.epoch, self.step, self.recorded, self.history = epoch, step, False, history
        self.saver.epoch_s = elapsed_s
        self.on_nan = _OnNan(self.cfg, self.comm, strategy, self.report, history, skipped)
        self.bar = self.report.progress(total=sum(strategy.units_in(e) for e in range(epochs)),
                                        done=sum(strategy.units_in(e) for e in range(epoch)) + step,
                                        desc=f"{strategy.unit}s")
        while self.epoch < epochs:
            try:
                self._epoch()
            except RankLost as lost:
                self.survive(lost)
        self.bar.close()

    def _epoch(self):
        """The rest of epoch self.epoch from unit self.step; self.(epoch, step, recorded) say how far it got."""
        cfg, comm, strategy, saver = self.cfg, self.comm, self.strategy, self.saver
        wants = lambda: Flags(self.signals.requested, comm.is_root and saver.due())  # noqa: E731
        timer = Timer()
        while self.step < strategy.units_in(self.epoch):
            comm.calls.context = strategy.describe(self.epoch, self.step)
            flags, finished = strategy.run_unit(self.epoch, self.step, wants)
            if flags.nonfinite:
                error = self.on_nan.after(flags, _at(strategy, self.epoch, self.step))
                if error:
                    self.bar.close()
                    raise error  # no checkpoint: the newest one is the last good state
            self.step += finished
            self.bar.update(finished)
            if cfg.eval_every_steps and not flags.nonfinite and self._eval_due():
                self._evaluate_within(timer)
            if flags.stop or flags.checkpoint:
                self._checkpoint_or_stop(flags, timer)
        comm.calls.context = f"end of {strategy.unit} {self.epoch + 1}"
        record = _end_epoch(self.epoch, strategy, self.model, self.dataset, comm, cfg,
                            timer.elapsed() + saver.epoch_s, self.bytes_before)
        record["nonfinite_skipped"], self.on_nan.in_epoch = self.on_nan.in_epoch, 0
        self.history.append(record)
        self.recorded = True
        self.report.record(**record)
        if "round_failed" in record:
            self.report.warn(f"distml: round {record['round']}: {record['round_failed']}")
        if any(k.startswith("test_") for k in record):
            self.report.say(_epoch_line(record, strategy.unit, strategy.epochs()))
        epoch = self.epoch + 1
        if cfg.checkpoint_every and (epoch % cfg.checkpoint_every == 0 or epoch == strategy.epochs()):
            comm.calls.context = f"checkpoint after {strategy.unit} {epoch}"
            saver.save(epoch, 0, self.history, Timer())
        self.epoch, self.step, self.recorded, saver.epoch_s = epoch, 0, False, 0.0

    def _eval_due(self):
        """--eval-every-steps: this step's, unless the epoch ends here with an evaluation of its own."""
        done = self.strategy.work_done(self.epoch, self.step)
        at_end = self.step == self.strategy.units_in(self.epoch)
        evaluated = (self.epoch + 1) % self.cfg.eval_every == 0 or self.epoch + 1 == self.strategy.epochs()
        return done % self.cfg.eval_every_steps == 0 and not (at_end and evaluated)

    def _evaluate_within(self, timer):
        """A test record inside an epoch (--eval-every-steps); its time does not count as training."""
        started = time.perf_counter()
        comm, strategy = self.comm, self.strategy
        comm.calls.context = f"evaluation after step {strategy.work_done(self.epoch, self.step)}"
        strategy.share_model()
        record = {"eval": True, strategy.unit: self.epoch + 1, "step": strategy.work_done(self.epoch, self.step),
                  "train_time_s": sum(r[f"{strategy.unit}_time_s"] for r in self.history) + timer.elapsed()
                  + self.saver.epoch_s,
                  **evaluate(self.model, self.dataset, comm, strategy.loss, precision=self.cfg.precision),
                  "bytes_communicated": _bytes_so_far(comm, self.bytes_before)}
        self.report.record(**record)
        self.report.say(f"step {record['step']:>6}  {_score(record)}  {record['train_time_s']:.1f}s")
        self.saver.epoch_s -= time.perf_counter() - started

    def _checkpoint_or_stop(self, flags, timer):
        strategy = self.strategy
        self.comm.calls.context = f"checkpoint in {strategy.unit} {self.epoch + 1}"
        written = self.saver.save(self.epoch, self.step, self.history, timer, self.on_nan.in_epoch)
        if flags.stop:
            self.bar.close()
            units = strategy.units_in(self.epoch)  # steps in a sync epoch; one round, or one async segment
            where = f"{strategy.unit} {self.epoch + 1}" + (f" (unit {self.step} of {units})" if units > 1 else "")
            raise Preempted(self.signals.requested or "a signal on another rank", where, written)

    def survive(self, lost):
        """Go on without the lost rank(s): shrink, agree on the furthest position, re-split the work.

        A unit's collective can complete on some ranks and fail on others, so
        survivors may be one unit apart; the one furthest on hands its replica
        state (and history) to the others, and everyone continues from there.
        """
        comm, strategy = self.comm, self.strategy
        if self.cfg.on_rank_failure != "continue":
            raise lost
        if os.environ.get("DISTML_DEBUG"):
            import traceback
            traceback.print_exception(lost)
        before = list(comm.members)
        ranks = comm.shrink(lost.call)
        if 0 in ranks:  # root writes the checkpoints, metrics and model: nobody can take over its files
            raise RankLost(ranks, f"{lost.call}; rank 0 holds the job's outputs, so the job cannot go on")
        if self.doctor:
            self.doctor.restart()
        where = strategy.describe(self.epoch, self.step)
        positions = comm.allgather_object((self.epoch, self.step, self.recorded))
        ahead = positions.index(max(positions))
        strategy.survive([before.index(r) for r in ranks], len(before), positions[ahead])
        if any(p != positions[ahead] for p in positions):
            state = comm.bcast_object((strategy.replica_state(), self.history) if comm.rank == ahead else None,
                                      root=ahead)
            strategy.load_replica_state(state[0])
            if self.recorded != positions[ahead][2] and len(state[1]) > len(self.history):
                self.report.record(**state[1][-1])  # root missed writing the record it now takes
            self.history[:] = state[1]
        self.epoch, self.step, self.recorded = positions[ahead]
        if self.recorded:  # lost after the epoch's record: its checkpoint is skipped, the next one comes
            self.epoch, self.step, self.recorded = self.epoch + 1, 0, False
        self.lost += [{"rank": r, "seen_in": lost.call, "at": where, "after_s": round(self.wall.elapsed(), 3)}
                      for r in ranks]
        self.report.warn(f"distml: lost rank(s) {', '.join(map(str, ranks))} at {where} ({lost.call}); going on with "
                         f"{comm.size} rank(s) from {strategy.describe(self.epoch, self.step)}")


def _check_fault_tolerance(cfg, comm):
    if cfg.on_rank_failure == "continue" and comm.size > 1 and not comm.fault_tolerant():
        raise UsageError("--on-rank-failure continue needs an MPI that survives a lost rank (ULFM): launch with "
                         "mpirun --with-ft ulfm (Open MPI 5), not srun; or use --on-rank-failure abort")


def _at(strategy, epoch, step):
    """Where a unit is, for a message: 'epoch 2, step 5 of 12' (sync), 'round 3'."""
    units = strategy.units_in(epoch)
    return f"{strategy.unit} {epoch + 1}" + (f", step {step + 1} of {units}" if units > 1 else "")


class _OnNan:
    """--on-nan after a unit whose agreed flags report non-finite values (no rank made that update).

    stop: after() gives the NonFinite every rank raises. skip: it counts the skipped updates and
    root names the first few in a warning line. What each rank saw travels in one allgather, on
    this rare path only (and every rank takes the same branch: the counts are agreed).
    `in_epoch`: skipped in the current epoch so far (its record; a checkpoint inside it keeps it).
    """

    WARNINGS = 5  # lines naming a skip; later skips are only counted

    def __init__(self, cfg, comm, strategy, report, history, in_epoch):
        self.cfg, self.comm, self.strategy, self.report = cfg, comm, strategy, report
        self.in_epoch = in_epoch
        self.total = sum(r.get("nonfinite_skipped", 0) for r in history) + in_epoch

    def after(self, flags, where):
        """The NonFinite to raise (stop), or None once the skip is counted (skip)."""
        named = self.cfg.on_nan == "stop" or self.total < self.WARNINGS
        ranks, tensor = diagnosis(self.comm.allgather_object(self.strategy.nonfinite)) if named else ([], "")
        if self.cfg.on_nan == "stop":
            return NonFinite(where, ranks, tensor)
        self.total, self.in_epoch = self.total + flags.nonfinite, self.in_epoch + flags.nonfinite
        if named:
            later = "; later ones are only counted" if self.total >= self.WARNINGS else ""
            self.report.warn(f"distml: warning: non-finite {tensor} at {where} on {describe_ranks(ranks)}: "
                             f"{flags.nonfinite} update(s) skipped on every rank ({self.total} so far{later})")
        return None


def _load(cfg, comm):
    """Data, model and loss, each checked on the data's first samples (UsageError: bad input)."""
    dataset = load_dataset(cfg, rank=comm.rank, size=comm.size)
    cfg.validate_data(dataset, comm.size)
    model = build_model(cfg.model, dataset, cfg.hidden_sizes(), cfg.seed,
                        layers=cfg.layers, heads=cfg.heads, embed=cfg.embed)
    if cfg.dp:
        from .per_sample import check_private_model
        check_private_model(model)
    loss = make_loss(cfg.loss, dataset.task)
    x, y = probe_batch(dataset)
    check_loss(loss, cfg.loss, probe_output(model, x), y)
    if cfg.data_workers:
        check_picklable(dataset.train)
    return dataset, model, loss


def _seed_rank(cfg, comm, work_done):
    """This rank's torch generator from (seed, rank, position): its own dropout masks."""
    seed = int(rng(cfg.seed, "torch", comm.rank, work_done).integers(2**63))
    torch.default_generator.manual_seed(seed)  # the CPU generator only (manual_seed also queues CUDA's)


def _end_epoch(epoch, strategy, model, dataset, comm, cfg, elapsed, bytes_before):
    """The epoch's record: training totals, its time, and, every --eval-every epochs, test scores."""
    unit = strategy.unit
    record = {unit: epoch + 1, **strategy.end_epoch(epoch)}
    record[f"{unit}_time_s"] = elapsed
    record["samples_per_s"] = record["samples"] / elapsed if elapsed > 0 else None
    if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == strategy.epochs():
        comm.calls.context = f"evaluation after {unit} {epoch + 1}"
        strategy.share_model()  # every rank must evaluate the same model
        record.update(evaluate(model, dataset, comm, strategy.loss, precision=cfg.precision))
        record.update(strategy.evaluate_extra())
    record["bytes_communicated"] = _bytes_so_far(comm, bytes_before)  # after the evaluation: curves of accuracy vs bytes
    return record


def _bytes_so_far(comm, bytes_before):
    """Payload bytes every rank has handed to MPI since this run began (`bytes_before`: this rank's
    count then), summed over ranks (a collective)."""
    return int(comm.allreduce_array([comm.bytes_sent - bytes_before])[0])


# -- checkpoints ------------------------------------------------------------------
class _Saver:
    """Writes checkpoints (a collective; root writes) and keeps root's --checkpoint-every-s clock.

    `epoch_s`: seconds of the current epoch run before this process (resumed inside it),
    less the seconds spent writing checkpoints in it, so epoch times count training only.
    """

    def __init__(self, cfg, comm, strategy, model, dataset, report):
        self.cfg, self.comm, self.strategy, self.model, self.report = cfg, comm, strategy, model, report
        self.last = time.monotonic()
        self.epoch_s = 0.0
        # The data's fingerprint in a checkpoint: salt 0, a function of the data alone (root, before training)
        self.data = data_fingerprint(dataset) if comm.is_root and cfg.checkpoint_dir else None

    def due(self):
        every = self.cfg.checkpoint_every_s
        return bool(self.cfg.checkpoint_dir and every and time.monotonic() - self.last >= every)

    def save(self, epoch, step, history, timer, skipped=0):
        """A checkpoint at (epoch, step), `skipped` non-finite updates into the epoch; returns its path
        (None without --checkpoint-dir)."""
        if not self.cfg.checkpoint_dir:
            return None
        started = time.perf_counter()
        model_state, state = self.strategy.model_state(), self.strategy.state_dict()
        own = {"torch_rng": torch.get_rng_state(), "buffers": [b.detach().clone() for b in self.model.buffers()],
               **self.strategy.rank_state()}
        ranks = self.comm.gather_object(own)
        path = None
        if self.comm.is_root:
            self.report.sync()  # the metrics up to here are on disk before the checkpoint points at them
            ckpt = Checkpoint(
                mode=self.cfg.mode, world_size=self.comm.size, config=json.dumps(asdict(self.cfg)),
                data=self.data, model=model_state, strategy=state, ranks=ranks,
                position={"epoch": epoch, "step": step, "units": self.strategy.work_done(epoch, step),
                          "elapsed_s": timer.elapsed() + self.epoch_s, "nonfinite_skipped": skipped},
                history=json.dumps(history), metrics_bytes=self.report.bytes_written())
            path = write_checkpoint(ckpt, self.cfg.checkpoint_dir, self.cfg.keep)
        self.last = time.monotonic()
        self.epoch_s -= time.perf_counter() - started
        return path


def _find_resume(cfg, comm, strategy, dataset, model, report):
    """(path, Checkpoint) to resume from, checked against this run, or (None, None); root reads it."""
    if not comm.is_root:
        return None, None
    present = list_checkpoints(cfg.checkpoint_dir) if cfg.checkpoint_dir else []
    if not cfg.resume:
        if present:  # a fresh run would mix its checkpoints with another run's (and prune them)
            raise UsageError(f"--checkpoint-dir {cfg.checkpoint_dir} already holds checkpoints (newest: "
                             f"{os.path.basename(present[-1])}): continue that run with --resume, or give an "
                             f"empty directory")
        return None, None
    damaged = []
    if cfg.resume == RESUME_NEWEST:
        path, ckpt, damaged = newest_checkpoint(cfg.checkpoint_dir)
        if path is None:
            report.say(f"distml: no checkpoint in {cfg.checkpoint_dir} yet: starting from the beginning")
            return None, None
    else:
        path, ckpt = cfg.resume, read_checkpoint(cfg.resume)
    problem = _resume_problem(ckpt, cfg, strategy, dataset, model)
    if problem:
        raise UsageError(f"--resume: {path} {problem}")
    skipped = {bad for bad, _ in damaged}
    later = [p for p in list_checkpoints(cfg.checkpoint_dir) if checkpoint_number(p) > ckpt.position["units"]
             and p not in skipped] if cfg.checkpoint_dir else []
    if later:
        raise UsageError(f"--resume: --checkpoint-dir {cfg.checkpoint_dir} holds checkpoints made after {path} "
                         f"(newest: {os.path.basename(later[-1])}); they would be mixed with this run's: give "
                         f"another --checkpoint-dir")
    set_aside(damaged, report.warn)  # only now: a refused run leaves the directory as it was
    return path, ckpt


def _resume_problem(ckpt, cfg, strategy, dataset, model):
    """Why `ckpt` cannot continue this run (mode, model, data, settings, world), or None."""
    if ckpt.mode != cfg.mode:
        return f"is from a --mode {ckpt.mode} run; this run is --mode {cfg.mode}"
    mine = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in ckpt.model.items()} if isinstance(ckpt.model, dict) else None
    if theirs != mine:
        return f"holds another model than --model {cfg.model} here ({_first_mismatch(theirs or {}, mine)})"
    if ckpt.data != data_fingerprint(dataset):
        return f"was made on another data set than --dataset {cfg.dataset}"
    saved = json.loads(ckpt.config)
    for name, value in asdict(cfg).items():
        if name not in _FREE_ON_RESUME and saved.get(name) != value:
            flag = "--" + name.replace("_", "-")
            return (f"was made with {flag} {saved.get(name)}, this run has {flag} {value} "
                    f"(a resumed run must train as the one it continues)")
    return strategy.check_resume(saved, ckpt.world_size, ckpt.strategy)


def _first_mismatch(theirs, mine):
    """The first tensor whose name or shape differs between two {name: shape} maps, in words."""
    for name in list(mine) + [n for n in theirs if n not in mine]:
        if name not in theirs:
            return f"it has no {name}"
        if name not in mine:
            return f"it has {name}, this model none"
        if theirs[name] != mine[name]:
            return f"its {name} is {list(theirs[name])}, this model's {list(mine[name])}"
    return "the same tensors"  # not reached: the maps differ


def _restore(ckpt, cfg, comm, strategy, model):
    """Load `ckpt` into the model, the strategy and this rank's generators; returns (epoch, step, history)."""
    model.load_state_dict(ckpt.model)
    own = ckpt.ranks[comm.rank] if ckpt.world_size == comm.size else None
    if own is None:  # another world size: ranks are new, their generators start from the position
        _seed_rank(cfg, comm, work_done=ckpt.position["units"])
    else:
        torch.set_rng_state(own["torch_rng"])
        with torch.no_grad():
            for buffer, saved in zip(model.buffers(), own["buffers"]):
                buffer.copy_(saved)
    strategy.load_state_dict(ckpt.strategy, own)
    return ckpt.position["epoch"], ckpt.position["step"], json.loads(ckpt.history)


# -- evaluation and summary -------------------------------------------------------
@torch.no_grad()
def evaluate(model, dataset, comm, loss=None, batch_size=256, precision="float32"):
    """Mean test loss, and accuracy (class targets) or MSE and R^2 (real targets), each rank
    scoring its slice of the test set. `loss`: the per-sample loss (default: the task's).

    Accuracy needs a class score per target (output (..., classes) for targets (...)), MSE an
    output per target; where the model's output is something else, only the loss is reported.
    """
    loss = loss or make_loss(None, dataset.task)
    model.eval()
    mine = np.array_split(np.arange(len(dataset.test)), comm.size)[comm.rank]
    shift = 0.0 if dataset.task == "classification" else float(dataset.test.batch([0])[1].double().mean())
    totals = np.zeros(6)  # summed loss; correct or squared error; targets scored; batches unscored; y - shift sums
    for start in range(0, len(mine), batch_size):
        x, y = dataset.test.batch(mine[start:start + batch_size])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model(x)
            totals[0] += loss(out, y).float().sum().item()
        totals[1:] += _scored(out, y, dataset.task, shift)
    loss_sum, correct_or_sse, count, unscored, y_sum, y_squares = comm.allreduce_array(totals.tolist())
    scores = {"test_loss": loss_sum / len(dataset.test)}
    if unscored:
        return scores
    if dataset.task == "classification":
        return {**scores, "test_accuracy": correct_or_sse / count}
    deviation = y_squares - y_sum ** 2 / count  # sum of (y - mean)^2, from sums of y less a near-mean shift
    return {**scores, "test_mse": correct_or_sse / count,
            "test_r2": 1 - correct_or_sse / deviation if deviation > 0 else None}


def _scored(out, y, task, shift):
    """One batch's (correct or squared error, targets, unscored, sum and sum of squares of y - shift)."""
    if task == "classification":
        if out.shape[:-1] != y.shape:
            return 0, 0, 1, 0, 0
        return (out.argmax(dim=-1) == y).sum().item(), y.numel(), 0, 0, 0
    if out.numel() != y.numel():
        return 0, 0, 1, 0, 0
    y64 = y.double()
    centred = y64 - shift
    return (((out.reshape(y.shape).double() - y64) ** 2).sum().item(), y.numel(), 0, centred.sum().item(),
            (centred ** 2).sum().item())


def _summary(cfg, comm, dataset, strategy, history, threads, wall, bytes_before):
    """What every mode's summary says (a collective: the byte count), then the mode's own fields."""
    unit = strategy.unit
    train_time = sum(r[f"{unit}_time_s"] for r in history)
    last_eval = next(r for r in reversed(history) if "test_loss" in r)  # the last epoch is always evaluated
    scores = {k: v for k, v in last_eval.items() if k.startswith(("test_", "client_acc"))}
    return {"summary": True, "mode": cfg.mode, "world_size": comm.size, "dataset": dataset.name,
            "model": cfg.model, "batch_size": cfg.batch_size, "threads": threads,
            "wall_time_s": wall.elapsed(),
            "bytes_communicated": _bytes_so_far(comm, bytes_before),
            "train_loss": history[-1]["train_loss"], **scores, "train_time_s": train_time,
            "samples_per_s": sum(r["samples"] for r in history) / train_time,
            "nonfinite_skipped": sum(r.get("nonfinite_skipped", 0) for r in history),
            **strategy.summary(history, train_time)}


def _score(record):
    if "test_accuracy" in record:
        return f"test_loss {record['test_loss']:.4f}  test_acc {record['test_accuracy']:.4f}"
    if "test_r2" not in record:
        return f"test_loss {record['test_loss']:.4f}"
    r2 = record["test_r2"]
    return f"test_mse {record['test_mse']:.4f}  test_r2 {'n/a' if r2 is None else f'{r2:.4f}'}"


def _epoch_line(record, unit, total):
    clients = (f"  {record['clients_participating']}/{record['clients_sampled']} clients"
               if "clients_sampled" in record else "")
    loss = "n/a" if record["train_loss"] is None else f"{record['train_loss']:.4f}"
    speed = f"  {record['samples_per_s']:,.0f} samples/s" if record.get("samples_per_s") else ""
    return (f"{unit} {record[unit]:>3}/{total}{clients}  train_loss {loss}  {_score(record)}  "
            f"{record[f'{unit}_time_s']:.2f}s{speed}{_privacy(record)}")


def _privacy(record):
    """epsilon at delta (differential privacy), or nothing."""
    if "epsilon" not in record:
        return ""
    clip = f"  clip {record['dp_clip']:.4g}" if record.get("dp_adaptive") else ""
    return f"  epsilon {record['epsilon']:.3f} (delta {record['delta']:g}){clip}"


def _summary_line(s, unit):
    moved = (f"  {s['bytes_up'] + s['bytes_down']:,} model bytes moved," if "bytes_up" in s else "")
    count = s.get("epochs", s.get("rounds"))
    units = f"{count} {unit}" + ("s" if count != 1 else "")
    return (f"done: {s['mode']}, {s['world_size']} rank(s), {units} in {s['train_time_s']:.2f}s  "
            f"{_score(s)}  {s['samples_per_s']:,.0f} samples/s{moved}  {s['bytes_communicated']:,} bytes via MPI"
            f"{_privacy(s)}")
