"""The only module that talks to MPI.

Every other module sees a `Comm`: rank, size, `is_root`, and a few collectives
that work on contiguous CPU tensors without copying (MPI's uppercase buffer
methods over `tensor.numpy()` views). Each collective returns early when
size == 1, so the same code runs as a plain Python process without mpirun.
Payload bytes handed to MPI are counted in `bytes_sent` for the metrics.

Every blocking call is entered in `calls` (a `CallRecord`: operation, sequence
number, bytes, and what the training is doing), which the hang doctor
(`watchdog.py`) reads from its own thread. Under ULFM (`mpirun --with-ft
ulfm`) a call that finds a rank dead raises `RankLost`; `shrink()` then gives
the survivors a working communicator.
"""
import ctypes
import os
import sys
import time
from collections import deque
from itertools import accumulate

import torch

__all__ = ["Comm", "CallRecord", "RankLost", "world", "buffer_of", "cuda_aware_mpi"]

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


class RankLost(Exception):
    """Ranks of the job died: ULFM reported it to a call. `ranks`: their numbers in the first world."""

    def __init__(self, ranks, call, *, revoked=False):
        who = f"rank(s) {', '.join(map(str, ranks))}" if ranks else "a rank"
        super().__init__(f"{who} lost (seen in {call})")
        self.ranks, self.call = list(ranks), call
        self.revoked = revoked  # another survivor revoked the communicator: it takes no more calls


class CallRecord:
    """This rank's blocking MPI calls: the one in progress and the last few, with sequence numbers.

    `context` says what the training is doing ("epoch 2 step 12"); the trainer
    and strategies set it, a call adds its own detail ("bucket 3"). Written by
    the main thread, read by the watchdog's: single attribute reads and
    list(deque) are atomic under the GIL, so no lock is needed.
    """

    def __init__(self, keep=32):
        self.seq = 0  # calls entered so far
        self.context = "set-up"
        self.current = None  # (seq, op, nbytes, where, started) of the call in progress
        self.recent = deque(maxlen=keep)  # the last calls that returned, oldest first
        self.since = time.monotonic()  # when the last call returned
        self.patient = False  # waiting for the others at the end: not a stall by itself (the hang doctor)

    def enter(self, op, nbytes, what=None):
        self.seq += 1
        where = f"{self.context}, {what}" if what else self.context
        self.current = (self.seq, op, nbytes, where, time.monotonic())

    def leave(self):
        self.recent.append(self.current)
        self.current = None
        self.since = time.monotonic()


def describe_call(call):
    """'allreduce #57 (epoch 1 step 12, bucket 3)' for a CallRecord entry."""
    seq, op, nbytes, where, _ = call
    return f"{op} #{seq} ({where})"


