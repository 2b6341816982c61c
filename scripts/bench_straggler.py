"""Sync or async when one worker is slow? Wall time and test accuracy, side by side.

    python scripts/bench_straggler.py [--workers 2] [--slow-factor 3] [--repeats 3]

Runs the real CLI under mpirun: sync on W ranks against async on W+1 ranks
(1 parameter server + W workers), same model, data, epochs and per-worker
batch, with worker 0's compute made --slow-factor times slower
(--slow-rank, a benchmark aid). Prints medians over --repeats runs and writes
results/bench_straggler.csv.
"""
import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
       "PRTE_MCA_rmaps_default_mapping_policy": ":oversubscribe", "PYTHONPATH": str(ROOT)}


def run_once(ranks, flags, workdir):
    """The summary of one `mpirun -n ranks distml train flags` run."""
    metrics = Path(workdir) / "m.jsonl"
    mpirun = Path(sys.executable).parent / "mpirun"
    command = [str(mpirun), "-n", str(ranks), sys.executable, "-m", "distml", "train", "--quiet",
               "--metrics", str(metrics), *map(str, flags)]
    subprocess.run(command, check=True, env=ENV, timeout=600, capture_output=True)
    return json.loads(metrics.read_text().splitlines()[-1])


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
    setups = {"sync": (args.workers, ["--slow-rank", 0]),
              "async": (args.workers + 1, ["--mode", "async", "--slow-rank", 1])}
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for name, (ranks, flags) in setups.items():
            runs = [run_once(ranks, common + flags + ["--slow-factor", args.slow_factor], workdir)
                    for _ in range(args.repeats)]
            rows.append({"mode": name, "ranks": ranks, "workers": args.workers,
                         "train_time_s": statistics.median(r["train_time_s"] for r in runs),
                         "test_accuracy": statistics.median(r["test_accuracy"] for r in runs)})
    print(f"# digits, {args.model}, {args.epochs} epochs, batch 32 per worker, lr 0.05, worker 0 slowed "
          f"{args.slow_factor:g}x; medians of {args.repeats} runs; load avg {os.getloadavg()[0]:.2f}")
    print(f"{'mode':>6} {'ranks':>5} {'train s':>8} {'test acc':>8}")
    for r in rows:
        print(f"{r['mode']:>6} {r['ranks']:>5} {r['train_time_s']:>8.2f} {r['test_accuracy']:>8.4f}")
    print(f"# async / sync time: {rows[1]['train_time_s'] / rows[0]['train_time_s']:.2f}; "
          f"accuracy difference {100 * (rows[1]['test_accuracy'] - rows[0]['test_accuracy']):+.1f} points")
    os.makedirs(os.path.dirname(args.csv) or ".", exist_ok=True)
    with open(args.csv, "w", newline="") as f:
        out = csv.DictWriter(f, fieldnames=list(rows[0]))
        out.writeheader()
        out.writerows(rows)


if __name__ == "__main__":
    main()
