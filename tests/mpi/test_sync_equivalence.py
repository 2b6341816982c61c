"""Sync data parallelism equals single-process training, checked inside one job.

Every rank trains its shard with DistributedOptimizer and, beside it, a local
reference model on the whole global batch; the two must agree at every world
size, including the last, uneven global batch.
"""
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import distml
from distml.sharding import shard_batches


def _data(n=103, features=6, classes=3):
    gen = torch.Generator().manual_seed(7)
    return torch.randn(n, features, generator=gen), torch.randint(0, classes, (n,), generator=gen)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def _optimizer(name, params):
    if name == "adam":
        return torch.optim.Adam(params, lr=0.01)
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("optimizer, reducer", [
    ("sgd", {"bucket_mb": 1e-3}),                      # a bucket per parameter
    ("adam", {"bucket_mb": 1e-3}),
    ("sgd", {"chunk_mb": 1e-4}),                       # one bucket, reduced in 26-element pieces
    ("sgd", {"chunk_mb": 25.0}),                       # one bucket, one piece
    ("sgd", {"bucket_mb": 1e-3, "overlap": True}),     # reductions started from backward
    ("adam", {"chunk_mb": 1e-4, "overlap": True}),
])
def test_sync_ranks_equal_one_process_on_global_batches_uneven(optimizer, reducer):
    X, y = _data()
    size, batch = distml.size(), 8  # 103 samples: last global batch is partial
    model, reference = _model(), _model()
    opt = distml.DistributedOptimizer(_optimizer(optimizer, model.parameters()), model, op="sum", **reducer)
    ref_opt = _optimizer(optimizer, reference.parameters())
    loss_fn = nn.CrossEntropyLoss(reduction="sum")

    for epoch in range(3):
        mine = shard_batches(len(y), batch, epoch=epoch, seed=1)
        union = shard_batches(len(y), batch * size, epoch=epoch, seed=1, rank=0, size=1)
        for local, whole in zip(mine, union, strict=True):
            opt.zero_grad()
            if len(local.indices):
                (loss_fn(model(X[local.indices]), y[local.indices]) / local.global_size).backward()
            opt.step()
            ref_opt.zero_grad()
            (loss_fn(reference(X[whole.indices]), y[whole.indices]) / len(whole.indices)).backward()
            ref_opt.step()

    for p, q in zip(model.parameters(), reference.parameters()):
        assert (p - q).abs().max().item() <= 1e-5
    checksums = distml.init().allgather_object(
        [float(np.float64(p.detach().double().sum())) for p in model.parameters()])
    assert all(c == checksums[0] for c in checksums)  # bitwise-identical replicas


@pytest.mark.mpi(min_size=2)
def test_trainer_leaves_identical_weights_on_every_rank():
    result = distml.train(epochs=2, batch_size=25, quiet=True, hidden="16")
    checksum = sum(t.double().sum().item() for t in result.model.state_dict().values())

    assert len(set(distml.init().allgather_object(checksum))) == 1
    assert result.summary["world_size"] == distml.size()
    assert result.summary["bytes_communicated"] > 0


@pytest.mark.mpi(min_size=2)
def test_trainer_leaves_identical_batchnorm_statistics_on_every_rank():
    spec = f"{Path(__file__).with_name('bn_model.py')}:make"

    result = distml.train(model=spec, epochs=1, batch_size=32, quiet=True)

    bn = result.model[2]
    assert bn.num_batches_tracked.item() > 0 and bn.running_mean.abs().sum().item() > 0
    checksums = [float(b.double().sum()) for b in result.model.buffers()]
    assert len(set(map(tuple, distml.init().allgather_object(checksums)))) == 1


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("chunk_mb", [1e-4, 4.0])
def test_average_in_pieces_equals_one_process_on_equal_batches(chunk_mb):
    X, y = _data(n=48 * distml.size())
    model, reference = _model(), _model()
    opt = distml.DistributedOptimizer(_optimizer("sgd", model.parameters()), model, chunk_mb=chunk_mb)
    ref_opt = _optimizer("sgd", reference.parameters())
    rank, size = distml.rank(), distml.size()

    for step in range(6):  # 6 global batches of 8 per rank
        rows = torch.arange(step * 8 * size, (step + 1) * 8 * size)
        opt.zero_grad()
        nn.functional.cross_entropy(model(X[rows[rank * 8:(rank + 1) * 8]]), y[rows[rank * 8:(rank + 1) * 8]]).backward()
        opt.step()
        ref_opt.zero_grad()
        nn.functional.cross_entropy(reference(X[rows]), y[rows]).backward()
        ref_opt.step()

    assert all((p - q).abs().max().item() <= 1e-5 for p, q in zip(model.parameters(), reference.parameters()))


