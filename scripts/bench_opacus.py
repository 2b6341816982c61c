"""DP-SGD on digits: does distml reach Opacus's test accuracy on the same work, at the same epsilon?

    .venv/bin/python scripts/bench_opacus.py [--seeds 5] [--epochs 60] [--with-cosine | --same-draws] [--out results/]

Needs Opacus, which distml does not depend on (pip install opacus). Both arms, per seed: distml's
digits split and its mlp (64-128-64-10) with its initial weights from the seed; Poisson-sampled
batches at q = 128/1438 for 12 steps an epoch (720 steps); each sample's gradient clipped to
C = 1; noise N(0, (2C)^2) on the sum, which is divided by the expected batch 128; SGD lr 0.5,
momentum 0.9, constant rate; epsilon at delta 1e-5.
  distml  the real CLI: mpirun -n 2 python -m distml train --batch-size 64 --threads 1 --dp-clip 1
          --dp-noise 2 --lr-schedule constant (PLD accountant); --with-cosine adds its default cosine.
  opacus  one process, 1 torch thread: PrivacyEngine(accountant="prv").make_private(poisson_sampling=True)
          over a DataLoader of batch 128. make_private takes q = 1/len(loader) = 1/12 and divides by
          int(1438/12) = 119; the run is then given distml's q for its sampler (12 steps an epoch,
          where int(1/q) would be 11), its optimizer's expected batch and its accountant's hook.
The randomness (batches, noise) is each library's own, seeded by the seed. The seeds run
interleaved (seed 0 distml, seed 0 opacus, seed 1 ...). The paired difference is distml's test
accuracy minus Opacus's with the same seed, in points. Prints one table, writes
OUT/bench_opacus.csv (one row per run) and OUT/bench_opacus.png.

--same-draws answers another question: given the same random draws, do the two libraries compute the
same training? Per seed, distml as above (a checkpoint each epoch) and Opacus fed distml's own draws:
each step's Poisson batch (distml.privacy.poisson_sample) and noise (its NoiseSource, added as
N(0, (2C/128)^2) after Opacus's clipping and division by 128). Prints the largest difference of any
weight after the first epoch and after the last, and both test accuracies; writes
OUT/bench_opacus_same_draws.csv (one row per run).
"""
import argparse
import itertools
import math
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from benchlib import ROOT, spread, train_records, write_csv

sys.path.insert(0, str(ROOT))
from distml.checkpoint import list_checkpoints, read_checkpoint  # noqa: E402
from distml.config import Config  # noqa: E402
from distml.data import load_dataset  # noqa: E402
from distml.models import build_model  # noqa: E402
from distml.privacy import NoiseSource, poisson_sample  # noqa: E402
from distml.sharding import num_steps  # noqa: E402

BATCH, RANKS, CLIP, NOISE, LR, MOMENTUM, DELTA = 128, 2, 1.0, 2.0, 0.5, 0.9, 1e-5


def distml_run(seed, epochs, schedule, workdir, checkpoints=None):
    """The summary record of the real CLI at 2 ranks x 64 (and a checkpoint each epoch in `checkpoints`)."""
    flags = ["--dataset", "digits", "--model", "mlp", "--seed", seed, "--epochs", epochs, "--batch-size", BATCH // RANKS,
             "--threads", 1, "--lr", LR, "--momentum", MOMENTUM, "--lr-schedule", schedule,
             "--dp-clip", CLIP, "--dp-noise", NOISE, "--dp-delta", DELTA]
    flags += ["--checkpoint-dir", checkpoints, "--keep", epochs] if checkpoints else []
    summary = train_records(RANKS, flags, Path(workdir) / f"{seed}-{schedule}.jsonl")[-1]
    return {"test_accuracy": summary["test_accuracy"], "epsilon": summary["epsilon"], "steps": summary["steps"],
            "sample_rate": summary["dp_sample_rate"], "wall_time_s": round(summary["wall_time_s"], 2)}


def opacus_private(seed, noise_multiplier):
    """distml's digits split (as a TensorDataset) and Opacus's engine, model and optimizer over distml's
    initial mlp, with distml's expected batch."""
    from opacus import PrivacyEngine
    dataset = load_dataset(Config(dataset="digits", seed=seed))
    model = build_model("mlp", dataset, (128, 64), seed)
    train = torch.utils.data.TensorDataset(torch.from_numpy(dataset.X_train), torch.from_numpy(dataset.y_train))
    engine = PrivacyEngine(accountant="prv")
    model, optimizer, _ = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM),
        data_loader=torch.utils.data.DataLoader(train, batch_size=BATCH), noise_multiplier=noise_multiplier,
        max_grad_norm=CLIP, poisson_sampling=True, noise_generator=torch.Generator().manual_seed(seed))
    optimizer.expected_batch_size = BATCH
    return dataset, train, engine, model, optimizer


