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

import numpy as np

__all__ = ["UsageError", "Config", "load_toml", "setting", "GROUPS", "MODES", "OPTIMIZERS", "PARTITIONS", "PRECISIONS",
           "ALGORITHMS", "SERVER_OPTS", "SCHEDULES", "RESUME_NEWEST"]

MODES = ("sync", "async", "federated")
OPTIMIZERS = ("sgd", "adam", "adamw")
PARTITIONS = ("iid", "dirichlet", "shards", "natural")
ALGORITHMS = ("fedavg", "fedprox", "scaffold")
SERVER_OPTS = ("avg", "avgm", "adam", "yogi", "adagrad")
SCHEDULES = ("constant", "cosine", "step")
RANK_FAILURE = ("abort", "continue")
ON_NAN = ("stop", "skip")
COMPRESSIONS = ("none", "fp16", "bf16")
PRECISIONS = ("float32", "bf16")
TOKENS = ("chars", "bytes")
BUILTIN_LOSSES = ("cross_entropy", "mse")
RESUME_NEWEST = "newest"  # --resume without a path
MAX_THREADS = 1024


class UsageError(Exception):
    """A mistake the user can fix: printed once, in one line, exit code 2."""


GROUPS = {  # --help shows the settings in these groups, in this order
    "training": "training: mode, length, batch",
    "data": "data",
    "model": "model",
    "optimisation": "optimizer and learning-rate schedule",
    "sync": "sync mode",
    "async": "async mode (parameter servers)",
    "federated": "federated mode",
    "privacy": "privacy: differential privacy and secure aggregation",
    "checkpoints": "checkpoints, resume and preemption",
    "faults": "faults: hangs, lost ranks, non-finite values",
    "outputs": "outputs",
    "benchmark": "benchmark aids",
}


def setting(group, default, help, **extra):
    """A Config field with its group and its help beside it (the CLI and README use both)."""
    assert group in GROUPS, group
    return field(default=default, metadata={"group": group, "help": help, **extra})


