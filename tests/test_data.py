"""Unit tests for `distml.data.load_dataset`: built-in sets, .npz and .csv files, bad inputs."""
import io
import zipfile

import numpy as np
import pytest

from distml.config import Config, UsageError
from distml.data import check_finite, load_dataset, read_rows, rows_of


def _npz(path, compressed=False, **arrays):
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return str(path)


def _csv(path, text):
    path.write_text(text)
    return str(path)


def _xy(n=20, features=3, seed=0, classes=3):
    generator = np.random.default_rng(seed)
    X = generator.normal(size=(n, features)).astype(np.float32)
    y = np.arange(n, dtype=np.int64) % classes
    return X, y


# -- built-in data sets -------------------------------------------------------

def test_digits_are_float32_images_with_ten_labels():
    # Prepare / Execute
    data = load_dataset(Config(dataset="digits"))

    # Assert
    assert data.task == "classification" and data.num_classes == 10
    assert data.X_train.shape[1:] == (1, 8, 8) and data.X_test.shape[1:] == (1, 8, 8)
    assert data.X_train.dtype == np.float32 and data.X_test.dtype == np.float32
    labels = np.concatenate([data.y_train, data.y_test])
    assert set(np.unique(labels)) == set(range(10))
    assert data.num_outputs == 10 and data.input_shape == (1, 8, 8)


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.5])
def test_digits_split_sizes_follow_test_fraction(fraction):
    # Prepare / Execute
    data = load_dataset(Config(dataset="digits", test_fraction=fraction))

    # Assert
    total = len(data.X_train) + len(data.X_test)
    assert total == 1797
    assert len(data.X_test) == round(total * fraction)
    assert len(data.y_train) == len(data.X_train) and len(data.y_test) == len(data.X_test)


def test_same_seed_gives_the_same_split_and_another_seed_a_different_one():
    # Prepare / Execute
    first, again = (load_dataset(Config(dataset="digits", seed=3)) for _ in range(2))
    other = load_dataset(Config(dataset="digits", seed=4))

    # Assert
    assert np.array_equal(first.X_test, again.X_test) and np.array_equal(first.y_train, again.y_train)
    assert not np.array_equal(first.X_test, other.X_test)


