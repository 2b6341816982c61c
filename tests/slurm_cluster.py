"""A throw-away single-node SLURM cluster for the tests (the `slurm_cluster` fixture in conftest.py).

    python tests/slurm_cluster.py up /tmp/slurm      # by hand, for experiments
    python tests/slurm_cluster.py down /tmp/slurm

Debian, as root: apt-get installs slurmctld, slurmd, slurm-client, munge and libpmix2 (about 4 MB).
There is no systemd here, so the daemons are started by hand and stopped by their pid files, never by
name. Where a cluster with an idle node already answers `sinfo`, it is used as it is and left alone.
See /work/shared/notes/slurm.md for the measurements behind each setting and trap.
"""
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["Cluster", "Unavailable", "idle_nodes", "run"]

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge", "libpmix2"]
PROGRAMS = ["slurmctld", "slurmd", "sinfo", "sbatch", "srun", "scontrol", "munged"]
CONF = Path("/etc/slurm/slurm.conf")  # Debian's default: sinfo/sbatch/srun need no SLURM_CONF
PMIX_LIB = Path("/usr/lib/x86_64-linux-gnu/pmix2/lib")
MUNGE_RUN = Path("/run/munge")


class Unavailable(Exception):
    """No cluster can be had here; the message says why (the tests are skipped with it)."""


def run(command, timeout=30, check=False, **kwargs):
    """subprocess.run with a timeout and captured text output (a hung client never hangs the tests)."""
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=check, **kwargs)


def idle_nodes():
    """Names of the idle nodes `sinfo` reports; [] where there is no sinfo or no controller answers."""
    if not shutil.which("sinfo"):
        return []
    try:
        done = run(["sinfo", "-h", "-t", "idle", "-o", "%n"], timeout=5)
    except subprocess.TimeoutExpired:
        return []
    return done.stdout.split() if done.returncode == 0 else []


class Cluster:
    """munged + slurmctld + slurmd on this host, with their state, logs and pid files under `state`."""

    def __init__(self, state):
        self.state = Path(state)
        self.started = []  # (pid file, program) of each daemon this object started
        self.own_conf = False
        self.saved_conf = None

    # -- up -----------------------------------------------------------------
    def up(self, timeout=30):
        """Start a cluster unless an idle one already answers; raises Unavailable with the reason."""
        if idle_nodes():
            return self
        _check_platform()
        _install()
        self.state.mkdir(parents=True, exist_ok=True)
        _fix_traps()
        self._start_munged()
        self._write_conf()
        self._start(["slurmctld", "-c"], "slurmctld.pid")  # -c: clean state, job ids start at 1
        self._start(["slurmd"], "slurmd.pid")
        self._wait_idle(timeout)
        return self

    def _start_munged(self):
        if _munge_works():  # a munged that already runs is shared, and left running
            return
        MUNGE_RUN.mkdir(mode=0o755, exist_ok=True)
        shutil.chown(MUNGE_RUN, "munge", "munge")
        done = run(["runuser", "-u", "munge", "--", "munged", f"--pid-file={MUNGE_RUN}/munged.pid"])
        if done.returncode != 0:
            raise Unavailable(f"munged did not start: {done.stderr.strip()}")
        self.started.append((MUNGE_RUN / "munged.pid", "munged"))

    def _write_conf(self):
        if CONF.exists():
            self.saved_conf = CONF.read_text()
        CONF.parent.mkdir(parents=True, exist_ok=True)
        CONF.write_text(slurm_conf(self.state, socket.gethostname().split(".")[0], os.cpu_count() or 1))
        self.own_conf = True

    def _start(self, command, pid_name):
        """Start a daemon (it forks and writes its pid file); raises Unavailable with its log."""
        pid_file = self.state / pid_name
        done = run(command)
        if done.returncode != 0 or not _wait_for(pid_file.exists, 10):
            log = self.log_tail(command[0])
            raise Unavailable(f"{command[0]} did not start: {done.stderr.strip()} {log}")
        self.started.append((pid_file, command[0]))

    def _wait_idle(self, timeout):
        if not _wait_for(idle_nodes, timeout):
            state = _quietly(["sinfo", "-N", "-o", "%N %T %E"]).strip()
            raise Unavailable(f"the node is not idle after {timeout} s: {state} {self.log_tail('slurmd')}")

    def log_tail(self, daemon, lines=5):
        log = self.state / f"{daemon}.log"
        return " | ".join(log.read_text().splitlines()[-lines:]) if log.exists() else ""

    # -- down ---------------------------------------------------------------
    def down(self):
        """Cancel every job, stop the daemons this object started (by pid file), restore the config."""
        if any(program.startswith("slurm") for _, program in self.started):
            _quietly(["scancel", "--full", "--user", "root"])
            _wait_for(lambda: not _quietly(["squeue", "-h", "-o", "%i"]).strip(), 10)
            _quietly(["scontrol", "shutdown"])  # ends slurmctld and slurmd sooner than SIGTERM (5 s)
        _stop([_read_pid(*started) for started in self.started])  # munged, slurmctld: 2 s each, together
        self.started = []
        if self.own_conf:
            CONF.write_text(self.saved_conf) if self.saved_conf is not None else CONF.unlink(missing_ok=True)
            self.own_conf = False


