"""`distml compare`: the curves and the time/bytes to a target (pure), and the command under mpirun."""
import csv

import pytest

from distml.cli import main
from distml.compare import _modes, curve, federated_rounds, format_table, to_target
from distml.config import Config, UsageError
from launch import launch

MODES = ["sync", "async", "federated"]


def _history(unit, accuracies, seconds=0.5, bytes_each=1000):
    """Records as the trainer writes them; None: an epoch without evaluation."""
    records = []
    for i, acc in enumerate(accuracies):
        record = {unit: i + 1, f"{unit}_time_s": seconds, "samples": 10, "bytes_communicated": bytes_each * (i + 1)}
        if acc is not None:
            record.update(test_loss=1.0, test_accuracy=acc)
        records.append(record)
    return records


# -- pure parts ----------------------------------------------------------------------
def test_curve_adds_up_training_time_and_keeps_only_evaluated_epochs():
    # Prepare
    history = _history("epoch", [0.5, None, 0.8])

    # Execute
    points = curve(history, "epoch")

    # Assert
    assert [p["epoch"] for p in points] == [1, 3]
    assert [p["time_s"] for p in points] == [0.5, 1.5]  # epoch 2's time counts though it was not evaluated
    assert [p["bytes"] for p in points] == [1000, 3000]


def test_to_target_is_the_first_evaluation_at_or_above_the_target():
    # Prepare
    points = curve(_history("round", [0.5, 0.9, 0.85, 0.95]), "round")

    # Execute
    reached = to_target(points, 0.9)

    # Assert: exactly 0.9 counts; the later, higher one does not
    assert (reached["round"], reached["time_s"], reached["bytes"]) == (2, 1.0, 2000)


def test_to_target_is_none_when_no_evaluation_reaches_it():
    # Prepare
    points = curve(_history("epoch", [0.5, 0.89999]), "epoch")

    # Execute / Assert
    assert to_target(points, 0.9) is None


@pytest.mark.parametrize("settings, size, rounds", [
    (dict(epochs=20), 2, 20),                                                  # a client per rank, all, 1 pass
    (dict(epochs=20, local_epochs=5), 2, 4),
    (dict(epochs=20, clients=10, clients_per_round=5, local_epochs=2), 4, 20),  # half the clients, 2 passes
    (dict(epochs=1, local_epochs=5), 2, 1),                                    # at least one round
])
def test_federated_rounds_make_the_same_passes_over_the_data(settings, size, rounds):
    # Prepare / Execute / Assert
    assert federated_rounds(Config(mode="federated", **settings), size) == rounds


def test_table_says_not_reached_for_a_mode_below_the_target():
    # Prepare
    rows = [{"mode": "sync", "layout": "2 ranks", "passes": 3.0, "test_accuracy": 0.95, "train_time_s": 1.0,
             "wall_time_s": 2.0, "bytes_communicated": 5e6, "target_accuracy": 0.9, "to_target": "epoch 2",
             "time_to_target_s": 0.7, "bytes_to_target": 3e6},
            {"mode": "async", "layout": "1 server + 1 worker", "passes": 3.0, "test_accuracy": 0.85,
             "train_time_s": 1.5, "wall_time_s": 2.5, "bytes_communicated": 9e6, "target_accuracy": 0.9,
             "to_target": None, "time_to_target_s": None, "bytes_to_target": None}]

    # Execute
    lines = format_table(rows).splitlines()

    # Assert
    assert "reached 0.9 at" in lines[0]
    assert lines[2].split(" | ")[-3:] == ["epoch 2", "0.70", "3.0 |"]
    assert lines[3].split(" | ")[-3:] == ["not reached", "–", "– |"]


def test_async_on_one_process_is_a_usage_error_naming_the_fix():
    # Prepare / Execute / Assert
    with pytest.raises(UsageError, match="async mode, which needs at least 2 ranks.*--modes sync,federated"):
        _modes("sync,async,federated", 1)
    assert _modes("sync, federated", 1) == ["sync", "federated"]


# -- the command under mpirun --------------------------------------------------------
@pytest.mark.timeout(90)
def test_compare_trains_three_modes_on_the_same_budget_and_writes_table_csv_and_png(tmp_path):
    out = tmp_path / "cmp"

    done = launch(2, "compare", "--epochs", 3, "--threads", 1, "--target-accuracy", 0.5, "--out", out, timeout=80)

    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader((out / "compare.csv").open()))
    assert [r["mode"] for r in rows] == MODES
    by_mode = {r["mode"]: r for r in rows}
    for r in rows:
        assert 0.5 <= float(r["test_accuracy"]) <= 1  # each mode learned something in 3 passes
        assert float(r["passes"]) == pytest.approx(3.0)  # the same budget: samples trained / training set
        assert int(r["bytes_communicated"]) > 0 and float(r["train_time_s"]) > 0
        assert 0 < float(r["time_to_target_s"]) <= float(r["train_time_s"]) + 1e-9
        assert 0 < int(r["bytes_to_target"]) <= int(r["bytes_communicated"])
    # per step allreduce moves more than one averaging per round over the same passes
    assert int(by_mode["sync"]["bytes_communicated"]) > 5 * int(by_mode["federated"]["bytes_communicated"])
    assert by_mode["async"]["layout"] == "1 server + 1 worker"
    curves = list(csv.DictReader((out / "compare_curves.csv").open()))
    for mode in MODES:
        points = [(float(c["time_s"]), int(c["bytes"])) for c in curves if c["mode"] == mode]
        assert len(points) == 3 and points == sorted(points)  # an evaluation per epoch (round); both grow
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert all((out / f"{m}.jsonl").exists() for m in MODES)
    assert [f"compare: {i + 1}/3 {m}" in done.stdout for i, m in enumerate(MODES)] == [True] * 3  # progress
    assert done.stdout.count("| federated |") == 1  # the table, from rank 0 only


def test_compare_with_a_bad_mode_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "cmp"

    code = main(["compare", "--modes", "sync,federal", "--out", str(out)])  # in this process: no start-up
    err = capsys.readouterr().err

    assert code == 2
    assert err.strip().splitlines() == [
        "distml: error: --modes must be a comma-separated list of sync, async, federated, each once, "
        "got 'sync,federal'"]
    assert not out.exists()


def test_readme_names_every_compare_flag_once_and_no_other():
    # Prepare: the section's flag table in docs/modes.md and the paragraph after it ("It also takes ...")
    import re
    from pathlib import Path
    from distml.cli import build_parser
    text = (Path(__file__).resolve().parent.parent / "docs" / "modes.md").read_text()
    section = text.split("## Which mode? `distml compare`", 1)[1].split("Measured on this machine", 1)[0]
    table, takes = section.split("| flag |", 1)[1].split("\n\n", 2)[:2]
    listed = re.findall(r"^\| `(--[a-z-]+)", table, re.M) + re.findall(r"`(--[a-z-]+)`", takes)
    compare = build_parser()._subparsers._group_actions[0].choices["compare"]

    # Execute
    flags = {s for action in compare._actions for s in action.option_strings if s.startswith("--")} - {"--help"}

    # Assert
    assert len(listed) == len(set(listed)), "a flag listed twice"
    assert set(listed) == flags
