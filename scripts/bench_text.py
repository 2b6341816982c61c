"""The character-level GPT on real text: distml's three modes against a plain PyTorch loop, same time.

    python scripts/bench_text.py [--seconds 150] [--target-loss 2.0] [--out results/bench_text]

The data is `--dataset text` (the Python standard library's own sources, 5% of
each file held out), the model distml's gpt (4 layers, 4 heads, 128 wide,
block 64), AdamW (betas 0.9, 0.95, weight decay 0.1 on matrices), lr 3e-3 with
a warm-up of about 100 steps, gradients clipped at 1.0. Runs, one after the
other, each given about --seconds of training (evaluation is off the clock):

- sync at 1 rank (batch 24, 2 threads) and at 2 ranks (batch 12 per rank,
  the same global batch of 24, 1 thread each), evaluated 10 times a run;
- ceiling: scripts/bench_text_ceiling.py, one process with both cores' threads,
  batch 24, given exactly the training time sync at 2 ranks took: the number
  distml has to match;
- federated, 2 ranks, --partition natural (one client per source file), 8
  clients a round, 10 local AdamW steps each (fresh moments each round), FedAvg;
- async, 2 ranks (a parameter server and a worker), a budget of gradients.

Each distml run's step, round or gradient count is set from a short probe of
its speed so that it takes about --seconds. Prints two tables (the ceiling
against sync: tokens/s, validation loss at the end, time to --target-loss;
the three modes: validation loss, time, bytes) and writes
results/bench_text.csv (every evaluation of every run) and .png (validation
loss against training time).
"""
import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import ENV, ROOT, train_records, write_csv

sys.path.insert(0, str(ROOT))
from distml.data.text import load_text  # noqa: E402

BLOCK, BATCH, FRACTION = 64, 24, 0.05
RECIPE = ["--dataset", "text", "--model", "gpt", "--block-size", BLOCK, "--test-fraction", FRACTION,
          "--optimizer", "adamw", "--betas", "0.9,0.95", "--weight-decay", 0.1, "--lr", 3e-3,
          "--clip-norm", 1.0, "--batch-size", BATCH]
