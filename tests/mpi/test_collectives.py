"""Collectives and the gradient reducer on a real communicator.

Run at several world sizes:  mpirun -n 2 python -m pytest --with-mpi tests/mpi
                             mpirun -n 3 python -m pytest --with-mpi tests/mpi
"""
import sys

import pytest
import torch
from torch import nn

import distml
from distml import comm as _comm
from distml.config import UsageError
from distml.reducer import GradientReducer
from distml.agreement import RankFailure, agree, check_same


@pytest.fixture
def world():
    return _comm.world()


@pytest.mark.mpi(min_size=2)
def test_allreduce_sums_in_place_and_counts_bytes(world):
    tensor = torch.full((5,), float(world.rank + 1))
    before = world.bytes_sent

    world.allreduce_(tensor)

    assert tensor.tolist() == [world.size * (world.size + 1) / 2] * 5
    assert world.bytes_sent - before == 5 * 4


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_reduce_scatter_sums_each_part_into_its_rank_and_leaves_the_input(world, dtype):
    # uneven sizes, an empty part, values that differ by rank and by element
    counts = [3 + 2 * r if r != 1 else 0 for r in range(world.size)]
    tensor = (torch.arange(sum(counts), dtype=torch.float64) * (world.rank + 1) + world.rank).to(dtype)
    kept = tensor.clone()
    out = torch.full((counts[world.rank],), -1.0, dtype=dtype)
    before = world.bytes_sent

    world.reduce_scatter_(tensor, out, counts, what="a test")

    lo = sum(counts[:world.rank])
    index = torch.arange(lo, lo + counts[world.rank], dtype=torch.float64)
    ranks = torch.arange(world.size, dtype=torch.float64)
    expected = index * (ranks + 1).sum() + ranks.sum()
    assert torch.equal(out.double(), expected.to(dtype).double())  # small integers: exact in bfloat16
    assert torch.equal(tensor, kept)
    assert world.bytes_sent - before == (sum(counts) - counts[world.rank]) * tensor.element_size()


@pytest.mark.mpi(min_size=2)
def test_reduce_scatter_parts_need_not_be_adjacent(world):
    buffer = torch.arange(10 * world.size, dtype=torch.float32) + 100 * world.rank
    parts = [buffer[10 * r + 2:10 * r + 5] for r in range(world.size)]  # elements 2..4 of each rank's tenth
    out = torch.empty(3)

    world.reduce_scatter_parts_(parts, out)

    n = world.size
    first = 10 * world.rank + 2
    assert out.tolist() == [n * (first + i) + 100 * n * (n - 1) / 2 for i in range(3)]


@pytest.mark.mpi(min_size=2)
def test_broadcast_copies_root_values_into_every_rank(world):
    tensor = torch.arange(6, dtype=torch.float64).reshape(2, 3) * (world.rank + 1)
    transposed = torch.zeros(3, 2).t()  # non-contiguous target

    world.broadcast_(tensor)
    world.broadcast_(transposed.fill_(world.rank))

    assert tensor.tolist() == torch.arange(6, dtype=torch.float64).reshape(2, 3).tolist()
    assert transposed.sum().item() == 0


@pytest.mark.mpi(min_size=2)
def test_broadcast_parameters_makes_replicas_identical(world):
    torch.manual_seed(world.rank)  # deliberately different initial weights
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    model[1].running_mean.fill_(world.rank)

    distml.broadcast_parameters(model)

    checksum = sum(t.double().sum().item() for t in model.state_dict().values())
    assert len(set(world.allgather_object(checksum))) == 1
    assert model[1].running_mean.sum().item() == 0


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("bucket_mb", [1e-5, 25.0])  # one bucket per parameter, or one in all
def test_reducer_averages_gradients_over_ranks(world, bucket_mb):
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3))
    reducer = GradientReducer(model.parameters(), world, bucket_mb=bucket_mb)
    for p in model.parameters():
        p.grad.fill_(world.rank)

    reducer.allreduce_grads()

    mean_rank = (world.size - 1) / 2
    assert all(torch.allclose(p.grad, torch.full_like(p, mean_rank)) for p in model.parameters())
    assert len(reducer.buckets) == (4 if bucket_mb < 1 else 1)


@pytest.mark.mpi(min_size=2)
def test_agree_raises_everywhere_when_one_rank_fails(world):
    def setup():
        if world.rank == world.size - 1:
            raise UsageError("file missing here")
        return "ok"

    with pytest.raises(UsageError, match=f"rank {world.size - 1}: file missing here"):
        agree(world, setup)


@pytest.mark.mpi(min_size=2)
def test_allreduce_api_averages_floats(world):
    assert distml.allreduce(float(world.rank)) == pytest.approx((world.size - 1) / 2)
    assert distml.allreduce(1.0, op="sum") == world.size


@pytest.mark.mpi(min_size=2)
def test_agree_turns_a_crash_on_one_rank_into_rank_failure_everywhere(world):
    def setup():
        if world.rank == 1:
            raise ValueError("bad model")

    with pytest.raises(RankFailure, match="rank 1: ValueError: bad model"):
        agree(world, setup)


@pytest.mark.mpi(min_size=2)
def test_agree_passes_on_an_exit_made_by_every_rank_and_not_one_made_by_one(world):
    with pytest.raises(SystemExit) as exited:  # --help / --version: every rank exits alike
        agree(world, lambda: sys.exit(0))
    assert exited.value.code == 0

    def one_exits():
        if world.rank == 1:
            sys.exit(3)

    with pytest.raises(RankFailure, match="rank 1: SystemExit: 3"):
        agree(world, one_exits)


@pytest.mark.mpi(min_size=2)
def test_check_same_names_the_rank_that_differs(world):
    check_same(world, "config", "same")

    with pytest.raises(UsageError, match=f"rank {world.size - 1} differs"):
        check_same(world, "config", "odd" if world.rank == world.size - 1 else "same")


@pytest.mark.mpi(min_size=2)
def test_distributed_optimizer_averages_a_parameter_outside_the_model(world):
    # a learned temperature, say: given to the optimizer but not part of `model`
    model, temperature = nn.Linear(2, 1), nn.Parameter(torch.zeros(3))
    distml.broadcast_parameters(model)
    opt = distml.DistributedOptimizer(torch.optim.SGD([*model.parameters(), temperature], lr=1.0), model)

    opt.zero_grad()
    (model(torch.ones(1, 2)).sum() + (world.rank + 1) * temperature.sum()).backward()
    opt.step()

    mean_grad = (world.size + 1) / 2
    assert temperature.tolist() == [-mean_grad] * 3
    replicas = world.allgather_object(temperature.tolist() + model.weight.flatten().tolist())
    assert all(r == replicas[0] for r in replicas)
