"""The training run, top to bottom: set-up, epochs, summary.

    mpirun -n 2 distml train                       # digits, mlp, 2 ranks
    python -m distml train --dataset diabetes --model linear

`run(cfg)` is a pure function of the config and the world size; where
mathematics allows (sync mode), of the config alone.
"""
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from . import comm as _comm
from .agreement import agree, check_same, fingerprint
from .api import broadcast_buffers
from .checkpoint import save_state_dict
from .data import load_dataset
from .metrics import Reporter, Timer
from .models import build_model
from .strategies import STRATEGIES
from .strategies.base import batch_tensors, loss_sum

__all__ = ["run", "Result", "default_threads"]


@dataclass
class Result:
    summary: dict
    history: list = field(default_factory=list)
    model: torch.nn.Module = None


def default_threads(comm):
    """SLURM_CPUS_PER_TASK where SLURM set it, else the cores of this node divided by the ranks
    on it; within this rank's CPU set (>= 1).

    A collective (it counts the ranks on the node): call it on every rank.
    """
    from .cluster import cpus_per_task
    on_node = comm.node_size()  # called on every rank, also where SLURM's answer makes it moot
    per_rank = cpus_per_task() or (os.cpu_count() or 1) // on_node
    affinity = getattr(os, "sched_getaffinity", None)  # Linux only
    return max(1, min(per_rank, len(affinity(0)) if affinity else per_rank))


def run(cfg, comm=None):
    """Train as `cfg` says on every rank of `comm`; returns the same Result on every rank."""
    comm = comm or _comm.world()
    wall = Timer()
    report = Reporter(enabled=comm.is_root, quiet=cfg.quiet, metrics_path=cfg.metrics)

    # -- set-up: every usage error surfaces here, on all ranks, before training --
    agree(comm, lambda: cfg.validate(writes_outputs=comm.is_root).validate_world(comm.size))
    dataset, model = agree(comm, lambda: _load(cfg, comm.size))
    check_same(comm, "settings, data or model", fingerprint(cfg, dataset, model))
    default = default_threads(comm)  # a collective: every rank calls it
    threads = cfg.threads or default
    torch.set_num_threads(threads)
    strategy = STRATEGIES[cfg.mode](cfg, dataset, model, comm)
    strategy.setup()
    report.say(f"distml: {cfg.mode} on {comm.size} rank(s), {dataset.name} ({len(dataset.y_train)} train / "
               f"{len(dataset.y_test)} test, {dataset.task}), model {cfg.model} "
               f"({sum(p.numel() for p in model.parameters()):,} parameters), {threads} thread(s) per rank")

    # -- epochs or rounds ------------------------------------------------------
    if cfg.mode == "federated":
        history = _train_rounds(strategy, model, dataset, comm, report, cfg)
    elif hasattr(strategy, "run"):  # async: every worker runs all its epochs at its own pace
        history = [_train_whole(strategy, model, dataset, comm, report, cfg)]
        report.say(_epoch_line(history[0], cfg.epochs))
    else:
        history = _train_epochs(strategy, model, dataset, comm, report, cfg)

    # -- summary and outputs (root only writes) ---------------------------------
    if cfg.mode == "federated":
        summary = _rounds_summary(cfg, comm, dataset, history, threads, wall)
    else:
        summary = _summary(cfg, comm, dataset, history, threads, wall)
    summary.update(strategy.extra_metrics(summary["train_time_s"]))
    if comm.is_root and cfg.save_model:
        save_state_dict(model, cfg.save_model)
    report.record(**summary)
    report.say(_summary_line(summary))
    return Result(summary, history, model)


def _train_epochs(strategy, model, dataset, comm, report, cfg):
    """Ranks move through the epochs together; evaluate after each."""
    history = []
    for epoch in range(cfg.epochs):
        timer = Timer()
        stats = strategy.train_epoch(
            epoch, lambda it, total: report.progress(it, total=total, desc=f"epoch {epoch + 1}/{cfg.epochs}"))
        # BatchNorm statistics and the like: evaluate and save rank 0's
        record = _record(epoch + 1, stats, timer, model, dataset, comm,
                         share_model=lambda: broadcast_buffers(model, comm=comm))
        history.append(record)
        report.record(**record)
        report.say(_epoch_line(record, cfg.epochs))
    return history


def _train_whole(strategy, model, dataset, comm, report, cfg):
    """The whole training in one go; evaluate the model assembled from the servers."""
    timer = Timer()
    stats = strategy.run(lambda it, total: report.progress(it, total=total, desc="training"))
    record = _record(cfg.epochs, stats, timer, model, dataset, comm, share_model=strategy.finish)
    report.record(**record)
    return record


def _train_rounds(strategy, model, dataset, comm, report, cfg):
    """Federated rounds; the global model is evaluated every --eval-every rounds and after the last."""
    history = []
    for round_ in report.progress(range(cfg.rounds), total=cfg.rounds, desc="rounds"):
        timer = Timer()
        record = {"round": round_ + 1, **strategy.train_round(round_)}
        record["round_time_s"] = timer.elapsed()
        if (round_ + 1) % cfg.eval_every == 0 or round_ + 1 == cfg.rounds:
            strategy.load_global()
            record.update(evaluate(model, dataset, comm))
            record.update(strategy.client_scores())
            report.say(_round_line(record, cfg.rounds))
        history.append(record)
        report.record(**record)
    strategy.load_global()  # what is saved is the global model
    return history


def _record(epoch, stats, timer, model, dataset, comm, *, share_model):
    """Totals over ranks, the time since `timer`, then the test scores of the shared model."""
    loss_sum_all, samples_all = comm.allreduce_array([stats.loss_sum, stats.samples])
    elapsed = timer.elapsed()
    share_model()  # every rank must evaluate the same model
    return {"epoch": epoch, "train_loss": loss_sum_all / max(samples_all, 1),
            **evaluate(model, dataset, comm), "epoch_time_s": elapsed,
            "samples_per_s": samples_all / elapsed}


