"""The sharded optimizer (ZeRO stage 1) equals the full-replica optimizer on the global batch (WIP, issue 23)."""
import pytest
import torch
from torch import nn

from distml import comm
from distml.sharding import shard_batches
from distml.zero import ShardedOptimizer


def _data(n=103, features=6, classes=3):
    gen = torch.Generator().manual_seed(7)
    return torch.randn(n, features, generator=gen), torch.randint(0, classes, (n,), generator=gen)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def _optimizer(name, model):
    if name == "adamw":  # two groups: decay on weights only, as the trainer builds it
        return torch.optim.AdamW([{"params": [p for p in model.parameters() if p.dim() >= 2]},
                                  {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}],
                                 lr=0.01, weight_decay=0.1)
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=0.01)
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_sharded_step_equals_the_full_optimizer_on_the_global_batch_uneven(name):
    world = comm.world()
    X, y = _data()
    model, reference = _model(), _model()
    opt = ShardedOptimizer(_optimizer(name, model), world)
    ref_opt = _optimizer(name, reference)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")

    for epoch in range(3):
        mine = shard_batches(len(y), 8, epoch=epoch, seed=1, rank=world.rank, size=world.size)
        union = shard_batches(len(y), 8 * world.size, epoch=epoch, seed=1, rank=0, size=1)
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
    full = sum(t.numel() * t.element_size() for s in ref_opt.state.values() for t in s.values()
               if torch.is_tensor(t) and t.dim() > 0)
    if full:  # momentum or moments: each rank holds about 1/N of them
        assert opt.state_bytes() <= full / world.size * 1.05 + 64


def test_lbfgs_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="cannot be sharded"):
        ShardedOptimizer(torch.optim.LBFGS(_model().parameters()), comm.world())


@pytest.mark.mpi(min_size=2)
def test_sharded_state_dict_is_the_full_optimizers_and_loads_back():
    world = comm.world()
    X, y = _data()
    model, reference = _model(), _model()
    opt, ref_opt = ShardedOptimizer(_optimizer("adamw", model), world), _optimizer("adamw", reference)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    for step in range(3):
        part = torch.arange(step * 30, step * 30 + 30)
        mine = part.tensor_split(world.size)[world.rank]
        opt.zero_grad()
        (loss_fn(model(X[mine]), y[mine]) / len(part)).backward()
        opt.step()
        ref_opt.zero_grad()
        (loss_fn(reference(X[part]), y[part]) / len(part)).backward()
        ref_opt.step()

    saved, expected = opt.state_dict(), ref_opt.state_dict()

    assert saved["param_groups"] == expected["param_groups"]
    for index, state in expected["state"].items():
        for key, value in state.items():
            assert torch.allclose(saved["state"][index][key], value, atol=1e-6), (index, key)
    fresh_model = _model()
    fresh = ShardedOptimizer(_optimizer("adamw", fresh_model), world)
    fresh.load_state_dict(expected)  # a full, unsharded state into a sharded optimizer
    assert all(torch.equal(fresh.inner.state[f.shard]["exp_avg"], opt.inner.state[g.shard]["exp_avg"]) or
               torch.allclose(fresh.inner.state[f.shard]["exp_avg"], opt.inner.state[g.shard]["exp_avg"], atol=1e-6)
               for f, g in zip(fresh.groups, opt.groups))


@pytest.mark.mpi(min_size=2)
def test_clipping_uses_the_global_norm_of_the_reduced_gradient():
    world = comm.world()
    X, y = _data()
    model, reference = _model(), _model()
    opt, ref_opt = ShardedOptimizer(_optimizer("sgd", model), world), _optimizer("sgd", reference)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    part = torch.arange(0, 40)
    mine = part.tensor_split(world.size)[world.rank]
    opt.zero_grad()
    (loss_fn(model(X[mine]), y[mine]) / len(part)).backward()
    ref_opt.zero_grad()
    (loss_fn(reference(X[part]), y[part]) / len(part)).backward()

    opt.reduce_gradients()
    norm = opt.clip_grad_norm_(0.1)
    opt.step_and_gather()
    ref_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.1)
    ref_opt.step()

    assert norm == pytest.approx(float(ref_norm), rel=1e-5) and norm > 0.1
    for p, q in zip(model.parameters(), reference.parameters()):
        assert (p - q).abs().max().item() <= 1e-6


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("settings", [dict(optimizer="adamw", lr=0.01, weight_decay=0.1, clip_norm=0.5),
                                      dict(optimizer="sgd", lr=0.1, momentum=0.9, accumulate=2)])
def test_trainer_with_zero_1_equals_the_unsharded_run(settings):
    from distml.config import Config
    from distml.trainer import run
    common = dict(dataset="digits", hidden="16", epochs=2, batch_size=20, quiet=True, watchdog=0, seed=2, **settings)

    sharded = run(Config(zero=1, **common), comm.world())
    plain = run(Config(**common), comm.world())

    a, b = sharded.model.state_dict(), plain.model.state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    assert sharded.history[-1]["test_accuracy"] == pytest.approx(plain.history[-1]["test_accuracy"], abs=0.01)
