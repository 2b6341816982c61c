"""End-to-end: the `distml` CLI under mpirun, as a user runs it."""
import os
import subprocess
import sys
import time

import pytest
import torch

from launch import ROOT, launch, launch_mpmd, summary

from distml.cli import main

pytestmark = pytest.mark.timeout(180)


def _max_diff(path_a, path_b):
    a, b = (torch.load(p, weights_only=True) for p in (path_a, path_b))
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("optimizer,lr", [("sgd", 0.05), ("adam", 0.002)])
def test_sync_two_and_three_ranks_equal_one_rank_uneven_batch(tmp_path, optimizer, lr):
    # digits has 1438 training samples: 60 does not divide it, so the last global batch is partial.
    # 5 epochs: with Adam and the default cosine schedule, 4 epochs on 2 ranks meet a point where the
    # rounding-level difference of summing two half-batches grows to 1.4e-4 (3 and 5 epochs: 6e-7).
    common = ["train", "--quiet", "--epochs", 5, "--optimizer", optimizer, "--lr", lr,
              "--momentum", 0.9, "--weight-decay", 1e-4]
    # One rank in this process, as `distml train` runs it (no interpreter start-up); 2 and 3 under mpirun.
    assert main([*map(str, common), "--batch-size", "60", "--save-model", str(tmp_path / "1.pt")]) == 0
    for ranks, batch in {2: 30, 3: 20}.items():
        done = launch(ranks, *common, "--batch-size", batch, "--save-model", tmp_path / f"{ranks}.pt")
        assert done.returncode == 0, done.stderr

    assert _max_diff(tmp_path / "1.pt", tmp_path / "2.pt") <= 1e-5
    assert _max_diff(tmp_path / "1.pt", tmp_path / "3.pt") <= 1e-5


def test_default_run_reaches_95_percent_and_writes_metrics(tmp_path):
    metrics = tmp_path / "m.jsonl"

    done = launch(2, "train", "--metrics", metrics)

    assert done.returncode == 0, done.stderr
    s = summary(metrics)
    assert s["test_accuracy"] >= 0.95
    for key in ("mode", "world_size", "epochs", "train_loss", "test_loss", "test_accuracy",
                "wall_time_s", "samples_per_s", "bytes_communicated"):
        assert key in s
    assert s["world_size"] == 2 and s["mode"] == "sync"
    epochs = metrics.read_text().splitlines()[:-1]
    assert len(epochs) == s["epochs"]
    assert "done: sync, 2 rank(s)" in done.stdout
    assert done.stdout.count("epoch  20/20") == 1  # printed by rank 0 only


def test_bytes_communicated_counts_every_ranks_gradient_payload(tmp_path):
    metrics = tmp_path / "m.jsonl"

    done = launch(2, "train", "--quiet", "--epochs", 1, "--batch-size", 719, "--model", "logreg",
                  "--metrics", metrics)

    assert done.returncode == 0, done.stderr
    params = 64 * 10 + 10
    steps = 1  # 1438 samples = one global batch of 2 x 719
    gradient_bytes = 2 * steps * params * 4
    # plus one broadcast of the initial weights and the small metric reductions
    assert gradient_bytes < summary(metrics)["bytes_communicated"] < gradient_bytes + params * 4 + 1000


def test_regression_on_diabetes_reports_mse_and_r2(tmp_path):
    metrics = tmp_path / "m.jsonl"

    done = launch(2, "train", "--quiet", "--dataset", "diabetes", "--model", "linear",
                  "--epochs", 30, "--lr", 0.01, "--metrics", metrics)

    assert done.returncode == 0, done.stderr
    s = summary(metrics)
    assert "test_accuracy" not in s
    assert s["test_r2"] > 0.3 and s["test_mse"] > 0


def test_single_process_runs_without_mpirun(tmp_path):
    done = launch(0, "train", "--quiet", "--epochs", 1, "--model", "cnn", "--save-model", tmp_path / "w.pt")

    assert done.returncode == 0, done.stderr
    assert (tmp_path / "w.pt").exists()


