"""What does privacy cost? Test accuracy against epsilon, and secure aggregation's time and bytes.

    python scripts/bench_privacy.py [--seeds 3] [--epsilons inf,8,4,2,1] [--repeats 3] [--quick] [--out results/]
                                    [--text] [--only digits|text]

Runs the real CLI, `mpirun -n 2 python -m distml train ...`, on digits (Part C: on text).

Part A, privacy-utility: the median test accuracy over --seeds seeds for each
epsilon target (`--dp-epsilon E` at --dp-delta 1e-5, which calibrates the noise
so that the whole run ends at or just under E; inf: the same run without the
DP flags), and the epsilon each run actually reached (from its summary):

  DP-SGD     --batch-size 64 (Poisson batches of expected size 128) --epochs 30
             --lr 0.5 --momentum 0 (cosine schedule) --dp-clip 1.0 --threads 1,
             MLP 64-128-64-10 (17,226 parameters).
  DP-FedAvg  --mode federated --clients 700 (about 2 samples each) --clients-per-round
             100 (q = 1/7) --local-steps 1 --batch-size 0 --lr 0.5 --momentum 0
             --server-opt avg --rounds 150 --dp-clip 0.5 --hidden 32 (2,410 parameters).

How the settings were chosen (seed 0, one run each, eps 1 the deciding case):
the brief's DP-SGD start, --epochs 60 --lr 0.5 --momentum 0.9, diverges under
noise (eps 1: train loss ~2,000, test accuracy 0.62; even without DP only
0.86), so momentum is off; 30 epochs beat 60 at eps 1 (0.86 vs 0.73: less
noise each step) and 15 (0.83). With one learning rate for all epsilons
DP-SGD's curve is flat from eps 8 to 1 (0.86 to 0.89): clipping, not noise,
holds it there (--dp-noise 0: 0.84; a plain PyTorch per-sample loop, clip 1,
no noise: 0.85), and a little noise even helps; lr 1 or 2 reach 0.93-0.94 at
eps 8 but diverge at eps 1 (0.71, 0.63), so lr 0.5 is the safe choice for
eps 1 at the price of eps 8. DP-FedAvg: the median update norm is 0.3 to 2
over a run at lr 0.5 (measured with --dp-adaptive-clip 0.5 --dp-noise 0); at
clip 1 the 64-128-64-10 MLP drowns in the noise at eps 1 (0.58), one hidden
layer of 32 does better (0.76: the noise's norm grows with the root of the
parameter count, the clipped signal does not), and clip 0.5 better still
(0.88; clip 0.25 or lr 1: the same); 100 rounds instead of 150: 0.77 at clip
1; --server-opt avgm at server lr 1 diverges (eps 1: 0.25), at server lr 0.1
it is no better than avg (0.77 at clip 1).
Part B, the cost of secure aggregation: digits, --mode federated --clients
1400 (1 or 2 samples each) --clients-per-round M --local-steps 1 --batch-size 0
--rounds 4 --hidden 16 (1,210 parameters), for M = 10, 100 and 1,000, plain
FedAvg against --secure-aggregation (k neighbours: the default,
distml.secagg.default_neighbors(M, 0)), in alternating order over --repeats
repeats. The median round time is over the records after the first round;
bytes per round are the differences of the cumulative bytes_communicated (all
ranks' payload handed to MPI) between consecutive rounds without evaluation.

Part C, the text model, only with --text (--only text: Part C alone,
--only digits: Parts A and B alone): DP-SGD on the character-level GPT,
--dataset text (the standard library's .py files, 20% of each file held out:
113,655 training blocks) --model gpt --layers 2 --heads 2 --embed 64
--block-size 32 (about 113,000 parameters) --optimizer adamw --betas 0.9,0.95
--weight-decay 0.1 --lr 3e-3 (cosine) --batch-size 32 --threads 1
--max-steps 1700 (just under one epoch), seed 0 only, at each of
--text-epsilons (inf,8,2,1) with --dp-clip 1.0; it reports the final test loss
(nats per character), the epsilon reached and the training samples/s. Here
q = 64 / 113,655, so an epsilon target costs little noise (z 0.37 at eps 8,
0.60 at eps 1). The clip does not matter at these settings: at eps 1, 250
steps, clips 0.1, 0.3 and 1.0 gave the same train loss to 1e-7 (every
sample's gradient there was longer than 1, so each one is scaled to norm C,
the noise scales with C too, and AdamW's update is invariant to that scale).
The gap to no DP is the noise's: --dp-clip 1 --dp-noise 0 reached test loss
1.574 against 1.590 without DP and 2.28 to 2.39 with noise. Per-sample
gradients of attention go through torch's vmap fallback, so DP runs train at
a fraction of the no-DP rate; Part C takes about 10 minutes on 2 cores.

Prints two tables and writes privacy_utility.csv (one row per run),
secagg_cost.csv (one row per run) and privacy_utility.png (accuracy against
epsilon, one line per mechanism) under --out; Part C adds a third table and
privacy_text.csv. --quick: a smoke run of about a minute (1 seed, eps inf and
1, short runs, M = 10 and 100; Part C: 20 steps).
"""
import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchlib import ROOT, spread, train_records, write_csv

