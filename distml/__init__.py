"""distml: data-parallel training of PyTorch models over MPI.

The CLI (`distml train`) and this Python API share one implementation. Your own
loop (the whole pattern, runnable: docs/api.md):

    import distml
    distml.init(watchdog=600)
    sampler = distml.ShardSampler(train_set, 32, seed=0)
    loader = torch.utils.data.DataLoader(train_set, batch_sampler=sampler)
    optimizer = distml.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    ckpt = distml.Checkpointer("ckpt", model=model, optimizer=optimizer, sampler=sampler)
    state = ckpt.restore() or {"epoch": 0}
    ...
"""
__version__ = "0.1.0"

from .api import (DistributedOptimizer, allreduce, barrier, broadcast_buffers, broadcast_parameters, init,
                  is_root, print, rank, seed, size, stop_requested)
from .checkpointer import Checkpointer
from .config import Config, UsageError
from .matching import CollectiveMismatch
from .data.loader import DataLoader
from .sampler import ShardSampler, bptt_columns
from .sharding import Batch, shard_batches

__all__ = ["init", "rank", "size", "is_root", "allreduce", "barrier", "print", "seed", "stop_requested",
           "broadcast_parameters", "broadcast_buffers", "DistributedOptimizer", "ShardSampler", "DataLoader", "bptt_columns",
           "Checkpointer", "CollectiveMismatch", "shard_batches", "Batch", "Config", "UsageError", "train"]


def train(config=None, **settings):
    """Run the CLI trainer from Python: `distml.train(model="cnn", epochs=3)` -> Result.

    UsageError, signals.Preempted after a stop signal and its checkpoint, and
    nonfinite.NonFinite after a non-finite loss or gradient (--on-nan stop)
    are raised on every rank alike; any other error on one rank aborts the
    whole MPI job (as the CLI does), so no rank is left waiting.
    """
    from .agreement import agree
    from .cli import abort_on_error
    from .comm import world
    from .nonfinite import NonFinite
    from .signals import Preempted
    from .trainer import run
    try:
        return run(agree(world(), lambda: _config_of(config, settings)))
    except (UsageError, Preempted, NonFinite):
        raise
    except BaseException as error:  # noqa: BLE001
        if world().size == 1:
            raise
        abort_on_error(world(), error)


def _config_of(config, settings):
    """distml.train's Config: `config` or one made from `settings`; UsageError for anything else."""
    from .config import from_settings
    if config is None:
        return from_settings(settings)
    if settings:
        raise UsageError("distml.train() takes a distml.Config or keyword settings, not both")
    if not isinstance(config, Config):
        raise UsageError(f"distml.train(config): a distml.Config, not {type(config).__name__} (settings go as "
                         f"keywords: distml.train(epochs=3))")
    return config
