"""How does each mode scale here, and where would sync's communication start to dominate on a cluster?

    .venv/bin/python scripts/bench_scaling.py [--model cnn] [--epochs 3] [--batch-size 32]
                                              [--bandwidth-gbs B] [--latency-us A] [--out results/bench_scaling]

Not under mpirun: it launches `distml train` (digits, --threads 1, constant learning rate) itself.
1. Measured: strong scaling (a fixed global batch, or a fixed set of clients) and weak scaling
   (a fixed batch per rank, or clients per rank) at 1, 2 and 4 ranks for sync, async (2 and 4
   ranks: one server) and federated. 4 ranks on this 2-core machine are oversubscribed and
   labelled so. Efficiency = samples/s at n ranks / (n / n0 x samples/s at the smallest n0).
2. Projected: sync at 8 to 1024 ranks (one per node) from an alpha-beta model of allreduce,
   fed with the measured compute time of one step (1 rank) and the model's gradient bytes:
     ring  2 (p-1) alpha + 2 (p-1)/p m / beta        per message of m bytes
     tree  2 ceil(log2 p) (alpha + m / beta)
   summed over the messages of a step (buckets cut into --chunk-mb pieces), for float32 and
   fp16 compression. Step time = compute + allreduce (no overlap); efficiency = compute / step.
   alpha and beta come from --latency-us / --bandwidth-gbs (your cluster's interconnect), or
   else from an Allreduce of 8 B and 8 MiB timed here at 2 ranks (shared memory).
Writes OUT.csv (measured), OUT_projection.csv and OUT.png.
"""
import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import ENV, train_records, write_csv

MODES = ("sync", "async", "federated")


