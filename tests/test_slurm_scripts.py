"""The batch scripts in scripts/slurm without SLURM: their shape, and their signal and exit-code logic run
by plain bash with a stand-in launcher and a stand-in distml (a second each; tests/test_slurm.py runs
them under a real SLURM)."""
import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from launch import ROOT

pytestmark = pytest.mark.timeout(60)

SCRIPTS = {name: ROOT / "scripts" / "slurm" / f"{name}.sbatch" for name in ("sync", "async", "federated")}
COMMON = "# ---- the same in sync.sbatch, async.sbatch and federated.sbatch from here on ----"

# Stands in for `distml train`: says it is ready, then exits 75 on USR1/USR2/TERM (naming the signal
# in the file `got`) or 0 after 20 s.
FAKE_DISTML = f"""#!{sys.executable}
import os, signal, sys, time
here = os.path.dirname(os.path.abspath(__file__))
def stop(number, frame):
    open(os.path.join(here, "got"), "w").write(signal.Signals(number).name)
    sys.exit(75)
for number in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM):
    signal.signal(number, stop)
open(os.path.join(here, "ready"), "w").write(" ".join(sys.argv[1:]))
time.sleep(20)
"""


def _executable(path, text):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def _start(tmp_path, **env):
    """bash sync.sbatch with mpirun replaced by `exec` (so the fake distml is bash's child itself)."""
    fake_mpirun = _executable(tmp_path / "mpirun", '#!/bin/sh\nshift 4  # -n N --map-by X\nexec "$@"\n')
    environment = {"PATH": f"{tmp_path}:{os.environ['PATH']}", "DISTML": str(_executable(tmp_path / "distml",
                   FAKE_DISTML)), "DISTML_LAUNCHER": "mpirun", "DISTML_MPIRUN": str(fake_mpirun),
                   "DISTML_RUN_DIR": str(tmp_path / "run"), **env}  # no SLURM_* unless given
    proc = subprocess.Popen(["bash", str(SCRIPTS["sync"])], env=environment, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 20
    while not (tmp_path / "ready").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.02)
    return proc


def test_every_script_has_the_settings_a_user_edits():
    for name, path in SCRIPTS.items():
        text = path.read_text()
        for option in ("--job-name=distml-", "--nodes=", "--ntasks=", "--cpus-per-task=", "--time=",
                       "--signal=B:USR1@", "--requeue", "--open-mode=append", "--output="):
            assert f"#SBATCH {option}" in text, f"{name}.sbatch has no #SBATCH {option}"
        assert f"--mode {name}" in text
        assert subprocess.run(["bash", "-n", str(path)]).returncode == 0


def test_the_scripts_share_everything_below_the_common_line():
    tails = {name: path.read_text().split(COMMON) for name, path in SCRIPTS.items()}

    assert all(len(parts) == 2 for parts in tails.values())
    assert len({parts[1] for parts in tails.values()}) == 1


@pytest.mark.parametrize("sent,forwarded", [(signal.SIGTERM, "SIGUSR1"), (signal.SIGUSR1, "SIGUSR1"),
                                            (signal.SIGUSR2, "SIGUSR2")])
def test_script_forwards_signals_to_the_launcher_and_exits_with_its_code(tmp_path, sent, forwarded):
    proc = _start(tmp_path)

    proc.send_signal(sent)
    out, _ = proc.communicate(timeout=20)

    assert proc.returncode == 75, out
    assert (tmp_path / "got").read_text() == forwarded  # TERM would make mpirun or srun kill the ranks
    assert "distml: exit code 75" in out
    assert "requeue" not in out  # not a SLURM job


def test_script_passes_its_flags_and_checkpoint_dir_to_distml(tmp_path):
    proc = _start(tmp_path, DISTML_ARGS="--epochs 2 --quiet")
    args = (tmp_path / "ready").read_text().split()
    proc.send_signal(signal.SIGUSR1)
    proc.communicate(timeout=20)

    run = tmp_path / "run"
    assert args[:3] == ["train", "--mode", "sync"]
    assert args[-3:] == ["--epochs", "2", "--quiet"]  # last, so they win
    for flag, value in (("--metrics", run / "metrics.jsonl"), ("--save-model", run / "model.pt"),
                        ("--checkpoint-dir", run / "checkpoints")):
        assert args[args.index(flag) + 1] == str(value)
    assert "--resume" in args


def test_script_without_checkpoints_passes_no_checkpoint_flags(tmp_path):
    proc = _start(tmp_path, DISTML_CKPT="none")
    args = (tmp_path / "ready").read_text().split()
    proc.send_signal(signal.SIGUSR1)
    proc.communicate(timeout=20)

    assert not [a for a in args if a.startswith(("--checkpoint", "--resume", "--keep"))]


def test_script_requeues_the_job_itself_when_distml_exits_75(tmp_path):
    _executable(tmp_path / "scontrol", f'#!/bin/sh\necho "$@" > {tmp_path}/scontrol-args\n')
    proc = _start(tmp_path, SLURM_JOB_ID="42", SLURM_NTASKS="2", SLURM_CPUS_PER_TASK="1")

    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=20)

    assert proc.returncode == 75, out
    assert (tmp_path / "scontrol-args").read_text().split() == ["requeue", "42"]
    assert "requeueing job 42" in out