def _equal_shards(step, size, rank, per_rank=8):
    rows = torch.arange(step * per_rank * size, (step + 1) * per_rank * size)
    return rows[rank * per_rank:(rank + 1) * per_rank], rows


@pytest.mark.mpi(min_size=2)
def test_clipping_between_synchronize_and_step_equals_one_process_and_step_reduces_nothing_more():
    X, y = _data(n=48 * distml.size())
    model, reference = _model(), _model()
    opt = distml.DistributedOptimizer(_optimizer("sgd", model.parameters()), model)
    ref_opt = _optimizer("sgd", reference.parameters())
    world = distml.init()

    for step in range(6):
        mine, rows = _equal_shards(step, distml.size(), distml.rank())
        opt.zero_grad()
        nn.functional.cross_entropy(model(X[mine]), y[mine]).backward()
        opt.synchronize()
        norm = nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        sent = world.bytes_sent
        opt.step()
        assert world.bytes_sent == sent  # synchronize() did the reduction
        ref_opt.zero_grad()
        nn.functional.cross_entropy(reference(X[rows]), y[rows]).backward()
        ref_norm = nn.utils.clip_grad_norm_(reference.parameters(), 0.05)
        ref_opt.step()
        assert abs(norm.item() - ref_norm.item()) <= 1e-5 * ref_norm.item()

    assert ref_norm.item() > 0.05  # the clipping acted
    assert all((p - q).abs().max().item() <= 1e-5 for p, q in zip(model.parameters(), reference.parameters()))


def _lbfgs_pair(make_optimizer, size):
    """(model, distributed LBFGS, closure) on this rank's rows, and the same on all rows, float64."""
    X, y = _data(n=16 * size)
    mine, rows = _equal_shards(0, size, distml.rank() if size > 1 else 0, per_rank=16)
    pairs = []
    for opt_of, part in ((make_optimizer, mine), (lambda o, m: o, rows)):
        model = _model().double()
        opt = opt_of(torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=5), model)

        def closure(model=model, opt=opt, part=part):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(X[part].double()), y[part])
            loss.backward()
            return loss
        pairs.append((model, opt, closure))
    return pairs


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("api", ["distml", "horovod"])
def test_lbfgs_closure_steps_equal_one_process(api):
    import distml.horovod as hvd
    hvd.init()
    wrap = {"distml": lambda o, m: distml.DistributedOptimizer(o, m),
            "horovod": lambda o, m: hvd.DistributedOptimizer(o, named_parameters=m.named_parameters())}[api]
    (model, opt, closure), (reference, ref_opt, ref_closure) = _lbfgs_pair(wrap, distml.size())

    for _ in range(3):
        loss, ref_loss = opt.step(closure), ref_opt.step(ref_closure)
        assert abs(loss.item() - ref_loss.item()) <= 1e-10

    assert ref_opt.state[ref_opt._params[0]]["func_evals"] > 3  # several evaluations per step
    assert all((p - q).abs().max().item() <= 1e-9 for p, q in zip(model.parameters(), reference.parameters()))


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("overlap", [False, True])
def test_a_backward_after_synchronize_is_reduced_by_step(overlap):
    X, y = _data(n=16 * distml.size())
    model, reference = _model(), _model()
    opt = distml.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, overlap=overlap)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)

    for step in range(2):  # the first global batch, synchronize(), the second added, step()
        mine, rows = _equal_shards(step, distml.size(), distml.rank())
        nn.functional.cross_entropy(model(X[mine]), y[mine]).backward()
        if step == 0:
            opt.synchronize()
        nn.functional.cross_entropy(reference(X[rows]), y[rows]).backward()
    opt.step()
    ref_opt.step()

    assert all((p - q).abs().max().item() <= 1e-6 for p, q in zip(model.parameters(), reference.parameters()))


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("closure", [False, True])
def test_a_backward_after_synchronize_on_rank_0_only_is_reduced_on_every_rank(closure):
    # Prepare: every rank's first batch, synchronize(); then only rank 0 has data for a second backward
    X, y = _data(n=16 * distml.size())
    size, rank = distml.size(), distml.rank()
    model, reference = _model(), _model()
    opt = distml.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    mine, rows = _equal_shards(0, size, rank)
    nn.functional.cross_entropy(model(X[mine]), y[mine]).backward()
    opt.synchronize()
    extra, _ = _equal_shards(1, size, 0)

    def second():
        if rank == 0:
            nn.functional.cross_entropy(model(X[extra]), y[extra]).backward()
        return None

    # Execute: ranks disagree on whether their gradients changed; none may skip the Allreduce alone
    opt.step(second) if closure else (second(), opt.step())

    # Assert: the average of the first batch, plus rank 0's second gradient over the size
    nn.functional.cross_entropy(reference(X[rows]), y[rows]).backward()
    (nn.functional.cross_entropy(reference(X[extra]), y[extra]) / size).backward()
    torch.optim.SGD(reference.parameters(), lr=0.1).step()
    assert all((p - q).abs().max().item() <= 1e-6 for p, q in zip(model.parameters(), reference.parameters()))