sys.path.insert(0, str(ROOT))

MECHANISMS = {  # Part A: the flags of each mechanism's run, without the DP ones
    "DP-SGD": ["--dataset", "digits", "--model", "mlp", "--batch-size", 64, "--lr", 0.5, "--momentum", 0,
               "--threads", 1],
    "DP-FedAvg": ["--dataset", "digits", "--model", "mlp", "--mode", "federated", "--clients", 700,
                  "--clients-per-round", 100, "--local-steps", 1, "--batch-size", 0, "--lr", 0.5, "--momentum", 0,
                  "--server-opt", "avg", "--hidden", 32, "--threads", 1],
}
CLIP = {"DP-SGD": 1.0, "DP-FedAvg": 0.5}  # --dp-clip: a sample's gradient, a client's update
DELTA = 1e-5
SECAGG_HIDDEN = 16
TEXT_FLAGS = ["--dataset", "text", "--model", "gpt", "--layers", 2, "--heads", 2, "--embed", 64, "--block-size", 32,
              "--optimizer", "adamw", "--betas", "0.9,0.95", "--weight-decay", 0.1, "--lr", 3e-3,
              "--batch-size", 32, "--threads", 1, "--seed", 0]  # Part C, without --max-steps and the DP ones
TEXT_STEPS = 1700  # Part C: optimizer steps of each run (global batch 64: just under one epoch)
TEXT_CLIP = 1.0  # Part C: --dp-clip, each sample's gradient


def length_flags(mechanism, args):
    """How long each mechanism trains: epochs (DP-SGD) or rounds (DP-FedAvg), evaluated once at the end."""
    if mechanism == "DP-SGD":
        return ["--epochs", args.epochs, "--eval-every", args.epochs]
    return ["--rounds", args.rounds, "--eval-every", args.rounds]


def dp_flags(mechanism, epsilon):
    return [] if math.isinf(epsilon) else ["--dp-clip", CLIP[mechanism], "--dp-epsilon", epsilon, "--dp-delta", DELTA]


def utility_runs(args, workdir):
    """Part A: one row per (seed, mechanism, epsilon); epsilons in rotating order per seed."""
    rows = []
    for seed in range(args.seeds):
        for mechanism, flags in MECHANISMS.items():
            order = args.epsilons[seed % len(args.epsilons):] + args.epsilons[:seed % len(args.epsilons)]
            for epsilon in order:
                command = [*flags, *length_flags(mechanism, args), "--seed", seed, *dp_flags(mechanism, epsilon)]
                s = train_records(2, command, Path(workdir) / "a.jsonl")[-1]
                reached = s.get("epsilon")
                rows.append({"mechanism": mechanism, "epsilon_target": epsilon, "seed": seed,
                             "test_accuracy": s["test_accuracy"], "train_loss": s["train_loss"],
                             "epsilon_reached": math.inf if reached is None else reached,
                             "noise_multiplier": s.get("noise_multiplier") or 0.0,
                             "wall_time_s": round(s["wall_time_s"], 2)})
            print(f"part A: seed {seed} {mechanism} done", flush=True)
    return rows


def secagg_stats(records):
    """(median round time after the first round, median bytes via MPI per round without evaluation)."""
    rounds = [r for r in records if "round" in r]
    times = [r["round_time_s"] for r in rounds[1:]]
    sent = [b["bytes_communicated"] - a["bytes_communicated"] for a, b in zip(rounds, rounds[1:])
            if "test_accuracy" not in b]
    return statistics.median(times), statistics.median(sent)


