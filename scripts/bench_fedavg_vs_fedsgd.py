"""FedSGD, FedAvg or plain sync SGD: rounds and bytes to 90% test accuracy on IID digits.

    python scripts/bench_fedavg_vs_fedsgd.py [--target 0.9] [--max-rounds 300] [--sync-epochs 30] [--seed 0]

McMahan et al.'s central comparison (2017, Table 2 / Figure 2), on digits
(mlp 128,64), IID split over 20 clients, 10 sampled per round:

- FedSGD: each sampled client takes one full-batch gradient step per round
  (--local-steps 1 --batch-size 0); the server averages, weighted by samples.
  Its learning rate is the best of --fedsgd-lrs (all are printed).
- FedAvg: batch 16, lr 0.05, momentum 0, with 1, 5 and 20 local epochs.
- sync: the real CLI, `mpirun -n 2 python -m distml train` with batch 16 per
  rank, lr 0.05, momentum 0; epochs to target from the per-epoch records.

Federated runs are in-process at world size 1 (their results do not depend on
the rank count). Every round is evaluated; a run stops at the first round that
reaches --target: it is rerun with twice the rounds until it does (a prefix of
a longer run is the shorter run, which is checked) or --max-rounds is spent.
Federated bytes are model bytes down plus up per client per round; sync bytes
are those handed to MPI Allreduce, summed over ranks, to the target epoch
(summary bytes * epoch / epochs run; the per-epoch rate and fixed set-up part
are measured from two run lengths and printed). Prints one table and writes
results/bench_fedavg_vs_fedsgd.csv.
"""
import argparse
import os
import tempfile
import time
from pathlib import Path

from bench_fl_algorithms import to_target  # this directory is on sys.path
from benchlib import train_records, write_csv

CLIENT = {"batch_size": 16, "lr": 0.05, "momentum": 0.0}  # FedAvg and sync alike
RATIOS = ("fedsgd_rounds_ratio", "sync_bytes_ratio")


def sync_run(epochs, seed, workdir):
    """Per-epoch records and summary of `mpirun -n 2 distml train` (sync, batch 16 per rank)."""
    flags = ["--threads", 1, "--batch-size", CLIENT["batch_size"], "--lr", CLIENT["lr"],
             "--momentum", CLIENT["momentum"], "--epochs", epochs, "--seed", seed]
    records = train_records(2, flags, Path(workdir) / f"sync{epochs}.jsonl")
    return records[:-1], records[-1]


def sync_to_target(args):
    """The sync row, and (bytes per epoch, fixed bytes) from two run lengths."""
    with tempfile.TemporaryDirectory() as workdir:
        short = sync_run(args.sync_epochs // 2, args.seed, workdir)[1]["bytes_communicated"]
        epochs, summary = sync_run(args.sync_epochs, args.seed, workdir)
    total = summary["bytes_communicated"]
    per_epoch = (total - short) / (args.sync_epochs - args.sync_epochs // 2)
    fixed = total - per_epoch * args.sync_epochs
    accuracy = [r["test_accuracy"] for r in epochs]
    reached = next((r["epoch"] for r in epochs if r["test_accuracy"] >= args.target), None)
    sent = total * reached / args.sync_epochs if reached else None
    row = {"setting": "sync, 2 ranks", "lr": CLIENT["lr"], "rounds": reached, "bytes": sent,
           "best_accuracy": max(accuracy), "rounds_run": args.sync_epochs}
    return row, per_epoch, fixed


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", type=float, default=0.9)
    ap.add_argument("--max-rounds", type=int, default=300)
    ap.add_argument("--sync-epochs", type=int, default=30)
    ap.add_argument("--fedsgd-lrs", default="0.1,0.3,1,3")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--csv", default="results/bench_fedavg_vs_fedsgd.csv")
    args = ap.parse_args()
    start = time.perf_counter()
    common = {"clients": 20, "clients_per_round": 10, "partition": "iid", "seed": args.seed}

    # -- FedSGD: one full-batch step per client per round, learning rate from a grid --
    grid = []
    for lr in map(float, args.fedsgd_lrs.split(",")):
        settings = {**common, "local_steps": 1, "batch_size": 0, "lr": lr, "momentum": 0.0}
        grid.append({**to_target(settings, args.target, args.max_rounds), "setting": "FedSGD", "lr": lr})
    best = min(grid, key=lambda r: (r["rounds"] is None, r["rounds"] or 0, -r["best_accuracy"]))
    rows = [{**r, "setting": "FedSGD" + (" (tuned)" if r is best else "")} for r in grid]

    # -- FedAvg with 1, 5, 20 local epochs; then sync SGD through the real CLI --
    for epochs in (1, 5, 20):
        settings = {**common, **CLIENT, "local_epochs": epochs}
        rows.append({**to_target(settings, args.target, args.max_rounds), "setting": f"FedAvg E={epochs}",
                     "lr": CLIENT["lr"]})
    sync, per_epoch, fixed = sync_to_target(args)
    rows.append(sync)
    print_table(rows, best, sync, args)
    print(f"# sync bytes, from {args.sync_epochs // 2} and {args.sync_epochs} epoch runs: {per_epoch:,.0f} "
          f"per epoch (gradient Allreduces, metric sums) + {fixed:,.0f} once (initial weight broadcast, "
          f"{fixed / per_epoch:.3f} epoch's worth): linear")
    print(f"# total {time.perf_counter() - start:.0f} s; load avg {os.getloadavg()[0]:.2f}")
    write_csv([{**r, **dict(zip(RATIOS, _ratios(r, best, sync)))} for r in rows], args.csv,
              ["setting", "lr", "rounds", "rounds_run", "bytes", "best_accuracy", *RATIOS])


def _ratios(row, best, sync):
    fedsgd_per_row = best["rounds"] / row["rounds"] if best["rounds"] and row["rounds"] else None
    sync_per_row = sync["bytes"] / row["bytes"] if sync["bytes"] and row["bytes"] else None
    return fedsgd_per_row, sync_per_row


def print_table(rows, best, sync, args):
    print(f"# digits, mlp 128,64, IID, 20 clients, 10 per round, seed {args.seed}; to {args.target:.0%} "
          f"test accuracy (max {args.max_rounds} rounds, sync {args.sync_epochs} epochs)")
    print("| setting | lr | rounds (sync: epochs) | MB to target | best acc | FedSGD rounds / rounds "
          "| sync bytes / bytes |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        fedsgd_per_row, sync_per_row = _ratios(r, best, sync)
        rounds = r["rounds"] if r["rounds"] else f">{r['rounds_run']}"
        mb = f"{r['bytes'] / 1e6:.1f}" if r["bytes"] else "-"
        print(f"| {r['setting']} | {r['lr']:g} | {rounds} | {mb} | {r['best_accuracy']:.3f} | "
              f"{_fmt(fedsgd_per_row)} | {_fmt(sync_per_row)} |")
    print("# MB: 1e6 bytes. Federated: model bytes down + up, 10 clients a round; sync: bytes handed to MPI "
          "Allreduce, summed over ranks")


def _fmt(ratio):
    return f"{ratio:.2f}x" if ratio else "-"


if __name__ == "__main__":
    main()
