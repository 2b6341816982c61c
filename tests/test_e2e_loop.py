"""Your own loop under mpirun: a mismatched collective is reported, not memory corrupted; a loop stopped by
SIGUSR1 exits 75 and resumes, also on another world size, to the uninterrupted weights; the two examples
train, stop and resume."""
import re
import signal
import time
from pathlib import Path

import pytest
import torch

from launch import ROOT, finish, launch_python, start_python

SCRIPT = Path(__file__).parent / "loop_script.py"


def _max_diff(a, b):
    a, b = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("ranks", [2, 3])
def test_a_rank_in_a_metric_allreduce_while_the_others_reduce_gradients_is_reported_by_the_hang_doctor(
        tmp_path, ranks):
    result = launch_python(ranks, SCRIPT, tmp_path, "--mismatch", 4, "--watchdog", 3, timeout=60)
    ended = time.time()

    assert result.returncode == 124, result.stderr
    started = float(re.search(r"mismatch at ([\d.]+)", result.stdout).group(1))
    assert ended - started < 3 + 10
    err = result.stderr
    assert "rank 0 has waited 3 s in allreduce" in err and "distml.allreduce(op=average, float64 [])" in err
    assert all(f"rank {r} has waited" in err for r in range(1, ranks))
    assert "the ranks' calls first differ at" in err and "optimizer step 5: gradient reduction, bucket 1 of 1" in err
    assert "malloc" not in err and "Signal:" not in err and "Segmentation" not in err


def test_a_loop_stopped_by_sigusr1_on_2_ranks_resumes_mid_epoch_on_3_to_the_one_process_weights(tmp_path):
    one = tmp_path / "one"
    ok = launch_python(0, SCRIPT, one)  # one process, no mpirun: the reference
    assert ok.returncode == 0, ok.stderr
    assert "threads 2" in ok.stdout  # distml.init() gives a rank the node's cores over its ranks

    two = tmp_path / "two"
    stopped = launch_python(2, SCRIPT, two, "--signal-at", 5)
    assert stopped.returncode == 75, stopped.stderr
    assert [line for line in stopped.stderr.splitlines() if line.startswith("stopped")] == [
        line for line in stopped.stderr.splitlines() if re.fullmatch(r"stopped at epoch 0 step ([6-9]|1\d)", line)]
    # on 3 ranks (the same global batch): the examples' test resumes on as many ranks as stopped. Rank 0
    # works 4 s after the loop while the others wait to exit: longer than the watchdog, and no stall.
    resumed = launch_python(3, SCRIPT, two, "--watchdog", 2, "--linger", 4)
    assert resumed.returncode == 0, resumed.stderr
    assert "threads 1" in resumed.stdout  # 2 cores over 3 ranks
    assert _max_diff(one / "final.pt", two / "final.pt") < 1e-5

    other = launch_python(0, SCRIPT, two, "--hidden", 16)  # another model: one line, exit 2, also alone
    assert other.returncode == 2 and other.stderr.strip().splitlines() == [
        f"distml: error: distml.Checkpointer: {two / 'ckpt'}/checkpoint-000000004.pt holds another model "
        f"('0.bias' is torch.float32 [32] there, torch.float32 [16] here)"], other.stderr


def _stop_after_first_epoch(ranks, script, *args):
    """Start `script`; send SIGUSR1 to mpirun once it has printed its first epoch; the finished process."""
    proc = start_python(ranks, script, *args)
    for line in proc.stdout:
        if line.startswith("epoch 1:"):
            proc.send_signal(signal.SIGUSR1)
            break
    return finish(proc)


@pytest.mark.parametrize("script, args, quality", [
    ("mnist_cnn.py", ["--epochs", 2], r"epoch 2: test loss [\d.]+, accuracy 0\.[89]\d"),
    ("word_lm.py", ["--epochs", 2, "--files", 15, "--vocab", 500, "--bptt", 20, "--embed", 32, "--hidden", 32],
     r"epoch 2: validation loss [\d.]+, perplexity ([12]\d|3[0-9])\.\d"),  # 500 words: uniform would be 500
], ids=["mnist_cnn", "word_lm"])
def test_the_examples_train_and_resume_after_a_stop_signal_to_the_same_weights(tmp_path, script, args, quality):
    path = ROOT / "examples" / script
    full = launch_python(2, path, *args, "--checkpoint-dir", tmp_path / "full", "--save", tmp_path / "full.pt")
    assert full.returncode == 0, full.stderr
    assert re.search(quality, full.stdout), full.stdout

    # stopped and resumed with a loading worker where the example has them: mpirun signals the worker too
    workers = ["--workers", 1] if script == "mnist_cnn.py" else []
    common = [*args, *workers, "--checkpoint-dir", tmp_path / "part", "--save", tmp_path / "part.pt"]
    stopped = _stop_after_first_epoch(2, path, *common)
    assert stopped.returncode == 75, stopped.stdout + stopped.stderr
    assert "stopped by a signal in epoch 2" in stopped.stdout and not (tmp_path / "part.pt").exists()
    resumed = launch_python(2, path, *common)
    assert resumed.returncode == 0, resumed.stderr
    assert "distml: restored" in resumed.stderr
    assert _max_diff(tmp_path / "full.pt", tmp_path / "part.pt") == 0.0
