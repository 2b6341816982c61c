"""Unit tests for `distml.sharding.shard_batches`: which samples each rank trains on.

Every rank is simulated in one process by passing rank= and size= explicitly.
"""
import numpy as np
import pytest

from distml.sharding import num_steps, shard_batches

SIZES = [1, 2, 3, 4]
BATCH_SIZES = [1, 3, 8]
SAMPLE_COUNTS = [1, 7, 50, 101]  # none divisible by every global batch used


def _all_ranks(num_samples, batch_size, size, **kwargs):
    """Every rank's list of Batches, in rank order."""
    return [shard_batches(num_samples, batch_size, rank=r, size=size, **kwargs) for r in range(size)]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("batch_size", BATCH_SIZES)
@pytest.mark.parametrize("num_samples", SAMPLE_COUNTS)
def test_every_sample_used_once_per_epoch_across_ranks(size, batch_size, num_samples):
    # Prepare / Execute
    ranks = _all_ranks(num_samples, batch_size, size, epoch=0, seed=1)

    # Assert
    used = np.concatenate([b.indices for batches in ranks for b in batches])
    assert np.array_equal(np.sort(used), np.arange(num_samples))


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("batch_size", BATCH_SIZES)
@pytest.mark.parametrize("num_samples", SAMPLE_COUNTS)
def test_all_ranks_take_the_same_number_of_steps(size, batch_size, num_samples):
    # Prepare / Execute
    ranks = _all_ranks(num_samples, batch_size, size, epoch=0)

    # Assert
    steps = {len(batches) for batches in ranks}
    assert steps == {num_steps(num_samples, size * batch_size)}
    last = num_samples % (size * batch_size)
    merged = last == 1 and size * batch_size > 1 and num_samples > 1  # a 1-sample last batch joins the one before
    assert steps == {-(-num_samples // (size * batch_size)) - merged}


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("batch_size", BATCH_SIZES)
@pytest.mark.parametrize("num_samples", SAMPLE_COUNTS)
def test_global_size_is_the_sum_of_the_ranks_counts_each_step(size, batch_size, num_samples):
    # Prepare / Execute
    ranks = _all_ranks(num_samples, batch_size, size, epoch=0)

    # Assert
    for step in zip(*ranks):
        total = sum(len(b.indices) for b in step)
        assert all(b.global_size == total for b in step)
        assert total <= size * batch_size + 1  # + 1: a 1-sample last batch joins the one before


@pytest.mark.parametrize("size", [2, 3, 4])
@pytest.mark.parametrize("batch_size", BATCH_SIZES)
@pytest.mark.parametrize("num_samples", SAMPLE_COUNTS)
def test_ranks_parts_in_rank_order_equal_one_rank_order(size, batch_size, num_samples):
    # Prepare
    single = shard_batches(num_samples, size * batch_size, epoch=2, seed=5, rank=0, size=1)

    # Execute
    ranks = _all_ranks(num_samples, batch_size, size, epoch=2, seed=5)

    # Assert
    assert len(ranks[0]) == len(single)
    for step, one in zip(zip(*ranks), single):
        assert np.array_equal(np.concatenate([b.indices for b in step]), one.indices)
        assert all(b.global_size == one.global_size for b in step)


def test_uneven_last_batch_is_split_as_evenly_as_possible():
    # Prepare / Execute: 22 samples, 3 ranks x 4 -> steps of 12 and 10
    ranks = _all_ranks(22, 4, 3, epoch=0)

    # Assert
    assert [len(batches[-1].indices) for batches in ranks] == [4, 3, 3]
    assert {batches[-1].global_size for batches in ranks} == {10}


def test_small_last_batch_gives_no_rank_a_single_sample():
    # Prepare / Execute: 10 samples, 3 ranks x 2 -> steps of 6 and 4; an even split would give 2, 1, 1
    ranks = _all_ranks(10, 2, 3, epoch=0)

    # Assert: BatchNorm cannot train on one sample, so the 4 go out in twos
    assert [len(batches[-1].indices) for batches in ranks] == [2, 2, 0]
    assert {batches[-1].global_size for batches in ranks} == {4}


def test_last_batch_of_one_sample_joins_the_batch_before():
    # Prepare / Execute: 9 samples, 4 ranks x 2 -> 8 and a lone 1, which joins: one step of 9
    ranks = _all_ranks(9, 2, 4, epoch=0)

    # Assert
    assert [len(batches) for batches in ranks] == [1, 1, 1, 1]
    assert [len(batches[-1].indices) for batches in ranks] == [3, 2, 2, 2]
    assert all(batches[-1].global_size == 9 for batches in ranks)


def test_rank_without_samples_in_last_step_still_gets_an_empty_batch():
    # Prepare / Execute: 7 samples, 4 ranks x 1 -> steps of 4 and 3; 3 go out as one batch of 3
    ranks = _all_ranks(7, 1, 4, epoch=0)

    # Assert
    assert [len(batches[-1].indices) for batches in ranks] == [3, 0, 0, 0]
    assert all(batches[-1].global_size == 3 for batches in ranks)


def _order(epoch, seed, num_samples=64):
    (batch,) = shard_batches(num_samples, num_samples, epoch=epoch, seed=seed, rank=0, size=1)
    return batch.indices


def test_different_epochs_give_different_orders():
    # Prepare / Execute
    orders = [_order(epoch, seed=0) for epoch in range(5)]

    # Assert
    for i in range(len(orders)):
        for j in range(i + 1, len(orders)):
            assert not np.array_equal(orders[i], orders[j])


def test_different_seeds_give_different_orders():
    # Prepare / Execute / Assert
    assert not np.array_equal(_order(0, seed=0), _order(0, seed=1))


@pytest.mark.parametrize("seed, epoch", [(0, 0), (0, 3), (7, 1)])
def test_same_seed_and_epoch_give_the_same_order(seed, epoch):
    # Prepare / Execute
    first, second = _order(epoch, seed), _order(epoch, seed)

    # Assert
    assert np.array_equal(first, second)


@pytest.mark.parametrize("size", SIZES)
def test_no_shuffle_gives_arange(size):
    # Prepare / Execute
    ranks = _all_ranks(23, 3, size, epoch=4, shuffle=False)

    # Assert
    in_order = [np.concatenate([b.indices for b in step]) for step in zip(*ranks)]
    assert np.array_equal(np.concatenate(in_order), np.arange(23))


@pytest.mark.parametrize("batch_size", [0, -1])
def test_batch_size_below_one_raises_value_error(batch_size):
    # Prepare / Execute / Assert
    with pytest.raises(ValueError, match="batch_size"):
        shard_batches(10, batch_size, epoch=0, rank=0, size=1)


def test_defaults_to_the_world_when_rank_and_size_are_not_given():
    # Prepare / Execute: without mpirun the world has one rank
    batches = shard_batches(10, 4, epoch=0, seed=3)

    # Assert
    explicit = shard_batches(10, 4, epoch=0, seed=3, rank=0, size=1)
    assert [b.indices.tolist() for b in batches] == [b.indices.tolist() for b in explicit]
