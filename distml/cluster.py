"""What the launcher told this process: job, rank, size, node, CPUs per task; and requeueing a SLURM job.

    sbatch scripts/slurm/sync.sbatch                   # srun --mpi=pmix or mpirun inside the job
    srun --mpi=pmix -n 4 distml train                  # srun starts the ranks itself
    mpirun -n 4 distml info                            # the table of what each rank sees

Pure functions of an environment mapping (os.environ by default), so they are
tested with fake environments and need neither MPI nor SLURM. No mpi4py here:
only comm.py talks to MPI.

Whose variables win: the launcher that started this very process sets the
truest ones. Inside `sbatch`, mpirun's ranks inherit the batch shell's
SLURM_PROCID=0 and SLURM_LOCALID=0, so Open MPI's and Hydra's variables come
first; SLURM's rank variables count only inside a job step (SLURM_STEP_ID set,
as srun sets it), and the job-wide ones (job id, node name, CPUs per task)
are read whoever launched. (OMPI_COMM_WORLD_NODE_RANK is not the node's index
but the rank's index on its node, so the node id comes from srun only.)
"""
import os
import platform
import subprocess
from dataclasses import dataclass
from typing import Optional

__all__ = ["LaunchInfo", "launch_info", "cpus_per_task", "omp_num_threads", "default_threads", "requeue_job",
           "format_launch_table"]

# (launcher, rank, size, local rank, required marker): the first whose rank variable is set wins.
SOURCES = (
    ("openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", None),
    ("hydra", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALRANKID"),  # MPICH/Intel MPI mpiexec
    ("srun", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_STEP_ID"),
    ("pmi", "PMI_RANK", "PMI_SIZE", None, None),      # another PMI-1/2 process manager
    ("pmix", "PMIX_RANK", None, None, None),          # a PMIx server that is neither prte nor srun
)


@dataclass(frozen=True)
class LaunchInfo:
    """One process's view of its launch; None where the launcher does not say."""
    launcher: str  # openmpi, hydra, srun, pmi, pmix, sbatch (a job's shell, no step) or none
    rank: Optional[int] = 0
    size: Optional[int] = 1
    local_rank: Optional[int] = None
    node: Optional[str] = None
    node_id: Optional[int] = None
    job_id: Optional[str] = None
    cpus_per_task: Optional[int] = None


def launch_info(env=os.environ):
    """This process's LaunchInfo, from the variables of whichever launcher started it."""
    job = {"job_id": env.get("SLURM_JOB_ID") or None, "cpus_per_task": cpus_per_task(env),
           "node": env.get("SLURMD_NODENAME") or platform.node() or None}
    for launcher, rank, size, local, marker in SOURCES:
        if _int(env, rank) is not None and (marker is None or marker in env):
            # SLURM_NODEID is the node's index in the job only where srun started the process
            node_id = _int(env, "SLURM_NODEID") if launcher == "srun" else None
            return LaunchInfo(launcher, _int(env, rank), _int(env, size), _int(env, local),
                              node_id=node_id, **job)
    if job["job_id"]:  # run straight from the batch script: one process, on the job's first node
        return LaunchInfo("sbatch", local_rank=0, node_id=_int(env, "SLURM_NODEID"), **job)
    return LaunchInfo("none", local_rank=0, **job)


def cpus_per_task(env=os.environ):
    """SLURM_CPUS_PER_TASK as an int (set by sbatch/srun --cpus-per-task), else None."""
    value = _int(env, "SLURM_CPUS_PER_TASK")
    return value if value and value > 0 else None


def requeue_job(env=os.environ, *, timeout=30.0):
    """On rank 0 of a SLURM job, `scontrol requeue $SLURM_JOB_ID`; returns (ok, message), never raises.

    scontrol may be missing where the job step runs in a container: the message
    then says so, and the batch script (on the host) has to requeue instead.
    """
    info = launch_info(env)
    if info.job_id is None:
        return False, "not a SLURM job (no SLURM_JOB_ID): nothing to requeue"
    if info.rank != 0:
        return False, f"rank {info.rank} does not requeue: rank 0 does"
    command = ["scontrol", "requeue", info.job_id]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=dict(env))
    except FileNotFoundError:
        return False, "scontrol not found (in a container?): the batch script must requeue the job"
    except subprocess.TimeoutExpired:
        return False, f"`{' '.join(command)}` gave no answer in {timeout:g} s"
    except OSError as e:
        return False, f"`{' '.join(command)}` could not run: {e}"
    if done.returncode != 0:
        return False, f"`{' '.join(command)}` failed: {(done.stderr or done.stdout).strip()}"
    return True, f"requeued SLURM job {info.job_id}"


def format_launch_table(infos, world_size):
    """Lines of a table of every rank's LaunchInfo (in MPI rank order), and a warning where the
    launcher's ranks are not MPI's: the sign of ranks started as singletons."""
    header = ("rank", "size", "local", "node", "node id", "job", "cpus/task", "launcher")
    rows = [header] + [tuple("-" if v is None else str(v) for v in
                             (i.rank, i.size, i.local_rank, i.node, i.node_id, i.job_id,
                              i.cpus_per_task, i.launcher)) for i in infos]
    widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in rows]
    mismatch = [r for r, i in enumerate(infos) if (i.rank, i.size) not in ((r, world_size), (r, None))]
    if mismatch:
        i = infos[mismatch[0]]
        lines.append(f"warning: MPI rank {mismatch[0]} of {world_size} was started by {i.launcher} as rank "
                     f"{i.rank} of {i.size}: the ranks are singletons, not one job (srun needs --mpi=pmix "
                     f"for Open MPI, --mpi=pmi2 for MPICH; see srun --mpi=list)")
    return lines


def _int(env, name):
    """env[name] as an int; None where it is unset or not a whole number."""
    try:
        return int(env[name]) if name else None
    except (KeyError, ValueError):
        return None


def omp_num_threads(env=os.environ):
    """OMP_NUM_THREADS as an int (its first value where it lists one per nesting level), else None."""
    value = env.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def default_threads(comm):
    """SLURM_CPUS_PER_TASK where SLURM set it, else OMP_NUM_THREADS where the user set it (as HPC
    job scripts do for hybrid runs, and as the emulated cluster does for hosts sharing a machine's
    cores), else the cores of this node divided by the ranks on it; within this rank's CPU set (>= 1).

    A collective (it counts the ranks on the node): call it on every rank.
    """
    on_node = comm.node_size()  # called on every rank, also where SLURM's answer makes it moot
    per_rank = cpus_per_task() or omp_num_threads() or (os.cpu_count() or 1) // on_node
    affinity = getattr(os, "sched_getaffinity", None)  # Linux only
    return max(1, min(per_rank, len(affinity(0)) if affinity else per_rank))
