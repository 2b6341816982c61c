"""How close is distml's sync step to the no-communication ceiling, and to PyTorch DDP on gloo?

    .venv/bin/python scripts/bench_vs_ddp.py [--ranks 2] [--repeats 5] [--steps 60]
                                             [--models mlp1m,mlp10m,cnn] [--variants ...]
                                             [--optimizers sgd,adamw] [--one-job]

Not under mpirun: for every repeat, model and variant (rotating order) it launches
`mpirun -n RANKS python scripts/bench_vs_ddp.py --worker ...`, a fresh job, so that each
variant's peak RSS is its own. --one-job runs every variant of a (repeat, model, optimizer) in
one job instead, in the same rotating order (a fraction of the start-up time; no RSS column). A worker takes --warmup untimed steps, then --steps timed ones
between barriers (the slowest rank's time) and reports ms per step and each rank's peak RSS.
Models (float32, batch --batch-size per rank, 1 torch thread per rank; --optimizers: sgd is
SGD lr 0.01 momentum 0.9, adamw AdamW lr 1e-3 weight decay 0.01):
  mlp1m   784-1024-256-10        mlp10m  784-2048-2048-2048-10
  cnn     PyTorch's MNIST example CNN without dropout, 1x28x28 inputs
  text    distml's GPT (4 layers, 4 heads, embed 128, tied head: 0.8M parameters) on random
          blocks of 64 tokens from 65 symbols, --batch-size // 4 blocks per rank
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
  distml-zero1    distml.DistributedOptimizer(zero=1): optimizer state and step sharded (ZeRO-1)
  distml-zero2    zero=2: gradients sharded too, each bucket reduce-scattered as backward ends it
  zero-redundancy DDP on gloo with torch's ZeroRedundancyOptimizer (whole parameters per rank)
  fsdp2           torch's fully_shard (FSDP2) on gloo, per layer (Linear, Conv2d, GPT block) and root
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

MODELS = ("mlp1m", "mlp10m", "cnn", "text")
OPTIMIZERS = ("sgd", "adamw")
GLOO = ("ddp", "zero-redundancy", "fsdp2")  # the variants that need torch.distributed
PINNED_MALLOC = {"MALLOC_TRIM_THRESHOLD_": str(4 << 30), "MALLOC_MMAP_THRESHOLD_": str(32 << 20)}  # glibc's maximum
VARIANTS = ("nocomm", "lockstep", "ddp", "distml", "distml-sum", "distml-1piece", "distml-overlap", "distml-fp16",
            "distml-zero1", "distml-zero2", "zero-redundancy", "fsdp2")


# -- the worker: one (model, variant) in one MPI job ----------------------------------------------------
def build(name):
    import torch
    from torch import nn
    torch.manual_seed(0)
    if name == "text":
        from distml.gpt import gpt
        return gpt(65, 64), (64,)
    if name == "cnn":
        return nn.Sequential(nn.Conv2d(1, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Flatten(), nn.Linear(9216, 128), nn.ReLU(), nn.Linear(128, 10)), (1, 28, 28)
    sizes = {"mlp1m": (784, 1024, 256, 10), "mlp10m": (784, 2048, 2048, 2048, 10)}[name]
    layers = [m for a, b in zip(sizes, sizes[1:]) for m in (nn.Linear(a, b), nn.ReLU())][:-1]
    return nn.Sequential(*layers), (784,)


def make_optimizer(name, params, cls=None):
    import torch
    if name == "adamw":
        return (cls or torch.optim.AdamW)(params, lr=1e-3, weight_decay=0.01)
    return (cls or torch.optim.SGD)(params, lr=0.01, momentum=0.9)


def make_step(variant, name, batch_size, world, optimizer="sgd"):
    import torch
    import torch.nn.functional as F
    import distml
    model, shape = build(name)
    gen = torch.Generator().manual_seed(1000 + world.rank)
    if name == "text":
        batch_size = max(1, batch_size // 4)
        batches = itertools.cycle([(torch.randint(0, 65, (batch_size, *shape), generator=gen),
                                    torch.randint(0, 65, (batch_size, *shape), generator=gen)) for _ in range(4)])
        loss_fn = lambda out, y: F.cross_entropy(out.flatten(0, 1), y.flatten())  # noqa: E731
    else:
        batches = itertools.cycle([(torch.randn(batch_size, *shape, generator=gen),
                                    torch.randint(0, 10, (batch_size,), generator=gen)) for _ in range(4)])
        loss_fn = F.cross_entropy
    if variant in ("ddp", "zero-redundancy"):
        from torch.nn.parallel import DistributedDataParallel
        model = DistributedDataParallel(model, bucket_cap_mb=25, gradient_as_bucket_view=True)
    if variant == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh("cpu", (world.size,))
        layers = (torch.nn.Linear, torch.nn.Conv2d) if name != "text" else (type(model.blocks[0]),)
        for module in list(model.modules())[1:]:
            if isinstance(module, layers):
                fully_shard(module, mesh=mesh)
        fully_shard(model, mesh=mesh)
    if variant == "zero-redundancy":
        from torch.distributed.optim import ZeroRedundancyOptimizer
        sgd = make_optimizer(optimizer, model.parameters(),
                             cls=lambda params, **kw: ZeroRedundancyOptimizer(
                                 params, optimizer_class=torch.optim.AdamW if optimizer == "adamw" else torch.optim.SGD,
                                 **kw))
    else:
        sgd = make_optimizer(optimizer, model.parameters())
    if variant.startswith("distml"):
        options = {"distml-sum": {"op": "sum"}, "distml-1piece": {"chunk_mb": 25.0},
                   "distml-overlap": {"overlap": True, "bucket_mb": 1.0}, "distml-fp16": {"compression": "fp16"},
                   "distml-zero1": {"zero": 1}, "distml-zero2": {"zero": 2}}.get(variant, {})
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
    variants = args.variant.split(",")
    if set(variants) & set(GLOO):
        from bench_allreduce import init_gloo
        init_gloo(world)
    results = {}
    for variant in variants:  # --one-job: several, in the driver's rotating order
        step = make_step(variant, args.model, args.batch_size, world, args.optimizers)
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
        results[variant] = {"ms": 1e3 * elapsed / args.steps, "rss_mb": max(rss) if world.is_root else None}
        del step
    if set(variants) & set(GLOO):  # gloo's threads left running can abort the interpreter's exit
        torch.distributed.destroy_process_group()
    if world.is_root:
        print(json.dumps(results), flush=True)


# -- the driver ------------------------------------------------------------------------------------------
def run_worker(args, model, variants, optimizer):
    """{variant: {"ms", "rss_mb"}} from one MPI job running `variants` in order."""
    from benchlib import ENV
    mpirun = Path(sys.executable).parent / "mpirun"
    command = [str(mpirun), "-n", str(args.ranks), sys.executable, __file__, "--worker", "--model", model,
               "--variant", ",".join(variants), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--batch-size", str(args.batch_size), "--optimizers", optimizer]
    env = {**ENV, **(PINNED_MALLOC if args.malloc == "pinned" else {})}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode:
        raise SystemExit(f"{model} {optimizer} {','.join(variants)} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarize(model, optimizer, variants, runs, args):
    """One row per variant: medians, and paired ratios (per repeat) to DDP and to the ceiling."""
    rows = []
    batch = max(1, args.batch_size // 4) if model == "text" else args.batch_size
    for v in variants:
        ms = [r["ms"] for r in runs[v]]
        row = {"model": model, "optimizer": optimizer, "variant": v, "ms_per_step": statistics.median(ms),
               "samples_per_s": statistics.median(args.ranks * batch * 1e3 / m for m in ms),
               "peak_rss_mb": None if args.one_job else max(r["rss_mb"] for r in runs[v])}
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
    print("| model | optimizer | variant | samples/s | ms/step | comm share | x ceiling (min-max) | x DDP (min-max) "
          "| peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ceiling = f"{r['x_nocomm']:.3f} ({r['x_nocomm_min']:.2f}-{r['x_nocomm_max']:.2f})" if "x_nocomm" in r else "-"
        ddp = f"{r['x_ddp']:.2f} ({r['x_ddp_min']:.2f}-{r['x_ddp_max']:.2f})" if "x_ddp" in r else "-"
        share = f"{100 * r['comm_share']:.1f}%" if "comm_share" in r else "-"
        rss = "-" if r["peak_rss_mb"] is None else f"{r['peak_rss_mb']:.0f}"
        print(f"| {r['model']} | {r['optimizer']} | {r['variant']} | {r['samples_per_s']:,.0f} | {r['ms_per_step']:.2f} "
              f"| {share} | {ceiling} | {ddp} | {rss} |")


def write_png(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = list(dict.fromkeys((r["model"], r["optimizer"]) for r in rows))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4), squeeze=False)
    for ax, (model, optimizer) in zip(axes[0], panels):
        mine = [r for r in rows if (r["model"], r["optimizer"]) == (model, optimizer)]
        ax.bar([r["variant"] for r in mine], [r["samples_per_s"] for r in mine],
               color=["C7" if r["variant"] in ("nocomm", "lockstep") else "C2" if r["variant"] == "ddp" else "C0" for r in mine])
        ax.set_title(f"{model}, {optimizer}")
        ax.tick_params(axis="x", labelrotation=45, labelsize=7)
    axes[0][0].set_ylabel("samples/s (median)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--variants", default=",".join(VARIANTS[:8]))
    ap.add_argument("--optimizers", default="sgd", help=f"comma-separated, from {','.join(OPTIMIZERS)}")
    ap.add_argument("--one-job", action="store_true", help="every variant of a repeat in one MPI job")
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
    models, variants, optimizers = args.models.split(","), args.variants.split(","), args.optimizers.split(",")
    if set(models) - set(MODELS) or {v for v in variants if not v.startswith("distml-chunk")} - set(VARIANTS) \
            or set(optimizers) - set(OPTIMIZERS):
        ap.error(f"--models from {','.join(MODELS)}; --variants from {','.join(VARIANTS)}; --optimizers from "
                 f"{','.join(OPTIMIZERS)}")
    line = f"# {args.ranks} ranks x 1 thread, batch {args.batch_size}/rank, {args.steps} steps, " \
           f"{args.repeats} repeats, {args.malloc} malloc{', one job a repeat' if args.one_job else ''}; " \
           f"load avg before {os.getloadavg()[0]:.2f}"
    cases = [(m, o) for m in models for o in optimizers]
    runs = {case: {v: [] for v in variants} for case in cases}
    for repeat in range(args.repeats):
        for model, optimizer in cases:
            order = variants[repeat % len(variants):] + variants[:repeat % len(variants)]
            jobs = [order] if args.one_job else [[v] for v in order]
            for job in jobs:
                for v, result in run_worker(args, model, job, optimizer).items():
                    runs[model, optimizer][v].append(result)
                    print(f"  repeat {repeat + 1}/{args.repeats} {model} {optimizer} {v}: {result['ms']:.2f} ms/step",
                          file=sys.stderr, flush=True)
    rows = [row for m, o in cases for row in summarize(m, o, variants, runs[m, o], args)]
    print_table(rows, line)
    from benchlib import write_csv
    write_csv(rows, args.csv, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
    write_png(rows, args.csv.replace(".csv", ".png"))
    print(f"# load avg after {os.getloadavg()[0]:.2f}; wrote {args.csv} and its .png")


if __name__ == "__main__":
    main()
