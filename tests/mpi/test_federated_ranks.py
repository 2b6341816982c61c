"""Federated rounds on the world equal the same rounds on one process, inside one job."""
import pytest
from mpi4py import MPI

from distml import comm
from distml.config import Config
from distml.data import load_dataset
from distml.models import build_model
from distml.strategies.federated import FederatedStrategy


def _strategy(communicator, **settings):
    cfg = Config(mode="federated", hidden="16", quiet=True, **settings).validate(writes_outputs=False)
    dataset = load_dataset(cfg)
    model = build_model(cfg.model, dataset, cfg.hidden_sizes(), cfg.seed)
    strategy = FederatedStrategy(cfg, dataset, model, communicator)
    strategy.setup()
    return strategy


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("algorithm,server_opt,momentum", [
    ("fedavg", "avg", 0.9), ("scaffold", "adam", 0.0), ("fedprox", "yogi", 0.9)])
def test_rounds_on_the_world_equal_rounds_on_one_process(algorithm, server_opt, momentum):
    settings = dict(clients=7, clients_per_round=5, partition="dirichlet", alpha=0.3, dropout=0.2,
                    local_epochs=2, lr=0.05, algorithm=algorithm, server_opt=server_opt, seed=4,
                    momentum=momentum)
    world = _strategy(comm.world(), **settings)
    alone = _strategy(comm.Comm(MPI.COMM_SELF), **settings)

    for round_ in range(3):
        mine, reference = world.train_round(round_), alone.train_round(round_)
        assert {k: v for k, v in mine.items() if k != "train_loss"} == \
               {k: v for k, v in reference.items() if k != "train_loss"}
        assert mine["train_loss"] == pytest.approx(reference["train_loss"], rel=1e-5)

    assert (world.global_params - alone.global_params).abs().max().item() <= 1e-5
    everyone = comm.world().allgather_object(world.global_params.sum().item())
    assert len(set(everyone)) == 1  # every rank applied the same update to the same model
