"""Unit tests for `distml.config` (Config.validate, load_toml), `distml.cli.parse_config` and its failure line."""
import pytest

from distml import comm
from distml.agreement import agree
from distml.cli import parse_config
from distml.config import Config, UsageError, from_settings, load_toml


def _toml(tmp_path, text):
    path = tmp_path / "run.toml"
    path.write_text(text)
    return str(path)


# -- Config.validate ----------------------------------------------------------

def test_defaults_are_valid():
    # Prepare
    cfg = Config()

    # Execute / Assert
    assert cfg.validate() is cfg


@pytest.mark.parametrize("settings", [
    dict(epochs=5, batch_size=1, lr=1e-4, momentum=0.0, test_fraction=0.99, bucket_mb=0.001),
    dict(hidden="", classes=0, optimizer="adam", threads=3),
    dict(hidden=" 32 , 16 ", weight_decay=0.1, samples=2),
], ids=["edges", "regression-adam", "spaces-in-hidden"])
def test_valid_settings_pass(settings):
    # Prepare / Execute / Assert
    Config(**settings).validate()


BAD_SETTINGS = [
    (dict(epochs=0), "--epochs must be >= 1"),
    (dict(batch_size=0), "--batch-size must be >= 1"),
    (dict(samples=1), "--samples must be >= 2"),
    (dict(features=0), "--features must be >= 1"),
    (dict(classes=1), "--classes"),
    (dict(lr=0.0), "--lr must be > 0"),
    (dict(lr=-0.1), "--lr must be > 0"),
    (dict(momentum=1.0), "--momentum"),
    (dict(momentum=-0.1), "--momentum"),
    (dict(weight_decay=-1.0), "--weight-decay"),
    (dict(test_fraction=0.0), "--test-fraction"),
    (dict(test_fraction=1.0), "--test-fraction"),
    (dict(threads=-1), "--threads"),
    (dict(threads=100000), r"--threads must be in \[0, 1024\]"),
    (dict(seed=-1), r"--seed must be in \[0, 2\*\*32\)"),
    (dict(seed=2**32), r"--seed must be in \[0, 2\*\*32\)"),
    (dict(bucket_mb=0.0), "--bucket-mb must be > 0"),
    (dict(bucket_mb=float("inf")), "--bucket-mb must be a finite number"),
    (dict(lr=float("nan")), "--lr must be a finite number"),
    (dict(momentum=float("nan")), "--momentum must be a finite number"),
    (dict(hidden="a,b"), "--hidden must be comma-separated integers"),
    (dict(hidden="128,,64"), "--hidden must be comma-separated integers"),
    (dict(hidden="64,0"), "--hidden sizes must be >= 1"),
    (dict(optimizer="rmsprop"), "--optimizer must be one of sgd, adam"),
    (dict(mode="async-typo"), "--mode must be one of"),
]


@pytest.mark.parametrize("settings, message", BAD_SETTINGS,
                         ids=[",".join(f"{k}={v}" for k, v in s.items()) for s, _ in BAD_SETTINGS])
def test_each_bad_setting_raises_usage_error_naming_the_flag(settings, message):
    # Prepare
    cfg = Config(**settings)

    # Execute / Assert
    with pytest.raises(UsageError, match=message):
        cfg.validate()


@pytest.mark.parametrize("flag", ["save_model", "metrics"])
def test_output_path_in_a_missing_directory_is_rejected(tmp_path, flag):
    # Prepare
    cfg = Config(**{flag: str(tmp_path / "no-such-dir" / "out.file")})

    # Execute / Assert
    with pytest.raises(UsageError, match="does not exist"):
        cfg.validate()


@pytest.mark.parametrize("flag", ["save_model", "metrics"])
def test_output_path_that_is_a_directory_is_rejected(tmp_path, flag):
    # Prepare
    cfg = Config(**{flag: str(tmp_path)})

    # Execute / Assert
    with pytest.raises(UsageError, match="is a directory"):
        cfg.validate()


