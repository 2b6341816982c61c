"""Sync training across emulated hosts: measured step time against the alpha-beta projection.

    sudo .venv/bin/python scripts/bench_hosts.py [--rates none,1gbit,100mbit,1gbit+1ms] [--models mlp,cnn]
                                                 [--hosts 2,3] [--repeats 3] [--out results/bench_hosts]

Not under mpirun. For each link setting it makes an emulated cluster (scripts/emulated_cluster.py:
one network namespace per host, MPI over TCP; `none` leaves veth unshaped, otherwise each host's
egress is limited by tbf; `+1ms` or `+500us` after either adds that delay to each way of a link),
then on that cluster:
1. the link: alpha (latency) and beta (bandwidth) from MPI ping-pongs of 8 B and 8 MiB between
   2 hosts (alpha = half the small round trip; beta = 8 MiB / (half the large one - alpha));
2. for each model and host count: `distml train --dataset digits --epochs 1 --threads 1
   --batch-size B --lr-schedule constant` with one rank a host; ms per step = train time / steps
   (the median over --repeats);
3. the projection: one step's compute (the same training on one rank, no MPI, median of
   --repeats) + a ring Allreduce of the model's gradient bytes in distml's pieces (--chunk-mb),
   with the link's alpha and beta. error = measured / projected - 1. "projected from shm": the
   same rank count's step measured on shared memory, less its projected communication, plus the
   link's (it keeps what oversubscribed cores cost and projects only the communication).
Shared memory (mpirun on this host) runs the same rows as a reference. Two cores are shared by
all hosts: at 3 hosts the ranks are oversubscribed, so compute is slower than the 1-rank figure;
the table says so where it happens. Writes OUT.csv and OUT.png.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import emulated_cluster
from bench_scaling import allreduce_s, messages_of
from benchlib import ENV, ROOT, write_csv

HERE = Path(__file__).resolve().parent


def train_flags(model, batch, metrics):
    return ["-m", "distml", "train", "--dataset", "digits", "--model", model, "--epochs", "1", "--threads", "1",
            "--batch-size", str(batch), "--lr-schedule", "constant", "--lr", "0.05", "--quiet", "--metrics", metrics]


def step_ms(metrics):
    summary = json.loads(Path(metrics).read_text().splitlines()[-1])
    return 1e3 * summary["train_time_s"] / summary["steps"]


def run_here(ranks, args, timeout=600):
    """python args on this host: plain (ranks 0) or under mpirun -n ranks (shared memory); its stdout."""
    command = [sys.executable, *args]
    if ranks:
        command = [str(Path(sys.executable).parent / "mpirun"), "-n", str(ranks), *command]
    return subprocess.run(command, env=ENV, check=True, capture_output=True, text=True, timeout=timeout).stdout


def run_hosts(cluster, ranks, args, timeout=600):
    """python args under mpirun, one rank on each of the first `ranks` hosts."""
    done = cluster.exec(["mpirun", "-n", str(ranks), "--hostfile", "$DISTML_HOSTFILE", sys.executable, *args],
                        env_extra={"PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=timeout)
    if done.returncode:
        raise RuntimeError(f"mpirun over the emulated hosts failed: {done.stderr[-2000:]}")
    return done.stdout


def link(launch):
    """(alpha s, beta bytes/s) of the link between two ranks: half the round trip of an 8-byte
    ping-pong, and 8 MiB over half the round trip of an 8 MiB ping-pong minus alpha."""
    small, big = map(float, launch([__file__, "--pingpong"]).split()[-2:])
    alpha = small / 2
    return alpha, 8 * 2**20 / max(big / 2 - alpha, 1e-9)


def pingpong_worker():
    """Under mpirun -n 2: median round trips of 8 B and 8 MiB (MPI Send/Recv), printed by rank 0."""
    import numpy as np
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    times = []
    for size, repeats in ((8, 200), (8 * 2**20, 10)):
        buf = np.zeros(size, dtype=np.uint8)
        rounds = []
        for i in range(repeats + 3):
            comm.Barrier()
            start = time.perf_counter()
            if comm.rank == 0:
                comm.Send(buf, dest=1)
                comm.Recv(buf, source=1)
            else:
                comm.Recv(buf, source=0)
                comm.Send(buf, dest=0)
            if i >= 3:
                rounds.append(time.perf_counter() - start)
        times.append(statistics.median(rounds))
    if comm.rank == 0:
        print(*times)


def gradient_bytes(model):
    from distml.config import Config
    from distml.data import load_dataset
    from distml.models import build_model
    cfg = Config(dataset="digits", model=model)
    return 4 * sum(p.numel() for p in build_model(model, load_dataset(cfg), cfg.hidden_sizes()).parameters())


def measure(args):
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        metrics = os.path.join(tmp, "m.jsonl")
        compute = {m: statistics.median(_timed(lambda: run_here(0, train_flags(m, args.batch_size, metrics)), metrics)
                                        for _ in range(args.repeats)) for m in args.models}
        for rate in args.rates:
            if rate == "shm":
                rows += _rows(rate, run_here, compute, metrics, args)
                continue
            with emulated_cluster.Cluster(max(args.hosts), *parse_link(rate)) as cluster:
                rows += _rows(rate, lambda ranks, flags: run_hosts(cluster, ranks, flags), compute, metrics, args)
    return rows


def parse_link(setting):
    """'100mbit+5ms' -> ('100mbit', 5000): the tbf rate (None for unshaped `none`) and the delay in µs."""
    rate, _, delay = setting.partition("+")
    units = {"ms": 1000, "us": 1}
    if rate == "shm" or delay and (delay[-2:] not in units or not delay[:-2].replace(".", "", 1).isdigit()
                                   or float(delay[:-2]) * units[delay[-2:]] < 1):
        raise ValueError(f"a link is none or a tbf rate, with a delay of at least 1 us if any "
                         f"(100mbit+5ms), got {setting!r}")
    delay_us = round(float(delay[:-2]) * units[delay[-2:]]) if delay else None
    return (None if rate == "none" else rate), delay_us


def _timed(fn, metrics):
    fn()
    return step_ms(metrics)


def _rows(rate, launch, compute, metrics, args):
    """The link's figures, then each model and host count on it; launch(ranks, python args)."""
    alpha, beta = link(lambda flags: launch(2, flags))
    rows = []
    for model in args.models:
        grads = gradient_bytes(model)
        for hosts in args.hosts:
            measured = [_timed(lambda: launch(hosts, train_flags(model, args.batch_size, metrics)), metrics)
                        for _ in range(args.repeats)]
            row = project({"link": rate, "model": model, "hosts": hosts, "gradient_mb": grads / 1e6,
                           "alpha_us": alpha * 1e6, "beta_mbit_s": beta * 8 / 1e6, "compute_ms": compute[model],
                           "measured_ms": statistics.median(measured), "measured_min_ms": min(measured),
                           "measured_max_ms": max(measured), "oversubscribed": hosts > (os.cpu_count() or 1),
                           "chunk_mb": args.chunk_mb},
                          args.chunk_mb)
            rows.append(row)
            print(f"  {rate} {model} {hosts} hosts: {row['measured_ms']:.2f} ms/step measured, "
                  f"{row['projected_ms']:.2f} projected", file=sys.stderr, flush=True)
    return rows


