"""Unit tests for `distml.reducer`: bucket planning and gradients as bucket views.

The reducer runs on the size-1 world (no mpirun), where Allreduce is the
identity, so the gradients must equal those of a model trained without it.
"""
import copy
import gc
import weakref

import pytest
import torch
from torch import nn

import distml
from distml import comm
from distml.api import DistributedOptimizer
from distml.reducer import GradientReducer, plan_buckets


# -- plan_buckets -------------------------------------------------------------

def _tensors():
    """Mixed sizes: 4 B, 40 B, 400 B, 8 B, 4000 B, 24 B (all float32)."""
    return [torch.zeros(n) for n in (1, 10, 100, 2, 1000, 6)]


def _nbytes(bucket):
    return sum(p.numel() * p.element_size() for p in bucket)


@pytest.mark.parametrize("bucket_bytes", [0, 1, 3, 4, 40, 44, 100, 500, 4000, 10**9])
def test_plan_puts_each_parameter_in_exactly_one_bucket_in_order(bucket_bytes):
    # Prepare
    params = _tensors()

    # Execute
    buckets = plan_buckets(params, bucket_bytes)

    # Assert
    flat = [p for bucket in buckets for p in bucket]
    assert len(flat) == len(params)
    assert all(a is b for a, b in zip(flat, params))
    assert all(bucket for bucket in buckets)


@pytest.mark.parametrize("bucket_bytes", [0, 1, 3, 4, 40, 44, 100, 500, 4000, 10**9])
def test_plan_respects_the_cap_except_for_single_oversized_parameters(bucket_bytes):
    # Prepare / Execute
    buckets = plan_buckets(_tensors(), bucket_bytes)

    # Assert
    for bucket in buckets:
        assert _nbytes(bucket) <= bucket_bytes or len(bucket) == 1


@pytest.mark.parametrize("bucket_bytes", [0, 1, 3])
def test_plan_with_a_cap_below_one_parameter_gives_one_bucket_each(bucket_bytes):
    # Prepare / Execute
    buckets = plan_buckets(_tensors(), bucket_bytes)

    # Assert
    assert [len(b) for b in buckets] == [1] * 6


def test_plan_with_a_large_cap_gives_one_bucket():
    # Prepare / Execute
    buckets = plan_buckets(_tensors(), 10**9)

    # Assert
    assert len(buckets) == 1


def test_plan_gives_an_oversized_parameter_its_own_bucket():
    # Prepare: cap 100 B; the 400 B and 4000 B tensors exceed it
    params = _tensors()

    # Execute
    buckets = plan_buckets(params, 100)

    # Assert
    assert [[p.numel() for p in b] for b in buckets] == [[1, 10], [100], [2], [1000], [6]]


def test_plan_splits_buckets_where_the_dtype_changes():
    # Prepare
    params = [torch.zeros(2), torch.zeros(2), torch.zeros(2, dtype=torch.float64),
              torch.zeros(2, dtype=torch.float64), torch.zeros(2)]

    # Execute
    buckets = plan_buckets(params, 10**9)

    # Assert
    assert [[p.dtype for p in b] for b in buckets] == [
        [torch.float32] * 2, [torch.float64] * 2, [torch.float32]]


def test_plan_of_no_parameters_is_empty():
    # Prepare / Execute / Assert
    assert plan_buckets([], 100) == []


# -- GradientReducer on the size-1 world -------------------------------------

class MixedNet(nn.Module):
    """Conv, linear with bias, a scalar parameter, a frozen one and an unused one."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.fc = nn.Linear(3 * 4 * 4, 5)
        self.scale = nn.Parameter(torch.tensor(1.5))
        self.frozen = nn.Parameter(torch.ones(5), requires_grad=False)
        self.unused = nn.Parameter(torch.ones(7))

    def forward(self, x):
        h = torch.relu(self.conv(x)).flatten(1)
        return self.scale * self.fc(h) + self.frozen


def _model():
    torch.manual_seed(0)
    return MixedNet()


def _loss(model, seed=1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 1, 4, 4, generator=generator)
    y = torch.randn(6, 5, generator=generator)
    return ((model(x) - y) ** 2).mean()


def _reference_grads(model, seed=1):
    """The gradients of `model`'s copy computed with plain autograd, by name."""
    reference = copy.deepcopy(model)
    reference.zero_grad(set_to_none=True)
    _loss(reference, seed).backward()
    return {name: p.grad for name, p in reference.named_parameters()}