def test_accuracy(model, dataset):
    """The share of distml's digits test split that `model` classifies right."""
    model.eval()
    with torch.no_grad():
        correct = (model(torch.from_numpy(dataset.X_test)).argmax(1) == torch.from_numpy(dataset.y_test)).sum()
    return correct.item() / len(dataset.y_test)


def opacus_run(seed, epochs):
    """Opacus on distml's data and initial model, with distml's q, steps and expected batch."""
    from opacus.data_loader import DPDataLoader
    start = time.perf_counter()
    dataset, train, engine, model, optimizer = opacus_private(seed, NOISE)
    q, steps = BATCH / len(train), num_steps(len(train), BATCH)  # distml's: 128/1438, 12
    loader = DPDataLoader(train, sample_rate=q, generator=torch.Generator().manual_seed(seed + 10**6))
    loader.batch_sampler.steps = steps
    optimizer.attach_step_hook(engine.accountant.get_optimizer_hook_fn(sample_rate=q))
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    return {"test_accuracy": test_accuracy(model, dataset), "epsilon": engine.get_epsilon(DELTA),
            "steps": sum(n for _, _, n in engine.accountant.history), "sample_rate": q,
            "wall_time_s": round(time.perf_counter() - start, 2)}


def opacus_same_draws(seed, epochs):
    """Opacus given distml's Poisson batches and noise (its own noise off): the record as opacus_run's
    (no epsilon) and the weights after each epoch."""
    start = time.perf_counter()
    dataset, train, _, model, optimizer = opacus_private(seed, 0.0)
    (X, Y), noise, step, weights = train.tensors, NoiseSource(seed), itertools.count(), []
    q, steps = BATCH / len(Y), num_steps(len(Y), BATCH)

    def add_noise(opt):  # distml's draws for this step, on the mean: N(0, (2C)^2) on the sum, divided by 128
        params = [p for p in opt.params if p.requires_grad]
        z = noise.gaussian((sum(p.numel() for p in params),), NOISE * CLIP / BATCH, next(step), dtype=torch.float32)
        for p, part in zip(params, z.split([p.numel() for p in params])):
            p.grad.add_(part.view_as(p))
    optimizer.attach_step_hook(add_noise)  # in place of the accountant's hook
    for epoch in range(epochs):
        for s in range(steps):
            batch = torch.from_numpy(poisson_sample(seed, "dp-batch", (epoch, s), len(Y), q))
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(X[batch]), Y[batch]).backward()
            optimizer.step()
        weights.append({k: v.clone() for k, v in model._module.state_dict().items()})
    return {"test_accuracy": test_accuracy(model, dataset), "steps": epochs * steps, "sample_rate": q,
            "wall_time_s": round(time.perf_counter() - start, 2)}, weights


def run_all(args):
    """One row per (arm, seed), interleaved by seed."""
    rows, arms = [], ["constant"] + (["cosine"] if args.with_cosine else [])
    with tempfile.TemporaryDirectory() as workdir:
        for seed in range(args.seeds):
            for arm in ["distml"] + ["opacus"] + (["distml-cosine"] if args.with_cosine else []):
                result = (opacus_run(seed, args.epochs) if arm == "opacus" else
                          distml_run(seed, args.epochs, "cosine" if arm.endswith("cosine") else "constant", workdir))
                rows.append({"arm": arm, "seed": seed, **result})
            print(f"seed {seed} done", flush=True)
    return rows, arms


def run_same_draws(args):
    """Per seed, distml and then Opacus with its draws; the Opacus row holds the largest weight differences."""
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for seed in range(args.seeds):
            checkpoints = Path(workdir) / f"checkpoints-{seed}"
            result = distml_run(seed, args.epochs, "constant", workdir, checkpoints)
            rows.append({"arm": "distml", "seed": seed, **result})
            mine = [read_checkpoint(path).model for path in list_checkpoints(checkpoints)]
            result, theirs = opacus_same_draws(seed, args.epochs)
            assert len(mine) == len(theirs) == args.epochs, "not one checkpoint per epoch"
            gap = [max((a[k] - b[k]).abs().max().item() for k in a) for a, b in [(mine[0], theirs[0]),
                                                                                   (mine[-1], theirs[-1])]]
            rows.append({"arm": "opacus-same-draws", "seed": seed, **result,
                         "max_weight_diff_epoch_1": gap[0], "max_weight_diff_last_epoch": gap[1]})
            print(f"seed {seed} done", flush=True)
    return rows


def same_draws_table(rows, epochs):
    """Markdown rows: per seed, both accuracies and the largest weight differences."""
    lines = [f"| seed | distml accuracy | Opacus accuracy (distml's draws) | max weight difference, epoch 1 | "
             f"max weight difference, epoch {epochs} |", "|---|---|---|---|---|"]
    distml = {r["seed"]: r for r in rows if r["arm"] == "distml"}
    for o in (r for r in rows if r["arm"] == "opacus-same-draws"):
        lines.append(f"| {o['seed']} | {distml[o['seed']]['test_accuracy']:.4f} | {o['test_accuracy']:.4f} | "
                     f"{o['max_weight_diff_epoch_1']:.1e} | {o['max_weight_diff_last_epoch']:.1e} |")
    return "\n".join(lines)


