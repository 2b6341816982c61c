"""End-to-end: a user's own Dataset, model and loss under mpirun, in every mode, with loading workers."""
import json
import re
import time
from pathlib import Path

import pytest
import torch

from launch import launch, summary

from distml.checkpoint import list_checkpoints, read_checkpoint

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "my_data.py"
SMALL = ROOT / "tests" / "mpi" / "workload_data.py"
CASES = ROOT / "tests" / "workload_cases.py"
WAVES = ["train", "--quiet", "--dataset", f"{SMALL}:make", "--model", f"{SMALL}:net", "--loss", f"{SMALL}:loss"]
FORK_WARNING = "fork()"  # Open MPI's "A process has executed an operation involving a call to fork()"


def _ok(done):
    assert done.returncode == 0, done.stderr
    assert FORK_WARNING not in done.stderr + done.stdout
    return done


def _max_diff(path_a, path_b):
    a, b = (torch.load(p, weights_only=True) for p in (path_a, path_b))
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def test_resume_mid_epoch_with_a_user_dataset_and_loading_workers_gives_the_uninterrupted_weights(tmp_path):
    common = [*WAVES, "--epochs", 3, "--batch-size", 4, "--data-workers", 2, "--optimizer", "adamw",
              "--lr", 0.01, "--clip-norm", 0.5]
    # Checkpoints every few milliseconds land inside epochs (13 steps each); resuming from one of them
    # must end with this run's weights (that checkpoints leave a run as it was: test_e2e_resume.py).
    _ok(launch(2, *common, "--save-model", tmp_path / "timed.pt", "--checkpoint-dir", tmp_path / "ckpt",
               "--checkpoint-every", 0, "--checkpoint-every-s", 0.01, "--keep", 1000))
    inside = [path for path in list_checkpoints(tmp_path / "ckpt") if read_checkpoint(path).position["step"] > 0]
    assert inside, "no checkpoint inside an epoch"

    resumed = _ok(launch(2, *[f for f in common if f != "--quiet"], "--resume", inside[len(inside) // 2],
                         "--save-model", tmp_path / "resumed.pt"))

    assert re.search(r"resumed from .* at epoch \d, unit [1-9]", resumed.stdout), resumed.stdout  # mid-epoch
    assert _max_diff(tmp_path / "timed.pt", tmp_path / "resumed.pt") == 0.0


def test_loading_workers_under_mpirun_are_not_forked_from_a_rank_and_never_initialise_mpi(tmp_path):
    _ok(launch(2, "train", "--quiet", "--dataset", f"{CASES}:recorder", "--model", "mlp", "--hidden", 4,
               "--data-workers", 2, "--epochs", 1, "--batch-size", 8, env={"DISTML_TEST_RECORD": str(tmp_path)}))

    ranks = {int(p.stem.split("-")[1]) for p in tmp_path.glob("rank-*.txt")}
    workers = [p.read_text().split() for p in tmp_path.glob("worker-*.txt")]
    assert len(ranks) == 2 and len(workers) == 4  # 2 workers on each of 2 ranks, all of them used
    assert sorted(rank for _, _, rank in workers) == ["0", "0", "1", "1"]  # each started by a rank's loader
    assert all(initialised == "0" and int(parent) not in ranks for initialised, parent, _ in workers)


def test_a_killed_loading_worker_ends_the_job_promptly_naming_the_rank():
    start = time.monotonic()

    done = launch(2, "train", "--quiet", "--dataset", f"{CASES}:doomed", "--model", "mlp", "--hidden", 4,
                  "--data-workers", 1, "--batch-size", 4, "--epochs", 5, timeout=60)

    assert time.monotonic() - start < 30
    assert done.returncode != 0
    assert "rank 1 of 2 failed" in done.stderr and "DataLoader worker" in done.stderr, done.stderr


@pytest.mark.parametrize("mode, flags", [
    ("async", ["--epochs", 3, "--batch-size", 8, "--lr", 0.05]),
    ("federated", ["--rounds", 8, "--partition", "natural", "--batch-size", 8, "--lr", 0.2, "--data-workers", 1]),
])
def test_async_and_federated_train_a_user_dataset(tmp_path, mode, flags):
    metrics = tmp_path / "m.jsonl"

    _ok(launch(2, "train", "--quiet", "--mode", mode, "--dataset", f"{SMALL}:labelled", "--model", "mlp",
               "--hidden", 8, "--metrics", metrics, *flags))

    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert records[-1]["test_accuracy"] >= 0.8  # a linear rule on 5 features: learned, not guessed
    assert records[-1]["test_loss"] < records[0]["test_loss"]
    if mode == "federated":
        assert records[-1]["clients"] == 7  # one per group


def test_a_dataset_function_that_raises_exits_2_with_one_line_on_every_rank_count(tmp_path):
    done = launch(2, "train", "--dataset", f"{CASES}:raises", "--metrics", tmp_path / "m.jsonl", timeout=60)

    assert done.returncode == 2
    ours = [line for line in done.stderr.splitlines() if line.startswith("distml:")]
    assert len(ours) == 1 and "raises() failed: FileNotFoundError: images/ is missing" in ours[0], done.stderr
    assert not (tmp_path / "m.jsonl").exists()
