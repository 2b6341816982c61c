"""A watchdog thread that ends the job when a rank waits too long for its peers.

The parameter server waits for gradients in a blocking MPI call (no polling,
so it leaves the cores to the workers). If the workers fall silent (a hung
rank, a lost node), that call would never return: this thread notices and
aborts the whole job with a message naming who is silent: `suspects()`, the
ranks the waiting rank is waiting on at that moment.
"""
import sys
import threading
import time

__all__ = ["Watchdog"]


class Watchdog:
    def __init__(self, comm, timeout, suspects, role):
        self.comm, self.timeout, self.suspects, self.role = comm, timeout, suspects, role
        self.last = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="distml-watchdog", daemon=True)
        self._thread.start()

    def heard_from(self):
        self.last = time.monotonic()

    def stop(self):
        self._stop.set()
        self._thread.join()

    def _watch(self):
        while not self._stop.wait(min(1.0, self.timeout / 4)):
            silent = time.monotonic() - self.last
            if silent > self.timeout:
                ranks = ", ".join(map(str, sorted(self.suspects())))
                print(f"distml: rank {self.comm.rank} ({self.role}) heard nothing from rank(s) {ranks} "
                      f"for {silent:.0f} s (--timeout {self.timeout:g}); aborting all ranks",
                      file=sys.stderr, flush=True)
                self.comm.abort(1)