def table(rows, arms):
    """Markdown rows: per distml schedule and seed, both accuracies, the paired difference, both epsilons."""
    lines = ["| distml schedule | seed | distml accuracy | Opacus accuracy | distml - Opacus, points | "
             "distml epsilon | Opacus epsilon | steps (distml / Opacus) |", "|---|---|---|---|---|---|---|---|"]
    opacus = {r["seed"]: r for r in rows if r["arm"] == "opacus"}
    for schedule in arms:
        mine = [r for r in rows if r["arm"] == ("distml" if schedule == "constant" else "distml-cosine")]
        for r in mine:
            o = opacus[r["seed"]]
            lines.append(f"| {schedule} | {r['seed']} | {r['test_accuracy']:.4f} | {o['test_accuracy']:.4f} | "
                         f"{100 * (r['test_accuracy'] - o['test_accuracy']):+.2f} | {r['epsilon']:.3f} | "
                         f"{o['epsilon']:.3f} | {r['steps']} / {o['steps']} |")
        diffs = [100 * (r["test_accuracy"] - opacus[r["seed"]]["test_accuracy"]) for r in mine]
        lines.append(f"| {schedule} | **median** | {statistics.median(r['test_accuracy'] for r in mine):.4f} | "
                     f"{statistics.median(o['test_accuracy'] for o in opacus.values()):.4f} | "
                     f"{spread(diffs, '{:+.2f}')} | | | |")
    return "\n".join(lines)


def stock_epsilon(steps):
    """What Opacus would have accounted with make_private's own q = 1/12, for comparison."""
    from opacus.accountants import PRVAccountant
    accountant = PRVAccountant()
    accountant.history = [(NOISE, 1 / num_steps(1438, BATCH), steps)]  # 1438: the train split
    return accountant.get_epsilon(DELTA)


def wall_times(rows, start):
    return "# median wall time per run: " + ", ".join(
        f"{arm} {statistics.median(r['wall_time_s'] for r in rows if r['arm'] == arm):.1f} s"
        for arm in dict.fromkeys(r["arm"] for r in rows)) + f"; total {time.perf_counter() - start:.0f} s"


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for arm in dict.fromkeys(r["arm"] for r in rows):
        mine = [r for r in rows if r["arm"] == arm]
        ax.plot([r["seed"] for r in mine], [r["test_accuracy"] for r in mine], marker="o", label=arm)
    ax.set_xticks(sorted({r["seed"] for r in rows}))
    ax.set_xlabel("seed")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"DP-SGD on digits (z={NOISE:g}, C={CLIP:g}, q=128/1438, {rows[0]['steps']} steps)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--with-cosine", action="store_true", help="also distml with its default cosine schedule")
    parser.add_argument("--same-draws", action="store_true", help="Opacus given distml's batches and noise: "
                        "the largest weight differences and both accuracies (constant schedule)")
    parser.add_argument("--out", default="results/")
    args = parser.parse_args()
    if args.same_draws and args.with_cosine:
        parser.error("--same-draws runs the constant schedule only")
    try:
        import opacus  # noqa: F401
    except ImportError:
        sys.exit("bench_opacus.py compares against Opacus, which distml does not depend on: pip install opacus")
    warnings.filterwarnings("ignore", message="Secure RNG turned off")  # seeded noise, as distml's default
    warnings.filterwarnings("ignore", message="Full backward hook is firing")  # inputs need no grad: harmless
    torch.set_num_threads(1)
    start = time.perf_counter()
    out = Path(args.out)
    if args.same_draws:
        rows = run_same_draws(args)
        print(same_draws_table(rows, args.epochs))
        print(wall_times(rows, start))
        write_csv(rows, str(out / "bench_opacus_same_draws.csv"), list(dict.fromkeys(k for r in rows for k in r)))
        print(f"wrote {out / 'bench_opacus_same_draws.csv'}")
        return
    rows, arms = run_all(args)
    print(table(rows, arms))
    q = rows[0]["sample_rate"]
    assert all(math.isclose(r["sample_rate"], q) for r in rows), "the arms sampled at different rates"
    print(f"# q = {q:.5f} in both arms; stock make_private (q = 1/12, dividing by 119) would account "
          f"epsilon {stock_epsilon(rows[0]['steps']):.3f}")
    print(wall_times(rows, start))
    write_csv(rows, str(out / "bench_opacus.csv"))
    try:
        plot(rows, out / "bench_opacus.png")
    except ImportError:
        pass
    print(f"wrote {out / 'bench_opacus.csv'}" + (" and .png" if (out / "bench_opacus.png").exists() else ""))


if __name__ == "__main__":
    main()
