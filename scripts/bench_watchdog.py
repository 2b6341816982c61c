"""What does the hang doctor cost a sync step? Step time with and without call recording.

    mpirun -n 2 .venv/bin/python scripts/bench_watchdog.py [--models mid] [--repeats 9]

(as root, Open MPI also wants OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
PRTE_MCA_rmaps_default_mapping_policy=:oversubscribe).

One step = zero_grad, forward, summed CrossEntropy / global batch, backward,
gradient reduction (GradientReducer, 25 MB buckets), SGD(momentum 0.9).step(),
as `distml train` takes it, in three variants of the same model and batches:
  bare       a Comm whose calls are not recorded, no watchdog thread (the floor)
  recorded   every call entered in the CallRecord, the step's context set (what the
             hang doctor reads), no thread
  doctor     recorded, and the HangDoctor thread polling its channel (`distml train`'s default)
Blocks of >= 10 steps (about 0.5 s) per variant, in rotating order, --repeats times;
medians of the slowest rank's seconds per step, and the median of the per-repeat
ratios to `bare` (paired, so drift between repeats cancels). Writes results/bench_watchdog.csv.
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
from distml.trainer import default_threads
from distml.watchdog import HangDoctor

VARIANTS = ("bare", "recorded", "doctor")


class BareComm(dcomm.Comm):
    """Comm without the call record (what distml did before the hang doctor)."""

    def _call(self, op, nbytes, what, fn, *args):
        return fn(*args)


def make_step(mpi, sizes, batches):
    model = build_mlp(sizes)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    reducer = GradientReducer(model.parameters(), mpi, op="sum", control=2)
    global_batch = len(batches[0][1]) * mpi.size
    data = itertools.cycle(enumerate(batches))

    def step():
        i, (x, y) = next(data)
        mpi.calls.context = f"epoch 1 step {i + 1}"  # as the trainer's loop does
        reducer.zero_grad()
        (F.cross_entropy(model(x), y, reduction="sum") / global_batch).backward()
        reducer.allreduce_grads()
        optimizer.step()
    return step


def measure(name, args, world):
    sizes = MODELS[name]
    batches = make_batches(sizes, args.batch_size, world.rank)
    comms = {"bare": BareComm(world.mpi_comm), "recorded": dcomm.Comm(world.mpi_comm),
             "doctor": dcomm.Comm(world.mpi_comm)}
    steps = {v: make_step(comms[v], sizes, batches) for v in VARIANTS}
    doctor = HangDoctor(comms["doctor"], 600.0)  # its thread runs through every variant's blocks
    try:
        times, count = time_variants(steps, "bare", args.repeats, world)
    finally:
        doctor.stop()
    params = sum(p.numel() for p in build_mlp(sizes).parameters())
    rows = [{"model": name, "parameters": params, "variant": v, "steps_per_block": count,
             **step_stats(times, v, "bare")} for v in VARIANTS]
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mid")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--csv", default="results/bench_watchdog.csv")
    args = ap.parse_args()
    world = dcomm.world()
    torch.set_num_threads(default_threads(world))
    rows = [row for name in args.models.split(",") for row in measure(name, args, world)]
    if world.is_root:
        print(machine_line(world))
        print("| model | parameters | variant | step ms (median) | min-max ms | paired ratio to bare |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['model']} | {r['parameters']:,} | {r['variant']} | {r['step_ms']:.3f} | "
                  f"{r['min_ms']:.3f}-{r['max_ms']:.3f} | {r['ratio_to_bare']:.4f} |")
        write_csv(rows, args.csv)
        print(f"# {world.size} ranks, {args.repeats} repeats; load avg {os.getloadavg()[0]:.2f}; wrote {args.csv}")


if __name__ == "__main__":
    main()
