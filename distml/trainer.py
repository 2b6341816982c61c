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
from .checkpoint import save_state_dict
from .config import UsageError
from .data import load_dataset
from .metrics import Reporter, Timer
from .models import build_model
from .strategies import STRATEGIES
from .strategies.base import batch_tensors, loss_sum

__all__ = ["run", "Result", "agree", "default_threads"]


@dataclass
class Result:
    summary: dict
    history: list = field(default_factory=list)
    model: torch.nn.Module = None


def agree(comm, fn):
    """Run `fn` on every rank; if it raised UsageError anywhere, raise it everywhere.

    Keeps a usage error seen by one rank only (a file missing on one host) from
    leaving the others waiting in the next collective.
    """
    error, value = None, None
    try:
        value = fn()
    except UsageError as e:
        error = str(e)
    errors = comm.allgather_object(error)
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if failed:
        rank, message = failed[0]
        same_everywhere = len(failed) == comm.size and len(set(errors)) == 1
        raise UsageError(message if same_everywhere else f"rank {rank}: {message}")
    return value


def default_threads(comm):
    """Cores of this node divided by the ranks on it (at least 1)."""
    return max(1, (os.cpu_count() or 1) // comm.node_size())


def run(cfg, comm=None):
    """Train as `cfg` says on every rank of `comm`; returns the same Result on every rank."""
    comm = comm or _comm.world()
    wall = Timer()
    report = Reporter(enabled=comm.is_root, quiet=cfg.quiet, metrics_path=cfg.metrics)

    # -- set-up: every usage error surfaces here, on all ranks, before training --
    agree(comm, lambda: cfg.validate(writes_outputs=comm.is_root))
    dataset, model = agree(comm, lambda: _load(cfg))
    threads = cfg.threads or default_threads(comm)
    torch.set_num_threads(threads)
    strategy = STRATEGIES[cfg.mode](cfg, dataset, model, comm)
    strategy.setup()
    report.say(f"distml: {cfg.mode} on {comm.size} rank(s), {dataset.name} ({len(dataset.y_train)} train / "
               f"{len(dataset.y_test)} test, {dataset.task}), model {cfg.model} "
               f"({sum(p.numel() for p in model.parameters()):,} parameters), {threads} thread(s) per rank")

    # -- epochs ---------------------------------------------------------------
    history, train_time = [], 0.0
    for epoch in range(cfg.epochs):
        timer = Timer()
        stats = strategy.train_epoch(
            epoch, lambda it, total: report.progress(it, total=total, desc=f"epoch {epoch + 1}/{cfg.epochs}"))
        loss_sum_all, samples_all = comm.allreduce_array([stats.loss_sum, stats.samples])
        epoch_time = timer.elapsed()
        train_time += epoch_time
        record = {"epoch": epoch + 1, "train_loss": loss_sum_all / max(samples_all, 1),
                  **evaluate(model, dataset, comm), "epoch_time_s": epoch_time,
                  "samples_per_s": samples_all / epoch_time}
        history.append(record)
        report.record(**record)
        report.say(_epoch_line(record, cfg.epochs))

    # -- summary and outputs (root only writes) ---------------------------------
    bytes_communicated = comm.allreduce_array([comm.bytes_sent])[0]
    summary = {"summary": True, "mode": cfg.mode, "world_size": comm.size, "dataset": dataset.name,
               "model": cfg.model, "epochs": cfg.epochs, "batch_size": cfg.batch_size,
               "global_batch_size": cfg.batch_size * comm.size, "threads": threads,
               **{k: v for k, v in history[-1].items() if k not in ("epoch", "epoch_time_s", "samples_per_s")},
               "train_time_s": train_time, "wall_time_s": wall.elapsed(),
               "samples_per_s": cfg.epochs * len(dataset.y_train) / train_time,
               "bytes_communicated": int(bytes_communicated)}
    if comm.is_root and cfg.save_model:
        save_state_dict(model, cfg.save_model)
    report.record(**summary)
    report.say(_summary_line(summary))
    return Result(summary, history, model)


def _load(cfg):
    dataset = load_dataset(cfg)
    return dataset, build_model(cfg.model, dataset, cfg.hidden_sizes(), cfg.seed)


@torch.no_grad()
def evaluate(model, dataset, comm, batch_size=1024):
    """Test loss and accuracy (or MSE and R^2), each rank scoring its slice of the test set."""
    model.eval()
    mine = np.array_split(np.arange(len(dataset.y_test)), comm.size)[comm.rank]
    totals = np.zeros(4)  # loss, correct (or squared error), sum y, sum y^2
    for start in range(0, len(mine), batch_size):
        x, y = batch_tensors(dataset.X_test, dataset.y_test, mine[start:start + batch_size])
        out = model(x)
        totals[0] += loss_sum(out, y, dataset.task).item()
        if dataset.task == "classification":
            totals[1] += (out.argmax(dim=1) == y).sum().item()
        else:
            totals[1] += ((out.reshape(y.shape) - y) ** 2).sum().item()
            totals[2] += y.sum().item()
            totals[3] += (y.double() ** 2).sum().item()
    loss, correct_or_sse, sum_y, sum_y2 = comm.allreduce_array(totals.tolist())
    n = len(dataset.y_test)
    if dataset.task == "classification":
        return {"test_loss": loss / n, "test_accuracy": correct_or_sse / n}
    variance = sum_y2 - sum_y ** 2 / n
    return {"test_loss": loss / n, "test_mse": correct_or_sse / n,
            "test_r2": 1 - correct_or_sse / variance if variance > 0 else float("nan")}


def _score(record):
    if "test_accuracy" in record:
        return f"test_loss {record['test_loss']:.4f}  test_acc {record['test_accuracy']:.4f}"
    return f"test_mse {record['test_mse']:.4f}  test_r2 {record['test_r2']:.4f}"


def _epoch_line(record, epochs):
    return (f"epoch {record['epoch']:>3}/{epochs}  train_loss {record['train_loss']:.4f}  {_score(record)}  "
            f"{record['epoch_time_s']:.2f}s  {record['samples_per_s']:,.0f} samples/s")


def _summary_line(s):
    return (f"done: {s['mode']}, {s['world_size']} rank(s), {s['epochs']} epochs in {s['train_time_s']:.2f}s  "
            f"{_score(s)}  {s['samples_per_s']:,.0f} samples/s  {s['bytes_communicated']:,} bytes via MPI")
