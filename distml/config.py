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

__all__ = ["UsageError", "Config", "load_toml", "MODES", "OPTIMIZERS", "PARTITIONS", "ALGORITHMS",
           "SERVER_OPTS"]

MODES = ("sync", "async", "federated")
OPTIMIZERS = ("sgd", "adam")
PARTITIONS = ("iid", "dirichlet", "shards")
ALGORITHMS = ("fedavg", "fedprox", "scaffold")
SERVER_OPTS = ("avg", "avgm", "adam", "yogi", "adagrad")
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
    staleness_lr: bool = True
    timeout: float = 300.0
    slow_rank: int = -1
    slow_factor: float = 1.0
    rounds: int = 50
    local_epochs: int = 1
    local_steps: int = 0
    clients: int = 0
    clients_per_round: int = 0
    fraction: float = 0.0
    partition: str = "iid"
    alpha: float = 0.5
    shards_per_client: int = 2
    algorithm: str = "fedavg"
    prox_mu: float = 0.01
    server_opt: str = "avg"
    server_lr: Optional[float] = None
    server_momentum: float = 0.9
    dropout: float = 0.0
    eval_every: int = 1
    target_accuracy: Optional[float] = None
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
        for name, allowed in (("optimizer", OPTIMIZERS), ("partition", PARTITIONS),
                              ("algorithm", ALGORITHMS), ("server_opt", SERVER_OPTS)):
            _check(getattr(self, name) in allowed,
                   f"--{_flag(name)} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        self._check_numbers()
        self._check_federated()
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
        for name in ("epochs", "features"):
            _check(getattr(self, name) >= 1, f"--{_flag(name)} must be >= 1, got {getattr(self, name)}")
        if self.mode == "federated":
            _check(self.batch_size >= 0,
                   f"--batch-size must be >= 1, or 0 for a client's whole data, got {self.batch_size}")
        else:
            _check(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
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

    def _check_federated(self):
        for name in ("rounds", "local_epochs", "eval_every", "shards_per_client"):
            _check(getattr(self, name) >= 1, f"--{_flag(name)} must be >= 1, got {getattr(self, name)}")
        for name in ("local_steps", "clients", "clients_per_round"):
            _check(getattr(self, name) >= 0, f"--{_flag(name)} must be >= 0, got {getattr(self, name)}")
        _check(self.alpha > 0, f"--alpha must be > 0, got {self.alpha}")
        _check(0 <= self.fraction <= 1, f"--fraction must be in (0, 1] (0: use --clients-per-round), "
                                        f"got {self.fraction}")
        _check(not (self.fraction and self.clients_per_round),
               "give --clients-per-round or --fraction, not both")
        _check(self.clients == 0 or self.clients_per_round <= self.clients,
               f"--clients-per-round {self.clients_per_round} is more than --clients {self.clients}")
        _check(0 <= self.dropout < 1, f"--dropout must be in [0, 1), got {self.dropout}")
        _check(self.prox_mu >= 0, f"--prox-mu must be >= 0, got {self.prox_mu}")
        _check(self.algorithm != "scaffold" or (self.optimizer == "sgd" and self.momentum == 0),
               "--algorithm scaffold assumes plain SGD client steps (its control variates divide by "
               "steps x lr): add --momentum 0 (and --optimizer sgd)")
        _check(self.server_lr is None or self.server_lr > 0, f"--server-lr must be > 0, got {self.server_lr}")
        _check(0 <= self.server_momentum < 1, f"--server-momentum must be in [0, 1), got {self.server_momentum}")
        _check(self.target_accuracy is None or 0 < self.target_accuracy <= 1,
               f"--target-accuracy must be in (0, 1], got {self.target_accuracy}")

    def num_clients(self, size):
        """--clients, or one client per rank."""
        return self.clients or size

    def clients_each_round(self, size):
        """How many clients are sampled each round (--clients-per-round, --fraction, or all)."""
        total = self.num_clients(size)
        if self.fraction:
            return max(1, math.floor(self.fraction * total + 0.5))
        return self.clients_per_round or total

    def server_learning_rate(self):
        """--server-lr, or its default: 1 for avg/avgm (plain averaging), 0.01 for the adaptive ones."""
        if self.server_lr is not None:
            return self.server_lr
        return 1.0 if self.server_opt in ("avg", "avgm") else 0.01

    def validate_data(self, dataset, size=1):
        """Checks that need the data set (its size and task) and the number of ranks."""
        if self.mode == "async":
            workers = size - self.servers
            _check(len(dataset.y_train) >= workers, f"--mode async: {workers} workers but only "
                   f"{len(dataset.y_train)} training samples; every worker needs at least one")
        if self.mode != "federated":
            return self
        n, clients = len(dataset.y_train), self.num_clients(size)
        _check(clients <= n, f"--clients {clients} is more than the {n} training samples; "
                             "every client needs at least one")
        _check(self.target_accuracy is None or dataset.task == "classification",
               "--target-accuracy needs a classification data set (regression reports test_mse)")
        if self.partition != "iid":
            _check(dataset.task == "classification",
                   f"--partition {self.partition} splits by label and needs a classification data set")
        if self.partition == "shards":
            _check(clients * self.shards_per_client <= n,
                   f"--clients {clients} x --shards-per-client {self.shards_per_client} is more shards "
                   f"than the {n} training samples")
        return self

    def validate_world(self, size):
        """Checks that need the number of ranks."""
        _check(-1 <= self.slow_rank < size, f"--slow-rank must be a rank below {size} (or -1), got {self.slow_rank}")
        if self.mode == "async":
            _check(size >= 2, "--mode async needs at least 2 ranks (a server and a worker); "
                              "launch with mpirun -n 2 or more")
            _check(self.servers < size, f"--servers {self.servers} leaves no worker among {size} ranks; "
                                        f"use --servers <= {size - 1}")
        if self.mode == "federated" and not self.clients:
            _check(self.clients_per_round <= size, f"--clients-per-round {self.clients_per_round} is more "
                   f"than the {size} clients (one per rank without --clients)")
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
