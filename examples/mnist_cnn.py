"""An MNIST-style CNN trained by your own loop with distml: a DataLoader, resumable and preemptible.

    mpirun -n 2 python examples/mnist_cnn.py --epochs 8 --checkpoint-dir ckpt-cnn
    kill -USR1 <mpirun's pid>        # every rank stops after the same step, saves, exits 75
    mpirun -n 2 python examples/mnist_cnn.py --epochs 8 --checkpoint-dir ckpt-cnn   # goes on from there

The data are scikit-learn's bundled handwritten digits (1,797 8x8 images: MNIST in miniature,
no download). The recipe is PyTorch's MNIST example's: two convolutions, dropout, Adadelta and
StepLR (here a global batch of 32 and a gentler decay, 0.9 per epoch, for the smaller set). Lines marked `# distributed` are all that differs from a single-process loop; with the
same global batch, any number of ranks trains the same weights as one process.
"""
import argparse
import sys

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F

import distml


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 16, 3, padding=1), nn.Conv2d(16, 32, 3, padding=1)
        self.dropout1, self.dropout2 = nn.Dropout(0.25), nn.Dropout(0.5)
        self.fc1, self.fc2 = nn.Linear(32 * 4 * 4, 64), nn.Linear(64, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
        x = F.relu(self.fc1(self.dropout1(torch.flatten(x, 1))))
        return F.log_softmax(self.fc2(self.dropout2(x)), dim=1)


def digits():
    """(train, test) TensorDatasets of 1x8x8 images in [0, 1] and their labels; the last 297 are the test set."""
    data = load_digits()
    x = torch.tensor(data.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(data.target)
    return (torch.utils.data.TensorDataset(x[:1500], y[:1500]),
            torch.utils.data.TensorDataset(x[1500:], y[1500:]))


def evaluate(model, test_set):
    """Test loss and accuracy over the whole test set, each rank scoring its part."""
    model.eval()
    sampler = distml.ShardSampler(test_set, 100, shuffle=False)                       # distributed
    loss, correct = 0.0, 0
    with torch.no_grad():
        for indices in sampler:
            x, y = test_set[indices]
            output = model(x)
            loss += F.nll_loss(output, y, reduction="sum").item()
            correct += (output.argmax(1) == y).sum().item()
    loss, correct = distml.allreduce(torch.tensor([loss, correct]), op="sum").tolist()  # distributed
    return loss / len(test_set), correct / len(test_set)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32, help="global batch (split over the ranks)")
    parser.add_argument("--lr", type=float, default=1.0)
    parser.add_argument("--gamma", type=float, default=0.9, help="StepLR's factor per epoch")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers per rank")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--checkpoint-dir", default="checkpoints/mnist_cnn")
    parser.add_argument("--save", help="write the final weights here (rank 0)")
    args = parser.parse_args()

    distml.init()                                  # distributed: MPI, threads per rank, the hang doctor
    train_set, test_set = digits()
    torch.manual_seed(args.seed)                   # the same initial weights on every rank
    model = Net()
    distml.seed(args.seed)                         # distributed: dropout masks of each rank's own
    sampler = distml.ShardSampler(train_set, global_batch=args.batch_size, seed=args.seed)      # distributed
    # distml.DataLoader: torch's, its workers safe under MPI (never a fork of this process; deaf to the
    # stop signals that mpirun and SLURM send the whole process group; gone when their rank is)
    loader = distml.DataLoader(train_set, batch_sampler=sampler, num_workers=args.workers,   # distributed
                               persistent_workers=args.workers > 0)
    optimizer = torch.optim.Adadelta(model.parameters(), lr=args.lr)
    optimizer = distml.DistributedOptimizer(optimizer, model, op="sum")           # distributed
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=args.gamma)
    ckpt = distml.Checkpointer(args.checkpoint_dir, model=model, optimizer=optimizer,        # distributed
                               scheduler=scheduler, sampler=sampler)
    state = ckpt.restore() or {"epoch": 0}         # distributed: None the first time
    if state["epoch"] >= args.epochs:
        distml.print(f"{args.checkpoint_dir} holds a run that has done its {args.epochs} epochs: nothing to do "
                     f"(another --checkpoint-dir starts afresh)")

    for epoch in range(state["epoch"], args.epochs):
        sampler.set_epoch(epoch)                   # distributed: continues mid-epoch after a restore
        model.train()
        for x, y in loader:
            optimizer.zero_grad()
            # distributed: summed over this rank's part, divided by the global batch: the exact mean
            loss = F.nll_loss(model(x), y, reduction="sum") / sampler.global_size
            loss.backward()
            optimizer.step()                       # distributed: sums the gradients over the ranks
            if distml.stop_requested():            # distributed: true on every rank at the same step
                path = ckpt.save(epoch=epoch)
                distml.print(f"stopped by a signal in epoch {epoch + 1}, step {sampler.step}: wrote {path}")
                sys.exit(75)
        scheduler.step()
        test_loss, accuracy = evaluate(model, test_set)
        distml.print(f"epoch {epoch + 1}: test loss {test_loss:.4f}, accuracy {accuracy:.4f}")
        ckpt.save(epoch=epoch + 1)
    if args.save and distml.is_root():             # distributed: one file, from rank 0
        torch.save(model.state_dict(), args.save)


if __name__ == "__main__":
    main()
