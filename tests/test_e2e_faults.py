"""Faults under mpirun: a stalled rank is named by the hang doctor, a dead rank ends the job
promptly and by name, and under ULFM (--on-rank-failure continue) a lost rank costs time, not
results. The misbehaving rank is tests/mpi/fault_model.py (a sleep, a SIGKILL) at a chosen step.
"""
import re
import time
from pathlib import Path

import pytest
import torch

from distml.checkpoint import newest_checkpoint
from distml.cli import parse_config
from distml.strategies import federated
from distml.trainer import run
from launch import ROOT, launch, launch_python, summary

MODEL = str(ROOT / "tests" / "mpi" / "fault_model.py") + ":make"
BASE = ("train", "--model", MODEL, "--quiet", "--batch-size", 16)
ULFM = ("--with-ft", "ulfm")


def _fault(kind, rank, step, mark):
    return {"DISTML_TEST_FAULT": kind, "DISTML_TEST_FAULT_RANK": str(rank), "DISTML_TEST_FAULT_STEP": str(step),
            "DISTML_TEST_FAULT_MARK": str(mark)}


def _seconds_since(mark):
    return time.time() - float(Path(mark).read_text())


# -- the hang doctor -------------------------------------------------------------------
@pytest.mark.parametrize("mode, where", [
    ("sync", ("rank 0 has waited", "in allreduce #", "(epoch 1 step 3, bucket 1 of 1)",
              "rank 1 is in no MPI call: busy in epoch 1 step 3")),
    ("federated", ("rank 0 has waited", "(round 2, the clients' summed updates)",
                   "rank 1 is in no MPI call: busy in round 2")),
    ("sync-zero2", ("rank 0 has waited", "in reduce_scatter #",
                    "(epoch 1 step 3, the sharded optimizer's gradient slices (group 1, bucket 1 of 1)",
                    "rank 1 is in no MPI call: busy in epoch 1 step 3")),
])
def test_watchdog_names_where_each_rank_is_when_one_stalls(tmp_path, mode, where):
    """Rank 1 sleeps an hour in a step (federated: in a client of round 2); rank 0 waits in the
    step's allreduce. Within --watchdog + 10 s the job ends with exit 124 and one report naming
    both positions and the call at which their sequences part."""
    mark = tmp_path / "mark"
    args = {"sync": ("--epochs", 1), "sync-zero2": ("--epochs", 1, "--zero", 2),
            "federated": ("--mode", "federated", "--rounds", 3, "--local-steps", 2)}[mode]
    # sync: the third step; federated: rank 1 trains one client a round, 2 steps each: round 2
    done = launch(2, *BASE, *args, "--watchdog", 3, env=_fault("sleep", 1, 3, mark), timeout=90)
    assert done.returncode == 124, done.stderr
    assert _seconds_since(mark) < 3 + 10 + 3  # + 3: mpirun's tear-down after the abort
    report = done.stderr
    assert report.count("distml: watchdog: a rank has waited over 3 s") == 1, report
    for text in where:
        assert text in report, report
    call = "reduce_scatter" if mode == "sync-zero2" else "allreduce"
    first = re.search(rf"first differ at #(\d+): rank 0 entered {call} .*; rank 1 has not entered it", report)
    waited = re.search(rf"rank 0 has waited \d+ s in {call} #(\d+)", report)
    assert first and waited and first.group(1) == waited.group(1), report


def test_watchdog_without_thread_multiple_has_each_stalled_rank_report_itself(tmp_path):
    """MPI_THREAD_SERIALIZED: the watchdog thread makes no MPI call; both ranks print their own line."""
    mark = tmp_path / "mark"
    env = {**_fault("sleep", 1, 3, mark), "MPI4PY_RC_THREAD_LEVEL": "serialized"}
    done = launch(2, *BASE, "--epochs", 1, "--watchdog", 3, env=env, timeout=90)
    assert done.returncode == 124, done.stderr
    assert re.search(r"rank 0 has waited \d+ s in allreduce #\d+ \(epoch 1 step 3, bucket 1 of 1\)", done.stderr)
    assert "rank 1 is in no MPI call: busy in epoch 1 step 3" in done.stderr
    assert done.stderr.count("without MPI_THREAD_MULTIPLE each rank reports only itself") == 2


