"""Set-up on the world: each rank checks its block of the data, and the ranks agree on the data."""
import os
import tempfile

import numpy as np
import pytest

from distml import comm
from distml.config import Config, UsageError
from distml.trainer import run

ROWS = 6000  # more than the 4096 sampled rows: the file's checksum must do the catching


def _run_in_own_dir(X, y):
    """trainer.run on --dataset data.npz, each rank reading its own copy (its own directory)."""
    here = os.getcwd()
    with tempfile.TemporaryDirectory() as own:
        np.savez(os.path.join(own, "data.npz"), X=X, y=y, X_test=X[:20], y_test=y[:20])
        os.chdir(own)
        try:
            return run(Config(dataset="data.npz", model="logreg", epochs=1, quiet=True))
        finally:
            os.chdir(here)


def _data():
    X = np.random.default_rng(0).normal(size=(ROWS, 8)).astype(np.float32)
    return X, np.arange(ROWS, dtype=np.int64) % 3


@pytest.mark.mpi(min_size=2)
def test_a_file_differing_in_one_middle_row_on_the_last_rank_is_caught_on_every_rank():
    X, y = _data()
    world = comm.world()
    if world.rank == world.size - 1:
        X[ROWS // 2, 3] += 1

    with pytest.raises(UsageError, match=f"ranks disagree on settings, data or model: rank {world.size - 1} differs"):
        _run_in_own_dir(X, y)


@pytest.mark.mpi(min_size=2)
def test_nan_in_the_last_ranks_block_is_one_usage_error_on_every_rank():
    X, y = _data()
    X[ROWS - 2, 5] = np.nan  # only the last rank checks this row
    world = comm.world()

    with pytest.raises(UsageError, match=rf"^rank {world.size - 1}: data.npz: X contains NaN or infinite values "
                                         rf"\(row {ROWS - 2}\)$"):
        _run_in_own_dir(X, y)
