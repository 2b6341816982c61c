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
results/bench_precision.csv (one row per run); then times one training step
of the default gpt in each precision (see gpt_steps).
"""
import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from benchlib import ROOT, spread, train_records, write_csv

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


def gpt_steps(repeats=3, steps=8, warm=2):
    """Median seconds of one training step of the default gpt (batch 24 x 64 tokens, 1 thread, AdamW)
    per precision, in this process, the precisions interleaved (`repeats` rounds of `steps`, the first
    `warm` of each not counted)."""
    import sys
    import torch
    sys.path.insert(0, str(ROOT))
    from distml.gpt import gpt
    from distml.losses import cross_entropy
    from distml.strategies.base import summed_loss
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = gpt(166, 64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randint(0, 166, (24, 64)), torch.randint(0, 166, (24, 64))
    times = {kind: [] for kind in KINDS}
    for repeat in range(repeats):
        for kind in (KINDS if repeat % 2 == 0 else KINDS[::-1]):
            for step in range(steps):
                began = time.perf_counter()
                loss = summed_loss(model, cross_entropy, x, y, kind)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                if step >= warm:
                    times[kind].append(time.perf_counter() - began)
    return {kind: statistics.median(t) for kind, t in times.items()}


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
    step = gpt_steps()
    print(f"gpt step (batch 24 x 64, 1 thread): float32 {step['float32'] * 1e3:.0f} ms, bf16 "
          f"{step['bf16'] * 1e3:.0f} ms: bf16 takes {step['bf16'] / step['float32']:.1f} x as long")
    print(f"# total {time.perf_counter() - start:.0f} s; load avg {os.getloadavg()[0]:.2f}")
    print(f"wrote {args.out}.csv")


if __name__ == "__main__":
    main()
