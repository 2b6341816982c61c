"""Unit tests for `distml.agreement.data_fingerprint`: sampled rows catch a file differing anywhere."""
import numpy as np
import pytest

from distml.agreement import data_fingerprint, sample_rows
from distml.config import Config
from distml.data import from_arrays, load_dataset


def _dataset(X, source=""):
    y = np.arange(len(X), dtype=np.int64) % 3
    return from_arrays("d", X, y, X[:5], y[:5], "classification", 3, source)


def _X(n=20000, features=4):
    return np.random.default_rng(0).normal(size=(n, features)).astype(np.float32)


@pytest.mark.parametrize("salt", [0, 1, 2**64 - 1])
def test_sample_draws_one_row_in_each_stratum(salt):
    # Execute
    rows = sample_rows(20000, 4096, salt)

    # Assert
    starts = np.arange(4097) * 20000 // 4096
    assert np.array_equal(np.searchsorted(starts, rows, side="right") - 1, np.arange(4096))


def test_sample_depends_on_the_salt_and_covers_small_arrays_whole():
    assert not np.array_equal(sample_rows(20000, 4096, 1), sample_rows(20000, 4096, 2))
    assert sample_rows(4096, 4096, 1) is None  # hashed whole


@pytest.mark.parametrize("salt", range(5))
def test_fingerprint_catches_a_run_of_two_strata_changed_anywhere(salt):
    # Prepare: rows 11111.. (2 n / 4096 of them, rounded up) changed, the file's checksum unchanged
    X = _X()
    changed = X.copy()
    changed[11111:11111 + 10] += 1

    # Execute / Assert
    assert data_fingerprint(_dataset(X), salt) != data_fingerprint(_dataset(changed), salt)
    assert data_fingerprint(_dataset(X), salt) == data_fingerprint(_dataset(X.copy()), salt)


def test_fingerprint_catches_one_percent_of_rows_changed_at_random():
    # Prepare
    X = _X()
    changed = X.copy()
    changed[np.random.default_rng(1).choice(len(X), len(X) // 100, replace=False)] *= -1

    # Execute / Assert: missed with probability <= exp(-40.96) for each salt
    assert all(data_fingerprint(_dataset(X), s) != data_fingerprint(_dataset(changed), s) for s in range(5))


def test_fingerprint_catches_an_npz_differing_in_one_middle_row(tmp_path):
    # Prepare: one value of one row changed, which the sample (one row in 5) most likely misses
    X = _X()
    y = np.arange(len(X)) % 3
    np.savez(tmp_path / "a.npz", X=X, y=y, X_test=X[:5], y_test=y[:5])
    X[10000, 0] += 1
    np.savez(tmp_path / "b.npz", X=X, y=y, X_test=X[:5], y_test=y[:5])

    # Execute
    a, b = (load_dataset(Config(dataset=str(tmp_path / name))) for name in ("a.npz", "b.npz"))

    # Assert: the zip's CRC-32 of X differs, whatever rows are sampled
    assert all(data_fingerprint(a, salt) != data_fingerprint(b, salt) for salt in range(5))
