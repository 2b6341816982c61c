"""End-to-end --on-nan: a model that goes NaN at its k-th training forward on one rank (tests/mpi/nan_model.py).

stop: every rank exits 65 at that step, one line names it, and no checkpoint is written there.
skip: that update is made by no rank, the run finishes and counts it.
"""
import json
import math

import pytest
import torch

from launch import ROOT, launch, summary

from distml.checkpoint import list_checkpoints
from distml.nonfinite import EXIT_NONFINITE

pytestmark = pytest.mark.timeout(180)

NAN_MODEL = f"{ROOT / 'tests' / 'mpi' / 'nan_model.py'}:make"
COMMON = ("train", "--quiet", "--dataset", "digits", "--model", NAN_MODEL, "--batch-size", 32, "--momentum", 0)
# digits: 1,437 training samples, so 23 sync steps of 2 x 32 an epoch; async's one worker: 45 batches of 32.
MODES = {
    "sync": ("--epochs", 2),
    "federated": ("--mode", "federated", "--rounds", 4, "--local-steps", 1),  # one forward per rank per round
    "async": ("--mode", "async", "--epochs", 2),  # rank 0 serves, rank 1 works
}
STOPS = {  # the training forward of rank 1 that goes NaN, where that is, the last checkpoint before it
    "sync": (26, "epoch 2, step 3 of 23", "checkpoint-000000023.pt"),
    "federated": (3, "round 3", "checkpoint-000000002.pt"),
    "async": (60, "epoch 2", "checkpoint-000000045.pt"),
}


def _nan_at(monkeypatch, step, rank=1, factor="nan"):
    monkeypatch.setenv("DISTML_TEST_NAN_STEP", str(step))
    monkeypatch.setenv("DISTML_TEST_NAN_RANK", str(rank))
    monkeypatch.setenv("DISTML_TEST_NAN_FACTOR", factor)


def _distml_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("distml:")]


@pytest.mark.parametrize("mode", STOPS)
def test_nan_on_one_rank_stops_every_rank_with_exit_65_one_line_and_no_checkpoint_there(tmp_path, monkeypatch,
                                                                                         mode):
    step, where, newest = STOPS[mode]
    _nan_at(monkeypatch, step)
    done = launch(2, *COMMON, *MODES[mode], "--checkpoint-dir", tmp_path / "ckpt", timeout=90)

    assert done.returncode == EXIT_NONFINITE, done.stderr
    assert _distml_lines(done.stderr) == [
        f"distml: non-finite loss at {where} on rank 1: every rank stopped there, no checkpoint written "
        f"(the newest one is the last good state); exit 65"]
    assert list_checkpoints(tmp_path / "ckpt")[-1].endswith(newest)


SKIPS = {"sync": (26, "epoch", 2, "epoch 2, step 3 of 23"), "federated": (3, "round", 3, "round 3")}


@pytest.mark.parametrize("mode", SKIPS)
def test_skip_leaves_the_weights_of_a_run_whose_step_changed_nothing(tmp_path, monkeypatch, mode):
    """NaN on rank 1 with --on-nan skip against a reference where that step's output is multiplied by 0 on
    every rank: its gradients are exactly 0, and with plain SGD (momentum 0, no weight decay; federated:
    server avg with lr 1) a zero step leaves every weight as it was, bit for bit, as skipping it must.
    A skip that reached only some ranks puts the NaN into the summed gradients (NaN weights); no skip at
    all does the same; a skip of another step, or of one more, gives other weights than the reference,
    which differs from the unskipped run by that step's real update.
    """
    step, unit, number, where = SKIPS[mode]
    runs = {}
    for name, rank, factor in (("nan", 1, "nan"), ("zero", -1, "0")):
        _nan_at(monkeypatch, step, rank, factor)
        runs[name] = launch(2, *COMMON, *MODES[mode], "--on-nan", "skip", "--save-model", tmp_path / f"{name}.pt",
                            "--metrics", tmp_path / f"{name}.jsonl", timeout=90)
        assert runs[name].returncode == 0, runs[name].stderr

    nan, zero = (torch.load(tmp_path / f"{name}.pt", weights_only=True) for name in ("nan", "zero"))
    assert all(torch.equal(nan[k], zero[k]) for k in zero)
    assert _distml_lines(runs["nan"].stderr) == [
        f"distml: warning: non-finite loss at {where} on rank 1: 1 update(s) skipped on every rank (1 so far)"]
    assert _distml_lines(runs["zero"].stderr) == []
    assert [summary(tmp_path / f"{name}.jsonl")["nonfinite_skipped"] for name in ("nan", "zero")] == [1, 0]
    records = [json.loads(line) for line in (tmp_path / "nan.jsonl").read_text().splitlines()[:-1]]
    assert {r[unit]: r["nonfinite_skipped"] for r in records if r["nonfinite_skipped"]} == {number: 1}


def test_async_skip_drops_the_batch_on_its_worker_and_still_applies_the_whole_budget(tmp_path, monkeypatch):
    _nan_at(monkeypatch, 30)
    done = launch(2, *COMMON, *MODES["async"], "--on-nan", "skip", "--save-model", tmp_path / "w.pt",
                  "--metrics", tmp_path / "m.jsonl", timeout=90)

    assert done.returncode == 0, done.stderr
    assert _distml_lines(done.stderr) == [
        "distml: warning: non-finite loss at epoch 1 on rank 1: 1 update(s) skipped on every rank (1 so far)"]
    result = summary(tmp_path / "m.jsonl")
    assert result["nonfinite_skipped"] == 1 and result["updates_applied"] == 2 * 45  # no update lost
    weights = torch.load(tmp_path / "w.pt", weights_only=True)
    assert all(torch.isfinite(w).all() for w in weights.values()) and math.isfinite(result["train_loss"])