def _load(cfg, size):
    dataset = load_dataset(cfg)
    cfg.validate_data(dataset, size)
    return dataset, build_model(cfg.model, dataset, cfg.hidden_sizes(), cfg.seed)


def _run_facts(cfg, comm, dataset, threads, wall):
    """What every mode's summary says about the run itself (a collective: the byte count)."""
    return {"summary": True, "mode": cfg.mode, "world_size": comm.size, "dataset": dataset.name,
            "model": cfg.model, "batch_size": cfg.batch_size, "threads": threads,
            "wall_time_s": wall.elapsed(),
            "bytes_communicated": int(comm.allreduce_array([comm.bytes_sent])[0])}


def _summary(cfg, comm, dataset, history, threads, wall):
    train_time = sum(r["epoch_time_s"] for r in history)
    last = {k: v for k, v in history[-1].items() if k not in ("epoch", "epoch_time_s", "samples_per_s")}
    return {**_run_facts(cfg, comm, dataset, threads, wall), "epochs": cfg.epochs,
            "global_batch_size": cfg.batch_size * comm.size, **last, "train_time_s": train_time,
            "samples_per_s": cfg.epochs * len(dataset.y_train) / train_time}


def _rounds_summary(cfg, comm, dataset, history, threads, wall):
    """The sync-style summary, plus rounds, bytes and the round that reached --target-accuracy."""
    train_time = sum(r["round_time_s"] for r in history)
    last_eval = history[-1]  # the last round is always evaluated
    scores = {k: last_eval[k] for k in last_eval if k.startswith(("test_", "client_acc"))}
    reached, sent = None, 0
    for r in history:
        sent += r["bytes_up"] + r["bytes_down"]
        if reached is None and cfg.target_accuracy is not None \
                and r.get("test_accuracy", -1) >= cfg.target_accuracy:
            reached = {"rounds_to_target": r["round"], "bytes_to_target": sent}
    return {**_run_facts(cfg, comm, dataset, threads, wall), "rounds": len(history),
            "train_loss": history[-1]["train_loss"], **scores, "train_time_s": train_time,
            "round_time_s": train_time / len(history),
            "samples_per_s": sum(r["samples"] for r in history) / train_time,
            "bytes_up": sum(r["bytes_up"] for r in history),
            "bytes_down": sum(r["bytes_down"] for r in history),
            "rounds_to_target": None, "bytes_to_target": None, **(reached or {})}


@torch.no_grad()
def evaluate(model, dataset, comm, batch_size=1024):
    """Test loss and accuracy (or MSE and R^2), each rank scoring its slice of the test set."""
    model.eval()
    mine = np.array_split(np.arange(len(dataset.y_test)), comm.size)[comm.rank]
    y_mean = float(np.mean(dataset.y_test, dtype=np.float64))  # every rank holds the whole test set
    totals = np.zeros(3)  # summed loss; correct answers or squared error; squared deviation of y
    for start in range(0, len(mine), batch_size):
        x, y = batch_tensors(dataset.X_test, dataset.y_test, mine[start:start + batch_size])
        out = model(x)
        totals[0] += loss_sum(out, y, dataset.task).item()
        if dataset.task == "classification":
            totals[1] += (out.argmax(dim=1) == y).sum().item()
        else:
            totals[1] += ((out.reshape(y.shape).double() - y.double()) ** 2).sum().item()
            totals[2] += ((y.double() - y_mean) ** 2).sum().item()
    loss, correct_or_sse, y_deviation = comm.allreduce_array(totals.tolist())
    n = len(dataset.y_test)
    if dataset.task == "classification":
        return {"test_loss": loss / n, "test_accuracy": correct_or_sse / n}
    return {"test_loss": loss / n, "test_mse": correct_or_sse / n,
            "test_r2": 1 - correct_or_sse / y_deviation if y_deviation > 0 else None}


def _score(record):
    if "test_accuracy" in record:
        return f"test_loss {record['test_loss']:.4f}  test_acc {record['test_accuracy']:.4f}"
    r2 = record["test_r2"]
    return f"test_mse {record['test_mse']:.4f}  test_r2 {'n/a' if r2 is None else f'{r2:.4f}'}"


def _epoch_line(record, epochs):
    return (f"epoch {record['epoch']:>3}/{epochs}  train_loss {record['train_loss']:.4f}  {_score(record)}  "
            f"{record['epoch_time_s']:.2f}s  {record['samples_per_s']:,.0f} samples/s")


def _round_line(record, rounds):
    clients = f"{record['clients_participating']}/{record['clients_sampled']} clients"
    loss = "n/a" if record["train_loss"] is None else f"{record['train_loss']:.4f}"
    return (f"round {record['round']:>4}/{rounds}  {clients}  train_loss {loss}  "
            f"{_score(record)}  {record['round_time_s'] * 1000:.1f} ms")


def _summary_line(s):
    if s["mode"] == "federated":
        return (f"done: federated, {s['world_size']} rank(s), {s['rounds']} rounds in {s['train_time_s']:.2f}s  "
                f"{_score(s)}  {s['bytes_up'] + s['bytes_down']:,} model bytes moved, "
                f"{s['bytes_communicated']:,} bytes via MPI")
    return (f"done: {s['mode']}, {s['world_size']} rank(s), {s['epochs']} epochs in {s['train_time_s']:.2f}s  "
            f"{_score(s)}  {s['samples_per_s']:,.0f} samples/s  {s['bytes_communicated']:,} bytes via MPI")
