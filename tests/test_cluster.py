"""Unit tests for distml.cluster with fake environments (no SLURM, no MPI launcher needed).

The environments are trimmed copies of what each launcher really set inside a 2-task SLURM job
(sbatch -n 2 -c 1, Slurm 22.05, PyPI Open MPI 5.0.11), measured with `env` in every rank.
"""
import os
import platform
import stat

import pytest

from distml import cluster, trainer
from distml.cluster import LaunchInfo, cpus_per_task, format_launch_table, launch_info, requeue_job

BATCH_SHELL = {"SLURM_JOB_ID": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0",
               "SLURM_NODEID": "0", "SLURMD_NODENAME": "vm", "SLURM_CPUS_PER_TASK": "1"}
MPIRUN_RANK_1 = {**BATCH_SHELL,  # mpirun's ranks inherit the batch shell's SLURM_PROCID=0
                 "OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
                 "OMPI_COMM_WORLD_NODE_RANK": "1", "PMIX_RANK": "1", "PRTE_LAUNCHED": "1"}
SRUN_PMIX_RANK_1 = {**BATCH_SHELL, "SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0",
                    "SLURM_STEPID": "0", "PMIX_RANK": "1", "PMIX_NAMESPACE": "slurm.pmix.2.0"}
SRUN_PMI2_RANK_1 = {**BATCH_SHELL, "SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "1",
                    "PMI_RANK": "1", "PMI_SIZE": "2", "PMI_FD": "13"}
