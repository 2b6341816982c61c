"""End-to-end: `distml train --mode federated` under mpirun, as a user runs it."""
import time
from pathlib import Path

import pytest
import torch

from launch import launch, summary

from distml.cli import main

pytestmark = pytest.mark.timeout(240)

BN_MODEL = Path(__file__).parent / "mpi" / "bn_model.py"
VARIANTS = {
    "fedavg-dirichlet-dropout-avgm": ["--partition", "dirichlet", "--alpha", 0.3, "--dropout", 0.25,
                                      "--server-opt", "avgm", "--server-momentum", 0.5],
    "scaffold-shards-yogi": ["--algorithm", "scaffold", "--partition", "shards", "--server-opt", "yogi",
                             "--server-lr", 0.03, "--momentum", 0],
    "fedprox-batchnorm-adam": ["--algorithm", "fedprox", "--prox-mu", 0.1, "--server-opt", "adam",
                               "--model", f"{BN_MODEL}:make"],
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_final_weights_do_not_depend_on_the_number_of_ranks(tmp_path, variant):
    # 8 clients, 6 sampled per round, on 1, 2 and 3 ranks (8 is not divisible by 3); the other variants
    # on 1 and 3 (tests/mpi/test_federated_ranks.py holds each algorithm at 2 and 3 ranks inside a job).
    flags = ["train", "--quiet", "--mode", "federated", "--clients", 8, "--clients-per-round", 6,
             "--rounds", 3, "--local-epochs", 2, "--lr", 0.05, "--eval-every", 3, *VARIANTS[variant]]
    rank_counts = (1, 2, 3) if variant.startswith("fedavg") else (1, 3)
    saved = {}
    for ranks in rank_counts:
        path = tmp_path / f"{ranks}.pt"
        outputs = ["--save-model", path, "--metrics", tmp_path / f"{ranks}.jsonl"]
        if ranks == 1:  # the reference in this process, as `distml train` runs it: no interpreter start-up
            assert main([*map(str, flags), *map(str, outputs)]) == 0
        else:
            done = launch(ranks, *flags, *outputs)
            assert done.returncode == 0, done.stderr
        saved[ranks] = torch.load(path, weights_only=True)

    for ranks in rank_counts[1:]:
        diff = max((saved[1][k].double() - saved[ranks][k].double()).abs().max().item() for k in saved[1])
        assert diff <= 1e-5, f"{ranks} ranks differ from 1 rank by {diff}"
    counts = {summary(tmp_path / f"{r}.jsonl")["bytes_up"] for r in rank_counts}
    assert len(counts) == 1


def test_summary_and_round_records_carry_the_accounting(tmp_path):
    metrics = tmp_path / "m.jsonl"

    done = launch(2, "train", "--mode", "federated", "--clients", 6, "--fraction", 0.5, "--rounds", 4,
                  "--eval-every", 2, "--dropout", 0.3, "--target-accuracy", 0.2, "--metrics", metrics)

    assert done.returncode == 0, done.stderr
    rounds = [r for r in map(__import__("json").loads, metrics.read_text().splitlines()) if "round" in r]
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    assert all(r["clients_sampled"] == 3 == r["clients_participating"] + r["clients_dropped"] for r in rounds)
    assert ["test_accuracy" in r for r in rounds] == [False, True, False, True]
    s = summary(metrics)
    assert s["bytes_up"] == sum(r["bytes_up"] for r in rounds)
    assert s["rounds"] == 4 and s["clients"] == 6 and s["clients_per_round"] == 3
    assert "round   2/4" in done.stdout and "done: federated, 2 rank(s)" in done.stdout


@pytest.mark.parametrize("flags,expected", [
    (["--alpha", 0, "--partition", "dirichlet"], "--alpha must be > 0"),
    (["--clients", 100000], "more than the 1438 training samples"),
    (["--clients", 20, "--clients-per-round", 21], "--clients-per-round 21 is more than --clients 20"),
    (["--dropout", 1], "--dropout must be in [0, 1)"),
    (["--dropout", -0.1], "--dropout must be in [0, 1)"),
    (["--clients", 10, "--fraction", 0.5, "--clients-per-round", 3], "not both"),
    (["--dataset", "diabetes", "--model", "linear", "--partition", "shards"], "needs a classification"),
    (["--server-opt", "sgd"], "--server-opt must be one of"),
    (["--clients", 800, "--partition", "shards", "--shards-per-client", 2], "more shards"),
    (["--clients-per-round", 3], "more than the 1 clients"),
    (["--algorithm", "scaffold"], "add --momentum 0"),
    (["--dataset", "diabetes", "--model", "linear", "--target-accuracy", 0.9], "needs a classification"),
])
def test_bad_federated_input_is_one_line_and_exit_2(tmp_path, flags, expected, capsys):
    # In this process (the command's main(), as `distml train` runs it): a launch each would cost 12
    # interpreter start-ups; that the line is printed once under mpirun, test_e2e_cli's bad input shows.
    code = main(["train", "--mode", "federated", "--metrics", str(tmp_path / "m.jsonl"), *map(str, flags)])
    err = capsys.readouterr().err

    assert code == 2, err
    ours = [line for line in err.splitlines() if line.strip()]
    assert len(ours) == 1 and ours[0].startswith("distml: error:") and expected in ours[0], err
    assert not (tmp_path / "m.jsonl").exists()


def test_an_exception_in_one_ranks_client_ends_the_job_promptly(tmp_path):
    model_file = tmp_path / "fails.py"
    model_file.write_text(
        "import torch, distml\n"
        "class Fails(torch.nn.Module):\n"
        "    def __init__(self, n):\n"
        "        super().__init__(); self.lin = torch.nn.Linear(64, n); self.calls = 0\n"
        "    def forward(self, x):\n"
        "        self.calls += 1\n"
        "        if self.training and self.calls > 20 and distml.rank() == 1:\n"
        "            raise RuntimeError('client blew up')\n"
        "        return self.lin(x.flatten(1))\n"
        "def make(shape, n):\n    return Fails(n)\n")
    start = time.monotonic()

    done = launch(2, "train", "--quiet", "--mode", "federated", "--clients", 6, "--model", f"{model_file}:make",
                  timeout=60)

    assert time.monotonic() - start < 30
    assert done.returncode != 0
    assert "distml: rank 1 of 2 failed: RuntimeError: client blew up" in done.stderr
