"""The sharded optimizer (ZeRO stages 1 and 2) equals the full-replica optimizer on the global batch."""
import pytest
import torch
from torch import nn

from distml import comm
from distml.optimizer import DistributedOptimizer
from distml.sharding import shard_batches
from distml.zero import ShardedOptimizer

TINY = dict(bucket_mb=0.0003, chunk_mb=0.0001)  # several buckets of ~78 floats, pieces of ~26: the cutting shows


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


def _max_diff(a, b):
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def _full_state_bytes(optimizer):
    return sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
               if torch.is_tensor(t) and t.dim() > 0)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("clip", [None, 0.3])
@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
@pytest.mark.parametrize("stage", [1, 2])
def test_sharded_steps_equal_the_full_optimizer_on_the_global_batch_uneven(stage, name, clip):
    world = comm.world()
    X, y = _data()
    model, reference = _model(), _model()
    opt = ShardedOptimizer(_optimizer(name, model), world, stage=stage, **TINY)
    ref_opt = _optimizer(name, reference)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    norms = []

    for epoch in range(3):  # 103 samples in global batches of 8N: the last one uneven over the ranks
        mine = shard_batches(len(y), 8, epoch=epoch, seed=1, rank=world.rank, size=world.size)
        union = shard_batches(len(y), 8 * world.size, epoch=epoch, seed=1, rank=0, size=1)
        for local, whole in zip(mine, union, strict=True):
            opt.zero_grad()
            if len(local.indices):
                (loss_fn(model(X[local.indices]), y[local.indices]) / local.global_size).backward()
            opt.reduce_gradients()
            if clip:
                norms.append((opt.clip_grad_norm_(clip), None))
            opt.step_and_gather()
            ref_opt.zero_grad()
            (loss_fn(reference(X[whole.indices]), y[whole.indices]) / len(whole.indices)).backward()
            if clip:
                norms[-1] = (norms[-1][0], float(torch.nn.utils.clip_grad_norm_(reference.parameters(), clip)))
            ref_opt.step()

    assert _max_diff(model, reference) <= 1e-5
    if clip:  # the global norm, and clipping did bind
        assert all(a == pytest.approx(b, rel=1e-5) for a, b in norms) and max(a for a, _ in norms) > clip
    full = _full_state_bytes(ref_opt)
    if full:  # momentum or moments: each rank holds 1/N of them (plus at most N-1 padding elements, a step count)
        padding = sum(f.padded - f.offsets[-1] for f in opt.groups) * 4 * (2 if name != "sgd" else 1)
        padding += 8 * len(opt.groups)
        assert full / world.size <= opt.state_bytes() <= full / world.size + padding


@pytest.mark.mpi(min_size=2)
def test_stage_2_frees_gradients_reduces_in_the_last_of_several_passes_and_tolerates_unused_parameters():
    world = comm.world()
    X, y = _data()
    torch.manual_seed(0)
    model, reference = (nn.ModuleDict({"unused": nn.Linear(4, 4), "used": nn.Linear(6, 3)}) for _ in range(2))
    reference.load_state_dict(model.state_dict())
    opt, ref_opt = (torch.optim.Adam([{"params": list(m[k].parameters())} for k in ("unused", "used")], lr=0.01)
                    for m in (model, reference))  # groups: the used one's bucket goes first
    opt = ShardedOptimizer(opt, world, stage=2, **TINY)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    for step in range(4):
        part = torch.arange(step * 24, step * 24 + 24)
        mine = part.tensor_split(world.size)[world.rank]
        micro = [m for m in mine.tensor_split(2 if world.rank == 0 else 1) if len(m)]  # ranks differ in passes
        opt.zero_grad()
        opt.passes = len(micro)
        for m in micro:
            (loss_fn(model["used"](X[m]), y[m]) / len(part)).backward()
        assert all(p.grad is None for p in model["used"].parameters())  # reduced and freed in backward
        opt.step()
        assert all(p.grad is None for p in model.parameters())
        ref_opt.zero_grad()
        (loss_fn(reference["used"](X[part]), y[part]) / len(part)).backward()
        ref_opt.step()

    assert _max_diff(model, reference) <= 1e-6
    numel = sum(p.numel() for p in model.parameters())
    assert opt.gradient_bytes() < numel * 4 / world.size + 4 * 80  # the slice and one tiny bucket, not the whole


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("stage", [1, 2])
def test_bf16_compression_reduces_as_the_unsharded_reducer_does(stage):
    world = comm.world()
    if world.size != 2:
        pytest.skip("with 3 ranks MPI may add the three half-precision terms in another order than Allreduce")
    X, y = _data()
    model, reference = _model(), _model()
    opt = ShardedOptimizer(_optimizer("adamw", model), world, stage=stage, compression="bf16", **TINY)
    ref_opt = DistributedOptimizer(_optimizer("adamw", reference), op="sum", compression="bf16", chunk_mb=0.0001)
    plain = _model()
    plain_opt = ShardedOptimizer(_optimizer("adamw", plain), world, stage=stage, **TINY)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    for step in range(4):
        part = torch.arange(step * 24, step * 24 + 24)
        mine = part.tensor_split(world.size)[world.rank]
        for o, m in ((opt, model), (ref_opt, reference), (plain_opt, plain)):
            o.zero_grad()
            (loss_fn(m(X[mine]), y[mine]) / len(part)).backward()
            o.step()

    assert _max_diff(model, reference) <= 1e-6
    assert _max_diff(model, plain) > 1e-5  # the compression did round


