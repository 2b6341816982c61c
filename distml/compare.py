"""`distml compare`: sync, async and federated on the same data, model and budget, in one table.

    mpirun -n 2 distml compare                                   # digits, mlp, 20 passes each, target 0.9
    mpirun -n 3 distml compare --slow-rank 2 --slow-factor 3     # with a straggler
    mpirun -n 2 distml compare --model cnn --epochs 5 --target-accuracy 0.95 --out results/cnn

The modes train one after another inside the same MPI job, each through
`trainer.run` with the same settings, after one untimed epoch of the first
mode (a process's first steps pay one-time costs that would count against
whichever mode came first). The budget is the same number of passes
over the training set, `--epochs`: sync trains that many epochs, async serves
that many epochs' worth of gradients (`--epochs` is already its whole-job
budget), and federated trains as many rounds as make that many passes (a round
is `--local-epochs` passes of the sampled share of the clients). Every mode is
evaluated after each epoch (round); each record carries the training seconds of
that epoch and the bytes handed to MPI so far, so the curves put test accuracy
against training time and against bytes.

Root prints the table and writes OUT/compare.csv (a row per mode),
OUT/compare_curves.csv (every evaluation), OUT/compare.png and OUT/MODE.jsonl
(each run's --metrics).
"""
import dataclasses
import os

from .agreement import agree
from .config import MODES, Config, UsageError, _check_output_path

__all__ = ["COMPARE_FLAGS", "compare", "curve", "to_target", "federated_rounds", "format_table"]

# The train flags `distml compare` takes, with the same meaning: what all modes share, and each mode's knobs.
COMPARE_FLAGS = ("dataset", "target", "test_fraction", "samples", "features", "classes", "model", "hidden",
                 "epochs", "batch_size", "seed", "threads", "lr", "optimizer", "momentum", "weight_decay",
                 "lr_schedule", "bucket_mb", "servers", "staleness", "local_epochs", "clients",
                 "clients_per_round", "partition", "alpha", "target_accuracy", "slow_rank", "slow_factor", "quiet")
COMPARE_DEFAULTS = {"target_accuracy": 0.9}
COMPARE_HELP = {
    "epochs": "the budget: passes over the training set, the same for every mode (federated: rounds x "
              "--local-epochs x the sampled share of the clients)",
    "target_accuracy": "the table gives the training time and bytes of the first evaluation at or above this",
    "clients_per_round": "clients sampled each round (0: all)",
    "quiet": "no epoch lines while the modes train (the table is still printed)",
}


def compare(args, comm, signals=None):
    """Train each of --modes as `args` (the parsed flags) say; root prints the table and writes the files."""
    from .trainer import run
    out, modes = args.pop("out"), args.pop("modes")
    configs, n_train = agree(comm, lambda: _configs(args, modes, out, comm))
    first = next(iter(configs.values()))
    if comm.is_root:
        print(f"compare: warm-up, one {first.mode} epoch (not counted)", flush=True)
    run(dataclasses.replace(first, epochs=1, rounds=1, metrics=None, quiet=True), comm, signals=signals)
    results = {}
    for i, (mode, cfg) in enumerate(configs.items()):
        if comm.is_root:
            print(f"compare: {i + 1}/{len(configs)} {mode} ({describe(cfg, comm.size)})", flush=True)
        results[mode] = run(cfg, comm, signals=signals)
    if comm.is_root:
        _report(configs, results, comm.size, n_train, out)
    return 0


def _configs(args, modes, out, comm):
    """A Config per mode, every one validated (and the data set checked) before anything trains or is written."""
    from .data import load_dataset
    base = Config(**{**COMPARE_DEFAULTS, **args, "eval_every": 1}).validate(writes_outputs=False)
    configs = {}
    for mode in _modes(modes, comm.size):
        rounds = {"rounds": federated_rounds(base, comm.size)} if mode == "federated" else {}
        cfg = dataclasses.replace(base, mode=mode, metrics=os.path.join(out, f"{mode}.jsonl"), **rounds)
        configs[mode] = cfg.validate(writes_outputs=False).validate_world(comm.size)
    dataset = load_dataset(base)
    if dataset.task != "classification":
        raise UsageError(f"distml compare compares test accuracy and needs a classification data set; "
                         f"{base.dataset} is a regression")
    for cfg in configs.values():
        cfg.validate_data(dataset, comm.size)
    if comm.is_root:
        _check_matplotlib()
        _make_out(out)
    return configs, len(dataset.train)


