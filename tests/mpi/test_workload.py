"""A user's own workload (Dataset, loss, sequence model) trains as one process would, inside one job.

Each test trains with the trainer on the world and, beside it, on this rank alone
(MPI_COMM_SELF) with the global batch, and compares the weights: sync N x b == 1 x N*b
with an uneven last batch; accumulation; clipping of the reduced gradient; loading
workers changing nothing at all.
"""
from pathlib import Path

import pytest
import torch
from mpi4py import MPI

from distml import comm
from distml.config import Config
from distml.trainer import run

DATA = Path(__file__).parent / "workload_data.py"
WAVES = dict(dataset=f"{DATA}:make", model=f"{DATA}:net", loss=f"{DATA}:loss", quiet=True, seed=2,
             watchdog=0)


def _train(communicator, **settings):
    cfg = Config(**{**WAVES, **settings})
    return run(cfg, communicator).model.state_dict()


def _alone(**settings):
    return _train(comm.Comm(MPI.COMM_SELF), **settings)


def _max_diff(a, b):
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def _same_on_every_rank(state):
    checksums = comm.world().allgather_object([v.double().sum().item() for v in state.values()])
    assert all(c == checksums[0] for c in checksums)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_user_dataset_loss_and_sequence_model_on_n_ranks_equal_one_rank_with_n_times_the_batch(optimizer):
    size = comm.world().size
    settings = dict(epochs=2, optimizer=optimizer, lr=0.05 if optimizer == "sgd" else 0.01, weight_decay=0.01)

    world = _train(comm.world(), batch_size=7, **settings)  # 103 = 7 x 2 x 7 + 5, = 7 x 3 x 4 + 19
    alone = _alone(batch_size=7 * size, **settings)

    assert _max_diff(world, alone) <= 1e-5
    assert _max_diff(world, _alone(batch_size=7, **settings)) > 1e-3  # the batch size matters: not vacuous
    _same_on_every_rank(world)


@pytest.mark.mpi(min_size=2)
def test_accumulate_two_micro_batches_of_8_equals_one_rank_at_the_whole_global_batch():
    size = comm.world().size
    world = _train(comm.world(), epochs=2, batch_size=8, accumulate=2, lr=0.05)
    alone = _alone(epochs=2, batch_size=16 * size, lr=0.05)  # 2 ranks: 32

    assert _max_diff(world, alone) <= 1e-5


@pytest.mark.mpi(min_size=2)
def test_clip_norm_clips_the_reduced_gradient_as_one_process_and_changes_the_result():
    size = comm.world().size
    settings = dict(epochs=2, lr=0.5, momentum=0.0, clip_norm=0.05)
    world = _train(comm.world(), batch_size=5, **settings)
    alone = _alone(batch_size=5 * size, **settings)
    unclipped = _alone(batch_size=5 * size, **{**settings, "clip_norm": 0.0})

    assert _max_diff(world, alone) <= 1e-5
    assert _max_diff(alone, unclipped) > 1e-2


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("mode", ["sync", "federated"])
def test_two_loading_workers_give_bit_identical_weights_to_none(mode):
    settings = dict(mode=mode, epochs=2, rounds=2, batch_size=6, clients=5, local_steps=3, lr=0.05)
    without = _train(comm.world(), data_workers=0, **settings)
    workers = _train(comm.world(), data_workers=2, **settings)

    assert all(torch.equal(without[k], workers[k]) for k in without)


@pytest.mark.mpi(min_size=2)
def test_federated_natural_partition_is_independent_of_the_rank_count():
    settings = dict(dataset=f"{DATA}:labelled", model="mlp", hidden="8", loss=None, mode="federated",
                    partition="natural", rounds=3, local_epochs=2, batch_size=4, lr=0.1)
    world = _train(comm.world(), **settings)
    alone = _alone(**settings)

    assert _max_diff(world, alone) <= 1e-5