def slurm_conf(state, host, cpus):
    """slurm.conf for one node, as root, without accounting; every file under `state`."""
    return "\n".join([
        "ClusterName=distml-test", f"SlurmctldHost={host}",
        "AuthType=auth/munge", "CredType=cred/munge",
        "AuthInfo=cred_expire=5",  # a requeued job waits this long to start again: 5 s, the least (not 120)
        "SlurmUser=root", "SlurmdUser=root",
        f"StateSaveLocation={state}/ctld", f"SlurmdSpoolDir={state}/d",
        f"SlurmctldPidFile={state}/slurmctld.pid", f"SlurmdPidFile={state}/slurmd.pid",
        f"SlurmctldLogFile={state}/slurmctld.log", f"SlurmdLogFile={state}/slurmd.log",
        "ProctrackType=proctrack/linuxproc",  # pgid lets Open MPI 5 ranks escape; cgroup drained the node
        "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "MpiDefault=none", "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
        "SchedulerParameters=sched_interval=1", "MessageTimeout=10", "KillWait=5",
        "ReturnToService=2", "MinJobAge=300",  # finished jobs stay in `scontrol show job` for 5 min
        f"NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN",
        f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP",
        ""])


def _check_platform():
    if os.geteuid() != 0:
        raise Unavailable("not root (the cluster is installed with apt-get and runs its daemons as root)")
    if not Path("/etc/debian_version").exists() or not shutil.which("apt-get"):
        raise Unavailable("not Debian (no /etc/debian_version or apt-get)")


def _install(timeout=60):
    """apt-get install PACKAGES (about 4 s), after an `apt-get update` only where the lists lack them."""
    if all(shutil.which(p) for p in PROGRAMS) and PMIX_LIB.joinpath("libpmix.so.2").exists():
        return
    command = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        done = run(command, timeout=timeout, env=env)
        if done.returncode != 0 and "Unable to locate package" in done.stderr:  # no package lists yet
            run(["apt-get", "update", "-q"], timeout=timeout, env=env)
            done = run(command, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        raise Unavailable(f"`{' '.join(e.cmd)}` took over {timeout} s") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise Unavailable(f"apt-get install failed: {last}")


def _fix_traps():
    """What systemd and libpmix-dev would have done, and a resolvable short host name."""
    link = PMIX_LIB / "libpmix.so"  # slurm's mpi_pmix_v4.so dlopens it; only libpmix-dev ships it
    if not link.is_symlink() and not link.exists():  # one left by an earlier run may dangle until now
        link.symlink_to("libpmix.so.2")
    host = socket.gethostname().split(".")[0]
    try:
        socket.gethostbyname(host)
    except OSError:
        with open("/etc/hosts", "a") as hosts:
            hosts.write(f"127.0.0.1 {host}\n")


def _munge_works():
    if not shutil.which("munge"):
        return False
    try:
        return run(["sh", "-c", "munge -n | unmunge"], timeout=5).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def _read_pid(pid_file, program):
    """The pid in `pid_file` if that process still runs `program` (a stale file's pid may be reused)."""
    try:
        pid = int(Path(pid_file).read_text().split()[0])
        return pid if program in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace") else None
    except (OSError, ValueError, IndexError):
        return None


def _stop(pids, timeout=10):
    """SIGTERM each of `pids` that still runs, wait for all, then SIGKILL those left after `timeout` s."""
    for sig, wait in ((15, timeout), (9, 2)):
        running = [pid for pid in pids if pid and _alive(pid)]
        for pid in running:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        _wait_for(lambda: not any(_alive(pid) for pid in running), wait)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _quietly(command):
    try:
        return run(command, timeout=15).stdout
    except (subprocess.TimeoutExpired, OSError):
        return ""


def _wait_for(condition, timeout, every=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(every)
    return bool(condition())


if __name__ == "__main__":
    what, state = sys.argv[1], Path(sys.argv[2])
    cluster = Cluster(state)
    if what == "up":
        cluster.up()
        (state / "started").write_text("\n".join(f"{f} {p}" for f, p in cluster.started))
        print("idle:", idle_nodes())
    else:
        cluster.started = [line.split() for line in (state / "started").read_text().splitlines()]
        cluster.own_conf = True
        cluster.down()
