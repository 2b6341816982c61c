"""distml.horovod against values worked out by hand, at every world size.

    mpirun -n 2 python -m pytest --with-mpi tests/mpi/test_horovod.py
    mpirun -n 3 python -m pytest --with-mpi tests/mpi/test_horovod.py

Rank r contributes values made from r, so every expected result is a short
formula of the world size n. Errors must be raised on every rank alike (but a
name repeated while in flight, which Horovod refuses on the rank that repeats
it), and the job must go on working after them.
"""
import math
import time
import warnings

import pytest
import torch
from torch import nn

import distml
import distml.horovod as hvd
from distml.horovod import HorovodInternalError


@pytest.fixture(autouse=True)
def started():
    hvd.init()


def _rn():
    return hvd.rank(), hvd.size()


# -- process queries ----------------------------------------------------------------------------------
@pytest.mark.mpi(min_size=2)
def test_process_queries_describe_one_node_of_world_size():
    r, n = _rn()
    assert (hvd.rank(), hvd.size()) == (distml.rank(), distml.size())
    assert (hvd.local_rank(), hvd.local_size(), hvd.cross_rank(), hvd.cross_size()) == (r, n, 0, 1)
    assert hvd.is_homogeneous() and hvd.is_initialized()
    assert hvd.mpi_built() and hvd.mpi_enabled()
    assert not any(f() for f in (hvd.nccl_built, hvd.gloo_built, hvd.cuda_built, hvd.rocm_built, hvd.ddl_built,
                                 hvd.ccl_built, hvd.gloo_enabled))


# -- allreduce ----------------------------------------------------------------------------------------
@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("op, expected", [
    (hvd.Average, lambda n: (n + 1) / 2), (hvd.Sum, lambda n: n * (n + 1) / 2), (hvd.Min, lambda n: 1),
    (hvd.Max, lambda n: n), (hvd.Product, lambda n: math.factorial(n))])
def test_allreduce_ops_reduce_rank_plus_one(op, expected):
    r, n = _rn()
    tensor = torch.full((2, 3), r + 1.0)

    result = hvd.allreduce(tensor, op=op, name=f"op{op}")

    assert result.tolist() == [[expected(n)] * 3] * 2
    assert tensor.tolist() == [[r + 1.0] * 3] * 2  # the input is left alone


@pytest.mark.mpi(min_size=2)
def test_allreduce_in_place_scales_and_keeps_horovods_average_argument():
    r, n = _rn()
    tensor = torch.full((4,), r + 1.0)

    same = hvd.allreduce_(tensor, op=hvd.Sum, prescale_factor=2.0, postscale_factor=0.25)
    with pytest.warns(DeprecationWarning):
        summed = hvd.allreduce(torch.full((2,), r + 1.0), average=False)

    assert same is tensor and tensor.tolist() == [n * (n + 1) / 2 * 2 * 0.25] * 4
    assert summed.tolist() == [n * (n + 1) / 2] * 2
    with pytest.raises(ValueError, match="supersedes average"):
        hvd.allreduce(tensor, average=True, op=hvd.Sum)


