"""Federated mode on the size-1 world (no mpirun): pieces, server optimizers, equivalences."""
import numpy as np
import pytest
import torch
from torch import nn

from distml import comm
from distml.config import Config
from distml.data import load_dataset
from distml.models import build_model
from distml.partition import partition
from distml.strategies.federated import FederatedStrategy, assign_clients, client_batches, sample_clients
from distml.strategies.server_opt import ServerOptimizer
from distml.trainer import run


def _strategy(**settings):
    torch.set_num_threads(1)  # tiny models: a second thread only adds waiting on a busy machine
    cfg = Config(mode="federated", hidden="16", quiet=True, threads=1, **settings).validate(writes_outputs=False)
    dataset = load_dataset(cfg)
    model = build_model(cfg.model, dataset, cfg.hidden_sizes(), cfg.seed)
    strategy = FederatedStrategy(cfg, dataset, model, comm.world())
    strategy.setup()
    return strategy


@pytest.mark.parametrize("ranks", [1, 2, 3, 4, 7])
def test_clients_are_spread_over_ranks_evenly(ranks):
    sizes = [72] * 17 + [71] * 3 + [30, 200]

    owner = assign_clients(sizes, ranks)

    loads = [sum(s for s, o in zip(sizes, owner) if o == r) for r in range(ranks)]
    assert sorted(set(owner)) == list(range(ranks))
    assert max(loads) - min(loads) <= 72  # greedy, largest first: within one ordinary client
    assert assign_clients(sizes, ranks) == owner  # the same on every rank


def test_each_round_deals_its_stateless_clients_evenly_over_ranks():
    strategy = _strategy(clients=10)
    strategy.comm = type("FourRanks", (), {"size": 4, "rank": 0})()

    trainers = strategy._trainers(list(range(10)))

    assert sorted(trainers) == list(range(10))
    assert sorted(list(trainers.values()).count(r) for r in range(4)) == [2, 2, 3, 3]


def test_sampling_and_dropout_are_seeded_and_independent_of_ranks():
    a = sample_clients(3, 7, 20, 10, dropout=0.3)
    b = sample_clients(3, 7, 20, 10, dropout=0.3)

    assert a == b
    sampled, survivors = a
    assert len(sampled) == 10 and len(set(sampled)) == 10 and sampled == sorted(sampled)
    assert set(survivors) <= set(sampled)
    assert sample_clients(3, 8, 20, 10)[0] != sampled  # another round, another sample
    drops = [len(s) - len(v) for s, v in (sample_clients(0, r, 20, 10, 0.3) for r in range(200))]
    assert 0.25 < np.mean(drops) / 10 < 0.35


@pytest.mark.parametrize("n,batch,epochs,steps,expected", [
    (10, 4, 1, 0, [4, 4, 2]), (10, 4, 2, 0, [4, 4, 2] * 2), (10, 0, 1, 0, [10]),
    (10, 4, 1, 5, [4, 4, 2, 4, 4]), (3, 16, 1, 2, [3, 3])])
def test_client_batches_cover_epochs_or_count_steps(n, batch, epochs, steps, expected):
    batches = client_batches(n, batch, seed=0, round_=2, client=5, epochs=epochs, steps=steps)

    assert [len(b) for b in batches] == expected
    if not steps:
        for e in range(epochs):  # each epoch is a permutation of the client's samples
            per_epoch = len(batches) // epochs
            assert sorted(np.concatenate(batches[e * per_epoch:(e + 1) * per_epoch])) == list(range(n))


def test_local_training_never_writes_into_the_global_model():
    strategy = _strategy(clients=4, rounds=1, momentum=0.9)
    before = strategy.global_params.clone()

    strategy._train_client(0, round_=0)

    assert torch.equal(strategy.global_params, before)
    assert not torch.equal(strategy.flat.data, before)  # the local model did move
    assert strategy.global_params.data_ptr() != strategy.flat.data.data_ptr()
    for p in strategy.model.parameters():  # parameters are views of the local vector only
        assert not (strategy.global_params.data_ptr() <= p.data_ptr()
                    < strategy.global_params.data_ptr() + strategy.global_params.numel() * 4)


