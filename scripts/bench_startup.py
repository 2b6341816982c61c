"""Does start-up grow with the file, or only with the shard a rank reads? Set-up time on big .npz files.

    python scripts/bench_startup.py [--gb 1 4] [--ranks 2] [--repeats 3] [--old main] [--cache cold warm]

Writes one uncompressed .npz per size (float32 X of 784 features, int64 y, a
small X_test/y_test, so X stays memory-mapped) under --dir, then times
`distml train --dataset FILE --model logreg` on --ranks ranks from entering
trainer.run to the first unit of work (a rank raises there: the set-up phase
only), for this tree (new) and, with --old REF, the tree of git REF (old, from
`git archive`), in the same invocation, configurations interleaved. The
reference "read shard" is each rank reading its own block of X's bytes with
plain file reads, all ranks at once: what reading one shard costs.

cold: the file is evicted from the page cache (posix_fadvise DONTNEED) before
each run; warm: it is read whole first. The clock starts after the imports
every launch pays whatever the data (mpi4py and MPI_Init, about 1.1 s here;
torch's optimizer module pulling in torch._dynamo, about 1.8 s). Peak RSS is ru_maxrss, the largest
over the ranks (a memory map's pages a rank touched count in it). Prints
medians over --repeats and writes results/bench_startup.csv (every run).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchlib import ENV, ROOT, write_csv

FEATURES = 784


def write_npz(path, gb, seed=0):
    """An uncompressed .npz of about `gb` GiB: float32 X (n x 784), int64 y, 1000 test rows; its n.

    A file left by an earlier --keep run is used as it is."""
    n = int(gb * 2**30) // (FEATURES * 4 + 8)
    if path.exists():
        return n
    X = np.empty((n, FEATURES), dtype=np.float32)
    gen = np.random.default_rng(seed)
    for start in range(0, n, 65536):
        X[start:start + 65536] = gen.standard_normal((min(65536, n - start), FEATURES), dtype=np.float32)
    y = np.arange(n, dtype=np.int64) % 10
    np.savez(path, X=X, y=y, X_test=X[:1000], y_test=y[:1000])
    return n


def set_cache(path, cache):
    """Evict `path` from the page cache (cold) or read it whole into it (warm)."""
    with open(path, "rb") as f:
        if cache == "cold":
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        else:
            while f.read(64 << 20):
                pass


def child(args):
    """Under mpirun: the set-up phase of one run (or the shard read); root prints one JSON line."""
    import resource
    from distml import comm
    world = comm.world()
    if args.what == "read":
        seconds = read_shard(args.file, world.rank, world.size)
    else:
        seconds = setup_seconds(args.file)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB
    everyone = world.allgather_object((seconds, rss))
    if world.is_root:
        print(json.dumps({"seconds": max(s for s, _ in everyone), "rss_mib": max(r for _, r in everyone)}))


def setup_seconds(path):
    """Seconds from entering trainer.run until the first unit of work, after the imports every run pays."""
    import torch
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)  # imports torch._dynamo: 1.8 s, data or not
    from distml.config import Config
    from distml.strategies import STRATEGIES
    from distml.trainer import run

    class FirstUnit(Exception):
        pass

    def first_unit(self, *args, **kwargs):
        raise FirstUnit  # every rank raises here, before the first collective of training

    STRATEGIES["sync"].run_unit = first_unit
    start = time.perf_counter()
    try:
        run(Config(dataset=str(path), model="logreg", epochs=1, quiet=True))
    except FirstUnit:
        return time.perf_counter() - start
    raise RuntimeError("training started without calling run_unit")


def read_shard(path, rank, size):
    """Seconds to read this rank's block of X's bytes (plain reads, 16 MiB at a time)."""
    from distml.data.arrays import _map_npz, rows_of
    X = _map_npz(path)["X"]
    rows = rows_of(len(X), rank, size)
    row_bytes = X.itemsize * FEATURES
    buffer = bytearray(16 << 20)
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        f.seek(X.offset + rows.start * row_bytes)
        left = len(rows) * row_bytes
        while left > 0:
            left -= f.readinto(memoryview(buffer)[:min(len(buffer), left)])
    return time.perf_counter() - start


def launch(tree, what, path, ranks):
    """One mpirun of this script's child with `tree` on PYTHONPATH; its JSON line."""
    command = [Path(sys.executable).parent / "mpirun", "-n", ranks, sys.executable, __file__,
               "--child", what, "--file", path]
    done = subprocess.run(list(map(str, command)), env={**ENV, "PYTHONPATH": str(tree)}, check=True,
                          capture_output=True, text=True, timeout=600)
    return json.loads(done.stdout.strip().splitlines()[-1])


