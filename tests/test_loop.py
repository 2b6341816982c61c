"""Your own loop's pieces in one process: ShardSampler, bptt_columns, the Checkpointer, DistributedOptimizer
with torch's schedulers, seeds, the stop flag, and the signature check (with stand-in ranks)."""
import os
import signal

import numpy as np
import pytest
import torch

import distml
from distml import api
from distml.checkpoint import Checkpoint, list_checkpoints, read_checkpoint, write_checkpoint
from distml.matching import CollectiveMismatch, negotiate
from distml.sharding import shard_batches


class _Ranks:
    """A stand-in communicator: rank `rank` of `size` (the sampler reads only these)."""

    def __init__(self, rank, size):
        self.rank, self.size = rank, size


def _pairs(n=103, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=gen)
    return torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long())


# -- ShardSampler ------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [2, 3])
def test_the_ranks_parts_of_each_step_are_the_one_rank_global_batch_uneven_last_batch_kept(size):
    one = list(distml.ShardSampler(103, global_batch=12, seed=3, comm=_Ranks(0, 1)))
    parts = [list(distml.ShardSampler(103, global_batch=12, seed=3, comm=_Ranks(r, size))) for r in range(size)]

    assert [len(b) for b in one] == [12] * 8 + [7]  # 103 = 8 x 12 + 7: the last batch kept, not padded
    for step, whole in enumerate(one):
        joined = [i for part in parts for i in part[step]]
        assert joined == whole  # each rank its slice, in order: no duplicate, none missing
    assert sorted(i for b in one for i in b) == list(range(103))


def test_global_size_is_that_of_the_batch_the_loop_has_and_set_epoch_draws_a_new_order():
    sampler = distml.ShardSampler(_pairs(), 6, seed=0, comm=_Ranks(1, 2))  # global batch 12
    sizes = []
    for _ in sampler:
        sizes.append(sampler.global_size)
    assert sizes == [12] * 8 + [7] and sampler.step == 9
    first = list(sampler)
    sampler.set_epoch(1)
    assert sampler.step == 0 and list(sampler) != first and len(sampler) == 9


@pytest.mark.parametrize("workers", [0, 2])
def test_a_dataloader_resumes_mid_epoch_at_the_batch_the_loop_had_not_the_ones_its_workers_fetched(workers):
    data = _pairs()
    kwargs = dict(num_workers=workers, multiprocessing_context="forkserver" if workers else None)
    sampler = distml.ShardSampler(data, 4, seed=2, comm=_Ranks(0, 1))
    sampler.set_epoch(1)
    loader = torch.utils.data.DataLoader(data, batch_sampler=sampler, **kwargs)
    seen = []
    for x, _ in loader:
        seen.append(x)
        if len(seen) == 5:
            state = sampler.state_dict()  # the workers have fetched ahead by now
            break
    uninterrupted = [x for x, _ in torch.utils.data.DataLoader(data, batch_sampler=sampler, **kwargs)]

    resumed = distml.ShardSampler(data, 4, seed=2, comm=_Ranks(0, 1))
    resumed.load_state_dict(state)
    resumed.set_epoch(1)
    rest = [x for x, _ in torch.utils.data.DataLoader(data, batch_sampler=resumed, **kwargs)]

    assert state["epoch"] == 1 and state["step"] == 5
    assert len(rest) == len(uninterrupted) - 5 and all(torch.equal(a, b) for a, b in zip(rest, uninterrupted[5:]))
    resumed.set_epoch(2)
    assert len(resumed) == len(uninterrupted)  # the next epoch starts at its beginning


def test_a_saved_place_is_refused_by_a_sampler_of_another_global_batch_with_the_reason():
    state = distml.ShardSampler(103, global_batch=12, comm=_Ranks(0, 2)).state_dict()
    other = distml.ShardSampler(103, 4, comm=_Ranks(0, 2))  # 4 x 2 ranks = 8

    with pytest.raises(ValueError, match="global_batch 12, this sampler has 8.*pass global_batch="):
        other.load_state_dict(state)


def test_bad_sampler_settings_say_why():
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        distml.ShardSampler(10, 0, comm=_Ranks(0, 1))
    with pytest.raises(ValueError, match="leaves some of the 4 ranks no sample"):
        distml.ShardSampler(10, global_batch=3, comm=_Ranks(0, 4))


