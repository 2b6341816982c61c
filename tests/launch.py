"""Run the real CLI as a user would: `mpirun -n N python -m distml ...`, with a timeout."""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MPI_ENV = {
    "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "PRTE_MCA_rmaps_default_mapping_policy": ":oversubscribe",  # more ranks than cores
    "OMPI_MCA_rmaps_base_oversubscribe": "1",                   # the same for Open MPI 4
    # Open MPI's libfabric transport finds no fabric on one node and gives up after ~1 s in every rank's
    # MPI_Init; without it each launch starts 1 s sooner, with the same transports (self, sm, tcp).
    "OMPI_MCA_btl": os.environ.get("OMPI_MCA_btl", "^ofi"),
}


def mpirun_path():
    beside_python = Path(sys.executable).parent / "mpirun"
    return str(beside_python) if beside_python.exists() else shutil.which("mpirun")


def launch(n, *args, timeout=120, cwd=None, env=None, mpirun_args=()):
    """CompletedProcess of `distml args` on n ranks (n=0: plain python, no mpirun).

    env: more environment variables; mpirun_args: e.g. ("--with-ft", "ulfm").
    """
    return launch_python(n, "-m", "distml", *args, timeout=timeout, cwd=cwd, env=env, mpirun_args=mpirun_args)


def launch_python(n, *args, timeout=120, cwd=None, env=None, mpirun_args=()):
    """CompletedProcess of `python args` on n ranks (n=0: no mpirun)."""
    command = [sys.executable, *map(str, args)]
    if n:
        command = [mpirun_path(), *mpirun_args, "-n", str(n), *command]
    return _run(command, timeout, cwd, env)


def launch_mpmd(*per_rank_args, timeout=120, cwd=None):
    """CompletedProcess of one MPI job whose rank i runs `distml per_rank_args[i]` (MPMD)."""
    apps = [["-n", "1", sys.executable, "-m", "distml", *map(str, args)] for args in per_rank_args]
    command = [mpirun_path(), *apps[0]]
    for app in apps[1:]:
        command += [":", *app]  # mpirun A : B  runs A as rank 0 and B as rank 1
    return _run(command, timeout, cwd)


def start(n, *args, cwd=None):
    """A running `distml args` on n ranks (n=0: plain python), in a session of its own; see finish()."""
    return start_python(n, "-m", "distml", *args, cwd=cwd)


def start_python(n, *args, cwd=None):
    """A running `python args` on n ranks (n=0: no mpirun), in a session of its own; see finish()."""
    command = [sys.executable, *map(str, args)]
    if n:
        command = [mpirun_path(), "-n", str(n), *command]
    env = {**os.environ, **MPI_ENV, "PYTHONPATH": str(ROOT)}
    # A session of its own, so a timeout kills mpirun *and* every rank, leaving no orphans.
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=cwd, env=env, start_new_session=True)


def finish(proc, timeout=120):
    """CompletedProcess of a process from start(), killing its whole session after `timeout` s."""
    with proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _run(command, timeout, cwd, extra_env=None):
    env = {**os.environ, **MPI_ENV, "PYTHONPATH": str(ROOT), **(extra_env or {})}
    # A session of its own, so a timeout kills mpirun *and* every rank, leaving no orphans.
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=cwd, env=env, start_new_session=True)
    return finish(proc, timeout)


def summary(metrics_path):
    """The last (summary) object of a metrics JSON-lines file."""
    lines = Path(metrics_path).read_text().splitlines()
    return json.loads(lines[-1])
