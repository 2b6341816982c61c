"""The `distml` command: `distml train ...`, `distml compare ...`, `distml partition ...` and `distml info`.

    mpirun -n 4 distml train --model cnn --epochs 5
    mpirun -n 2 distml compare --epochs 20 --target-accuracy 0.9   # sync, async, federated: one table
    distml train --config run.toml --lr 0.01        # flags win over the file
    distml partition --clients 20 --partition dirichlet --alpha 0.1 --plot labels.png

Errors the user can fix print one line (once, from rank 0) and exit 2 on
every rank; so does a non-finite loss or gradient with --on-nan stop, with
exit 65. Any other exception on any rank prints one line naming the rank
and aborts the whole MPI job, so no rank is left waiting in a collective.
"""
import argparse
import dataclasses
import os
import platform
import sys
import time
import traceback
import typing

from . import __version__
from . import comm as _comm
from .agreement import RankFailure
from .comm import RankLost
from .cluster import format_launch_table, launch_info
from .config import GROUPS, Config, UsageError, _check_output_path, load_toml
from .nonfinite import EXIT_NONFINITE, NonFinite
from .signals import EXIT_PREEMPTED, Preempted, StopFlag

# `distml partition`: the Config fields that decide the split, with the same meaning as for train.
PARTITION_FLAGS = ("dataset", "target", "test_fraction", "samples", "features", "classes", "seed",
                   "clients", "partition", "alpha", "shards_per_client")
PARTITION_DEFAULTS = {"clients": 10}  # no ranks here to give one client each
PARTITION_HELP = {"clients": "clients to split the training set over"}


class _Parser(argparse.ArgumentParser):
    """Raises UsageError instead of exiting, and prints help only on rank 0."""

    def error(self, message):
        raise UsageError(message)

    def _print_message(self, message, file=None):
        if _comm.world().is_root:
            super()._print_message(message, file)


