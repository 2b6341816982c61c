"""Unit tests for `distml.checkpoint`: the checkpoint format, atomic writes and weights-only loading."""
import dataclasses
import hashlib
import io
import os
import pickle
import stat

import pytest
import torch
from torch import nn

from distml.checkpoint import (FORMAT_VERSION, Checkpoint, DamagedCheckpoint, atomic_write, list_checkpoints, load_state_dict,
                               newest_checkpoint, read_checkpoint, save_state_dict, set_aside,
                               write_checkpoint)
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


@pytest.mark.parametrize("load,message", [(load_state_dict, "not a readable weights-only checkpoint"),
                                          (read_checkpoint, "not a readable distml checkpoint")],
                         ids=["model-file", "checkpoint"])
@pytest.mark.parametrize("save", [
    lambda obj, path: torch.save({"weight": torch.ones(2), "extra": obj}, path),
    lambda obj, path: torch.save({"distml_checkpoint": 1, "sha256": "0", "payload": obj}, path),
    lambda obj, path: path.write_bytes(pickle.dumps(obj, protocol=2)),
], ids=["torch-save", "inside-the-wrapper", "plain-pickle"])
def test_a_pickle_holding_an_arbitrary_object_is_refused_without_running_it(tmp_path, save, load, message):
    # Prepare
    path = tmp_path / "evil.pt"
    save(Payload(), path)
    CALLS.clear()

    # Execute / Assert
    with pytest.raises(UsageError, match=message) as refused:
        load(path)
    assert CALLS == []
    message = str(refused.value)  # one line, with torch's reason but not its advice to load unsafely
    assert "\n" not in message and "weights_only` set to `False" not in message
    assert "refused by weights-only loading: Unsupported global" in message


