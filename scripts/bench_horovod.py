"""What does distml.horovod's check before every collective cost? Calls and training steps, paired.

    mpirun -n 2 .venv/bin/python scripts/bench_horovod.py [--models small,mid] [--repeats 9]

(as root, Open MPI also wants OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
PRTE_MCA_rmaps_default_mapping_policy=:oversubscribe).

Variants, in rotating order of blocks of >= 10 calls or steps (about 0.5 s), --repeats times:
  allreduce, 16 B and 1 MiB of float32:
    distml      Comm.allreduce_ (one blocking MPI Allreduce: the floor)
    horovod     hvd.allreduce_ (negotiation Allreduce, then Iallreduce and Wait)
  a training step of an MLP (scripts/bench_sync.py's models; mean loss, SGD momentum 0.9):
    distml      distml.DistributedOptimizer
    horovod     hvd.DistributedOptimizer (one negotiation per bucket), default compression
    horovod-fp16  the same with hvd.Compression.fp16
Medians of the slowest rank's time per call or step, and the median of the paired per-repeat
ratios to `distml`. Writes results/bench_horovod.csv.
"""
import argparse
import itertools
import os

import torch
import torch.nn.functional as F

import distml
import distml.horovod as hvd
from bench_allreduce import machine_line, step_stats, time_variants  # scripts/ is sys.path[0]
from bench_sync import MODELS, build_mlp, make_batches
from benchlib import write_csv
from distml import comm as dcomm
from distml.trainer import default_threads


def call_variants(nbytes, world):
    raw, negotiated = torch.ones(nbytes // 4), torch.ones(nbytes // 4)
    return {"distml": lambda: world.allreduce_(raw), "horovod": lambda: hvd.allreduce_(negotiated, op=hvd.Sum)}


def step_variants(sizes, batches):
    def make(wrap):
        model = build_mlp(sizes)
        optimizer = wrap(torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), model)
        data = itertools.cycle(batches)

        def step():
            x, y = next(data)
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
        return step
    return {"distml": make(lambda opt, model: distml.DistributedOptimizer(opt, model)),
            "horovod": make(lambda opt, model: hvd.DistributedOptimizer(opt, model.named_parameters())),
            "horovod-fp16": make(lambda opt, model: hvd.DistributedOptimizer(
                opt, model.named_parameters(), compression=hvd.Compression.fp16))}


def rows_of(what, steps, repeats, world):
    times, count = time_variants(steps, "distml", repeats, world)
    return [{"what": what, "variant": v, "per_block": count, **step_stats(times, v, "distml")} for v in steps]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="small,mid")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--csv", default="results/bench_horovod.csv")
    args = ap.parse_args()
    hvd.init()
    world = dcomm.world()
    torch.set_num_threads(default_threads(world))
    rows = []
    for nbytes in (16, 2**20):
        rows += rows_of(f"allreduce {nbytes:,} B", call_variants(nbytes, world), args.repeats, world)
    for name in args.models.split(","):
        params = sum(p.numel() for p in build_mlp(MODELS[name]).parameters())
        steps = step_variants(MODELS[name], make_batches(MODELS[name], args.batch_size, world.rank))
        rows += rows_of(f"step, MLP {params:,} parameters", steps, args.repeats, world)
    if world.is_root:
        print(machine_line(world))
        print("| what | variant | ms per call or step (median) | min-max ms | paired ratio to distml |")
        print("|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['what']} | {r['variant']} | {r['step_ms']:.4f} | {r['min_ms']:.4f}-{r['max_ms']:.4f} | "
                  f"{r['ratio_to_distml']:.3f} |")
        write_csv(rows, args.csv)
        print(f"# {world.size} ranks, {args.repeats} repeats; load avg {os.getloadavg()[0]:.2f}; wrote {args.csv}")


if __name__ == "__main__":
    main()
