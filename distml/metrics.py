"""What the root rank tells the user: progress bar, epoch lines, JSON-lines metrics.

Only the root writes; on other ranks every method is a no-op. Each record is
appended to the metrics file as one JSON line and flushed to the operating
system; the file is made durable (fsync) at every checkpoint and at the end.
A fresh run starts the file anew; a resumed run cuts it back to what the
checkpoint had seen, so records between that checkpoint and a crash do not
appear twice.
"""
import json
import math
import os
import sys
import time

from tqdm import tqdm

__all__ = ["Reporter", "Timer"]


class Timer:
    """Wall-clock seconds since creation (perf_counter)."""

    def __init__(self):
        self.start = time.perf_counter()

    def elapsed(self):
        return time.perf_counter() - self.start


class _NoBar:
    def update(self, n=1):
        pass

    def close(self):
        pass


class Reporter:
    def __init__(self, *, enabled, quiet=False, metrics_path=None):
        self.enabled = enabled
        self.quiet = quiet
        self.metrics_path = metrics_path
        self._file = None

    def progress(self, *, total, done=0, desc):
        """A tqdm bar on the root (when not quiet and on a terminal), else one that does nothing."""
        if not self.enabled or self.quiet:
            return _NoBar()
        # mpirun hands a rank's stdout a pseudo-terminal but its stderr a pipe: draw the bar on
        # whichever is a terminal, and not at all into logs and pipes.
        terminal = next((f for f in (sys.stderr, sys.stdout) if f.isatty()), None)
        if terminal is None:
            return _NoBar()
        return tqdm(total=total, initial=done, desc=desc, leave=False, file=terminal,
                    dynamic_ncols=True, mininterval=0.2)

    def say(self, line):
        if self.enabled and not self.quiet:
            tqdm.write(line, file=sys.stdout)  # above a bar that is being drawn, if any
            sys.stdout.flush()

    def warn(self, line):
        """One line on stderr from the root, even when quiet."""
        if self.enabled:
            print(line, file=sys.stderr, flush=True)

    def open_metrics(self, keep_bytes=0):
        """Start the metrics file: anew, or (resuming) cut back to its first `keep_bytes` bytes."""
        if not self.enabled or self.metrics_path is None:
            return
        self._file = open(self.metrics_path, "ab" if keep_bytes else "wb")
        if keep_bytes and self._file.tell() > keep_bytes:
            self._file.truncate(keep_bytes)
            self._file.seek(keep_bytes)

    def record(self, **fields):
        """Append one JSON object to the metrics file (root only)."""
        if self._file is None:
            return
        self._file.write((json.dumps(_finite(fields), allow_nan=False) + "\n").encode())
        self._file.flush()

    def bytes_written(self):
        return self._file.tell() if self._file is not None else 0

    def sync(self):
        """Make the records so far durable (at checkpoints and at the end)."""
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self):
        if self._file is not None:
            self.sync()
            self._file.close()
            self._file = None


def _finite(record):
    """NaN and infinities are not JSON: write them as null."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