# -- a dead rank ends the job, by name, and leaves the newest checkpoint valid -------------
@pytest.mark.parametrize("mode, args, ranks, mpirun_args, named", [
    ("sync", ("--epochs", 3), 2, (), "process rank 1 with PID"),  # mpirun's own line names it
    ("federated", ("--mode", "federated", "--rounds", 4, "--local-steps", 2, "--clients", 4), 3, ULFM,
     "distml: rank 1 of 3 was lost (seen by rank 0 in allreduce #"),
    ("async", ("--mode", "async", "--epochs", 3), 3, ULFM, "distml: rank 1 of 3 was lost (seen by rank 0 in"),
])
def test_a_killed_rank_ends_the_job_fast_and_by_name_keeping_the_newest_checkpoint(tmp_path, mode, args, ranks,
                                                                                    mpirun_args, named):
    """SIGKILL of rank 1 in the second epoch (round): under plain mpirun and under ULFM with the
    default --on-rank-failure abort, the job ends nonzero within 30 s, the rank is named once, and
    the checkpoint of the first epoch loads."""
    mark, ckpt = tmp_path / "mark", tmp_path / "ckpt"
    step = {"sync": 60, "federated": 5, "async": 60}[mode]  # in the second epoch / round / segment
    done = launch(ranks, *BASE, *args, "--checkpoint-dir", ckpt, env=_fault("kill", 1, step, mark),
                  mpirun_args=mpirun_args, timeout=90)
    assert done.returncode != 0
    assert _seconds_since(mark) < 30
    assert (done.stdout + done.stderr).count(named) == 1, done.stderr
    path, loaded, damaged = newest_checkpoint(ckpt)
    assert damaged == []
    assert path is not None and loaded.position["epoch"] >= 1


def test_continue_without_ulfm_is_refused_before_training(tmp_path):
    done = launch(2, *BASE, "--epochs", 1, "--on-rank-failure", "continue", "--save-model", tmp_path / "m.pt")
    assert done.returncode == 2
    assert done.stderr.count("--on-rank-failure continue needs an MPI that survives a lost rank (ULFM)") == 1
    assert not (tmp_path / "m.pt").exists()


# -- ULFM: a lost rank costs time, not results -----------------------------------------------
def _in_process(args, tmp_path, name):
    """The reference run in this process (one rank): its final weights."""
    path = tmp_path / name
    run(parse_config([*map(str, BASE), *map(str, args), "--save-model", str(path)]))
    return torch.load(path, weights_only=True)


def _max_difference(a, b):
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


USER_DATA = Path(__file__).parent / "mpi" / "workload_data.py"


@pytest.mark.parametrize("data, where", [
    ((), "epoch 1 step 5"),
    # a user Dataset of 120 samples (3 steps an epoch) read by a loading worker on each rank
    (("--dataset", f"{USER_DATA}:labelled", "--data-workers", 1, "--epochs", 3), "epoch 2 step 2"),
], ids=["digits", "user-dataset-with-workers"])
def test_sync_losing_rank_2_of_3_mid_epoch_ends_with_the_uninterrupted_weights(tmp_path, data, where):
    """3 ranks x 16, rank 2 killed at its 5th step: the survivors split each global batch of 48
    over 2 ranks, redo the step, and end where 1 rank x 48 (== 3 x 16 uninterrupted) ends."""
    common = ("--epochs", 2, "--lr-schedule", "constant", *data)
    lost = launch(3, *BASE, *common, "--on-rank-failure", "continue", "--save-model", tmp_path / "lost.pt",
                  "--metrics", tmp_path / "m.jsonl", env=_fault("kill", 2, 5, tmp_path / "mark"),
                  mpirun_args=ULFM, timeout=120)
    assert lost.returncode == 0, lost.stderr
    assert lost.stderr.count(f"distml: lost rank(s) 2 at {where}") == 1, lost.stderr
    s = summary(tmp_path / "m.jsonl")
    assert [r["rank"] for r in s["ranks_lost"]] == [2] and s["global_batch_size"] == 48 and s["world_size"] == 2
    reference = _in_process((*common, "--batch-size", 48), tmp_path, "one.pt")
    weights = torch.load(tmp_path / "lost.pt", weights_only=True)
    assert _max_difference(weights, reference) < 1e-5
    first = _in_process((*common, "--epochs", 1, "--batch-size", 48), tmp_path, "e1.pt")
    assert _max_difference(weights, first) > 1e-3  # the comparison can tell training apart