@dataclass
class Config:
    # -- training -------------------------------------------------------------
    mode: str = setting("training", "sync", f"training mode ({', '.join(MODES)})")
    epochs: int = setting("training", 20, "passes over the training set (async: a budget of gradients "
                                          "for the whole job, see the README)")
    batch_size: int = setting("training", 32, "samples per rank per step (global batch = ranks x this); "
                                              "federated: per client step, 0 = a client's whole data")
    seed: int = setting("training", 0, "seed for data split, shuffling, initial weights and dropout")
    max_steps: int = setting("training", 0, "end after this many optimizer steps (sync; within an epoch if need "
                                            "be) or gradients (async), instead of --epochs; the schedule spans them")
    accumulate: int = setting("training", 1, "sync: micro-batches of --batch-size per optimizer step, one "
                                             "reduction per step (global batch = ranks x batch x this)")
    eval_every: int = setting("training", 1, "evaluate the model every this many epochs (federated: "
                                             "rounds), and after the last")
    eval_every_steps: int = setting("training", 0, "sync: also evaluate after every this many optimizer steps, "
                                                   "one metrics record each (0: off)")
    threads: int = setting("training", 0, "torch threads per rank (0: SLURM_CPUS_PER_TASK, else "
                                          "OMP_NUM_THREADS, else cores on the node / ranks on the node)")
    # -- data -------------------------------------------------------------------
    dataset: str = setting("data", "digits", "digits, diabetes, synthetic, a .npz / .csv file, text "
                                             "(the Python standard library's sources) or text:PATH, or "
                                             "FILE.py:fn / module:fn returning a torch Dataset (or a "
                                             "(train, test) pair)")
    loss: Optional[str] = setting("data", None, "cross_entropy, mse, or FILE.py:fn / module:fn giving one loss "
                                                "per sample (default: cross_entropy for class targets, else mse)")
    data_workers: int = setting("data", 0, "loading worker processes per rank, preparing batches ahead "
                                           "(started without fork and without MPI)")
    block_size: int = setting("data", 64, "text: tokens a sample's input holds (its target is the next ones)")
    tokens: str = setting("data", "chars", f"text: what a token is ({', '.join(TOKENS)})")
    target: Optional[str] = setting("data", None, "target column of a .csv file (default: the last)")
    test_fraction: float = setting("data", 0.2, "share held out for testing when the data has no test split")
    samples: int = setting("data", 1000, "synthetic: number of samples")
    features: int = setting("data", 20, "synthetic: number of features")
    classes: int = setting("data", 2, "synthetic: number of classes (0 = regression)")
    # -- model ------------------------------------------------------------------
    model: str = setting("model", "mlp", "mlp, cnn, logreg, linear, or module:function / "
                                         "path/to/file.py:function")
    hidden: str = setting("model", "128,64", "hidden layer sizes for mlp (and cnn's dense layer), e.g. 128,64")
    layers: int = setting("model", 4, "gpt: transformer blocks")
    heads: int = setting("model", 4, "gpt: attention heads (must divide --embed)")
    embed: int = setting("model", 128, "gpt: width of the token embeddings")
    # -- optimisation -----------------------------------------------------------
    lr: float = setting("optimisation", 0.1, "learning rate (the peak of --lr-schedule)")
    optimizer: str = setting("optimisation", "sgd", f"optimizer ({', '.join(OPTIMIZERS)})")
    momentum: float = setting("optimisation", 0.9, "SGD momentum")
    weight_decay: float = setting("optimisation", 0.0, "L2 weight decay (adamw: decoupled, and none on "
                                                       "1-D parameters such as biases and norms)")
    betas: str = setting("optimisation", "0.9,0.999", "adam and adamw: the moments' decay rates, e.g. 0.9,0.95")
    clip_norm: float = setting("optimisation", 0.0, "clip the gradient's global L2 norm to this (sync: the "
                                                    "reduced gradient; federated: each local step; async: "
                                                    "each pushed gradient; 0: off)")
    precision: str = setting("optimisation", "float32", f"compute of forward and loss ({', '.join(PRECISIONS)}; "
                                                        f"bf16: autocast, with weights, gradients and optimizer "
                                                        f"in float32)")
    lr_schedule: Optional[str] = setting("optimisation", None, f"learning rate over the run, set every step "
                                         f"({', '.join(SCHEDULES)}; step: x0.1 at 1/2 and 3/4 of the run; "
                                         f"default: cosine, federated: constant)")
    warmup_epochs: float = setting("optimisation", 0.0, "linear warm-up from --lr/(its steps) to --lr over this many "
                                                        "epochs (federated: rounds)")
    # -- sync -------------------------------------------------------------------
    bucket_mb: float = setting("sync", 25.0, "size of the fused gradient buckets the gradients live in")
    chunk_mb: float = setting("sync", 4.0, "each bucket is reduced in pieces of this size, one Allreduce each "
                                           "(shared memory is fastest at 2-16 MiB)")
    compression: str = setting("sync", "none", "reduce the gradients in half precision: none, fp16 or bf16 "
                                               "(the optimizer still steps in float32)")
    zero: int = setting("sync", 0, "shard the optimizer over the ranks (ZeRO): 1, its state and step (each rank "
                                   "steps 1/N, reduce-scatter then all-gather); 2, the gradients too (each "
                                   "bucket reduced and freed as backward finishes it); 0, every rank holds it all")
    overlap: bool = setting("sync", False, "start each bucket's reduction during backward, as soon as it is "
                                           "filled (nonblocking Allreduce)")
    # -- async ------------------------------------------------------------------
    servers: int = setting("async", 1, "the first N ranks are parameter servers, each holding a range "
                                       "of the parameters")
    staleness: int = setting("async", -1, "bound on update staleness in versions (-1: no bound; "
                                          "0: sequential SGD)")
    staleness_lr: bool = setting("async", True, "divide the learning rate by (staleness + 1) "
                                                "(--no-staleness-lr: off)")
    timeout: float = setting("async", 300.0, "a server that hears from no worker for this many seconds "
                                             "aborts the job")
    # -- federated --------------------------------------------------------------
    rounds: int = setting("federated", 50, "rounds of local training and averaging")
    local_epochs: int = setting("federated", 1, "passes of each sampled client over its own data per round")
    local_steps: int = setting("federated", 0, "local steps per round instead of --local-epochs "
                                               "(0: use epochs)")
    clients: int = setting("federated", 0, "simulated clients, spread over the ranks (0: one per rank)")
    clients_per_round: int = setting("federated", 0, "clients sampled each round (0: all, or --fraction)")
    fraction: float = setting("federated", 0.0, "share of the clients sampled each round "
                                                "(0: use --clients-per-round)")
    partition: str = setting("federated", "iid", f"how the training set is split over clients "
                                                 f"({', '.join(PARTITIONS)})")
    alpha: float = setting("federated", 0.5, "Dirichlet concentration for --partition dirichlet "
                                             "(small: skewed labels)")
    shards_per_client: int = setting("federated", 2, "label-sorted shards dealt to each client for "
                                                     "--partition shards")
    algorithm: str = setting("federated", "fedavg", ", ".join(ALGORITHMS))
    prox_mu: float = setting("federated", 0.01, "FedProx proximal weight mu (--algorithm fedprox)")
    server_opt: str = setting("federated", "avg", f"server optimizer applied to the averaged update "
                                                  f"({', '.join(SERVER_OPTS)})")
    server_lr: Optional[float] = setting("federated", None, "server learning rate (default: 1 for avg/avgm, "
                                                            "0.01 for adam/yogi/adagrad)")
    server_momentum: float = setting("federated", 0.9, "server momentum (avgm) or beta1 (adam, yogi, adagrad)")
    dropout: float = setting("federated", 0.0, "chance that a sampled client fails to report in a round")
    target_accuracy: Optional[float] = setting("federated", None, "report the first round whose test "
                                                                  "accuracy reaches this")
    # -- privacy ----------------------------------------------------------------
    dp_clip: Optional[float] = setting("privacy", None, "differential privacy: clip each sample's gradient (sync, "
                                       "DP-SGD) or each client's update (federated, DP-FedAvg) to this L2 norm, "
                                       "and sample by Poisson sampling (needs --dp-noise or --dp-epsilon)")
    dp_noise: Optional[float] = setting("privacy", None, "noise multiplier z: Gaussian noise of std z x clip "
                                        "is added once to each step's or round's sum")
    dp_epsilon: Optional[float] = setting("privacy", None, "instead of --dp-noise: the smallest noise that ends "
                                          "the run at this epsilon (at --dp-delta)")
    dp_delta: float = setting("privacy", 1e-5, "delta of the (epsilon, delta) reported and targeted")
    dp_adaptive_clip: Optional[float] = setting("privacy", None, "federated: move the clip norm, starting from "
                                                "--dp-clip, so that this quantile of the updates fit under it")
    dp_secure_noise: bool = setting("privacy", False, "draw the noise from the operating system's entropy, and "
                                                      "the Poisson sampling from a seed drawn there (default: "
                                                      "from --seed, reproducible, not for production)")
    secure_aggregation: bool = setting("privacy", False, "federated: clients mask their updates so that ranks "
                                                         "and root see only the round's sum (SecAgg+)")
    secagg_neighbors: int = setting("privacy", 0, "secure aggregation: each client masks with this many "
                                                  "neighbours (0: enough for --dropout; all pairs in small "
                                                  "rounds)")
    # -- checkpoints ------------------------------------------------------------
    checkpoint_dir: Optional[str] = setting("checkpoints", None, "rank 0 writes checkpoints here "
                                            "(checkpoint-<position>.pt, atomically)")
    checkpoint_every: int = setting("checkpoints", 1, "checkpoint every this many epochs (federated: rounds), "
                                                      "and at the end; 0: only by --checkpoint-every-s and on "
                                                      "preemption")
    checkpoint_every_s: float = setting("checkpoints", 0.0, "also checkpoint when this many seconds have "
                                                            "passed since the last one (0: off)")
    keep: int = setting("checkpoints", 2, "keep the newest K checkpoints, delete older ones")
    resume: Optional[str] = setting("checkpoints", None, "continue from a checkpoint: --resume alone takes "
                                    "the newest valid one in --checkpoint-dir (none yet: start afresh), "
                                    "--resume PATH that file", const=RESUME_NEWEST)
    requeue: bool = setting("checkpoints", False, "after a preemption checkpoint under SLURM, rank 0 runs "
                                                  "scontrol requeue $SLURM_JOB_ID")
    # -- faults -----------------------------------------------------------------
    watchdog: float = setting("faults", 600.0, "when a rank has waited this many seconds in one MPI call, "
                                               "print every rank's last call and abort the job (0: off)")
    on_rank_failure: str = setting("faults", "abort", f"when a rank dies: {' or '.join(RANK_FAILURE)} "
                                                      f"(continue: train on without it; needs mpirun --with-ft ulfm)")
    on_nan: str = setting("faults", "stop", f"a non-finite loss or gradient: {' or '.join(ON_NAN)} "
                                            f"(stop: all ranks exit 65 at that step; skip: no update, counted)")
    # -- outputs ----------------------------------------------------------------
    save_model: Optional[str] = setting("outputs", None, "rank 0 writes the final state_dict here "
                                                         "(torch.save, atomic)")
    metrics: Optional[str] = setting("outputs", None, "rank 0 writes JSON lines here: one object per "
                                                      "epoch or round, and a summary (a new run starts the "
                                                      "file anew)")
    quiet: bool = setting("outputs", False, "no progress bar, header, epoch lines or summary line "
                                            "(warnings and errors still show)")
    config: Optional[str] = setting("outputs", None, "TOML file with the same keys as these flags "
                                                     "(flags win)", toml=False)
    # -- benchmark aids ---------------------------------------------------------
    slow_rank: int = setting("benchmark", -1, "this rank's compute is slowed down (-1: none)")
    slow_factor: float = setting("benchmark", 1.0, "the slow rank's compute takes this many times as long")

    def hidden_sizes(self):
        """(128, 64) from "128,64"; () from "" (no hidden layer)."""
        return tuple(int(h) for h in self.hidden.split(",")) if self.hidden.strip() else ()

    def validate(self, *, writes_outputs=True):
        """Raise UsageError naming the first setting that cannot work; return self.

        Output paths are checked only where `writes_outputs` (the root rank writes them).
        """
        _check(self.mode in MODES, f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        for name, allowed in (("optimizer", OPTIMIZERS), ("partition", PARTITIONS),
                              ("algorithm", ALGORITHMS), ("server_opt", SERVER_OPTS),
                              ("lr_schedule", SCHEDULES + (None,)), ("on_rank_failure", RANK_FAILURE),
                              ("on_nan", ON_NAN), ("compression", COMPRESSIONS), ("precision", PRECISIONS),
                              ("tokens", TOKENS)):
            _check(getattr(self, name) in allowed,
                   f"--{_flag(name)} must be one of {', '.join(a for a in allowed if a)}, got {getattr(self, name)!r}")
        self._check_numbers()
        self._check_federated()
        self._check_privacy()
        self._check_checkpoints()
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
        _check(self.chunk_mb > 0, f"--chunk-mb must be > 0, got {self.chunk_mb}")
        _check(self.servers >= 1, f"--servers must be >= 1, got {self.servers}")
        _check(self.timeout > 0, f"--timeout must be > 0 seconds, got {self.timeout}")
        _check(self.watchdog >= 0, f"--watchdog must be >= 0 seconds (0: off), got {self.watchdog}")
        _check(self.slow_factor >= 1, f"--slow-factor must be >= 1, got {self.slow_factor}")
        _check(self.staleness >= -1, f"--staleness must be >= 0, or -1 for no bound, got {self.staleness}")
        self._check_recipe()

    def _check_recipe(self):
        """The data, model and optimisation settings of the modern recipe (accumulation, clipping, ...)."""
        for name in ("accumulate", "block_size", "layers", "heads", "embed"):
            _check(getattr(self, name) >= 1, f"--{_flag(name)} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "data_workers", "eval_every_steps"):
            _check(getattr(self, name) >= 0, f"--{_flag(name)} must be >= 0, got {getattr(self, name)}")
        _check(self.clip_norm >= 0, f"--clip-norm must be > 0, or 0 for no clipping, got {self.clip_norm}")
        _check(self.mode == "sync" or self.accumulate == 1,
               f"--accumulate is for --mode sync (one reduction per optimizer step); {self.mode} pushes or "
               f"averages per step or round: leave it at 1")
        _check(self.mode == "sync" or not self.eval_every_steps,
               f"--eval-every-steps is for --mode sync; {self.mode} evaluates every --eval-every "
               f"{'rounds' if self.mode == 'federated' else 'epochs'}")
        _check(self.mode != "federated" or not self.max_steps, "--max-steps is for sync and async; federated "
                                                               "runs for --rounds")
        _check(self.zero in (0, 1, 2), f"--zero must be 0, 1 or 2, got {self.zero}")
        if self.zero:
            _check(self.mode == "sync", f"--zero shards sync mode's optimizer; {self.mode} mode has no "
                                        f"replicated optimizer to shard: leave it out")
            _check(not self.overlap, "--zero with --overlap: --overlap starts each bucket's Allreduce in "
                                     "backward, but a sharded step reduce-scatters the gradients into slices "
                                     "instead (--zero 2 already reduces each bucket as backward finishes it): "
                                     "leave out --overlap")
            _check(self.on_rank_failure == "abort", "--zero with --on-rank-failure continue: a lost rank takes "
                                                    "its slice of the optimizer state (momentum, moments) with it "
                                                    "and no other rank holds a copy, so the survivors could not "
                                                    "go on with the uninterrupted run's weights: use abort, and "
                                                    "resume from the last checkpoint on any number of ranks")
        _check(not (self.overlap and self.accumulate > 1),
               "--overlap reduces each bucket as soon as backward fills it, once a step: it cannot accumulate "
               "micro-batches; drop --overlap or --accumulate")
        self.beta_values()
        from .userfn import is_function_spec
        _check(self.loss is None or self.loss in BUILTIN_LOSSES or is_function_spec(self.loss),
               f"--loss must be one of {', '.join(BUILTIN_LOSSES)} or FILE.py:function / module:function, "
               f"got {self.loss!r}")

    def beta_values(self):
        """(beta1, beta2) from --betas "0.9,0.95"."""
        try:
            betas = tuple(float(b) for b in self.betas.split(","))
        except ValueError:
            betas = ()
        _check(len(betas) == 2 and all(0 <= b < 1 for b in betas),
               f"--betas must be two numbers in [0, 1) such as 0.9,0.95, got {self.betas!r}")
        return betas

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
        _check(not (self.mode == "federated" and self.algorithm == "scaffold" and self.on_rank_failure == "continue"),
               "--on-rank-failure continue cannot go on without a lost rank's SCAFFOLD client variates: use "
               "--on-rank-failure abort, or checkpoints and --resume")
        _check(self.server_lr is None or self.server_lr > 0, f"--server-lr must be > 0, got {self.server_lr}")
        _check(0 <= self.server_momentum < 1, f"--server-momentum must be in [0, 1), got {self.server_momentum}")
        _check(self.target_accuracy is None or 0 < self.target_accuracy <= 1,
               f"--target-accuracy must be in (0, 1], got {self.target_accuracy}")

    @property
    def dp(self):
        """Whether differential privacy is on (--dp-clip given)."""
        return self.dp_clip is not None

    def _check_privacy(self):
        dp_flags = [f"--{_flag(n)}" for n in ("dp_noise", "dp_epsilon", "dp_adaptive_clip")
                    if getattr(self, n) is not None] + (["--dp-secure-noise"] if self.dp_secure_noise else [])
        _check(self.dp or not dp_flags, f"{dp_flags[0] if dp_flags else ''} needs --dp-clip C (each "
                                        f"contribution's L2 bound; noise is z x C)")
        if self.dp:
            _check(self.dp_clip > 0, f"--dp-clip must be > 0, got {self.dp_clip}")
            _check(self.dp_noise is None or self.dp_epsilon is None,
                   "give --dp-noise or --dp-epsilon, not both (--dp-epsilon finds the noise for you)")
            _check(self.dp_noise is not None or self.dp_epsilon is not None,
                   "--dp-clip needs --dp-noise Z (noise multiplier) or --dp-epsilon E (a budget for the run)")
            _check(self.dp_noise is None or self.dp_noise >= 0, f"--dp-noise must be >= 0, got {self.dp_noise}")
            _check(self.dp_epsilon is None or self.dp_epsilon > 0, f"--dp-epsilon must be > 0, got {self.dp_epsilon}")
            _check(0 < self.dp_delta < 1, f"--dp-delta must be in (0, 1), got {self.dp_delta}")
            _check(self.dp_adaptive_clip is None or 0 < self.dp_adaptive_clip < 1,
                   f"--dp-adaptive-clip must be a quantile in (0, 1), got {self.dp_adaptive_clip}")
            _check(self.mode != "async", "differential privacy is for --mode sync (DP-SGD) and federated "
                                         "(DP-FedAvg): async applies each gradient alone, unnoised")
            _check(self.mode == "federated" or self.dp_adaptive_clip is None,
                   "--dp-adaptive-clip is for --mode federated (it tracks a quantile of the clients' update norms)")
            _check(not (self.mode == "federated" and self.algorithm == "scaffold"),
                   "--algorithm scaffold with differential privacy: its control variates leave the clients "
                   "unclipped and unnoised; use fedavg or fedprox")
            _check(not (self.mode == "sync" and self.clip_norm),
                   "--clip-norm with --dp-clip: DP-SGD clips each sample's gradient to --dp-clip; leave out "
                   "--clip-norm")
            _check(not (self.mode == "sync" and self.overlap),
                   "--overlap with --dp-clip: DP-SGD needs every sample's gradient before the reduction; "
                   "leave out --overlap")
            from .privacy import require_accounting
            require_accounting()
        if self.secure_aggregation:
            _check(self.mode == "federated", f"--secure-aggregation is for --mode federated; {self.mode} mode "
                                             f"has no clients whose updates could be masked")
            _check(self.on_rank_failure == "abort", "--secure-aggregation with --on-rank-failure continue: a "
                                                    "lost rank takes its clients' mask shares; use abort")
            try:
                import cryptography  # noqa: F401
            except ImportError:
                raise UsageError("--secure-aggregation needs cryptography: pip install 'distml[privacy]'") from None
        _check(self.secagg_neighbors >= 0, f"--secagg-neighbors must be >= 0 (0: automatic), "
                                           f"got {self.secagg_neighbors}")

    def _check_checkpoints(self):
        units = self.rounds if self.mode == "federated" else self.epochs
        _check(0 <= self.warmup_epochs < units, f"--warmup-epochs must be in [0, {units}) (the "
               f"{'rounds' if self.mode == 'federated' else 'epochs'} of the run), got {self.warmup_epochs}")
        _check(self.checkpoint_every >= 0, f"--checkpoint-every must be >= 0, got {self.checkpoint_every}")
        _check(self.checkpoint_every_s >= 0, f"--checkpoint-every-s must be >= 0, got {self.checkpoint_every_s}")
        _check(self.keep >= 1, f"--keep must be >= 1, got {self.keep}")
        _check(self.resume != RESUME_NEWEST or self.checkpoint_dir,
               "--resume without a path takes the newest checkpoint in --checkpoint-dir: give "
               "--checkpoint-dir DIR (or --resume PATH)")
        _check(not self.requeue or self.checkpoint_dir,
               "--requeue needs --checkpoint-dir: the requeued job resumes from there (add --resume)")

    def schedule(self):
        """--lr-schedule, or its default: cosine (decay to 0 over the run), constant for federated
        (FedAvg's fixed client step size, with which the federated tables were measured)."""
        return self.lr_schedule or ("constant" if self.mode == "federated" else "cosine")

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
            _check(len(dataset.train) >= workers, f"--mode async: {workers} workers but only "
                   f"{len(dataset.train)} training samples; every worker needs at least one")
        if self.mode != "federated":
            return self
        if self.partition == "natural" and dataset.groups is not None and not self.clients:
            self.clients = len(np.unique(dataset.groups))  # one client per group: the data decides
            _check(self.clients_each_round(size) <= self.clients, f"--clients-per-round "
                   f"{self.clients_per_round} is more than the {self.clients} natural clients (groups)")
        n, clients = len(dataset.train), self.num_clients(size)
        _check(clients <= n, f"--clients {clients} is more than the {n} training samples; "
                             "every client needs at least one")
        _check(self.target_accuracy is None or dataset.task == "classification",
               "--target-accuracy needs a classification data set (regression reports test_mse)")
        if self.partition == "natural":
            _check(dataset.groups is not None,
                   f"--partition natural makes each group of samples a client: {self.dataset} has no groups (give "
                   f"the Dataset a groups attribute, one client id per sample, or use --dataset text:DIR)")
            _check(self.clients in (0, len(np.unique(dataset.groups))),
                   f"--partition natural has one client per group: {len(np.unique(dataset.groups))} here; "
                   f"leave out --clients")
        elif self.partition != "iid":
            _check(dataset.labels is not None,
                   f"--partition {self.partition} splits by label and needs a classification data set with "
                   f"per-sample labels: {self.dataset} has "
                   f"{'real-valued targets' if dataset.task != 'classification' else 'no targets attribute'}")
        _check(not self.secure_aggregation or self.clients_each_round(size) >= 3,
               f"--secure-aggregation needs at least 3 clients per round (with 2, each learns the other's "
               f"update from the sum); this run has {self.clients_each_round(size)}")
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
        if self.mode == "federated" and not self.clients and self.partition != "natural":
            _check(self.clients_per_round <= size, f"--clients-per-round {self.clients_per_round} is more "
                   f"than the {size} clients (one per rank without --clients)")
        return self

    def _check_outputs(self):
        if self.checkpoint_dir is not None:
            _check_checkpoint_dir(self.checkpoint_dir)
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


def from_settings(settings):
    """A Config from keyword settings (distml.train's); an unknown name is a UsageError, not a TypeError."""
    unknown = sorted(set(settings) - {f.name for f in dataclasses.fields(Config)})
    _check(not unknown, f"unknown setting {', '.join(map(repr, unknown))}: the settings are distml train's "
                        f"flags with _ for - (distml.Config's fields)")
    return Config(**settings)


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
    existing = parent
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    _check(os.path.isdir(existing), f"--{flag}: {existing} is a file, not a directory")
    _check(os.path.isdir(parent), f"--{flag}: directory {parent} does not exist")
    try:  # os.access says yes to root even on read-only mounts: try for real
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise UsageError(f"--{flag}: cannot write in {parent}: {e.strerror}")


def _check_checkpoint_dir(path):
    """An existing, writable directory, or one that can be made in an existing directory."""
    _check(not os.path.exists(path) or os.path.isdir(path),
           f"--checkpoint-dir: {path} exists and is not a directory")
    target = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    _check(os.path.isdir(target), f"--checkpoint-dir: directory {target} does not exist")
    try:
        with tempfile.TemporaryFile(dir=target):
            pass
    except OSError as e:
        where = f"cannot write in {target}" if target == path else f"cannot make {path} in {target}"
        raise UsageError(f"--checkpoint-dir: {where}: {e.strerror}")


def _check(condition, message):
    if not condition:
        raise UsageError(message)


def _flag(name):
    return name.replace("_", "-")