class Comm:
    """A thin, counting, recording wrapper around an mpi4py communicator."""

    def __init__(self, mpi_comm):
        from mpi4py import MPI

        self._MPI = MPI
        self.mpi_comm = mpi_comm
        self.rank = mpi_comm.Get_rank()
        self.size = mpi_comm.Get_size()
        self.is_root = self.rank == 0
        self.bytes_sent = 0
        self.calls = CallRecord()
        self.members = list(range(self.size))  # each rank's number in the first world (shrink renumbers)
        self.lost = []  # (first-world rank, the call that saw it) of every rank shrink() dropped

    def _call(self, op, nbytes, what, fn, *args):
        """fn(*args) entered in the call record; a dead rank's error becomes RankLost."""
        self.calls.enter(op, nbytes, what)
        try:
            result = fn(*args)
        except self._MPI.Exception as e:
            raise self._lost_or(e) from None
        self.calls.leave()
        return result

    def _lost_or(self, error):
        """RankLost for ULFM's process-failure errors, else `error` itself."""
        failures = {getattr(self._MPI, name, None) for name in
                    ("ERR_PROC_FAILED", "ERR_PROC_FAILED_PENDING", "ERR_REVOKED")} - {None}
        kind, failed = error.Get_error_class(), None
        if kind == self._MPI.ERR_IN_STATUS:  # Waitall: some request failed; was it for a dead peer?
            failed = self.failed_ranks()
        if kind not in failures and not failed:
            return error
        call = describe_call(self.calls.current) if self.calls.current else "a call"
        return RankLost(failed or self.failed_ranks(), call, revoked=self._revoked(kind))

    def _revoked(self, kind):
        try:
            return kind == self._MPI.ERR_REVOKED or self.mpi_comm.Is_revoked()
        except (AttributeError, NotImplementedError, self._MPI.Exception):
            return False

    def failed_ranks(self):
        """First-world numbers of the ranks this rank knows to be dead (ULFM; [] elsewhere)."""
        try:
            group = self.mpi_comm.Get_failed()
            mine = self._MPI.Group.Translate_ranks(group, list(range(group.Get_size())), self.mpi_comm.Get_group())
        except (AttributeError, NotImplementedError, self._MPI.Exception):
            return []
        return sorted(self.members[r] for r in mine if r != self._MPI.UNDEFINED)

    # -- collectives on tensors ---------------------------------------------
    def allreduce_(self, tensor, op="sum", *, what=None):
        """Sum (or max, min, prod) `tensor` over all ranks, in place; returns it. `what`: a detail for the record."""
        buf, mpi_op = _reduction(self._MPI, tensor, op)  # checked at size 1 too, so mistakes show without mpirun
        if self.size == 1:
            return tensor
        nbytes = tensor.numel() * tensor.element_size()
        self._call("allreduce", nbytes, what, self.mpi_comm.Allreduce, self._MPI.IN_PLACE, buf, mpi_op)
        self.bytes_sent += nbytes
        return tensor

    def broadcast_(self, tensor, root=0, *, what=None):
        """Overwrite `tensor` on every rank with root's values, in place; returns it."""
        if self.size == 1:
            return tensor
        contiguous = tensor.is_contiguous()  # if not (rare: a transposed buffer), through a copy
        tmp = tensor if contiguous else tensor.detach().contiguous()
        nbytes = tmp.numel() * tmp.element_size()
        self._call("broadcast", nbytes, what, self.mpi_comm.Bcast, _typed(self._MPI, tmp.detach()), root)
        if not contiguous:
            tensor.detach().copy_(tmp)
        if self.rank == root:
            self.bytes_sent += nbytes
        return tensor

    def reduce_scatter_(self, tensor, out, counts, *, what=None):
        """Sum `tensor` over ranks and leave counts[rank] elements of the sum, in rank order, in `out`
        (the sharded optimizer's gradient slices; float16 and bfloat16 too)."""
        return self.reduce_scatter_parts_(list(tensor.reshape(-1).split(list(counts))), out, what=what)

    def reduce_scatter_parts_(self, parts, out, *, what=None):
        """Sum parts[r] over ranks into rank r's `out` (parts: one contiguous tensor per rank, same
        sizes on every rank; they need not be adjacent, so a caller can interleave pieces of slices).

        A ring of MPI_Sendrecv, adding with torch: at each of the N-1 steps a rank passes
        a partial sum to the next rank and adds its own part to the one it receives. MPI's
        own Reduce_scatter moves large messages through its shared-memory queues, point-
        to-point messages go in one copy: for 10.5M float32 at 2 ranks, Open MPI 5.0.11
        took 44 ms in Reduce_scatter_block (24 ms in Allreduce) and 6.9 ms in this ring
        (scripts/bench_reduce_scatter.py). The parts keep their values.
        """
        r, n = self.rank, self.size
        if not out.is_contiguous():
            raise ValueError("reduce_scatter_parts_ writes into a contiguous `out`")
        if n == 1:
            return out.copy_(parts[0].reshape(out.shape))
        nbytes = sum(p.numel() for p in parts) * out.element_size()
        self._call("reduce_scatter", nbytes, what, self._ring_reduce_scatter, parts, out)
        self.bytes_sent += nbytes - parts[r].numel() * out.element_size()
        return out

    def _ring_reduce_scatter(self, parts, out):
        r, n = self.rank, self.size
        right, left = (r + 1) % n, (r - 1) % n
        largest = max(p.numel() for p in parts)
        scratch = [torch.empty(largest, dtype=out.dtype) for _ in range(min(2, n - 2))]
        send = parts[(r - 1) % n]
        for step in range(n - 1):  # receive the partial sum of part (r - step - 2), add ours
            k = (r - step - 2) % n
            recv = out.reshape(-1) if step == n - 2 else scratch[step % 2][:parts[k].numel()]
            self.mpi_comm.Sendrecv(_typed(self._MPI, send.reshape(-1)), right, _RING_TAG,
                                   _typed(self._MPI, recv), left, _RING_TAG)
            send = recv.add_(parts[k].reshape(-1))
        return out

    def allgather_in_place(self, out, count, displacements, *, what=None):
        """Each rank's `count` elements at `out[displacements[rank]:]` copied into every rank's `out`
        at the same place (MPI_IN_PLACE: no send buffer; the sharded optimizer's parameters)."""
        if self.size == 1:
            return out
        recv = _typed(self._MPI, out)
        nbytes = count * out.element_size()
        self._call("allgather", nbytes * self.size, what, self.mpi_comm.Allgatherv, self._MPI.IN_PLACE,
                   [recv[0], ([count] * self.size, list(displacements)), recv[1]])
        self.bytes_sent += nbytes
        return out

    def gather_(self, tensor, out, root=0, *, what=None):
        """Every rank's `tensor` (one size everywhere) into root's `out`, rank after rank (out: None elsewhere)."""
        if self.size == 1:
            return out.copy_(tensor.reshape(out.shape))
        nbytes = tensor.numel() * tensor.element_size()
        self._call("gather", nbytes, what, self.mpi_comm.Gather, _typed(self._MPI, tensor),
                   _typed(self._MPI, out) if self.rank == root else None, root)
        self.bytes_sent += nbytes
        return out

    def allreduce_array(self, values, op="sum", *, what=None):
        """Reduce a small list of floats (metrics) over ranks; returns a float64 array."""
        arr = torch.tensor(values, dtype=torch.float64)
        return self.allreduce_(arr, op=op, what=what).numpy()

    # -- nonblocking collectives (distml.horovod) --------------------------------
    # Each starts the operation and returns a request for wait() / test(); at
    # size 1 the result is made locally and the request is already complete.
    def iallreduce_(self, tensor, op="sum"):
        """Start reducing `tensor` in place (sum, max, min or prod; also float16 and bfloat16)."""
        if self.size == 1:
            return self.request_null
        buf, mpi_op = _reduction(self._MPI, tensor, op)
        self.bytes_sent += tensor.numel() * tensor.element_size()
        return self._start(self.mpi_comm.Iallreduce, self._MPI.IN_PLACE, buf, mpi_op)

    def ibroadcast_(self, tensor, root=0):
        """Start overwriting `tensor` (contiguous) with root's values."""
        if self.size == 1:
            return self.request_null
        if self.rank == root:
            self.bytes_sent += tensor.numel() * tensor.element_size()
        return self._start(self.mpi_comm.Ibcast, _typed(self._MPI, tensor), root)

    def iallgatherv(self, tensor, out, counts):
        """Start gathering every rank's `tensor` into `out`, rank after rank; counts: elements per rank."""
        if self.size == 1:
            out.copy_(tensor.reshape(out.shape))
            return self.request_null
        recv = _typed(self._MPI, out)
        self.bytes_sent += tensor.numel() * tensor.element_size()
        return self._start(self.mpi_comm.Iallgatherv, _typed(self._MPI, tensor),
                           [recv[0], (list(counts), _offsets(counts)), recv[1]])

    def ialltoallv(self, tensor, send_counts, out, recv_counts):
        """Start sending send_counts[r] elements of `tensor` to rank r, receiving recv_counts[r] from r into `out`."""
        if self.size == 1:
            out.copy_(tensor.reshape(-1)[:out.numel()].reshape(out.shape))
            return self.request_null
        send, recv = _typed(self._MPI, tensor), _typed(self._MPI, out)
        self.bytes_sent += sum(send_counts) * tensor.element_size()
        return self._start(self.mpi_comm.Ialltoallv, [send[0], (list(send_counts), _offsets(send_counts)), send[1]],
                           [recv[0], (list(recv_counts), _offsets(recv_counts)), recv[1]])

    def ireduce_scatter(self, tensor, out, counts, op="sum"):
        """Start reducing `tensor` over ranks and leaving counts[rank] elements of the result, in order, in `out`."""
        if self.size == 1:
            out.copy_(tensor.reshape(-1)[:out.numel()].reshape(out.shape))
            return self.request_null
        send, mpi_op = _reduction(self._MPI, tensor, op)
        recv = _typed(self._MPI, out)
        self.bytes_sent += tensor.numel() * tensor.element_size()
        return self._start(self.mpi_comm.Ireduce_scatter, send, recv, list(counts), mpi_op)

    def _start(self, fn, *args):
        try:
            return fn(*args)
        except self._MPI.Exception as e:
            raise self._lost_or(e) from None

    def wait(self, request, *, what=None):
        """Block until `request` completes (entered in the call record)."""
        self._call("wait", 0, what, request.Wait)

    def test(self, request):
        """Whether `request` has completed (it moves MPI's progress on)."""
        try:
            return request.Test()
        except self._MPI.Exception as e:
            raise self._lost_or(e) from None

    def barrier(self, *, what=None):
        if self.size > 1:
            self._call("barrier", 0, what, self.mpi_comm.Barrier)

    def allreduce_max_(self, values, *, what=None):
        """Elementwise maximum of an int64 tensor over ranks, in place.

        For control messages that are not payload (distml.horovod's negotiation):
        unlike allreduce_(..., "max"), it leaves `bytes_sent` alone.
        """
        if self.size > 1:
            self._call("allreduce", values.numel() * 8, what, self.mpi_comm.Allreduce,
                       self._MPI.IN_PLACE, buffer_of(values), self._MPI.MAX)
        return values

    def allgather_(self, tensor, out):
        """Every rank's `tensor` (same size everywhere) into `out`, in rank order (small control messages)."""
        if self.size == 1:
            return out.copy_(tensor.reshape(out.shape))
        self._call("allgather", tensor.numel() * tensor.element_size(), None, self.mpi_comm.Allgather,
                   buffer_of(tensor), buffer_of(out))
        return out

    def alltoall_(self, tensor, out):
        """Element r of `tensor` to rank r; element r of `out` from rank r (small control messages)."""
        if self.size == 1:
            return out.copy_(tensor)
        self._call("alltoall", tensor.numel() * tensor.element_size(), None, self.mpi_comm.Alltoall,
                   buffer_of(tensor), buffer_of(out))
        return out

    # -- point to point (parameter server) -------------------------------------
    def isend(self, tensor, dest, tag=0):
        """Start sending `tensor` (leave it untouched until the request completes)."""
        buf = buffer_of(tensor)
        self.bytes_sent += buf.nbytes
        try:
            return self.mpi_comm.Isend(buf, dest=dest, tag=tag)
        except self._MPI.Exception as e:
            raise self._lost_or(e) from None

    def irecv(self, tensor, source, tag=None):
        """Start receiving into `tensor`; tag=None accepts any tag."""
        tag = self._MPI.ANY_TAG if tag is None else tag
        try:
            return self.mpi_comm.Irecv(buffer_of(tensor), source=source, tag=tag)
        except self._MPI.Exception as e:
            raise self._lost_or(e) from None

    def waitany(self, requests, *, sleep=0.0, what=None):
        """Wait until one of `requests` completes; returns (its index, its tag).

        sleep=0: MPI's Waitany, which on most MPIs spins on a core while it waits.
        sleep>0: test, then sleep that many seconds between tests, giving the core
        away (for a rank that shares its cores with busier ones).
        """
        status = self._MPI.Status()
        if sleep <= 0:
            index = self._call("waitany", 0, what, self._MPI.Request.Waitany, requests, status)
            return index, status.Get_tag()
        self.calls.enter("testany", 0, what)
        while True:
            try:
                index, done = self._MPI.Request.Testany(requests, status)
            except self._MPI.Exception as e:
                raise self._lost_or(e) from None
            if done:
                self.calls.leave()
                return index, status.Get_tag()
            time.sleep(sleep)

    def waitall(self, requests, *, what=None):
        self._call("waitall", 0, what, self._MPI.Request.Waitall, requests)

    @property
    def request_null(self):
        return self._MPI.REQUEST_NULL

    # -- small, rare control messages (pickled) -----------------------------
    def allgather_object(self, obj):
        """Every rank's `obj`, in rank order. For rare control messages only."""
        if self.size == 1:
            return [obj]
        return self._call("allgather", 0, None, self.mpi_comm.allgather, obj)

    def bcast_object(self, obj, root=0):
        """Root's `obj` on every rank (pickled). For rare control messages such as a checkpoint."""
        if self.size == 1:
            return obj
        return self._call("broadcast", 0, None, self.mpi_comm.bcast, obj, root)

    def gather_object(self, obj, root=0):
        """Every rank's `obj` in rank order on root (None elsewhere). For rare control messages only."""
        if self.size == 1:
            return [obj]
        return self._call("gather", 0, None, self.mpi_comm.gather, obj, root)

    def abort(self, code=1):
        """End the whole job now; never returns. Safe to call from any rank."""
        sys.stdout.flush()
        sys.stderr.flush()
        if self.size == 1:
            os._exit(code)
        self.mpi_comm.Abort(code)

    # -- lost ranks (ULFM) ----------------------------------------------------
    def shrink(self, call="a call"):
        """After RankLost: revoke this communicator, go on with the survivors; returns the ranks lost.

        Every survivor must call it (revoking makes the others' pending calls
        fail, so they get here too). Ranks are renumbered in their order;
        `members` keeps each one's number in the first world.
        """
        try:
            self.mpi_comm.Revoke()
        except self._MPI.Exception:
            pass  # revoked already by another survivor
        survivor = self.mpi_comm.Shrink()
        alive = survivor.allgather(self.members[self.rank])
        lost = sorted(set(self.members) - set(alive))
        self.mpi_comm, self.members = survivor, alive
        self.rank, self.size = survivor.Get_rank(), survivor.Get_size()
        self.is_root = self.rank == 0
        self.lost += [(r, call) for r in lost]
        return lost

    def duplicate(self):
        """A new mpi4py communicator over the same ranks (the watchdog's own channel); a collective."""
        return self.mpi_comm.Dup()

    def dup(self):
        """A Comm over the same ranks for one purpose, sharing this one's call record; a collective.

        MPI matches a collective only with the same communicator's, so a rank in
        one purpose's call and another in a different purpose's wait for each
        other (which the hang doctor reports) where on one communicator the calls
        would match each other and the larger message overwrite the smaller
        buffer. One call record: a rank is in one blocking call at a time.
        """
        if self.size == 1:
            twin = Comm.__new__(Comm)
            twin.__dict__.update(self.__dict__)
            twin.bytes_sent = 0
            return twin
        twin = Comm(self.mpi_comm.Dup())
        twin.calls, twin.members = self.calls, self.members
        return twin

    # -- facts about the MPI installation -----------------------------------
    def thread_multiple(self):
        """Whether the library lets a second thread call MPI while the first is inside a call."""
        return self._MPI.Query_thread() == self._MPI.THREAD_MULTIPLE

    def fault_tolerant(self):
        """Whether the job runs under ULFM (Open MPI: `mpirun --with-ft ulfm`), so a lost rank can be survived."""
        enabled = os.environ.get("OMPI_MCA_mpi_ft_enable", "").lower() in ("1", "true", "yes")
        return enabled and hasattr(self.mpi_comm, "Shrink")

    def node_size(self):
        """How many ranks of this job share this node (for default thread counts)."""
        if self.size == 1:
            return 1
        local = self.mpi_comm.Split_type(self._MPI.COMM_TYPE_SHARED)
        try:
            return local.Get_size()
        finally:
            local.Free()

    def topology(self):
        """(local_rank, local_size, cross_rank, cross_size, homogeneous), as Horovod defines them.

        Local: the ranks on this node. Cross: the ranks with this rank's local
        rank, one per node. Homogeneous: every node runs as many ranks.
        """
        if self.size == 1:
            return 0, 1, 0, 1, True
        local = self.mpi_comm.Split_type(self._MPI.COMM_TYPE_SHARED, key=self.rank)
        cross = self.mpi_comm.Split(local.Get_rank(), self.rank)
        try:
            sizes = self.mpi_comm.allgather(local.Get_size())
            return local.Get_rank(), local.Get_size(), cross.Get_rank(), cross.Get_size(), len(set(sizes)) == 1
        finally:
            local.Free()
            cross.Free()

    def library_version(self):
        return self._MPI.Get_library_version().strip().splitlines()[0]

    def mpi_standard(self):
        return "%d.%d" % self._MPI.Get_version()


