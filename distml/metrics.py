"""What the root rank tells the user: progress bar, epoch lines, JSON-lines metrics.

Only the root writes; on other ranks every method is a no-op. The metrics file
is rewritten atomically after each record, so it is always complete JSON lines
and a crash never truncates it.
"""
import json
import math
import sys
import time

from tqdm import tqdm

from .checkpoint import atomic_write

__all__ = ["Reporter", "Timer"]


class Timer:
    """Wall-clock seconds since creation (perf_counter)."""

    def __init__(self):
        self.start = time.perf_counter()

    def elapsed(self):
        return time.perf_counter() - self.start


class Reporter:
    def __init__(self, *, enabled, quiet=False, metrics_path=None):
        self.enabled = enabled
        self.quiet = quiet
        self.metrics_path = metrics_path
        self.records = []

    def progress(self, iterable, *, total, desc):
        """Wrap `iterable` in a tqdm bar on the root (when not quiet); plain elsewhere."""
        if not self.enabled or self.quiet:
            return iterable
        # mpirun hands a rank's stdout a pseudo-terminal but its stderr a pipe: draw the bar on
        # whichever is a terminal, and not at all into logs and pipes.
        terminal = next((f for f in (sys.stderr, sys.stdout) if f.isatty()), None)
        if terminal is None:
            return iterable
        return tqdm(iterable, total=total, desc=desc, leave=False, file=terminal,
                    dynamic_ncols=True, mininterval=0.2)

    def say(self, line):
        if self.enabled and not self.quiet:
            tqdm.write(line, file=sys.stdout)  # above a bar that is being drawn, if any
            sys.stdout.flush()

    def record(self, **fields):
        """Append one JSON object to the metrics file (root only)."""
        if not self.enabled or self.metrics_path is None:
            return
        self.records.append(fields)
        text = "".join(json.dumps(_finite(r), allow_nan=False) + "\n" for r in self.records)
        atomic_write(self.metrics_path, lambda f: f.write(text.encode()))


def _finite(record):
    """NaN and infinities are not JSON: write them as null."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