def _in_buffer(tensor, buffer):
    start, end = buffer.data_ptr(), buffer.data_ptr() + buffer.numel() * buffer.element_size()
    t_start = tensor.data_ptr()
    return start <= t_start and t_start + tensor.numel() * tensor.element_size() <= end


def _bucket_of(reducer, param):
    (bucket,) = [b for b in reducer.buckets if any(p is param for p in b.params)]
    return bucket


def _poisoned(reducer):
    """zero_grad(), then NaN in every bucket: a gradient read from a slice backward did not write shows."""
    reducer.zero_grad()
    for bucket in reducer.buckets:
        bucket.buffer.fill_(float("nan"))


BUCKET_MB = [1e-9, 1e-4, 25.0]  # one parameter per bucket, a few per bucket, one bucket


@pytest.mark.parametrize("bucket_mb", BUCKET_MB)
def test_every_trainable_grad_is_a_view_into_its_bucket_buffer(bucket_mb):
    # Prepare
    model = _model()

    # Execute
    reducer = GradientReducer(model.parameters(), comm.world(), bucket_mb=bucket_mb)

    # Assert
    for p in model.parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.shape == p.shape
            assert _in_buffer(p.grad, _bucket_of(reducer, p).buffer)
            assert torch.all(p.grad == 0)


def test_a_parameter_listed_twice_gets_one_slot_in_the_buckets():
    # Prepare: e.g. a tied weight, or the same module put in two param groups
    shared, other = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2))

    # Execute
    reducer = GradientReducer([shared, other, shared], comm.world())

    # Assert
    bucketed = [p for b in reducer.buckets for p in b.params]
    assert len(bucketed) == 2 and bucketed[0] is shared and bucketed[1] is other
    assert sum(b.buffer.numel() for b in reducer.buckets) == 5
    assert _in_buffer(shared.grad, _bucket_of(reducer, shared).buffer)


def test_frozen_parameters_are_left_out_of_the_buckets():
    # Prepare
    model = _model()

    # Execute
    reducer = GradientReducer(model.parameters(), comm.world())

    # Assert
    bucketed = [p for b in reducer.buckets for p in b.params]
    assert not any(p is model.frozen for p in bucketed)
    assert len(bucketed) == sum(1 for p in model.parameters() if p.requires_grad)
    assert model.frozen.grad is None


@pytest.mark.parametrize("bucket_mb", BUCKET_MB)
def test_backward_accumulates_into_the_buffers_in_place(bucket_mb):
    # Prepare
    model = _model()
    expected = _reference_grads(model)
    reducer = GradientReducer(model.parameters(), comm.world(), bucket_mb=bucket_mb)
    pointers = {name: p.grad.data_ptr() for name, p in model.named_parameters() if p.requires_grad}

    # Execute
    _loss(model).backward()
    reducer.allreduce_grads()

    # Assert
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        assert p.grad.data_ptr() == pointers[name], name
        if expected[name] is None:
            assert torch.all(p.grad == 0), name
        else:
            torch.testing.assert_close(p.grad, expected[name], rtol=0, atol=0)


