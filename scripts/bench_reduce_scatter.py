"""Which reduce-scatter should the sharded optimizer use? MPI's collectives against distml's ring.

Launched from the repository root as

    mpirun -n 2 .venv/bin/python scripts/bench_reduce_scatter.py [--elements 10500000] [--repeats 5]
                                                                   [--csv PATH]

(as root, Open MPI also wants OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
PRTE_MCA_rmaps_default_mapping_policy=:oversubscribe).

On one float32 buffer of --elements (the 10.5M-parameter MLP's gradient), in the same run,
the candidates interleaved in every repeat:
  allreduce        comm.Allreduce(MPI.IN_PLACE, ...)             (what full replicas use)
  rs_block         comm.Reduce_scatter_block(buffer, slice)       (MPI's reduce-scatter)
  rs_v             comm.Reduce_scatter(buffer, slice, counts)     (the one ZeRO used before)
  ring             Comm.reduce_scatter_ (Sendrecv ring, torch adds), one call
  ring_pieces      Comm.reduce_scatter_parts_ in 4 MiB pieces interleaved over the slices (stage 1)
  allgather        comm.Allgather(MPI.IN_PLACE, ...)              (the step's other half)
Each timing is the median of 10 calls after 3 warm-up calls, each started after a barrier and
taken on rank 0; the table gives the median over repeats and each candidate's ratio to
allreduce, paired within a repeat.
"""
import argparse
import statistics
import time

import numpy as np
import torch
from mpi4py import MPI

from benchlib import write_csv
from distml import comm as dcomm


def timed(fn, calls=10, warmup=3):
    comm, times = MPI.COMM_WORLD, []
    for i in range(warmup + calls):
        comm.Barrier()
        start = time.perf_counter()
        fn()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def candidates(world, elements):
    mpi, n, r = world.mpi_comm, world.size, world.rank
    length = elements // n
    grad = torch.rand(length * n)
    out = torch.empty(length)
    buf, mine = grad.numpy(), out.numpy()
    piece = (4 << 20) // 4 // n

    def ring_pieces():
        for a in range(0, length, piece):
            b = min(length, a + piece)
            world.reduce_scatter_parts_([grad[k * length + a:k * length + b] for k in range(n)], out[a:b])

    return {
        "allreduce": lambda: mpi.Allreduce(MPI.IN_PLACE, buf),
        "rs_block": lambda: mpi.Reduce_scatter_block(buf, mine),
        "rs_v": lambda: mpi.Reduce_scatter(buf, mine, [length] * n),
        "ring": lambda: world.reduce_scatter_(grad, out, [length] * n),
        "ring_pieces": ring_pieces,
        "allgather": lambda: mpi.Allgather(MPI.IN_PLACE, buf),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--elements", type=int, default=10_500_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--csv", default="results/bench_reduce_scatter.csv")
    args = parser.parse_args()
    torch.set_num_threads(1)
    world = dcomm.world()
    runs = candidates(world, args.elements)
    rows = []
    for repeat in range(args.repeats):
        for name, fn in runs.items():
            rows.append({"ranks": world.size, "elements": args.elements, "repeat": repeat,
                         "candidate": name, "ms": timed(fn)})
    if world.rank:
        return
    write_csv(rows, args.csv)
    by = {(row["candidate"], row["repeat"]): row["ms"] for row in rows}
    print(f"{args.elements} float32 at {world.size} ranks, {args.repeats} repeats "
          f"({MPI.Get_library_version().split(',')[0]})")
    print(f"{'candidate':12s} {'median ms':>10s} {'min':>8s} {'max':>8s} {'/ allreduce':>12s}")
    for name in runs:
        ms = [by[name, k] for k in range(args.repeats)]
        ratio = statistics.median(by[name, k] / by["allreduce", k] for k in range(args.repeats))
        print(f"{name:12s} {statistics.median(ms):10.1f} {min(ms):8.1f} {max(ms):8.1f} {ratio:12.2f}")
    print(f"CSV: {args.csv}")


if __name__ == "__main__":
    main()
