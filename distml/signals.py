"""Preemption: SIGTERM, SIGUSR1 and SIGUSR2 only set a flag.

The handler does nothing else (no I/O, no MPI), so a signal can never
interrupt a checkpoint being written or leave a rank half-way through a
collective. The trainer puts the flag into the communication of the next
step (a spare element of the gradient reduction, of the federated round's
reduction, or a bit of the parameter server's message tags), so all ranks
agree to stop at the same step boundary without a collective of their own;
then root writes a checkpoint and every rank exits with EX_TEMPFAIL (75).
"""
import signal
import threading

__all__ = ["EXIT_PREEMPTED", "STOP_SIGNALS", "StopFlag", "Preempted", "LoopStop", "LOOP_STOP"]

EXIT_PREEMPTED = 75  # EX_TEMPFAIL from sysexits.h: "try again later"; the batch scripts requeue on it
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class Preempted(Exception):
    """Raised on every rank after the agreed stop (and checkpoint); the CLI exits 75."""

    everywhere = True  # raised alike on every rank: one reports it (api.aborting_excepthook)

    def __init__(self, signal_name, where, checkpoint):
        what = f"wrote {checkpoint}" if checkpoint else "no --checkpoint-dir, so nothing was saved"
        super().__init__(f"stopped by {signal_name} at {where}: {what}")
        self.checkpoint = checkpoint


class StopFlag:
    """Catches the stop signals while active (a context manager); `requested` is the first one caught.

    Handlers can only be installed from the main thread; elsewhere (training
    started from a user's thread) the flag stays down and signals keep their
    usual effect.
    """

    def __init__(self, *, ignore_after=False):
        self.requested = None  # the name of the first stop signal caught, or None
        self.ignore_after = ignore_after  # the CLI: the process ends soon after; a late signal must not kill it
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._catch)
        return self

    def __exit__(self, *exc):
        """Put the previous handlers back; with `ignore_after` (the CLI), ignore stop signals instead.

        `scancel --full` and a batch script that forwards signals deliver a signal more than
        once, some late (measured: scripts/slurm/SIGNALS.md), and one may land after training
        ended: a USR1 with its default action would kill the rank on its way to its exit code.
        """
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_IGN if self.ignore_after else handler)
        self._previous.clear()

    def _catch(self, signum, frame):
        if self.requested is None:
            self.requested = signal.Signals(signum).name


class LoopStop:
    """The stop signals of a user's own loop (distml.stop_requested()).

    Caught from the first question on, for the rest of the process: a loop that
    never asks keeps the signals' usual effect. Each DistributedOptimizer
    reduction carries `caught()` from every rank and `record`s the sum, so
    `agreed` turns true on every rank after the same step; a question no
    reduction has answered since the last one asks the ranks itself.
    """

    def __init__(self):
        self.flag, self.agreed = None, False
        self.carried = 0  # reductions that carried `caught()` since the last question (equal on every rank)

    def listen(self):
        if self.flag is None:
            self.flag = StopFlag().__enter__()

    def caught(self):
        return self.flag is not None and self.flag.requested is not None

    def record(self, ranks_that_caught):
        self.agreed = self.agreed or ranks_that_caught > 0
        self.carried += 1


LOOP_STOP = LoopStop()
