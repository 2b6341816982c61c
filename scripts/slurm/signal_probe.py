"""Which signals reach a rank: every rank reports what it gets, then runs on for SECONDS seconds.

    mpirun -n 2 python scripts/slurm/signal_probe.py 8 & sleep 3; kill -USR1 $!
    srun --mpi=pmix -n 2 python scripts/slurm/signal_probe.py 8 & sleep 3; kill -TERM $!

Each rank prints `rank R ready`, then `rank R got SIGxxx at T s` for each of TERM, USR1, USR2, INT
and HUP it receives, then `rank R finished` (a rank killed on the way never prints it). The lines
also go to $PROBE_LOG, because mpirun drops the output of ranks it kills, and there, once a signal
came, `rank R alive at T s` every 0.1 s: how long a rank lives on after a signal. See SIGNALS.md.
"""
import os
import signal
import sys
import time

from distml import comm

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT, signal.SIGHUP)


def main(seconds):
    rank, start = comm.world().rank, time.monotonic()

    def say(line, log_only=False):
        if not log_only:
            print(f"rank {rank} {line}", flush=True)
        if os.environ.get("PROBE_LOG"):
            with open(os.environ["PROBE_LOG"], "a") as log:
                log.write(f"rank {rank} {line}\n")

    def handler(number, frame):
        got.append(number)
        say(f"got {signal.Signals(number).name} at {time.monotonic() - start:.2f} s")

    got = []
    for number in SIGNALS:
        signal.signal(number, handler)
    say("ready")
    while time.monotonic() < start + seconds:
        time.sleep(0.1)
        if got:
            say(f"alive at {time.monotonic() - start:.2f} s", log_only=True)
    say("finished")


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 8.0)
