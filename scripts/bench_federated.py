"""How fast does distml simulate FedAvg? Time per round against a plain PyTorch loop.

    python scripts/bench_federated.py [--rounds 30] [--repeats 3] [--clients 20 100]

The task (from the federated issue): digits, a 64-128-64-10 MLP, FedAvg with
10 clients per round, 1 local epoch, batch 16, SGD lr 0.05, IID split. distml
runs as a user runs it (`mpirun -n R python -m distml train --mode federated`)
at 1 and 2 ranks, and its per-round times come from the metrics file (the
round's training and averaging; evaluation is off until the last round). The
peer is a plain single-process FedAvg loop written the usual way
(load_state_dict, a fresh SGD, train, copy the state_dict, weighted average),
run in this process in the same invocation, with the same torch threads as
distml's 1-rank run. Prints medians over --repeats runs of the median round
time, and writes results/bench_federated.csv.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from benchlib import ROOT, train_records, write_csv

sys.path.insert(0, str(ROOT))
TASK = dict(per_round=10, batch=16, lr=0.05, hidden=(128, 64))


def distml_round_times(ranks, clients, rounds, workdir):
    """Per-round training times (s) of one `mpirun -n ranks distml train --mode federated` run."""
    flags = ["--mode", "federated", "--clients", clients, "--clients-per-round", TASK["per_round"],
             "--local-epochs", 1, "--batch-size", TASK["batch"], "--lr", TASK["lr"], "--momentum", 0,
             "--hidden", ",".join(map(str, TASK["hidden"])), "--rounds", rounds, "--eval-every", rounds]
    records = train_records(ranks, flags, Path(workdir) / "m.jsonl")
    return [r["round_time_s"] for r in records if "round" in r]


def plain_round_times(clients, rounds, seed=0):
    """The peer: a plain single-process FedAvg loop on the same task; per-round times (s)."""
    from distml.config import Config
    from distml.data import load_dataset
    from distml.partition import partition
    data = load_dataset(Config())
    X, y = torch.from_numpy(data.X_train).flatten(1), torch.from_numpy(data.y_train)
    parts = [torch.from_numpy(p) for p in partition(data.y_train, clients, "iid", seed=seed)]
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, TASK["hidden"][0]), nn.ReLU(), nn.Linear(*TASK["hidden"]), nn.ReLU(),
                          nn.Linear(TASK["hidden"][1], 10))
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    generator = np.random.default_rng(seed)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        states, weights = [], []
        for c in generator.choice(clients, TASK["per_round"], replace=False):
            model.load_state_dict(global_state)
            optimizer = torch.optim.SGD(model.parameters(), lr=TASK["lr"])
            xc, yc = X[parts[c]], y[parts[c]]
            order = torch.randperm(len(yc))
            for i in range(0, len(yc), TASK["batch"]):
                batch = order[i:i + TASK["batch"]]
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(xc[batch]), yc[batch]).backward()
                optimizer.step()
            states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
            weights.append(len(yc))
        total = sum(weights)
        global_state = {k: sum(w * s[k] for w, s in zip(weights, states)) / total for k in global_state}
        times.append(time.perf_counter() - start)
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--clients", type=int, nargs="+", default=[20, 100])
    ap.add_argument("--csv", default="results/bench_federated.csv")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)  # what distml gives its one rank
    warm = 3  # rounds left out of each run's median: first-call costs
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for clients in args.clients:
            runs = {"plain PyTorch loop": [], "distml, 1 rank": [], "distml, 2 ranks": []}
            for _ in range(args.repeats):  # interleaved, so drift hits all alike
                runs["plain PyTorch loop"].append(plain_round_times(clients, args.rounds + warm))
                runs["distml, 1 rank"].append(distml_round_times(1, clients, args.rounds + warm, workdir))
                runs["distml, 2 ranks"].append(distml_round_times(2, clients, args.rounds + warm, workdir))
            for name, times in runs.items():
                ms = statistics.median(statistics.median(t[warm:]) for t in times) * 1000
                rows.append({"clients": clients, "runner": name, "ms_per_round": ms})
            base = rows[-3]["ms_per_round"]
            for row in rows[-3:]:
                row["vs_plain"] = row["ms_per_round"] / base
    print(f"# FedAvg on digits, MLP 64-128-64-10, 10 clients per round, 1 local epoch, batch 16; median of "
          f"{args.repeats} runs x {args.rounds} rounds; {os.cpu_count()} cores; "
          f"load avg {os.getloadavg()[0]:.2f}")
    print(f"{'clients':>7}  {'runner':<20} {'ms/round':>9} {'vs plain':>8}")
    for r in rows:
        print(f"{r['clients']:>7}  {r['runner']:<20} {r['ms_per_round']:>9.1f} {r['vs_plain']:>8.2f}")
    write_csv(rows, args.csv)


if __name__ == "__main__":
    main()
