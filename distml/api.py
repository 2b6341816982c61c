"""The Python API for users who keep their own training loop (the pattern: docs/api.md).

    import distml
    distml.init(watchdog=600)                                # MPI, threads per rank, the hang doctor
    model = Net()
    distml.broadcast_parameters(model)                       # same start everywhere
    sampler = distml.ShardSampler(train_set, 32, seed=0)     # this rank's part of each global batch
    loader = torch.utils.data.DataLoader(train_set, batch_sampler=sampler)
    opt = distml.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    for x, y in loader:
        opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()
        if distml.stop_requested(): ...                      # the same step on every rank

Your loop's collectives (allreduce, barrier, broadcasts, the Checkpointer's)
run on a communicator of their own, each one checked against every rank's
call first (distml.matching), so a mismatch is an error naming each rank's
call, never memory overwritten.
"""
import atexit
import builtins
import random
import sys
import time

import numpy as np
import torch

from . import comm as _comm
from .config import UsageError
from .matching import negotiate
from .optimizer import DistributedOptimizer
from .signals import LOOP_STOP

__all__ = ["init", "rank", "size", "is_root", "allreduce", "barrier", "print", "seed", "stop_requested",
           "broadcast_parameters", "broadcast_buffers", "DistributedOptimizer"]

DEFAULT_WATCHDOG_S = 600.0  # as `distml train --watchdog`


class _State:
    loop = None  # the communicator of your loop's collectives
    doctor = None  # the hang doctor, while it runs
    threads = None
    settings = None  # (watchdog, threads) of the call that started distml


def init(*, watchdog=DEFAULT_WATCHDOG_S, threads=None):
    """Start MPI (idempotent; a collective the first time) and return the world communicator.

    With several ranks, an uncaught exception then ends the whole job: its
    traceback, one line naming the rank, MPI Abort (an error every rank raises
    alike is printed once). A distml.UsageError every rank raises (a refused
    checkpoint) is one line and exit 2, also in a world of one. Without
    that the failed rank finalizes MPI and exits, and the others wait in their
    next collective forever (mpirun was still waiting after 60 s).
    `watchdog`: seconds a rank may wait in one MPI call before the hang doctor
    reports where every rank is and ends the job with exit 124 (0: off).
    `threads`: torch threads per rank; by default the cores of the node over the
    ranks on it (SLURM_CPUS_PER_TASK under SLURM, else OMP_NUM_THREADS where set), as `distml train`.
    """
    world = _comm.world()
    if _State.loop is not None:
        if (watchdog, threads) != _State.settings and (watchdog, threads) != (DEFAULT_WATCHDOG_S, None):
            raise RuntimeError(f"distml.init(watchdog={watchdog}, threads={threads}): distml was started already "
                               f"with watchdog={_State.settings[0]}, threads={_State.settings[1]} (by an earlier "
                               f"call, or the first call that needed it): call distml.init() first")
        return world
    if watchdog < 0:
        raise ValueError(f"watchdog must be >= 0 seconds (0: off), got {watchdog}")
    from .cluster import default_threads
    default = default_threads(world)  # a collective: every rank calls it, whatever its `threads`
    _State.threads, _State.settings = threads or default, (watchdog, threads)
    torch.set_num_threads(_State.threads)
    _State.loop = world.dup()
    if sys.excepthook is sys.__excepthook__:
        sys.excepthook = aborting_excepthook(lambda: world)
    if world.size > 1 and watchdog:
        from .watchdog import HangDoctor
        _State.doctor = HangDoctor(world, watchdog, setting="distml.init(watchdog=)")
    atexit.register(_finish)  # after mpi4py's: atexit runs it first, before MPI_Finalize
    return world


def _loop():
    if _State.loop is None:
        init()
    return _State.loop


def _finish():
    """At exit: wait for every rank at the end of the script (a wait the hang doctor reports only
    when another rank is stuck elsewhere), then stop the doctor before MPI is finalized."""
    comm = _State.loop
    if comm is not None and comm.size > 1:
        comm.calls.context, comm.calls.patient = "the end of the script", True
        try:
            negotiate(comm, "distml's exit barrier")
        except Exception as error:  # noqa: BLE001  (a rank in another call: report it, end the job)
            sys.excepthook(type(error), error, error.__traceback__)
    if _State.doctor is not None:
        _State.doctor.stop()
        _State.doctor = None


_REPORT_WAIT_S = 10.0


def aborting_excepthook(comm_of, name="distml"):
    """A sys.excepthook ending the whole job: the traceback, one line naming the rank, MPI Abort.

    `comm_of()` gives the communicator to abort. An error every rank raises
    alike (marked `error.everywhere`, as distml.horovod's disagreements are)
    is printed by rank 0 only; the others wait for its abort, since aborting
    first could end rank 0 before it has printed. Such a UsageError (a
    checkpoint of another model, say) is one line and exit 2 on every rank.
    """
    def hook(kind, error, tb):
        comm = comm_of()
        alike = getattr(error, "everywhere", False) or comm.size == 1
        if alike and issubclass(kind, UsageError):
            _exit_everywhere(comm, 2, f"{name}: error: {error}")
        if comm.size == 1:  # nothing to abort: Python's own report and exit
            return sys.__excepthook__(kind, error, tb)
        if alike and comm.rank != 0:
            time.sleep(_REPORT_WAIT_S)  # rank 0's MPI Abort ends this process; if it never comes, abort
            comm.abort(1)
        sys.__excepthook__(kind, error, tb)
        what = f"{kind.__name__}: {error}" if str(error) else kind.__name__
        builtins.print(f"{name}: rank {comm.rank} of {comm.size} failed: {what} (aborting all ranks)",
                       file=sys.stderr, flush=True)
        comm.abort(130 if issubclass(kind, KeyboardInterrupt) else 1)
    return hook