def test_a_round_without_survivors_keeps_the_model():
    strategy = _strategy(clients=2, rounds=1, dropout=0.999)
    before = strategy.global_params.clone()

    record = strategy.train_round(0)

    assert record["clients_participating"] == 0 and record["clients_dropped"] == 2
    assert record["bytes_up"] == 0 and record["bytes_down"] > 0
    assert torch.equal(strategy.global_params, before)


def test_scaffold_doubles_the_bytes_each_way():
    plain, scaffold = _strategy(clients=4, momentum=0), _strategy(clients=4, algorithm="scaffold", momentum=0)

    a, b = plain.train_round(0), scaffold.train_round(0)

    assert b["bytes_up"] == 2 * a["bytes_up"] and b["bytes_down"] == 2 * a["bytes_down"]
    assert a["bytes_up"] == 4 * sum(p.numel() for p in plain.model.parameters()) * 4


def test_fedavg_one_local_step_equals_minibatch_sgd_on_the_union_of_client_batches():
    # 5 clients of uneven size (dirichlet), every client every round, plain SGD, server lr 1.
    # Batch 256 is more than some clients hold: their weight is their size, the others' 256.
    settings = dict(clients=5, partition="dirichlet", alpha=0.5, local_steps=1, batch_size=256,
                    momentum=0.0, lr=0.1, rounds=4, seed=3)
    strategy = _strategy(**settings)
    cfg, data = strategy.cfg, strategy.dataset
    reference = build_model(cfg.model, data, cfg.hidden_sizes(), cfg.seed)
    optimizer = torch.optim.SGD(reference.parameters(), lr=cfg.lr)
    parts = partition(data.y_train, 5, "dirichlet", alpha=0.5, seed=3)

    assert min(len(p) for p in parts) < 256 < max(len(p) for p in parts)  # uneven weights
    for round_ in range(cfg.rounds):
        strategy.train_round(round_)
        union = np.concatenate([parts[c][client_batches(len(parts[c]), 256, seed=3, round_=round_, client=c,
                                                       steps=1)[0]] for c in range(5)])
        optimizer.zero_grad()
        x, y = torch.from_numpy(data.X_train[union]), torch.from_numpy(data.y_train[union])
        nn.functional.cross_entropy(reference(x), y).backward()
        optimizer.step()

    strategy.load_global()
    for mine, theirs in zip(strategy.model.parameters(), reference.parameters()):
        assert (mine - theirs).abs().max().item() <= 1e-5


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@torch.no_grad()
def _set_flat(model, vector):
    """Copy (not view: vector_to_parameters would make the parameters views of `vector`)."""
    offset = 0
    for p in model.parameters():
        p.copy_(vector[offset:offset + p.numel()].view_as(p))
        offset += p.numel()


def _gradient(model, data, indices, at):
    """The mean-loss gradient at weights `at`, flat."""
    _set_flat(model, at)
    model.zero_grad()
    x, y = torch.from_numpy(data.X_train[indices]), torch.from_numpy(data.y_train[indices])
    nn.functional.cross_entropy(model(x), y).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def test_fedprox_client_follows_the_proximal_gradient():
    strategy = _strategy(clients=3, algorithm="fedprox", prox_mu=0.5, momentum=0, lr=0.05, batch_size=16,
                         local_epochs=2)
    data, x = strategy.dataset, strategy.global_params.clone()
    reference = build_model("mlp", data, (16,), 0)
    own = strategy.parts[1]

    strategy._train_client(1, round_=2)

    w = x.clone()
    for positions in client_batches(len(own), 16, seed=0, round_=2, client=1, epochs=2):
        w -= 0.05 * (_gradient(reference, data, own[positions], w) + 0.5 * (w - x))
    assert (strategy.flat.data - w).abs().max().item() <= 1e-5
    assert (w - x).abs().max().item() > 1e-3  # it moved


