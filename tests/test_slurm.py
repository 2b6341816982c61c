"""Against a real single-node SLURM (the `slurm_cluster` fixture): the batch scripts in scripts/slurm,
ranks started by srun itself, and preemption (signal, checkpoint, exit 75, requeue, resume).

Jobs are submitted with `sbatch --parsable` and followed with `scontrol show job` every 0.2 s, each
wait with a deadline: `sbatch --wait` polls with a growing back-off and returned 10-42 s after jobs
that ran for 5 s. Every job a test submits is cancelled when the test ends, pass or fail.
"""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distml.checkpoint import read_checkpoint
from launch import ROOT, summary

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(300)]  # the first test also installs SLURM

SCRIPTS = ROOT / "scripts" / "slurm"
DISTML = Path(sys.executable).with_name("distml")  # the venv's, as a user sets DISTML=.venv/bin/distml
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
         "BOOT_FAIL", "DEADLINE"}
SRUN_ENV = {"PMIX_MCA_psec": "native"}  # PyPI Open MPI's PMIx has no munge psec component


def _run(command, timeout, **kwargs):
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)


class Job:
    """A batch job submitted with sbatch, followed through `scontrol show job`."""

    def __init__(self, script, out, env, *options):
        done = _run(["sbatch", "--parsable", f"--output={out}", *options, str(script)], 30, env=env)
        assert done.returncode == 0, done.stderr
        self.id, self.out = done.stdout.strip().split(";")[0], Path(out)

    def fields(self):
        text = _run(["scontrol", "show", "job", "--oneliner", self.id], 15).stdout
        return dict(item.split("=", 1) for item in text.split() if "=" in item)

    def wait(self, timeout=120, until=None):
        """The job's fields once `until(fields)` holds (default: the job has ended); fails after timeout."""
        until = until or (lambda fields: fields.get("JobState") in FINAL)
        deadline = time.monotonic() + timeout
        while not until(fields := self.fields()):
            assert time.monotonic() < deadline, f"job {self.id}: {fields.get('JobState')}\n{self.log()}"
            time.sleep(0.2)
        return fields

    def log(self):
        return self.out.read_text() if self.out.exists() else ""

    def cancel(self):
        _run(["scancel", self.id], 15)


@pytest.fixture
def submit(slurm_cluster, tmp_path):
    """submit(script, run_dir, **settings): a Job of scripts/slurm/<script> with DISTML_* settings."""
    jobs = []

    def submit(script, run_dir, *options, **settings):
        env = {**os.environ, "DISTML": str(DISTML), "DISTML_RUN_DIR": str(run_dir), **settings}
        jobs.append(Job(SCRIPTS / script, tmp_path / f"{script}-{len(jobs)}.out", env, *options))
        return jobs[-1]

    yield submit
    for job in jobs:  # no job outlives its test
        job.cancel()


def _max_diff(path_a, path_b):
    a, b = (torch.load(p, weights_only=True) for p in (path_a, path_b))
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


# -- (a) each batch script trains -----------------------------------------------------------------
@pytest.mark.parametrize("script,launcher,args", [
    ("sync.sbatch", "srun", "--epochs 2"),
    ("sync.sbatch", "mpirun", "--epochs 2"),
    ("async.sbatch", "srun", "--epochs 2"),
    ("federated.sbatch", "srun", "--rounds 2"),
])
def test_batch_script_trains_on_two_ranks_and_writes_metrics(submit, tmp_path, script, launcher, args):
    # Execute
    job = submit(script, tmp_path / "run", DISTML_LAUNCHER=launcher, DISTML_ARGS=f"{args} --quiet")
    fields = job.wait()

    # Assert
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), job.log()
    assert "distml: exit code 0" in job.log()
    s = summary(tmp_path / "run" / "metrics.jsonl")
    assert (s["mode"], s["world_size"]) == (script.split(".")[0], 2)
    assert 0.2 < s["test_accuracy"] <= 1.0  # 10 classes: chance is 0.1
    assert (tmp_path / "run" / "model.pt").exists()
    assert list((tmp_path / "run" / "checkpoints").glob("checkpoint-*.pt"))


# -- (b) srun starts the ranks itself -------------------------------------------------------------
def test_srun_pmix_starts_the_ranks_as_one_job(slurm_cluster, tmp_path):
    metrics = tmp_path / "m.jsonl"
    command = ["srun", "--mpi=pmix", "-n", "2", "-c", "1", str(DISTML), "train", "--epochs", "2", "--quiet",
               "--metrics", str(metrics)]

    done = _run(command, 120, env={**os.environ, **SRUN_ENV})

    assert done.returncode == 0, done.stderr
    s = summary(metrics)
    assert s["world_size"] == 2, "two singletons, not one job of 2 ranks"
    assert s["mode"] == "sync" and 0.2 < s["test_accuracy"] <= 1.0


