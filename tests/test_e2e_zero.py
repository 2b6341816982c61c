"""End-to-end (WIP, issue 23): a run checkpointed with --zero 1 resumes on another world size, with or
without --zero, to the uninterrupted run's weights."""
import torch

from launch import launch

COMMON = ["train", "--quiet", "--epochs", 3, "--optimizer", "adamw", "--lr", 0.01, "--weight-decay", 0.1,
          "--hidden", "32"]


def _ok(done):
    assert done.returncode == 0, done.stderr


def _max_diff(a, b):
    a, b = (torch.load(p, weights_only=True) for p in (a, b))
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_zero_checkpoint_from_two_ranks_resumes_on_three_and_on_one_without_zero(tmp_path):
    _ok(launch(2, *COMMON, "--batch-size", 30, "--zero", 1, "--save-model", tmp_path / "full.pt",
               "--checkpoint-dir", tmp_path / "ckpt", "--keep", 10))
    after_1 = tmp_path / "ckpt" / "checkpoint-000000024.pt"  # 1438 / 60: 24 steps an epoch

    _ok(launch(3, *COMMON, "--batch-size", 20, "--zero", 1, "--resume", after_1, "--save-model", tmp_path / "three.pt"))
    _ok(launch(1, *COMMON, "--batch-size", 60, "--resume", after_1, "--save-model", tmp_path / "one.pt"))

    assert _max_diff(tmp_path / "full.pt", tmp_path / "three.pt") <= 1e-5
    assert _max_diff(tmp_path / "full.pt", tmp_path / "one.pt") <= 1e-5