EAGER_LIMIT = 64 * 2**10  # Open MPI's btl_tcp_eager_limit: above it, a message waits for the receiver's answer


def project(row, chunk_mb):
    """The row's projected step: compute + a ring Allreduce of the gradient in distml's pieces, with the
    link's alpha and beta; over TCP, each ring message above the eager limit also pays the round trip
    of ob1's rendezvous (the sender announces it, the receiver answers, then the rest goes): measured
    on 100mbit+5ms, raising the eager limit to 1 MiB took the cnn step from 71.3 to 38.8 ms."""
    alpha, beta, hosts = row["alpha_us"] / 1e6, row["beta_mbit_s"] * 1e6 / 8, row["hosts"]
    messages = messages_of(row["gradient_mb"] * 1e6, 25.0, row.get("chunk_mb", chunk_mb))
    comm = allreduce_s("ring", hosts, messages, alpha, beta)
    if row["link"] != "shm":
        comm += sum(2 * (hosts - 1) * 2 * alpha for m in messages if m / hosts > EAGER_LIMIT)
    row["projected_comm_ms"] = 1e3 * comm
    row["projected_ms"] = row["compute_ms"] + row["projected_comm_ms"]
    row["error"] = row["measured_ms"] / row["projected_ms"] - 1
    return row