def test_scaffold_matches_a_reference_loop_over_two_rounds():
    # 3 clients, all every round, 3 local steps of plain SGD, server lr 1 (Karimireddy et al., option II).
    strategy = _strategy(clients=3, algorithm="scaffold", momentum=0, lr=0.05, batch_size=16, local_steps=3)
    data, parts = strategy.dataset, strategy.parts
    reference = build_model("mlp", data, (16,), 0)
    x, c = strategy.global_params.clone(), torch.zeros_like(strategy.global_params)
    c_i = [torch.zeros_like(c) for _ in parts]

    for round_ in range(2):
        strategy.train_round(round_)
        update, weight, control = torch.zeros_like(x), 0, torch.zeros_like(x)
        for i, own in enumerate(parts):
            y = x.clone()
            batches = client_batches(len(own), 16, seed=0, round_=round_, client=i, steps=3)
            for positions in batches:
                y -= 0.05 * (_gradient(reference, data, own[positions], y) - c_i[i] + c)
            new_c_i = c_i[i] - c + (x - y) / (3 * 0.05)
            control += new_c_i - c_i[i]
            c_i[i] = new_c_i
            trained = sum(len(b) for b in batches)
            update, weight = update + trained * (y - x), weight + trained
        x, c = x + update / weight, c + control / len(parts)

    assert (strategy.global_params - x).abs().max().item() <= 1e-5
    assert (strategy.control - c).abs().max().item() <= 1e-4
    assert all((strategy.client_control[i] - c_i[i]).abs().max().item() <= 1e-4 for i in range(3))
    assert c.abs().max().item() > 1e-3  # the control variates are not trivially zero


def test_fedavg_reaches_90_percent_on_iid_digits():
    result = run(Config(mode="federated", clients=20, clients_per_round=10, rounds=40, local_epochs=5,
                        batch_size=16, lr=0.05, momentum=0.0, eval_every=40, threads=1, quiet=True))

    assert result.summary["test_accuracy"] >= 0.9
    assert result.summary["rounds"] == 40
    assert 0 <= result.summary["client_acc_min"] <= result.summary["client_acc_p10"] \
        <= result.summary["client_acc_mean"] <= 1


@pytest.mark.parametrize("target,expect", [(0.5, True), (1.0, False)])
def test_rounds_to_target_is_the_first_round_at_or_above_it(target, expect):
    result = run(Config(mode="federated", clients=4, rounds=6, local_epochs=5, lr=0.1, momentum=0.0,
                        target_accuracy=target, threads=1, quiet=True))

    s = result.summary
    if expect:
        first = next(r["round"] for r in result.history if r["test_accuracy"] >= target)
        assert s["rounds_to_target"] == first
        assert s["bytes_to_target"] == sum(r["bytes_up"] + r["bytes_down"] for r in result.history[:first])
    else:
        assert s["rounds_to_target"] is None and s["bytes_to_target"] is None


def _delta(*values):
    return torch.tensor(values, dtype=torch.float32)


def test_server_avg_with_lr_one_adds_the_average_update():
    x = _delta(1.0, 2.0)

    ServerOptimizer("avg", 1.0, 0.9, x).step(x, _delta(0.5, -1.0))

    assert torch.equal(x, _delta(1.5, 1.0))


def test_server_avgm_accumulates_momentum():
    x, opt = _delta(0.0), None
    opt = ServerOptimizer("avgm", 0.5, 0.9, x)

    opt.step(x, _delta(1.0))
    opt.step(x, _delta(1.0))

    assert x.item() == pytest.approx(0.5 * 1.0 + 0.5 * 1.9)


@pytest.mark.parametrize("kind", ["adam", "yogi", "adagrad"])
def test_adaptive_server_optimizers_follow_reddi_et_al(kind):
    lr, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    x = _delta(0.0, 0.0)
    opt = ServerOptimizer(kind, lr, b1, x)
    m, v, expected = np.zeros(2), np.full(2, tau ** 2), np.zeros(2)

    for d in ([0.5, -0.2], [0.1, 0.3], [-0.4, 0.2]):
        opt.step(x, _delta(*d))
        d = np.array(d)
        m = b1 * m + (1 - b1) * d
        if kind == "adam":
            v = b2 * v + (1 - b2) * d * d
        elif kind == "yogi":
            v = v - (1 - b2) * d * d * np.sign(v - d * d)
        else:
            v = v + d * d
        expected = expected + lr * m / (np.sqrt(v) + tau)

    assert np.allclose(x.numpy(), expected, atol=1e-6)
