"""End-to-end: checkpoints, exact resume and preemption, under mpirun as a user runs them.

Same world size: resumed weights are bit-identical to the uninterrupted run's
(same data order, same reductions, restored optimizer and generator states).
Another world size: the global batch is summed in another order, so they
agree to rounding (1e-6), not bitwise.
"""
import json
import os
import re
import signal
import time
from pathlib import Path

import pytest
import torch

from launch import finish, launch, start, summary

from distml.checkpoint import list_checkpoints, read_checkpoint
from distml.cli import main

pytestmark = pytest.mark.timeout(300)


def _max_diff(path_a, path_b):
    a, b = (torch.load(p, weights_only=True) for p in (path_a, path_b))
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def _ok(done):
    assert done.returncode == 0, done.stderr
    return done


def _wait_for_checkpoint(directory, proc, timeout=60):
    deadline = time.monotonic() + timeout
    while not list_checkpoints(directory):
        assert proc.poll() is None, "training ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)


def _positions(directory):
    return [(path, read_checkpoint(path).position) for path in list_checkpoints(directory)]


DROPOUT = Path(__file__).parent / "mpi" / "dropout_model.py"
# Dropout: bit-identical weights after the resume also show that every rank's generator was restored.
SYNC = ["train", "--quiet", "--epochs", 4, "--batch-size", 8, "--lr", 0.05, "--momentum", 0.9,
        "--model", f"{DROPOUT}:make"]


