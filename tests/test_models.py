"""Unit tests for `distml.models.build_model`: the registry and the user's own models."""
import sys
import textwrap

import numpy as np
import pytest
import torch

from distml.config import Config, UsageError
from distml.data import from_arrays, load_dataset
from distml.models import REGISTRY, build_model

USER_MODELS = textwrap.dedent("""
    import math
    from torch import nn

    def good(input_shape, num_outputs):
        return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_outputs))

    def wrong_size(input_shape, num_outputs):
        return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_outputs + 1))

    def not_a_module(input_shape, num_outputs):
        return lambda x: x

    def wrong_input(input_shape, num_outputs):
        return nn.Linear(3, num_outputs)

    def flat_regression(input_shape, num_outputs):
        return nn.Sequential(nn.Linear(math.prod(input_shape), 1), nn.Flatten(0))

    def batchnorm(input_shape, num_outputs):
        return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), 16), nn.BatchNorm1d(16),
                             nn.ReLU(), nn.Linear(16, num_outputs))

    def raises(input_shape, num_outputs):
        raise ValueError("no such layer size")

    class FirstOutputs(nn.Module):
        def __init__(self, num_outputs):
            super().__init__()
            self.num_outputs = num_outputs

        def forward(self, x):
            return x.flatten(1)[:, :self.num_outputs]

    def no_parameters(input_shape, num_outputs):
        return FirstOutputs(num_outputs)

    def all_frozen(input_shape, num_outputs):
        return good(input_shape, num_outputs).requires_grad_(False)

    not_callable = 3
""")

MODULE = "distml_test_user_models"


@pytest.fixture(scope="module")
def digits():
    return load_dataset(Config(dataset="digits"))


@pytest.fixture(scope="module")
def diabetes():
    return load_dataset(Config(dataset="diabetes"))


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "my_models.py"
    path.write_text(USER_MODELS)
    return str(path)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / f"{MODULE}.py").write_text(USER_MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield MODULE
    sys.modules.pop(MODULE, None)


def _tabular(task):
    X = np.zeros((4, 5), dtype=np.float32)
    y = np.array([0, 1, 0, 1]) if task == "classification" else np.zeros(4, dtype=np.float32)
    return from_arrays("tabular", X, y, X, y, task, 2 if task == "classification" else 0)


def _outputs(model, data, n=5):
    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(data.X_test[:n])))


# -- the registry -------------------------------------------------------------

@pytest.mark.parametrize("name", [n for n in REGISTRY if n not in ("linear", "gpt")])
def test_registry_classifier_gives_ten_outputs_per_digit(digits, name):
    # Prepare / Execute
    model = build_model(name, digits, hidden=(16, 8))

    # Assert
    assert isinstance(model, torch.nn.Module)
    assert _outputs(model, digits).shape == (5, 10)


@pytest.mark.parametrize("name", ["mlp", "linear"])
def test_registry_regressor_gives_one_output_per_sample(diabetes, name):
    # Prepare / Execute
    model = build_model(name, diabetes, hidden=(16,))

    # Assert
    assert _outputs(model, diabetes).shape == (5, 1)


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_cnn_on_non_image_data_raises_usage_error(task):
    # Prepare / Execute / Assert
    with pytest.raises(UsageError, match="cnn needs image-shaped samples"):
        build_model("cnn", _tabular(task))


def test_logreg_on_regression_raises_usage_error(diabetes):
    # Prepare / Execute / Assert
    with pytest.raises(UsageError, match="use --model linear"):
        build_model("logreg", diabetes)


def test_linear_on_classification_raises_usage_error(digits):
    # Prepare / Execute / Assert
    with pytest.raises(UsageError, match="use --model logreg"):
        build_model("linear", digits)


def test_unknown_model_name_raises_usage_error(digits):
    # Prepare / Execute / Assert
    with pytest.raises(UsageError, match="--model must be one of"):
        build_model("resnet", digits)


@pytest.mark.parametrize("name", ["mlp", "cnn", "logreg"])
def test_same_seed_gives_identical_initial_weights(digits, name):
    # Prepare / Execute
    first, again = (build_model(name, digits, seed=11) for _ in range(2))
    other = build_model(name, digits, seed=12)

    # Assert
    pairs = list(zip(first.state_dict().values(), again.state_dict().values()))
    assert all(torch.equal(a, b) for a, b in pairs)
    assert not all(torch.equal(a, b) for a, b in zip(first.state_dict().values(),
                                                       other.state_dict().values()))