@pytest.mark.mpi(min_size=2)
def test_allreduce_average_of_integers_truncates_as_horovod():
    r, n = _rn()
    result = hvd.allreduce(torch.tensor([r + 1, 10 * r], dtype=torch.int64))
    assert result.dtype == torch.int64
    assert result.tolist() == [int(n * (n + 1) / 2 / n), int(10 * n * (n - 1) / 2 / n)]


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.uint8])
def test_allreduce_sums_every_supported_dtype(dtype):
    r, n = _rn()
    result = hvd.allreduce(torch.full((5,), r + 1, dtype=dtype), op=hvd.Sum)
    assert result.dtype == dtype and result.tolist() == [n * (n + 1) // 2] * 5


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("compression, wire", [(hvd.Compression.fp16, torch.float16),
                                                (hvd.Compression.bf16, torch.bfloat16)])
def test_compressed_allreduce_sends_half_the_bytes_and_rounds_like_the_wire_type(compression, wire):
    r, n = _rn()
    value = 1 / 3 + 0.1 * (r + 1)  # not representable in 16 bits
    comm = hvd.basics._State.comm
    before = comm.bytes_sent

    result = hvd.allreduce(torch.full((1000,), value), compression=compression, op=hvd.Sum)

    assert comm.bytes_sent - before == 1000 * 2
    assert result.dtype == torch.float32
    halves = [torch.tensor(1 / 3 + 0.1 * (q + 1)).to(wire) for q in range(n)]
    in_order = halves[0]
    for h in halves[1:]:
        in_order = (in_order.float() + h.float()).to(wire)  # one order MPI may sum in
    assert result[0].item() == pytest.approx(in_order.item(), rel=2 ** -7)
    assert result[0].item() != torch.tensor([1 / 3 + 0.1 * (q + 1) for q in range(n)]).sum().item()  # rounded


@pytest.mark.mpi(min_size=2)
def test_grouped_allreduce_reduces_each_tensor_and_in_place_variant_writes_back():
    r, n = _rn()
    tensors = [torch.full((2, 2), r + 1.0), torch.full((3,), 10.0 * r)]

    out = hvd.grouped_allreduce(tensors, op=hvd.Sum)
    hvd.grouped_allreduce_(tensors)  # average, in place

    assert [t.tolist() for t in out] == [[[n * (n + 1) / 2] * 2] * 2, [10.0 * n * (n - 1) / 2] * 3]
    assert tensors[0].tolist() == [[(n + 1) / 2] * 2] * 2 and tensors[1].tolist() == [5.0 * (n - 1)] * 3


@pytest.mark.mpi(min_size=2)
def test_async_handles_complete_in_any_order():
    r, n = _rn()
    handles = [hvd.allreduce_async(torch.full((3,), float(k * (r + 1))), name=f"h{k}", op=hvd.Sum)
               for k in range(4)]
    in_place = torch.full((2,), float(r))
    handle = hvd.allreduce_async_(in_place, name="in-place")

    results = {k: hvd.synchronize(handles[k]) for k in (2, 0, 3, 1)}  # out of order
    while not hvd.poll(handle):
        time.sleep(0.001)
    assert hvd.synchronize(handle) is in_place and in_place.tolist() == [(n - 1) / 2] * 2

    assert all(results[k].tolist() == [k * n * (n + 1) / 2] * 3 for k in range(4))
    assert hvd.synchronize(handles[0]) is None  # already completed: Horovod returns None too


# -- allgather, broadcast, alltoall, reducescatter ------------------------------------------------------
@pytest.mark.mpi(min_size=2)
def test_allgather_concatenates_uneven_first_dimensions_in_rank_order():
    r, n = _rn()
    mine = torch.full((r + 1, 2), float(r))  # rank r: r + 1 rows

    gathered = synchronize_allgather(mine)

    assert gathered.tolist() == [[float(q)] * 2 for q in range(n) for _ in range(q + 1)]


def synchronize_allgather(tensor):
    return hvd.synchronize(hvd.allgather_async(tensor, name="uneven"))


@pytest.mark.mpi(min_size=2)
def test_broadcast_from_the_last_rank_in_and_out_of_place():
    r, n = _rn()
    tensor = torch.arange(6.0).reshape(2, 3) * (r + 1)

    copy = hvd.broadcast(tensor, root_rank=n - 1)
    hvd.broadcast_(tensor, root_rank=n - 1)

    expected = (torch.arange(6.0).reshape(2, 3) * n).tolist()
    assert copy.tolist() == expected and tensor.tolist() == expected


@pytest.mark.mpi(min_size=2)
def test_alltoall_equal_split_sends_row_q_to_rank_q():
    r, n = _rn()
    rows = torch.tensor([[10.0 * r + q] for q in range(n)])  # row q goes to rank q

    received = hvd.alltoall(rows)

    assert received.tolist() == [[10.0 * q + r] for q in range(n)]


@pytest.mark.mpi(min_size=2)
def test_alltoall_with_splits_returns_rows_and_received_splits():
    r, n = _rn()
    splits = [q + r + 1 for q in range(n)]  # rank r sends q + r + 1 rows to rank q
    rows = torch.cat([torch.full((s, 2), 100.0 * r + q) for q, s in enumerate(splits)])

    received, received_splits = hvd.alltoall(rows, splits=torch.tensor(splits, dtype=torch.int32))

    assert received_splits.dtype == torch.int32 and received_splits.tolist() == [r + q + 1 for q in range(n)]
    assert received.tolist() == [[100.0 * q + r] * 2 for q in range(n) for _ in range(r + q + 1)]


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("splits", [torch.ones(2, dtype=torch.float32), [1.0, 1.0], torch.ones(2, dtype=torch.bool)],
                         ids=["float32 tensor", "list of floats", "bool tensor"])
def test_alltoall_refuses_splits_that_are_not_integers_on_every_rank(splits):
    r, n = _rn()
    splits = splits[:1].expand(n) if isinstance(splits, torch.Tensor) else splits[:1] * n
    with pytest.raises(ValueError, match="alltoall expects splits to contain integers"):
        hvd.alltoall(torch.zeros(n), splits)
    for good in (torch.ones(n, dtype=torch.int32), torch.ones(n, dtype=torch.int64), [1] * n):
        assert hvd.alltoall(torch.full((n,), float(r)), good)[0].tolist() == [float(q) for q in range(n)]


@pytest.mark.mpi(min_size=2)
def test_reducescatter_gives_the_first_ranks_one_row_more():
    r, n = _rn()
    rows = 2 * n + 1  # not divisible: rank 0 gets 3 rows, the others 2
    tensor = torch.arange(rows, dtype=torch.float32).unsqueeze(1) * (r + 1)

    mine = hvd.reducescatter(tensor, op=hvd.Sum)

    start = 3 * min(r, 1) + 2 * max(r - 1, 0)
    count = 3 if r == 0 else 2
    assert mine.tolist() == [[i * n * (n + 1) / 2] for i in range(start, start + count)]
    assert hvd.reducescatter(tensor)[0, 0].item() == start * (n + 1) / 2  # Average is the default


def _share(rows, r, n):
    """Horovod's split of `rows` over n ranks: (first row, row count) of rank r."""
    counts = [rows // n + (q < rows % n) for q in range(n)]
    return sum(counts[:r]), counts[r]


def _rank_tensors(r, n, dtype, dim):
    """Three tensors of `dim` dimensions from rank r: even, uneven and a one-row first dimension."""
    firsts = (2 * n, 2 * n + 1, 1)
    return [(torch.arange(f * 2 ** (dim - 1)).reshape(f, *[2] * (dim - 1)) * (r + 1) + k).to(dtype)
            for k, f in enumerate(firsts)]


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.float16, torch.float32, torch.float64])
def test_grouped_reducescatter_sums_each_tensor_into_each_ranks_rows(dtype):
    r, n = _rn()
    for dim in (1, 2, 3):
        tensors = _rank_tensors(r, n, dtype, dim)

        shares = hvd.grouped_reducescatter(tensors, op=hvd.Sum)

        for k, (share, t) in enumerate(zip(shares, tensors)):
            start, count = _share(t.shape[0], r, n)
            base = torch.arange(t.numel()).reshape(t.shape)[start:start + count]
            assert share.dtype == dtype and share.shape == (count, *t.shape[1:])
            assert share.double().tolist() == (base * n * (n + 1) // 2 + k * n).double().tolist()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("dtype", [torch.int32, torch.float32])
def test_grouped_reducescatter_averages_and_truncates_integers_as_horovod(dtype):
    r, n = _rn()
    tensors = [torch.full((n, 3), 10 * r + 1, dtype=dtype), torch.full((2 * n + 1,), r, dtype=dtype)]

    shares = hvd.grouped_reducescatter(tensors)  # Average is the default

    mean0, mean1 = 5 * (n - 1) + 1, (n - 1) / 2
    if not dtype.is_floating_point:
        mean1 = int(mean1)
    assert shares[0].tolist() == [[mean0] * 3]
    assert shares[1].tolist() == [mean1] * _share(2 * n + 1, r, n)[1]


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("dtype", [torch.int64, torch.float16, torch.float64])
def test_grouped_reducescatter_scales_before_and_after_the_sum(dtype):
    r, n = _rn()
    tensors = [torch.full((n, 2), 3 * (r + 1), dtype=dtype), torch.full((n + 1,), 5, dtype=dtype)]

    pre = hvd.grouped_reducescatter(tensors, op=hvd.Sum, prescale_factor=0.5)
    post = hvd.grouped_reducescatter(tensors, op=hvd.Sum, postscale_factor=1.5)

    exact = dtype.is_floating_point
    cut = (lambda v: v) if exact else math.trunc  # integers truncate after each scaling, as Horovod
    mine = _share(n + 1, r, n)[1]
    assert pre[0].tolist() == [[sum(cut(3 * (q + 1) * 0.5) for q in range(n))] * 2]
    assert post[0].tolist() == [[cut(3 * n * (n + 1) / 2 * 1.5)] * 2]
    assert pre[1].tolist() == [cut(2.5) * n] * mine and post[1].tolist() == [cut(5 * n * 1.5)] * mine


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("op, scale", [(hvd.Sum, lambda n: n), (hvd.Average, lambda n: 1)])
def test_grouped_reducescatter_gradient_is_the_allgather_of_the_output_gradient(op, scale):
    r, n = _rn()
    tensors = [torch.ones(2 * n + 1, 2, requires_grad=True), torch.ones(1, requires_grad=True)]

    shares = hvd.grouped_reducescatter(tensors, op=op, postscale_factor=2.0)
    for k, share in enumerate(shares):
        (share * (r + 1 + k)).sum().backward()  # rank r's upstream gradient: r + 1 + k

    firsts = [_share(2 * n + 1, q, n)[1] for q in range(n)]
    expected = [q + 1 for q in range(n) for _ in range(firsts[q])]  # every rank's rows, rank after rank
    assert tensors[0].grad.tolist() == [[2.0 * scale(n) * g] * 2 for g in expected]
    assert tensors[1].grad.tolist() == [2.0 * scale(n) * 2]  # the one row is rank 0's


@pytest.mark.mpi(min_size=2)
def test_grouped_reducescatter_async_is_one_mpi_call_and_completes_out_of_order(monkeypatch):
    r, n = _rn()
    comm = hvd.basics._State.comm
    sent = []
    start = comm.ireduce_scatter
    monkeypatch.setattr(comm, "ireduce_scatter", lambda tensor, *a: sent.append(tensor.numel()) or start(tensor, *a))
    tensors = [torch.full((n, 2), float(r)), torch.full((3 * n,), 1.0)]

    grouped = hvd.grouped_reducescatter_async(tensors, name="grouped", op=hvd.Sum)
    single = hvd.reducescatter_async(tensors[1], name="single", op=hvd.Sum)

    assert hvd.synchronize(single).tolist() == [float(n)] * 3
    assert [t.tolist() for t in hvd.synchronize(grouped)] == [[[n * (n - 1) / 2] * 2], [float(n)] * 3]
    assert sent == [2 * n + 3 * n, 3 * n]  # the group's tensors went in one call


@pytest.mark.mpi(min_size=2)
def test_grouped_reducescatter_refuses_scalars_and_mixed_dtypes_on_every_rank():
    r, n = _rn()
    with pytest.raises(ValueError, match="at least one dimension, got a scalar"):
        hvd.grouped_reducescatter([torch.zeros(n, 1), torch.tensor(float(r))])
    with pytest.raises(ValueError, match="one dtype"):
        hvd.grouped_reducescatter([torch.zeros(n), torch.zeros(n, dtype=torch.float64)])
    assert hvd.grouped_reducescatter([torch.ones(n)], op=hvd.Sum)[0].tolist() == [float(n)]


@pytest.mark.mpi(min_size=2)
def test_objects_broadcast_and_allgather():
    r, n = _rn()
    assert hvd.broadcast_object({"from": r, "list": [r] * 3}, root_rank=n - 1) == {"from": n - 1, "list": [n - 1] * 3}
    assert hvd.allgather_object(("rank", r) if r % 2 else r) == [("rank", q) if q % 2 else q for q in range(n)]


@pytest.mark.mpi(min_size=2)
def test_barrier_waits_for_the_slowest_rank():
    r, n = _rn()
    if r == n - 1:
        time.sleep(0.3)
    started = time.monotonic()
    hvd.barrier()
    assert r == n - 1 or time.monotonic() - started > 0.2


# -- join -------------------------------------------------------------------------------------------------
@pytest.mark.mpi(min_size=2)
def test_join_lets_one_rank_reduce_alone_with_zeros_from_the_joined():
    r, n = _rn()
    extra = []
    if r == n - 1:  # the last rank has two more batches than the others
        extra.append(hvd.allreduce(torch.full((3,), 6.0), op=hvd.Sum).tolist())
        extra.append(hvd.allreduce(torch.full((2,), 6.0)).tolist())  # Average divides by every rank
        extra.append(hvd.allreduce(torch.full((2,), 6.0), op=hvd.Min).tolist())  # joined ranks do not count
        extra.append(hvd.synchronize(hvd.allreduce_async(torch.full((2,), 6.0), op=hvd.Sum)).tolist())
        hvd.barrier()

    last = hvd.join()

    assert last == n - 1
    if r == n - 1:
        assert extra == [[6.0] * 3, [6.0 / n] * 2, [6.0] * 2, [6.0] * 2]
    assert hvd.allreduce(torch.ones(1), op=hvd.Sum).item() == n  # everyone is back


@pytest.mark.mpi(min_size=2)
def test_join_refuses_a_broadcast_on_the_rank_that_makes_it_while_the_joined_wait_on():
    r, n = _rn()
    if r == 0:  # as Horovod's test_horovod_join_broadcast: only the rank that broadcasts raises
        with pytest.raises(HorovodInternalError, match="broadcast is not supported after a rank called join"):
            hvd.broadcast(torch.ones(2), root_rank=0)
    assert hvd.join() == 0  # the others are still in their join(); rank 0 joins last


# -- safety nets: the same error on every rank, and the job goes on -------------------------------------
@pytest.mark.mpi(min_size=2)
def test_mismatched_shapes_raise_on_every_rank_then_work_continues():
    r, n = _rn()
    with pytest.raises(HorovodInternalError, match=r"rank 0: allreduce of float32 \[2\]; rank 1: allreduce of "
                                                   r"float32 \[3\]"):
        hvd.allreduce(torch.zeros(2 + min(r, 1)))
    assert hvd.allreduce(torch.ones(2), op=hvd.Sum).tolist() == [n, n]


@pytest.mark.mpi(min_size=2)
def test_mismatched_dtypes_and_roots_raise_on_every_rank():
    r, n = _rn()
    with pytest.raises(HorovodInternalError, match="float64"):
        hvd.allreduce(torch.zeros(2, dtype=torch.float64 if r == 1 else torch.float32))
    with pytest.raises(HorovodInternalError, match="from root"):
        hvd.broadcast(torch.zeros(2), root_rank=r)
    with pytest.raises(HorovodInternalError, match="allgather"):  # another kind of call
        hvd.allgather(torch.zeros(1, 2)) if r == 0 else hvd.allreduce(torch.zeros(2))


@pytest.mark.mpi(min_size=2)
def test_broadcast_from_a_rank_that_does_not_exist_raises_everywhere():
    r, n = _rn()
    with pytest.raises(ValueError, match=f"root_rank {n} does not exist"):
        hvd.broadcast_(torch.zeros(2), root_rank=n)
    with pytest.raises(HorovodInternalError, match=f"rank 0: broadcast root_rank {n} does not exist"):
        hvd.broadcast_(torch.zeros(2), root_rank=n if r == 0 else 0)  # one rank's mistake, raised by all


_ASYNC_CALLS = {
    "allreduce": lambda t: hvd.allreduce_async(t, name="duplicate", op=hvd.Sum),
    "allgather": lambda t: hvd.allgather_async(t, name="duplicate"),
    "broadcast": lambda t: hvd.broadcast_async(t, root_rank=1, name="duplicate"),
    "reducescatter": lambda t: hvd.reducescatter_async(t, name="duplicate", op=hvd.Sum),
    "grouped_reducescatter": lambda t: hvd.grouped_reducescatter_async([t], name="duplicate", op=hvd.Sum),
}


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("call", _ASYNC_CALLS)
def test_a_name_in_flight_repeated_raises_on_that_rank_only_and_its_operation_still_runs(call):
    r, n = _rn()
    tensor = torch.full((n, 2), r + 1.0)
    handle = None
    for turn in (0, 1):  # Horovod's test: rank 0 repeats the name while the others wait in barrier()
        if (r == 0) == (turn == 0):
            handle = _ASYNC_CALLS[call](tensor)
            with pytest.raises(ValueError, match="'duplicate' while another operation of that name is still in"):
                _ASYNC_CALLS[call](tensor)
        hvd.barrier()

    result = hvd.synchronize(handle)
    rows = result[0] if isinstance(result, list) else result  # grouped calls give a list
    total = n * (n + 1) / 2
    expected = {"allreduce": [[total] * 2] * n, "broadcast": [[2.0] * 2] * n,
                "allgather": [[q + 1.0] * 2 for q in range(n) for _ in range(n)]}
    assert rows.tolist() == expected.get(call, [[total] * 2])  # a reduce-scatter leaves one row per rank
    assert hvd.allreduce(torch.ones(1), op=hvd.Sum).item() == n  # the next call works


@pytest.mark.mpi(min_size=2)
def test_a_name_is_free_again_after_synchronize_poll_or_barrier():
    r, n = _rn()
    first = hvd.allreduce_async(torch.ones(1), name="grad.w")
    while not hvd.poll(first):
        pass
    second = hvd.allreduce_async(torch.ones(1), name="grad.w")  # poll() saw the first complete
    hvd.barrier()
    third = hvd.allreduce_async(torch.ones(1), name="grad.w")  # barrier() completed the second
    assert [hvd.synchronize(h).item() for h in (third, first, second)] == [1.0] * 3
    assert hvd.synchronize(hvd.allreduce_async(torch.ones(1), name="grad.w")).item() == 1.0


@pytest.mark.mpi(min_size=2)
def test_waiting_for_an_operation_the_others_make_only_after_a_barrier_raises_on_every_rank():
    r, n = _rn()
    with pytest.raises(HorovodInternalError, match="rank 0: allreduce of float32 \\[1\\] named 'early'; rank 1: barrier"):
        if r == 0:
            hvd.synchronize(hvd.allreduce_async(torch.ones(1), name="early"))  # Horovod would wait forever
        else:
            hvd.barrier()
    assert hvd.allreduce(torch.ones(1), name="early", op=hvd.Sum).item() == n


@pytest.mark.mpi(min_size=2)
def test_what_is_not_there_says_what_to_do_instead():
    with pytest.raises(ValueError, match="CPU tensors"):
        hvd.allreduce(torch.empty(2, device="meta"))
    with pytest.raises(ValueError, match="Adasum is not supported"):
        hvd.allreduce(torch.ones(2), op=hvd.Adasum)
    with pytest.raises(NotImplementedError, match="global process set"):
        hvd.add_process_set([0])
    with pytest.raises(NotImplementedError, match="on-rank-failure continue"):
        hvd.elastic.run
    with pytest.raises(ValueError, match="splits not provided"):
        hvd.alltoall(torch.zeros(hvd.size() + 1))


# -- gradients through collectives (Horovod's formulas) -------------------------------------------------
@pytest.mark.mpi(min_size=2)
def test_allreduce_allgather_broadcast_are_differentiable():
    r, n = _rn()
    x = torch.ones(2, requires_grad=True)
    (hvd.allreduce(x, op=hvd.Sum) * (r + 1)).sum().backward()
    assert x.grad.tolist() == [n * (n + 1) / 2] * 2  # the sum of every rank's upstream gradient

    y = torch.ones(r + 1, requires_grad=True)
    gathered = hvd.allgather(y)
    (gathered * torch.arange(gathered.numel(), dtype=torch.float32) * (r + 1)).sum().backward()
    offset = r * (r + 1) // 2
    assert y.grad.tolist() == [(offset + i) * (n + 1) / 2 for i in range(r + 1)]  # averaged over ranks

    z = torch.ones(3, requires_grad=True)
    (hvd.broadcast(z, root_rank=0) * (r + 1)).sum().backward()
    assert z.grad.tolist() == ([(n + 1) / 2] * 3 if r == 0 else [0.0] * 3)


# -- DistributedOptimizer and broadcasting state ---------------------------------------------------------
def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


def _batch(r, k=0, rows=5):
    gen = torch.Generator().manual_seed(100 * r + k)
    return torch.randn(rows + r, 4, generator=gen), torch.randint(0, 3, (rows + r,), generator=gen)


def _grads(model):
    return [p.grad.clone() for p in model.parameters()]


def _local_grads(model, batches):
    """This rank's gradients, accumulated over `batches` without any communication."""
    model.zero_grad()
    for x, y in batches:
        nn.functional.cross_entropy(model(x), y).backward()
    return _grads(model)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("op", [hvd.Average, hvd.Sum])
def test_backward_passes_per_step_two_reduces_the_local_sum_of_two_passes(op):
    r, n = _rn()
    model = _model()
    mine = _local_grads(model, [_batch(r, 0), _batch(r, 1)])
    everyone = hvd.allgather_object([g.tolist() for g in mine])
    expected = [sum(torch.tensor(e[i]) for e in everyone) / (n if op == hvd.Average else 1)
                for i in range(len(mine))]
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                   named_parameters=model.named_parameters(), backward_passes_per_step=2, op=op)

    opt.zero_grad()
    for k in range(2):
        x, y = _batch(r, k)
        nn.functional.cross_entropy(model(x), y).backward()
    opt.synchronize()

    assert all(torch.allclose(g, e, atol=1e-6) for g, e in zip(_grads(model), expected))
    x, y = _batch(r, 2)
    for _ in range(2):
        nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(AssertionError, match="more than backward_passes_per_step"):
        nn.functional.cross_entropy(model(x), y).backward()


