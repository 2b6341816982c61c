"""Does federated memory grow with the number of clients? Round time and peak RSS, 100 to 10,000 clients.

    python scripts/bench_federated_scale.py [--clients 100 1000 10000] [--ranks 2] [--repeats 3]
                                            [--algorithms fedavg fedprox scaffold]

`distml train --mode federated --clients C --clients-per-round 100` on a
synthetic set of 120,000 samples (64 features, 10 classes, 96,000 for
training), a 64-128-64-10 MLP, 2 local steps of batch 16 per client (the same
work per round whatever C), 20 rounds, evaluated (with every client's score)
after the last. Run through the CLI's own main() under mpirun, so that each
rank can report its peak RSS (ru_maxrss) and its RSS at the end (VmRSS, after
every round: what state kept across rounds adds). Round time: the median
round_time_s of the metrics file. Configurations interleaved; prints medians
over --repeats and writes results/bench_federated_scale.csv (every run).
FedAvg and FedProx keep no client state, so their memory should not grow
with C; SCAFFOLD keeps a control variate per client that has taken part.
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchlib import ENV, ROOT, write_csv

TASK = ["--dataset", "synthetic", "--samples", "120000", "--features", "64", "--classes", "10",
        "--hidden", "128,64", "--clients-per-round", "100", "--local-steps", "2", "--batch-size", "16",
        "--lr", "0.05", "--momentum", "0", "--rounds", "20", "--eval-every", "20", "--quiet"]


def child(argv):
    """Under mpirun: distml's CLI main(argv), then root prints every rank's peak and final RSS as JSON."""
    import resource
    from distml import comm
    from distml.cli import main
    code = main(argv)
    with open("/proc/self/status") as status:  # VmRSS: resident now (kB), after every round
        now = next(int(line.split()[1]) for line in status if line.startswith("VmRSS"))
    rss = comm.world().allgather_object((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, now / 1024))
    if comm.world().is_root:
        print(json.dumps({"code": code, "rss_mib": [r for r, _ in rss], "end_rss_mib": [e for _, e in rss]}))


def one_run(ranks, clients, algorithm, metrics):
    """(median round time s, peak RSS MiB over the ranks, wall time s) of one run."""
    flags = ["train", *TASK, "--mode", "federated", "--clients", clients, "--algorithm", algorithm,
             "--metrics", metrics]
    command = [Path(sys.executable).parent / "mpirun", "-n", ranks, sys.executable, __file__, "--child", *flags]
    done = subprocess.run(list(map(str, command)), env=ENV, check=True, capture_output=True, text=True,
                          timeout=600)
    out = json.loads(done.stdout.strip().splitlines()[-1])
    if out["code"] != 0:
        raise RuntimeError(f"distml train exited {out['code']}: {done.stderr}")
    records = [json.loads(line) for line in Path(metrics).read_text().splitlines()]
    Path(metrics).unlink()
    summary = records[-1]
    return {"round_s": statistics.median(r["round_time_s"] for r in records if "round_time_s" in r),
            "rss_mib": max(out["rss_mib"]), "end_rss_mib": max(out["end_rss_mib"]), "wall_s": summary["wall_time_s"],
            "test_accuracy": summary.get("test_accuracy")}


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--algorithms", nargs="+", default=["fedavg", "fedprox", "scaffold"])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    configs = [(a, c) for a in args.algorithms for c in args.clients]
    runs = []
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(args.repeats):
            shift = repeat % len(configs)
            for algorithm, clients in configs[shift:] + configs[:shift]:
                result = one_run(args.ranks, clients, algorithm, Path(scratch) / "m.jsonl")
                runs.append({"algorithm": algorithm, "clients": clients, "ranks": args.ranks,
                             "repeat": repeat, **result})
                print(f"  {algorithm} {clients}: {result}", file=sys.stderr, flush=True)
    write_csv(runs, ROOT / "results" / "bench_federated_scale.csv")
    print(f"\nfederated, 100 clients a round, {args.ranks} ranks (median of {args.repeats})")
    print("| algorithm | clients | round time, ms (min) | peak RSS per rank, MiB | RSS at the end, MiB | wall time, s |")
    print("|---|---|---|---|---|---|")
    for algorithm, clients in configs:
        mine = [r for r in runs if (r["algorithm"], r["clients"]) == (algorithm, clients)]
        med = {k: statistics.median(r[k] for r in mine) for k in ("round_s", "rss_mib", "end_rss_mib", "wall_s")}
        print(f"| {algorithm} | {clients:,} | {1000 * med['round_s']:.0f} ({1000 * min(r['round_s'] for r in mine):.0f}) | "
              f"{med['rss_mib']:,.0f} | {med['end_rss_mib']:,.1f} | {med['wall_s']:.1f} |")


if __name__ == "__main__":
    sys.exit(main())