def runs(args):
    """(mode, scaling, ranks, distml train flags) of every measured run."""
    common = ["--dataset", "digits", "--model", args.model, "--epochs", args.epochs, "--threads", 1,
              "--lr-schedule", "constant", "--lr", 0.05]
    for ranks in (1, 2, 4):
        for scaling in ("strong", "weak"):
            batch = args.batch_size * (4 // ranks if scaling == "strong" else 1)  # strong: 4 x batch in all
            yield "sync", scaling, ranks, common + ["--batch-size", batch]
            clients = 8 if scaling == "strong" else 2 * ranks
            yield "federated", scaling, ranks, common + ["--mode", "federated", "--clients", clients,
                                                         "--batch-size", args.batch_size]
            if ranks > 1:
                workers = ranks - 1
                batch = args.batch_size * (3 // workers if scaling == "strong" else 1)
                yield "async", scaling, ranks, common + ["--mode", "async", "--batch-size", batch]


def measure(args):
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode, scaling, ranks, flags in runs(args):
            summary = train_records(ranks, flags, os.path.join(tmp, "m.jsonl"))[-1]
            rows.append({"mode": mode, "scaling": scaling, "ranks": ranks,
                         "oversubscribed": ranks > (os.cpu_count() or 1),
                         "samples_per_s": summary["samples_per_s"], "test_accuracy": summary["test_accuracy"],
                         "bytes_per_sample": summary["bytes_communicated"] / max(1, summary["samples_per_s"]
                                                                                  * summary["train_time_s"])})
            print(f"  {mode} {scaling} {ranks} rank(s): {summary['samples_per_s']:,.0f} samples/s",
                  file=sys.stderr, flush=True)
    for row in rows:
        base = min((r for r in rows if r["mode"] == row["mode"] and r["scaling"] == row["scaling"]),
                   key=lambda r: r["ranks"])
        row["efficiency"] = row["samples_per_s"] / (row["ranks"] / base["ranks"] * base["samples_per_s"])
    return rows


# -- the alpha-beta projection --------------------------------------------------------------------------
def allreduce_s(algorithm, p, messages, alpha, beta):
    """Seconds to allreduce `messages` (bytes each) over p ranks, one after another."""
    if p == 1:
        return 0.0
    if algorithm == "ring":
        return sum(2 * (p - 1) * alpha + 2 * (p - 1) / p * m / beta for m in messages)
    return sum(2 * math.ceil(math.log2(p)) * (alpha + m / beta) for m in messages)


def messages_of(grad_bytes, bucket_mb, chunk_mb):
    """The message sizes one step sends: buckets of bucket_mb, each cut into pieces of chunk_mb."""
    sizes, left = [], grad_bytes
    while left > 0:
        bucket = min(left, bucket_mb * 2**20)
        pieces = math.ceil(bucket / (chunk_mb * 2**20))
        sizes += [bucket / pieces] * pieces
        left -= bucket
    return sizes


def project(compute_s, grad_bytes, alpha, beta, chunk_mb):
    rows = []
    for p in [2**k for k in range(3, 11)]:
        row = {"ranks": p}
        for algorithm in ("ring", "tree"):
            for name, scale in (("fp32", 1.0), ("fp16", 0.5)):
                comm_s = allreduce_s(algorithm, p, messages_of(grad_bytes * scale, 25.0, chunk_mb), alpha, beta)
                row[f"{algorithm}_{name}_comm_ms"] = 1e3 * comm_s
                row[f"{algorithm}_{name}_efficiency"] = compute_s / (compute_s + comm_s)
        rows.append(row)
    return rows


def ping(args):
    """alpha (s) and beta (bytes/s) from Allreduce of 8 B and 8 MiB at 2 ranks (ring: 2 alpha + m / beta)."""
    command = [str(Path(sys.executable).parent / "mpirun"), "-n", "2", sys.executable, __file__, "--ping"]
    out = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300, check=True).stdout
    small, big = map(float, out.split()[-2:])
    alpha = small / 2
    return alpha, 8 * 2**20 / max(big - 2 * alpha, 1e-9)


def ping_worker():
    import torch
    from distml import comm as dcomm
    world = dcomm.world()
    times = []
    for n in (2, 2**21):  # 8 B and 8 MiB of float32
        t = torch.ones(n)
        for _ in range(5):
            world.allreduce_(t)
        repeats = 200 if n == 2 else 20
        world.mpi_comm.Barrier()
        started = time.perf_counter()
        for _ in range(repeats):
            world.allreduce_(t)
        times.append((time.perf_counter() - started) / repeats)
    if world.is_root:
        print(*times)


def compute_and_bytes(args, rows):
    """One step's compute time at 1 rank (sync, weak) and the model's gradient bytes."""
    from distml.config import Config
    from distml.data import load_dataset
    from distml.models import build_model
    cfg = Config(dataset="digits", model=args.model)
    params = sum(p.numel() for p in build_model(args.model, load_dataset(cfg), cfg.hidden_sizes()).parameters())
    one = next(r for r in rows if r["mode"] == "sync" and r["scaling"] == "weak" and r["ranks"] == 1)
    return args.batch_size / one["samples_per_s"], 4 * params


def write_png(rows, projection, path, alpha, beta):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for mode in MODES:
        for scaling, style in (("strong", "-o"), ("weak", "--s")):
            mine = [r for r in rows if r["mode"] == mode and r["scaling"] == scaling]
            left.plot([r["ranks"] for r in mine], [r["efficiency"] for r in mine], style, label=f"{mode} {scaling}")
    left.set(xlabel="ranks (4: oversubscribed, 2 cores)", ylabel="efficiency", title="measured here", xticks=[1, 2, 4])
    left.legend(fontsize=7)
    for key in ("ring_fp32", "ring_fp16", "tree_fp32", "tree_fp16"):
        right.plot([r["ranks"] for r in projection], [r[f"{key}_efficiency"] for r in projection], marker=".",
                   label=key.replace("_", " "))
    right.set_xscale("log", base=2)
    right.set(xlabel="ranks", ylabel="sync efficiency (compute / step)", ylim=(0, 1.02),
              title=f"projected: alpha {alpha * 1e6:.1f} us, beta {beta / 1e9:.2f} GB/s")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="cnn")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--chunk-mb", type=float, default=4.0)
    ap.add_argument("--bandwidth-gbs", type=float, help="the interconnect's bandwidth (default: measured here)")
    ap.add_argument("--latency-us", type=float, help="the interconnect's latency (default: measured here)")
    ap.add_argument("--out", default="results/bench_scaling")
    ap.add_argument("--ping", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.ping:
        return ping_worker()
    rows = measure(args)
    alpha, beta = ping(args)
    alpha = alpha if args.latency_us is None else args.latency_us * 1e-6
    beta = beta if args.bandwidth_gbs is None else args.bandwidth_gbs * 1e9
    compute_s, grad_bytes = compute_and_bytes(args, rows)
    projection = project(compute_s, grad_bytes, alpha, beta, args.chunk_mb)
    print(f"# {args.model} on digits, batch {args.batch_size}/rank, {args.epochs} epochs; 4 ranks oversubscribed "
          f"on {os.cpu_count()} cores")
    print("| mode | scaling | ranks | samples/s | efficiency | test accuracy |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['scaling']} | {r['ranks']}{' (oversubscribed)' if r['oversubscribed'] else ''} | "
              f"{r['samples_per_s']:,.0f} | {r['efficiency']:.2f} | {r['test_accuracy']:.3f} |")
    print(f"\n# projection: compute {compute_s * 1e3:.2f} ms/step, {grad_bytes / 1e6:.2f} MB of gradients, "
          f"alpha {alpha * 1e6:.2f} us, beta {beta / 1e9:.2f} GB/s, {args.chunk_mb:g} MiB pieces")
    print("| ranks | ring fp32 | ring fp16 | tree fp32 | tree fp16 |\n|---|---|---|---|---|")
    for r in projection:
        cells = [f"{r[f'{k}_efficiency']:.2f} ({r[f'{k}_comm_ms']:.2f} ms)"
                 for k in ("ring_fp32", "ring_fp16", "tree_fp32", "tree_fp16")]
        print(f"| {r['ranks']} | " + " | ".join(cells) + " |")
    write_csv(rows, args.out + ".csv")
    write_csv(projection, args.out + "_projection.csv")
    write_png(rows, projection, args.out + ".png", alpha, beta)
    print(f"# wrote {args.out}.csv, {args.out}_projection.csv and {args.out}.png")


if __name__ == "__main__":
    main()
