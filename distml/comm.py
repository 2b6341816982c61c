"""The only module that talks to MPI.

Every other module sees a `Comm`: rank, size, `is_root`, and a few collectives
that work on contiguous CPU tensors without copying (MPI's uppercase buffer
methods over `tensor.numpy()` views). Each collective returns early when
size == 1, so the same code runs as a plain Python process without mpirun.
Payload bytes handed to MPI are counted in `bytes_sent` for the metrics.
"""
import ctypes
import os
import sys
import time

import torch

__all__ = ["Comm", "world", "buffer_of", "cuda_aware_mpi"]

_world = None


def world():
    """The process-wide communicator over MPI_COMM_WORLD (created on first use)."""
    global _world
    if _world is None:
        from mpi4py import MPI  # noqa: F401  (initializes MPI on import)

        _world = Comm(MPI.COMM_WORLD)
    return _world


def buffer_of(tensor):
    """A numpy view sharing `tensor`'s memory: what MPI's buffer methods read and write."""
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        raise ValueError("MPI buffers must be contiguous CPU tensors")
    return tensor.detach().numpy()


class Comm:
    """A thin, counting wrapper around an mpi4py communicator."""

    def __init__(self, mpi_comm):
        from mpi4py import MPI

        self._MPI = MPI
        self.mpi_comm = mpi_comm
        self.rank = mpi_comm.Get_rank()
        self.size = mpi_comm.Get_size()
        self.is_root = self.rank == 0
        self.bytes_sent = 0

    # -- collectives on tensors ---------------------------------------------
    def allreduce_(self, tensor, op="sum"):
        """Sum (or max) `tensor` over all ranks, in place; returns it."""
        mpi_op = {"sum": self._MPI.SUM, "max": self._MPI.MAX, "min": self._MPI.MIN}.get(op)
        if mpi_op is None:
            raise ValueError(f"op must be 'sum', 'max' or 'min', got {op!r}")
        buf = buffer_of(tensor)  # checked at size 1 too, so mistakes show without mpirun
        if self.size == 1:
            return tensor
        self.mpi_comm.Allreduce(self._MPI.IN_PLACE, buf, op=mpi_op)
        self.bytes_sent += buf.nbytes
        return tensor

    def broadcast_(self, tensor, root=0):
        """Overwrite `tensor` on every rank with root's values, in place; returns it."""
        if self.size == 1:
            return tensor
        if tensor.is_contiguous():
            buf = buffer_of(tensor)
            self.mpi_comm.Bcast(buf, root=root)
        else:  # rare (e.g. a transposed buffer): go through a contiguous copy
            tmp = tensor.detach().contiguous()
            buf = buffer_of(tmp)
            self.mpi_comm.Bcast(buf, root=root)
            tensor.detach().copy_(tmp)
        if self.rank == root:
            self.bytes_sent += buf.nbytes
        return tensor

    def allreduce_array(self, values, op="sum"):
        """Reduce a small list of floats (metrics) over ranks; returns a float64 array."""
        arr = torch.tensor(values, dtype=torch.float64)
        return self.allreduce_(arr, op=op).numpy()

    # -- point to point (parameter server) -------------------------------------
    def isend(self, tensor, dest, tag=0):
        """Start sending `tensor` (leave it untouched until the request completes)."""
        buf = buffer_of(tensor)
        self.bytes_sent += buf.nbytes
        return self.mpi_comm.Isend(buf, dest=dest, tag=tag)

    def irecv(self, tensor, source, tag=None):
        """Start receiving into `tensor`; tag=None accepts any tag."""
        tag = self._MPI.ANY_TAG if tag is None else tag
        return self.mpi_comm.Irecv(buffer_of(tensor), source=source, tag=tag)

    def waitany(self, requests, *, sleep=0.0):
        """Wait until one of `requests` completes; returns (its index, its tag).

        sleep=0: MPI's Waitany, which on most MPIs spins on a core while it waits.
        sleep>0: test, then sleep that many seconds between tests, giving the core
        away (for a rank that shares its cores with busier ones).
        """
        status = self._MPI.Status()
        if sleep <= 0:
            index = self._MPI.Request.Waitany(requests, status)
            return index, status.Get_tag()
        while True:
            index, done = self._MPI.Request.Testany(requests, status)
            if done:
                return index, status.Get_tag()
            time.sleep(sleep)

    def waitall(self, requests):
        self._MPI.Request.Waitall(requests)

    @property
    def request_null(self):
        return self._MPI.REQUEST_NULL

    # -- small, rare control messages (pickled) -----------------------------
    def allgather_object(self, obj):
        """Every rank's `obj`, in rank order. For rare control messages only."""
        if self.size == 1:
            return [obj]
        return self.mpi_comm.allgather(obj)

    def bcast_object(self, obj, root=0):
        """Root's `obj` on every rank (pickled). For rare control messages such as a checkpoint."""
        if self.size == 1:
            return obj
        return self.mpi_comm.bcast(obj, root=root)

    def gather_object(self, obj, root=0):
        """Every rank's `obj` in rank order on root (None elsewhere). For rare control messages only."""
        if self.size == 1:
            return [obj]
        return self.mpi_comm.gather(obj, root=root)

    def abort(self, code=1):
        """End the whole job now; never returns. Safe to call from any rank."""
        sys.stdout.flush()
        sys.stderr.flush()
        if self.size == 1:
            os._exit(code)
        self.mpi_comm.Abort(code)

    # -- facts about the MPI installation -----------------------------------
    def node_size(self):
        """How many ranks of this job share this node (for default thread counts)."""
        if self.size == 1:
            return 1
        local = self.mpi_comm.Split_type(self._MPI.COMM_TYPE_SHARED)
        try:
            return local.Get_size()
        finally:
            local.Free()

    def library_version(self):
        return self._MPI.Get_library_version().strip().splitlines()[0]

    def mpi_standard(self):
        return "%d.%d" % self._MPI.Get_version()


def cuda_aware_mpi():
    """'yes', 'no' or 'unknown': asks the loaded libmpi's MPIX query function if it has one."""
    world()
    path = _loaded_libmpi()
    if path is None:
        return "unknown"
    lib = ctypes.CDLL(path)
    for symbol in ("MPIX_Query_cuda_support", "MPIX_GPU_query_support"):
        fn = getattr(lib, symbol, None)
        if fn is None:
            continue
        if symbol == "MPIX_Query_cuda_support":
            fn.restype = ctypes.c_int
            return "yes" if fn() else "no"
        kind = ctypes.c_int(0)
        is_supported = ctypes.c_int(0)
        fn(kind, ctypes.byref(is_supported))  # MPIX_GPU_SUPPORT_CUDA == 0
        return "yes" if is_supported.value else "no"
    return "unknown"


def _loaded_libmpi():
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                if "/libmpi.so" in path or "/libmpi_" in path and ".so" in path:
                    return path
    except OSError:
        pass
    return None