@pytest.mark.mpi(min_size=2)
def test_optimizer_checks_names_as_horovod_does():
    model = _model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    named = list(model.named_parameters())
    with pytest.raises(ValueError, match="must be unique. Found duplicates: 0.weight"):
        hvd.DistributedOptimizer(sgd, named_parameters=[named[0], ("0.weight", named[1][1]), *named[2:]])
    with pytest.raises(ValueError, match="were not named"):
        hvd.DistributedOptimizer(sgd, named_parameters=named[:-1])
    with pytest.raises(ValueError, match="sequence of tuples"):
        hvd.DistributedOptimizer(sgd, named_parameters=[p for _, p in named])
    with pytest.raises(ValueError, match="gradient_predivide_factor not supported with op != Average"):
        hvd.DistributedOptimizer(sgd, op=hvd.Sum, gradient_predivide_factor=2.0)
    with pytest.raises(ValueError, match="backward_passes_per_step must be > 0"):
        hvd.DistributedOptimizer(sgd, backward_passes_per_step=0)


@pytest.mark.mpi(min_size=2)
def test_fp16_optimizer_sends_half_the_bytes_and_predivide_changes_nothing_in_exact_arithmetic():
    r, n = _rn()
    model = _model()
    mine = _local_grads(model, [_batch(r)])
    everyone = hvd.allgather_object([g.tolist() for g in mine])
    mean = [sum(torch.tensor(e[i]) for e in everyone) / n for i in range(len(mine))]
    comm = hvd.basics._State.comm
    numel = sum(p.numel() for p in model.parameters())

    for compression, predivide, wire_bytes, tol in [(hvd.Compression.none, 1.0, 4, 1e-6),
                                                    (hvd.Compression.none, 4.0, 4, 1e-6),
                                                    (hvd.Compression.fp16, 1.0, 2, 2e-3)]:
        opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), compression=compression,
                                       gradient_predivide_factor=predivide)
        _local_grads(model, [_batch(r)])
        before = comm.bytes_sent
        opt.synchronize()
        assert comm.bytes_sent - before == numel * wire_bytes
        assert all(p.grad.dtype == torch.float32 for p in model.parameters())
        assert all(torch.allclose(p.grad, m, atol=tol, rtol=0) for p, m in zip(model.parameters(), mean))