@pytest.mark.parametrize("after_zero_grad", [False, True])
def test_two_backwards_sum_in_the_buffers(after_zero_grad):
    # Prepare: grads attached (zero) as made, or None after zero_grad() with NaN left in the buckets
    model = _model()
    first, second = _reference_grads(model, seed=1), _reference_grads(model, seed=2)
    reducer = GradientReducer(model.parameters(), comm.world(), bucket_mb=1e-4)
    if after_zero_grad:
        _poisoned(reducer)

    # Execute
    _loss(model, seed=1).backward()
    _loss(model, seed=2).backward()
    reducer.allreduce_grads()

    # Assert
    for name, p in model.named_parameters():
        if p.requires_grad and first[name] is not None:
            assert _in_buffer(p.grad, _bucket_of(reducer, p).buffer), name
            torch.testing.assert_close(p.grad, first[name] + second[name], rtol=0, atol=0)


def test_unused_parameter_keeps_a_zero_grad():
    # Prepare
    model = _model()
    reducer = GradientReducer(model.parameters(), comm.world())

    # Execute
    _loss(model).backward()
    reducer.allreduce_grads()

    # Assert
    assert model.unused.grad is not None
    assert torch.all(model.unused.grad == 0)
    assert _in_buffer(model.unused.grad, _bucket_of(reducer, model.unused).buffer)


@pytest.mark.parametrize("bucket_mb", BUCKET_MB)
def test_grads_set_to_none_are_reattached_with_correct_values(bucket_mb):
    # Prepare: one step, then the user drops the grads as plain PyTorch would
    model = _model()
    reducer = GradientReducer(model.parameters(), comm.world(), bucket_mb=bucket_mb)
    _loss(model, seed=1).backward()
    reducer.allreduce_grads()
    model.zero_grad(set_to_none=True)
    expected = _reference_grads(model, seed=2)

    # Execute
    _loss(model, seed=2).backward()
    reducer.allreduce_grads()

    # Assert
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        assert _in_buffer(p.grad, _bucket_of(reducer, p).buffer), name
        want = torch.zeros_like(p) if expected[name] is None else expected[name]
        torch.testing.assert_close(p.grad, want, rtol=0, atol=0)


def test_zero_grad_without_set_to_none_zeroes_in_place_and_keeps_the_views():
    # Prepare
    model = _model()
    reducer = GradientReducer(model.parameters(), comm.world())
    _loss(model).backward()
    pointers = [p.grad.data_ptr() for p in model.parameters() if p.requires_grad]

    # Execute
    reducer.zero_grad(set_to_none=False)

    # Assert
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert [p.grad.data_ptr() for p in trainable] == pointers
    assert all(torch.all(p.grad == 0) for p in trainable)


def test_zero_grad_after_grads_were_replaced_gives_zero_attached_grads():
    # Prepare: backward after set_to_none leaves grads outside the buffers
    model = _model()
    reducer = GradientReducer(model.parameters(), comm.world())
    model.zero_grad(set_to_none=True)
    _loss(model).backward()

    # Execute
    reducer.zero_grad(set_to_none=False)

    # Assert
    for p in model.parameters():
        if p.requires_grad:
            assert _in_buffer(p.grad, _bucket_of(reducer, p).buffer)
            assert torch.all(p.grad == 0)


# -- zero_grad() sets None; backward writes straight into the buckets -------------------

@pytest.mark.parametrize("bucket_mb", BUCKET_MB)
def test_after_zero_grad_backward_writes_each_gradient_into_its_slice_without_zeroing(bucket_mb):
    # Prepare
    model = _model()
    expected = _reference_grads(model, seed=3)
    reducer = GradientReducer(model.parameters(), comm.world(), bucket_mb=bucket_mb)
    _poisoned(reducer)
    slices = {id(p): v.data_ptr() for b in reducer.buckets for p, v in zip(b.params, b.views)}

    # Execute
    _loss(model, seed=3).backward()
    kept = {name: p.grad is not None and p.grad.data_ptr() == slices[id(p)]
            for name, p in model.named_parameters() if p.requires_grad and expected[name] is not None}
    reducer.allreduce_grads()

    # Assert: autograd kept the slices as .grad (no copy), values exact, the unused one zero
    assert all(kept.values()), kept
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad.data_ptr() == slices[id(p)], name
            want = torch.zeros_like(p) if expected[name] is None else expected[name]
            torch.testing.assert_close(p.grad, want, rtol=0, atol=0)