def _make_out(out):
    """--out: an existing directory, or one made (with its parents) in a writable one."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out} exists and is not a directory")
    existing = os.path.abspath(out)
    while not os.path.isdir(existing):
        existing = os.path.dirname(existing)
    _check_output_path(os.path.join(existing, "compare.csv"), "out")  # writable, before making anything
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out: cannot make {out}: {e.strerror}")


def _modes(text, size):
    modes = [m.strip() for m in text.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes) or len(set(modes)) < len(modes):
        raise UsageError(f"--modes must be a comma-separated list of {', '.join(MODES)}, each once, got {text!r}")
    if "async" in modes and size < 2:
        raise UsageError("distml compare runs async mode, which needs at least 2 ranks (a server and a worker): "
                         "launch with mpirun -n 2 or more, or leave it out with --modes sync,federated")
    return modes


def _check_matplotlib():
    import importlib.util
    if importlib.util.find_spec("matplotlib") is None:
        raise UsageError("distml compare draws its curves with matplotlib: pip install matplotlib "
                         "(or pip install 'distml[plot]')")


def federated_rounds(cfg, size):
    """Rounds that make cfg.epochs passes over the training set (at least 1)."""
    share = cfg.clients_each_round(size) / cfg.num_clients(size)
    return max(1, round(cfg.epochs / (cfg.local_epochs * share)))


def describe(cfg, size):
    """The mode's layout in words: '2 ranks', '1 server + 2 workers', '2 clients, 2 a round, 1 local epoch'."""
    if cfg.mode == "async":
        workers = size - cfg.servers
        return f"{cfg.servers} server{'s' * (cfg.servers > 1)} + {workers} worker{'s' * (workers > 1)}"
    if cfg.mode == "federated":
        return (f"{cfg.num_clients(size)} clients, {cfg.clients_each_round(size)} a round, {cfg.rounds} round{'s' * (cfg.rounds > 1)} "
                f"of {cfg.local_epochs} local epoch{'s' * (cfg.local_epochs > 1)}")
    return f"{size} rank{'s' * (size > 1)}"


# -- the curves and the table (pure: no MPI) ------------------------------------------
def curve(history, unit):
    """Each evaluated epoch (round): its number, training seconds and MPI bytes so far, test accuracy."""
    points, seconds = [], 0.0
    for record in history:
        seconds += record[f"{unit}_time_s"]
        if record.get("test_accuracy") is not None:
            points.append({unit: record[unit], "time_s": seconds, "bytes": record["bytes_communicated"],
                           "test_accuracy": record["test_accuracy"]})
    return points


def to_target(points, target):
    """The first point of a curve at or above `target` accuracy, or None if none reaches it."""
    return next((p for p in points if p["test_accuracy"] >= target), None)


def row(mode, result, points, cfg, size, n_train):
    """The table's row for one mode (a dict, also the CSV's row)."""
    s, unit = result.summary, _unit(mode)
    reached = to_target(points, cfg.target_accuracy)
    samples = sum(r["samples"] for r in result.history)
    return {"mode": mode, "layout": describe(cfg, size), "passes": samples / n_train,
            "test_accuracy": s["test_accuracy"], "train_time_s": s["train_time_s"],
            "wall_time_s": s["wall_time_s"], "bytes_communicated": s["bytes_communicated"],
            "target_accuracy": cfg.target_accuracy,
            "to_target": f"{unit} {reached[unit]}" if reached else None,
            "time_to_target_s": reached["time_s"] if reached else None,
            "bytes_to_target": reached["bytes"] if reached else None}


def format_table(rows):
    """The rows as a Markdown table, for the terminal and the README."""
    target = rows[0]["target_accuracy"]
    head = ["mode", "layout", "passes", "test accuracy", "train s", "wall s", "MB via MPI",
            f"reached {target:g} at", "train s to it", "MB to it"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        hit = r["to_target"] is not None
        reached = [r["to_target"], f"{r['time_to_target_s']:.2f}", f"{r['bytes_to_target'] / 1e6:.1f}"] \
            if hit else ["not reached", "–", "–"]
        cells = [r["mode"], r["layout"], f"{r['passes']:.1f}", f"{r['test_accuracy']:.4f}",
                 f"{r['train_time_s']:.2f}", f"{r['wall_time_s']:.2f}", f"{r['bytes_communicated'] / 1e6:.1f}",
                 *reached]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _report(configs, results, size, n_train, out):
    """Root: the table on stdout, the CSV files and the plot in `out`."""
    rows, curves = [], {}
    for mode, cfg in configs.items():
        curves[mode] = curve(results[mode].history, _unit(mode))
        rows.append(row(mode, results[mode], curves[mode], cfg, size, n_train))
    files = [os.path.join(out, name) for name in ("compare.csv", "compare_curves.csv", "compare.png")]
    _write_csv(files[0], rows)
    _write_csv(files[1], [_curve_row(m, p) for m, points in curves.items() for p in points])
    plot_curves(curves, rows[0]["target_accuracy"], files[2])
    print(format_table(rows))
    print(f"compare: wrote {', '.join(files)}", flush=True)


def _unit(mode):
    return "round" if mode == "federated" else "epoch"


def _curve_row(mode, point):
    unit = _unit(mode)
    return {"mode": mode, "unit": unit, "number": point[unit], "time_s": point["time_s"], "bytes": point["bytes"],
            "test_accuracy": point["test_accuracy"]}


def _write_csv(path, rows):
    import csv
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot_curves(curves, target, path):
    """A PNG at `path` (written atomically): test accuracy against training seconds and against MB via MPI."""
    from matplotlib.figure import Figure  # no pyplot: renders with Agg, touches no global backend
    from .checkpoint import atomic_write
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    by_time, by_bytes = fig.subplots(1, 2, sharey=True)
    for mode, points in curves.items():
        accuracy = [p["test_accuracy"] for p in points]
        by_time.plot([p["time_s"] for p in points], accuracy, marker=".", label=mode)
        by_bytes.plot([p["bytes"] / 1e6 for p in points], accuracy, marker=".", label=mode)
    for ax, label in ((by_time, "training time, s"), (by_bytes, "MB handed to MPI (all ranks), log scale")):
        ax.axhline(target, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    by_bytes.set_xscale("log")
    by_time.set_ylabel("test accuracy")
    by_time.legend(loc="lower right")
    fig.suptitle(f"distml compare: accuracy against time and bytes (dotted: target {target:g})")
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