@pytest.mark.mpi(min_size=2)
def test_a_sparse_embedding_gradient_is_averaged_as_a_dense_one():
    r, n = _rn()
    embedding = nn.Embedding(4, 2, sparse=True)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(embedding.parameters(), lr=0.1), sparse_as_dense=True)
    embedding.weight.grad = None  # as a user's model.zero_grad() leaves it: the first gradient is sparse

    embedding(torch.tensor([r % 4, 3])).sum().backward()
    opt.synchronize()

    counts = torch.zeros(4)
    for q in range(n):
        counts[q % 4] += 1
    counts[3] += n
    assert torch.equal(embedding.weight.grad, (counts / n).unsqueeze(1).expand(4, 2))


@pytest.mark.mpi(min_size=2)
def test_synchronize_then_skip_synchronize_reduces_once_and_a_second_sync_warns():
    r, n = _rn()
    model = _model()
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.0))
    comm = hvd.basics._State.comm
    _local_grads(model, [_batch(r)])
    before = comm.bytes_sent

    opt.synchronize()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    with opt.skip_synchronize():
        opt.step()
    once = comm.bytes_sent - before
    opt.synchronize()
    with pytest.warns(UserWarning, match="skip_synchronize"):
        opt.step()

    assert comm.bytes_sent - before == 3 * once  # the warned step reduced again, as Horovod's does


