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


def _train(comm, data, epochs=3, unfreeze_at=None, extra_group_at=None):
    """The documented loop on `comm` with a global batch of 12 (103 samples: the last batch has 7).

    unfreeze_at: the first layer is frozen (weight decay would move it) until that many steps;
    extra_group_at: the last layer joins the optimizer (add_param_group) after that many steps.
    """
    model = _model()
    first, last = model[0], model[2]
    first.requires_grad_(unfreeze_at is None)
    params = [p for p in model.parameters() if extra_group_at is None or all(p is not q for q in last.parameters())]
    sampler = distml.ShardSampler(data, global_batch=12, seed=1, comm=comm)
    loader = torch.utils.data.DataLoader(data, batch_sampler=sampler)
    opt = distml.DistributedOptimizer(torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.01), model,
                                      op="sum", comm=comm)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * sampler.steps_per_epoch)
    steps = 0
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for x, y in loader:
            if steps == unfreeze_at:
                first.requires_grad_(True)
            if steps == extra_group_at:
                opt.add_param_group({"params": list(last.parameters()), "lr": 0.05})
            opt.zero_grad()
            (nn.functional.cross_entropy(model(x), y, reduction="sum") / sampler.global_size).backward()
            opt.step()
            sched.step()
            steps += 1
    return model


def _max_diff(a, b):
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.mpi(min_size=2)
def test_a_shard_sampler_loop_gives_one_process_weights_with_an_uneven_last_batch():
    from mpi4py import MPI
    data = _data()
    world = _train(None, data)
    alone = _train(_comm.Comm(MPI.COMM_SELF), data)
    control = _model()  # one step's worth of difference would show: the test is not vacuous

    assert _max_diff(world, alone) < 1e-5
    assert _max_diff(world, control) > 1e-2


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("n, options", [
    (27, {}),                      # 27 = 2 x 12 + 3: a last batch of one sample a rank at 3 ranks
    (103, {"unfreeze_at": 5}),     # frozen, then trained: the buckets are made anew at zero_grad()
    (103, {"extra_group_at": 4}),  # add_param_group on every rank
])
def test_loops_with_small_last_batches_unfrozen_layers_or_new_groups_give_one_process_weights(n, options):
    from mpi4py import MPI
    data = _data(n)
    world, alone = _train(None, data, **options), _train(_comm.Comm(MPI.COMM_SELF), data, **options)
    assert _max_diff(world, alone) < 1e-5
    assert _max_diff(world, _model()) > 1e-3
    if "unfreeze_at" in options:  # the frozen layer was left alone (torch skips it), then trained
        assert (world[0].weight - _model()[0].weight).abs().max().item() > 1e-3


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
