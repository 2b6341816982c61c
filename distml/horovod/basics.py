"""Horovod's process queries (`init`, `rank`, `local_rank`, ...), reduction ops and build queries.

distml runs on MPI alone, on CPU tensors: the `*_built()` queries answer for
this build (MPI yes; NCCL, Gloo, CUDA, ROCm, DDL, oneCCL no). The layer talks
over its own duplicate of MPI_COMM_WORLD, so a script's own mpi4py traffic
cannot be mistaken for Horovod's.
"""
import sys

from .. import comm as _comm
from ..api import aborting_excepthook

__all__ = ["init", "shutdown", "is_initialized", "rank", "size", "local_rank", "local_size", "cross_rank",
           "cross_size", "is_homogeneous", "mpi_threads_supported", "mpi_enabled", "mpi_built", "gloo_enabled",
           "gloo_built", "nccl_built", "ddl_built", "ccl_built", "cuda_built", "rocm_built", "start_timeline",
           "stop_timeline", "Average", "Sum", "Adasum", "Min", "Max", "Product", "HorovodInternalError",
           "ProcessSet", "global_process_set", "add_process_set", "remove_process_set", "elastic"]


class _ReduceOp(int):
    """Horovod's reduction ops are small integers; these print their names."""

    def __new__(cls, value, name):
        op = super().__new__(cls, value)
        op.name = name
        return op

    def __repr__(self):
        return self.name


Average, Sum, Adasum, Min, Max, Product = (_ReduceOp(i, n) for i, n in enumerate(
    ("Average", "Sum", "Adasum", "Min", "Max", "Product")))


class HorovodInternalError(RuntimeError):
    """The ranks disagreed about an operation (shapes, dtypes, names, roots); raised on every rank alike."""


class _State:
    comm = None        # distml.comm.Comm over a duplicate of MPI_COMM_WORLD, after init()
    topology = None    # (local_rank, local_size, cross_rank, cross_size, homogeneous)


def init(comm=None, process_sets=None):
    """Start (idempotent); `comm` may be a list of world ranks or an mpi4py communicator, as in Horovod."""
    if process_sets:
        raise NotImplementedError(_NO_PROCESS_SETS)
    if _State.comm is not None:
        return
    world = _comm.world()
    if comm is not None and not _is_whole_world(comm, world):
        raise NotImplementedError("distml.horovod runs on all ranks of MPI_COMM_WORLD only; start a "
                                  "separate mpirun for a subset of ranks")
    _State.comm = _comm.Comm(world.duplicate()) if world.size > 1 else world
    _State.topology = _State.comm.topology()
    if _State.comm.size > 1 and sys.excepthook is sys.__excepthook__:
        sys.excepthook = aborting_excepthook(lambda: _State.comm or _comm.world(), "distml.horovod")


def _is_whole_world(comm, world):
    if isinstance(comm, (list, tuple)):
        return sorted(comm) == list(range(world.size))
    return comm.Get_size() == world.size


def shutdown():
    """Stop using the layer (MPI itself stays up until exit: it cannot be restarted)."""
    from .mpi_ops import _reset
    _reset()
    _State.comm = None


def is_initialized():
    return _State.comm is not None


def _comm_checked():
    if _State.comm is None:
        raise ValueError("Horovod has not been initialized; use hvd.init().")
    return _State.comm


def rank():
    return _comm_checked().rank


def size():
    return _comm_checked().size


def _topology(index):
    _comm_checked()
    return _State.topology[index]


def local_rank():
    return _topology(0)


def local_size():
    return _topology(1)


def cross_rank():
    return _topology(2)


def cross_size():
    return _topology(3)


def is_homogeneous():
    """Whether every node runs the same number of ranks."""
    return _topology(4)


def mpi_threads_supported():
    return _comm_checked().thread_multiple()


def mpi_enabled():
    return True


def mpi_built():
    return True


def _false():
    return False


gloo_enabled = gloo_built = nccl_built = ddl_built = ccl_built = cuda_built = rocm_built = _false


def start_timeline(file_path, mark_cycles=False):
    raise NotImplementedError("distml has no Horovod timeline; `distml train --metrics m.jsonl` writes "
                              "per-epoch timings, and the hang doctor (--watchdog) reports every rank's calls")


def stop_timeline():
    start_timeline(None)


# -- what is not there --------------------------------------------------------------------------------
_NO_PROCESS_SETS = ("distml.horovod has only the global process set (all ranks); for a subset of ranks "
                    "start a separate mpirun, or use mpi4py's Comm.Split in your own code")


class ProcessSet:
    """Only the global process set exists; building another one raises with what to do instead."""

    def __init__(self, ranks_or_comm=None):
        if ranks_or_comm is not None:
            raise NotImplementedError(_NO_PROCESS_SETS)
        self.process_set_id = 0

    def size(self):
        return size()

    def rank(self):
        return rank()

    def included(self):
        return True

    def __repr__(self):
        return "ProcessSet(global)"


global_process_set = ProcessSet()


def add_process_set(process_set):
    raise NotImplementedError(_NO_PROCESS_SETS)


def remove_process_set(process_set):
    raise NotImplementedError(_NO_PROCESS_SETS)


def _check_process_set(process_set):
    """Error text for anything but the global process set, else None."""
    return None if process_set is global_process_set else _NO_PROCESS_SETS


class _Elastic:
    """`hvd.elastic.*` explains what distml offers instead of Horovod Elastic."""

    def __getattr__(self, name):
        raise NotImplementedError(
            f"hvd.elastic.{name}: Horovod Elastic is not supported. distml keeps training when a rank dies "
            "(`mpirun --with-ft ulfm ... distml train --on-rank-failure continue`) and resumes a stopped job "
            "from its checkpoints (`--checkpoint-dir`, `--resume`); see the README, 'When things go wrong'")


elastic = _Elastic()
