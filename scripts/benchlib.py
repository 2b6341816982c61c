"""What the benchmark scripts share: the real CLI under mpirun, and CSV output.

Not a benchmark itself; the scripts beside it import it (their directory is
on sys.path when run as `python scripts/NAME.py`).
"""
import csv
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
       "PRTE_MCA_rmaps_default_mapping_policy": ":oversubscribe", "PYTHONPATH": str(ROOT)}


def train_records(ranks, flags, metrics, env=None):
    """The JSON records (per epoch or round, then the summary) of
    `mpirun -n ranks python -m distml train --quiet --metrics METRICS flags`."""
    command = [Path(sys.executable).parent / "mpirun", "-n", ranks, sys.executable, "-m", "distml", "train",
               "--quiet", "--metrics", metrics, *flags]
    subprocess.run(list(map(str, command)), check=True, env={**ENV, **(env or {})}, timeout=600,
                   capture_output=True)
    return [json.loads(line) for line in Path(metrics).read_text().splitlines()]


def write_csv(rows, path, fieldnames=None):
    """rows (dicts) as CSV at path, columns `fieldnames` or the first row's keys."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="") as f:
        out = csv.DictWriter(f, fieldnames=fieldnames or list(rows[0]))
        out.writeheader()
        out.writerows(rows)


def spread(values, fmt):
    """'median (min to max)' of `values`, each formatted with `fmt` (e.g. "{:.4f}")."""
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))} to {fmt.format(max(values))})"