@pytest.mark.mpi(min_size=2)
def test_a_closure_after_synchronize_that_only_returns_the_loss_reduces_nothing_more():
    X, y = _data(n=8 * distml.size())
    model, reference = _model(), _model()
    opt = distml.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, op="sum")
    mine, rows = _equal_shards(0, distml.size(), distml.rank())
    loss = nn.functional.cross_entropy(model(X[mine]), y[mine], reduction="sum") / len(rows)
    loss.backward()
    opt.synchronize()

    returned = opt.step(lambda: loss.item())  # a float is a loss too (torch's SGD takes it)
    ref_loss = nn.functional.cross_entropy(reference(X[rows]), y[rows])
    ref_loss.backward()
    torch.optim.SGD(reference.parameters(), lr=0.1).step()

    assert isinstance(returned, float) and abs(returned - ref_loss.item()) <= 1e-6
    assert all((p - q).abs().max().item() <= 1e-6 for p, q in zip(model.parameters(), reference.parameters()))


@pytest.mark.mpi(min_size=2)
def test_a_closure_returning_none_on_some_ranks_raises_on_every_rank():
    model = _model()
    opt = distml.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)

    with pytest.raises(ValueError, match="None on others"):
        opt.step(lambda: None if distml.rank() == 0 else torch.tensor(1.0))
    assert opt.step(lambda: None) is None  # None everywhere is fine


@pytest.mark.mpi(min_size=2)
def test_half_precision_reduction_costs_at_most_a_point_of_accuracy_on_digits():
    runs = {c: distml.train(epochs=10, batch_size=16, quiet=True, compression=c, lr_schedule="constant",
                            hidden="64").summary for c in ("none", "fp16", "bf16")}
    accuracy = {c: s["test_accuracy"] for c, s in runs.items()}

    assert accuracy["none"] > 0.9
    for half in ("fp16", "bf16"):  # the gradients really travelled in 16 bits
        assert runs[half]["bytes_communicated"] < 0.6 * runs["none"]["bytes_communicated"]
    assert abs(accuracy["fp16"] - accuracy["none"]) <= 0.01
    assert abs(accuracy["bf16"] - accuracy["none"]) <= 0.01


@pytest.mark.mpi(min_size=2)
def test_trainer_with_overlap_and_pieces_gives_the_weights_of_the_blocking_reducer():
    settings = dict(epochs=2, batch_size=20, quiet=True, hidden="32,16", bucket_mb=1e-3)
    blocking = distml.train(**settings).model
    overlapped = distml.train(**settings, overlap=True, chunk_mb=1e-3).model

    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(blocking.parameters(), overlapped.parameters()))


@pytest.mark.mpi(min_size=2)
def test_overlap_refuses_a_second_backward_before_the_step():
    model = _model()
    opt = distml.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, overlap=True)
    X, y = _data(n=8)
    nn.functional.cross_entropy(model(X), y).backward()
    with pytest.raises(RuntimeError, match="one backward"):
        nn.functional.cross_entropy(model(X), y).backward()
