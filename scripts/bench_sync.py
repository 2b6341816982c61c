"""How fast is a distml sync training step compared with PyTorch DDP on gloo?

Same models, data and ranks, in one job, launched from the repository root as

    mpirun -n 2 .venv/bin/python scripts/bench_sync.py [--models small,mid,large] [--batch-size 32]
                                                         [--repeats 5] [--warmup 5] [--bucket-mb 25]
                                                         [--csv PATH] [--png PATH]

(as root, Open MPI also wants OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
PRTE_MCA_rmaps_default_mapping_policy=:oversubscribe).

One step = zero_grad, forward, CrossEntropy, backward, gradient reduction, and
SGD(lr=0.01, momentum=0.9).step(), taken by four variants of the same model:
  sum      distml.DistributedOptimizer(SGD, model, op="sum"); the loss is summed over the
           rank's batch and divided by the global batch (what `distml train` does)
  average  distml.DistributedOptimizer(SGD, model), op="average"; mean loss over the rank's batch
  ddp      torch.nn.parallel.DistributedDataParallel on gloo, bucket_cap_mb=25,
           gradient_as_bucket_view=True; mean loss
  local    the same step with no communication: every rank steps on its own, all at once,
           so it shares the machine as the others do (the compute-only lower bound)
Models are float32 MLPs (Linear, ReLU between): small 64-128-64-10 (17,226 parameters),
mid 512-1024-512-10 (1,055,242), large 1024-2048-2048-2048-10 (10,512,394). Each rank
cycles over 8 fixed random batches (torch seed 1000 + rank) of --batch-size samples;
every variant starts from the same weights (seed 0).
After --warmup steps per variant, each repeat times one block per (model, variant), in
rotating order: a barrier, then >= 10 steps (about 0.5 s each), the slowest rank's time.
Medians over --repeats blocks are reported; overhead = step time - local step time;
noise = the largest (max - min) / median of the four variants' blocks.
torch threads per rank = distml.trainer.default_threads (cores / ranks on the node), for all.
Last, a check: distml (sum) and DDP, started from the same weights and stepped 3 times on
the same batches, must agree: max|diff|, the largest parameter difference over ranks,
is printed, and above 1e-5 the script exits with status 1.
"""
import argparse
import csv
import itertools
import os
import statistics

import torch
import torch.distributed as dist
import torch.nn.functional as F
from mpi4py import MPI
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import distml
from bench_allreduce import init_gloo, machine_line, time_block  # scripts/ is sys.path[0]
from distml import comm as dcomm
from distml.trainer import default_threads

MODELS = {"small": (64, 128, 64, 10), "mid": (512, 1024, 512, 10),
          "large": (1024, 2048, 2048, 2048, 10)}
VARIANTS = ("sum", "average", "ddp", "local")
MIN_STEPS, TARGET_S, WEIGHT_SEED, DATA_SEED, N_BATCHES, TOLERANCE = 10, 0.5, 0, 1000, 8, 1e-5


def build_mlp(sizes):
    torch.manual_seed(WEIGHT_SEED)
    layers = []
    for a, b in zip(sizes, sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def make_batches(sizes, batch_size, rank):
    g = torch.Generator().manual_seed(DATA_SEED + rank)
    return [(torch.randn(batch_size, sizes[0], generator=g),
             torch.randint(0, sizes[-1], (batch_size,), generator=g)) for _ in range(N_BATCHES)]


def make_step(variant, sizes, batches, mpi, bucket_mb):
    """A zero-argument training step of `variant`, the model it trains and its optimizer."""
    model = build_mlp(sizes)
    sgd = lambda m: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)  # noqa: E731
    loss_fn = F.cross_entropy
    if variant in ("sum", "average"):
        distml.broadcast_parameters(model)
        opt = distml.DistributedOptimizer(sgd(model), model, bucket_mb=bucket_mb, op=variant)
        if variant == "sum":
            global_batch = len(batches[0][1]) * mpi.size
            loss_fn = lambda out, y: F.cross_entropy(out, y, reduction="sum") / global_batch  # noqa: E731
    elif variant == "ddp":
        model = DistributedDataParallel(model, bucket_cap_mb=25, gradient_as_bucket_view=True)
        opt = sgd(model)
    else:
        opt = sgd(model)
    data = itertools.cycle(batches)

    def step():
        x, y = next(data)
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    return step, model, opt


def set_up(names, batch_size, warmup, mpi, bucket_mb):
    """Per model: its step functions (warmed up) and their steps per block (same on all ranks)."""
    setups = []
    for name in names:
        sizes = MODELS[name]
        batches = make_batches(sizes, batch_size, mpi.rank)
        made = {v: make_step(v, sizes, batches, mpi, bucket_mb) for v in VARIANTS}
        steps = {v: step for v, (step, _, _) in made.items()}
        params = sum(p.numel() for p in made["local"][1].parameters())
        buckets = len(made["sum"][2].reducer.buckets)
        for step in steps.values():
            for _ in range(warmup):
                step()
        counts = {v: max(MIN_STEPS, int(TARGET_S / time_block(step, 3, mpi))) for v, step in steps.items()}
        setups.append(dict(model=name, sizes=sizes, params=params, buckets=buckets,
                           steps=counts, fns=steps, batches=batches))
    return setups


