"""Unit tests for `distml.checkpoint`: atomic writes and weights-only loading."""
import os
import pickle
import stat

import pytest
import torch
from torch import nn

from distml.checkpoint import atomic_write, load_state_dict, save_state_dict
from distml.config import UsageError

CALLS = []


def _record(*args):
    CALLS.append(args)
    return args


class Payload:
    """Unpickling this runs `_record`: what a malicious checkpoint would do."""

    def __reduce__(self):
        return _record, ("ran",)


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def test_save_then_load_round_trips_the_state_dict(tmp_path):
    # Prepare
    model, path = _model(), tmp_path / "model.pt"

    # Execute
    save_state_dict(model, path)
    state = load_state_dict(path)

    # Assert
    expected = model.state_dict()
    assert list(state) == list(expected)
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    restored = _model(seed=1)
    restored.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(restored.parameters(), model.parameters()))


def test_save_leaves_no_temporary_files(tmp_path):
    # Prepare
    path = tmp_path / "model.pt"

    # Execute
    save_state_dict(_model(0), path)
    save_state_dict(_model(1), path)  # overwrite

    # Assert
    assert os.listdir(tmp_path) == ["model.pt"]


def test_failing_writer_keeps_the_previous_file_and_leaves_no_temporary_file(tmp_path):
    # Prepare
    path = tmp_path / "model.pt"
    save_state_dict(_model(0), path)
    before = path.read_bytes()

    def write_half_then_fail(f):
        f.write(b"half a checkpoint")
        raise RuntimeError("disk full")

    # Execute
    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, write_half_then_fail)

    # Assert
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["model.pt"]


def test_failing_first_write_creates_no_file(tmp_path):
    # Prepare
    path = tmp_path / "model.pt"

    def interrupted(f):
        raise KeyboardInterrupt

    # Execute
    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, interrupted)

    # Assert
    assert os.listdir(tmp_path) == []


def test_save_through_a_symlink_replaces_its_target_and_keeps_the_link(tmp_path):
    # Prepare: model.pt -> runs/latest.pt, as a user keeps "the latest" weights
    (tmp_path / "runs").mkdir()
    target, link = tmp_path / "runs" / "latest.pt", tmp_path / "model.pt"
    target.write_bytes(b"previous weights")
    link.symlink_to(target)
    model = _model()

    # Execute
    save_state_dict(model, link)

    # Assert
    assert link.is_symlink() and os.readlink(link) == str(target)
    state = load_state_dict(target)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert sorted(os.listdir(tmp_path / "runs")) == ["latest.pt"]


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_new_file_gets_the_permissions_the_umask_allows(tmp_path, umask_022):
    # Prepare
    path = tmp_path / "model.pt"

    # Execute
    save_state_dict(_model(), path)

    # Assert
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_loading_a_missing_checkpoint_raises_usage_error(tmp_path):
    # Prepare / Execute / Assert
    with pytest.raises(UsageError, match="no such checkpoint"):
        load_state_dict(tmp_path / "absent.pt")


@pytest.mark.parametrize("content", [b"", b"not a checkpoint\n", b"PK\x03\x04garbage"],
                         ids=["empty", "text", "broken-zip"])
def test_loading_a_file_that_is_not_a_checkpoint_raises_usage_error(tmp_path, content):
    # Prepare
    path = tmp_path / "model.pt"
    path.write_bytes(content)

    # Execute / Assert
    with pytest.raises(UsageError, match="not a readable weights-only checkpoint"):
        load_state_dict(path)


@pytest.mark.parametrize("save", [
    lambda obj, path: torch.save({"weight": torch.ones(2), "extra": obj}, path),
    lambda obj, path: path.write_bytes(pickle.dumps(obj, protocol=2)),
], ids=["torch-save", "plain-pickle"])
def test_a_pickle_holding_an_arbitrary_object_is_refused_without_running_it(tmp_path, save):
    # Prepare
    path = tmp_path / "evil.pt"
    save(Payload(), path)
    CALLS.clear()

    # Execute / Assert
    with pytest.raises(UsageError, match="not a readable weights-only checkpoint"):
        load_state_dict(path)
    assert CALLS == []
