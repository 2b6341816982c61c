"""Horovod's PyTorch API on distml: existing Horovod scripts run by changing their import.

    import distml.horovod as hvd                      # was: import horovod.torch as hvd
    hvd.init()
    torch.set_num_threads(1)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01 * hvd.size())
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters())
    ...                                               # mpirun -n 4 python train.py

CPU tensors over MPI, with no compiler and no background thread: every
collective is checked against the other ranks before it starts
(`negotiation`), so mismatched shapes, dtypes, names or roots raise on every
rank instead of hanging. The README's Horovod table lists what differs.
"""
from . import basics, mpi_ops
from .basics import *  # noqa: F401,F403
from .compression import Compression
from .functions import allgather_object, broadcast_object, broadcast_optimizer_state, broadcast_parameters
from .mpi_ops import *  # noqa: F401,F403
from .optimizer import DistributedOptimizer
from .sync_batch_norm import SyncBatchNorm

__all__ = [*basics.__all__, *mpi_ops.__all__, "Compression", "DistributedOptimizer", "broadcast_parameters",
           "broadcast_optimizer_state", "broadcast_object", "allgather_object", "SyncBatchNorm"]
