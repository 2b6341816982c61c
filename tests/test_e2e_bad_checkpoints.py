"""End-to-end: every kind of bad checkpoint is one line and exit 2, before training, writing nothing."""
import os
import pickle
import shutil

import pytest
import torch

from launch import summary

from distml.checkpoint import list_checkpoints
from distml.cli import main

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A real sync checkpoint and a plain --save-model file, from one short run (in this process)."""
    where = tmp_path_factory.mktemp("made")
    assert main(["train", "--quiet", "--epochs", "1", "--checkpoint-dir", str(where / "ckpt"),
                 "--save-model", str(where / "plain.pt")]) == 0
    (checkpoint,) = list_checkpoints(where / "ckpt")
    return where, checkpoint


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _copy_with(path, source, change):
    data = bytearray(open(source, "rb").read())
    path.write_bytes(bytes(change(data)))


def _flip(data):
    data[len(data) // 2] ^= 0x01
    return data


def _newer(path, source):
    wrapper = torch.load(source, weights_only=True)
    wrapper["distml_checkpoint"] += 1
    torch.save(wrapper, path)


CASES = {  # name: (make the file from (path, good checkpoint, plain file, marker), extra flags, message)
    "truncated": (lambda p, c, m, x: _copy_with(p, c, lambda d: d[:len(d) // 3]), [], "not a readable"),
    "empty": (lambda p, c, m, x: p.write_bytes(b""), [], "not a readable"),
    "random-bytes": (lambda p, c, m, x: p.write_bytes(os.urandom(10000)), [], "not a readable"),
    "one-flipped-byte": (lambda p, c, m, x: _copy_with(p, c, _flip), [], "fails its checksum"),
    "newer-format": (lambda p, c, m, x: _newer(p, c), [], "upgrade distml"),
    "plain-save-model-file": (lambda p, c, m, x: _copy_with(p, m, lambda d: d), [], "plain state_dict"),
    "code-running-pickle": (lambda p, c, m, x: p.write_bytes(pickle.dumps(RunsCode(x))), [], "not a readable"),
    "another-model": (lambda p, c, m, x: _copy_with(p, c, lambda d: d), ["--model", "logreg"], "another model"),
    "another-data-set": (lambda p, c, m, x: _copy_with(p, c, lambda d: d), ["--test-fraction", 0.3],
                         "another data set"),
    "another-mode": (lambda p, c, m, x: _copy_with(p, c, lambda d: d), ["--mode", "federated"],
                     "from a --mode sync run"),
    "another-setting": (lambda p, c, m, x: _copy_with(p, c, lambda d: d), ["--lr", 0.2],
                        "was made with --lr 0.1, this run has --lr 0.2"),
    "missing": (lambda p, c, m, x: None, [], "no such checkpoint"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_checkpoint_is_one_line_exit_2_and_nothing_is_written(tmp_path, made, case, capsys):
    where, checkpoint = made
    make, flags, message = CASES[case]
    bad, marker = tmp_path / "bad.pt", tmp_path / "code-ran"
    make(bad, checkpoint, where / "plain.pt", marker)
    before = open(checkpoint, "rb").read()

    # In this process (the command's main(), as `distml train` runs it): a launch each would cost 12
    # interpreter start-ups; that the line is printed once under mpirun, test_e2e_cli's bad input shows.
    code = main(["train", "--epochs", "1", *map(str, flags), "--resume", str(bad), "--metrics",
                 str(tmp_path / "m.jsonl"), "--save-model", str(tmp_path / "w.pt")])
    out, err = capsys.readouterr()

    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("distml: error: --resume:"), err
    assert message in lines[0]
    assert "epoch" not in out  # nothing trained
    assert not (tmp_path / "m.jsonl").exists() and not (tmp_path / "w.pt").exists()
    assert not marker.exists()
    assert open(checkpoint, "rb").read() == before


def test_a_fresh_run_into_a_directory_of_checkpoints_is_refused(made, capsys):
    where, checkpoint = made
    before = sorted(os.listdir(where / "ckpt"))

    code = main(["train", "--epochs", "1", "--checkpoint-dir", str(where / "ckpt")])
    err = capsys.readouterr().err

    assert code == 2
    assert err.count("distml: error") == 1 and "already holds checkpoints" in err
    assert sorted(os.listdir(where / "ckpt")) == before


def test_resume_skips_a_damaged_newest_checkpoint_with_one_warning(tmp_path, made, capsys):
    where, checkpoint = made
    shutil.copytree(where / "ckpt", tmp_path / "ckpt")
    (tmp_path / "ckpt" / "checkpoint-000000999.pt").write_bytes(open(checkpoint, "rb").read()[:1000])

    code = main(["train", "--quiet", "--epochs", "1", "--checkpoint-dir", str(tmp_path / "ckpt"), "--resume",
                 "--metrics", str(tmp_path / "m.jsonl")])
    err = capsys.readouterr().err

    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("distml:")]
    assert len(warnings) == 1 and "warning: skipping" in warnings[0] and "checkpoint-000000999.pt" in warnings[0]
    assert (tmp_path / "ckpt" / "checkpoint-000000999.pt.damaged").exists()
    assert [os.path.basename(p) for p in list_checkpoints(tmp_path / "ckpt")] == ["checkpoint-000000045.pt"]
    assert summary(tmp_path / "m.jsonl")["epochs"] == 1  # resumed at the end: the summary from its history


def test_a_refused_resume_leaves_a_damaged_newest_checkpoint_where_it_was(tmp_path, made, capsys):
    where, checkpoint = made
    shutil.copytree(where / "ckpt", tmp_path / "ckpt")
    (tmp_path / "ckpt" / "checkpoint-000000999.pt").write_bytes(open(checkpoint, "rb").read()[:1000])
    before = sorted(os.listdir(tmp_path / "ckpt"))

    code = main(["train", "--quiet", "--epochs", "1", "--lr", "0.05", "--checkpoint-dir", str(tmp_path / "ckpt"),
                 "--resume"])
    err = capsys.readouterr().err

    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("distml:")]
    assert len(lines) == 1 and "distml: error: --resume:" in lines[0] and "--lr" in lines[0], err
    assert sorted(os.listdir(tmp_path / "ckpt")) == before  # nothing moved aside, no warning
