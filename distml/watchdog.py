"""Watchdogs: the hang doctor for every mode, and the parameter server's silence alarm.

A stalled MPI job waits forever without a word. The hang doctor reads each
rank's `CallRecord` (comm.py) from a thread of its own. When a rank has waited
longer than `--watchdog` seconds inside one call:

- where the MPI library provides MPI_THREAD_MULTIPLE, its thread tells root's
  thread over a duplicated communicator (never the one training uses); root's
  asks every rank where it is, prints one report (each rank's call, or that it
  is computing, the ranks it cannot reach, and the call at which the ranks'
  sequences first differ) and aborts the job with exit 124. Reaching: when
  asked, every rank pings every other over the channel; a peer that does not
  answer within PROBE_S is unreachable (across hosts, a broken link or a
  partition: every rank then waits in the same call, so the calls alone could
  not tell where the job is stuck);
- otherwise it makes no MPI call from the thread: every rank that is stuck in
  a call, or has made none for the limit, prints its own line and ends its
  process (exit 124), which makes mpirun end the job.

Reading the record costs the training nothing but the record itself (a tuple
per call, measured in the README).
"""
import os
import sys
import threading
import time

from .comm import describe_call

__all__ = ["EXIT_STALLED", "HangDoctor", "Watchdog", "format_report", "first_difference", "abort_from_thread"]

EXIT_STALLED = 124  # like coreutils' timeout: the job was ended for waiting too long
TAG_STALL, TAG_QUERY, TAG_STATUS, TAG_PING, TAG_PONG = 1, 2, 3, 4, 5  # on the doctor's own communicator only
PROBE_S = 2.0  # how long a rank waits for the others to answer its ping before it calls them unreachable


def abort_from_thread(comm, code, channel=None):
    """End the job from a watchdog thread: MPI_Abort where MPI_THREAD_MULTIPLE allows it, else _exit.

    Without MPI_THREAD_MULTIPLE a second thread may not call MPI at all; a
    process that exits makes mpirun end the whole job just the same.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    if comm.size > 1 and comm.thread_multiple():
        (channel or comm.mpi_comm).Abort(code)
    os._exit(code)


class HangDoctor:
    """Watches this rank's call record; see the module docstring. A context manager; `restart()`
    after the communicator shrank (a collective, like the constructor)."""

    GRACE_S = 3.0  # without MPI_THREAD_MULTIPLE: from a rank's own report to its exit

    def __init__(self, comm, limit, setting="--watchdog"):
        self.comm, self.limit, self.setting = comm, limit, setting  # setting: its name in the report
        self._thread = None
        self.restart()

    def restart(self):
        self.stop()
        self.exchange = self.comm.size > 1 and self.comm.thread_multiple()
        self.channel = self.comm.duplicate() if self.exchange else None  # a collective
        self._stop, self._told, self._sends = threading.Event(), False, []
        self._thread = threading.Thread(target=self._watch, name="distml-hang-doctor", daemon=True)
        self._thread.start()

    def stop(self):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    # -- the thread -------------------------------------------------------------
    def _watch(self):
        tick = min(1.0, self.limit / 10)
        while not self._stop.wait(tick):
            try:
                if not self.exchange:
                    self._alone()
                    continue
                self._answer_pings()
                if self.comm.is_root:
                    self._as_root()
                else:
                    self._as_peer()
            except Exception:  # noqa: BLE001  (the channel broke: a rank died; the main thread reports that)
                return

    def status(self):
        """Where this rank is: its calls (the current one last) and for how long."""
        record, now = self.comm.calls, time.monotonic()
        current = record.current
        calls = [c[:4] for c in list(record.recent)] + ([current[:4]] if current else [])
        return {"rank": self.comm.members[self.comm.rank], "context": record.context, "calls": calls,
                "in_call": current is not None,
                "seconds": now - (current[4] if current else record.since)}

    def _stalled(self):
        record = self.comm.calls
        current = record.current
        return current is not None and not record.patient and time.monotonic() - current[4] > self.limit

    def _as_peer(self):
        if self._stalled() and not self._told:
            self.channel.send(None, dest=0, tag=TAG_STALL)
            self._told = True
        if self.channel.iprobe(source=0, tag=TAG_QUERY):
            self.channel.recv(source=0, tag=TAG_QUERY)
            unreached = self._probe()
            self.channel.send({**self.status(), "unreachable": unreached}, dest=0, tag=TAG_STATUS)

    def _answer_pings(self):
        """Answer every ping waiting for this rank (nonblocking: the answer to an unreachable rank never
        leaves), and let go of the sends that completed. Under ULFM a probe from any source raises
        once a rank has died: that is the main thread's to report, so this only stops answering."""
        from mpi4py import MPI
        probe = MPI.Status()
        try:
            self._sends = [request for request in self._sends if not request.Test()]
            while self.channel.iprobe(source=MPI.ANY_SOURCE, tag=TAG_PING, status=probe):
                source = probe.Get_source()
                self.channel.recv(source=source, tag=TAG_PING)
                self._sends.append(self.channel.isend(None, dest=source, tag=TAG_PONG))
        except MPI.Exception:
            return

    def _probe(self, collect=None):
        """Ping every other rank; the first-world numbers of those that did not answer within PROBE_S.

        collect(): called while waiting (root gathers the statuses meanwhile)."""
        from mpi4py import MPI
        others = [r for r in range(self.comm.size) if r != self.comm.rank]
        heard, deadline, probe = set(), time.monotonic() + PROBE_S, MPI.Status()
        try:
            self._sends += [self.channel.isend(None, dest=r, tag=TAG_PING) for r in others]
            while len(heard) < len(others) and time.monotonic() < deadline:
                self._answer_pings()  # the others ping this rank at the same time
                if collect:
                    collect()
                if self.channel.iprobe(source=MPI.ANY_SOURCE, tag=TAG_PONG, status=probe):
                    heard.add(probe.Get_source())
                    self.channel.recv(source=probe.Get_source(), tag=TAG_PONG)
                else:
                    time.sleep(0.02)
        except MPI.Exception:  # a dead rank (ULFM): those not heard from are named
            pass
        return [self.comm.members[r] for r in others if r not in heard]

    def _as_root(self):
        from mpi4py import MPI
        told = self.channel.iprobe(source=MPI.ANY_SOURCE, tag=TAG_STALL)
        if not (told or self._stalled()):
            return
        statuses = self._gather()
        print(format_report(statuses, self.comm.size, self.limit, self.comm.members, self.setting), file=sys.stderr,
              flush=True)
        abort_from_thread(self.comm, EXIT_STALLED, self.channel)

    def _gather(self, wait=PROBE_S + 3.0):
        """Every rank's status, asked for over the channel; a rank that does not answer in `wait` s is left out.
        Root pings the others meanwhile, as each of them does when asked."""
        from mpi4py import MPI
        self._sends += [self.channel.isend(None, dest=rank, tag=TAG_QUERY) for rank in range(1, self.comm.size)]
        statuses, deadline, probe = {0: self.status()}, time.monotonic() + wait, MPI.Status()

        def collect():
            while self.channel.iprobe(source=MPI.ANY_SOURCE, tag=TAG_STATUS, status=probe):
                statuses[probe.Get_source()] = self.channel.recv(source=probe.Get_source(), tag=TAG_STATUS)

        statuses[0]["unreachable"] = self._probe(collect)
        while len(statuses) < self.comm.size and time.monotonic() < deadline:
            self._answer_pings()
            collect()
            time.sleep(0.05)
        return statuses

    def _alone(self):
        """No MPI_THREAD_MULTIPLE: report this rank only, if it is stuck in a call or has made none for the limit."""
        status = self.status()
        if status["seconds"] <= self.limit or self.comm.calls.patient:
            return
        print(f"distml: watchdog: {_position(status)} ({self.setting} {self.limit:g}; without MPI_THREAD_MULTIPLE "
              f"each rank reports only itself); aborting (exit {EXIT_STALLED})", file=sys.stderr, flush=True)
        time.sleep(self.GRACE_S)  # the other stalled ranks reach the limit within a tick: let them print too
        abort_from_thread(self.comm, EXIT_STALLED)