def old_tree(ref, where):
    """The distml package of git `ref`, unpacked under `where`."""
    archive = subprocess.run(["git", "-C", ROOT, "archive", ref, "distml"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", where], input=archive, check=True)
    return where


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, nargs="+", default=[1, 4])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--old", default=None, help="git ref of the code to compare with (e.g. main)")
    parser.add_argument("--cache", nargs="+", default=["cold", "warm"], choices=["cold", "warm"])
    parser.add_argument("--dir", default=tempfile.gettempdir())
    parser.add_argument("--keep", action="store_true", help="keep the written files (default: delete)")
    parser.add_argument("--child", choices=["setup", "read"], help=argparse.SUPPRESS)
    parser.add_argument("--what", help=argparse.SUPPRESS)
    parser.add_argument("--file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.what = args.child
        return child(args)
    with tempfile.TemporaryDirectory() as scratch:
        trees = {"new": ROOT, **({"old": old_tree(args.old, scratch)} if args.old else {})}
        files = {}
        for gb in args.gb:
            files[gb] = Path(args.dir) / f"distml-startup-{gb:g}gb.npz"
            files[gb] = (files[gb], write_npz(files[gb], gb))
        try:
            runs = measure(args, trees, files)
        finally:
            for path, _ in files.values():
                if not args.keep:
                    path.unlink(missing_ok=True)
    write_csv(runs, ROOT / "results" / "bench_startup.csv")
    print_table(runs, args)


def measure(args, trees, files):
    """Every run, configurations interleaved (the order rotates each repeat)."""
    configs = [(gb, cache, name) for gb in args.gb for cache in args.cache for name in [*trees, "read shard"]]
    runs = []
    for repeat in range(args.repeats):
        shift = repeat % len(configs)
        for gb, cache, name in configs[shift:] + configs[:shift]:
            path, rows = files[gb]
            set_cache(path, cache)
            result = launch(ROOT, "read", path, args.ranks) if name == "read shard" else \
                launch(trees[name], "setup", path, args.ranks)
            runs.append({"gb": gb, "rows": rows, "file_bytes": path.stat().st_size, "ranks": args.ranks,
                         "cache": cache, "code": name, "repeat": repeat, **result})
            print(f"  {gb:g} GiB {cache} {name:>10}: {result['seconds']:.3f} s, {result['rss_mib']:.0f} MiB",
                  file=sys.stderr, flush=True)
    return runs


def print_table(runs, args):
    names = sorted({r["code"] for r in runs}, key=["old", "new", "read shard"].index)
    print(f"\nset-up phase on {args.ranks} ranks (s, median of {args.repeats}; slowest rank) and peak RSS (MiB)")
    print("| file | cache | " + " | ".join(f"{n} s" for n in names) + " | " +
          " | ".join(f"{n} RSS" for n in names if n != "read shard") + " |")
    print("|---|---|" + "---|" * (2 * len(names) - 1))
    for gb in args.gb:
        for cache in args.cache:
            mine = [r for r in runs if r["gb"] == gb and r["cache"] == cache]
            med = {n: statistics.median(r["seconds"] for r in mine if r["code"] == n) for n in names}
            rss = {n: statistics.median(r["rss_mib"] for r in mine if r["code"] == n) for n in names}
            print(f"| {gb:g} GiB | {cache} | " + " | ".join(f"{med[n]:.2f}" for n in names) + " | " +
                  " | ".join(f"{rss[n]:,.0f}" for n in names if n != "read shard") + " |")


if __name__ == "__main__":
    sys.exit(main())