@pytest.mark.mpi(min_size=2)
def test_broadcast_optimizer_state_fills_an_optimizer_that_has_not_stepped():
    r, n = _rn()
    model = _model()
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    adam = torch.optim.Adam(model.parameters(), lr=0.01 * (r + 1))
    if r == 0:  # only root has state: two real steps
        for k in range(2):
            _local_grads(model, [_batch(0, k)])
            adam.step()
    hvd.broadcast_parameters(model.named_parameters(), root_rank=0)

    hvd.broadcast_optimizer_state(hvd.DistributedOptimizer(adam), root_rank=0)

    assert adam.param_groups[0]["lr"] == 0.01
    mine = [(s["step"].item(), s["exp_avg"].tolist(), s["exp_avg_sq"].tolist()) for s in adam.state.values()]
    assert mine[0][0] == 2.0 and any(abs(v) > 0 for v in torch.tensor(mine[0][1]).flatten().tolist())
    assert all(m == mine for m in hvd.allgather_object(mine))


@pytest.mark.mpi(min_size=2)
def test_broadcast_optimizer_state_when_no_rank_has_stepped_creates_zero_state_everywhere():
    r, n = _rn()
    model = _model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1 * (r + 1), momentum=0.9)

    hvd.broadcast_optimizer_state(sgd, root_rank=n - 1)

    assert sgd.param_groups[0]["lr"] == pytest.approx(0.1 * n)
    buffers = [s["momentum_buffer"] for s in sgd.state.values()]
    assert len(buffers) == 4 and all(b.abs().sum() == 0 for b in buffers)