# -- the report (pure functions, unit-tested) ---------------------------------------
def _position(status):
    """'rank 1 has waited 31 s in allreduce #57 (...)' or 'rank 1 has made no MPI call for 32 s (...)'."""
    rank, seconds, calls = status["rank"], status["seconds"], status["calls"]
    if status["in_call"]:
        return f"rank {rank} has waited {seconds:.0f} s in {describe_call(calls[-1] + (0,))}"
    last = f"; its last call was {describe_call(calls[-1] + (0,))}" if calls else ""
    return f"rank {rank} is in no MPI call: busy in {status['context']} for {seconds:.0f} s{last}"


def first_difference(statuses):
    """(seq, {rank: (op, where) or None}) at the first call the ranks' records disagree on, or None."""
    tables = {s["rank"]: {seq: (op, where) for seq, op, _, where in s["calls"]} for s in statuses}
    start = max((min(t) for t in tables.values() if t), default=1)  # older calls fell out of some record
    end = max((max(t) for t in tables.values() if t), default=0)
    for seq in range(start, end + 1):
        entries = {rank: t.get(seq) for rank, t in tables.items()}
        if len(set(entries.values())) > 1:
            return seq, entries
    return None


def format_report(statuses, size, limit, members=None, setting="--watchdog"):
    """The hang doctor's report: who waits where, who did not answer, where the calls first differ."""
    members = members or list(range(size))
    answered = sorted(statuses.values(), key=lambda s: s["rank"])
    lines = [f"distml: watchdog: a rank has waited over {limit:g} s in one MPI call ({setting}); where each "
             f"rank is:"]
    lines += [f"  {_position(s)}" for s in answered]
    known = {s["rank"] for s in answered}
    lines += [f"  rank {r} did not answer (dead, unreachable, or stuck outside Python)" for r in members
              if r not in known]
    lines += [f"  rank {s['rank']} cannot reach rank(s) {', '.join(map(str, s['unreachable']))} (no answer to a "
              f"ping in {PROBE_S:g} s: a broken link or a network partition between them)"
              for s in answered if s.get("unreachable")]
    difference = first_difference(answered)
    if difference:
        seq, entries = difference
        parts = [f"rank {r} entered {e[0]} ({e[1]})" if e else f"rank {r} has not entered it"
                 for r, e in sorted(entries.items())]
        lines.append(f"distml: watchdog: the ranks' calls first differ at #{seq}: " + "; ".join(parts))
    lines.append(f"distml: watchdog: aborting all ranks (exit {EXIT_STALLED})")
    return "\n".join(lines)


class Watchdog:
    """A parameter server's alarm: ends the job when no worker has been heard from for `timeout` s.

    The server waits for gradients in a blocking MPI call (no polling, so it
    leaves the cores to the workers). If the workers fall silent that call
    never returns: this thread names who is silent, `suspects()` (the ranks
    the server waits on at that moment), and ends the job.
    """

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
                abort_from_thread(self.comm, 1)
