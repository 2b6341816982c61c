"""End-to-end: `distml train --mode async` (parameter servers) under mpirun."""
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from launch import launch, summary

from distml.cli import main

pytestmark = pytest.mark.timeout(180)


def test_async_one_worker_staleness_zero_equals_sequential_sgd(tmp_path):
    common = ["train", "--quiet", "--epochs", 2, "--momentum", 0.9, "--weight-decay", 1e-4]

    sync = main([*map(str, common), "--save-model", str(tmp_path / "sync.pt")])  # in this process: no start-up
    ps = launch(2, *common, "--mode", "async", "--staleness", 0, "--save-model", tmp_path / "async.pt")

    assert sync == 0 and ps.returncode == 0, ps.stderr
    a, b = (torch.load(tmp_path / f, weights_only=True) for f in ("sync.pt", "async.pt"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5


@pytest.mark.parametrize("ranks,servers", [(3, 1), (4, 2)])
def test_async_trains_digits_to_93_percent(tmp_path, ranks, servers):
    metrics = tmp_path / "m.jsonl"

    done = launch(ranks, "train", "--quiet", "--mode", "async", "--servers", servers, "--lr", 0.05,
                  "--metrics", metrics)

    assert done.returncode == 0, done.stderr
    s = summary(metrics)
    assert s["test_accuracy"] >= 0.93
    workers = ranks - servers
    shards = np.array_split(np.arange(1438), workers)  # digits: 1438 training samples
    assert s["updates_applied"] == sum(20 * math.ceil(len(shard) / 32) for shard in shards)
    assert len(s["worker_samples_per_s"]) == workers
    assert s["global_batch_size"] == 32 * workers  # servers compute no gradients


def test_async_defaults_train_digits_because_stale_steps_are_scaled_down(tmp_path):
    # Without --staleness-lr (on by default) lr 0.1 and momentum 0.9 reached 0.45 here.
    metrics = tmp_path / "m.jsonl"

    done = launch(3, "train", "--quiet", "--mode", "async", "--metrics", metrics)

    assert done.returncode == 0, done.stderr
    assert summary(metrics)["test_accuracy"] >= 0.93


@pytest.mark.parametrize("servers", [1, 2])
def test_async_staleness_bound_is_never_exceeded_under_a_slow_worker(tmp_path, servers):
    metrics = tmp_path / "m.jsonl"

    done = launch(4, "train", "--quiet", "--mode", "async", "--staleness", 1, "--epochs", 3,
                  "--servers", servers, "--lr", 0.05, "--slow-rank", 2, "--slow-factor", 3,
                  "--metrics", metrics)

    assert done.returncode == 0, done.stderr
    s = summary(metrics)
    assert s["staleness_max"] <= 1
    assert max(int(k) for k in s["staleness_histogram"]) <= 1
    assert sum(s["staleness_histogram"].values()) == s["updates_applied"]


def test_a_straggler_does_less_of_the_work_and_the_budget_is_exact(tmp_path):
    metrics = tmp_path / "m.jsonl"

    done = launch(3, "train", "--quiet", "--mode", "async", "--epochs", 4, "--lr", 0.05,
                  "--slow-rank", 1, "--slow-factor", 6, "--metrics", metrics)

    assert done.returncode == 0, done.stderr
    s = summary(metrics)
    assert s["updates_applied"] == 4 * 2 * math.ceil(719 / 32)  # epochs x batches of both shards
    slow, fast = s["worker_samples"]
    assert slow < fast  # the fast worker made more passes over its own shard
    assert 0.95 * 4 * 1438 <= slow + fast <= 184 * 32  # batches are counted; each pass ends partial


@pytest.mark.parametrize("ranks,flags,expected", [
    (0, [], "needs at least 2 ranks"),
    (2, ["--servers", 2], "leaves no worker"),
    (3, ["--dataset", "synthetic", "--samples", 3, "--test-fraction", 0.5], "2 workers but only 1 training samples"),
])
def test_async_world_too_small_is_a_usage_error(ranks, flags, expected, capsys):
    if ranks:
        done = launch(ranks, "train", "--mode", "async", *flags, timeout=60)
        code, err = done.returncode, done.stderr
    else:  # the command's main() in this process: the same path, without an interpreter start-up
        code, err = main(["train", "--mode", "async", *map(str, flags)]), capsys.readouterr().err

    assert code == 2
    ours = [line for line in err.splitlines() if line.startswith("distml:")]
    assert len(ours) == 1 and expected in ours[0]


def test_silent_workers_make_the_server_abort_after_timeout():
    start = time.monotonic()

    done = launch(2, "train", "--quiet", "--mode", "async", "--slow-rank", 1, "--slow-factor", 3000,
                  "--timeout", 1, timeout=60)

    assert time.monotonic() - start < 30
    assert done.returncode != 0
    assert "rank 0 (parameter server) heard nothing from rank(s) 1" in done.stderr


def test_the_timeout_names_only_the_worker_being_waited_on():
    # Staleness 0: one worker computes at a time; the other is held back, not silent.
    done = launch(3, "train", "--quiet", "--mode", "async", "--staleness", 0, "--slow-rank", 1,
                  "--slow-factor", 3000, "--timeout", 1, timeout=60)

    assert done.returncode != 0
    assert "rank 0 (parameter server) heard nothing from rank(s) 1 for" in done.stderr


def test_killing_one_worker_ends_the_job_promptly(tmp_path):
    model_file = tmp_path / "dies.py"
    model_file.write_text(
        "import os, signal, torch, distml\n"
        "class Dies(torch.nn.Module):\n"
        "    def __init__(self, n):\n"
        "        super().__init__(); self.lin = torch.nn.Linear(64, n); self.calls = 0\n"
        "    def forward(self, x):\n"
        "        self.calls += 1\n"
        "        if self.training and self.calls > 5 and distml.rank() == 2:\n"
        "            os.kill(os.getpid(), signal.SIGKILL)\n"
        "        return self.lin(x.flatten(1))\n"
        "def make(shape, n):\n    return Dies(n)\n")
    start = time.monotonic()

    done = launch(3, "train", "--quiet", "--mode", "async", "--model", f"{model_file}:make", timeout=60)

    assert time.monotonic() - start < 30
    assert done.returncode != 0


def test_async_batchnorm_statistics_come_from_the_workers(tmp_path):
    # Servers never run the model: their BatchNorm statistics stay at the initial values
    # (test accuracy 0.89 here before the fix; 0.94 with the workers' statistics).
    bn_model = Path(__file__).parent / "mpi" / "bn_model.py"
    metrics = tmp_path / "m.jsonl"

    done = launch(3, "train", "--quiet", "--mode", "async", "--lr", 0.05, "--epochs", 5,
                  "--model", f"{bn_model}:make", "--metrics", metrics)

    assert done.returncode == 0, done.stderr
    assert summary(metrics)["test_accuracy"] >= 0.92