def test_federated_losing_a_rank_drops_its_clients_for_that_round_only(tmp_path, monkeypatch):
    """Rank 2 of 3 dies in round 2: the clients dealt to it that round count as dropped, later
    rounds go to the survivors; the weights equal a one-rank run in which exactly those clients
    dropped out of round 2."""
    common = ("--mode", "federated", "--rounds", 4, "--clients", 6, "--local-steps", 2)
    lost = launch(3, *BASE, *common, "--on-rank-failure", "continue", "--save-model", tmp_path / "lost.pt",
                  "--metrics", tmp_path / "m.jsonl", env=_fault("kill", 2, 5, tmp_path / "mark"),
                  mpirun_args=ULFM, timeout=120)
    assert lost.returncode == 0, lost.stderr
    s = summary(tmp_path / "m.jsonl")
    dropped = s["clients_lost"]["2"]
    assert len(dropped) == 2 and [r["rank"] for r in s["ranks_lost"]] == [2]
    original = federated.sample_clients

    def without_lost(seed, round_, *args):
        sampled, survivors = original(seed, round_, *args)
        return sampled, [c for c in survivors if round_ != 1 or c not in dropped]

    monkeypatch.setattr(federated, "sample_clients", without_lost)
    reference = _in_process(common, tmp_path, "dropout.pt")
    weights = torch.load(tmp_path / "lost.pt", weights_only=True)
    assert _max_difference(weights, reference) < 1e-5
    monkeypatch.setattr(federated, "sample_clients", original)
    everyone = _in_process(common, tmp_path, "all.pt")
    assert _max_difference(weights, everyone) > 1e-4  # dropping them made a difference


def test_async_losing_a_worker_finishes_the_budget_with_the_others(tmp_path):
    """1 server, 3 workers; worker rank 2 dies mid-segment: every gradient of the budget
    (epochs x batches of all shards) is still applied, by the two survivors."""
    lost = launch(4, *BASE, "--mode", "async", "--epochs", 2, "--on-rank-failure", "continue",
                  "--metrics", tmp_path / "m.jsonl", env=_fault("kill", 2, 5, tmp_path / "mark"),
                  mpirun_args=ULFM, timeout=120)
    assert lost.returncode == 0, lost.stderr
    s = summary(tmp_path / "m.jsonl")
    assert s["updates_applied"] == 2 * 3 * 30  # 1437 samples in 3 shards of 479: 30 batches of 16 each
    assert [r["rank"] for r in s["ranks_lost"]] == [2] and len(s["worker_samples"]) == 2
    assert s["test_accuracy"] > 0.8


# -- the Python API ---------------------------------------------------------------------
def test_an_uncaught_exception_in_a_python_api_script_ends_every_rank_by_name(tmp_path):
    script = tmp_path / "train.py"
    script.write_text("import distml\n"
                      "distml.init()\n"
                      "if distml.rank() == 1:\n"
                      "    raise RuntimeError('boom')\n"
                      "distml.allreduce(1.0)  # rank 0 waits here for a rank that is gone\n"
                      "print('rank', distml.rank(), 'finished')\n")

    started = time.monotonic()
    done = launch_python(2, script, timeout=60)

    assert done.returncode != 0
    assert time.monotonic() - started < 30
    assert "distml: rank 1 of 2 failed: RuntimeError: boom (aborting all ranks)" in done.stderr
    assert "Traceback" in done.stderr and "finished" not in done.stdout


@pytest.mark.parametrize("settings,line", [
    ("epochs=-1", "--epochs must be >= 1, got -1"),
    ("epocs=3", "unknown setting 'epocs'"),
    ("'run.toml'", "distml.train() takes a distml.Config or keyword settings, not both"),
])
def test_a_usage_error_of_distml_train_in_a_script_is_one_line_and_exit_2(tmp_path, settings, line):
    script = tmp_path / "train.py"
    script.write_text(f"import distml\ndistml.init()\ndistml.train({settings}, quiet=True)\n")

    done = launch_python(2, script, timeout=60)

    assert done.returncode == 2
    ours = [text for text in done.stderr.splitlines() if "distml" in text or "Traceback" in text]
    assert len(ours) == 1 and ours[0].startswith(f"distml: error: {line}"), done.stderr  # every rank raised it