def test_optimizers_whose_update_is_not_elementwise_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="LBFGS cannot be sharded: its update needs the whole parameter vector"):
        ShardedOptimizer(torch.optim.LBFGS(_model().parameters()), comm.world())
    with pytest.raises(ValueError, match="Adafactor cannot be sharded: a slice steps as the whole only where"):
        ShardedOptimizer(torch.optim.Adafactor(_model().parameters()), comm.world())

    class MySGD(torch.optim.SGD):
        pass
    ShardedOptimizer(MySGD(_model().parameters(), lr=0.1), comm.world()).close()  # a subclass of an element-wise one


def test_two_live_sharded_optimizers_over_one_model_are_refused():
    model = _model()
    first = ShardedOptimizer(_optimizer("sgd", model), comm.world(), stage=2)
    with pytest.raises(ValueError, match="already sharded by another ShardedOptimizer that is alive"):
        ShardedOptimizer(_optimizer("sgd", model), comm.world())
    first.close()
    ShardedOptimizer(_optimizer("sgd", model), comm.world()).close()


@pytest.mark.parametrize("stage", [1, 2])
def test_a_backward_after_the_reduction_or_more_passes_than_declared_raise(stage):
    X, y = _data()
    model = _model()
    opt = ShardedOptimizer(_optimizer("sgd", model), comm.world(), stage=stage, **TINY)
    opt.zero_grad()
    nn.CrossEntropyLoss()(model(X), y).backward()
    if stage == 1:  # backward's gradients went straight into the flat buffer (no copy of a fresh .grad)
        assert all(p.grad.data_ptr() == v.data_ptr() for p, v in zip(model.parameters(), opt.groups[0].grads.views))
        opt.reduce_gradients()
    with pytest.raises(RuntimeError, match="gradients arrived after this step's reduction"):
        nn.CrossEntropyLoss()(model(X), y).backward()  # stage 2: a second pass where one was declared
    opt.close()


def test_state_the_wrapped_optimizer_had_and_parameters_without_state_load_into_the_slices():
    X, y = _data()
    torch.manual_seed(0)
    model = nn.ModuleDict({"a": nn.Linear(6, 3), "idle": nn.Linear(2, 2)})
    plain = torch.optim.Adam(model.parameters(), lr=0.01)
    nn.CrossEntropyLoss()(model["a"](X), y).backward()
    plain.step()  # "idle" has no state
    expected = {k: v.clone() for k, v in plain.state[model["a"].weight].items()}
    opt = ShardedOptimizer(plain, comm.world())  # wrapped after a step: its state goes into the slices
    saved = opt.state_dict()
    if comm.world().is_root:
        assert torch.equal(saved["state"][0]["exp_avg"], expected["exp_avg"])
        assert torch.equal(saved["state"][3]["exp_avg_sq"], torch.zeros(2))  # "idle": zeros, as never stepped
    opt.close()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("stage", [1, 2])
def test_sharded_state_dict_is_the_full_optimizers_and_loads_back(stage):
    world = comm.world()
    X, y = _data()
    model, reference = _model(), _model()
    opt, ref_opt = ShardedOptimizer(_optimizer("adamw", model), world, stage=stage), _optimizer("adamw", reference)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    for step in range(3):
        part = torch.arange(step * 30, step * 30 + 30)
        mine = part.tensor_split(world.size)[world.rank]
        for o, m, rows in ((opt, model, mine), (ref_opt, reference, part)):
            o.zero_grad()
            (loss_fn(m(X[rows]), y[rows]) / len(part)).backward()
            o.step()

    saved, expected = opt.state_dict(), ref_opt.state_dict()

    assert saved["param_groups"] == expected["param_groups"]
    if world.rank != 0:  # gathered on root only
        assert saved["state"] == {}
    else:
        assert saved["state"].keys() == expected["state"].keys()
        for index, state in expected["state"].items():
            for key, value in state.items():
                assert torch.allclose(saved["state"][index][key], value, atol=1e-6), (index, key)
    fresh_model = _model()
    fresh = ShardedOptimizer(_optimizer("adamw", fresh_model), world, stage=3 - stage)  # the other stage
    fresh.load_state_dict(expected)  # a full, unsharded state into a sharded optimizer
    for f, g in zip(fresh.groups, opt.groups):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(fresh.inner.state[f.shard][key], opt.inner.state[g.shard][key], atol=1e-6)