# -- the checkpoint format --------------------------------------------------------
def _checkpoint(units, seed=0):
    model = _model(seed)
    return Checkpoint(mode="sync", world_size=2, config='{"lr": 0.1}', data="abcd1234",
                      position={"epoch": units // 10, "step": units % 10, "units": units, "elapsed_s": 0.5},
                      model=model.state_dict(), strategy={"optimizer": {"state": {}, "param_groups": []}},
                      ranks=[{"torch_rng": torch.get_rng_state()}, {"torch_rng": torch.get_rng_state()}],
                      history='[{"epoch": 1}]', metrics_bytes=17)


def test_a_written_checkpoint_reads_back_field_for_field(tmp_path):
    # Prepare
    ckpt = _checkpoint(units=12)

    # Execute
    path = write_checkpoint(ckpt, tmp_path, keep=2)
    back = read_checkpoint(path)

    # Assert
    assert os.path.basename(path) == "checkpoint-000000012.pt"
    assert back.position == ckpt.position and back.config == ckpt.config and back.version == FORMAT_VERSION
    assert all(torch.equal(back.model[k], ckpt.model[k]) for k in ckpt.model)
    assert torch.equal(back.ranks[1]["torch_rng"], ckpt.ranks[1]["torch_rng"])
    assert (back.history, back.metrics_bytes, back.mode, back.world_size) == ('[{"epoch": 1}]', 17, "sync", 2)


def test_only_the_newest_k_checkpoints_are_kept(tmp_path):
    # Execute: numbers out of order on purpose (9 < 10 as numbers, not as strings)
    for units in (3, 9, 10, 25):
        write_checkpoint(_checkpoint(units), tmp_path, keep=2)

    # Assert
    assert [os.path.basename(p) for p in list_checkpoints(tmp_path)] == [
        "checkpoint-000000010.pt", "checkpoint-000000025.pt"]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-000000010.pt", "checkpoint-000000025.pt"]


def _flip_one_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside the payload (the stored bytes of the zip)
    path.write_bytes(bytes(data))


def test_a_damaged_newest_checkpoint_is_skipped_with_one_warning(tmp_path):
    # Prepare
    write_checkpoint(_checkpoint(5), tmp_path, keep=3)
    newest = write_checkpoint(_checkpoint(6, seed=1), tmp_path, keep=3)
    _flip_one_byte(__import__("pathlib").Path(newest))
    warnings = []

    # Execute
    path, ckpt, damaged = newest_checkpoint(tmp_path)

    # Assert: found, and nothing moved until the caller sets the damaged one aside
    assert os.path.basename(path) == "checkpoint-000000005.pt" and ckpt.position["units"] == 5
    assert [os.path.basename(bad) for bad, _ in damaged] == ["checkpoint-000000006.pt"]
    assert "fails its checksum" in damaged[0][1]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-000000005.pt", "checkpoint-000000006.pt"]
    set_aside(damaged, warn=warnings.append)
    assert len(warnings) == 1 and "checkpoint-000000006.pt" in warnings[0]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-000000005.pt", "checkpoint-000000006.pt.damaged"]


def test_a_newer_format_is_not_skipped_as_damage_for_an_older_checkpoint(tmp_path):
    write_checkpoint(_checkpoint(5), tmp_path, keep=3)
    _write_newer_version(tmp_path / "checkpoint-000000009.pt")
    before = sorted(os.listdir(tmp_path))

    with pytest.raises(UsageError, match="checkpoint-000000009.pt has checkpoint format 2; this distml reads"):
        newest_checkpoint(tmp_path)
    assert sorted(os.listdir(tmp_path)) == before


def test_no_valid_checkpoint_at_all_is_a_usage_error_and_an_empty_directory_is_none(tmp_path):
    assert newest_checkpoint(tmp_path) == (None, None, [])
    (tmp_path / "checkpoint-000000001.pt").write_bytes(b"")
    with pytest.raises(UsageError) as refused:
        newest_checkpoint(tmp_path)
    assert str(refused.value) == (f"--resume: no valid checkpoint in {tmp_path}; the newest, {tmp_path}/"
                                  f"checkpoint-000000001.pt, is not a readable distml checkpoint (the file is empty)")


def _write_newer_version(path):
    write_checkpoint(_checkpoint(1), path.parent, keep=5)
    wrapper = torch.load(path.parent / "checkpoint-000000001.pt", weights_only=True)
    wrapper["distml_checkpoint"] = FORMAT_VERSION + 1
    torch.save(wrapper, path)


def _write_truncated(path):
    good = write_checkpoint(_checkpoint(1), path.parent, keep=5)
    data = open(good, "rb").read()
    path.write_bytes(data[: len(data) // 2])


def _write_flipped(path):
    good = write_checkpoint(_checkpoint(1), path.parent, keep=5)
    path.write_bytes(open(good, "rb").read())
    _flip_one_byte(path)


@pytest.mark.parametrize("make,message", [
    (lambda p: p.write_bytes(b""), r"not a readable distml checkpoint \(the file is empty\)"),
    (lambda p: p.write_bytes(os.urandom(4096)), "not a readable distml checkpoint .not a zip archive"),
    (_write_truncated, r"not a readable distml checkpoint \(not a zip archive as torch.save writes: cut short"),
    (_write_flipped, "checksum"),
    (_write_newer_version, "format 2; this distml reads format 1"),
    (lambda p: torch.save(_model().state_dict(), p), "plain state_dict"),
    (lambda p: torch.save({"distml_checkpoint": 1, "sha256": "0", "payload": "x"}, p), "checksum"),
], ids=["empty", "random-bytes", "truncated", "one-flipped-byte", "newer-format", "plain-state-dict",
        "wrong-payload-type"])
def test_bad_checkpoint_files_are_one_line_usage_errors(tmp_path, make, message):
    # Prepare
    path = tmp_path / "bad.pt"
    make(path)

    # Execute / Assert
    with pytest.raises(UsageError, match=message) as error:
        read_checkpoint(path)
    assert "\n" not in str(error.value) and str(path) in str(error.value)



class _SystemCall:
    def __reduce__(self):
        return os.system, ("touch distml-pwned",)


@pytest.mark.parametrize("load", [load_state_dict, read_checkpoint], ids=["model-file", "checkpoint"])
def test_a_pickle_calling_os_system_is_refused_with_the_unpicklers_reason(tmp_path, monkeypatch, load):
    # Prepare
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.ones(1), "extra": _SystemCall()}, path)

    # Execute / Assert: torch's own text opens with advice to load unsafely; ours gives the reason
    with pytest.raises(UsageError, match=r"refused by weights-only loading: Trying to load unsupported GLOBAL "
                                         r"\w+\.system") as refused:
        load(path)
    assert "weights_only" not in str(refused.value) and not (tmp_path / "distml-pwned").exists()


def _write_verified_unknown_fields(path):
    """A wrapper whose checksum is right around a payload this version cannot build (an unknown field)."""
    ckpt = _checkpoint(9)
    fields = {**{f.name: getattr(ckpt, f.name) for f in dataclasses.fields(ckpt)}, "field_of_the_future": 1}
    buffer = io.BytesIO()
    torch.save(fields, buffer)
    payload = buffer.getbuffer()
    torch.save({"distml_checkpoint": 1, "sha256": hashlib.sha256(payload).hexdigest(),
                "payload": torch.frombuffer(payload, dtype=torch.uint8)}, path)


@pytest.mark.parametrize("trouble", ["verified-but-unknown-payload", "read-error"])
def test_a_checkpoint_that_may_be_fine_stops_a_resume_instead_of_being_set_aside(tmp_path, monkeypatch, trouble):
    # Prepare: an older good checkpoint, and a newer one that is not damaged but cannot be loaded here
    write_checkpoint(_checkpoint(5), tmp_path, keep=3)
    newer = tmp_path / "checkpoint-000000009.pt"
    if trouble == "read-error":  # a disk or network filesystem failing under the file (EIO), as seen by the reads
        newer.write_bytes(b"PK\x03\x04")
        monkeypatch.setattr("distml.checkpoint._read_error",
                            lambda path: "OSError: Input/output error" if str(path) == str(newer) else None)
    else:
        _write_verified_unknown_fields(newer)
    before = sorted(os.listdir(tmp_path))

    # Execute / Assert: neither skipped for the older one (that would go back in time) nor moved
    with pytest.raises(UsageError) as refused:
        newest_checkpoint(tmp_path)
    assert not isinstance(refused.value, DamagedCheckpoint) and "checkpoint-000000009.pt" in str(refused.value)
    assert ("Input/output error" if trouble == "read-error" else "written by another version?") in str(refused.value)
    assert sorted(os.listdir(tmp_path)) == before