def test_output_cut_short_by_a_closed_pipe_ends_quietly_with_141():
    done = subprocess.run(f"{sys.executable} -m distml train --epochs 50 | head -1; exit ${{PIPESTATUS[0]}}",
                          shell=True, cwd=ROOT, capture_output=True, text=True, timeout=120, executable="/bin/bash",
                          env={**os.environ, "PYTHONPATH": str(ROOT)})

    assert done.returncode == 141  # as a shell reports a process ended by SIGPIPE
    assert done.stdout.startswith("distml: sync on 1 rank(s)") and done.stdout.count("\n") == 1
    assert done.stderr == ""  # no traceback, no "failed: BrokenPipeError"


def test_info_reports_mpi_and_world_size():
    done = launch(2, "info")

    assert done.returncode == 0, done.stderr
    assert "Open MPI" in done.stdout or "MPICH" in done.stdout
    assert "world size    2" in done.stdout
    assert done.stdout.count("distml ") == 1  # root only


def test_exception_on_one_rank_ends_the_job_naming_the_rank(tmp_path):
    model_file = tmp_path / "failing.py"
    model_file.write_text(
        "import torch\nimport distml\n"
        "class Failing(torch.nn.Module):\n"
        "    def __init__(self, n):\n"
        "        super().__init__(); self.lin = torch.nn.Linear(64, n); self.calls = 0\n"
        "    def forward(self, x):\n"
        "        self.calls += 1\n"
        "        if self.training and self.calls > 3 and distml.rank() == 1:\n"
        "            raise RuntimeError('simulated failure')\n"
        "        return self.lin(x.flatten(1))\n"
        "def make(shape, n):\n    return Failing(n)\n")
    start = time.monotonic()

    done = launch(3, "train", "--quiet", "--model", f"{model_file}:make", timeout=60)

    assert time.monotonic() - start < 30
    assert done.returncode != 0
    assert "rank 1 of 3 failed: RuntimeError: simulated failure" in done.stderr
    assert "Traceback" not in done.stderr


BAD_INPUTS = {
    "unknown model": (["--model", "resnet9000"], "--model must be one of"),
    "unknown data set": (["--dataset", "imagenet"], "--dataset must be one of"),
    "missing data file": (["--dataset", "missing.csv"], "no such file"),
    "malformed csv": (["--dataset", "{bad_csv}"], "is not a number"),
    "npz without y": (["--dataset", "{bad_npz}"], "missing array(s) y"),
    "batch size 0": (["--batch-size", "0"], "--batch-size must be >= 1"),
    "unknown flag": (["--learning-rate", "0.1"], "unrecognized arguments"),
    "bad flag value": (["--optimizer", "rmsprop"], "--optimizer must be one of"),
    "not a number": (["--epochs", "ten"], "invalid int value"),
    "model/data mismatch": (["--model", "cnn", "--dataset", "diabetes"], "needs image-shaped"),
    "bad config file": (["--config", "{bad_toml}"], "unknown key"),
    "save-model into missing dir": (["--save-model", "no/such/dir/w.pt"], "does not exist"),
    "zero outside sync": (["--mode", "federated", "--zero", "1"], "--zero shards sync mode's optimizer"),
    "zero with overlap": (["--zero", "2", "--overlap"], "--zero with --overlap"),
    "zero stage 3": (["--zero", "3"], "--zero must be 0, 1 or 2"),
    "zero with continue": (["--zero", "1", "--on-rank-failure", "continue"], "no other rank holds a copy"),
}


@pytest.fixture
def bad_files(tmp_path):
    import numpy as np
    (tmp_path / "bad.csv").write_text("a,b,target\n1,2,0\n3,oops,1\n4,5,0\n")
    np.savez(tmp_path / "bad.npz", X=np.zeros((4, 2)))
    (tmp_path / "bad.toml").write_text("epochs = 2\nlearning_rate = 0.1\n")
    return {"bad_csv": tmp_path / "bad.csv", "bad_npz": tmp_path / "bad.npz",
            "bad_toml": tmp_path / "bad.toml"}


