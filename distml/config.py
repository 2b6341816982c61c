"""Configuration as data: one dataclass, one `validate()` that finds every usage error.

The CLI flags, the keys of a `--config file.toml` and the fields here share
their names (dashes in flags, underscores here). Everything the user can get
wrong without running anything is checked in `validate()`, before MPI work.
"""
import dataclasses
import math
import os
import tempfile
import tomllib
import typing
from dataclasses import dataclass, field
from typing import Optional

__all__ = ["UsageError", "Config", "load_toml", "MODES", "OPTIMIZERS"]

MODES = ("sync", "async")
OPTIMIZERS = ("sgd", "adam")
MAX_THREADS = 1024


class UsageError(Exception):
    """A mistake the user can fix: printed once, in one line, exit code 2."""


@dataclass
class Config:
    mode: str = "sync"
    model: str = "mlp"
    hidden: str = "128,64"
    dataset: str = "digits"
    target: Optional[str] = None
    test_fraction: float = 0.2
    samples: int = 1000
    features: int = 20
    classes: int = 2
    epochs: int = 20
    batch_size: int = 32
    lr: float = 0.1
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    seed: int = 0
    threads: int = 0
    bucket_mb: float = 25.0
    servers: int = 1
    staleness: int = -1
    staleness_lr: bool = False
    timeout: float = 300.0
    slow_rank: int = -1
    slow_factor: float = 1.0
    save_model: Optional[str] = None
    metrics: Optional[str] = None
    quiet: bool = False
    config: Optional[str] = field(default=None, metadata={"toml": False})

    def hidden_sizes(self):
        """(128, 64) from "128,64"; () from "" (no hidden layer)."""
        return tuple(int(h) for h in self.hidden.split(",")) if self.hidden.strip() else ()

    def validate(self, *, writes_outputs=True):
        """Raise UsageError naming the first setting that cannot work; return self.

        Output paths are checked only where `writes_outputs` (the root rank writes them).
        """
        _check(self.mode in MODES, f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        _check(self.optimizer in OPTIMIZERS,
               f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        self._check_numbers()
        try:
            sizes = self.hidden_sizes()
        except ValueError:
            raise UsageError(f"--hidden must be comma-separated integers such as 128,64, got {self.hidden!r}")
        _check(all(h >= 1 for h in sizes), f"--hidden sizes must be >= 1, got {self.hidden!r}")
        if writes_outputs:
            self._check_outputs()
        return self

    def _check_numbers(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float):
                _check(math.isfinite(value), f"--{_flag(f.name)} must be a finite number, got {value}")
        for name in ("epochs", "batch_size", "features"):
            _check(getattr(self, name) >= 1, f"--{_flag(name)} must be >= 1, got {getattr(self, name)}")
        _check(self.samples >= 2, f"--samples must be >= 2, got {self.samples}")
        _check(self.classes == 0 or self.classes >= 2,
               f"--classes must be 0 (regression) or >= 2, got {self.classes}")
        _check(self.lr > 0, f"--lr must be > 0, got {self.lr}")
        _check(0 <= self.momentum < 1, f"--momentum must be in [0, 1), got {self.momentum}")
        _check(self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}")
        _check(0 < self.test_fraction < 1, f"--test-fraction must be in (0, 1), got {self.test_fraction}")
        _check(0 <= self.seed < 2**32, f"--seed must be in [0, 2**32), got {self.seed}")
        _check(0 <= self.threads <= MAX_THREADS,
               f"--threads must be in [0, {MAX_THREADS}] (0 = automatic), got {self.threads}")
        _check(self.bucket_mb > 0, f"--bucket-mb must be > 0, got {self.bucket_mb}")
        _check(self.servers >= 1, f"--servers must be >= 1, got {self.servers}")
        _check(self.timeout > 0, f"--timeout must be > 0 seconds, got {self.timeout}")
        _check(self.slow_factor >= 1, f"--slow-factor must be >= 1, got {self.slow_factor}")
        _check(self.staleness >= -1, f"--staleness must be >= 0, or -1 for no bound, got {self.staleness}")

    def validate_world(self, size):
        """Checks that need the number of ranks."""
        _check(-1 <= self.slow_rank < size, f"--slow-rank must be a rank below {size} (or -1), got {self.slow_rank}")
        if self.mode == "async":
            _check(size >= 2, "--mode async needs at least 2 ranks (a server and a worker); "
                              "launch with mpirun -n 2 or more")
            _check(self.servers < size, f"--servers {self.servers} leaves no worker among {size} ranks; "
                                        f"use --servers <= {size - 1}")
        return self

    def _check_outputs(self):
        outputs = {"save-model": self.save_model, "metrics": self.metrics}
        inputs = {"dataset": self.dataset, "config": self.config}
        seen = {}
        for flag, path in outputs.items():
            if path is None:
                continue
            _check_output_path(path, flag)
            real = os.path.realpath(path)
            clash = seen.get(real) or next((f for f, p in inputs.items()
                                            if p and os.path.realpath(p) == real), None)
            _check(clash is None, f"--{flag} {path} is also given as --{clash}; it would be overwritten")
            seen[real] = flag


def load_toml(path):
    """The settings in a TOML file, checked against the Config fields and their types."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise UsageError(f"--config: no such file: {path}")
    except (OSError, ValueError) as e:  # TOMLDecodeError and UnicodeDecodeError are ValueErrors
        raise UsageError(f"--config: cannot read {path} as TOML: {e}")
    fields = {f.name: f for f in dataclasses.fields(Config) if f.metadata.get("toml", True)}
    settings = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        _check(name in fields, f"--config {path}: unknown key {key!r}")
        _check(name not in settings, f"--config {path}: key {key!r} is given twice")
        settings[name] = _coerce(value, fields[name], f"--config {path}: key {key!r}")
    return settings


def _coerce(value, fld, where):
    kind = fld.type
    if typing.get_origin(kind) is typing.Union:  # Optional[X]
        kind = typing.get_args(kind)[0]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if fld.name == "hidden" and isinstance(value, list):
        return ",".join(str(v) for v in value)
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    _check(ok, f"{where} must be {kind.__name__}, got {value!r}")
    return value


def _check_output_path(path, flag):
    if path is None:
        return
    _check(not os.path.isdir(path), f"--{flag}: {path} is a directory; give a file name")
    parent = os.path.dirname(os.path.realpath(path))
    _check(os.path.isdir(parent), f"--{flag}: directory {parent} does not exist")
    try:  # os.access says yes to root even on read-only mounts: try for real
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise UsageError(f"--{flag}: cannot write in {parent}: {e.strerror}")


def _check(condition, message):
    if not condition:
        raise UsageError(message)


def _flag(name):
    return name.replace("_", "-")