# -- the same loop on distml.horovod and on distml.DistributedOptimizer ---------------------------------
def _train(make_optimizer, steps=6):
    r, n = _rn()
    model = _model(seed=r)  # different on purpose: the broadcast must fix it
    sgd = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9, weight_decay=1e-3)
    optimizer, broadcast = make_optimizer(model, sgd)
    broadcast(model)
    for k in range(steps):
        x, y = _batch(r, k)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.mpi(min_size=2)
def test_horovod_loop_gives_the_weights_of_the_same_loop_on_distml():
    via_horovod = _train(lambda model, sgd: (
        hvd.DistributedOptimizer(sgd, named_parameters=model.named_parameters()),
        lambda m: hvd.broadcast_parameters(m.state_dict(), root_rank=0)))
    via_distml = _train(lambda model, sgd: (
        distml.DistributedOptimizer(sgd, model), lambda m: distml.broadcast_parameters(m)))

    assert all(torch.equal(a, b) for a, b in zip(via_horovod, via_distml))
    replicas = hvd.allgather_object([p.tolist() for p in via_horovod])
    assert all(rep == replicas[0] for rep in replicas)


@pytest.mark.mpi(min_size=2)
def test_horovod_loop_equals_one_process_on_the_union_of_equal_batches():
    r, n = _rn()
    model = _model()
    reference = _model()
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.3),
                                   named_parameters=model.named_parameters())
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.3)
    for k in range(4):
        batches = [_batch(q, k, rows=6 - q) for q in range(n)]  # n equal shards of 6 rows
        x, y = batches[r]
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        ref_opt.zero_grad()
        nn.functional.cross_entropy(reference(torch.cat([b[0] for b in batches])),
                                    torch.cat([b[1] for b in batches])).backward()
        ref_opt.step()

    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(model.parameters(), reference.parameters()))


