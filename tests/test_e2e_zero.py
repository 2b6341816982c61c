"""End-to-end: a run checkpointed with --zero resumes on another world size, with or without --zero
and at the other stage, to the uninterrupted run's weights."""
import torch

from launch import launch

COMMON = ["train", "--quiet", "--epochs", 3, "--optimizer", "adamw", "--lr", 0.01, "--weight-decay", 0.1,
          "--hidden", "32", "--clip-norm", 1.0]


def _ok(done):
    assert done.returncode == 0, done.stderr


def _max_diff(a, b):
    a, b = (torch.load(p, weights_only=True) for p in (a, b))
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_zero_checkpoints_resume_across_world_sizes_stages_and_without_zero(tmp_path):
    # 1438 digits in global batches of 60: 24 steps an epoch, the last one uneven (58)
    _ok(launch(2, *COMMON, "--batch-size", 30, "--zero", 1, "--save-model", tmp_path / "full.pt",
               "--checkpoint-dir", tmp_path / "two", "--keep", 10))
    _ok(launch(3, *COMMON, "--batch-size", 20, "--zero", 2, "--resume", tmp_path / "two" / "checkpoint-000000024.pt",
               "--save-model", tmp_path / "three.pt", "--checkpoint-dir", tmp_path / "three", "--keep", 10))
    _ok(launch(1, *COMMON, "--batch-size", 60, "--resume", tmp_path / "three" / "checkpoint-000000048.pt",
               "--save-model", tmp_path / "one.pt"))

    assert _max_diff(tmp_path / "full.pt", tmp_path / "three.pt") <= 1e-5  # 2 (zero 1) -> 3 (zero 2)
    assert _max_diff(tmp_path / "full.pt", tmp_path / "one.pt") <= 1e-5  # 3 (zero 2) -> 1 (no zero)