def test_attach_grads_before_the_reduction_shows_this_steps_gradients_in_the_buckets():
    # Prepare: what the trainer's non-finite check reads; stale NaN must not survive in unused slices
    model = _model()
    reducer = GradientReducer(model.parameters(), comm.world())
    _poisoned(reducer)
    _loss(model).backward()

    # Execute
    reducer.attach_grads()

    # Assert
    assert all(torch.isfinite(b.grads).all() for b in reducer.buckets)
    assert torch.all(model.unused.grad == 0)


def test_gradients_autograd_would_copy_still_reach_the_buckets_exactly():
    # Prepare: create_graph (autograd copies), a channels_last conv weight (a contiguous slice
    # breaks its layout), and a sparse embedding gradient: all go the attach_grads() way
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3).to(memory_format=torch.channels_last)
    embedding = nn.Embedding(10, 4, sparse=True)
    x, ids = torch.randn(2, 2, 5, 5), torch.tensor([1, 3, 3])
    reference = copy.deepcopy((conv, embedding))
    loss_of = lambda c, e: c(x).pow(2).sum() + e(ids).pow(2).sum()  # noqa: E731
    loss_of(*reference).backward()
    reducer = GradientReducer([*conv.parameters(), *embedding.parameters()], comm.world())
    _poisoned(reducer)

    # Execute
    loss_of(conv, embedding).backward(create_graph=True)
    reducer.allreduce_grads()

    # Assert
    for got, want in zip([*conv.parameters(), *embedding.parameters()],
                         [*reference[0].parameters(), *reference[1].parameters()]):
        assert _in_buffer(got.grad, _bucket_of(reducer, got).buffer)
        torch.testing.assert_close(got.grad, want.grad.to_dense(), rtol=0, atol=0)


def test_two_reducers_on_one_model_each_reduce_the_right_gradients_and_a_dropped_one_is_collected():
    # Prepare
    model = _model()
    expected = _reference_grads(model)
    first = GradientReducer(model.parameters(), comm.world())
    second = GradientReducer(model.parameters(), comm.world())

    # Execute
    for reducer in (first, second):
        reducer.zero_grad()
        _loss(model).backward()
        reducer.allreduce_grads()
        got = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
        # Assert
        for name, value in got.items():
            want = torch.zeros_like(value) if expected[name] is None else expected[name]
            torch.testing.assert_close(value, want, rtol=0, atol=0)
    dropped = weakref.ref(first)
    del first
    gc.collect()
    assert dropped() is None  # the hooks on the parameters hold it weakly


def test_autograd_grad_results_are_not_views_of_the_buckets():
    # Prepare: torch.autograd.grad() with .grad None must not return (and later overwrite) a bucket slice
    model = _model()
    reducer = GradientReducer(model.parameters(), comm.world())
    reducer.zero_grad()

    # Execute
    (first,) = torch.autograd.grad(_loss(model, seed=1), model.fc.weight)
    kept = first.clone()
    torch.autograd.grad(_loss(model, seed=2), model.fc.weight)
    _loss(model, seed=3).backward()
    reducer.allreduce_grads()

    # Assert
    assert not _in_buffer(first, _bucket_of(reducer, model.fc.weight).buffer)
    assert torch.equal(first, kept)


class _TwoRanks:
    """A size-2 communicator whose other rank's gradients are this rank's + 1: their average is local + 0.5.

    The other rank's buffer holds its share, (gradient + 1) / 2, that is this
    rank's share + 0.5; or, with whole=True (reducers that divide after the
    reduction), this rank's buffer + 1.
    """
    size = 2

    def __init__(self, whole=False):
        self.offset = 1.0 if whole else 0.5

    def allreduce_(self, tensor, what=None):
        return tensor.mul_(2).add_(self.offset)

    def iallreduce_(self, tensor, op="sum"):
        return tensor

    def wait(self, request, what=None):
        request.mul_(2).add_(self.offset)