RUNS = {  # name: (ranks, flags, what one unit of --max-steps / --rounds is, in samples)
    "sync 1 rank": (1, ["--threads", 2], BATCH),
    "sync 2 ranks": (2, ["--threads", 1, "--batch-size", BATCH // 2], BATCH),  # the same global batch
    "federated 2 ranks": (2, ["--threads", 1, "--mode", "federated", "--partition", "natural",
                               "--clients-per-round", 8, "--local-steps", 10], 8 * 10 * BATCH),
    "async 2 ranks": (2, ["--threads", 1, "--mode", "async"], BATCH),
}


def ceiling(seconds, workdir):
    """The plain loop's rows (elapsed_s, tokens, val_loss, ...) for `seconds` of training."""
    out = Path(workdir) / "ceiling.csv"
    command = [sys.executable, ROOT / "scripts" / "bench_text_ceiling.py", "--seconds", seconds,
               "--threads", 2, "--test-fraction", FRACTION, "--eval-every-s", seconds / 10,
               "--batch-size", BATCH, "--block-size", BLOCK, "--csv", out]
    subprocess.run(list(map(str, command)), check=True, env=ENV, timeout=1200)
    with open(out) as f:
        return [{"run": "ceiling (plain PyTorch, 1 process)", "train_time_s": float(r["elapsed_s"]),
                 "tokens": int(r["tokens"]), "test_loss": float(r["val_loss"]), "bytes_communicated": 0}
                for r in csv.DictReader(f)]


def units_per_second(name, workdir):
    """Steps (rounds, gradients) a second of one run, from a short probe of it."""
    ranks, flags, _ = RUNS[name]
    probe = ["--rounds", 2] if "federated" in name else ["--max-steps", 30]
    summary = train_records(ranks, [*RECIPE, *flags, *probe, "--eval-every", 1000],
                            Path(workdir) / "probe.jsonl")[-1]
    return (2 if "federated" in name else 30) / summary["train_time_s"]


def distml_run(name, args, workdir, warmup_epochs):
    """Every evaluation of one distml run, as rows."""
    ranks, flags, samples_per_unit = RUNS[name]
    units = max(2, int(args.seconds * units_per_second(name, workdir)))
    if "federated" in name:
        budget = ["--rounds", units, "--eval-every", max(1, units // 10)]
    else:
        budget = ["--max-steps", units, "--warmup-epochs", warmup_epochs[name]]
        budget += ["--eval-every-steps", max(1, units // 10)] if name.startswith("sync") else []
    print(f"{name}: {' '.join(map(str, budget))}", flush=True)
    records = train_records(ranks, [*RECIPE, *flags, *budget], Path(workdir) / "run.jsonl")
    rows, elapsed = [], 0.0
    for r in records[:-1]:
        if not r.get("eval"):
            elapsed += r.get("epoch_time_s", r.get("round_time_s", 0.0))
        if "test_loss" in r:
            rows.append({"run": name, "train_time_s": r["train_time_s"] if r.get("eval") else elapsed,
                         "tokens": None, "test_loss": r["test_loss"], "bytes_communicated": r["bytes_communicated"],
                         "units": r.get("step") or r.get("round") or r.get("epoch")})
    summary = records[-1]
    rows[-1]["tokens"] = int(summary["samples_per_s"] * summary["train_time_s"]) * BLOCK
    rows[-1]["train_time_s"] = summary["train_time_s"]
    return rows


def time_to(rows, target):
    """The first training time at which a run's validation loss is at or below `target` (None: never)."""
    return next((r["train_time_s"] for r in rows if r["test_loss"] <= target), None)


def tables(rows, target):
    runs = list(dict.fromkeys(r["run"] for r in rows))
    last = {run: [r for r in rows if r["run"] == run][-1] for run in runs}
    fmt = lambda t: "not reached" if t is None else f"{t:.0f} s"  # noqa: E731
    first = ["| run | training s | tokens/s | validation loss (nats/char) at the end | time to "
             f"{target} |", "|---|---|---|---|---|"]
    for run in runs:
        if run.startswith(("ceiling", "sync")):
            r = last[run]
            first.append(f"| {run} | {r['train_time_s']:.0f} | {r['tokens'] / r['train_time_s']:,.0f} | "
                         f"{r['test_loss']:.3f} | {fmt(time_to([x for x in rows if x['run'] == run], target))} |")
    second = ["| mode | training s | validation loss at the end | bytes via MPI |", "|---|---|---|---|"]
    for run in runs:
        if not run.startswith("ceiling"):
            r = last[run]
            second.append(f"| {run} | {r['train_time_s']:.0f} | {r['test_loss']:.3f} | "
                          f"{r['bytes_communicated'] / 1e9:.2f} GB |")
    return "\n".join(first) + "\n\n" + "\n".join(second)


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for run in dict.fromkeys(r["run"] for r in rows):
        mine = [r for r in rows if r["run"] == run]
        ax.plot([r["train_time_s"] for r in mine], [r["test_loss"] for r in mine], marker="o", label=run)
    ax.set_xlabel("training time, s (evaluation excluded)")
    ax.set_ylabel("validation loss, nats per character")
    ax.set_title("char-level GPT on the Python stdlib's sources, 2 cores")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=150)
    parser.add_argument("--target-loss", type=float, default=2.0)
    parser.add_argument("--runs", default=",".join(RUNS), help="which distml runs (names as in the tables)")
    parser.add_argument("--out", default=str(ROOT / "results" / "bench_text"))
    args = parser.parse_args()
    start = time.perf_counter()
    train, _ = load_text("", block_size=BLOCK, test_fraction=FRACTION)
    warmup = {name: round(100 / (len(train) / samples), 4) for name, (_, _, samples) in RUNS.items()}
    with tempfile.TemporaryDirectory() as workdir:
        rows = []
        for name in args.runs.split(","):
            rows += distml_run(name, args, workdir, warmup)
            if name == "sync 2 ranks":  # the ceiling gets exactly the time sync at 2 ranks trained for
                rows = ceiling(rows[-1]["train_time_s"], workdir) + rows
    print(tables(rows, args.target_loss))
    write_csv(rows, args.out + ".csv", fieldnames=["run", "train_time_s", "tokens", "test_loss",
                                                   "bytes_communicated", "units"])
    plot(rows, args.out + ".png")
    print(f"# total {time.perf_counter() - start:.0f} s; load avg {os.getloadavg()[0]:.2f}")
    print(f"wrote {args.out}.csv and {args.out}.png")


if __name__ == "__main__":
    main()