def test_bptt_columns_of_the_ranks_side_by_side_are_the_one_process_layout():
    tokens = torch.arange(100)
    one = distml.bptt_columns(tokens, 6, comm=_Ranks(0, 1))
    parts = [distml.bptt_columns(tokens, 2, comm=_Ranks(r, 3)) for r in range(3)]

    assert one.shape == (16, 6) and torch.equal(one[:, 1], torch.arange(16, 32))  # column c: tokens c*16..
    assert torch.equal(torch.cat(parts, dim=1), one)
    with pytest.raises(ValueError, match="does not split evenly over 4 ranks"):
        distml.bptt_columns(tokens, None, global_batch=6, comm=_Ranks(0, 4))


# -- DistributedOptimizer and torch's schedulers -----------------------------------------------------------
SCHEDULERS = {
    "steplr": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5),
    "cosine": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10),
    "onecycle": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.5, total_steps=12),
}


def _train(model, opt, sched, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lrs = []
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(8, 4, generator=gen)).pow(2).mean().backward()
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    return lrs


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_torch_schedulers_drive_distributed_optimizer_as_the_optimizer_it_wraps(name):
    torch.manual_seed(0)
    plain_model, model = torch.nn.Linear(4, 2), torch.nn.Linear(4, 2)
    model.load_state_dict(plain_model.state_dict())
    plain = torch.optim.SGD(plain_model.parameters(), lr=0.1, momentum=0.9)
    wrapped = distml.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model)

    assert isinstance(wrapped, torch.optim.Optimizer)
    want = _train(plain_model, plain, SCHEDULERS[name](plain), 12)
    got = _train(model, wrapped, SCHEDULERS[name](wrapped), 12)
    assert got == want and len(set(got)) > 3  # the rate really moved
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), plain_model.parameters()))


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_the_checkpointer_restores_the_scheduler_and_the_run_goes_on_as_if_uninterrupted(name, tmp_path):
    def fresh():
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2)
        opt = distml.DistributedOptimizer(torch.optim.Adam(model.parameters(), lr=0.1), model)
        return model, opt, SCHEDULERS[name](opt)

    model, opt, sched = fresh()
    want = _train(model, opt, sched, 5) + _train(model, opt, sched, 7, seed=1)
    model_a, opt_a, sched_a = fresh()
    _train(model_a, opt_a, sched_a, 5)
    distml.Checkpointer(tmp_path, model=model_a, optimizer=opt_a, scheduler=sched_a).save(step=5)

    model_b, opt_b, sched_b = fresh()  # a new process's objects
    state = distml.Checkpointer(tmp_path, model=model_b, optimizer=opt_b, scheduler=sched_b).restore()
    got = _train(model_b, opt_b, sched_b, 7, seed=1)

    assert state == {"step": 5} and got == want[5:]
    assert all(torch.equal(a, b) for a, b in zip(model_b.parameters(), model.parameters()))


# -- Checkpointer -----------------------------------------------------------------------------------------
def _pieces():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 2))
    opt = distml.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model)
    sampler = distml.ShardSampler(_pairs(), 8, seed=1)
    return model, opt, sampler


def test_restore_finds_nothing_the_first_time_then_gives_back_what_save_was_given(tmp_path):
    model, opt, sampler = _pieces()
    ckpt = distml.Checkpointer(tmp_path / "ckpt", model=model, optimizer=opt, sampler=sampler, keep=2)
    assert ckpt.restore() is None

    sampler.set_epoch(2)
    next(iter(sampler)), next(iter(sampler))
    paths = [ckpt.save(epoch=e, note="hi", losses=[1.5, torch.ones(2)]) for e in range(3)]
    at_save = torch.get_rng_state()
    torch.manual_seed(123)  # moved on: restore() puts back the state of the last save

    model2, opt2, sampler2 = _pieces()
    state = distml.Checkpointer(tmp_path / "ckpt", model=model2, optimizer=opt2, sampler=sampler2).restore()

    assert [os.path.basename(p) for p in list_checkpoints(tmp_path / "ckpt")] == [
        "checkpoint-000000002.pt", "checkpoint-000000003.pt"] == [os.path.basename(p) for p in paths[1:]]
    assert state["epoch"] == 2 and state["note"] == "hi" and torch.equal(state["losses"][1], torch.ones(2))
    assert sampler2.state_dict() == sampler.state_dict()
    assert torch.equal(torch.get_rng_state(), at_save)
    ckpt_file = read_checkpoint(paths[-1])  # the CLI's format and checks: version, checksum, weights_only
    assert ckpt_file.mode == "loop" and ckpt_file.world_size == 1 and ckpt_file.position == {"units": 3}


def test_rank_state_comes_back_to_its_rank(tmp_path):
    model, opt, _ = _pieces()
    hidden = torch.randn(2, 3)
    distml.Checkpointer(tmp_path, model=model).save(epoch=1, rank_state={"hidden": [hidden]})
    state = distml.Checkpointer(tmp_path, model=model).restore()
    assert state["epoch"] == 1 and torch.equal(state["rank_state"]["hidden"][0], hidden)