def test_output_path_in_an_existing_directory_is_accepted(tmp_path):
    # Prepare / Execute / Assert
    Config(save_model=str(tmp_path / "model.pt"), metrics=str(tmp_path / "m.jsonl")).validate()


@pytest.mark.parametrize("flag", ["save_model", "metrics"])
def test_output_path_in_a_directory_that_cannot_be_written_is_rejected(flag):
    # Prepare: /proc refuses new files even to root, for whom os.access says yes
    cfg = Config(**{flag: "/proc/distml-test.pt"})

    # Execute / Assert
    with pytest.raises(UsageError, match="cannot write in /proc"):
        cfg.validate()


def _data_file(directory):
    path = directory / "d.csv"
    path.write_text("x,y\n1,0\n2,1\n")
    return str(path)


def _link_to_data_file(directory):
    (directory / "alias.csv").symlink_to(_data_file(directory))
    return str(directory / "alias.csv")


SAME_FILE = {  # settings from a directory -> the message
    "save-model is metrics": (lambda d: dict(save_model=str(d / "out"), metrics=str(d / "out")),
                              "--metrics .* is also given as --save-model"),
    "metrics is dataset": (lambda d: dict(dataset=_data_file(d), metrics=str(d / "d.csv")),
                           "--metrics .* is also given as --dataset"),
    "save-model is dataset via a link": (
        lambda d: dict(dataset=_data_file(d), save_model=_link_to_data_file(d)),
        "--save-model .* is also given as --dataset"),
}


@pytest.mark.parametrize("settings, message", SAME_FILE.values(), ids=SAME_FILE.keys())
def test_output_path_that_is_another_input_or_output_is_rejected(tmp_path, settings, message):
    # Prepare
    cfg = Config(**settings(tmp_path))

    # Execute / Assert
    with pytest.raises(UsageError, match=message + ".*would be overwritten"):
        cfg.validate()


def test_empty_hidden_means_no_hidden_layer():
    # Prepare
    cfg = parse_config(["train", "--hidden", ""])

    # Execute / Assert
    assert cfg.validate().hidden_sizes() == ()


# -- load_toml ----------------------------------------------------------------

def test_toml_keys_may_use_dashes_or_underscores(tmp_path):
    # Prepare
    path = _toml(tmp_path, 'batch-size = 16\nbucket_mb = 2.5\nsave-model = "w.pt"\nquiet = true\n')

    # Execute
    settings = load_toml(path)

    # Assert
    assert settings == {"batch_size": 16, "bucket_mb": 2.5, "save_model": "w.pt", "quiet": True}


def test_toml_int_for_a_float_and_a_list_for_hidden_are_converted(tmp_path):
    # Prepare
    path = _toml(tmp_path, "lr = 1\nhidden = [32, 16]\n")

    # Execute
    settings = load_toml(path)

    # Assert
    assert settings == {"lr": 1.0, "hidden": "32,16"}
    assert isinstance(settings["lr"], float)


@pytest.mark.parametrize("line", ['epochs = "5"', "epochs = 2.5", "epochs = true",
                                  "lr = \"fast\"", "model = 3", "quiet = 1"])
def test_toml_value_of_the_wrong_type_raises_usage_error(tmp_path, line):
    # Prepare
    path = _toml(tmp_path, line + "\n")

    # Execute / Assert
    with pytest.raises(UsageError, match=f"key '{line.split()[0]}' must be"):
        load_toml(path)


@pytest.mark.parametrize("key", ["epoch", "learning_rate", "config"])
def test_toml_unknown_key_raises_usage_error(tmp_path, key):
    # Prepare
    path = _toml(tmp_path, f"{key} = 1\n")

    # Execute / Assert
    with pytest.raises(UsageError, match=f"unknown key '{key}'"):
        load_toml(path)


def test_malformed_toml_raises_usage_error(tmp_path):
    # Prepare
    path = _toml(tmp_path, "epochs = = 3\n")

    # Execute / Assert
    with pytest.raises(UsageError, match="cannot read"):
        load_toml(path)


