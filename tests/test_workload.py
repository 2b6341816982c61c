"""Your own workload, in one process: user Datasets and losses, their checks, the recipe's pieces,
and loading workers (no mpirun: the size-1 world)."""
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from distml import comm
from distml.config import Config, UsageError
from distml.data import load_dataset
from distml.data.arrays import ArraySplit, _map_npz
from distml.data.loader import Loader
from distml.losses import cross_entropy, mse
from distml.strategies.base import clip_grad_norm_, make_optimizer, summed_loss
from distml.agreement import data_fingerprint
from distml.trainer import run

CASES = Path(__file__).parent / "workload_cases.py"
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "my_data.py"
WORKLOAD = Path(__file__).parent / "mpi" / "workload_data.py"


def _run(**settings):
    cfg = Config(**{"dataset": f"{CASES}:good", "model": "mlp", "hidden": "4", "epochs": 1, "quiet": True,
                    "watchdog": 0, **settings})
    return run(cfg, comm.world())


BAD = {
    "function raises": (dict(dataset=f"{CASES}:raises"), r"raises\(\) failed: FileNotFoundError: images/ is missing"),
    "not a Dataset": (dict(dataset=f"{CASES}:not_a_dataset"), "is a dict, not a map-style torch.utils.data.Dataset"),
    "empty": (dict(dataset=f"{CASES}:empty"), "the train set is empty"),
    "shapes differ": (dict(dataset=f"{CASES}:ragged"), "items differ in shape .* give the Dataset a collate"),
    "text targets": (dict(dataset=f"{CASES}:text_targets"), "target is not a tensor, array or number"),
    "bool targets": (dict(dataset=f"{CASES}:bool_targets"), "target is torch.bool, not a number"),
    "loss of the wrong shape": (dict(loss=f"{CASES}:mean_loss"), r"returned a torch.float32 tensor of shape \(\) "
                                                                  r"for a batch of 2; it must return one loss per"),
    "loss not a tensor": (dict(loss=f"{CASES}:list_loss"), "returned list, not a tensor"),
    "cross-entropy on real targets": (dict(dataset=f"{EXAMPLE}:make", model=f"{EXAMPLE}:net", loss="cross_entropy"),
                                      "--loss cross_entropy needs class"),
    "natural without groups": (dict(dataset=f"{CASES}:no_groups", mode="federated", partition="natural"),
                               "has no groups"),
    "accumulate 0": (dict(accumulate=0), "--accumulate must be >= 1, got 0"),
    "negative clip": (dict(clip_norm=-1.0), "--clip-norm must be > 0, or 0 for no clipping, got -1.0"),
    "text missing": (dict(dataset="text:/no/such/place", model="gpt"), "text:/no/such/place"),
    "text empty path": (dict(dataset="text:", model="gpt"), "needs a path after the colon"),
    "unknown loss": (dict(loss="hinge"), "--loss must be one of cross_entropy, mse"),
    "bad betas": (dict(optimizer="adamw", betas="0.9"), "--betas must be two numbers"),
    "accumulate with overlap": (dict(accumulate=2, overlap=True), "--overlap .* cannot accumulate"),
    "test inputs of another shape": (dict(dataset=f"{CASES}:wider_test"), r"test items have inputs \(5,\)"),
    "real test targets, class training targets": (dict(dataset=f"{CASES}:real_test_targets"),
                                                  "training targets are torch.int64, test targets torch.float32"),
    "class beyond num_classes": (dict(dataset=f"{CASES}:beyond_num_classes"), r"must lie in \[0, 3\).*found 3"),
    "negative class": (dict(dataset=f"{CASES}:negative_label"), "found -1"),
    "targets of the wrong length": (dict(dataset=f"{CASES}:short_targets"), "targets must hold one integer per "
                                                                          r"sample \(40\)"),
    "unpicklable with workers": (dict(dataset=f"{CASES}:unpicklable", data_workers=1),
                                 "--data-workers: the Dataset cannot be sent to loading workers"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_workload_is_a_usage_error_before_training(case):
    settings, expected = BAD[case]
    with pytest.raises(UsageError, match=expected):
        _run(**settings)


@pytest.mark.parametrize("kind", ["empty", "binary"])
def test_text_of_an_empty_or_binary_file_is_a_usage_error(tmp_path, kind):
    path = tmp_path / "book.txt"
    path.write_bytes(b"" if kind == "empty" else b"\x00\x01\xff\xfe" * 100)

    with pytest.raises(UsageError, match=f"--dataset text:{path}"):
        _run(dataset=f"text:{path}", model="gpt")


def test_items_of_differing_shapes_train_with_the_datasets_collate():
    result = _run(dataset=f"{CASES}:padded")

    assert result.summary["train_loss"] > 0


def test_held_out_test_split_and_float64_inputs_become_float32():
    data = load_dataset(Config(dataset=f"{CASES}:float64_inputs", test_fraction=0.2))
    x, y = data.train.batch(np.arange(3))

    assert (len(data.train), len(data.test)) == (24, 6)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert data.task == "classification" and data.num_classes == 2
    assert not set(data.train.indices) & set(data.test.indices)


def test_sequence_cross_entropy_is_each_samples_mean_over_positions():
    gen = torch.Generator().manual_seed(0)
    out, target = torch.randn(3, 5, 7, generator=gen), torch.randint(0, 7, (3, 5), generator=gen)

    per_sample = cross_entropy(out, target)

    expected = torch.stack([F.cross_entropy(out[i], target[i]) for i in range(3)])
    assert per_sample.shape == (3,)
    assert torch.allclose(per_sample, expected, atol=1e-6)


def test_mse_per_sample_matches_the_summed_loss_of_one_output_models():
    out, target = torch.tensor([[1.0], [2.0], [4.0]]), torch.tensor([1.5, 2.0, 1.0])

    assert mse(out, target).tolist() == [0.25, 0.0, 9.0]


def test_adamw_decays_only_weights_of_two_or_more_dimensions():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    cfg = Config(optimizer="adamw", weight_decay=0.1, betas="0.8,0.95")

    optimizer = make_optimizer(cfg, model.named_parameters())

    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert [tuple(p.shape) for p in decayed["params"]] == [(4, 3), (2, 4)]
    assert len(plain["params"]) == 4  # two biases, the norm's weight and bias
    assert decayed["betas"] == (0.8, 0.95) and isinstance(optimizer, torch.optim.AdamW)


def test_clip_grad_norm_matches_torch_over_flat_buffers():
    grads = [torch.tensor([3.0, 4.0]), torch.tensor([12.0])]
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))]
    for p, g in zip(params, grads):
        p.grad = g.clone()

    norm = clip_grad_norm_(grads, 1.3)
    expected = torch.nn.utils.clip_grad_norm_(params, 1.3)

    assert norm == pytest.approx(13.0) and float(expected) == pytest.approx(13.0)
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, params))
    assert torch.linalg.vector_norm(torch.cat(grads)).item() == pytest.approx(1.3, rel=1e-5)


