"""Sync or async when one worker is slow? Wall time and test accuracy, side by side.

    python scripts/bench_straggler.py [--workers 2] [--slow-factor 3] [--repeats 3]

Runs the real CLI under mpirun: sync on W ranks against async on W+1 ranks
(1 parameter server + W workers), same model, data, epochs and per-worker
batch, with worker 0's compute made --slow-factor times slower
(--slow-rank, a benchmark aid). Async runs three ways of waiting at the
server: MPI's Waitany as is, Waitany with Open MPI told to yield the core
(mpi_yield_when_idle), and a sleeping Test poll (DISTML_PS_SLEEP). Prints
medians over --repeats runs (setups interleaved, so drift hits all alike)
and writes results/bench_straggler.csv.
"""
import argparse
import os
import statistics
import tempfile
from pathlib import Path

from benchlib import train_records, write_csv


def run_once(ranks, flags, workdir, env=None):
    """The summary of one `mpirun -n ranks distml train flags` run."""
    return train_records(ranks, flags, Path(workdir) / "m.jsonl", env)[-1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--slow-factor", type=float, default=3.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--model", default="cnn")
    ap.add_argument("--csv", default="results/bench_straggler.csv")
    args = ap.parse_args()
    common = ["--model", args.model, "--epochs", args.epochs, "--lr", 0.05, "--batch-size", 32,
              "--threads", 1]
    w = args.workers
    setups = [("sync", w, ["--slow-rank", 0], {}),
              ("async", w + 1, ["--mode", "async", "--slow-rank", 1], {}),
              ("async, yield", w + 1, ["--mode", "async", "--slow-rank", 1],
               {"OMPI_MCA_mpi_yield_when_idle": "1"}),
              ("async, poll", w + 1, ["--mode", "async", "--slow-rank", 1], {"DISTML_PS_SLEEP": "0.0002"})]
    runs = {name: [] for name, *_ in setups}
    with tempfile.TemporaryDirectory() as workdir:
        for _ in range(args.repeats):
            for name, ranks, flags, env in setups:
                flags = common + flags + ["--slow-factor", args.slow_factor]
                runs[name].append(run_once(ranks, flags, workdir, env))
    rows = []
    for name, ranks, _, _ in setups:
        median = lambda key: statistics.median(r[key] for r in runs[name])  # noqa: E731
        slow_share = statistics.median(r["worker_samples"][0] / sum(r["worker_samples"])
                                       for r in runs[name]) if name != "sync" else 1 / w
        rows.append({"mode": name, "ranks": ranks, "workers": w, "train_time_s": median("train_time_s"),
                     "test_accuracy": median("test_accuracy"), "slow_worker_share": slow_share})
    print(f"# digits, {args.model}, {args.epochs} epochs, batch 32 per worker, lr 0.05, worker 0 slowed "
          f"{args.slow_factor:g}x; medians of {args.repeats} runs; load avg {os.getloadavg()[0]:.2f}")
    print(f"{'mode':>13} {'ranks':>5} {'train s':>8} {'vs sync':>7} {'test acc':>8} {'slow share':>10}")
    for r in rows:
        print(f"{r['mode']:>13} {r['ranks']:>5} {r['train_time_s']:>8.2f} "
              f"{r['train_time_s'] / rows[0]['train_time_s']:>7.2f} {r['test_accuracy']:>8.4f} "
              f"{r['slow_worker_share']:>10.2f}")
    print("# 'slow share': the slow worker's part of the samples trained on (sync: 1/workers)")
    write_csv(rows, args.csv)


if __name__ == "__main__":
    main()
