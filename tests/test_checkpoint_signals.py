"""A signal or a kill while a checkpoint is being written never costs the previous one."""
import os
import signal
import subprocess
import sys
import time

import pytest

from launch import ROOT

from distml.checkpoint import list_checkpoints, newest_checkpoint, read_checkpoint

pytestmark = pytest.mark.timeout(120)

WRITER = """
import sys, torch
from distml.checkpoint import Checkpoint, write_checkpoint
from distml.signals import StopFlag
big = {"w": torch.randn(10_000_000)}  # 40 MB: each write takes long enough to be caught inside it
with StopFlag() as flag:
    for units in range(1, 10_000):
        ckpt = Checkpoint(mode="sync", world_size=1, config="{}", data="", model=big, strategy={}, ranks=[{}],
                          position={"epoch": 0, "step": units, "units": units, "elapsed_s": 0.0})
        write_checkpoint(ckpt, sys.argv[1], keep=2)
        print(units, flag.requested, flush=True)
"""


def _writer(directory):
    return subprocess.Popen([sys.executable, "-c", WRITER, str(directory)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_stop_signals_during_writes_only_raise_the_flag_and_a_kill_keeps_the_previous_checkpoint(tmp_path):
    proc = _writer(tmp_path)
    try:
        first = proc.stdout.readline().split()
        assert first == ["1", "None"]
        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGUSR2):  # each lands in a write, most likely
            os.kill(proc.pid, sig)
            time.sleep(0.05)
        after = proc.stdout.readline().split()  # the writer went on, the first signal noted
        assert after[1] == "SIGUSR1" and int(after[0]) > 1
        time.sleep(0.13)  # somewhere inside a later write
        proc.kill()
        proc.wait(timeout=30)
    finally:
        proc.kill()

    named = list_checkpoints(tmp_path)
    assert 1 <= len(named) <= 2
    for path in named:  # everything under a checkpoint's name is whole
        read_checkpoint(path)
    path, ckpt, damaged = newest_checkpoint(tmp_path)
    assert damaged == []
    assert ckpt.position["units"] >= int(after[0])
    leftovers = [name for name in os.listdir(tmp_path) if not name.startswith("checkpoint-")]
    assert all(name.startswith(".tmp-") for name in leftovers)  # at most the write that was killed
