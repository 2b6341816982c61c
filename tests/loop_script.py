"""The documented loop (docs/api.md), for the end-to-end tests: python loop_script.py DIR [options].

--linger S: rank 0 works S seconds after the loop while the others wait to exit.
--signal-at STEP: rank 0 sends SIGUSR1 to its parent (mpirun, which forwards it to every rank) after
that step, as `kill -USR1` would. --mismatch STEP: after that step rank 0 alone calls a metric
allreduce while the others go on into the gradient reduction (the bug distml must report, not
turn into memory corruption).
"""
import argparse
import os
import signal
import sys
import time

import torch
from torch import nn

import distml


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("dir")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--signal-at", type=int, default=0)
    parser.add_argument("--mismatch", type=int, default=0)
    parser.add_argument("--watchdog", type=float, default=600)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--linger", type=float, default=0, help="rank 0 works this long after the loop")
    args = parser.parse_args()

    distml.init(watchdog=args.watchdog)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(105, 6, generator=gen)  # 105 = 17 x 6 + 3: a last batch of 3 (2 + 1 at 2 ranks)
    data = torch.utils.data.TensorDataset(x, torch.randint(0, 3, (105,), generator=gen))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, args.hidden), nn.Tanh(), nn.Linear(args.hidden, 3))
    sampler = distml.ShardSampler(data, global_batch=6, seed=1)
    loader = torch.utils.data.DataLoader(data, batch_sampler=sampler)
    optimizer = distml.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), model,
                                            op="sum")
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.2, total_steps=args.epochs * len(sampler))
    ckpt = distml.Checkpointer(os.path.join(args.dir, "ckpt"), model=model, optimizer=optimizer,
                               scheduler=scheduler, sampler=sampler)
    state = ckpt.restore() or {"epoch": 0}
    steps = 0
    for epoch in range(state["epoch"], args.epochs):
        sampler.set_epoch(epoch)
        for xb, yb in loader:
            optimizer.zero_grad()
            (nn.functional.cross_entropy(model(xb), yb, reduction="sum") / sampler.global_size).backward()
            optimizer.step()
            scheduler.step()
            steps += 1
            if steps == args.signal_at and distml.rank() == 0:
                os.kill(os.getppid(), signal.SIGUSR1)
            if steps == args.mismatch and distml.rank() == 0:
                print(f"mismatch at {time.time()}", flush=True)
                distml.allreduce(1.0)
            if distml.stop_requested():
                ckpt.save(epoch=epoch)
                distml.print(f"stopped at epoch {epoch} step {sampler.step}", file=sys.stderr)
                sys.exit(75)
        ckpt.save(epoch=epoch + 1)
    if distml.is_root():
        torch.save(model.state_dict(), os.path.join(args.dir, "final.pt"))
        time.sleep(args.linger)  # the others wait at the end meanwhile: no stall for the hang doctor
    distml.print(f"threads {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