def test_info_under_srun_shows_each_ranks_launch(slurm_cluster):
    done = _run(["srun", "--mpi=pmix", "-n", "2", "-c", "1", str(DISTML), "info"], 120,
                env={**os.environ, **SRUN_ENV})

    assert done.returncode == 0, done.stderr
    rows = [line.split() for line in done.stdout.splitlines() if line.strip().endswith(" srun")]
    assert [row[:3] for row in rows] == [["0", "2", "0"], ["1", "2", "1"]]
    assert all(row[-2] == "1" for row in rows)  # cpus/task
    assert "1 thread(s) per rank by default" in done.stdout  # SLURM_CPUS_PER_TASK=1
    assert "warning" not in done.stdout


# -- (c) preemption: signal, checkpoint, exit 75, requeue, resume -------------------------------------
# --slow-rank: rank 1's compute takes 10x as long, which changes the pace, not the weights; without
# it an epoch took 0.03 s on a quiet machine and the run could end before the signal.
TRAIN_ARGS = "--epochs 6 --batch-size 16 --quiet"
PREEMPT_ARGS = TRAIN_ARGS + " --slow-rank 1 --slow-factor 10"


def _checkpoints(directory):
    return list(Path(directory).glob("checkpoint-*.pt"))


def _newest(directory):
    """The newest checkpoint-<number>.pt (call it while no run writes or prunes them)."""
    return max(_checkpoints(directory), key=lambda path: path.stat().st_mtime)


@pytest.fixture(scope="module")
def uninterrupted_model(slurm_cluster, tmp_path_factory):
    """model.pt of the sync script's run of TRAIN_ARGS (PREEMPT_ARGS but the pace), not interrupted."""
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    env = {**os.environ, "DISTML": str(DISTML), "DISTML_RUN_DIR": str(run_dir), "DISTML_ARGS": TRAIN_ARGS}
    job = Job(SCRIPTS / "sync.sbatch", run_dir / "job.out", env)
    try:
        fields = job.wait()
    finally:
        job.cancel()
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), job.log()
    return run_dir / "model.pt"


@pytest.mark.parametrize("launcher,scope", [("srun", "--batch"), ("mpirun", "--full")])
def test_preempted_job_checkpoints_exits_75_requeues_and_ends_as_if_uninterrupted(
        submit, tmp_path, uninterrupted_model, launcher, scope):
    run_dir, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    job = submit("sync.sbatch", run_dir, DISTML_LAUNCHER=launcher, DISTML_ARGS=PREEMPT_ARGS)

    # Execute: USR1 once the first checkpoint exists (the batch shell forwards it to the launcher)
    fields = job.wait(120, until=lambda f: _checkpoints(ckpts) or f.get("JobState") in FINAL)
    assert fields["JobState"] == "RUNNING" and _checkpoints(ckpts), f"no checkpoint while it ran\n{job.log()}"
    signalled_at = time.time()
    assert _run(["scancel", "--signal=USR1", scope, job.id], 15).returncode == 0
    job.wait(60, until=lambda f: "distml: exit code" in job.log() or f.get("JobState") in FINAL)
    # keep what the preempted run left: the requeued one (5 s later at the soonest) prunes old checkpoints
    preempted_log, newest = job.log(), _newest(ckpts)
    written_at, preempted = newest.stat().st_mtime, shutil.copy(newest, tmp_path / newest.name)
    fields, log = job.wait(150), job.log()  # --open-mode=append: both runs' lines

    # Assert: the preempted run checkpointed and exited 75; the requeued one resumed and finished
    assert "distml: exit code 75" in preempted_log, preempted_log
    assert written_at >= signalled_at - 0.05, "no checkpoint written after the signal"
    ckpt = read_checkpoint(preempted)  # verified: format version and checksum
    assert (ckpt.mode, ckpt.world_size) == ("sync", 2)
    assert (fields["JobState"], fields["ExitCode"], fields["Restarts"]) == ("COMPLETED", "0:0", "1"), log
    assert "(restart 1)" in log and log.count("distml: exit code 75") == 1
    assert log.rstrip().endswith("distml: exit code 0")
    assert _max_diff(uninterrupted_model, run_dir / "model.pt") == 0.0  # same world size: bit for bit
