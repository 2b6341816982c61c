"""Unit tests of the non-finite check, its message and the flag it travels as (no MPI)."""
import pytest
import torch
from torch import nn

from distml.nonfinite import NonFinite, describe_ranks, diagnosis, first_nonfinite, grads_finite
from distml.strategies.base import Flags


def _model_with_grads(bad=None):
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    model(torch.ones(5, 3)).sum().backward()
    if bad is not None:
        dict(model.named_parameters())[bad].grad[0] = float("nan")
    return model


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_grads_finite_finds_any_nan_or_infinity_in_any_buffer(value):
    buffers = [torch.ones(10), torch.zeros(0), torch.ones(1000)]
    assert grads_finite(buffers)
    buffers[2][500] = value
    assert not grads_finite(buffers)


def test_first_nonfinite_names_the_loss_before_any_gradient():
    model = _model_with_grads(bad="2.weight")
    grads = [p.grad.reshape(-1) for p in model.parameters()]
    assert first_nonfinite(float("nan"), grads, model) == "loss"
    assert first_nonfinite(1.5, grads, model) == "2.weight.grad"


def test_first_nonfinite_is_none_when_loss_and_gradients_are_finite():
    model = _model_with_grads()
    assert first_nonfinite(1.5, [p.grad.reshape(-1) for p in model.parameters()], model) is None


def test_diagnosis_lists_the_ranks_that_saw_one_and_names_the_lowest_ranks_tensor():
    assert diagnosis([None, "loss", "0.weight.grad"]) == ([1, 2], "loss")
    assert describe_ranks([1]) == "rank 1" and describe_ranks([0, 2]) == "ranks 0, 2"


def test_nonfinite_message_names_where_who_and_what_and_says_no_checkpoint_was_written():
    error = NonFinite("epoch 2, step 3 of 23", [1], "loss")
    assert str(error) == ("non-finite loss at epoch 2, step 3 of 23 on rank 1: every rank stopped there, "
                          "no checkpoint written (the newest one is the last good state)")


def test_flags_agree_on_one_withheld_update_whichever_ranks_saw_a_nonfinite_value():
    ranks = [Flags(nonfinite=True), Flags(stop=True), Flags(nonfinite=True)]
    summed = Flags.summed([sum(v) for v in zip(*(f.values() for f in ranks))])
    assert (summed.stop, summed.checkpoint, summed.nonfinite) == (True, False, 1)
    assert Flags.summed(Flags().values()).nonfinite == 0
