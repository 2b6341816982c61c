"""Unit tests for `distml.metrics.Reporter`: the JSON-lines metrics file."""
import json
import math

import pytest

from distml.metrics import Reporter


def _reject(constant):
    raise ValueError(f"{constant} is not JSON")


def _strict_json_lines(path):
    """Each line parsed by json.loads, refusing the NaN and Infinity that Python would accept."""
    return [json.loads(line, parse_constant=_reject) for line in path.read_text().splitlines()]


def test_each_record_is_one_json_line(tmp_path):
    # Prepare
    path = tmp_path / "m.jsonl"
    report = Reporter(enabled=True, metrics_path=str(path))
    report.open_metrics()

    # Execute
    report.record(epoch=1, train_loss=0.5)
    report.record(summary=True, mode="sync", world_size=2)

    # Assert
    assert _strict_json_lines(path) == [{"epoch": 1, "train_loss": 0.5},
                                        {"summary": True, "mode": "sync", "world_size": 2}]


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_values_are_written_as_null(tmp_path, value):
    # Prepare: a diverged run: its loss is NaN or infinite
    path = tmp_path / "m.jsonl"
    report = Reporter(enabled=True, metrics_path=str(path))
    report.open_metrics()

    # Execute
    report.record(epoch=1, train_loss=value, test_r2=0.25)

    # Assert
    assert _strict_json_lines(path) == [{"epoch": 1, "train_loss": None, "test_r2": 0.25}]



def test_a_resumed_run_cuts_the_file_back_to_what_its_checkpoint_had_seen(tmp_path):
    # Prepare: a run recorded epochs 1 and 2, checkpointed, recorded 3, then crashed
    path = tmp_path / "m.jsonl"
    first = Reporter(enabled=True, metrics_path=str(path))
    first.open_metrics()
    first.record(epoch=1)
    first.record(epoch=2)
    seen = first.bytes_written()
    first.record(epoch=3)
    first.close()

    # Execute: the resumed run starts from the checkpoint and records epoch 3 again
    again = Reporter(enabled=True, metrics_path=str(path))
    again.open_metrics(keep_bytes=seen)
    again.record(epoch=3)
    again.close()

    # Assert
    assert _strict_json_lines(path) == [{"epoch": 1}, {"epoch": 2}, {"epoch": 3}]


def test_a_fresh_run_starts_the_file_anew(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"old": 1}\n')
    report = Reporter(enabled=True, metrics_path=str(path))

    report.open_metrics()
    report.record(epoch=1)

    assert _strict_json_lines(path) == [{"epoch": 1}]