@pytest.mark.mpi(min_size=2)
def test_optimizer_works_with_lr_schedulers_and_joined_ranks():
    r, n = _rn()
    model = _model()
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=1.0))
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "step() before optimizer.step()" warning
        for k in range(2 if r == 0 else 1):  # rank 0 has one batch more
            _local_grads(model, [_batch(r, k)])
            opt.step()
            scheduler.step()
    assert hvd.join() == 0
    assert opt.param_groups[0]["lr"] == (0.25 if r == 0 else 0.5)


# -- SyncBatchNorm ----------------------------------------------------------------------------------------
@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_sync_batch_norm_equals_batch_norm_on_the_union_of_uneven_batches(momentum):
    r, n = _rn()
    gen = torch.Generator().manual_seed(3)
    xs = [torch.randn(4 + q, 3, 5, generator=gen) * (q + 1) + q for q in range(n)]  # uneven, unlike ranks
    cs = [torch.randn(4 + q, 3, 5, generator=gen) for q in range(n)]
    sync, plain = hvd.SyncBatchNorm(3, momentum=momentum), nn.BatchNorm1d(3, momentum=momentum)
    with torch.no_grad():
        for bn in (sync, plain):
            bn.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
            bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    x, union = xs[r].clone().requires_grad_(), torch.cat(xs).requires_grad_()

    for _ in range(2):  # twice: the running statistics move twice
        out = sync(x)
    (out * cs[r]).sum().backward()  # the union's loss is the sum of every rank's
    reference = plain(union)
    reference = plain(union)
    (reference * torch.cat(cs)).sum().backward()

    first = sum(4 + q for q in range(r))
    assert torch.allclose(out, reference[first:first + 4 + r], atol=1e-5)
    assert torch.allclose(x.grad, union.grad[first:first + 4 + r], atol=1e-5)
    grads = hvd.allreduce(torch.cat([sync.weight.grad, sync.bias.grad]), op=hvd.Sum)
    assert torch.allclose(grads, torch.cat([plain.weight.grad, plain.bias.grad]), atol=1e-4)
    assert torch.allclose(sync.running_mean, plain.running_mean, atol=1e-6)
    assert torch.allclose(sync.running_var, plain.running_var, atol=1e-5)
    sync.eval(), plain.eval()
    assert torch.allclose(sync(xs[0]), plain(xs[0]), atol=1e-6)
