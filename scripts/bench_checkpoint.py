"""How long does writing (and reading back) a checkpoint take, by model size?

    python scripts/bench_checkpoint.py [--models small,mid,large] [--repeats 5] [--dir DIR]

Builds the MLPs of bench_sync.py (17k, 1M and 10.5M float32 parameters), takes
one SGD step with momentum 0.9 so the optimizer holds a momentum buffer per
parameter, and writes the checkpoint `distml train` writes for one rank
(model, optimizer state, a rank's torch generator, position, config) with
`write_checkpoint`: serialize, SHA-256, temporary file, fsync, rename,
directory fsync, prune to --keep 2. Then `read_checkpoint` (load the wrapper
weights-only, verify the checksum, load the payload). Prints medians (and
min-max) over --repeats writes into --dir (default: a temporary directory on
the file system of the current directory) and writes results/bench_checkpoint.csv.
"""
import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from bench_sync import MODELS, build_mlp
from benchlib import write_csv
from distml.checkpoint import Checkpoint, read_checkpoint, write_checkpoint


def one_rank_checkpoint(sizes, units):
    model = build_mlp(sizes)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    F.cross_entropy(model(torch.randn(8, sizes[0])), torch.randint(0, sizes[-1], (8,))).backward()
    optimizer.step()
    params = sum(p.numel() for p in model.parameters())
    return params, Checkpoint(
        mode="sync", world_size=1, config="{}", data="", model=model.state_dict(),
        strategy={"optimizer": optimizer.state_dict(), "epoch_loss": 0.0, "epoch_samples": 0},
        ranks=[{"torch_rng": torch.get_rng_state(), "buffers": []}],
        position={"epoch": 0, "step": units, "units": units, "elapsed_s": 0.0})


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="small,mid,large")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--csv", default="results/bench_checkpoint.csv")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir or ".") as where:
        for name in args.models.split(","):
            writes, reads, size = [], [], 0
            for units in range(1, args.repeats + 1):
                params, ckpt = one_rank_checkpoint(MODELS[name], units)
                start = time.perf_counter()
                path = write_checkpoint(ckpt, os.path.join(where, name), keep=2)
                writes.append(time.perf_counter() - start)
                size = os.path.getsize(path)
                start = time.perf_counter()
                read_checkpoint(path)
                reads.append(time.perf_counter() - start)
            rows.append({"model": name, "parameters": params, "file_mb": size / 1e6,
                         "write_ms": statistics.median(writes) * 1e3, "write_min_ms": min(writes) * 1e3,
                         "write_max_ms": max(writes) * 1e3, "write_mb_per_s": size / 1e6 / statistics.median(writes),
                         "read_ms": statistics.median(reads) * 1e3})
    print("| model | parameters | file MB | write ms (median) | min-max | MB/s | read + verify ms |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['parameters']:,} | {r['file_mb']:.1f} | {r['write_ms']:.1f} | "
              f"{r['write_min_ms']:.1f}-{r['write_max_ms']:.1f} | {r['write_mb_per_s']:.0f} | {r['read_ms']:.1f} |")
    write_csv(rows, args.csv)
    print(f"# {args.repeats} writes each into {os.path.abspath(args.dir or '.')}; torch {torch.__version__}; "
          f"wrote {args.csv}")


if __name__ == "__main__":
    main()