def test_toml_key_given_with_dashes_and_with_underscores_raises_usage_error(tmp_path):
    # Prepare
    path = _toml(tmp_path, 'save-model = "a.pt"\nsave_model = "b.pt"\n')

    # Execute / Assert
    with pytest.raises(UsageError, match="key 'save_model' is given twice"):
        load_toml(path)


def test_binary_file_as_toml_raises_usage_error(tmp_path):
    # Prepare: a PNG signature and bytes that are not UTF-8
    path = tmp_path / "model.pt"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe\x80binary")

    # Execute / Assert
    with pytest.raises(UsageError, match="cannot read"):
        load_toml(str(path))


def test_missing_toml_file_raises_usage_error(tmp_path):
    # Prepare / Execute / Assert
    with pytest.raises(UsageError, match="no such file"):
        load_toml(str(tmp_path / "missing.toml"))


# -- cli.parse_config ---------------------------------------------------------

def test_flags_override_the_toml_file(tmp_path):
    # Prepare
    path = _toml(tmp_path, 'epochs = 7\nlr = 0.5\nmodel = "cnn"\n')

    # Execute
    cfg = parse_config(["train", "--config", path, "--lr", "0.01", "--quiet"])

    # Assert
    assert (cfg.epochs, cfg.lr, cfg.model, cfg.quiet) == (7, 0.01, "cnn", True)
    assert cfg.batch_size == Config().batch_size


def test_no_flags_give_the_defaults():
    # Prepare / Execute
    cfg = parse_config(["train"])

    # Assert
    assert cfg == Config()


def test_info_command_gives_no_config():
    # Prepare / Execute / Assert
    assert parse_config(["info"]) is None


@pytest.mark.parametrize("argv", [
    ["train", "--no-such-flag", "1"],
    ["train", "--epochs", "x"],
    ["train", "--lr", "fast"],
    ["train", "--epochs"],
    ["bogus"],
], ids=["unknown-flag", "epochs-not-int", "lr-not-float", "missing-value", "unknown-command"])
def test_bad_command_line_raises_usage_error(argv):
    # Prepare / Execute / Assert
    with pytest.raises(UsageError):
        parse_config(argv)


@pytest.mark.parametrize("flag, value, message", [
    ("--seed", "-1", "--seed must be in"),
    ("--seed", str(2**32), "--seed must be in"),
    ("--bucket-mb", "inf", "--bucket-mb must be a finite number"),
    ("--lr", "nan", "--lr must be a finite number"),
    ("--threads", "100000", "--threads must be in"),
])
def test_out_of_range_flag_value_parses_but_does_not_validate(flag, value, message):
    # Prepare
    cfg = parse_config(["train", flag, value])

    # Execute / Assert
    with pytest.raises(UsageError, match=message):
        cfg.validate()


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["train", "--help"]])
def test_help_and_version_exit_0_through_agree(argv, capsys):
    # Prepare / Execute: main() parses inside agree(), which must not turn the exit into a crash
    with pytest.raises(SystemExit) as exited:
        agree(comm.world(), lambda: parse_config(argv))

    # Assert
    assert exited.value.code in (0, None)
    assert "distml" in capsys.readouterr().out


def test_an_error_agree_raises_is_marked_as_raised_alike_on_every_rank():
    # Prepare / Execute: a world of one, so "every rank" is this one
    with pytest.raises(UsageError, match="--epochs must be >= 1") as refused:
        agree(comm.world(), lambda: Config(epochs=-1).validate())

    # Assert: the aborting excepthook lets rank 0 alone print what every rank raised
    assert refused.value.everywhere is True


def test_from_settings_names_an_unknown_setting_as_a_usage_error():
    with pytest.raises(UsageError, match=r"unknown setting 'epocs': the settings are distml train's flags"):
        from_settings({"epocs": 3, "lr": 0.1})
    assert from_settings({"epochs": 3}).epochs == 3


def test_a_checkpoint_dir_that_cannot_be_made_is_named_with_its_parent():
    with pytest.raises(UsageError, match="--checkpoint-dir: cannot make /proc/distml-nope in /proc: "):
        Config(checkpoint_dir="/proc/distml-nope").validate()