def test_diabetes_is_standardized_regression():
    # Prepare / Execute
    data = load_dataset(Config(dataset="diabetes"))

    # Assert
    assert data.task == "regression" and data.num_classes == 0 and data.num_outputs == 1
    assert data.X_train.dtype == np.float32 and data.y_train.dtype == np.float32
    np.testing.assert_allclose(data.X_train.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(data.X_train.std(axis=0), 1, atol=1e-4)
    assert abs(float(data.y_train.mean())) < 1e-5


@pytest.mark.parametrize("classes", [2, 5])
def test_synthetic_classification_has_the_requested_classes_and_features(classes):
    # Prepare / Execute
    data = load_dataset(Config(dataset="synthetic", samples=200, features=8, classes=classes))

    # Assert
    assert data.task == "classification" and data.num_classes == classes
    assert data.X_train.shape[1:] == (8,)
    assert len(data.X_train) + len(data.X_test) == 200
    assert set(np.unique(np.concatenate([data.y_train, data.y_test]))) == set(range(classes))


def test_synthetic_with_zero_classes_is_regression():
    # Prepare / Execute
    data = load_dataset(Config(dataset="synthetic", samples=100, features=4, classes=0))

    # Assert
    assert data.task == "regression" and data.num_outputs == 1
    assert data.y_train.dtype == np.float32
    np.testing.assert_allclose(data.X_train.mean(axis=0), 0, atol=1e-5)


# -- .npz files ---------------------------------------------------------------

@pytest.mark.parametrize("compressed", [False, True])
def test_npz_without_test_split_is_held_out(tmp_path, compressed):
    # Prepare
    X, y = _xy(n=20)
    path = _npz(tmp_path / "d.npz", compressed, X=X, y=y)

    # Execute
    data = load_dataset(Config(dataset=path, test_fraction=0.25))

    # Assert
    assert len(data.X_test) == 5 and len(data.X_train) == 15
    rows = np.concatenate([data.X_train, data.X_test])
    assert np.array_equal(np.sort(rows, axis=0), np.sort(X, axis=0))
    assert data.task == "classification" and data.num_classes == 3


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_with_test_split_uses_it_as_given(tmp_path, compressed):
    # Prepare
    X, y = _xy(n=12, seed=0)
    X_test, y_test = _xy(n=6, seed=1)
    path = _npz(tmp_path / "d.npz", compressed, X=X, y=y, X_test=X_test, y_test=y_test)

    # Execute
    data = load_dataset(Config(dataset=path))

    # Assert
    assert np.array_equal(data.X_train, X) and np.array_equal(data.y_train, y)
    assert np.array_equal(data.X_test, X_test) and np.array_equal(data.y_test, y_test)


def test_uncompressed_npz_arrays_are_memory_mapped(tmp_path):
    # Prepare
    X, y = _xy(n=12, seed=0)
    X_test, y_test = _xy(n=6, seed=1)
    path = _npz(tmp_path / "d.npz", X=X, y=y, X_test=X_test, y_test=y_test)

    # Execute
    data = load_dataset(Config(dataset=path))

    # Assert
    assert isinstance(data.X_train, np.memmap) and isinstance(data.X_test, np.memmap)


def test_compressed_npz_arrays_are_loaded_into_memory(tmp_path):
    # Prepare
    X, y = _xy(n=12, seed=0)
    X_test, y_test = _xy(n=6, seed=1)
    path = _npz(tmp_path / "d.npz", compressed=True, X=X, y=y, X_test=X_test, y_test=y_test)

    # Execute
    data = load_dataset(Config(dataset=path))

    # Assert
    assert not isinstance(data.X_train, np.memmap)
    assert np.array_equal(data.X_train, X)


def test_npz_float_targets_mean_regression(tmp_path):
    # Prepare
    X, _ = _xy(n=10)
    path = _npz(tmp_path / "d.npz", X=X, y=np.linspace(0, 1, 10))

    # Execute
    data = load_dataset(Config(dataset=path))

    # Assert
    assert data.task == "regression" and data.y_train.dtype == np.float32


# -- .csv files ---------------------------------------------------------------

def test_csv_target_is_the_last_column_by_default(tmp_path):
    # Prepare
    path = _csv(tmp_path / "d.csv", "a,b,label\n" + "".join(f"{i},{i * 2},{i % 2}\n" for i in range(10)))

    # Execute
    data = load_dataset(Config(dataset=path, test_fraction=0.2))

    # Assert
    assert data.X_train.shape == (8, 2)
    assert data.task == "classification" and data.num_classes == 2
    for row, label in zip(data.X_train, data.y_train):
        assert label == int(row[0]) % 2 and row[1] == 2 * row[0]


def test_csv_target_flag_picks_another_column(tmp_path):
    # Prepare
    path = _csv(tmp_path / "d.csv", "kind,x,z\n" + "".join(f"{i % 3},{i}.5,{i * 10}.0\n" for i in range(12)))

    # Execute
    data = load_dataset(Config(dataset=path, target="kind", test_fraction=0.25))

    # Assert
    assert data.task == "classification" and data.num_classes == 3
    assert data.X_train.shape == (9, 2)
    for row, label in zip(data.X_train, data.y_train):
        assert label == int(row[0] - 0.5) % 3 and row[1] == 10 * (row[0] - 0.5)


def test_csv_integer_labels_are_remapped_to_consecutive_classes(tmp_path):
    # Prepare: labels 3, 5, 9 follow from x
    labels = {0: 3, 1: 5, 2: 9}
    path = _csv(tmp_path / "d.csv", "x,y\n" + "".join(f"{i % 3},{labels[i % 3]}\n" for i in range(12)))

    # Execute
    data = load_dataset(Config(dataset=path))

    # Assert
    assert data.num_classes == 3 and data.y_train.dtype == np.int64
    assert np.array_equal(data.y_train, data.X_train[:, 0].astype(np.int64))
    assert np.array_equal(data.y_test, data.X_test[:, 0].astype(np.int64))


def test_csv_float_target_means_regression(tmp_path):
    # Prepare
    path = _csv(tmp_path / "d.csv", "x,y\n" + "".join(f"{i},{i / 4}\n" for i in range(10)))

    # Execute
    data = load_dataset(Config(dataset=path))

    # Assert
    assert data.task == "regression" and data.y_train.dtype == np.float32
    np.testing.assert_allclose(data.y_train, data.X_train[:, 0] / 4)


def test_csv_with_a_byte_order_mark_names_its_first_column_plainly(tmp_path):
    # Prepare: Excel's "CSV UTF-8" starts the file with a BOM
    path = tmp_path / "d.csv"
    path.write_text("kind,x\n" + "".join(f"{i % 2},{i}.5\n" for i in range(10)), encoding="utf-8-sig")

    # Execute
    data = load_dataset(Config(dataset=str(path), target="kind"))

    # Assert
    assert data.task == "classification" and data.num_classes == 2
    assert np.array_equal(data.y_train, (data.X_train[:, 0] - 0.5).astype(np.int64) % 2)


# -- bad inputs: each a UsageError that says what is wrong -------------------

def _bad_npz(tmp_path, **arrays):
    return _npz(tmp_path / "bad.npz", **arrays)


def _short_npz(path):
    """An uncompressed .npz whose X.npy header says 12 rows but holds 10 (y holds 12)."""
    X, y = _xy(n=12)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, array in (("X", X), ("y", y)):
            member = io.BytesIO()
            np.lib.format.write_array(member, array)
            data = member.getvalue()
            archive.writestr(f"{name}.npy", data[:-2 * X[0].nbytes] if name == "X" else data)
    return str(path)


X10, Y10 = _xy(n=10)

BAD_INPUTS = {
    "missing file": (lambda d: str(d / "nope.csv"), "no such file"),
    "missing npz": (lambda d: str(d / "nope.npz"), "no such file"),
    "wrong extension": (lambda d: _csv(d / "d.txt", "x,y\n1,2\n3,4\n"), "must be one of"),
    "unknown name": (lambda d: "mnist", "must be one of"),
    "npz without y": (lambda d: _bad_npz(d, X=X10), "missing array.*y"),
    "npz with X_test only": (lambda d: _bad_npz(d, X=X10, y=Y10, X_test=X10), "both X_test and y_test"),
    "X and y lengths differ": (lambda d: _bad_npz(d, X=X10, y=Y10[:9]), "one target per row"),
    "not a zip": (lambda d: _csv(d / "d.npz", "not a zip file"), "not a readable .npz"),
    "csv non-numeric cell": (lambda d: _csv(d / "d.csv", "x,y\n1,0\n2,1\nabc,0\n"), "line 4.*'abc'"),
    "csv ragged row": (lambda d: _csv(d / "d.csv", "x,z,y\n1,2,0\n3,1\n4,5,1\n"), "line 3 has 2 fields"),
    "csv too short": (lambda d: _csv(d / "d.csv", "x,y\n1,0\n"), "header row and at least 2"),
    "csv only a target": (lambda d: _csv(d / "d.csv", "y\n1\n0\n1\n"), "no feature columns"),
    "single class": (lambda d: _csv(d / "d.csv", "x,y\n1,4\n2,4\n3,4\n4,4\n"), "at least 2 classes"),
    "csv nan feature": (lambda d: _csv(d / "d.csv", "x,y\n1,0\nnan,1\n3,0\n4,1\n"),
                        "X contains NaN or infinite"),
    "csv inf feature": (lambda d: _csv(d / "d.csv", "x,y\n1,0\n2,1\n-inf,0\n4,1\n"),
                        "X contains NaN or infinite"),
    "csv nan target": (lambda d: _csv(d / "d.csv", "x,y\n1,0.5\n2,NaN\n3,1.5\n4,2.5\n"),
                       "y contains NaN or infinite"),
    "csv inf target": (lambda d: _csv(d / "d.csv", "x,y\n1,0.5\n2,1.5\n3,inf\n4,2.5\n"),
                       "y contains NaN or infinite"),
    "csv header and empty rows": (lambda d: _csv(d / "d.csv", "x,y\n\n\n\n"), "header row and at least 2"),
    "csv header and blank rows": (lambda d: _csv(d / "d.csv", "x,y\n \n,\n\t,  \n"),
                                  "header row and at least 2"),
    "npz X without rows": (lambda d: _bad_npz(d, X=X10[:0], y=Y10[:0], X_test=X10, y_test=Y10),
                           "X has no samples"),
    "npz X_test without rows": (lambda d: _bad_npz(d, X=X10, y=Y10, X_test=X10[:0], y_test=Y10[:0]),
                                "X_test has no samples"),
    "npz shorter than its header": (lambda d: _short_npz(d / "short.npz"), "shorter than its header"),
    "more classes than half the samples": (
        lambda d: _csv(d / "d.csv", "x,y\n" + "".join(f"{i},{100 + i}\n" for i in range(10))),
        "store the target as floating point"),
}


@pytest.mark.parametrize("make, message", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_dataset_raises_usage_error_saying_why(tmp_path, make, message):
    # Prepare
    cfg = Config(dataset=make(tmp_path))

    # Execute / Assert
    with pytest.raises(UsageError, match=message):
        load_dataset(cfg)


def test_unknown_csv_target_raises_usage_error_listing_the_columns(tmp_path):
    # Prepare
    path = _csv(tmp_path / "d.csv", "a,b,c\n1,2,0\n3,4,1\n5,6,0\n")

    # Execute / Assert
    with pytest.raises(UsageError, match="'label' is not a column.*a, b, c"):
        load_dataset(Config(dataset=path, target="label"))


def test_csv_error_names_the_file_line_even_after_blank_lines(tmp_path):
    path = tmp_path / "gaps.csv"
    path.write_text("a,b,t\n1,2,0\n\n\n3,x,1\n4,5,0\n")

    with pytest.raises(UsageError, match="line 5: 'x' is not a number"):
        load_dataset(Config(dataset=str(path)))


def test_bundled_data_is_cached_and_equals_sklearns(tmp_path, monkeypatch):
    """The cache (no sklearn import on later launches) gives sklearn's arrays bit for bit; a
    damaged cache file is read past and written anew."""
    from sklearn.datasets import load_diabetes
    from distml.data import bundled
    monkeypatch.setenv("DISTML_CACHE", str(tmp_path))
    reference = load_diabetes()
    first = bundled("diabetes")
    (cached,) = tmp_path.glob("diabetes-scikit-learn-*.npz")
    again = bundled("diabetes")
    cached.write_bytes(b"not an npz")
    repaired = bundled("diabetes")
    for data, target in (first, again, repaired):
        assert np.array_equal(data, reference.data) and np.array_equal(target, reference.target)
    assert np.load(cached)["data"].shape == reference.data.shape  # written anew


# -- set-up cost: each rank checks its own block of rows ------------------------

@pytest.mark.parametrize("num_rows", [1, 7, 10, 1001])
@pytest.mark.parametrize("size", [1, 2, 3, 5])
def test_rank_blocks_cover_every_row_once(num_rows, size):
    # Execute
    blocks = [rows_of(num_rows, rank, size) for rank in range(size)]

    # Assert
    assert [r for block in blocks for r in block] == list(range(num_rows))
    assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


def test_each_rank_checks_only_its_block_of_rows_for_nan(tmp_path):
    # Prepare: 10 rows, a NaN in row 7 of X (rank 1's block of 2) and an infinity in row 1 of X_test (rank 0's)
    X, y = _xy(n=10)
    X[7, 2] = np.nan
    X_test, y_test = _xy(n=4, seed=1)
    X_test[1, 0] = np.inf
    path = _npz(tmp_path / "d.npz", X=X, y=y, X_test=X_test, y_test=y_test)

    # Execute / Assert
    with pytest.raises(UsageError, match=r"X_test contains NaN or infinite values \(row 1\)"):
        load_dataset(Config(dataset=path), rank=0, size=2)
    with pytest.raises(UsageError, match=r": X contains NaN or infinite values \(row 7\)"):
        load_dataset(Config(dataset=path), rank=1, size=2)
    with pytest.raises(UsageError, match=r": X contains NaN or infinite values \(row 7\)"):
        load_dataset(Config(dataset=path))  # one process checks every row
    assert isinstance(load_dataset(Config(dataset=path), rank=0, size=3).X_train, np.memmap)  # rows 0-2: clean


def test_nan_check_reads_the_block_in_chunks_and_names_the_first_bad_row(tmp_path, monkeypatch):
    # Prepare: chunks of 2 rows (12 bytes a row), NaNs in rows 5 and 8 of rank 1's block 5..9
    import distml.data.arrays
    monkeypatch.setattr(distml.data.arrays, "_CHUNK_BYTES", 24)
    X, y = _xy(n=10)
    X[8, 0] = X[5, 1] = np.nan

    # Execute / Assert
    with pytest.raises(UsageError, match=r"row 5\)"):
        check_finite(X, rows_of(10, 1, 2), "X")
    check_finite(X, rows_of(10, 0, 2), "X")  # rows 0..4 are clean
    check_finite(X, range(9, 10), "X")


def test_npz_source_holds_the_zip_checksum_of_every_array(tmp_path):
    # Prepare: two files differing in one value of one middle row
    X, y = _xy(n=100)
    first = _npz(tmp_path / "a.npz", X=X, y=y)
    X[50, 1] += 1
    second = _npz(tmp_path / "b.npz", X=X, y=y)

    # Execute
    a, b = (load_dataset(Config(dataset=p)) for p in (first, second))

    # Assert: X's checksum differs, y's does not
    assert a.source.split()[0] != b.source.split()[0] and a.source.split()[1] == b.source.split()[1]
    assert a.source.startswith("X.npy:") and len(a.source.split()) == 2


def test_read_rows_of_a_memory_map_equals_indexing_it(tmp_path):
    # Prepare: a mapped X (its data not at the file's start) and a view of it, which is indexed instead
    X, y = _xy(n=50, features=4)
    data = load_dataset(Config(dataset=_npz(tmp_path / "d.npz", X=X, y=y, X_test=X[:5], y_test=y[:5])))
    view = data.X_train[10:]

    # Execute / Assert
    assert np.array_equal(read_rows(data.X_train, range(7, 31)), X[7:31])
    assert np.array_equal(read_rows(data.X_train, np.array([0, 3, 49])), X[[0, 3, 49]])
    assert np.array_equal(read_rows(data.y_train, np.array([2, 40])), y[[2, 40]])
    assert np.array_equal(read_rows(view, range(0, 3)), X[10:13])