# MPICH's mpiexec under SLURM starts its proxies with srun: the proxy's SLURM_PROCID is not the rank
HYDRA_RANK_3 = {**BATCH_SHELL, "SLURM_STEP_ID": "0", "SLURM_NODEID": "1", "SLURMD_NODENAME": "n2",
                "PMI_RANK": "3", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"}


@pytest.mark.parametrize("env,expected", [
    (MPIRUN_RANK_1, LaunchInfo("openmpi", 1, 2, 1, "vm", None, "2", 1)),
    (SRUN_PMIX_RANK_1, LaunchInfo("srun", 1, 2, 1, "vm", 0, "2", 1)),
    (SRUN_PMI2_RANK_1, LaunchInfo("srun", 1, 2, 1, "vm", 0, "2", 1)),
    (HYDRA_RANK_3, LaunchInfo("hydra", 3, 4, 1, "n2", None, "2", 1)),
    (BATCH_SHELL, LaunchInfo("sbatch", 0, 1, 0, "vm", 0, "2", 1)),
], ids=["mpirun-in-sbatch", "srun-pmix", "srun-pmi2", "hydra-in-sbatch", "batch-shell"])
def test_launch_info_takes_the_launcher_that_started_the_process(env, expected):
    assert launch_info(env) == expected


def test_launch_info_outside_slurm_reads_each_mpi_launcher():
    hydra = {"PMI_RANK": "2", "PMI_SIZE": "3", "MPI_LOCALRANKID": "2"}
    pmi = {"PMI_RANK": "2", "PMI_SIZE": "3"}
    pmix = {"PMIX_RANK": "5"}

    node = platform.node() or None
    assert launch_info(hydra) == LaunchInfo("hydra", 2, 3, 2, node, None, None, None)
    assert launch_info(pmi) == LaunchInfo("pmi", 2, 3, None, node, None, None, None)
    assert launch_info(pmix) == LaunchInfo("pmix", 5, None, None, node, None, None, None)


def test_launch_info_without_launcher_is_rank_0_of_1_on_this_host():
    info = launch_info({})

    assert info == LaunchInfo("none", 0, 1, 0, platform.node() or None, None, None, None)


def test_launch_info_ignores_a_rank_that_is_not_a_number():
    assert launch_info({"OMPI_COMM_WORLD_RANK": "", **SRUN_PMIX_RANK_1}).launcher == "srun"


@pytest.mark.parametrize("value,expected", [("4", 4), ("1", 1), (None, None), ("", None), ("0", None),
                                            ("two", None), ("-1", None)])
def test_cpus_per_task_is_a_positive_int_or_none(value, expected):
    env = {} if value is None else {"SLURM_CPUS_PER_TASK": value}

    assert cpus_per_task(env) == expected


def test_launch_table_lists_every_rank_and_has_no_warning_for_one_job():
    infos = [launch_info(SRUN_PMIX_RANK_1 | {"SLURM_PROCID": str(r)}) for r in range(2)]

    lines = format_launch_table(infos, world_size=2)

    assert lines[0].split() == ["rank", "size", "local", "node", "node", "id", "job", "cpus/task", "launcher"]
    assert lines[2].split() == ["1", "2", "1", "vm", "0", "2", "1", "srun"]
    assert len(lines) == 3


def test_launch_table_warns_of_singletons():
    # srun --mpi=none (or an srun/MPI mismatch) starts each task as its own world of size 1
    lines = format_launch_table([launch_info(SRUN_PMIX_RANK_1)], world_size=1)

    assert lines[-1].startswith("warning: MPI rank 0 of 1 was started by srun as rank 1 of 2")
    assert "--mpi=pmix" in lines[-1]


# -- requeue_job: a fake scontrol on PATH -------------------------------------------------------
def _fake_scontrol(tmp_path, body):
    script = tmp_path / "scontrol"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return {"PATH": f"{tmp_path}:{os.environ.get('PATH', '')}"}


def test_requeue_job_runs_scontrol_requeue_with_the_job_id(tmp_path):
    path = _fake_scontrol(tmp_path, f'echo "$@" > {tmp_path}/args')

    ok, message = requeue_job({**BATCH_SHELL, "SLURM_JOB_ID": "42", **path})

    assert ok, message
    assert (tmp_path / "args").read_text().split() == ["requeue", "42"]
    assert message == "requeued SLURM job 42"


def test_requeue_job_reports_scontrol_errors(tmp_path):
    path = _fake_scontrol(tmp_path, 'echo "scontrol: error: Access/permission denied" >&2; exit 1')

    ok, message = requeue_job({**BATCH_SHELL, **path})

    assert not ok
    assert "failed: scontrol: error: Access/permission denied" in message


def test_requeue_job_without_scontrol_reports_instead_of_raising(tmp_path):
    ok, message = requeue_job({**BATCH_SHELL, "PATH": str(tmp_path)})  # an empty directory

    assert not ok
    assert "scontrol not found" in message and "batch script" in message


def test_requeue_job_gives_up_after_its_timeout(tmp_path):
    path = _fake_scontrol(tmp_path, "sleep 10")

    ok, message = requeue_job({**BATCH_SHELL, **path}, timeout=0.3)

    assert not ok
    assert "no answer in 0.3 s" in message


def test_requeue_job_does_nothing_outside_slurm_or_off_rank_0(tmp_path):
    path = _fake_scontrol(tmp_path, f"touch {tmp_path}/called")

    outside = requeue_job({"OMPI_COMM_WORLD_RANK": "0", **path})
    rank_1 = requeue_job({**MPIRUN_RANK_1, **path})

    assert outside == (False, "not a SLURM job (no SLURM_JOB_ID): nothing to requeue")
    assert rank_1 == (False, "rank 1 does not requeue: rank 0 does")
    assert not (tmp_path / "called").exists()


def test_cluster_module_does_not_import_mpi4py():
    source = open(cluster.__file__).read()

    assert "mpi4py" not in source.replace("No mpi4py here", "")


# -- default_threads: SLURM_CPUS_PER_TASK, then OMP_NUM_THREADS ---------------------------------
class _FourRanksOnTheNode:
    def node_size(self):
        return 4


@pytest.mark.parametrize("slurm,omp,cores,affinity,expected", [
    (None, None, 8, 8, 2),   # neither: 8 cores shared by 4 ranks
    ("3", None, 8, 8, 3),    # --cpus-per-task=3 wins over the share
    ("3", None, 8, 2, 2),    # never more threads than the CPUs this rank may run on (mpirun binds to cores)
    ("", None, 8, 8, 2),     # set but empty: as if unset
    (None, "1", 8, 8, 1),    # OMP_NUM_THREADS wins over the share
    (None, "3,2", 8, 8, 3),  # one value per nesting level: the first
    ("4", "1", 8, 8, 4),     # SLURM's answer first
    (None, "0", 8, 8, 2),    # not a thread count: as if unset
    (None, "x", 8, 8, 2),
], ids=["neither", "cpus-per-task", "within-cpu-set", "empty", "omp", "omp-levels", "slurm-first", "omp-zero",
        "omp-junk"])
def test_default_threads_is_slurm_cpus_per_task_else_omp_num_threads(monkeypatch, slurm, omp, cores, affinity,
                                                                     expected):
    for name, value in (("SLURM_CPUS_PER_TASK", slurm), ("OMP_NUM_THREADS", omp)):
        monkeypatch.delenv(name, raising=False)
        if value is not None:
            monkeypatch.setenv(name, value)
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(affinity)), raising=False)

    assert trainer.default_threads(_FourRanksOnTheNode()) == expected