def measure(setups, repeats, mpi):
    """Adds each variant's block times (seconds per step, one per repeat) to its setup."""
    for s in setups:
        s["samples"] = {v: [] for v in VARIANTS}
    for r in range(repeats):
        order = VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]  # no position bias
        for s in setups:
            for variant in order:
                s["samples"][variant].append(time_block(s["fns"][variant], s["steps"][variant], mpi))


def max_difference(s, mpi, bucket_mb, steps=3):
    """Largest |parameter difference| between distml (sum) and DDP after `steps` steps."""
    step_a, model_a, _ = make_step("sum", s["sizes"], s["batches"], mpi, bucket_mb)
    step_b, model_b, _ = make_step("ddp", s["sizes"], s["batches"], mpi, bucket_mb)
    for _ in range(steps):
        step_a()
        step_b()
    diff = max((p - q).abs().max().item() for p, q in zip(model_a.parameters(), model_b.parameters()))
    return mpi.mpi_comm.allreduce(diff, op=MPI.MAX)


def summarize(s):
    """One result row: medians in ms, overheads, ratios, noise, the check."""
    med = {v: statistics.median(s["samples"][v]) * 1e3 for v in VARIANTS}
    noise = max((max(t) - min(t)) * 1e3 / med[v] for v, t in s["samples"].items())
    return dict(model=s["model"], layers="-".join(map(str, s["sizes"])), params=s["params"],
               distml_buckets=s["buckets"], **{f"{v}_ms": med[v] for v in VARIANTS},
               **{f"{v}_overhead_ms": med[v] - med["local"] for v in ("sum", "average", "ddp")},
               sum_over_ddp=med["sum"] / med["ddp"], average_over_ddp=med["average"] / med["ddp"],
               noise_pct=100 * noise, max_abs_diff=s["max_abs_diff"],
               **{f"{v}_steps_per_block": s["steps"][v] for v in VARIANTS})


def print_table(rows):
    print("# ms per training step (medians); overhead = step - local (compute-only) step;"
          " ratio < 1: distml faster than DDP")
    print(f"{'model':>6} {'params':>11} {'local':>7} {'sum':>7} {'average':>7} {'ddp':>7}"
          f" {'sum/ddp':>7} {'avg/ddp':>7} {'ovh sum':>7} {'ovh avg':>7} {'ovh ddp':>7}"
          f" {'noise%':>6} {'max|diff|':>9}")
    for r in rows:
        print(f"{r['model']:>6} {r['params']:>11,} {r['local_ms']:>7.2f} {r['sum_ms']:>7.2f}"
              f" {r['average_ms']:>7.2f} {r['ddp_ms']:>7.2f} {r['sum_over_ddp']:>7.2f}"
              f" {r['average_over_ddp']:>7.2f} {r['sum_overhead_ms']:>7.2f}"
              f" {r['average_overhead_ms']:>7.2f} {r['ddp_overhead_ms']:>7.2f}"
              f" {r['noise_pct']:>6.1f} {r['max_abs_diff']:>9.1e}")


def write_csv(rows, path):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="") as f:
        out = csv.DictWriter(f, fieldnames=list(rows[0]))
        out.writeheader()
        for row in rows:
            out.writerow({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in row.items()})


def write_png(rows, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig, axes = plt.subplots(1, len(rows), figsize=(3.2 * len(rows), 4), squeeze=False)
    labels = ("distml sum", "distml avg", "DDP gloo", "local")
    for ax, r in zip(axes[0], rows):
        ax.bar(labels, [r[f"{v}_ms"] for v in VARIANTS], color=["C0", "C1", "C2", "C7"])
        ax.set_title(f"{r['model']} ({r['params']:,} params)", fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
    axes[0][0].set_ylabel("ms per training step (median)")
    fig.suptitle(title, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="small,mid,large", help=f"any of {','.join(MODELS)}")
    ap.add_argument("--batch-size", type=int, default=32, help="samples per rank per step")
    ap.add_argument("--repeats", type=int, default=5, help="timed blocks per (model, variant)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps per variant")
    ap.add_argument("--bucket-mb", type=float, default=25.0, help="distml's bucket size (DDP: 25)")
    ap.add_argument("--csv", default="results/bench_sync.csv")
    ap.add_argument("--png", default="results/bench_sync.png")
    args = ap.parse_args()
    if set(args.models.split(",")) - set(MODELS):
        ap.error(f"--models: choose from {','.join(MODELS)}")
    mpi = dcomm.world()
    torch.set_num_threads(default_threads(mpi))
    line = machine_line(mpi)  # before the run: the load average is other processes'
    init_gloo(mpi)
    try:
        setups = set_up(args.models.split(","), args.batch_size, args.warmup, mpi, args.bucket_mb)
        measure(setups, args.repeats, mpi)
        for s in setups:
            s["max_abs_diff"] = max_difference(s, mpi, args.bucket_mb)
    finally:
        dist.destroy_process_group()
    if mpi.is_root:
        rows = [summarize(s) for s in setups]
        print(f"{line} | batch {args.batch_size}/rank | distml bucket {args.bucket_mb:g} MB")
        print_table(rows)
        write_csv(rows, args.csv)
        write_png(rows, args.png, line.lstrip("# "))
        print(f"# load avg after {os.getloadavg()[0]:.2f}; wrote {args.csv} and {args.png}")
        if any(r["max_abs_diff"] > TOLERANCE for r in rows):
            raise SystemExit(f"bench_sync: distml and DDP weights differ by more than {TOLERANCE:g}")


if __name__ == "__main__":
    main()