def test_bf16_runs_forward_in_bfloat16_and_keeps_the_loss_and_gradients_float32():
    model = torch.nn.Linear(8, 3)
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    seen = []
    model.register_forward_hook(lambda m, i, out: seen.append(out.dtype))

    loss32, loss16 = (summed_loss(model, cross_entropy, x, y, p) for p in ("float32", "bf16"))
    loss16.backward()

    assert seen == [torch.float32, torch.bfloat16]
    assert loss16.dtype == torch.float32 and model.weight.grad.dtype == torch.float32
    assert 0 < abs(loss16.item() - loss32.item()) < 0.05 * loss32.item()  # rounded, not another loss


def test_loading_workers_give_the_same_batches_and_never_initialise_mpi(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTML_TEST_RECORD", str(tmp_path))
    data = load_dataset(Config(dataset=f"{CASES}:recorder"))
    lists = [np.array([5, 1, 9]), np.array([0, 2]), np.array([7, 3, 4, 8])]
    loader = Loader(data.train, workers=2)
    try:
        batches = [loader.get("train", 0, lists, i) for i in range(len(lists))]
        again = loader.get("train", 0, lists, 1)  # a jump back restarts the stream there
    finally:
        loader.close()

    for (x, y), indices in zip(batches, lists):
        want = data.train.batch(indices)
        assert torch.equal(x, want[0]) and torch.equal(y, want[1])
    assert torch.equal(again[0], batches[1][0])
    records = [p.read_text().split() for p in tmp_path.glob("worker-*.txt")]
    assert records, "no worker loaded an item"
    assert all(initialised == "0" and int(parent) != os.getpid() for initialised, parent, _ in records)


def test_a_memory_mapped_split_pickles_as_its_file_not_its_bytes(tmp_path):
    X = np.arange(4000, dtype=np.float32).reshape(1000, 4)
    np.savez(tmp_path / "d.npz", X=X, y=np.zeros(1000, np.int64))
    arrays = _map_npz(tmp_path / "d.npz")
    split = ArraySplit(arrays["X"], arrays["y"])

    blob = pickle.dumps(split)
    back = pickle.loads(blob)

    assert len(blob) < 2000  # the 16 kB of values stay in the file
    assert isinstance(back.X, np.memmap) and np.array_equal(back.X, X)


def test_the_example_workload_loads_with_its_model_and_loss():
    result = _run(dataset=f"{EXAMPLE}:make", model=f"{EXAMPLE}:net", loss=f"{EXAMPLE}:loss", batch_size=64)

    assert result.summary["test_r2"] > 0.5  # one epoch already predicts the waves


def test_natural_partition_with_more_clients_a_round_than_groups_is_a_usage_error():
    with pytest.raises(UsageError, match="--clients-per-round 9 is more than the 7 natural clients"):
        _run(dataset=f"{WORKLOAD}:labelled", mode="federated", partition="natural", clients_per_round=9)


def test_random_augmentation_draws_per_item_the_same_in_any_batch_process_or_rerun():
    data = load_dataset(Config(dataset=f"{CASES}:augmented"))
    lists = [np.array([3, 1, 4]), np.array([1, 5]), np.array([9, 2, 6])]
    here, workers = Loader(data.train), Loader(data.train, workers=2)
    try:
        mine = [here.get("train", 1, lists, i) for i in range(3)]
        theirs = [workers.get("train", 1, lists, i) for i in range(3)]
    finally:
        workers.close()
    raw = data.train.dataset.x  # the training set is the whole Dataset: no held-out indices

    assert all(torch.equal(a[0], b[0]) for a, b in zip(mine, theirs))  # loading workers draw the same
    assert torch.equal(mine[0][0][1], mine[1][0][0])  # sample 1 in two batches (two ranks): the same draw
    assert torch.equal(here.get("train", 1, lists, 0)[0], mine[0][0])  # a resumed run draws it again
    assert not torch.equal(mine[1][0][0], here.get("train", 2, lists, 1)[0][0])  # another epoch: another draw
    assert not torch.allclose(mine[0][0][0], raw[3])  # augmented: not the plain item
    assert not torch.equal(mine[0][0][0] - raw[3], mine[0][0][1] - raw[1])  # each item its own noise


def test_training_epochs_leave_the_test_split_and_the_fingerprint_as_they_were():
    data = load_dataset(Config(dataset=f"{CASES}:epochal", test_fraction=0.2))
    before = (data_fingerprint(data), data.test.batch(np.arange(5))[0].clone())
    loader = Loader(data.train)

    x, _ = loader.get("train", 3, [np.arange(4)], 0)

    assert torch.equal(x, data.train.dataset.x[data.train.indices[:4]] + 3)  # the loader's epoch 3
    assert data_fingerprint(data) == before[0]
    assert torch.equal(data.test.batch(np.arange(5))[0], before[1])


def test_an_npz_with_its_own_test_split_reaches_loading_workers(tmp_path):
    X = np.arange(1000, dtype=np.float64).reshape(250, 4)  # float64 and int32: converted copies, not maps
    np.savez(tmp_path / "d.npz", X=X[:200], y=(np.arange(200) % 3).astype(np.int32), X_test=X[200:],
             y_test=(np.arange(50) % 3).astype(np.int32))
    data = load_dataset(Config(dataset=str(tmp_path / "d.npz")))
    loader = Loader(data.train, workers=1)
    try:
        x, y = loader.get("train", 0, [np.array([0, 7, 199])], 0)
    finally:
        loader.close()

    assert torch.equal(x, torch.from_numpy(X[[0, 7, 199]].astype(np.float32)))
    assert y.tolist() == [0, 1, 1]


def test_a_model_whose_output_is_not_one_value_per_target_reports_the_loss_only():
    result = _run(dataset=f"{CASES}:gaussian", model=f"{CASES}:gaussian_net", loss=f"{CASES}:gaussian_nll")

    assert "test_loss" in result.summary
    assert "test_mse" not in result.summary and "test_r2" not in result.summary