# -- the user's models --------------------------------------------------------

def test_user_model_from_a_file_path(digits, user_file):
    # Prepare / Execute
    model = build_model(f"{user_file}:good", digits)

    # Assert
    assert _outputs(model, digits).shape == (5, 10)


def test_user_model_from_a_module(digits, user_module):
    # Prepare / Execute
    model = build_model(f"{user_module}:good", digits)

    # Assert
    assert _outputs(model, digits).shape == (5, 10)


def test_user_model_with_the_same_seed_gives_identical_weights(digits, user_file):
    # Prepare / Execute
    first, again = (build_model(f"{user_file}:good", digits, seed=3) for _ in range(2))

    # Assert
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), again.parameters()))


def test_user_regressor_may_return_one_value_per_sample(diabetes, user_file):
    # Prepare / Execute
    model = build_model(f"{user_file}:flat_regression", diabetes)

    # Assert
    assert _outputs(model, diabetes).shape == (5,)


def test_user_model_with_batchnorm_is_accepted_and_left_in_training_mode(digits, user_file):
    # Prepare / Execute
    model = build_model(f"{user_file}:batchnorm", digits)

    # Assert
    assert model.training and all(m.training for m in model.modules())
    assert _outputs(model, digits).shape == (5, 10)


def test_user_model_file_with_a_postponed_annotation_dataclass_loads(digits, tmp_path):
    # Prepare: dataclasses resolve string annotations through sys.modules[cls.__module__]
    path = tmp_path / "configured.py"
    path.write_text(textwrap.dedent("""
        from __future__ import annotations

        import math
        from dataclasses import dataclass

        from torch import nn

        @dataclass
        class Settings:
            width: int = 8

        def make(input_shape, num_outputs):
            width = Settings().width
            return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), width),
                                 nn.Linear(width, num_outputs))
    """))

    # Execute
    model = build_model(f"{path}:make", digits)

    # Assert
    assert _outputs(model, digits).shape == (5, 10)


USER_ERRORS = [
    ("wrong_size", r"outputs shape \(2, 11\) for a batch of 2.*needs \(2, 10\)"),
    ("not_a_module", "returned function, not a torch.nn.Module"),
    ("wrong_input", "does not accept samples of shape"),
    ("missing", "has no function 'missing'"),
    ("not_callable", "has no function 'not_callable'"),
    ("raises", r"raises\(\(1, 8, 8\), 10\) failed: ValueError: no such layer size"),
    ("no_parameters", "has no trainable parameters"),
    ("all_frozen", "has no trainable parameters"),
]


@pytest.mark.parametrize("func, message", USER_ERRORS, ids=[f for f, _ in USER_ERRORS])
def test_bad_user_model_from_a_file_raises_usage_error(digits, user_file, func, message):
    # Prepare / Execute / Assert
    with pytest.raises(UsageError, match=message) as raised:
        build_model(f"{user_file}:{func}", digits)
    assert f"--model {user_file}:{func}" in str(raised.value)


@pytest.mark.parametrize("func, message", USER_ERRORS[:2], ids=[f for f, _ in USER_ERRORS[:2]])
def test_bad_user_model_from_a_module_raises_usage_error(digits, user_module, func, message):
    # Prepare / Execute / Assert
    with pytest.raises(UsageError, match=message):
        build_model(f"{user_module}:{func}", digits)


def test_user_model_file_that_does_not_exist_raises_usage_error(digits, tmp_path):
    # Prepare / Execute / Assert
    with pytest.raises(UsageError, match="no such file"):
        build_model(f"{tmp_path / 'absent.py'}:good", digits)


def test_user_module_that_cannot_be_imported_raises_usage_error(digits):
    # Prepare / Execute / Assert
    with pytest.raises(UsageError, match="cannot import distml_no_such_module"):
        build_model("distml_no_such_module:good", digits)


def test_user_file_that_fails_to_import_raises_usage_error(digits, tmp_path):
    # Prepare
    path = tmp_path / "broken.py"
    path.write_text("raise RuntimeError('boom')\n")

    # Execute / Assert
    with pytest.raises(UsageError, match="cannot import.*RuntimeError: boom"):
        build_model(f"{path}:good", digits)