def secagg_runs(args, workdir):
    """Part B: one row per (clients per round, repeat, plain or secure), alternating which goes first."""
    from distml.secagg import default_neighbors
    rows = []
    for m in args.per_round:
        for repeat in range(args.repeats):
            for secure in ((False, True) if repeat % 2 == 0 else (True, False)):
                flags = ["--dataset", "digits", "--model", "mlp", "--mode", "federated", "--clients", args.clients,
                         "--clients-per-round", m, "--local-steps", 1, "--batch-size", 0, "--rounds",
                         args.secagg_rounds, "--eval-every", args.secagg_rounds, "--hidden", SECAGG_HIDDEN,
                         "--threads", 1, "--seed", repeat, *(["--secure-aggregation"] if secure else [])]
                records = train_records(2, flags, Path(workdir) / "b.jsonl")
                seconds, sent = secagg_stats(records)
                rows.append({"clients_per_round": m, "neighbors": default_neighbors(m, 0.0) if secure else 0,
                             "aggregation": "secure" if secure else "plain", "repeat": repeat,
                             "round_time_s": seconds, "bytes_per_round": sent,
                             "wall_time_s": round(records[-1]["wall_time_s"], 2)})
        print(f"part B: {m} clients per round done", flush=True)
    return rows


def text_runs(args, workdir):
    """Part C: one row per epsilon target, DP-SGD on the character-level GPT, one seed."""
    rows = []
    for epsilon in args.text_epsilons:
        dp = [] if math.isinf(epsilon) else ["--dp-clip", args.text_clip, "--dp-epsilon", epsilon, "--dp-delta", DELTA]
        s = train_records(2, [*TEXT_FLAGS, "--max-steps", args.text_steps, *dp], Path(workdir) / "c.jsonl")[-1]
        reached = s.get("epsilon")
        rows.append({"epsilon_target": epsilon, "epsilon_reached": math.inf if reached is None else reached,
                     "noise_multiplier": s.get("noise_multiplier") or 0.0, "sample_rate": s.get("dp_sample_rate"),
                     "steps": s["steps"], "test_loss": s["test_loss"], "test_accuracy": s["test_accuracy"],
                     "train_loss": s["train_loss"], "samples_per_s": round(s["samples_per_s"], 1),
                     "wall_time_s": round(s["wall_time_s"], 2)})
        print(f"part C: epsilon {epsilon:g} done", flush=True)
    return rows


def text_table(rows):
    lines = ["| epsilon target | epsilon reached | noise multiplier | test loss (nats/char) | test accuracy (per char) "
             "| train loss | samples/s | wall s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        privacy = ("no DP | – | –" if math.isinf(r["epsilon_target"]) else
                   f"{r['epsilon_target']:g} | {r['epsilon_reached']:.4f} | {r['noise_multiplier']:.3f}")
        lines.append(f"| {privacy} | {r['test_loss']:.3f} | {r['test_accuracy']:.3f} | {r['train_loss']:.3f} | "
                     f"{r['samples_per_s']:,.0f} | {r['wall_time_s']:.0f} |")
    return "\n".join(lines)


def utility_table(rows):
    lines = ["| mechanism | epsilon target | epsilon reached | noise multiplier | test accuracy, median (min to max) "
             "| train loss, median |", "|---|---|---|---|---|---|"]
    for mechanism in MECHANISMS:
        for epsilon in sorted({r["epsilon_target"] for r in rows}, reverse=True):
            runs = [r for r in rows if r["mechanism"] == mechanism and r["epsilon_target"] == epsilon]
            if runs:
                reached = statistics.median(r["epsilon_reached"] for r in runs)
                lines.append(f"| {mechanism} | {epsilon:g} | {reached:.4f} | "
                             f"{statistics.median(r['noise_multiplier'] for r in runs):.3f} | "
                             f"{spread([r['test_accuracy'] for r in runs], '{:.4f}')} | "
                             f"{statistics.median(r['train_loss'] for r in runs):.3g} |")
    return "\n".join(lines)


