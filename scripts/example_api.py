"""Your own training loop, distributed with distml's Horovod-style API.

    mpirun -n 2 python scripts/example_api.py --epochs 5

Lines marked `# distributed` are all that differs from a single-process loop.
"""
import argparse

import torch
from sklearn.datasets import load_digits
from torch import nn

import distml


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32, help="per rank")
    args = parser.parse_args()

    distml.init()                                                      # distributed
    torch.manual_seed(0)
    digits = load_digits()
    X = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target)
    X_train, y_train, X_test, y_test = X[:1500], y[:1500], X[1500:], y[1500:]

    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    distml.broadcast_parameters(model)                                 # distributed
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    optimizer = distml.DistributedOptimizer(optimizer, model)          # distributed
    loss_fn = nn.CrossEntropyLoss()

    for epoch in range(args.epochs):
        batches = distml.shard_batches(len(y_train), args.batch_size, epoch=epoch)  # distributed
        for batch in batches:
            optimizer.zero_grad()
            x, target = X_train[batch.indices], y_train[batch.indices]
            loss_fn(model(x), target).backward()
            optimizer.step()  # averages the gradients over all ranks, then steps
        with torch.no_grad():
            accuracy = (model(X_test).argmax(1) == y_test).float().mean().item()
        if distml.is_root():                                           # distributed
            print(f"epoch {epoch + 1}: test accuracy {accuracy:.4f}")


if __name__ == "__main__":
    main()
