"""Your own loop at 2 and 3 ranks: the ShardSampler loop equals one process, the stop flag is agreed at
one step, and mismatched collectives raise on every rank naming each rank's call."""
import pytest
import torch
from torch import nn

import distml
from distml import comm as _comm
from distml.matching import CollectiveMismatch


def _data(n=103):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(n, 6, generator=gen)
    return torch.utils.data.TensorDataset(x, torch.randint(0, 3, (n,), generator=gen))


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def _train(comm, data, epochs=3):
    """The documented loop on `comm` with a global batch of 12 (103 samples: the last batch has 7)."""
    model = _model()
    sampler = distml.ShardSampler(data, global_batch=12, seed=1, comm=comm)
    loader = torch.utils.data.DataLoader(data, batch_sampler=sampler)
    opt = distml.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model,
                                      op="sum", comm=comm)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * len(sampler))
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for x, y in loader:
            opt.zero_grad()
            (nn.functional.cross_entropy(model(x), y, reduction="sum") / sampler.global_size).backward()
            opt.step()
            sched.step()
    return model


@pytest.mark.mpi(min_size=2)
def test_a_shard_sampler_loop_gives_one_process_weights_with_an_uneven_last_batch():
    from mpi4py import MPI
    data = _data()
    world = _train(None, data)
    alone = _train(_comm.Comm(MPI.COMM_SELF), data)
    control = _model()  # one step's worth of difference would show: the test is not vacuous

    diffs = [(a - b).abs().max().item() for a, b in zip(world.parameters(), alone.parameters())]
    assert max(diffs) < 1e-5
    assert max((a - b).abs().max().item() for a, b in zip(world.parameters(), control.parameters())) > 1e-2


@pytest.mark.mpi(min_size=2)
def test_a_signal_on_the_last_rank_stops_every_rank_after_the_same_step(loop_stop):
    model = _model()
    opt = distml.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    seen = []
    for step in range(4):
        if step == 1 and distml.rank() == distml.size() - 1:
            loop_stop.flag.requested = "SIGUSR1"  # as its handler does
        opt.zero_grad()
        model(torch.randn(2, 6)).sum().backward()
        opt.step()
        seen.append(distml.stop_requested())
    assert seen == [False, True, True, True]


@pytest.mark.mpi(min_size=2)
def test_ranks_in_different_calls_of_the_loop_all_raise_naming_each_call():
    with pytest.raises(CollectiveMismatch) as error:
        if distml.rank() == 0:
            distml.allreduce(torch.zeros(1000))
        else:
            distml.barrier()
    message = str(error.value)
    assert "rank 0: distml.allreduce(op=average, float64 [1000])" in message
    assert all(f"rank {r}: distml.barrier()" in message for r in range(1, distml.size()))
    assert distml.allreduce(1.0, op="sum") == distml.size()  # the communicator is still in step


@pytest.mark.mpi(min_size=2)
def test_optimizers_of_different_models_are_refused_when_made():
    model = nn.Linear(6, 3 + distml.rank())
    with pytest.raises(CollectiveMismatch, match="rank 0: DistributedOptimizer.2 tensors in buckets "
                                                 r"\[\('float32', 22\)\]"):
        distml.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