def test_a_checkpoint_of_another_model_is_refused_with_one_line_naming_the_difference(tmp_path):
    model, opt, _ = _pieces()
    distml.Checkpointer(tmp_path, model=model, optimizer=opt).save(epoch=1)
    other = torch.nn.Sequential(torch.nn.Linear(5, 9), torch.nn.Dropout(0.5), torch.nn.Linear(9, 2))

    with pytest.raises(distml.UsageError) as error:
        distml.Checkpointer(tmp_path, model=other).restore()
    assert "holds another model ('0.bias' is torch.float32 [8] there, torch.float32 [9] here)" in str(error.value)
    assert "\n" not in str(error.value)
    with pytest.raises(distml.UsageError, match="holds no scheduler state"):
        distml.Checkpointer(tmp_path, model=model, scheduler=torch.optim.lr_scheduler.StepLR(opt, 2)).restore()


def test_a_damaged_newest_checkpoint_is_set_aside_and_the_one_before_restored(tmp_path, capsys):
    model, opt, _ = _pieces()
    ckpt = distml.Checkpointer(tmp_path, model=model, optimizer=opt)
    ckpt.save(epoch=1)
    newest = ckpt.save(epoch=2)
    with open(newest, "r+b") as f:
        f.truncate(os.path.getsize(newest) // 2)

    assert distml.Checkpointer(tmp_path, model=model, optimizer=opt).restore() == {"epoch": 1}
    assert os.path.exists(newest + ".damaged") and "skipping" in capsys.readouterr().err


def test_a_cli_checkpoint_or_values_a_weights_only_load_cannot_read_are_refused(tmp_path):
    model, opt, _ = _pieces()
    cli = Checkpoint(mode="sync", world_size=2, config="{}", data="", position={"units": 4}, model={},
                     strategy={}, ranks=[])
    write_checkpoint(cli, tmp_path / "cli", keep=1)
    with pytest.raises(distml.UsageError, match="written by `distml train` .sync mode.; resume it with"):
        distml.Checkpointer(tmp_path / "cli", model=model).restore()
    with pytest.raises(TypeError, match="ndarray is not plain data"):
        distml.Checkpointer(tmp_path, model=model).save(epoch=np.zeros(2))
    assert list_checkpoints(tmp_path) == []  # refused before anything was written


# -- seeds, threads, stop flag -----------------------------------------------------------------------------
def test_seed_gives_each_rank_its_own_stream_and_the_same_one_again(monkeypatch):
    draws = {}
    for rank in (0, 1, 0):
        monkeypatch.setattr(api, "rank", lambda rank=rank: rank)
        distml.seed(7)
        draws.setdefault(rank, []).append(torch.rand(3))
    assert torch.equal(*draws[0]) and not torch.equal(draws[0][0], draws[1][0])


def test_a_stop_signal_travels_in_the_next_reduction_and_stays_seen(loop_stop):
    model, opt, _ = _pieces()
    assert distml.stop_requested() is False  # the first question starts catching the signals
    opt.zero_grad()
    model(torch.randn(4, 5)).sum().backward()
    opt.step()
    os.kill(os.getpid(), signal.SIGUSR1)  # caught: the process lives on
    assert loop_stop.caught() and not loop_stop.agreed  # the last reduction ran before it
    opt.zero_grad()
    model(torch.randn(4, 5)).sum().backward()
    opt.step()
    assert loop_stop.agreed and loop_stop.carried == 2  # the reductions carried it: no question of its own
    assert distml.stop_requested() is True and distml.stop_requested() is True


def test_with_no_reduction_since_the_last_question_stop_requested_asks_the_ranks_itself(loop_stop):
    assert distml.stop_requested() is False
    os.kill(os.getpid(), signal.SIGTERM)
    assert distml.stop_requested() is True


# -- the signature check -----------------------------------------------------------------------------------
class _Two:
    """Two stand-in ranks in one process: rank 0 is in `mine`, rank 1 in `theirs`."""

    def __init__(self, theirs):
        self.size, self.rank, self.members, self.theirs = 2, 0, [0, 1], theirs

    def allreduce_max_(self, header, what=None):
        import zlib
        code = zlib.crc32(self.theirs.encode())
        header.copy_(torch.maximum(header, torch.tensor([code, -code])))
        return header

    def allgather_object(self, obj):
        return [obj, self.theirs]


def test_ranks_in_different_calls_all_raise_naming_each_ranks_call():
    negotiate(_Two("distml.barrier()"), "distml.barrier()")  # the same call: nothing to say
    with pytest.raises(CollectiveMismatch) as error:
        negotiate(_Two("distml.barrier()"), "distml.allreduce(op=sum, float64 [3])")
    assert str(error.value).endswith("rank 0: distml.allreduce(op=sum, float64 [3]); rank 1: distml.barrier())")
    assert error.value.everywhere  # raised alike everywhere: reported once


def test_the_batches_are_the_clis_where_its_last_batch_gives_every_rank_two():
    sampler = distml.ShardSampler(53, global_batch=8, seed=4, comm=_Ranks(1, 2))  # 53 = 6 x 8 + 5
    want = [b.indices.tolist() for b in shard_batches(53, 4, epoch=0, seed=4, rank=1, size=2)]
    assert list(sampler) == want  # the CLI's batches: a loop and `distml train` see the same data


@pytest.mark.parametrize("size", [2, 3, 4, 6])
def test_no_rank_ever_gets_an_empty_batch_and_small_last_batches_join_the_one_before(size):
    for n in range(size, 60):
        for global_batch in (size, size + 1, 2 * size, 12):
            if global_batch < size:
                continue
            parts = [list(distml.ShardSampler(n, global_batch=global_batch, comm=_Ranks(r, size)))
                     for r in range(size)]
            assert all(len(batch) >= 1 for part in parts for batch in part), (n, global_batch)
            assert sorted(i for part in parts for batch in part for i in batch) == list(range(n))
    # 25 = 2 x 12 + 1: on 3 ranks the last sample joins the batch before; on 1 rank it stays a batch, so the
    # two cut the epoch differently and a checkpoint of one is refused by the other
    assert distml.ShardSampler(25, global_batch=12, comm=_Ranks(0, 3)).steps_per_epoch == 2
    one = distml.ShardSampler(25, global_batch=12, comm=_Ranks(0, 1))
    with pytest.raises(ValueError, match="steps_per_epoch 2, this sampler has 3.*smaller than the number of ranks"):
        one.load_state_dict(distml.ShardSampler(25, global_batch=12, comm=_Ranks(0, 3)).state_dict())


def test_the_place_saved_after_a_break_is_the_batches_the_loop_had_not_those_prefetched():
    data = _pairs()
    sampler = distml.ShardSampler(data, 4, seed=2, comm=_Ranks(0, 1))
    loader = distml.DataLoader(data, batch_sampler=sampler, num_workers=2)  # not persistent: a break ends them
    for taken, _ in enumerate(loader, start=1):
        if taken == 5:
            break
    import gc
    gc.collect()
    assert sampler.step == 5


class _Augmented(torch.utils.data.Dataset):
    """Items with random noise drawn from the global generators (augmentation)."""

    def __len__(self):
        return 40

    def __getitem__(self, i):
        return torch.full((2,), float(i)) + torch.randn(2), i


@pytest.mark.parametrize("workers", [0, 2])
def test_random_augmentation_is_the_same_with_any_workers_and_on_resuming_and_leaves_the_loops_rng(workers):
    def batches(sampler, workers):
        loader = distml.DataLoader(_Augmented(), batch_sampler=sampler, num_workers=workers)
        return [x for x, _ in loader]

    reference = batches(distml.ShardSampler(40, 4, seed=1, comm=_Ranks(0, 1)), 0)
    torch.manual_seed(5)
    untouched = torch.rand(1)
    torch.manual_seed(5)
    got = batches(distml.ShardSampler(40, 4, seed=1, comm=_Ranks(0, 1)), workers)
    assert torch.equal(torch.rand(1), untouched)  # neither the items nor the iterator drew from the loop's
    state = {**distml.ShardSampler(40, 4, seed=1, comm=_Ranks(0, 1)).state_dict(), "step": 6}
    resumed = distml.ShardSampler(40, 4, seed=1, comm=_Ranks(0, 1))
    resumed.load_state_dict(state)
    resumed.set_epoch(0)
    rest = batches(resumed, workers)

    assert all(torch.equal(a, b) for a, b in zip(got, reference)) and len(got) == 10
    assert all(torch.equal(a, b) for a, b in zip(rest, reference[6:])) and len(rest) == 4


def test_drop_last_keeps_whole_global_batches_only_on_any_world_size():
    for size in (1, 2, 3):
        parts = [list(distml.ShardSampler(105, global_batch=12, drop_last=True, comm=_Ranks(r, size)))
                 for r in range(size)]
        assert [sum(len(part[s]) for part in parts) for s in range(len(parts[0]))] == [12] * 8  # 9 left out
