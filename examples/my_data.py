"""Your own data, model and loss, trained by `distml train` (the README's tour):

    mpirun -n 2 distml train --dataset examples/my_data.py:make --model examples/my_data.py:net \
        --loss examples/my_data.py:loss --epochs 3

A plain PyTorch project: a map-style Dataset of noisy sine waves (the task: predict each next
value of a wave), a small recurrent sequence model, and a loss that gives one value per sample.
distml shards the Dataset exactly over the ranks, sums the per-sample losses and divides by the
global batch, so two ranks train exactly as one process with twice the batch.
"""
import math

import torch
from torch import nn
from torch.nn import functional as F

LENGTH = 24  # time steps per wave


class Waves(torch.utils.data.Dataset):
    """`count` waves of random frequency and phase (seeded): item i is (x, y), x the noisy
    wave's first LENGTH values as (LENGTH, 1), y the next value after each, (LENGTH,)."""

    deterministic = True  # __getitem__ draws no random numbers: distml need not seed it

    def __init__(self, count, seed):
        gen = torch.Generator().manual_seed(seed)
        freq = 0.2 + 0.6 * torch.rand(count, 1, generator=gen)
        phase = 2 * math.pi * torch.rand(count, 1, generator=gen)
        t = torch.arange(LENGTH + 1, dtype=torch.float32)
        self.waves = torch.sin(freq * t + phase) + 0.05 * torch.randn(count, LENGTH + 1, generator=gen)

    def __len__(self):
        return len(self.waves)

    def __getitem__(self, i):
        wave = self.waves[i]
        return wave[:-1].unsqueeze(-1), wave[1:]


def make():
    """The (train, test) pair distml calls for: --dataset examples/my_data.py:make."""
    return Waves(2000, seed=0), Waves(400, seed=1)


class Predictor(nn.Module):
    """A GRU reading the wave, a linear head giving the next value at every step."""

    def __init__(self, hidden=32):
        super().__init__()
        self.rnn = nn.GRU(1, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x):  # (B, T, 1) -> (B, T)
        return self.head(self.rnn(x)[0]).squeeze(-1)


def net(input_shape, num_outputs):
    """--model examples/my_data.py:net; distml passes one sample's shape and the outputs it expects."""
    return Predictor()


def loss(output, target):
    """--loss examples/my_data.py:loss: one value per sample, shape (batch,) (Huber, averaged over time)."""
    return F.smooth_l1_loss(output, target, reduction="none", beta=0.1).mean(dim=1)
