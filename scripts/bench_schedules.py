"""Which --lr-schedule should be the default? Final test scores on the bundled data sets at default settings.

    python scripts/bench_schedules.py [--seeds 3]

Runs the real CLI under mpirun (2 ranks; async: 1 server + 2 workers) for
each data set and mode at the default settings but the schedule, with
`constant`, `cosine` and `step`, interleaved over --seeds seeds (the seed
changes the split, the order and the initial weights). Prints the median
final test accuracy (digits) or R^2 (diabetes) and the worst seed, and
writes results/bench_schedules.csv.
"""
import argparse
import statistics
import tempfile
from pathlib import Path

from benchlib import train_records, write_csv

SCHEDULES = ("constant", "cosine", "step")
CASES = [  # (name, ranks, flags)
    ("diabetes, linear, sync, 200 epochs", 2, ["--dataset", "diabetes", "--model", "linear", "--epochs", 200]),
    ("diabetes, mlp, sync", 2, ["--dataset", "diabetes"]),
    ("digits, mlp, sync", 2, []),
    ("digits, cnn, sync, 5 epochs", 2, ["--model", "cnn", "--epochs", 5]),
    ("digits, mlp, async", 3, ["--mode", "async"]),
]


def score(summary):
    return summary.get("test_accuracy", summary.get("test_r2"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--csv", default="results/bench_schedules.csv")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):  # interleaved: drift and load hit every schedule alike
            for name, ranks, flags in CASES:
                for schedule in SCHEDULES:
                    s = train_records(ranks, [*flags, "--seed", seed, "--lr-schedule", schedule, "--threads", 1],
                                      Path(tmp) / "m.jsonl")[-1]
                    rows.append({"case": name, "schedule": schedule, "seed": seed, "score": score(s)})
                    print(f"  {name:38s} {schedule:8s} seed {seed}: {score(s):.4f}", flush=True)
    write_csv(rows, args.csv)
    print(f"\n| case | metric | {' | '.join(SCHEDULES)} |\n|---|---|{'---|' * len(SCHEDULES)}")
    for name, _, flags in CASES:
        cells = []
        for schedule in SCHEDULES:
            scores = [r["score"] for r in rows if r["case"] == name and r["schedule"] == schedule]
            cells.append(f"{statistics.median(scores):.3f} (worst {min(scores):.3f})")
        metric = "R^2" if "diabetes" in name else "accuracy"
        print(f"| {name} | {metric} | {' | '.join(cells)} |")
    print(f"\nmedian over {args.seeds} seeds; wrote {args.csv}")


if __name__ == "__main__":
    main()