def _exit_everywhere(comm, code, line):
    """Every rank is here (the error was raised alike): rank 0 prints `line`; all end MPI and exit `code`."""
    if comm.rank == 0:
        builtins.print(line, file=sys.stderr, flush=True)
    if _State.doctor is not None:
        _State.doctor.stop()
    sys.stdout.flush()
    sys.stderr.flush()
    from mpi4py import MPI
    MPI.Finalize()
    import os
    os._exit(code)


def rank():
    return _comm.world().rank


def size():
    return _comm.world().size


def is_root():
    return _comm.world().is_root


def print(*args, **kwargs):  # noqa: A001  (distml.print: the builtin, on rank 0 only)
    """print() on rank 0 only (flushed, so lines from a job appear as they are written)."""
    if _comm.world().is_root:
        kwargs.setdefault("flush", True)
        builtins.print(*args, **kwargs)


def allreduce(value, op="average"):
    """A float or tensor summed or averaged over ranks (a copy; for metrics and small values).

    A collective of your loop: every rank must call it with the same op and shape (checked).
    """
    if op not in ("average", "sum", "max", "min"):
        raise ValueError(f"op must be 'average', 'sum', 'max' or 'min', got {op!r}")
    comm = _loop()
    tensor = torch.as_tensor(value, dtype=torch.float64).clone().contiguous()
    negotiate(comm, f"distml.allreduce(op={op}, float64 {list(tensor.shape)})")
    comm.allreduce_(tensor, op="sum" if op == "average" else op, what="distml.allreduce")
    if op == "average":
        tensor /= comm.size
    return tensor.item() if tensor.dim() == 0 else tensor


def barrier():
    """Wait until every rank is here (to read a file root just wrote, say)."""
    negotiate(_loop(), "distml.barrier()")


def seed(value):
    """Seed torch, numpy and random with a seed of this rank's own, from (value, rank); returns it.

    For dropout masks and augmentation that differ by rank, as the CLI's do.
    Call it after the model is built (or broadcast): weights must start alike.
    """
    from .sharding import rng
    mine = int(rng(int(value), "torch", rank()).integers(2**63))
    torch.manual_seed(mine)
    np.random.seed(mine % 2**32)
    random.seed(mine)
    return mine


def stop_requested():
    """Whether any rank has received SIGTERM, SIGUSR1 or SIGUSR2: true on every rank after the same step.

    The first call starts catching those signals (until then they keep their usual
    effect). The answer travels in the DistributedOptimizer's gradient reduction,
    at no cost; where no reduction has run since the last call (a loop without
    one, an evaluation) this is a small collective: call it on every rank.
    mpirun ends a job at once on TERM: send it USR1 (SLURM: `--signal=USR1@60`).
    """
    LOOP_STOP.listen()
    if not LOOP_STOP.carried and not LOOP_STOP.agreed:  # no reduction since the last question (equal everywhere)
        comm = _loop()
        negotiate(comm, "distml.stop_requested()")
        caught = torch.tensor([1.0 if LOOP_STOP.caught() else 0.0], dtype=torch.float64)
        LOOP_STOP.record(comm.allreduce_(caught, what="distml.stop_requested").item())
    LOOP_STOP.carried = 0
    return LOOP_STOP.agreed


def broadcast_parameters(model, root=0, *, comm=None):
    """Copy root's parameters and buffers into every rank's `model`, in place (a collective)."""
    comm = comm or _checked(model, "distml.broadcast_parameters", root, params=True)
    with torch.no_grad():
        for tensor in model.parameters():
            comm.broadcast_(tensor, root=root)
    broadcast_buffers(model, root, comm=comm)


def broadcast_buffers(model, root=0, *, comm=None):
    """Copy root's buffers (e.g. BatchNorm running statistics) into every rank's `model` (a collective)."""
    comm = comm or _checked(model, "distml.broadcast_buffers", root, params=False)
    with torch.no_grad():
        for buffer in model.buffers():
            comm.broadcast_(buffer, root=root)


def _checked(model, call, root, *, params):
    """Your loop's communicator, once every rank is in `call` with a model of the same shapes."""
    tensors = [*model.parameters(), *model.buffers()] if params else list(model.buffers())
    import zlib
    shapes = zlib.crc32(repr([(str(t.dtype), tuple(t.shape)) for t in tensors]).encode())
    comm = _loop()
    negotiate(comm, f"{call}(root={root}, {len(tensors)} tensors, {sum(t.numel() for t in tensors):,} values, "
                    f"shapes {shapes:08x})")
    return comm
