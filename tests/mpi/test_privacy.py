"""Private training does not depend on the rank count, inside one job: DP-SGD and DP-FedAvg with
noise on the world equal one process (MPI_COMM_SELF) with the same seed, and secure aggregation
ends where plain FedAvg does, with clients dropping after masking."""
import numpy as np
import pytest
import torch
from mpi4py import MPI
from scipy import stats

from distml import comm, secagg
from distml.config import Config
from distml.data import load_dataset
from distml.models import build_model
from distml.strategies.federated import FederatedStrategy
from distml.trainer import run

DIGITS = dict(dataset="digits", hidden="16", quiet=True, watchdog=0, seed=3)


def _train(communicator, **settings):
    return run(Config(**{**DIGITS, **settings}), communicator).model.state_dict()


def _max_diff(a, b):
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.mark.mpi(min_size=2)
def test_dp_sgd_with_noise_on_n_ranks_equals_one_rank_with_the_same_expected_batch():
    size = comm.world().size
    settings = dict(epochs=1, dp_clip=0.5, dp_noise=1.1, lr=0.2)

    world = _train(comm.world(), batch_size=24, **settings)
    alone = _train(comm.Comm(MPI.COMM_SELF), batch_size=24 * size, **settings)

    assert _max_diff(world, alone) <= 1e-5
    quiet = _train(comm.Comm(MPI.COMM_SELF), batch_size=24 * size, **{**settings, "dp_noise": 0.0})
    assert _max_diff(world, quiet) > 1e-3  # the noise is there: not vacuous


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("adaptive", [None, 0.5])
def test_dp_fedavg_with_noise_is_independent_of_the_rank_count(adaptive):
    settings = dict(mode="federated", clients=12, clients_per_round=6, rounds=3, local_steps=2, batch_size=16,
                    lr=0.1, dp_clip=0.3, dp_noise=0.5, dp_adaptive_clip=adaptive, dropout=0.2)

    world = _train(comm.world(), **settings)
    alone = _train(comm.Comm(MPI.COMM_SELF), **settings)

    assert _max_diff(world, alone) <= 1e-5
    quiet = _train(comm.Comm(MPI.COMM_SELF), **{**settings, "dp_noise": 0.0})
    assert _max_diff(world, quiet) > 1e-3  # the noise is there: not vacuous


def _federated(communicator, **settings):
    cfg = Config(**{**DIGITS, "mode": "federated", **settings}).validate(writes_outputs=False)
    dataset = load_dataset(cfg)
    strategy = FederatedStrategy(cfg, dataset, build_model(cfg.model, dataset, cfg.hidden_sizes(), cfg.seed),
                                 communicator)
    strategy.setup()
    return strategy


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("dropout,dp", [(0.0, {}), (0.15, {}),  # 0.15: 4 clients drop in 3 rounds, all recoverable
                                        (0.0, {"dp_clip": 0.5, "dp_noise": 0.8})])  # noise inside the masked sum
def test_secure_aggregation_on_the_world_ends_where_plain_fedavg_ends(dropout, dp):
    settings = dict(clients=9, clients_per_round=8, local_steps=2, batch_size=16, lr=0.1, dropout=dropout,
                    secagg_neighbors=6, **dp)
    secure = _federated(comm.world(), secure_aggregation=True, **settings)
    plain = _federated(comm.Comm(MPI.COMM_SELF), **settings)

    dropped = 0
    for round_ in range(3):
        record = secure.train_round(round_)
        plain.train_round(round_)
        dropped += record["clients_dropped"]
        assert "round_failed" not in record
        part = secure.masked_part  # what this rank put into the round's Allreduce
        if secure.contributions:  # (a rank whose clients all dropped sends zeros)
            top_bits = (part >> np.uint64(60)).astype(np.int64)
            assert stats.chisquare(np.bincount(top_bits, minlength=16)).pvalue > 1e-4  # uniform to the others
            clients_sum = secagg.encode(sum(secure.contributions.values()), 9 + 1)
            assert (part != clients_sum).mean() > 0.99

    assert (secure.global_params - plain.global_params).abs().max().item() <= 1e-5
    assert (dropout > 0) == (dropped > 0)


@pytest.mark.mpi(min_size=2)
def test_too_few_surviving_neighbours_skip_the_round_with_no_update():
    secure = _federated(comm.world(), secure_aggregation=True, clients=9, clients_per_round=8, dropout=0.25,
                        secagg_neighbors=6, local_steps=1, batch_size=16)

    failed = 0
    for round_ in range(3):
        before = secure.global_params.clone()
        record = secure.train_round(round_)
        if "round_failed" in record:
            failed += 1
            assert "the threshold is" in record["round_failed"] or "could rebuild" in record["round_failed"] \
                or "would learn" in record["round_failed"]
            assert torch.equal(secure.global_params, before)
        else:
            assert not torch.equal(secure.global_params, before)
    assert failed >= 1
