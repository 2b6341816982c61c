"""Does distml's gradient reducer reach the raw bandwidth of MPI Allreduce?

An OSU-style float32 allreduce benchmark, launched from the repository root as

    mpirun -n 2 .venv/bin/python scripts/bench_allreduce.py [--sizes 4K..64M] [--repeats 5]
                                                              [--csv PATH] [--png PATH]

(as root, Open MPI also wants OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
PRTE_MCA_rmaps_default_mapping_policy=:oversubscribe; `make bench` sets them).

For every message size, in the same run and on the same bytes:
  raw      mpi4py  comm.Allreduce(MPI.IN_PLACE, float32 numpy buffer, op=MPI.SUM)
  reducer  distml.reducer.GradientReducer(op="average", bucket_mb=25).allreduce_grads()
           over 4 MiB parameters (so sizes above 25 MiB take several buckets)
  sum      the same reducer with op="sum" (no division pass)
  gloo     torch.distributed.all_reduce on the gloo backend
Each timed block starts after a barrier and runs >= 5 iterations (about 0.2 s);
a block's time is the slowest rank's. The whole sweep is repeated --repeats
times and medians are reported. Bandwidth is OSU's "algorithm bandwidth":
message bytes / time per allreduce, in MB/s (1 MB = 1e6 bytes).
torch threads per rank = cores / ranks on the node, as the distml trainer sets.
gloo rendezvous uses MASTER_ADDR=127.0.0.1, so this is a single-node benchmark.
"""
import argparse
import csv
import os
import platform
import socket
import statistics
import time

import mpi4py
import numpy as np
import torch
import torch.distributed as dist
from mpi4py import MPI

from distml import comm as dcomm
from distml.reducer import GradientReducer
from distml.trainer import default_threads

PARAM_BYTES = 4 * 2**20      # the reducer's model: parameters of at most 4 MiB each
MIN_ITERS, TARGET_S = 5, 0.2
IMPLS = ("raw", "reducer", "sum", "gloo")


def parse_size(text):
    text = text.strip().upper().rstrip("B")
    scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
    return int(text.rstrip("KMG")) * scale


def parse_sizes(text):
    """'4K..64M' (powers of 4 from 4K) or a list like '4K,1M,64M'."""
    if ".." in text:
        lo, hi = (parse_size(t) for t in text.split(".."))
        sizes = []
        while lo <= hi:
            sizes.append(lo)
            lo *= 4
        return sizes
    return [parse_size(t) for t in text.split(",")]


def human(nbytes):
    for unit, scale in (("M", 2**20), ("K", 2**10)):
        if nbytes >= scale and nbytes % scale == 0:
            return f"{nbytes // scale}{unit}"
    return str(nbytes)


def init_gloo(mpi):
    """Join a gloo process group whose rendezvous port rank 0 picks and broadcasts."""
    port = None
    if mpi.rank == 0:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(mpi.mpi_comm.bcast(port, root=0))
    dist.init_process_group("gloo", rank=mpi.rank, world_size=mpi.size)


def make_ops(nbytes, mpi):
    """The four ways to allreduce `nbytes` of float32, as zero-argument callables."""
    n = nbytes // 4
    raw = np.zeros(n, dtype=np.float32)
    chunk = PARAM_BYTES // 4
    params = [torch.nn.Parameter(torch.zeros(min(chunk, n - i))) for i in range(0, n, chunk)]
    avg = GradientReducer(params, mpi, op="average")   # bucket_mb=25, the default
    params_sum = [torch.nn.Parameter(torch.zeros_like(p)) for p in params]
    summ = GradientReducer(params_sum, mpi, op="sum")
    peer = torch.zeros(n)
    ops = {"raw": lambda: mpi.mpi_comm.Allreduce(MPI.IN_PLACE, raw, op=MPI.SUM),
           "reducer": avg.allreduce_grads,
           "sum": summ.allreduce_grads,
           "gloo": lambda: dist.all_reduce(peer)}
    return ops, len(avg.buckets)


def time_block(fn, iters, mpi):
    """Seconds per call of `fn`, slowest rank, after a barrier."""
    mpi.mpi_comm.Barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    elapsed = time.perf_counter() - t0
    return mpi.mpi_comm.allreduce(elapsed, op=MPI.MAX) / iters


def time_variants(steps, baseline, repeats, mpi, *, warmup=5, min_steps=10, target_s=0.5):
    """({variant: [seconds per step, one per repeat]}, steps per block) for the step functions `steps`.

    Each is warmed up; blocks are as long as `target_s` of `baseline` steps (at least
    `min_steps`) and run in rotating order, so drift between repeats hits every variant alike.
    """
    for step in steps.values():
        for _ in range(warmup):
            step()
    count = max(min_steps, int(target_s / time_block(steps[baseline], 3, mpi)))
    names, times = list(steps), {v: [] for v in steps}
    for r in range(repeats):
        for v in names[r % len(names):] + names[:r % len(names)]:
            times[v].append(time_block(steps[v], count, mpi))
    return times, count


