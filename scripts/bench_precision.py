"""What --precision bf16 costs and gains on this CPU: digits accuracy and speed against float32.

    python scripts/bench_precision.py [--seeds 3] [--models cnn] [--epochs 20] [--ranks 2] [--out PREFIX]

Runs the real CLI, `mpirun -n RANKS python -m distml train --precision P`, for P
in float32 and bf16 with the same seed side by side (alternating which goes
first), over --seeds seeds and each model, default settings otherwise (batch 32
per rank, 1 thread per rank, SGD with momentum, cosine schedule). bf16 is CPU
autocast of forward and loss; weights, gradients, reduction and optimizer stay
float32. The accuracy cost is paired per seed: float32's test accuracy minus
bf16's, in points (positive: bf16 lost accuracy); the speed ratio is paired
too: bf16's training samples/s over float32's with the same seed (below 1:
bf16 is slower). Median and min-max over seeds. Prints one table and writes
results/bench_precision.csv (one row per run).
"""
import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from benchlib import ROOT, train_records, write_csv

KINDS = ("float32", "bf16")


def run_all(args):
    """One summary record per (model, seed, precision)."""
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for model in args.models.split(","):
            for seed in range(args.seeds):
                for kind in (KINDS if seed % 2 == 0 else KINDS[::-1]):
                    flags = ["--model", model, "--precision", kind, "--seed", seed, "--epochs", args.epochs,
                             "--threads", 1]
                    summary = train_records(args.ranks, flags, Path(workdir) / f"{model}-{seed}-{kind}.jsonl")[-1]
                    rows.append({"model": model, "seed": seed, "precision": kind,
                                 "test_accuracy": summary["test_accuracy"],
                                 "samples_per_s": round(summary["samples_per_s"], 1),
                                 "train_time_s": round(summary["train_time_s"], 3)})
                print(f"{model} seed {seed} done", flush=True)
    return rows


def spread(values, fmt):
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))} to {fmt.format(max(values))})"


def table(rows):
    """Markdown rows per model and precision: accuracy, paired cost in points, speed, paired speed ratio."""
    lines = ["| model | precision | test accuracy, median (min to max) | cost vs float32, points | samples/s | "
             "speed / float32 (paired) |", "|---|---|---|---|---|---|"]
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        base = {r["seed"]: r for r in mine if r["precision"] == "float32"}
        for kind in KINDS:
            runs = [r for r in mine if r["precision"] == kind]
            cost = [100 * (base[r["seed"]]["test_accuracy"] - r["test_accuracy"]) for r in runs]
            speed = [r["samples_per_s"] / base[r["seed"]]["samples_per_s"] for r in runs]
            lines.append(f"| {model} | {kind} | {spread([r['test_accuracy'] for r in runs], '{:.4f}')} | "
                         f"{'+0.00' if kind == 'float32' else spread(cost, '{:+.2f}')} | "
                         f"{statistics.median(r['samples_per_s'] for r in runs):,.0f} | "
                         f"{'1.00' if kind == 'float32' else spread(speed, '{:.2f}')} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--models", default="cnn")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "results" / "bench_precision"))
    args = parser.parse_args()
    start = time.perf_counter()
    rows = run_all(args)
    print(table(rows))
    write_csv(rows, args.out + ".csv")
    print(f"# total {time.perf_counter() - start:.0f} s; load avg {os.getloadavg()[0]:.2f}")
    print(f"wrote {args.out}.csv")


if __name__ == "__main__":
    main()
