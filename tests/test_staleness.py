"""The staleness bookkeeping of the parameter server, driven by simulated workers."""
import random

import pytest

from distml.strategies.staleness import StalenessScheduler


def simulate(num_workers, bound, updates_per_worker, seed):
    """Workers finish their gradients in random order; returns the staleness of every update."""
    rand = random.Random(seed)
    scheduler = StalenessScheduler(num_workers, bound)
    left = {w: updates_per_worker for w in range(num_workers)}
    computing, staleness = set(scheduler.release()), []
    while computing or scheduler.arrived:
        if computing and (not scheduler.arrived or rand.random() < 0.7):
            worker = rand.choice(sorted(computing))  # some worker finishes its gradient
            computing.remove(worker)
            scheduler.arrive(worker)
        while (worker := scheduler.next_to_apply()) is not None:
            left[worker] -= 1
            staleness.append(scheduler.apply(worker, done=left[worker] == 0))
        computing |= set(scheduler.release())
        assert computing or scheduler.arrived or not any(left.values()), "deadlock"
    assert not any(left.values())
    return staleness


@pytest.mark.parametrize("num_workers", [1, 2, 3, 5])
@pytest.mark.parametrize("bound", [0, 1, 2, 4])
@pytest.mark.parametrize("seed", range(20))
def test_staleness_never_exceeds_the_bound_and_every_update_is_applied(num_workers, bound, seed):
    staleness = simulate(num_workers, bound, updates_per_worker=12, seed=seed)

    assert len(staleness) == num_workers * 12
    assert max(staleness) <= bound


@pytest.mark.parametrize("seed", range(10))
def test_bound_zero_is_sequential_sgd(seed):
    assert set(simulate(4, 0, updates_per_worker=10, seed=seed)) == {0}


def test_without_a_bound_gradients_apply_in_arrival_order():
    scheduler = StalenessScheduler(3, None)
    assert scheduler.release() == [0, 1, 2]
    scheduler.arrive(2)

    assert scheduler.next_to_apply() == 2
    assert scheduler.apply(2) == 0
    scheduler.arrive(0)
    assert scheduler.apply(0) == 1  # computed from version 0, applied at version 1


def test_a_fast_worker_is_held_until_the_slow_one_is_applied():
    scheduler = StalenessScheduler(2, bound=1)
    scheduler.release()
    scheduler.arrive(1)
    scheduler.apply(1)                      # version 1; worker 0 (base 0) now at staleness 1
    assert scheduler.release() == [1]       # worker 1 computes from version 1
    scheduler.arrive(1)

    assert scheduler.next_to_apply() is None  # applying it would make worker 0's staleness 2
    scheduler.arrive(0)
    assert scheduler.next_to_apply() == 0
    assert scheduler.apply(0) == 1
    assert scheduler.next_to_apply() == 1


def test_gradient_from_a_worker_not_released_is_refused():
    scheduler = StalenessScheduler(2, bound=0)
    scheduler.release()

    with pytest.raises(ValueError, match="without being released"):
        scheduler.arrive(1)


def test_negative_bound_is_refused():
    with pytest.raises(ValueError):
        StalenessScheduler(2, bound=-1)


def test_retiring_an_in_flight_worker_frees_the_bound_for_the_others():
    scheduler = StalenessScheduler(3, bound=0)
    assert scheduler.release() == [0]  # bound 0: one worker computes at a time

    scheduler.retire(0)

    assert scheduler.release() == [1]
    with pytest.raises(ValueError):
        scheduler.retire(0)
