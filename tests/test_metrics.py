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