def test_bad_toml_named_by_config_flag_raises_usage_error(tmp_path):
    # Prepare
    path = _toml(tmp_path, "epochz = 3\n")

    # Execute / Assert
    with pytest.raises(UsageError, match="unknown key 'epochz'"):
        parse_config(["train", "--config", path])


# -- the flag table in docs/usage.md (moved there from the README) ---------------------
def _readme_train_flags():
    import re
    from pathlib import Path
    text = (Path(__file__).resolve().parent.parent / "docs" / "usage.md").read_text()
    table = text.split("### `distml train` reference", 1)[1].split("\n\n", 2)[1]
    rows = [line.split("|")[1] for line in table.splitlines() if line.startswith("| `--")]
    return [flag for cell in rows for flag in re.findall(r"--[a-z][a-z-]*", cell)]


def _parser_train_flags():
    from distml.cli import build_parser
    (train,) = [a for a in build_parser()._subparsers._group_actions[0].choices.values()
                if a.prog.endswith(" train")]
    return {s for action in train._actions for s in action.option_strings
            if s.startswith("--") and s not in ("--help", "--no-staleness-lr")}


def test_readme_flag_table_lists_every_train_flag_once_and_no_other():
    readme = _readme_train_flags()

    assert len(readme) == len(set(readme)), "a flag listed twice"
    assert set(readme) == _parser_train_flags()


def test_help_shows_the_flags_in_their_groups(capsys):
    from distml.cli import build_parser
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    out = capsys.readouterr().out
    sections = ["training:", "data:", "model:", "optimizer and learning-rate schedule:", "sync mode:",
                "async mode (parameter servers):", "federated mode:", "privacy: differential privacy and secure aggregation:",
                "checkpoints, resume and preemption:",
                "outputs:", "benchmark aids:"]
    positions = [out.index("\n" + s) for s in sections]
    assert positions == sorted(positions)
    body = out.split("\n\n", 1)[1]  # after the usage line
    assert body.index("--resume") > body.index("checkpoints, resume and preemption:") > body.index("--rounds")


# -- cli: the line that ends a failed job -------------------------------------------
@pytest.mark.parametrize("debug,hint", [(None, True), ("1", False)])
def test_the_failure_line_offers_the_traceback_only_when_it_is_not_shown(monkeypatch, debug, hint):
    # Prepare
    from distml.cli import _failure_line
    if debug:
        monkeypatch.setenv("DISTML_DEBUG", debug)
    else:
        monkeypatch.delenv("DISTML_DEBUG", raising=False)

    # Execute
    reporter, line = _failure_line(comm.world(), RuntimeError("boom"))

    # Assert
    assert reporter == 0
    assert line.startswith("distml: rank 0 of 1 failed: RuntimeError: boom (aborting all ranks")
    assert ("set DISTML_DEBUG=1 for the traceback" in line) is hint


def test_an_output_path_under_a_file_says_so(tmp_path):
    (tmp_path / "afile").write_text("")
    for below in ("x.pt", "sub/x.pt"):
        with pytest.raises(UsageError, match=r"--save-model: .*/afile is a file, not a directory"):
            Config(save_model=str(tmp_path / "afile" / below)).validate()


def test_distml_train_takes_a_config_or_settings():
    from distml import _config_of
    cfg = Config(epochs=3)
    assert _config_of(cfg, {}) is cfg and _config_of(None, {"epochs": 4}).epochs == 4
    with pytest.raises(UsageError, match="a distml.Config, not str"):
        _config_of("run.toml", {})
    with pytest.raises(UsageError, match="not both"):
        _config_of(cfg, {"epochs": 4})


def test_stdout_gone_is_false_without_a_pipe_and_never_raises(monkeypatch, tmp_path):
    import io
    from distml.cli import _stdout_gone
    for stdout in (io.StringIO(), None, open(tmp_path / "out.txt", "w")):
        monkeypatch.setattr("sys.stdout", stdout)
        assert _stdout_gone() is False
