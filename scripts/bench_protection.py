"""What does the Python API's protection against mismatched collectives cost a step of your own loop?

    mpirun -n 2 .venv/bin/python scripts/bench_protection.py [--models mid] [--repeats 9]

(as root, Open MPI also wants OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
PRTE_MCA_rmaps_default_mapping_policy=:oversubscribe).

One step = zero_grad, forward, mean CrossEntropy, backward, gradient averaging,
SGD(momentum 0.9).step(), on an MLP (mid: 512-1024-512-10, 1.06M parameters),
in four variants of the same model and batches:
  bare           a GradientReducer on MPI_COMM_WORLD, calls not recorded (no purpose
                 communicators, no stop flag, no hang doctor: the floor)
  distml         distml.DistributedOptimizer (its own communicators, buckets checked when
                 made, the stop flag in the reduction), distml.stop_requested() every step,
                 the hang doctor's thread running (distml.init()'s default)
  bare+metric    bare, and the step's loss averaged over the ranks with a plain Allreduce
  distml+metric  distml, and distml.allreduce(loss) (its 16-byte signature first)
Blocks of >= 10 steps (about 0.5 s) per variant, in rotating order, --repeats times;
medians of the slowest rank's seconds per step and of the per-repeat ratios (paired, so
drift between repeats cancels), and the time of one signature check alone.
Writes results/bench_protection.csv.
"""
import argparse
import itertools
import os
import statistics
import time

import torch
import torch.nn.functional as F

import distml
from bench_allreduce import machine_line, step_stats, time_variants  # scripts/ is sys.path[0]
from bench_sync import MODELS, build_mlp, make_batches
from bench_watchdog import BareComm
from benchlib import write_csv
from distml.reducer import GradientReducer

VARIANTS = ("bare", "distml", "bare+metric", "distml+metric")


def make_step(variant, world, sizes, batches):
    model = build_mlp(sizes)
    sgd = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    data = itertools.cycle(batches)
    if variant.startswith("bare"):
        bare = BareComm(world.mpi_comm)
        reducer = GradientReducer(model.parameters(), bare, op="average")
        reduce, step_fn = reducer.allreduce_grads, sgd.step
        zero = reducer.zero_grad
        metric = (lambda loss: bare.allreduce_(torch.tensor(loss, dtype=torch.float64)))
    else:
        opt = distml.DistributedOptimizer(sgd, model)
        reduce, step_fn, zero = (lambda: None), opt.step, opt.zero_grad
        metric = distml.allreduce
    with_metric = variant.endswith("+metric")
    protected = variant.startswith("distml")

    def step():
        x, y = next(data)
        zero()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        reduce()
        step_fn()
        if protected:
            distml.stop_requested()
        if with_metric:
            metric(loss.item())
    return step


def measure(name, args, world):
    sizes = MODELS[name]
    batches = make_batches(sizes, args.batch_size, world.rank)
    steps = {v: make_step(v, world, sizes, batches) for v in VARIANTS}
    times, count = time_variants(steps, "bare", args.repeats, world)
    params = sum(p.numel() for p in build_mlp(sizes).parameters())
    rows = []
    for v in VARIANTS:
        base = "bare+metric" if v.endswith("+metric") else "bare"
        stats = step_stats(times, v, base)
        rows.append({"model": name, "parameters": params, "variant": v, "steps_per_block": count,
                     "step_ms": stats["step_ms"], "min_ms": stats["min_ms"], "max_ms": stats["max_ms"],
                     "baseline": base, "paired_ratio": stats[f"ratio_to_{base}"]})
    return rows


def signature_us(world, calls=2000, repeats=9):
    """Median microseconds of one negotiate() (the 16-byte signature Allreduce before each loop collective)."""
    from distml.api import _loop
    from distml.matching import negotiate
    comm, times = _loop(), []
    for _ in range(repeats):
        world.mpi_comm.Barrier()
        start = time.perf_counter()
        for _ in range(calls):
            negotiate(comm, "distml.allreduce(op=average, float64 [])")
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mid")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--csv", default="results/bench_protection.csv")
    args = ap.parse_args()
    world = distml.init()  # threads per rank and the hang doctor, as your loop gets them
    rows = [row for name in args.models.split(",") for row in measure(name, args, world)]
    check_us = signature_us(world)
    if world.is_root:
        print(machine_line(world))
        print("| model | parameters | variant | step ms (median) | min-max ms | paired ratio | to |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['model']} | {r['parameters']:,} | {r['variant']} | {r['step_ms']:.3f} | "
                  f"{r['min_ms']:.3f}-{r['max_ms']:.3f} | {r['paired_ratio']:.4f} | {r['baseline']} |")
        print(f"# one signature check (a 16-byte Allreduce before each of your loop's collectives): "
              f"{check_us:.1f} us, median of 9 x 2000")
        write_csv(rows, args.csv)
        print(f"# {world.size} ranks, {args.repeats} repeats; load avg {os.getloadavg()[0]:.2f}; wrote {args.csv}")


if __name__ == "__main__":
    main()