def test_sync_stopped_mid_epoch_by_sigusr1_exits_75_and_resumes_to_the_same_weights(tmp_path):
    ckpt = tmp_path / "ckpt"
    full = _ok(launch(2, *SYNC, "--save-model", tmp_path / "full.pt", "--metrics", tmp_path / "full.jsonl"))

    # --slow-rank: only the pace changes (an epoch takes ~0.05 s here otherwise, too short to signal inside).
    # A loading worker: mpirun signals a rank's whole process group, and the worker must not die of it.
    proc = start(2, *SYNC, "--checkpoint-dir", ckpt, "--save-model", tmp_path / "part.pt",
                 "--metrics", tmp_path / "part.jsonl", "--slow-rank", 1, "--slow-factor", 8, "--data-workers", 1)
    _wait_for_checkpoint(ckpt, proc)
    os.kill(proc.pid, signal.SIGUSR1)  # to mpirun, which forwards USR1 to every rank
    stopped = finish(proc)

    assert stopped.returncode == 75, stopped.stderr
    lines = [line for line in stopped.stderr.splitlines() if line.startswith("distml:")]
    assert len(lines) == 1 and "stopped by SIGUSR1" in lines[0] and "--resume" in lines[0]
    newest = list_checkpoints(ckpt)[-1]
    position = read_checkpoint(newest).position
    assert 0 < position["step"] and position["epoch"] < 4  # inside an epoch, before the end
    assert not (tmp_path / "part.pt").exists()

    resumed = _ok(launch(2, *SYNC, "--checkpoint-dir", ckpt, "--resume", "--save-model", tmp_path / "part.pt",
                         "--metrics", tmp_path / "part.jsonl"))
    assert _max_diff(tmp_path / "full.pt", tmp_path / "part.pt") == 0.0
    records = [json.loads(line) for line in (tmp_path / "part.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records[:-1]] == list(range(1, 5))  # each epoch once, none lost or doubled
    full_records = [json.loads(line) for line in (tmp_path / "full.jsonl").read_text().splitlines()]
    assert [r["train_loss"] for r in records[:-1]] == [r["train_loss"] for r in full_records[:-1]]
    assert summary(tmp_path / "part.jsonl")["test_accuracy"] == summary(tmp_path / "full.jsonl")["test_accuracy"]
    assert resumed.returncode == 0 and full.returncode == 0


def test_sync_checkpoint_from_two_ranks_resumes_on_three_with_the_same_global_batch(tmp_path):
    common = ["train", "--quiet", "--epochs", 4, "--lr", 0.05, "--momentum", 0.9, "--weight-decay", 1e-4]
    _ok(launch(2, *common, "--batch-size", 30, "--save-model", tmp_path / "full.pt"))
    # Checkpoints every few milliseconds land inside epochs; the run itself must not change.
    _ok(launch(2, *common, "--batch-size", 30, "--save-model", tmp_path / "timed.pt", "--checkpoint-dir",
               tmp_path / "ckpt", "--checkpoint-every", 0, "--checkpoint-every-s", 0.02, "--keep", 1000))
    inside = [path for path, p in _positions(tmp_path / "ckpt") if 0 < p["step"] < 24]  # 1438 / 60: 24 steps
    assert inside, "no checkpoint inside an epoch"
    middle = inside[len(inside) // 2]

    _ok(launch(3, *common, "--batch-size", 20, "--resume", middle, "--save-model", tmp_path / "three.pt"))

    assert _max_diff(tmp_path / "full.pt", tmp_path / "timed.pt") == 0.0
    assert _max_diff(tmp_path / "full.pt", tmp_path / "three.pt") <= 1e-6
    refused = launch(3, *common, "--batch-size", 30, "--resume", middle)  # another global batch: 90, not 60
    assert refused.returncode == 2
    assert "global batch 60" in refused.stderr and refused.stderr.count("distml: error") == 1


FEDERATED = ["train", "--quiet", "--mode", "federated", "--clients", 6, "--rounds", 6, "--algorithm", "scaffold",
             "--momentum", 0, "--server-opt", "adam", "--server-lr", 0.05, "--partition", "dirichlet",
             "--batch-size", 16, "--lr", 0.05]


def test_federated_scaffold_with_a_server_optimizer_resumes_exactly_on_any_rank_count(tmp_path):
    _ok(launch(2, *FEDERATED, "--save-model", tmp_path / "full.pt"))
    # every 2 rounds, and by the clock: those after odd rounds are taken with the round not yet recorded
    _ok(launch(2, *FEDERATED, "--checkpoint-dir", tmp_path / "ckpt", "--keep", 100, "--checkpoint-every", 2,
               "--checkpoint-every-s", 0.005))
    after_2 = tmp_path / "ckpt" / "checkpoint-000000002.pt"
    unrecorded = [path for path, p in _positions(tmp_path / "ckpt") if p["step"] == 1]
    assert unrecorded and read_checkpoint(after_2).position["step"] == 0

    _ok(launch(3, *FEDERATED, "--resume", after_2, "--save-model", tmp_path / "three.pt"))
    _ok(launch(2, *FEDERATED, "--resume", unrecorded[0], "--save-model", tmp_path / "timed.pt",
               "--metrics", tmp_path / "timed.jsonl"))

    assert _max_diff(tmp_path / "full.pt", tmp_path / "timed.pt") == 0.0  # same world size: bit for bit
    rounds = [json.loads(line).get("round") for line in (tmp_path / "timed.jsonl").read_text().splitlines()]
    assert rounds[:-1] == list(range(read_checkpoint(unrecorded[0]).position["epoch"] + 1, 7))
    # float64 round sums: another rank count only changes their order
    assert _max_diff(tmp_path / "full.pt", tmp_path / "three.pt") <= 1e-6
    state = read_checkpoint(after_2).strategy
    assert len(state["client_control"]) == 6 and state["server_v"].abs().sum() > 0  # c_i and moments saved


ASYNC = ["train", "--quiet", "--mode", "async", "--staleness", 0, "--epochs", 4, "--lr", 0.05]


def test_async_one_worker_resumes_exactly_from_a_segment_end_and_from_inside_one(tmp_path):
    _ok(launch(2, *ASYNC, "--save-model", tmp_path / "full.pt"))
    _ok(launch(2, *ASYNC, "--save-model", tmp_path / "timed.pt", "--checkpoint-dir", tmp_path / "ckpt",
               "--checkpoint-every", 1, "--checkpoint-every-s", 0.02, "--keep", 1000))
    positions = _positions(tmp_path / "ckpt")
    ends = [path for path, p in positions if p["units"] == 2 * 45]  # 1438 samples / 32: 45 updates a segment
    inside = [path for path, p in positions if p["units"] % 45]
    assert ends and inside, positions

    _ok(launch(2, *ASYNC, "--resume", ends[0], "--save-model", tmp_path / "from_end.pt"))
    _ok(launch(2, *ASYNC, "--resume", inside[len(inside) // 2], "--save-model", tmp_path / "from_inside.pt"))

    assert _max_diff(tmp_path / "full.pt", tmp_path / "timed.pt") == 0.0
    assert _max_diff(tmp_path / "full.pt", tmp_path / "from_end.pt") == 0.0
    assert _max_diff(tmp_path / "full.pt", tmp_path / "from_inside.pt") == 0.0
    refused = launch(3, *ASYNC, "--resume", ends[0])  # 1 server + 2 workers: another layout
    assert refused.returncode == 2
    assert "same layout" in refused.stderr and refused.stderr.count("distml: error") == 1


def test_async_stopped_by_a_signal_exits_75_with_a_checkpoint_and_resumes(tmp_path):
    common = [*ASYNC, "--epochs", 10, "--checkpoint-dir", tmp_path / "ckpt"]
    proc = start(3, *common, "--staleness", -1, "--slow-rank", 1, "--slow-factor", 4)  # time to signal
    _wait_for_checkpoint(tmp_path / "ckpt", proc)
    os.kill(proc.pid, signal.SIGUSR2)
    stopped = finish(proc)

    assert stopped.returncode == 75, stopped.stderr
    assert re.search(r"stopped by SIGUSR2 at epoch \d+: wrote ", stopped.stderr)  # no "(unit 0 of 1)"
    newest = read_checkpoint(list_checkpoints(tmp_path / "ckpt")[-1])
    assert newest.position["units"] < 10 * 46  # two shards of 719 / 32: 2 x 23 updates a segment

    resumed = _ok(launch(3, *[a for a in common if a != "--quiet"], "--staleness", -1, "--resume",
                         "--metrics", tmp_path / "m.jsonl"))
    s = summary(tmp_path / "m.jsonl")
    assert s["updates_applied"] == 10 * 46 and s["test_accuracy"] >= 0.9  # the budget, once
    assert "resumed from" in resumed.stdout


def test_resume_without_a_checkpoint_yet_starts_from_the_beginning(tmp_path, capsys):
    code = main(["train", "--epochs", "1", "--checkpoint-dir", str(tmp_path / "new"), "--resume"])  # in this process
    out, err = capsys.readouterr()

    assert code == 0, err
    assert "no checkpoint in" in out
    assert [os.path.basename(p) for p in list_checkpoints(tmp_path / "new")] == ["checkpoint-000000045.pt"]