def step_stats(times, variant, baseline):
    """A variant's median, min and max ms per step, and the median of its paired ratios to `baseline`."""
    mine = times[variant]
    return {"step_ms": statistics.median(mine) * 1e3, "min_ms": min(mine) * 1e3, "max_ms": max(mine) * 1e3,
            f"ratio_to_{baseline}": statistics.median(t / b for t, b in zip(mine, times[baseline]))}


def calibrate(fn, mpi):
    """Warm up, then pick an iteration count (same on every rank) worth ~TARGET_S."""
    fn()
    per_call = time_block(fn, 3, mpi)
    return max(MIN_ITERS, int(TARGET_S / max(per_call, 1e-9)))


def measure(sizes, repeats, mpi):
    """Rows of median seconds per call for each size and implementation."""
    setups = []
    for nbytes in sizes:
        ops, buckets = make_ops(nbytes, mpi)
        iters = {name: calibrate(fn, mpi) for name, fn in ops.items()}
        setups.append((nbytes, buckets, ops, iters))
    samples = {(nbytes, name): [] for nbytes in sizes for name in IMPLS}
    for r in range(repeats):
        order = IMPLS[r % len(IMPLS):] + IMPLS[:r % len(IMPLS)]  # no fixed position bias
        for nbytes, _, ops, iters in setups:
            for name in order:
                samples[nbytes, name].append(time_block(ops[name], iters[name], mpi))
    return [dict(bytes=nbytes, buckets=buckets,
                 **{name: statistics.median(samples[nbytes, name]) for name in IMPLS})
            for nbytes, buckets, _, _ in setups]


def machine_line(mpi):
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"# {cpu}, {os.cpu_count()} cores | {mpi.library_version().split(',')[0]} | mpi4py "
            f"{mpi4py.__version__} | torch {torch.__version__}, {torch.get_num_threads()} "
            f"thread(s)/rank | world size {mpi.size} | load avg {os.getloadavg()[0]:.2f}")


def mbps(row, name):
    return row["bytes"] / row[name] / 1e6


def print_table(rows):
    print("# algorithm bandwidth = message bytes / time per allreduce (MB = 1e6 bytes);"
          " medians; ratios compare bandwidths (>1 is faster than raw)")
    head = (f"{'size':>6} {'bkts':>4} {'raw us':>10} {'avg us':>10} {'sum us':>10} {'gloo us':>10}"
            f" {'raw MB/s':>9} {'avg MB/s':>9} {'avg/raw %':>9} {'sum/raw %':>9} {'gloo/raw':>8}")
    print(head)
    for row in rows:
        us = {name: row[name] * 1e6 for name in IMPLS}
        print(f"{human(row['bytes']):>6} {row['buckets']:>4} {us['raw']:>10.1f} {us['reducer']:>10.1f}"
              f" {us['sum']:>10.1f} {us['gloo']:>10.1f} {mbps(row, 'raw'):>9.0f}"
              f" {mbps(row, 'reducer'):>9.0f} {100 * row['raw'] / row['reducer']:>9.1f}"
              f" {100 * row['raw'] / row['sum']:>9.1f} {row['raw'] / row['gloo']:>8.2f}")


def write_csv(rows, path):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["bytes", "buckets"] + [f"{n}_us" for n in IMPLS] + [f"{n}_MBps" for n in IMPLS])
        for row in rows:
            out.writerow([row["bytes"], row["buckets"]] + [f"{row[n] * 1e6:.2f}" for n in IMPLS]
                         + [f"{mbps(row, n):.1f}" for n in IMPLS])


def write_png(rows, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    sizes = [row["bytes"] for row in rows]
    labels = {"raw": "raw MPI Allreduce", "reducer": "distml reducer (average)",
              "sum": "distml reducer (sum)", "gloo": "torch.distributed gloo"}
    for name in IMPLS:
        ax.loglog(sizes, [mbps(row, name) for row in rows], marker="o", label=labels[name])
    ax.set_xticks(sizes, [human(s) for s in sizes])
    ax.set_xlabel("message size (float32 bytes)")
    ax.set_ylabel("algorithm bandwidth (MB/s)")
    ax.set_title(title, fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="4K..64M", help="'4K..64M' (powers of 4) or '4K,1M,64M'")
    ap.add_argument("--repeats", type=int, default=5, help="sweeps to take the median over")
    ap.add_argument("--csv", default="results/bench_allreduce.csv")
    ap.add_argument("--png", default="results/bench_allreduce.png")
    args = ap.parse_args()
    mpi = dcomm.world()
    torch.set_num_threads(default_threads(mpi))
    init_gloo(mpi)
    try:
        rows = measure(parse_sizes(args.sizes), args.repeats, mpi)
    finally:
        dist.destroy_process_group()
    if mpi.is_root:
        line = machine_line(mpi)
        print(line)
        print_table(rows)
        write_csv(rows, args.csv)
        write_png(rows, args.png, line.lstrip("# "))
        print(f"# wrote {args.csv} and {args.png}")


if __name__ == "__main__":
    main()
