"""A training script written as Horovod's examples/pytorch/pytorch_mnist.py is, on distml.horovod.

    mpirun -n 2 python tests/horovod_scripts/digits_mnist_style.py --epochs 8

Only the import line is distml's: every `hvd.` call is one Horovod's MNIST
example makes (DistributedSampler shards, broadcast of parameters and
optimizer state, DistributedOptimizer with named parameters and optional fp16
compression, metric averaging by named allreduce). Data: scikit-learn's digits
(8x8), from distml's cache. Prints the test accuracy and a weights checksum.
"""
import argparse

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.data.distributed
from torch import nn

import distml.horovod as hvd
from distml.data import bundled

parser = argparse.ArgumentParser(description="digits, Horovod style")
parser.add_argument("--batch-size", type=int, default=32)
parser.add_argument("--epochs", type=int, default=8)
parser.add_argument("--lr", type=float, default=0.1)
parser.add_argument("--momentum", type=float, default=0.5)
parser.add_argument("--seed", type=int, default=42)
parser.add_argument("--fp16-allreduce", action="store_true", default=False)
parser.add_argument("--fail-on-rank", type=int, default=-1, help="raise on this rank in epoch 2 (a test)")
parser.add_argument("--mismatch", action="store_true", help="every rank reduces another shape (a test)")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 16, kernel_size=3, padding=1)
        self.fc1 = nn.Linear(16 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = F.relu(F.max_pool2d(self.conv(x), 2))
        return F.log_softmax(self.fc2(F.relu(self.fc1(x.flatten(1)))), dim=1)


def metric_average(val, name):
    return hvd.allreduce(torch.tensor(val), name=name).item()


def main(args):
    hvd.init()
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    data, target = bundled("digits")
    X = torch.tensor(data / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(target, dtype=torch.int64)
    order = np.random.default_rng(0).permutation(len(y))
    train = torch.utils.data.TensorDataset(X[order[:1437]], y[order[:1437]])
    test = torch.utils.data.TensorDataset(X[order[1437:]], y[order[1437:]])
    train_sampler = torch.utils.data.distributed.DistributedSampler(train, num_replicas=hvd.size(), rank=hvd.rank())
    train_loader = torch.utils.data.DataLoader(train, batch_size=args.batch_size, sampler=train_sampler)
    test_sampler = torch.utils.data.distributed.DistributedSampler(test, num_replicas=hvd.size(), rank=hvd.rank())
    test_loader = torch.utils.data.DataLoader(test, batch_size=100, sampler=test_sampler)

    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr * hvd.size(), momentum=args.momentum)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)
    compression = hvd.Compression.fp16 if args.fp16_allreduce else hvd.Compression.none
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                         compression=compression, op=hvd.Average)
    for epoch in range(1, args.epochs + 1):
        model.train()
        train_sampler.set_epoch(epoch)
        for data, target in train_loader:
            optimizer.zero_grad()
            F.nll_loss(model(data), target).backward()
            optimizer.step()
        if epoch == 2 and hvd.rank() == args.fail_on_rank:
            raise RuntimeError("a bug on this rank")
        if args.mismatch:
            hvd.allreduce(torch.zeros(hvd.rank() + 1), name="mismatch")
    model.eval()
    test_loss, correct = 0.0, 0.0
    with torch.no_grad():
        for data, target in test_loader:
            output = model(data)
            test_loss += F.nll_loss(output, target, reduction="sum").item()
            correct += output.argmax(1).eq(target).float().sum().item()
    test_loss = metric_average(test_loss / len(test_sampler), "avg_loss")
    accuracy = metric_average(correct / len(test_sampler), "avg_accuracy")
    checksum = sum(p.double().sum().item() for p in model.parameters())
    print(f"rank {hvd.rank()}: test loss {test_loss:.4f} accuracy {accuracy:.4f} checksum {checksum:.10f}")


if __name__ == "__main__":
    main(parser.parse_args())
