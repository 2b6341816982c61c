"""Unit tests for `distml.partition` and the `distml partition` command (no MPI)."""
import numpy as np
import pytest

from distml.cli import main
from distml.partition import format_histogram, label_histogram, partition, plot_histogram

DIGITS_LIKE = np.repeat(np.arange(10), 150)  # 10 classes x 150 samples, sorted by label
SCHEMES = ("iid", "dirichlet", "shards")


def _classes_per_client(labels, parts):
    return np.mean([len(np.unique(labels[p])) for p in parts])


# -- partition ----------------------------------------------------------------

@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("clients, seed", [(1, 0), (7, 1), (20, 2), (150, 3)])
def test_parts_are_a_disjoint_cover_of_nonempty_sorted_int64_arrays(scheme, clients, seed):
    # Prepare / Execute
    parts = partition(DIGITS_LIKE, clients, scheme, seed=seed)

    # Assert
    assert len(parts) == clients
    assert all(p.dtype == np.int64 and len(p) >= 1 and np.all(np.diff(p) > 0) for p in parts)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(DIGITS_LIKE)))


@pytest.mark.parametrize("clients", [200, 300])
def test_dirichlet_tiny_alpha_still_gives_every_client_a_sample(clients):
    # Prepare
    labels = np.repeat(np.arange(10), 30)

    # Execute
    parts = partition(labels, clients, "dirichlet", alpha=0.01, seed=5)

    # Assert
    assert min(len(p) for p in parts) >= 1
    assert sum(len(p) for p in parts) == len(labels)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_partition_is_a_pure_function_of_the_seed(scheme):
    # Execute
    first, again = (partition(DIGITS_LIKE, 12, scheme, seed=4) for _ in range(2))
    other = partition(DIGITS_LIKE, 12, scheme, seed=5)

    # Assert
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_iid_parts_are_nearly_equal():
    # Execute
    sizes = [len(p) for p in partition(DIGITS_LIKE, 7, "iid")]

    # Assert
    assert max(sizes) - min(sizes) <= 1


def test_dirichlet_small_alpha_skews_labels_and_large_alpha_does_not():
    # Execute
    skewed = _classes_per_client(DIGITS_LIKE, partition(DIGITS_LIKE, 20, "dirichlet", alpha=0.1))
    uniform = _classes_per_client(DIGITS_LIKE, partition(DIGITS_LIKE, 20, "dirichlet", alpha=100))

    # Assert
    assert skewed < 4.5
    assert uniform > 9.5


def test_shards_give_each_client_at_most_shards_per_client_labels():
    # Prepare: 1000 samples in 100 shards of 10, each shard within one class
    labels = np.repeat(np.arange(10), 100)

    # Execute
    parts = partition(labels, 50, "shards", shards_per_client=2, seed=3)

    # Assert
    assert all(len(p) == 20 for p in parts)
    assert all(len(np.unique(labels[p])) <= 2 for p in parts)


@pytest.mark.parametrize("clients, scheme, kwargs, message", [
    (0, "iid", {}, "num_clients"),
    (1501, "iid", {}, "num_clients"),
    (10, "dirichlet", {"alpha": 0.0}, "alpha"),
    (10, "nope", {}, "scheme"),
    (1000, "shards", {"shards_per_client": 2}, "shards"),
])
def test_bad_arguments_raise_value_error(clients, scheme, kwargs, message):
    # Execute / Assert
    with pytest.raises(ValueError, match=message):
        partition(DIGITS_LIKE, clients, scheme, **kwargs)


# -- label_histogram, format_histogram, plot_histogram ------------------------

def test_histogram_counts_every_sample_once():
    # Prepare
    parts = partition(DIGITS_LIKE, 9, "dirichlet", alpha=0.3, seed=1)

    # Execute
    hist = label_histogram(DIGITS_LIKE, parts, 10)

    # Assert
    assert hist.shape == (9, 10)
    assert np.array_equal(hist.sum(axis=1), [len(p) for p in parts])
    assert np.array_equal(hist.sum(axis=0), np.bincount(DIGITS_LIKE))


def test_format_histogram_has_a_header_and_a_row_per_client():
    # Prepare
    hist = np.array([[3, 0, 1], [0, 5, 0]])

    # Execute
    lines = format_histogram(hist).splitlines()

    # Assert
    assert len(lines) == 3
    assert lines[1].split() == ["0", "4", "2", "3", "0", "1"]
    assert lines[2].split() == ["1", "5", "1", "0", "5", "0"]


def test_plot_histogram_writes_a_png(tmp_path):
    # Prepare
    path = tmp_path / "hist.png"

    # Execute
    plot_histogram(np.array([[3, 0, 1], [0, 5, 0]]), str(path))

    # Assert
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- the `distml partition` command -------------------------------------------

def test_cli_prints_one_row_per_client(capsys):
    # Execute: in this process, as a subprocess costs seconds of MPI and torch start-up
    code = main(["partition", "--clients", "20", "--partition", "dirichlet", "--alpha", "0.1"])
    out, err = capsys.readouterr()

    # Assert
    assert code == 0, err
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:3] == ["client", "samples", "classes"])
    rows = lines[header + 1:header + 21]
    assert [int(row.split()[0]) for row in rows] == list(range(20))


def test_cli_plot_writes_a_png_on_synthetic_data(tmp_path, capsys):
    # Prepare
    path = tmp_path / "labels.png"

    # Execute: in this process, as a subprocess costs seconds of MPI and torch start-up
    code = main(["partition", "--dataset", "synthetic", "--samples", "300", "--classes", "3",
                 "--clients", "5", "--partition", "shards", "--plot", str(path)])

    # Assert
    assert code == 0, capsys.readouterr().err
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {path}" in capsys.readouterr().out


@pytest.mark.parametrize("args", [
    ["--alpha", "0"],
    ["--clients", "100000"],
    ["--partition", "nope"],
    ["--clients", "0"],
    ["--dataset", "diabetes"],
    ["--plot", "/no/such/directory/labels.png"],
], ids=["alpha-0", "too-many-clients", "unknown-scheme", "no-clients", "regression", "plot-dir-missing"])
def test_cli_bad_input_prints_one_error_line_and_exits_2(args, capsys):
    # Execute: in this process, as a subprocess costs seconds of MPI and torch start-up
    code = main(["partition", *args])

    # Assert
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("distml: error:")
