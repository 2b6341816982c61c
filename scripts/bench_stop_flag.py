"""What does agreeing on a stop signal cost a sync step? Bytes and step time, with and without the flag.

    mpirun -n 2 .venv/bin/python scripts/bench_stop_flag.py [--models small,mid] [--repeats 7]

(as root, Open MPI also wants OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
PRTE_MCA_rmaps_default_mapping_policy=:oversubscribe).

One step = zero_grad, forward, summed CrossEntropy / global batch, backward,
gradient reduction, SGD(momentum 0.9).step(), as `distml train` takes it, in
three variants of the same model and batches:
  none       GradientReducer(control=0): no stop flag at all (before this change)
  in-bucket  GradientReducer(control=3): the stop, checkpoint and non-finite flags are three more
             float32 elements at the end of the last bucket (what `distml train` does now; the
             README's table was measured with the first two)
  separate   control=0 plus one Allreduce of the flags per step (the usual way: Megatron-LM
             all-gathers its flag every iteration)
Blocks of >= 10 steps (about 0.5 s) per variant, in rotating order, --repeats times;
medians of the slowest rank's seconds per step, and the median of the per-repeat
ratios to `none` (paired, so drift between repeats cancels). Bytes per step are
those handed to MPI by one rank (Comm.bytes_sent). Writes results/bench_stop_flag.csv.
"""
import argparse
import itertools
import os

import torch
import torch.nn.functional as F

from bench_allreduce import machine_line, step_stats, time_variants  # scripts/ is sys.path[0]
from bench_sync import MODELS, build_mlp, make_batches
from benchlib import write_csv
from distml import comm as dcomm
from distml.reducer import GradientReducer
from distml.strategies.base import Flags
from distml.trainer import default_threads

VARIANTS = ("none", "in-bucket", "separate")


def make_step(variant, sizes, batches, mpi):
    model = build_mlp(sizes)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    reducer = GradientReducer(model.parameters(), mpi, op="sum", control=3 if variant == "in-bucket" else 0)
    global_batch = len(batches[0][1]) * mpi.size
    data = itertools.cycle(batches)

    def step():
        x, y = next(data)
        reducer.zero_grad()
        (F.cross_entropy(model(x), y, reduction="sum") / global_batch).backward()
        if variant == "in-bucket":  # as SyncStrategy.run_unit does it
            reducer.control.copy_(torch.tensor(Flags().values()))
        reducer.allreduce_grads()
        if variant == "in-bucket":
            Flags.summed(reducer.control.tolist())
        if variant == "separate":
            Flags.summed(mpi.allreduce_(torch.tensor(Flags().values())).tolist())
        optimizer.step()
    return step


def bytes_per_step(step, mpi):
    before = mpi.bytes_sent
    step()
    return mpi.bytes_sent - before


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="small,mid")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--csv", default="results/bench_stop_flag.csv")
    args = ap.parse_args()
    mpi = dcomm.world()
    torch.set_num_threads(default_threads(mpi))
    rows = []
    for name in args.models.split(","):
        sizes = MODELS[name]
        batches = make_batches(sizes, args.batch_size, mpi.rank)
        steps = {v: make_step(v, sizes, batches, mpi) for v in VARIANTS}
        sent = {v: bytes_per_step(s, mpi) for v, s in steps.items()}  # also a first warm-up step
        times, _ = time_variants(steps, "none", args.repeats, mpi)
        params = sum(p.numel() for p in build_mlp(sizes).parameters())
        rows += [{"model": name, "parameters": params, "variant": v, "bytes_per_step": sent[v],
                  **step_stats(times, v, "none")} for v in VARIANTS]
    if mpi.is_root:
        print(machine_line(mpi))
        print("| model | parameters | variant | bytes/step/rank | step ms (median) | min-max ms | paired ratio to none |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['model']} | {r['parameters']:,} | {r['variant']} | {r['bytes_per_step']:,} | "
                  f"{r['step_ms']:.3f} | {r['min_ms']:.3f}-{r['max_ms']:.3f} | {r['ratio_to_none']:.3f} |")
        write_csv(rows, args.csv)
        print(f"# {mpi.size} ranks, {args.repeats} repeats; load avg {os.getloadavg()[0]:.2f}; wrote {args.csv}")


if __name__ == "__main__":
    main()
