"""Users' Dataset functions, losses and workers for the tests: good ones and each kind of mistake."""
import os
import signal

import numpy as np
import torch


class Pairs(torch.utils.data.Dataset):
    """n items (x, y): x of `shape`, y a class (or a float target); optional hooks."""

    def __init__(self, n=40, shape=(3,), dtype=torch.float32, floats=False, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, *shape, generator=gen).to(dtype)
        self.y = (self.x.flatten(1)[:, 0] > 0).long()
        self.floats = floats

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], (float(self.y[i]) if self.floats else int(self.y[i]))


def good():
    return Pairs(40), Pairs(12, seed=1)


def float64_inputs():
    return Pairs(30, dtype=torch.float64)


def raises():
    raise FileNotFoundError("images/ is missing")


def not_a_dataset():
    return {"x": [1, 2, 3]}


def empty():
    return Pairs(0), Pairs(3)


class Ragged(Pairs):
    def __getitem__(self, i):
        return torch.zeros(3 + i % 2), 0


def ragged():
    return Ragged(20)


class Padded(Ragged):
    """Ragged items with a collate that pads them: accepted."""

    @staticmethod
    def collate(items):
        width = max(len(x) for x, _ in items)
        x = torch.stack([torch.nn.functional.pad(x, (0, width - len(x))) for x, _ in items])
        return x[:, :3], torch.tensor([y for _, y in items])


def padded():
    return Padded(20)


class Named(Pairs):
    def __getitem__(self, i):
        return self.x[i], "cat"


def text_targets():
    return Named(10)


class Flags(Pairs):
    def __getitem__(self, i):
        return self.x[i], True


def bool_targets():
    return Flags(10)


def no_groups():
    return Pairs(40)


def mean_loss(output, target):
    return torch.nn.functional.cross_entropy(output, target)  # a mean: one number, not one per sample


def list_loss(output, target):
    return [0.0] * len(target)


class Recorder(Pairs):
    """Writes, from each loading worker, whether MPI is initialised there and who its parent is
    (worker-PID.txt), and from the process that trains, its own process id (rank-PID.txt), in `folder`
    (read from DISTML_TEST_RECORD where the Dataset is built: a forkserver started earlier in a test
    session keeps the environment it started with, so a worker must not read it)."""

    def __init__(self, n, folder):
        super().__init__(n)
        self.folder = folder

    def __getitem__(self, i):
        from mpi4py import MPI  # a user's module may import mpi4py: it must not initialise MPI in a worker
        role = "rank" if torch.utils.data.get_worker_info() is None else "worker"
        path = os.path.join(self.folder, f"{role}-{os.getpid()}.txt")
        with open(path, "w") as f:
            f.write(f"{int(MPI.Is_initialized())} {os.getppid()} {os.environ.get('OMPI_COMM_WORLD_RANK', '-')}")
        return super().__getitem__(i)


def recorder():
    return Recorder(60, os.environ["DISTML_TEST_RECORD"]), Pairs(12, seed=1)


_LOADED_HERE = [0]  # items this process has loaded (a worker imports this module afresh)


class Doomed(Pairs):
    """On rank 1, a loading worker is killed (SIGKILL) at its fifth item."""

    def __getitem__(self, i):
        if torch.utils.data.get_worker_info() is not None and os.environ.get("OMPI_COMM_WORLD_RANK") == "1":
            _LOADED_HERE[0] += 1
            if _LOADED_HERE[0] == 5:
                os.kill(os.getpid(), signal.SIGKILL)
        return super().__getitem__(i)


def doomed():
    return Doomed(400), Pairs(12, seed=1)




def wider_test():
    return Pairs(20), Pairs(8, shape=(5,))


def real_test_targets():
    return Pairs(20), Pairs(8, floats=True)


class Shifted(Pairs):
    def __getitem__(self, i):
        return self.x[i], int(self.y[i]) + 2  # classes 2 and 3


def beyond_num_classes():
    data = Shifted(20)
    data.num_classes = 3
    return data


class Negative(Pairs):
    def __getitem__(self, i):
        return self.x[i], -1


def negative_label():
    return Negative(20)


def short_targets():
    data = Pairs(40)
    data.targets = np.zeros(10, dtype=np.int64)
    return data


def unpicklable():
    data = Pairs(40)
    data.transform = lambda x: x  # a lambda: no loading worker can receive it
    return data


class Augmented(Pairs):
    """Random augmentation from torch's and numpy's global generators, as users write it."""

    def __getitem__(self, i):
        x, y = super().__getitem__(i)
        return x + 0.1 * torch.randn(x.shape) + float(np.random.normal()), y


def augmented():
    return Augmented(60), Pairs(12, seed=1)


class Epochal(Pairs):
    """Items that change with the epoch (set_epoch), without a test set of their own."""

    epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __getitem__(self, i):
        x, y = super().__getitem__(i)
        return x + self.epoch, y


def epochal():
    return Epochal(50)


class Gaussian(torch.utils.data.Dataset):
    """Regression targets of 2 values; a model outputting mean and log-variance (4 values)."""

    def __init__(self):
        self.x = torch.randn(30, 3, generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.x[i, :2].clone()


def gaussian():
    return Gaussian()


def gaussian_net(input_shape, num_outputs):
    return torch.nn.Linear(3, 4)


def gaussian_nll(output, target):
    mean, log_var = output[:, :2], output[:, 2:]
    return (0.5 * (log_var + (target - mean) ** 2 / log_var.exp())).mean(dim=1)
