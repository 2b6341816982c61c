"""How close is distml's sync step to the no-communication ceiling, and to PyTorch DDP on gloo?

    .venv/bin/python scripts/bench_vs_ddp.py [--ranks 2] [--repeats 5] [--steps 60]
                                             [--models mlp1m,mlp10m,cnn] [--variants ...]

Not under mpirun: for every repeat, model and variant (rotating order) it launches
`mpirun -n RANKS python scripts/bench_vs_ddp.py --worker ...`, a fresh job, so that each
variant's peak RSS is its own. A worker takes --warmup untimed steps, then --steps timed ones
between barriers (the slowest rank's time) and reports ms per step and each rank's peak RSS.
Models (float32, batch --batch-size per rank, 1 torch thread per rank, SGD lr 0.01 momentum 0.9):
  mlp1m   784-1024-256-10        mlp10m  784-2048-2048-2048-10
  cnn     PyTorch's MNIST example CNN without dropout, 1x28x28 inputs
Variants:
  nocomm          every rank steps on its own: the ceiling
  lockstep        as nocomm, plus an Allreduce of one number per step: what keeping the ranks in
                  step costs without moving any gradient (the ceiling of any synchronous method)
  ddp             DistributedDataParallel on gloo, 25 MB buckets, gradient_as_bucket_view
  distml          distml.DistributedOptimizer, the defaults (average, 4 MiB pieces)
  distml-sum      op="sum", loss divided by the global batch (what `distml train` does)
  distml-1piece   chunk_mb = 25: each bucket in one Allreduce
  distml-overlap  overlap=True with 1 MB buckets: reductions start from backward hooks
  distml-fp16     compression="fp16"
  distml-chunkN   chunk_mb=N, for a sweep (not in the default list)
Every variant runs with glibc's heap kept (MALLOC_TRIM_THRESHOLD_, MALLOC_MMAP_THRESHOLD_; --malloc
default leaves glibc's own): otherwise glibc hands freed gradients back to the kernel and the next
backward faults them in again, 4,000-8,500 page faults a step on mlp10m with no communication at all,
and which runs suffer decides the table more than the communication does.
Table: samples/s, ms per step, communication share (t - t_nocomm) / t, paired ratios
(per repeat, then the median, with min-max) to DDP and to the ceiling, peak RSS (max over
ranks). Writes results/bench_vs_ddp.csv and .png.
"""
import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODELS = ("mlp1m", "mlp10m", "cnn")
PINNED_MALLOC = {"MALLOC_TRIM_THRESHOLD_": str(4 << 30), "MALLOC_MMAP_THRESHOLD_": str(32 << 20)}  # glibc's maximum
VARIANTS = ("nocomm", "lockstep", "ddp", "distml", "distml-sum", "distml-1piece", "distml-overlap", "distml-fp16")


