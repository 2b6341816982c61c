"""Bounded staleness for the parameter server, as pure bookkeeping (no MPI).

Staleness of an update = server version when it is applied minus the version
of the parameters it was computed from. A worker "released" at version u (sent
parameters of version u) computes one gradient from them. To keep every
staleness <= bound, the server

- releases a worker only while fewer than bound + 1 workers are in flight, and
- applies an arrived gradient at once unless that would push an older
  in-flight worker past the bound; then it holds the gradient until the
  older one has been applied.

Sorted by base version, in-flight workers satisfy version + k - base_k <= bound
(k = position); releasing (new last position) and applying the oldest keep it,
so the oldest gradient can always be applied: holding never deadlocks.
bound=None means no bound: arrival order, every worker always in flight.
"""
from collections import deque

__all__ = ["StalenessScheduler"]


class StalenessScheduler:
    def __init__(self, num_workers, bound=None):
        if bound is not None and bound < 0:
            raise ValueError(f"staleness bound must be >= 0 or None, got {bound}")
        self.bound = bound
        self.version = 0
        self.base = {}                              # in-flight worker -> version it computes from
        self.arrived = []                           # in-flight workers whose gradient is here
        self.waiting = deque(range(num_workers))    # workers ready for fresh parameters

    def release(self):
        """Workers to send the current parameters to now (each then computes one gradient)."""
        released = []
        while self.waiting and (self.bound is None or len(self.base) <= self.bound):
            worker = self.waiting.popleft()
            self.base[worker] = self.version
            released.append(worker)
        return released

    def arrive(self, worker):
        """Record that `worker`'s gradient has been received."""
        if worker not in self.base:
            raise ValueError(f"worker {worker} sent a gradient without being released")
        self.arrived.append(worker)

    def next_to_apply(self):
        """An arrived worker whose gradient may be applied now, or None (hold)."""
        for worker in self.arrived:
            if self._can_apply(worker):
                return worker
        return None

    def apply(self, worker, *, done=False):
        """Apply `worker`'s gradient; returns its staleness. `done`: it will send no more."""
        staleness = self.version - self.base.pop(worker)
        self.arrived.remove(worker)
        self.version += 1
        if not done:
            self.waiting.append(worker)
        return staleness

    def retire(self, worker):
        """`worker` was released but stops without a gradient (the budget is spent).

        Dropping an in-flight worker only loosens the bound on the others.
        """
        if worker not in self.base or worker in self.arrived:
            raise ValueError(f"worker {worker} is not computing")
        del self.base[worker]

    def _can_apply(self, worker):
        if self.bound is None:
            return True
        # Applying counts one more version against every strictly older in-flight worker
        # (ties: this one goes first, so workers of the same base are not affected).
        older = sorted(b for b in self.base.values() if b < self.base[worker])
        return all(self.version + 1 + k - b <= self.bound for k, b in enumerate(older))
