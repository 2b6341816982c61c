"""A watchdog thread that ends the job when a rank waits too long for its peers.

The parameter server waits for gradients in a blocking MPI call (no polling,
so it leaves the cores to the workers). If the workers fall silent (a hung
rank, a lost node), that call would never return: this thread notices and
aborts the whole job with a message naming who is silent.
"""
import sys
import threading
import time

__all__ = ["Watchdog"]


class Watchdog:
    def __init__(self, comm, timeout, waiting_for, role, *, suspects=None):
        """`suspects()`, if given, names the ranks to blame more precisely than `waiting_for`
        (e.g. only the workers the server is waiting on, not those it holds back)."""
        self.comm, self.timeout, self.role = comm, timeout, role
        self.waiting_for = set(waiting_for)
        self.suspects = suspects
        self.last = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="distml-watchdog", daemon=True)
        self._thread.start()

    def heard_from(self, rank, *, finished=False):
        self.last = time.monotonic()
        if finished:
            self.waiting_for.discard(rank)

    def stop(self):
        self._stop.set()
        self._thread.join()

    def _watch(self):
        while not self._stop.wait(min(1.0, self.timeout / 4)):
            silent = time.monotonic() - self.last
            if silent > self.timeout:
                ranks = ", ".join(map(str, sorted(self.suspects() if self.suspects else self.waiting_for)))
                print(f"distml: rank {self.comm.rank} ({self.role}) heard nothing from rank(s) {ranks} "
                      f"for {silent:.0f} s (--timeout {self.timeout:g}); aborting all ranks",
                      file=sys.stderr, flush=True)
                self.comm.abort(1)