UNDER_MPIRUN = ("unknown flag", "malformed csv")  # a parse error and a data error at 2 ranks: printed once


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_exits_2_with_one_line_before_training(tmp_path, bad_files, case, capsys, monkeypatch):
    flags, expected = BAD_INPUTS[case]
    flags = [f.format(**bad_files) for f in flags]
    keep = tmp_path / "keep.pt"
    keep.write_bytes(b"previous weights")

    if case in UNDER_MPIRUN:
        done = launch(2, "train", *flags, "--metrics", tmp_path / "m.jsonl", cwd=tmp_path, timeout=60)
        code, out, err = done.returncode, done.stdout, done.stderr
    else:  # the command's main() in this process: the same path, without an interpreter start-up each
        monkeypatch.chdir(tmp_path)
        code = main(["train", *flags, "--metrics", str(tmp_path / "m.jsonl")])
        out, err = capsys.readouterr()

    assert code == 2, err
    ours = [line for line in err.splitlines() if line.startswith("distml:")]
    assert len(ours) == 1 and expected in ours[0], err
    assert "Traceback" not in err and "epoch" not in out
    assert not (tmp_path / "m.jsonl").exists()
    assert keep.read_bytes() == b"previous weights"


def _distml_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("distml:")]


def test_ranks_given_different_settings_exit_2_before_training():
    # MPMD: rank 0 runs with --epochs 1, rank 1 with --epochs 2; a hang would hit the timeout
    done = launch_mpmd(["train", "--epochs", 1, "--quiet"], ["train", "--epochs", 2, "--quiet"], timeout=60)

    assert done.returncode == 2, done.stderr
    ours = _distml_lines(done.stderr)
    assert len(ours) == 1 and "ranks disagree" in ours[0] and "rank 1 differs" in ours[0], done.stderr
    assert "Traceback" not in done.stderr and "epoch" not in done.stdout


def test_user_model_failing_on_one_rank_exits_2_naming_that_rank(tmp_path):
    model_file = tmp_path / "one_rank_fails.py"
    model_file.write_text(
        "import math\nimport distml\nfrom torch import nn\n"
        "def make(shape, n):\n"
        "    if distml.rank() == 1:\n"
        "        raise ValueError('no such layer on this host')\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(shape), n))\n")

    done = launch(2, "train", "--quiet", "--model", f"{model_file}:make", timeout=60)

    assert done.returncode == 2, done.stderr
    ours = _distml_lines(done.stderr)
    assert len(ours) == 1, done.stderr
    assert ours[0].startswith("distml: error: rank 1: --model")
    assert "ValueError: no such layer on this host" in ours[0]
    assert "Traceback" not in done.stderr and "epoch" not in done.stdout


def test_config_file_sets_values_and_flags_win(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('epochs = 1\nbatch-size = 64\nmodel = "logreg"\nlr = 0.5\n')
    metrics = tmp_path / "m.jsonl"

    done = launch(2, "train", "--quiet", "--config", config, "--epochs", 2, "--metrics", metrics)

    assert done.returncode == 0, done.stderr
    s = summary(metrics)
    assert (s["epochs"], s["batch_size"], s["model"]) == (2, 64, "logreg")


def test_sync_batchnorm_model_trains_when_the_last_global_batch_is_tiny(tmp_path):
    # 1438 = 3 x 478 + 4: an even split of the last 4 over 3 ranks gives a rank 1 sample, which
    # BatchNorm refuses in training mode; the split gives 2, 2 and 0 instead.
    bn_model = ROOT / "tests" / "mpi" / "bn_model.py"
    metrics = tmp_path / "m.jsonl"

    done = launch(3, "train", "--quiet", "--epochs", 3, "--batch-size", 478, "--model", f"{bn_model}:make",
                  "--metrics", metrics)

    assert done.returncode == 0, done.stderr
    assert summary(metrics)["epochs"] == 3


def test_default_schedule_trains_diabetes_linear_where_a_constant_rate_bounces(tmp_path):
    # The example: at a constant rate the last iterate ended at R^2 0.09 (seed 0).
    common = ["train", "--quiet", "--dataset", "diabetes", "--model", "linear", "--epochs", 200]

    default = launch(2, *common, "--metrics", tmp_path / "d.jsonl")
    constant = launch(2, *common, "--lr-schedule", "constant", "--metrics", tmp_path / "c.jsonl")

    assert default.returncode == 0 and constant.returncode == 0, default.stderr + constant.stderr
    assert summary(tmp_path / "d.jsonl")["test_r2"] >= 0.4
    assert summary(tmp_path / "c.jsonl")["test_r2"] < 0.2
