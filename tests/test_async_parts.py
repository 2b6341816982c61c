"""Pieces of the parameter-server mode that need no MPI."""
import pytest
import torch
from torch import nn

from distml.flat import FlatModel
from distml.strategies.async_ps import server_ranges


@pytest.mark.parametrize("numel,servers", [(10, 1), (10, 3), (7, 7), (100, 4)])
def test_server_ranges_cover_the_vector_once_in_order(numel, servers):
    ranges = server_ranges(numel, servers)

    assert len(ranges) == servers
    assert ranges[0][0] == 0 and ranges[-1][1] == numel
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert max(b - a for a, b in ranges) - min(b - a for a, b in ranges) <= 1


def test_flat_model_parameters_and_gradients_are_views_of_flat_buffers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    before = [p.detach().clone() for p in model.parameters()]

    flat = FlatModel(model)
    model(torch.randn(5, 3)).sum().backward()

    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))  # values kept
    flat.data.zero_()
    assert all(p.abs().sum() == 0 for p in model.parameters())  # params live in flat.data
    assert flat.grad.abs().sum() > 0  # backward accumulated into flat.grad
    assert flat.data.numel() == sum(p.numel() for p in model.parameters())