# -- the worker: one (model, variant) in one MPI job ----------------------------------------------------
def build(name):
    import torch
    from torch import nn
    torch.manual_seed(0)
    if name == "cnn":
        return nn.Sequential(nn.Conv2d(1, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Flatten(), nn.Linear(9216, 128), nn.ReLU(), nn.Linear(128, 10)), (1, 28, 28)
    sizes = {"mlp1m": (784, 1024, 256, 10), "mlp10m": (784, 2048, 2048, 2048, 10)}[name]
    layers = [m for a, b in zip(sizes, sizes[1:]) for m in (nn.Linear(a, b), nn.ReLU())][:-1]
    return nn.Sequential(*layers), (784,)


def make_step(variant, name, batch_size, world):
    import torch
    import torch.nn.functional as F
    import distml
    model, shape = build(name)
    gen = torch.Generator().manual_seed(1000 + world.rank)
    batches = itertools.cycle([(torch.randn(batch_size, *shape, generator=gen),
                                torch.randint(0, 10, (batch_size,), generator=gen)) for _ in range(4)])
    loss_fn = F.cross_entropy
    if variant == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        model = DistributedDataParallel(model, bucket_cap_mb=25, gradient_as_bucket_view=True)
    sgd = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    if variant.startswith("distml"):
        options = {"distml-sum": {"op": "sum"}, "distml-1piece": {"chunk_mb": 25.0},
                   "distml-overlap": {"overlap": True, "bucket_mb": 1.0}, "distml-fp16": {"compression": "fp16"}}.get(variant, {})
        if variant.startswith("distml-chunk"):  # a sweep: distml-chunk2 is chunk_mb=2
            options = {"chunk_mb": float(variant[len("distml-chunk"):])}
        sgd = distml.DistributedOptimizer(sgd, model, **options)
        if variant == "distml-sum":
            global_batch = batch_size * world.size
            loss_fn = lambda out, y: F.cross_entropy(out, y, reduction="sum") / global_batch  # noqa: E731

    tick = torch.zeros(1)

    def step():
        x, y = next(batches)
        sgd.zero_grad()
        loss_fn(model(x), y).backward()
        if variant == "lockstep":
            world.allreduce_(tick)
        sgd.step()
    return step


def worker(args):
    import torch
    from distml import comm as dcomm
    world = dcomm.world()
    torch.set_num_threads(1)
    if args.variant == "ddp":
        from bench_allreduce import init_gloo
        init_gloo(world)
    step = make_step(args.variant, args.model, args.batch_size, world)
    for _ in range(args.warmup):
        step()
    world.mpi_comm.Barrier()
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    world.mpi_comm.Barrier()
    from mpi4py import MPI
    elapsed = world.mpi_comm.allreduce(time.perf_counter() - started, op=MPI.MAX)
    rss = world.mpi_comm.gather(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, root=0)
    if args.variant == "ddp":  # gloo's threads left running can abort the interpreter's exit
        torch.distributed.destroy_process_group()
    if world.is_root:
        print(json.dumps({"ms": 1e3 * elapsed / args.steps, "rss_mb": max(rss)}), flush=True)


# -- the driver ------------------------------------------------------------------------------------------
def run_worker(args, model, variant):
    from benchlib import ENV
    mpirun = Path(sys.executable).parent / "mpirun"
    command = [str(mpirun), "-n", str(args.ranks), sys.executable, __file__, "--worker", "--model", model,
               "--variant", variant, "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--batch-size", str(args.batch_size)]
    env = {**ENV, **(PINNED_MALLOC if args.malloc == "pinned" else {})}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode:
        raise SystemExit(f"{model} {variant} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarize(model, variants, runs, args):
    """One row per variant: medians, and paired ratios (per repeat) to DDP and to the ceiling."""
    rows = []
    for v in variants:
        ms = [r["ms"] for r in runs[v]]
        row = {"model": model, "variant": v, "ms_per_step": statistics.median(ms),
               "samples_per_s": statistics.median(args.ranks * args.batch_size * 1e3 / m for m in ms),
               "peak_rss_mb": max(r["rss_mb"] for r in runs[v])}
        for peer in ("ddp", "nocomm"):
            if peer in runs:
                ratios = [p["ms"] / r["ms"] for r, p in zip(runs[v], runs[peer])]  # > 1: faster than peer
                row.update({f"x_{peer}": statistics.median(ratios), f"x_{peer}_min": min(ratios),
                            f"x_{peer}_max": max(ratios)})
        if "nocomm" in runs:
            row["comm_share"] = statistics.median((r["ms"] - c["ms"]) / r["ms"] for r, c in zip(runs[v], runs["nocomm"]))
        rows.append(row)
    return rows


def print_table(rows, line):
    print(line)
    print("| model | variant | samples/s | ms/step | comm share | x ceiling (min-max) | x DDP (min-max) | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ceiling = f"{r['x_nocomm']:.3f} ({r['x_nocomm_min']:.2f}-{r['x_nocomm_max']:.2f})" if "x_nocomm" in r else "-"
        ddp = f"{r['x_ddp']:.2f} ({r['x_ddp_min']:.2f}-{r['x_ddp_max']:.2f})" if "x_ddp" in r else "-"
        share = f"{100 * r['comm_share']:.1f}%" if "comm_share" in r else "-"
        print(f"| {r['model']} | {r['variant']} | {r['samples_per_s']:,.0f} | {r['ms_per_step']:.2f} | {share} | "
              f"{ceiling} | {ddp} | {r['peak_rss_mb']:.0f} |")


def write_png(rows, models, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(models), figsize=(4 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == model]
        ax.bar([r["variant"] for r in mine], [r["samples_per_s"] for r in mine],
               color=["C7" if r["variant"] in ("nocomm", "lockstep") else "C2" if r["variant"] == "ddp" else "C0" for r in mine])
        ax.set_title(model)
        ax.tick_params(axis="x", labelrotation=45, labelsize=7)
    axes[0][0].set_ylabel("samples/s (median)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--csv", default="results/bench_vs_ddp.csv")
    ap.add_argument("--malloc", choices=("pinned", "default"), default="pinned",
                    help="pinned (default): glibc keeps freed memory, no page faults between steps")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    models, variants = args.models.split(","), args.variants.split(",")
    if set(models) - set(MODELS) or {v for v in variants if not v.startswith("distml-chunk")} - set(VARIANTS):
        ap.error(f"--models from {','.join(MODELS)}; --variants from {','.join(VARIANTS)}")
    line = f"# {args.ranks} ranks x 1 thread, batch {args.batch_size}/rank, {args.steps} steps, " \
           f"{args.repeats} repeats, {args.malloc} malloc; load avg before {os.getloadavg()[0]:.2f}"
    runs = {m: {v: [] for v in variants} for m in models}
    for repeat in range(args.repeats):
        for model in models:
            for v in variants[repeat % len(variants):] + variants[:repeat % len(variants)]:
                runs[model][v].append(run_worker(args, model, v))
                print(f"  repeat {repeat + 1}/{args.repeats} {model} {v}: {runs[model][v][-1]['ms']:.2f} ms/step",
                      file=sys.stderr, flush=True)
    rows = [row for m in models for row in summarize(m, variants, runs[m], args)]
    print_table(rows, line)
    from benchlib import write_csv
    write_csv(rows, args.csv, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
    write_png(rows, models, args.csv.replace(".csv", ".png"))
    print(f"# load avg after {os.getloadavg()[0]:.2f}; wrote {args.csv} and its .png")


if __name__ == "__main__":
    main()