def build_parser():
    parser = _Parser(prog="distml", description="Data-parallel training of PyTorch models over MPI.")
    parser.add_argument("--version", action="version", version=f"distml {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,compare,partition,info}")
    train = sub.add_parser("train", help="train a model on all ranks",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    groups = {name: train.add_argument_group(what) for name, what in GROUPS.items()}
    for f in dataclasses.fields(Config):
        _add_flag(groups[f.metadata["group"]], f, f.metadata["help"], f.default)
    fields = {f.name: f for f in dataclasses.fields(Config)}
    _add_compare(sub, fields)
    part = sub.add_parser("partition", help="print (and plot) the label histogram of each federated client")
    for name in PARTITION_FLAGS:
        _add_flag(part, fields[name], PARTITION_HELP.get(name, fields[name].metadata["help"]),
                  PARTITION_DEFAULTS.get(name, fields[name].default))
    part.add_argument("--plot", metavar="PNG", default=None,
                      help="also draw the histograms to this PNG (needs matplotlib)")
    sub.add_parser("info", help="show the MPI library, world size, torch version and threads")
    return parser


def _add_compare(sub, fields):
    """`distml compare`: the train flags every mode shares (and each mode's knobs), --modes and --out."""
    from .compare import COMPARE_DEFAULTS, COMPARE_FLAGS, COMPARE_HELP
    cmp = sub.add_parser("compare", help="train sync, async and federated on the same data, model and budget; "
                                         "one table, CSV and PNG")
    for name in COMPARE_FLAGS:
        _add_flag(cmp, fields[name], COMPARE_HELP.get(name, fields[name].metadata["help"]),
                  COMPARE_DEFAULTS.get(name, fields[name].default))
    cmp.add_argument("--modes", default="sync,async,federated", help="the modes to train, in this order "
                     "(default: sync,async,federated)")
    cmp.add_argument("--out", metavar="DIR", default="results/compare", help="root writes compare.csv, "
                     "compare_curves.csv, compare.png and each mode's MODE.jsonl here (default: results/compare)")


def _add_flag(parser, f, text, default):
    """--flag-name for Config field `f`; a flag not given is left out, so files and defaults apply."""
    flag = "--" + f.name.replace("_", "-")
    if f.type is bool:  # a switch that is on by default also gets its --no- form
        action = argparse.BooleanOptionalAction if default else "store_true"
        parser.add_argument(flag, action=action, default=argparse.SUPPRESS, help=text)
    elif "const" in f.metadata:  # the flag alone means something: --resume (newest) or --resume PATH
        parser.add_argument(flag, nargs="?", const=f.metadata["const"], default=argparse.SUPPRESS,
                            metavar=_metavar(f), help=text)
    else:
        parser.add_argument(flag, type=_scalar_type(f), default=argparse.SUPPRESS, metavar=_metavar(f),
                            help=text + (f" (default: {default})" if default is not None else ""))


def _scalar_type(f):
    """int, float or str for a Config field (Optional[float] -> float)."""
    kind = typing.get_args(f.type)[0] if typing.get_origin(f.type) is typing.Union else f.type
    return kind if kind in (int, float) else str


def _metavar(f):
    return {int: "N", float: "X"}.get(_scalar_type(f), f.name.upper())


def parse_command(argv):
    """The subcommand and the flags given to it (as a dict); raises UsageError."""
    args = vars(build_parser().parse_args(argv))
    return args.pop("command"), args


def train_config(args):
    """Config from defaults < --config file < flags."""
    settings = load_toml(args["config"]) if args.get("config") else {}
    settings.update(args)
    return Config(**settings)


def parse_config(argv):
    """Config for `distml train ...` (None for the other commands); raises UsageError."""
    command, args = parse_command(argv)
    return train_config(args) if command == "train" else None


def info(comm):
    """Facts a user checks first when a multi-host run misbehaves."""
    import torch
    from .trainer import default_threads
    on_node, threads = comm.node_size(), default_threads(comm)  # collectives: all ranks call them
    launches = comm.allgather_object(launch_info())  # what each rank's launcher told it
    if comm.is_root:
        print(f"distml        {__version__}")
        print(f"MPI library   {comm.library_version()} (MPI {comm.mpi_standard()})")
        print(f"world size    {comm.size} ({on_node} rank(s) on this node)")
        print(f"python        {platform.python_version()} on {platform.node()}")
        print(f"torch         {torch.__version__}, {threads} thread(s) per rank by default")
        print(f"CUDA-aware    {_comm.cuda_aware_mpi()}")
        print("launch, as each rank sees it:")
        print("\n".join("  " + line for line in format_launch_table(launches, comm.size)))
    return 0


def show_partition(args):
    """`distml partition`: each client's label histogram, as printed (and plotted) on rank 0."""
    from .data import load_dataset
    from .partition import format_histogram, label_histogram, natural, partition, plot_histogram
    plot = args.pop("plot")
    cfg = Config(**{"mode": "federated", **PARTITION_DEFAULTS, **args}).validate()
    if cfg.clients < 1:
        raise UsageError(f"--clients must be >= 1, got {cfg.clients}")
    _check_plot_path(plot, cfg.dataset)
    dataset = load_dataset(cfg)
    if dataset.task != "classification":
        raise UsageError(f"distml partition shows label histograms and needs a classification data set; "
                         f"{cfg.dataset} is a regression")
    cfg.validate_data(dataset)
    labels = dataset.labels
    if labels is None:
        raise UsageError(f"distml partition shows label histograms: {cfg.dataset} has no per-sample labels "
                         f"(a targets attribute)")
    parts = (natural(dataset.groups) if cfg.partition == "natural" else
             partition(labels, cfg.clients, cfg.partition, alpha=cfg.alpha,
                       shards_per_client=cfg.shards_per_client, seed=cfg.seed))
    hist = label_histogram(labels, parts, dataset.num_classes)
    print(f"{dataset.name}: {len(labels)} training samples, {dataset.num_classes} classes, "
          f"{_describe_partition(cfg)} over {cfg.clients} clients (seed {cfg.seed})")
    print(format_histogram(hist))
    print(_summary(hist))
    if plot:
        plot_histogram(hist, plot)
        print(f"wrote {plot}")
    return 0


def _summary(hist):
    """One line a user compares across --alpha values: how many classes, how many samples per client."""
    present, sizes = (hist > 0).sum(axis=1), hist.sum(axis=1)
    return (f"classes per client: mean {present.mean():.2f}, min {present.min()}, max {present.max()}; "
            f"samples per client: min {sizes.min()}, max {sizes.max()}")


def _describe_partition(cfg):
    extra = {"dirichlet": f" (alpha {cfg.alpha:g})", "shards": f" ({cfg.shards_per_client} per client)"}
    return cfg.partition + extra.get(cfg.partition, "")


def _check_plot_path(plot, dataset):
    """--plot must be a writable file that is not the data set, and matplotlib must be there."""
    if plot is None:
        return
    _check_output_path(plot, "plot")
    if os.path.realpath(plot) == os.path.realpath(dataset):
        raise UsageError(f"--plot {plot} is also given as --dataset; it would be overwritten")
    import importlib.util
    if importlib.util.find_spec("matplotlib") is None:
        raise UsageError("--plot needs matplotlib: pip install matplotlib")


def command():
    """The `distml` command (console script and `python -m distml`): main() in a process of its own.

    After main() the process only exits, so late stop signals are ignored rather than given their
    default action, which would kill a rank on its way to its exit code (`scancel --full`
    delivers USR1 more than once). Called in-process, main() leaves the handlers as it found them.

    A job that survived a lost rank ends without MPI_Finalize: requests abandoned to the dead
    rank can keep Finalize waiting forever (seen under ULFM in async mode), and under ULFM mpirun
    takes such an exit as a normal one.
    """
    code = main(ignore_late_signals=True)
    if _comm.world().lost:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code or 0)
    return code