class _Odd(nn.Module):
    """Gradients autograd keeps outside their slices: channels_last conv, sparse embedding, a user hook."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3).to(memory_format=torch.channels_last)
        self.embedding = nn.Embedding(10, 27, sparse=True)
        self.fc = nn.Linear(27, 2)

    def forward(self, x, ids):
        return self.fc(self.conv(x).flatten(1) + self.embedding(ids))


@pytest.mark.parametrize("overlap", [False, True])
def test_gradients_kept_outside_the_slices_are_reduced_with_and_without_overlap(overlap):
    # Prepare
    torch.manual_seed(0)
    model = _Odd()
    reference = copy.deepcopy(model)
    for m in (model, reference):
        m.fc.weight.register_hook(lambda g: g * 2)  # a user's hook returning a new tensor
    x, ids = torch.randn(2, 2, 5, 5), torch.tensor([1, 3])
    reducer = GradientReducer(model.parameters(), _TwoRanks(), bucket_mb=1e-9, overlap=overlap)

    for step in range(2):
        # Execute
        reducer.zero_grad()
        model(x * (step + 1), ids).pow(2).sum().backward()
        reducer.allreduce_grads()
        reference.zero_grad()
        reference(x * (step + 1), ids).pow(2).sum().backward()

        # Assert
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad, q.grad.to_dense() + 0.5, msg=f"step {step} {name}")


# -- op="average" divides as gradients enter the buckets --------------------------------

def _slices(reducer):
    return {id(p): v for b in reducer.buckets for p, v in zip(b.params, b.views)}


def _want(expected, name, p, plus=0.0):
    return (torch.zeros_like(p) if expected[name] is None else expected[name]) + plus


@pytest.mark.parametrize("op, share", [("average", 0.5), ("sum", 1.0)])
def test_until_the_reduction_each_slice_holds_this_ranks_share_and_the_result_needs_no_division(op, share):
    # Prepare
    model = _model()
    expected = _reference_grads(model)
    reducer = GradientReducer(model.parameters(), _TwoRanks(whole=op == "sum"), bucket_mb=1e-4, op=op)
    _poisoned(reducer)
    slices = _slices(reducer)

    # Execute
    _loss(model).backward()
    reducer.attach_grads()
    before = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    reducer.allreduce_grads()

    # Assert: shares exact (a power of two), .grad the slice, and the reduced average local + 0.5 exactly
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad.data_ptr() == slices[id(p)].data_ptr(), name
            torch.testing.assert_close(before[name], _want(expected, name, p) * share, rtol=0, atol=0)
            if op == "average":
                torch.testing.assert_close(p.grad, _want(expected, name, p, 0.5), rtol=0, atol=0)


@pytest.mark.parametrize("start", ["zero_grad", "in_place_zeros", "after_a_reduction", "create_graph", "attached"])
def test_a_second_backward_adds_its_share_however_the_first_gradient_got_into_the_slice(start):
    # Prepare: the first gradient stolen into the slice, accumulated into zeros, on top of the last
    # result, or attached before; the second adds to it (with create_graph: out of place)
    model = _model()
    first, second = _reference_grads(model, seed=1), _reference_grads(model, seed=2)
    reducer = GradientReducer(model.parameters(), _TwoRanks(), bucket_mb=1e-4)
    previous = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    if start == "after_a_reduction":
        _loss(model, seed=3).backward()
        reducer.allreduce_grads()
        previous = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    else:
        reducer.zero_grad(set_to_none=start != "in_place_zeros")

    # Execute
    _loss(model, seed=1).backward()
    if start == "attached":
        reducer.attach_grads()
    _loss(model, seed=2).backward(create_graph=start == "create_graph")
    reducer.allreduce_grads()

    # Assert: the average of (previous + first + second) and that + 1
    for name, p in model.named_parameters():
        if p.requires_grad:
            want = previous[name] + _want(first, name, p) + _want(second, name, p) + 0.5
            torch.testing.assert_close(p.grad.detach(), want, rtol=1e-6, atol=1e-7, msg=name)


def test_a_sparse_gradient_accumulated_into_a_share_is_scaled_too():
    # Prepare: the embedding's dense slice attached (holding a share); the next sparse gradient adds in place
    torch.manual_seed(0)
    model = _Odd()
    reference = copy.deepcopy(model)
    x, ids = torch.randn(2, 2, 5, 5), torch.tensor([1, 3])
    reducer = GradientReducer(model.parameters(), _TwoRanks(), bucket_mb=1e-9)
    reducer.zero_grad()

    # Execute
    for _ in range(2):
        model(x, ids).pow(2).sum().backward()
        reducer.attach_grads()
        reference(x, ids).pow(2).sum().backward()
    reducer.allreduce_grads()

    # Assert
    assert not model.embedding.weight.grad.is_sparse
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad.to_dense() + 0.5, msg=name)


def test_reducers_sharing_parameters_divide_after_the_reduction_and_a_lone_one_divides_on_entry_again():
    # Prepare: the first writes shares, then a second on the same parameters appears before the reduction
    model = _model()
    expected = _reference_grads(model)
    ranks = _TwoRanks(whole=True)
    first = GradientReducer(model.parameters(), ranks, bucket_mb=1e-4)
    first.zero_grad()
    _loss(model).backward()
    second = GradientReducer(model.parameters(), ranks, bucket_mb=1e-4)

    # Execute / Assert: whole gradients from now on, each reducer's average exact
    for reducer in (first, second, first):
        reducer.allreduce_grads()
        for name, p in model.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(p.grad, _want(expected, name, p, 0.5), rtol=0, atol=0, msg=name)
        reducer.zero_grad()
        _loss(model).backward()
    del second
    gc.collect()
    first.zero_grad()
    _loss(model).backward()
    first.attach_grads()
    for name, p in model.named_parameters():  # alone again: shares
        if p.requires_grad:
            torch.testing.assert_close(p.grad, _want(expected, name, p) * 0.5, rtol=0, atol=0, msg=name)


def test_a_lone_reducer_left_by_the_other_in_mid_step_sends_whole_gradients_as_shares():
    # Prepare: two reducers (whole gradients in the slices), the other one goes before the reduction
    model = _model()
    expected = _reference_grads(model)
    first = GradientReducer(model.parameters(), _TwoRanks(), bucket_mb=1e-4)
    second = GradientReducer(model.parameters(), _TwoRanks(), bucket_mb=1e-4)
    first.zero_grad()
    _loss(model).backward()
    first.attach_grads()
    del second
    gc.collect()

    # Execute
    first.allreduce_grads()

    # Assert
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, _want(expected, name, p, 0.5), rtol=0, atol=0, msg=name)


def test_with_overlap_a_backward_after_the_reduction_adds_to_the_average():
    # Prepare
    model = _model()
    first, second = _reference_grads(model, seed=1), _reference_grads(model, seed=2)
    reducer = GradientReducer(model.parameters(), _TwoRanks(), bucket_mb=1e-4, overlap=True)
    reducer.zero_grad()
    _loss(model, seed=1).backward()
    reducer.allreduce_grads()

    # Execute
    _loss(model, seed=2).backward()
    reducer.allreduce_grads()

    # Assert
    for name, p in model.named_parameters():
        if p.requires_grad:
            want = _want(first, name, p, 0.5) + _want(second, name, p, 0.5)
            torch.testing.assert_close(p.grad, want, msg=name)


def test_a_reducer_over_parameters_with_reductions_in_flight_raises_and_the_first_stays_exact():
    # Prepare: overlap started all buckets but the last from backward
    model = _model()
    expected = _reference_grads(model)
    first = GradientReducer(model.parameters(), _TwoRanks(), bucket_mb=1e-4, overlap=True)
    first.zero_grad()
    _loss(model).backward()

    # Execute / Assert
    with pytest.raises(RuntimeError, match="in flight"):
        GradientReducer(model.parameters(), _TwoRanks(), bucket_mb=1e-4)
    first.allreduce_grads()
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, _want(expected, name, p, 0.5), rtol=0, atol=0, msg=name)


def test_a_reducer_whose_construction_failed_does_not_break_later_ones(monkeypatch):
    # Prepare: the bucket allocation fails, and the half-made reducer stays referenced by the traceback
    model = _model()
    expected = _reference_grads(model)

    def no_memory(*args, **kwargs):
        raise MemoryError("no memory for a bucket")
    with monkeypatch.context() as patch:
        patch.setattr("distml.reducer.Bucket", no_memory)
        with pytest.raises(MemoryError) as failed:
            GradientReducer(model.parameters(), _TwoRanks())

    # Execute
    reducer = GradientReducer(model.parameters(), _TwoRanks(whole=True))
    reducer.zero_grad()
    _loss(model).backward()
    reducer.allreduce_grads()

    # Assert
    assert failed.traceback  # still held
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, _want(expected, name, p, 0.5), rtol=0, atol=0, msg=name)


def test_a_sparse_gradient_with_create_graph_is_reduced_detached():
    # Prepare: the embedding's gradient depends on fc, so with create_graph it requires grad
    torch.manual_seed(0)
    embedding, fc = nn.Embedding(10, 4, sparse=True), nn.Linear(4, 1)
    reference = copy.deepcopy((embedding, fc))
    ids = torch.tensor([1, 3])
    reference[1](reference[0](ids)).pow(2).sum().backward()
    reducer = GradientReducer([*embedding.parameters(), *fc.parameters()], _TwoRanks())
    reducer.zero_grad()

    # Execute
    fc(embedding(ids)).pow(2).sum().backward(create_graph=True)
    reducer.allreduce_grads()

    # Assert
    for got, want in zip([*embedding.parameters(), *fc.parameters()],
                         [*reference[0].parameters(), *reference[1].parameters()]):
        assert not got.grad.requires_grad
        torch.testing.assert_close(got.grad, want.grad.to_dense() + 0.5)


def test_reduced_says_whether_the_buckets_still_hold_the_last_result():
    # Prepare
    model = _model()
    reducer = GradientReducer(model.parameters(), _TwoRanks(), bucket_mb=1e-4)
    before = reducer.reduced()
    _loss(model).backward()
    reducer.allreduce_grads()

    # Execute / Assert: a reduction makes it true; a backward, or a replaced .grad, false again
    assert not before and reducer.reduced()
    _loss(model).backward()
    assert not reducer.reduced()
    reducer.allreduce_grads()
    model.fc.bias.grad = torch.zeros(5)
    assert not reducer.reduced()


@pytest.mark.parametrize("bucket_mb", [0, -1.0])
def test_bucket_mb_not_positive_raises_value_error(bucket_mb):
    # Prepare
    model = _model()

    # Execute / Assert
    with pytest.raises(ValueError, match="bucket_mb"):
        GradientReducer(model.parameters(), comm.world(), bucket_mb=bucket_mb)


@pytest.mark.parametrize("op", ["mean", "max", ""])
def test_unknown_op_raises_value_error(op):
    # Prepare
    model = _model()

    # Execute / Assert
    with pytest.raises(ValueError, match="op"):
        GradientReducer(model.parameters(), comm.world(), op=op)


# -- reduction ops are checked on one rank too --------------------------------

@pytest.mark.parametrize("op", ["mean", "avg", ""])
def test_api_allreduce_with_an_unknown_op_raises_value_error_on_one_rank(op):
    # Prepare / Execute / Assert
    with pytest.raises(ValueError, match="op must be"):
        distml.allreduce(1.0, op=op)


@pytest.mark.parametrize("op", ["avg", "average", "mean"])
def test_comm_allreduce_with_an_unknown_op_raises_value_error_on_one_rank(op):
    # Prepare
    tensor = torch.ones(3)

    # Execute / Assert
    with pytest.raises(ValueError, match="op must be"):
        comm.world().allreduce_(tensor, op=op)


# -- DistributedOptimizer -----------------------------------------------------

@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_distributed_sgd_on_one_rank_equals_plain_sgd(momentum):
    # Prepare
    plain_model = _model()
    dist_model = copy.deepcopy(plain_model)
    plain = torch.optim.SGD(plain_model.parameters(), lr=0.1, momentum=momentum)
    dist = DistributedOptimizer(torch.optim.SGD(dist_model.parameters(), lr=0.1, momentum=momentum),
                                dist_model, bucket_mb=1e-4)

    # Execute
    for step in range(4):
        for model, opt in ((plain_model, plain), (dist_model, dist)):
            opt.zero_grad()
            _loss(model, seed=step).backward()
            opt.step()

    # Assert
    for (name, a), b in zip(plain_model.named_parameters(), dist_model.parameters()):
        assert torch.equal(a, b), name


# -- pieces and compression ---------------------------------------------------

@pytest.mark.parametrize("chunk_mb, control", [(1e-4, 0), (1e-4, 3), (4.0, 3)])
def test_pieces_tile_each_bucket_and_leave_the_control_elements_undivided(chunk_mb, control):
    model = nn.Sequential(nn.Linear(10, 20), nn.Linear(20, 3))
    reducer = GradientReducer(model.parameters(), comm.world(), chunk_mb=chunk_mb, control=control)

    for bucket, pieces in zip(reducer.buckets, reducer._pieces):
        assert sum(p.data.numel() for p in pieces) == bucket.buffer.numel()
        assert pieces[0].data.data_ptr() == bucket.buffer.data_ptr()
        assert all(a.data.data_ptr() + a.data.numel() * 4 == b.data.data_ptr() for a, b in zip(pieces, pieces[1:]))
        assert sum(p.grads.numel() for p in pieces) == bucket.grads.numel()  # control elements left out
    assert all(p.data.numel() * 4 <= max(chunk_mb * 2**20, 4) for ps in reducer._pieces for p in ps)
    for pieces in reducer._pieces:  # the fewest pieces under the cap, of about one size: no small remainder
        sizes = [p.data.numel() for p in pieces]
        assert len(sizes) == -(-sum(sizes) * 4 // max(int(chunk_mb * 2**20), 4))
        assert max(sizes) - min(sizes) < len(sizes)


@pytest.mark.parametrize("compression, wire", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_compression_gives_each_piece_a_half_twin_once_and_one_rank_no_rounding(compression, wire):
    torch.manual_seed(0)
    model = nn.Linear(30, 7)
    reducer = GradientReducer(model.parameters(), comm.world(), chunk_mb=1e-4, compression=compression)
    twins = [p.wire for ps in reducer._pieces for p in ps]
    model(torch.randn(4, 30)).pow(2).sum().backward()
    exact = [p.grad.clone() for p in model.parameters()]

    reducer.allreduce_grads()

    assert all(t.dtype == wire and t.numel() <= 26 for t in twins)
    assert [p.wire for ps in reducer._pieces for p in ps] == twins  # made once, not per step
    assert all(torch.equal(p.grad, e) for p, e in zip(model.parameters(), exact))


def test_unknown_compression_or_chunk_raises_value_error():
    with pytest.raises(ValueError, match="compression must be one of none, fp16, bf16"):
        GradientReducer(nn.Linear(2, 2).parameters(), comm.world(), compression="int8")
    with pytest.raises(ValueError, match="chunk_mb must be > 0"):
        GradientReducer(nn.Linear(2, 2).parameters(), comm.world(), chunk_mb=0)
