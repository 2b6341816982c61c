"""What does checking for non-finite values cost a sync step? Step time with and without the check.

    mpirun -n 2 .venv/bin/python scripts/bench_nonfinite.py [--models small,mid] [--repeats 11]

(as root, Open MPI also wants OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
PRTE_MCA_rmaps_default_mapping_policy=:oversubscribe).

One step as `distml train` takes it in sync mode (zero_grad, forward, summed
CrossEntropy / global batch, backward, the three flags in the last bucket,
gradient reduction, SGD(momentum 0.9).step()), in three variants of the same
model and batches:
  off         no check: the non-finite flag stays 0
  loss        math.isfinite of the loss float the step has anyway (loss.item())
  loss+grads  what distml does: nonfinite.first_nonfinite, the loss and one sum per
              gradient bucket, before the reduction
Blocks of >= 10 steps (about 0.5 s) per variant in rotating order, --repeats
times; medians of the slowest rank's seconds per step, and the median of the
per-repeat ratios to `off` (paired, so drift between repeats cancels). On busy
cores that ratio swings by several percent either way, so `check ms` also times
the variant's check alone (median of --repeats blocks of 100 calls, this rank),
and `check / step` relates it to the median `off` step. Writes
results/bench_nonfinite.csv.
"""
import argparse
import itertools
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F

from bench_allreduce import machine_line, step_stats, time_variants  # scripts/ is sys.path[0]
from bench_sync import MODELS, build_mlp, make_batches
from benchlib import write_csv
from distml import comm as dcomm
from distml.nonfinite import first_nonfinite
from distml.reducer import GradientReducer
from distml.strategies.base import Flags
from distml.trainer import default_threads

VARIANTS = ("off", "loss", "loss+grads")


def check(variant, loss, reducer, model):
    """This rank's non-finite flag as the variant finds it."""
    if variant == "loss":
        return not math.isfinite(loss)
    if variant == "loss+grads":
        reducer.attach_grads()  # as the trainer: the buckets hold this step's gradients
        return first_nonfinite(loss, [b.grads for b in reducer.buckets], model) is not None
    return False


def make_step(variant, sizes, batches, mpi):
    model = build_mlp(sizes)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    reducer = GradientReducer(model.parameters(), mpi, op="sum", control=3)
    global_batch = len(batches[0][1]) * mpi.size
    data = itertools.cycle(batches)

    def step():
        x, y = next(data)
        reducer.zero_grad()
        summed = F.cross_entropy(model(x), y, reduction="sum")
        (summed / global_batch).backward()
        reducer.control.copy_(torch.tensor(Flags(nonfinite=check(variant, summed.item(), reducer, model)).values()))
        reducer.allreduce_grads()
        if not Flags.summed(reducer.control.tolist()).nonfinite:
            optimizer.step()
    return step, lambda: check(variant, 1.0, reducer, model)


def time_alone(fn, repeats, calls=100):
    """Median seconds per call of `fn` on this rank, over `repeats` blocks of `calls`."""
    blocks = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        blocks.append((time.perf_counter() - start) / calls)
    return statistics.median(blocks)


def measure(name, repeats, batch_size, mpi):
    """Rows of one model: each variant's median step time and paired ratio to `off`."""
    sizes = MODELS[name]
    batches = make_batches(sizes, batch_size, mpi.rank)
    steps, checks = {}, {}
    for v in VARIANTS:
        steps[v], checks[v] = make_step(v, sizes, batches, mpi)
    times, _ = time_variants(steps, "off", repeats, mpi)
    params = sum(p.numel() for p in build_mlp(sizes).parameters())
    alone = {v: time_alone(checks[v], repeats) for v in VARIANTS}
    return [{"model": name, "parameters": params, "variant": v, **step_stats(times, v, "off"),
             "check_ms": alone[v] * 1e3, "check_share": alone[v] / statistics.median(times["off"])}
            for v in VARIANTS]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="small,mid")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--csv", default="results/bench_nonfinite.csv")
    args = ap.parse_args()
    mpi = dcomm.world()
    torch.set_num_threads(default_threads(mpi))
    rows = [row for name in args.models.split(",") for row in measure(name, args.repeats, args.batch_size, mpi)]
    if mpi.is_root:
        print(machine_line(mpi))
        print("| model | parameters | variant | step ms (median) | min-max ms | paired ratio to off | check ms | "
              "check / step |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['model']} | {r['parameters']:,} | {r['variant']} | {r['step_ms']:.3f} | "
                  f"{r['min_ms']:.3f}-{r['max_ms']:.3f} | {r['ratio_to_off']:.3f} | {r['check_ms']:.4f} | "
                  f"{r['check_share']:.2%} |")
        write_csv(rows, args.csv)
        print(f"# {mpi.size} ranks, {args.repeats} repeats; load avg {os.getloadavg()[0]:.2f}; wrote {args.csv}")


if __name__ == "__main__":
    main()
