"""What half-precision reduction saves and costs: bytes, accuracy and speed on digits.

    python scripts/bench_compression.py [--seeds 5] [--models mlp,cnn] [--epochs 20] [--out PREFIX]

Runs the real CLI, `mpirun -n 2 python -m distml train --compression C`, for
C in none, fp16 and bf16 with the same seed side by side (in rotating order),
over --seeds seeds and each model, default settings otherwise (batch 32 per
rank, 1 thread per rank, SGD with momentum, cosine schedule). The accuracy cost
is paired: each seed's float32 test accuracy minus half precision's with that
seed, in points (positive: half precision lost accuracy)
(median and min-max over seeds). Bytes are those handed to MPI, summed over
ranks. Prints one table, writes results/bench_compression.csv (one row per
run) and results/bench_compression.png (test accuracy, one line per seed).
"""
import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from benchlib import ROOT, spread, train_records, write_csv

KINDS = ("none", "fp16", "bf16")


def run_all(args):
    """One summary record per (model, seed, compression)."""
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for model in args.models.split(","):
            for seed in range(args.seeds):
                order = KINDS[seed % 3:] + KINDS[:seed % 3]
                for kind in order:
                    flags = ["--model", model, "--compression", kind, "--seed", seed, "--epochs", args.epochs,
                             "--threads", 1]
                    summary = train_records(2, flags, Path(workdir) / f"{model}-{seed}-{kind}.jsonl")[-1]
                    rows.append({"model": model, "seed": seed, "compression": kind,
                                 "test_accuracy": summary["test_accuracy"],
                                 "bytes_communicated": summary["bytes_communicated"],
                                 "samples_per_s": round(summary["samples_per_s"]),
                                 "wall_time_s": round(summary["wall_time_s"], 3)})
                print(f"{model} seed {seed} done", flush=True)
    return rows


def table(rows):
    """Markdown rows: per model and compression, accuracy, paired cost in points, bytes, speed."""
    lines = ["| model | compression | test accuracy (min to max) | cost vs none, points | bytes via MPI | bytes / none | samples/s |",
             "|---|---|---|---|---|---|---|"]
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        base = {r["seed"]: r for r in mine if r["compression"] == "none"}
        for kind in KINDS:
            runs = [r for r in mine if r["compression"] == kind]
            cost = [100 * (base[r["seed"]]["test_accuracy"] - r["test_accuracy"]) for r in runs]
            sent = statistics.median(r["bytes_communicated"] for r in runs)
            ratio = sent / statistics.median(r["bytes_communicated"] for r in base.values())
            paired = "+0.00" if kind == "none" else spread(cost, "{:+.2f}")
            lines.append(f"| {model} | {kind} | {spread([r['test_accuracy'] for r in runs], '{:.4f}')} | "
                         f"{paired} | {sent / 1e6:,.1f} MB | {ratio:.3f} | "
                         f"{statistics.median(r['samples_per_s'] for r in runs):,.0f} |")
    return "\n".join(lines)


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.6), squeeze=False)
    for ax, model in zip(axes[0], models):
        for seed in sorted({r["seed"] for r in rows}):
            runs = {r["compression"]: r["test_accuracy"] for r in rows if r["model"] == model and r["seed"] == seed}
            ax.plot(range(len(KINDS)), [runs[kind] for kind in KINDS], marker="o", alpha=0.7, label=f"seed {seed}")
        ax.set_xticks(range(len(KINDS)), KINDS)
        ax.set_title(f"{model} on digits, 2 ranks: one line per seed")
        ax.legend(fontsize=7)
        ax.set_ylabel("test accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--out", default=str(ROOT / "results" / "bench_compression"))
    args = parser.parse_args()
    start = time.perf_counter()
    rows = run_all(args)
    print(table(rows))
    write_csv(rows, args.out + ".csv")
    plot(rows, args.out + ".png")
    print(f"# total {time.perf_counter() - start:.0f} s; load avg {os.getloadavg()[0]:.2f}")
    print(f"wrote {args.out}.csv and {args.out}.png")


if __name__ == "__main__":
    main()