def main(argv=None, *, ignore_late_signals=False):
    comm = _comm.world()
    with StopFlag(ignore_after=ignore_late_signals) as signals:  # a stop signal from here on: at the first step
        return _main(comm, argv, signals)


def _main(comm, argv, signals):
    cfg = None  # `distml compare` has one per mode, and no checkpoints
    try:
        from .agreement import agree
        command, args = agree(comm, lambda: parse_command(argv))
        if command == "info":
            return info(comm)
        if command == "partition":
            return agree(comm, lambda: show_partition(args) if comm.is_root else 0)
        if command == "compare":
            from .compare import compare
            return compare(args, comm, signals)
        from .trainer import run
        cfg = agree(comm, lambda: train_config(args))
        run(cfg, comm, signals=signals)
        return 0
    except Preempted as e:
        return preempted(comm, e, cfg)
    except NonFinite as e:
        return nonfinite(comm, e)
    except UsageError as e:
        if comm.is_root:
            print(f"distml: error: {e}", file=sys.stderr, flush=True)
        return 2
    except SystemExit as e:  # --help / --version
        return e.code or 0
    except BrokenPipeError as e:
        if comm.size == 1 and _stdout_gone():  # `distml train | head`: whoever read the output has gone
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # no second error at exit's flush
            os.close(devnull)
            return 141  # as a shell reports a process ended by SIGPIPE, and as quietly
        abort_on_error(comm, e)
    except BaseException as e:  # noqa: BLE001  (anything else ends the whole job)
        abort_on_error(comm, e)


def _stdout_gone():
    """Whether stdout is a pipe whose reader has closed it (poll reports an error on it), not some other
    broken pipe (a socket in the user's model code) that must not pass silently."""
    import select
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLERR)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no such descriptor (a StringIO, closed, None): not a pipe
        return False


def preempted(comm, error, cfg):
    """After the agreed stop and its checkpoint: one line from root, --requeue, and exit 75 everywhere."""
    if comm.is_root:
        print(f"distml: {error}; exit {EXIT_PREEMPTED}"
              + ("; continue with the same command and --resume" if error.checkpoint else ""),
              file=sys.stderr, flush=True)
        if cfg is not None and cfg.requeue:
            from .cluster import requeue_job
            ok, message = requeue_job()
            print(f"distml: {message}", file=sys.stderr, flush=True)
    return EXIT_PREEMPTED


def nonfinite(comm, error):
    """After the agreed non-finite stop (no checkpoint): one line from root, and exit 65 everywhere."""
    if comm.is_root:
        print(f"distml: {error}; exit {EXIT_NONFINITE}", file=sys.stderr, flush=True)
    return EXIT_NONFINITE


def abort_on_error(comm, error):
    """Print one line naming the failed rank, then end every rank of the job (MPI Abort).

    One rank reports (the failed one; for a set-up failure rank 0; for a lost
    rank the first survivor), and the others wait for its abort: aborting
    first would end the reporter before it has printed.
    """
    reporter, line = _failure_line(comm, error)
    if comm.rank != reporter:
        time.sleep(_REPORT_WAIT_S)  # the reporter's MPI Abort ends this process; if it never comes, abort
        comm.abort(1)
    if os.environ.get("DISTML_DEBUG"):
        traceback.print_exc()
    print(line, file=sys.stderr, flush=True)
    comm.abort(1)


_REPORT_WAIT_S = 10.0


def _failure_line(comm, error):
    """(the rank that reports, its one line) for an error that ends the job."""
    if isinstance(error, RankLost):
        lost = error.ranks or comm.failed_ranks()  # a revoked call names none: ask ULFM again
        alive = [r for r in range(comm.size) if comm.members[r] not in lost]
        ranks = ", ".join(map(str, lost)) or "a rank"
        return alive[0] if alive else comm.rank, (
            f"distml: rank {ranks} of {len(comm.members) + len(comm.lost)} was lost (seen by rank "
            f"{comm.members[comm.rank]} in {error.call}); aborting all ranks. To train on without it: "
            f"mpirun --with-ft ulfm ... --on-rank-failure continue")
    if isinstance(error, RankFailure):  # seen by all ranks during set-up: rank 0 reports it
        rank, what, reporter = error.rank, error.message, 0
    else:
        rank, reporter = comm.members[comm.rank], comm.rank
        what = "interrupted" if isinstance(error, KeyboardInterrupt) else f"{type(error).__name__}: {error}"
    hint = "" if os.environ.get("DISTML_DEBUG") else "; set DISTML_DEBUG=1 for the traceback"
    return reporter, f"distml: rank {rank} of {comm.size} failed: {what} (aborting all ranks{hint})"
