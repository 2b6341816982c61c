"""distml.horovod in one process: the half-precision reducers, compression, and a world of one."""
import pytest
import torch

import distml.horovod as hvd
from distml import comm


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("op, exact", [("sum", lambda a, b: a + b), ("max", torch.maximum), ("prod", torch.mul)])
def test_our_mpi_operator_for_halves_rounds_the_exact_result_once(dtype, op, exact):
    gen = torch.Generator().manual_seed(1)
    a, b = (torch.randn(257, generator=gen).to(dtype) for _ in range(2))
    inout = bytearray(b.view(torch.int16).numpy().tobytes())

    comm._half_reducer(dtype, comm._COMBINE[op])(bytearray(a.view(torch.int16).numpy().tobytes()), inout, None)

    result = torch.frombuffer(inout, dtype=torch.int16).view(dtype)
    assert torch.equal(result, exact(a.double(), b.double()).to(dtype))  # computed exactly, rounded once


def test_compression_casts_floats_for_the_wire_and_back_and_leaves_integers():
    floats, ints = torch.tensor([1 / 3], dtype=torch.float64), torch.tensor([3])

    wire, ctx = hvd.Compression.fp16.compress(floats)
    assert wire.dtype == torch.float16 and hvd.Compression.fp16.decompress(wire, ctx).dtype == torch.float64
    assert hvd.Compression.bf16.compress(floats)[0].dtype == torch.bfloat16
    assert hvd.Compression.fp16.compress(ints)[0] is ints
    assert hvd.Compression.none.compress(floats)[0] is floats


def test_calls_before_init_say_how_to_start():
    hvd.shutdown()
    with pytest.raises(ValueError, match=r"use hvd.init\(\)"):
        hvd.rank()
    hvd.init()
    assert hvd.is_initialized()


def test_a_world_of_one_runs_every_call_without_mpirun():
    hvd.init()
    t = torch.arange(6.0).reshape(3, 2)

    assert (hvd.rank(), hvd.size(), hvd.local_size(), hvd.cross_size()) == (0, 1, 1, 1)
    assert torch.equal(hvd.allreduce(t), t) and torch.equal(hvd.allgather(t), t)
    assert torch.equal(hvd.broadcast(t, 0), t) and torch.equal(hvd.reducescatter(t, op=hvd.Sum), t)
    out, splits = hvd.alltoall(t, splits=[2])
    assert torch.equal(out, t[:2]) and splits.tolist() == [2]
    assert hvd.grouped_allreduce([t, t[0]])[1].tolist() == [0.0, 1.0]
    assert [s.tolist() for s in hvd.grouped_reducescatter([t, t[0]], op=hvd.Sum)] == [t.tolist(), [0.0, 1.0]]
    assert hvd.broadcast_object({"a": 1}) == {"a": 1} and hvd.allgather_object(5) == [5]
    assert hvd.join() == 0
    with pytest.raises(ValueError, match="root_rank 1 does not exist"):
        hvd.broadcast(t, 1)


def test_one_process_optimizer_steps_like_the_optimizer_it_wraps():
    hvd.init()
    torch.manual_seed(0)
    model, twin = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    twin.load_state_dict(model.state_dict())
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9))
    ref = torch.optim.SGD(twin.parameters(), lr=0.5, momentum=0.9)
    x = torch.randn(4, 3)
    for _ in range(3):
        for m, o in ((model, opt), (twin, ref)):
            o.zero_grad()
            m(x).pow(2).sum().backward()
            o.step()

    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))
    assert opt.state_dict()["param_groups"] == ref.state_dict()["param_groups"]
    assert isinstance(opt, torch.optim.Optimizer) and opt.optimizer.state
