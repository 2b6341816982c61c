"""A user's workload for the equivalence tests: examples/my_data.py's waves, few and small."""
import sys
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from my_data import Predictor, Waves  # noqa: E402


def make():
    """103 training waves: uneven global batches at every batch size the tests use."""
    return Waves(103, seed=0), Waves(29, seed=1)


def net(input_shape, num_outputs):
    torch.manual_seed(3)
    return Predictor(hidden=8)


def loss(output, target):
    return F.smooth_l1_loss(output, target, reduction="none", beta=0.1).mean(dim=1)


class Labelled(torch.utils.data.Dataset):
    """Classification items with natural groups (7 clients) and labels: federated partitions."""

    def __init__(self, count, seed):
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randn(count, 5, generator=gen)
        self.targets = (self.x[:, 0] + 0.5 * self.x[:, 1] > 0).long().numpy()
        self.groups = torch.randint(0, 7, (count,), generator=gen).numpy()
        self.num_classes = 2

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], int(self.targets[i])


def labelled():
    return Labelled(120, seed=0), Labelled(40, seed=1)
