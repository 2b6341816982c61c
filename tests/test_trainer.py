"""Unit tests for `distml.trainer.evaluate` on the size-1 world (no mpirun)."""
import numpy as np
import pytest
import torch
from sklearn.metrics import r2_score
from torch import nn

from distml import comm
from distml.data import from_arrays
from distml.trainer import evaluate


def _regression(offset, n_train=40, n_test=1000, features=3, seed=0):
    """Targets offset + X @ w + noise: a large mean and a small spread when offset is large."""
    generator = np.random.default_rng(seed)
    w = np.array([0.5, -0.25, 1.0], dtype=np.float32)[:features]
    X = generator.normal(size=(n_train + n_test, features)).astype(np.float32)
    y = (offset + X @ w + generator.normal(scale=0.5, size=len(X))).astype(np.float32)
    return from_arrays("tabular", X[:n_train], y[:n_train], X[n_train:], y[n_train:], "regression"), w


def _linear(w, bias):
    model = nn.Linear(len(w), 1)
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(w).reshape(1, -1) * 0.8)
        model.bias.fill_(bias)
    return model


@pytest.mark.parametrize("offset", [0.0, 1e4], ids=["centred", "around-1e4"])
def test_evaluate_r2_equals_sklearn_r2_score(offset):
    # Prepare
    data, w = _regression(offset)
    model = _linear(w, offset)
    with torch.no_grad():
        predictions = model(torch.from_numpy(data.X_test)).reshape(-1).numpy()

    # Execute
    scores = evaluate(model, data, comm.world())

    # Assert
    y, predictions = data.y_test.astype(np.float64), predictions.astype(np.float64)
    expected = r2_score(y, predictions)
    assert 0.5 < expected < 1
    assert scores["test_r2"] == pytest.approx(expected, abs=1e-6)
    assert scores["test_mse"] == pytest.approx(np.mean((predictions - y) ** 2), rel=1e-9)


def _stream(seed, rank, work_done):
    from types import SimpleNamespace
    from distml.trainer import _seed_rank
    _seed_rank(SimpleNamespace(seed=seed), SimpleNamespace(rank=rank), work_done)
    return torch.rand(8)


def test_each_rank_gets_its_own_torch_stream_from_seed_rank_and_position():
    base = _stream(0, 0, 0)

    assert torch.equal(base, _stream(0, 0, 0))  # a pure function of (seed, rank, position)
    for other in [(0, 1, 0), (1, 0, 0), (0, 0, 45)]:
        assert not torch.equal(base, _stream(*other)), other


def test_a_checkpoint_of_another_model_is_described_by_its_first_differing_tensor():
    from distml.trainer import _first_mismatch
    mine = {"inner.0.weight": (128, 64), "inner.0.bias": (128,)}

    assert _first_mismatch({"inner.0.weight": (128, 10), "inner.0.bias": (128,)}, mine) == \
        "its inner.0.weight is [128, 10], this model's [128, 64]"
    assert _first_mismatch({"inner.0.weight": (128, 64)}, mine) == "it has no inner.0.bias"
    assert _first_mismatch({**mine, "head.weight": (10, 128)}, mine) == "it has head.weight, this model none"