_COMBINE = {"sum": torch.add, "max": torch.maximum, "min": torch.minimum, "prod": torch.mul}
_HALVES = (torch.float16, torch.bfloat16)
_HALF_OPS = {}  # (dtype, op) -> MPI.Op, made on first use


_RING_TAG = 0x7A5  # reduce_scatter_parts_'s messages (sync mode only: async's tags never share its communicator)


def _reduction(MPI, tensor, op):
    """([buffer, datatype], MPI op) reducing `tensor` with `op`.

    float16 and bfloat16 travel as 16-bit integers reduced by an operator of
    ours that adds with torch's vectorized half arithmetic: bfloat16 has no MPI
    datatype, and Open MPI's own float16 sum is slow (measured here, an 11.7M
    element Allreduce: 73 ms with MPI_SHORT_FLOAT, 5 ms with ours, 17 ms in float32).
    """
    if op not in _COMBINE:
        raise ValueError(f"op must be one of {', '.join(_COMBINE)}, got {op!r}")
    buffer = _typed(MPI, tensor)
    if tensor.dtype not in _HALVES:
        return buffer, getattr(MPI, op.upper())
    key = (tensor.dtype, op)
    if key not in _HALF_OPS:
        _HALF_OPS[key] = MPI.Op.Create(_half_reducer(tensor.dtype, _COMBINE[op]), commute=True)
    return buffer, _HALF_OPS[key]


def _typed(MPI, tensor):
    """[buffer, datatype] for moving `tensor` unchanged (16-bit integers for the half types)."""
    if tensor.dtype in _HALVES:
        return [buffer_of(tensor.view(torch.int16)), MPI.INT16_T]
    array = buffer_of(tensor)
    return [array, MPI.Datatype.fromcode(array.dtype.char)]


def _half_reducer(dtype, combine):
    """An MPI user function: inout = combine(in, inout), elementwise, on raw buffers of `dtype`."""
    def reduce(inbuf, inoutbuf, datatype):
        if not memoryview(inoutbuf).nbytes:  # Reduce_scatter calls it on a rank's empty part too
            return
        inout = torch.frombuffer(inoutbuf, dtype=dtype)
        combine(torch.frombuffer(inbuf, dtype=dtype), inout, out=inout)
    return reduce


def _offsets(counts):
    return [0, *accumulate(counts)][:-1]


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