def secagg_table(rows):
    lines = ["| clients per round | k neighbours | plain ms/round | secure ms/round | time secure/plain | "
             "plain bytes/round | secure bytes/round | bytes secure/plain |", "|---|---|---|---|---|---|---|---|"]
    for m in dict.fromkeys(r["clients_per_round"] for r in rows):
        plain = [r for r in rows if r["clients_per_round"] == m and r["aggregation"] == "plain"]
        secure = [r for r in rows if r["clients_per_round"] == m and r["aggregation"] == "secure"]
        t = [1000 * statistics.median(r["round_time_s"] for r in runs) for runs in (plain, secure)]
        b = [statistics.median(r["bytes_per_round"] for r in runs) for runs in (plain, secure)]
        lines.append(f"| {m:,} | {secure[0]['neighbors']} | {t[0]:,.1f} | {t[1]:,.1f} | {t[1] / t[0]:.1f} | "
                     f"{b[0]:,.0f} | {b[1]:,.0f} | {b[1] / b[0]:.1f} |")
    return "\n".join(lines)


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    targets = sorted({r["epsilon_target"] for r in rows}, key=lambda e: (math.isinf(e), e))
    for mechanism in MECHANISMS:
        accuracy = [statistics.median(r["test_accuracy"] for r in rows
                                      if r["mechanism"] == mechanism and r["epsilon_target"] == e) for e in targets]
        ax.plot(range(len(targets)), accuracy, marker="o", label=mechanism)
    ax.set_xticks(range(len(targets)), ["no DP" if math.isinf(e) else f"{e:g}" for e in targets])
    ax.set_xlabel(f"epsilon (delta {DELTA:g})")
    ax.set_ylabel("test accuracy, median over seeds")
    ax.set_title("digits, 2 ranks: privacy against accuracy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epsilons", default="inf,8,4,2,1", help="targets, comma-separated (inf: no DP)")
    parser.add_argument("--epochs", type=int, default=30, help="DP-SGD's epochs")
    parser.add_argument("--rounds", type=int, default=150, help="DP-FedAvg's rounds")
    parser.add_argument("--per-round", default="10,100,1000", help="Part B: clients per round, comma-separated")
    parser.add_argument("--clients", type=int, default=1400, help="Part B: clients in all")
    parser.add_argument("--secagg-rounds", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="Part B: runs of each setting")
    parser.add_argument("--text", action="store_true", help="also run Part C, DP-SGD on the text model")
    parser.add_argument("--only", choices=("digits", "text"),
                        help="run only Parts A and B (digits) or only Part C (text)")
    parser.add_argument("--text-epsilons", default="inf,8,2,1", help="Part C: targets, comma-separated")
    parser.add_argument("--text-steps", type=int, default=TEXT_STEPS, help="Part C: optimizer steps of each run")
    parser.add_argument("--text-clip", type=float, default=TEXT_CLIP, help="Part C: --dp-clip")
    parser.add_argument("--quick", action="store_true", help="a smoke run of about a minute")
    parser.add_argument("--out", default="results/")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.epsilons, args.epochs, args.rounds = 1, "inf,1", 3, 10
        args.per_round, args.secagg_rounds, args.repeats = "10,100", 3, 1
        args.text_epsilons, args.text_steps = "inf,1", 20
    args.text = args.only == "text" or (args.text and args.only != "digits")
    args.text_epsilons = [float(e) for e in args.text_epsilons.split(",")]
    args.epsilons = [float(e) for e in args.epsilons.split(",")]
    args.per_round = [int(m) for m in args.per_round.split(",")]
    return args


def main():
    args = parse_args()
    start = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    digits = args.only != "text"
    with tempfile.TemporaryDirectory() as workdir:
        utility = utility_runs(args, workdir) if digits else []
        cost = secagg_runs(args, workdir) if digits else []
        text = text_runs(args, workdir) if args.text else []
    if digits:
        report_digits(args, utility, cost)
    if text:
        print(f"\n# Part C: DP-SGD on the text model, 2 ranks; {' '.join(map(str, TEXT_FLAGS))} "
              f"--max-steps {args.text_steps}; DP runs: --dp-clip {args.text_clip:g} --dp-delta {DELTA:g}")
        print(text_table(text))
        write_csv(text, os.path.join(args.out, "privacy_text.csv"))
    print(f"\n# total {time.perf_counter() - start:.0f} s; {os.cpu_count()} cores; load avg {os.getloadavg()[0]:.2f}")
    written = ["privacy_utility.csv", "secagg_cost.csv", "privacy_utility.png"] * digits
    written += ["privacy_text.csv"] * bool(text)
    print(f"wrote {', '.join(written)} under {args.out}")


def report_digits(args, utility, cost):
    """Parts A and B: the two tables, their CSVs and the plot."""
    print(f"\n# Part A: privacy against accuracy on digits, 2 ranks; delta {DELTA:g}; clip {CLIP['DP-SGD']:g} "
          f"(DP-SGD), {CLIP['DP-FedAvg']:g} (DP-FedAvg); "
          f"{args.seeds} seed(s); DP-SGD {args.epochs} epochs, DP-FedAvg {args.rounds} rounds")
    print(utility_table(utility))
    params = (64 + 1) * SECAGG_HIDDEN + (SECAGG_HIDDEN + 1) * 10
    print(f"\n# Part B: secure aggregation's cost; digits, {args.clients} clients, MLP 64-{SECAGG_HIDDEN}-10 "
          f"({params:,} parameters), 1 local step, {args.secagg_rounds} rounds; median of {args.repeats} run(s)")
    print(secagg_table(cost))
    write_csv(utility, os.path.join(args.out, "privacy_utility.csv"))
    write_csv(cost, os.path.join(args.out, "secagg_cost.csv"))
    plot(utility, os.path.join(args.out, "privacy_utility.png"))


if __name__ == "__main__":
    main()
