"""Horovod-style scripts on distml.horovod under mpirun: training, and how a failing job ends."""
import re
import time
from pathlib import Path

import pytest

from launch import launch_python

SCRIPT = Path(__file__).parent / "horovod_scripts" / "digits_mnist_style.py"


def _results(stdout):
    """{rank: (accuracy, checksum)} from the script's last lines."""
    found = re.findall(r"rank (\d+): test loss \S+ accuracy (\S+) checksum (\S+)", stdout)
    return {int(r): (float(acc), float(checksum)) for r, acc, checksum in found}


def test_horovod_mnist_style_script_trains_identical_replicas_with_and_without_fp16():
    full = launch_python(2, SCRIPT, "--epochs", 8, timeout=120)
    half = launch_python(2, SCRIPT, "--epochs", 8, "--fp16-allreduce", timeout=120)

    for run in (full, half):
        assert run.returncode == 0, run.stderr
    full, half = _results(full.stdout), _results(half.stdout)
    assert set(full) == set(half) == {0, 1}
    assert full[0] == full[1] and half[0] == half[1]  # replicas identical, the metric averaged
    assert full[0][0] >= 0.93 and half[0][0] >= 0.93
    assert full[0][1] != half[0][1]  # fp16 really rounded the reduced gradients


def test_an_exception_on_one_rank_ends_the_job_naming_that_rank():
    started = time.monotonic()
    run = launch_python(2, SCRIPT, "--epochs", 4, "--fail-on-rank", 1, timeout=60)

    assert run.returncode != 0
    assert run.stderr.count("(aborting all ranks)") == 1
    assert "distml.horovod: rank 1 of 2 failed: RuntimeError: a bug on this rank (aborting all ranks)" in run.stderr
    assert "Traceback (most recent call last)" in run.stderr
    assert time.monotonic() - started < 30  # rank 0, waiting in an allreduce, did not hang


def test_a_mismatch_every_rank_sees_is_printed_once_by_rank_0():
    run = launch_python(2, SCRIPT, "--epochs", 1, "--mismatch", timeout=60)

    assert run.returncode != 0
    assert run.stderr.count("(aborting all ranks)") == 1
    assert "distml.horovod: rank 0 of 2 failed: HorovodInternalError: ranks disagree" in run.stderr
    assert re.search(r"HorovodInternalError: ranks disagree on a collective operation: rank 0: allreduce of "
                     r"float32 \[1\] named 'mismatch'; rank 1: allreduce of float32 \[2\]", run.stderr)
