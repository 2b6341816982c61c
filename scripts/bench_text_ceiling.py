"""The single-process ceiling on text: how low does one process drive the validation loss in a time budget?

    python scripts/bench_text_ceiling.py --seconds 120 --block-size 64 --batch-size 24 --lr 3e-3 \\
        --layers 4 --heads 4 --embed 128 --eval-every-s 15 --csv results/text_ceiling.csv

Options: --dataset PATH (default: the standard library's top-level *.py files, see
distml.data.text), --threads N (torch threads; default torch's own), --seed 0,
--warmup-steps 100, --weight-decay 0.1, --clip-norm 1.0.

The distributed runs are compared with this number, so it is a plain PyTorch
loop with nothing of distml's trainer and no MPI: the same data (load_text,
characters as tokens), the same model (distml.gpt), AdamW (betas 0.9, 0.95,
weight decay on matrices and embeddings only), linear warm-up then cosine decay
to lr / 10 over the steps the budget is estimated to hold (from the speed of
the first 20 steps), gradients clipped at --clip-norm. Each epoch shuffles the
train blocks with a seeded generator (the last partial batch is dropped) and
moves the blocks' offset (set_epoch). The loss is cross-entropy averaged over
tokens.

Every --eval-every-s seconds of training, and at the end, the validation loss
(nats per character) is measured over the whole test text; evaluation is
excluded from the training clock, so the table's elapsed seconds, tokens/s and
the budget are training alone. Prints one table and writes it to --csv.
"""
import argparse
import math
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from benchlib import ROOT, write_csv  # scripts/ is sys.path[0]

sys.path.insert(0, str(ROOT))
from distml.data.text import load_text  # noqa: E402
from distml.gpt import gpt  # noqa: E402

ESTIMATE_AFTER = 20  # steps timed to estimate how many fit the budget
EVAL_BATCH = 128
COLUMNS = ("elapsed_s", "steps", "tokens", "tokens_per_s", "val_loss")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=120, help="training time budget (evaluation excluded)")
    ap.add_argument("--dataset", default="", help="text file or directory (default: the stdlib's *.py)")
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=24)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--embed", type=int, default=128)
    ap.add_argument("--eval-every-s", type=float, default=15)
    ap.add_argument("--csv", default="results/text_ceiling.csv")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup-steps", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--clip-norm", type=float, default=1.0)
    ap.add_argument("--test-fraction", type=float, default=0.1, help="each file's tail held out (as distml's flag)")
    return ap.parse_args(argv)


def adamw(model, *, lr, weight_decay):
    """AdamW as GPT-2 trains: decay on weights with dim >= 2 (matrices, embeddings), not on biases or norms."""
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def learning_rate(step, *, lr, warmup, total):
    """Linear warm-up over `warmup` steps, then cosine from lr to lr / 10 at step `total`, then lr / 10."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr / 10 + (lr - lr / 10) * 0.5 * (1 + math.cos(math.pi * progress))


def batches(train, batch_size, seed):
    """Endless (x, y) batches: epoch after epoch, a seeded shuffle of the blocks at that epoch's offset."""
    generator = np.random.default_rng(seed)
    epoch = 0
    while True:
        train.set_epoch(epoch)
        order = generator.permutation(len(train))
        for first in range(0, len(order) - batch_size + 1, batch_size):
            pairs = [train[i] for i in order[first:first + batch_size]]
            yield torch.stack([x for x, _ in pairs]), torch.stack([y for _, y in pairs])
        epoch += 1


@torch.no_grad()
def evaluate(model, test):
    """Mean cross-entropy in nats per token over every test block."""
    model.eval()
    total = 0.0
    for first in range(0, len(test), EVAL_BATCH):
        pairs = [test[i] for i in range(first, min(first + EVAL_BATCH, len(test)))]
        x, y = torch.stack([x for x, _ in pairs]), torch.stack([y for _, y in pairs])
        total += F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum").item()
    model.train()
    return total / (len(test) * test.block_size)


def step_(model, optimizer, x, y, *, lr, clip_norm):
    """One optimizer step at learning rate `lr`; the step's mean loss per token."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
    optimizer.step()
    return loss.item()


def prepare(args):
    """(train, test, model, optimizer), seeded; prints what was loaded and built."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    began = time.perf_counter()
    train, test = load_text(args.dataset, block_size=args.block_size, seed=args.seed,
                            test_fraction=args.test_fraction)
    loaded = time.perf_counter() - began
    model = gpt(train.num_classes, args.block_size, layers=args.layers, heads=args.heads, embed=args.embed)
    optimizer = adamw(model, lr=args.lr, weight_decay=args.weight_decay)
    print(f"text: {len(train.files)} files, {len(train.tokens):,} characters, vocabulary {train.num_classes}, "
          f"{len(train):,} train / {len(test):,} test blocks of {args.block_size}, loaded in {loaded:.2f} s")
    print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters; torch threads "
          f"{torch.get_num_threads()}; ln(vocabulary) = {math.log(train.num_classes):.3f}")
    return train, test, model, optimizer


def run(args):
    """Train for args.seconds of training time; the table's rows (dicts of COLUMNS)."""
    train, test, model, optimizer = prepare(args)
    stream = batches(train, args.batch_size, args.seed)
    rows, steps, total, paused = [], 0, math.inf, 0.0

    def measure(elapsed):
        """Evaluate and add a row; the seconds that took, to be kept off the training clock."""
        began = time.perf_counter()
        val_loss = evaluate(model, test)
        tokens = steps * args.batch_size * args.block_size
        rows.append(dict(elapsed_s=round(elapsed, 2), steps=steps, tokens=tokens,
                         tokens_per_s=round(tokens / elapsed) if elapsed else 0, val_loss=round(val_loss, 4)))
        print(_line(rows[-1]), flush=True)
        return time.perf_counter() - began

    print(_line(dict(zip(COLUMNS, COLUMNS))))
    measure(0.0)
    start, next_eval = time.perf_counter(), args.eval_every_s
    while True:
        lr = learning_rate(steps, lr=args.lr, warmup=args.warmup_steps, total=total)
        step_(model, optimizer, *next(stream), lr=lr, clip_norm=args.clip_norm)
        steps += 1
        elapsed = time.perf_counter() - start - paused
        if steps == ESTIMATE_AFTER:
            total = _estimate(steps, elapsed, args.seconds)
        done = elapsed >= args.seconds
        if done or elapsed >= next_eval:
            paused += measure(elapsed)
            next_eval = (elapsed // args.eval_every_s + 1) * args.eval_every_s
        if done:
            return rows


def _estimate(steps, elapsed, seconds):
    """The number of steps `seconds` of training hold at the speed of the first `steps`."""
    total = int(seconds / (elapsed / steps))
    print(f"# {elapsed / steps * 1000:.1f} ms a step over the first {steps}: about {total} steps fit "
          f"{seconds:g} s; cosine decay to step {total}", flush=True)
    return total


def _line(row):
    return " ".join(f"{row[c]:>12}" for c in COLUMNS)


def main():
    args = parse_args()
    rows = run(args)
    write_csv(rows, args.csv, fieldnames=list(COLUMNS))
    print(f"# wrote {args.csv}")


if __name__ == "__main__":
    main()