def write_png(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == model]
        labels = [f"{r['link']}\n{r['hosts']} hosts" for r in mine]
        x = range(len(mine))
        ax.bar([i - 0.2 for i in x], [r["measured_ms"] for r in mine], 0.4, label="measured")
        ax.bar([i + 0.2 for i in x], [r["projected_ms"] for r in mine], 0.4, label="projected (alpha-beta)")
        ax.set_xticks(list(x), labels, fontsize=7)
        ax.set(ylabel="ms per step", title=f"sync, {model} on digits", yscale="log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", default="shm,none,1gbit,100mbit",
                    help="link settings: shm (this host, shared memory), none (unshaped veth), or a tbf rate; "
                         "either of the last two with +DELAY (ms or us) added to each way")
    ap.add_argument("--models", default="mlp,cnn")
    ap.add_argument("--hosts", default="2,3")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--chunk-mb", type=float, default=4.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", help="write OUT.csv and OUT.png (default: results/bench_hosts when measuring; "
                                   "with --table-from, nothing unless given)")
    ap.add_argument("--table-from", help="print the table of earlier runs' CSVs (comma-separated), projected "
                                         "again, instead of measuring")
    ap.add_argument("--pingpong", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.pingpong:
        return pingpong_worker()
    args.rates, args.models = args.rates.split(","), args.models.split(",")
    args.hosts = [int(h) for h in args.hosts.split(",")]
    try:
        [parse_link(r) for r in args.rates if r != "shm"]
    except ValueError as e:
        ap.error(str(e))
    if args.table_from and args.out and args.out + ".csv" in args.table_from.split(","):
        ap.error(f"--out {args.out} would overwrite an input of --table-from")
    args.out = args.out or (None if args.table_from else "results/bench_hosts")
    reason = emulated_cluster.why_unavailable()
    if reason and args.rates != ["shm"] and not args.table_from:
        sys.exit(f"bench_hosts: no emulated cluster here: {reason}")
    runs = [measure(args)] if not args.table_from else \
        [[project(r, args.chunk_mb) for r in _read_csv(path)] for path in args.table_from.split(",")]
    rows = [r for run in runs for r in with_shared_memory(run)]  # each run against its own shm rows
    print(f"# from {args.table_from}" if args.table_from else
          f"# sync on digits, batch {args.batch_size}/rank, 1 thread a rank, 1 epoch, median of {args.repeats}; "
          f"{os.cpu_count()} cores shared by all hosts")
    print("| link | alpha us | beta Mbit/s | model | grad MB | hosts | compute ms | projected ms | measured ms "
          "(min-max) | error | projected from shm | error |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['link']} | {r['alpha_us']:.1f} | {r['beta_mbit_s']:,.0f} | {r['model']} | {r['gradient_mb']:.2f} | "
              f"{r['hosts']}{' (oversubscribed)' if r['oversubscribed'] else ''} | {r['compute_ms']:.2f} | "
              f"{r['projected_ms']:.2f} | {r['measured_ms']:.2f} ({r['measured_min_ms']:.2f}-{r['measured_max_ms']:.2f}) "
              f"| {r['error']:+.0%} | {r['from_shm_ms']:.2f} | {r['from_shm_error']:+.0%} |")
    if args.out:
        write_csv(rows, args.out + ".csv")
        write_png(rows, args.out + ".png")
        print(f"# wrote {args.out}.csv and {args.out}.png")


def with_shared_memory(rows):
    """Add the projection from shared memory: the same rank count's measured step on shm, less the
    model's shm communication, plus the link's. It keeps whatever the ranks' compute costs at that
    count (oversubscribed cores included) and projects only the communication."""
    shm = {(r["model"], r["hosts"]): r for r in rows if r["link"] == "shm"}
    for r in rows:
        base = shm.get((r["model"], r["hosts"]))
        if base is None:
            r["from_shm_ms"], r["from_shm_error"] = float("nan"), float("nan")
            continue
        r["from_shm_ms"] = base["measured_ms"] - base["projected_comm_ms"] + r["projected_comm_ms"]
        r["from_shm_error"] = r["measured_ms"] / r["from_shm_ms"] - 1
    return rows


def _read_csv(path):
    import csv
    with open(path) as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for key, value in r.items():
            if key not in ("link", "model", "oversubscribed"):
                r[key] = int(value) if value.lstrip("-").isdigit() else float(value)  # float reads nan
        r["oversubscribed"] = r["oversubscribed"] == "True"
    return rows


if __name__ == "__main__":
    main()