@pytest.mark.mpi(min_size=2)
def test_the_new_calls_are_named_in_the_call_record_the_hang_doctor_reads():
    world = comm.world()
    X, y = _data()
    model = _model()
    opt = ShardedOptimizer(_optimizer("sgd", model), world, stage=2, **TINY)
    world.calls.context = "step 1"
    opt.zero_grad()
    nn.CrossEntropyLoss()(model(X), y).backward()
    opt.step()
    calls = [(op, where) for _, op, _, where, _ in world.calls.recent if where.startswith("step 1")]
    # two buckets (W1: 96 floats; b1, W2, b2: 67), the later first, in pieces of at most 26 floats
    assert calls[0] == ("reduce_scatter", "step 1, the sharded optimizer's gradient slices (group 1, bucket 2 of 2, "
                                          "piece 1 of 3)")
    assert ("reduce_scatter", "step 1, the sharded optimizer's gradient slices (group 1, bucket 1 of 2, "
                              "piece 4 of 4)") in calls
    assert calls[-1] == ("allgather", "step 1, the sharded optimizer's parameters (group 1)")


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("stage", [1, 2])
def test_a_non_finite_gradient_is_seen_on_the_rank_that_made_it(stage):
    world = comm.world()
    X, y = _data()
    model = _model()
    opt = ShardedOptimizer(_optimizer("sgd", model), world, stage=stage, check_finite=True, **TINY)
    opt.zero_grad()
    out = model(X)
    if world.rank == 1:
        out = out * torch.tensor(float("nan"))
    nn.CrossEntropyLoss()(out, y).backward()
    opt.reduce_gradients()
    assert (opt.nonfinite is not None) == (world.rank == 1)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("stage", [1, 2])
def test_distributed_optimizer_with_zero_equals_the_unsharded_one_with_a_scheduler_and_clipping(stage):
    world = comm.world()
    X, y = _data()
    model, reference = _model(), _model()
    opt = DistributedOptimizer(_optimizer("adamw", model), zero=stage)
    ref_opt = DistributedOptimizer(_optimizer("adamw", reference))
    schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.3) for o in (opt, ref_opt)]
    loss_fn = nn.CrossEntropyLoss()
    for step in range(5):
        mine = torch.arange(step * 20, step * 20 + 20).tensor_split(world.size)[world.rank]
        for o, m in ((opt, model), (ref_opt, reference)):
            o.zero_grad()
            loss_fn(m(X[mine]), y[mine]).backward()
            o.synchronize()
            o.clip_grad_norm_(0.2)
            o.step()
        for s in schedulers:
            s.step()

    assert opt.param_groups[0]["lr"] == pytest.approx(0.01 * 0.3 ** 2)
    assert _max_diff(model, reference) <= 1e-6
    saved, expected = opt.state_dict(), ref_opt.state_dict()
    if world.is_root:
        assert torch.allclose(saved["state"][0]["exp_avg"], expected["state"][0]["exp_avg"], atol=1e-7)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("settings", [dict(zero=1, optimizer="adamw", lr=0.01, weight_decay=0.1, clip_norm=0.5),
                                      dict(zero=2, optimizer="adamw", lr=0.01, weight_decay=0.1, clip_norm=0.5),
                                      dict(zero=2, optimizer="sgd", lr=0.1, momentum=0.9, accumulate=2),
                                      dict(zero=1, optimizer="adam", lr=0.01, dp_clip=1.0, dp_noise=1.0)])
def test_trainer_with_zero_equals_the_unsharded_run(settings):
    from distml.config import Config
    from distml.trainer import run
    common = {**dict(dataset="digits", hidden="16", epochs=1, batch_size=20, quiet=True, watchdog=0, seed=2,
                     bucket_mb=0.001), **settings}  # 1210 parameters: buckets of ~262 (2 groups under adamw)
    zero = common.pop("zero")

    sharded = run(Config(zero=zero, **common), comm.world())
    plain = run(Config(**common), comm.world())

    a, b = sharded.model.state_dict(), plain.model.state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    assert sharded.history[-1]["test_accuracy"] == pytest.approx(plain.history[-1]["test_accuracy"], abs=0.01)
    assert sharded.summary["optimizer_state_bytes"] < plain.summary["optimizer_state_bytes"] / comm.world().size * 1.05


@pytest.mark.mpi(min_size=2)
def test_checkpointer_saves_a_sharded_optimizer_and_restores_it_at_the_other_stage():
    import distml
    world = comm.world()
    directory = world.bcast_object(__import__("tempfile").mkdtemp() if world.is_root else None)
    X, y = _data()
    model = _model()
    opt = DistributedOptimizer(_optimizer("adamw", model), zero=2)
    for step in range(3):
        mine = torch.arange(step * 20, step * 20 + 20).tensor_split(world.size)[world.rank]
        opt.zero_grad()
        nn.CrossEntropyLoss()(model(X[mine]), y[mine]).backward()
        opt.step()
    distml.Checkpointer(directory, model=model, optimizer=opt).save()
    before = opt.state_dict()

    fresh_model = _model()
    fresh = DistributedOptimizer(_optimizer("adamw", fresh_model), zero=1)
    distml.Checkpointer(directory, model=fresh_model, optimizer=fresh).restore()

    after = fresh.state_dict()
    assert _max_diff(model, fresh_model) == 0
    if world.is_root:
        assert all(torch.equal(before["state"][i][k], after["state"][i][k]) for i in before["state"]
                   for k in before["state"][i])
