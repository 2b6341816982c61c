"""Differential privacy, in one process: per-sample gradients, the DP-SGD step, the noise, the
accountant against dp-accounting, adaptive clipping, and bad input (one line, exit 2)."""
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mpi4py import MPI
from torch import nn

import dp_accounting
from dp_accounting import pld, rdp
from distml import comm
from distml.cli import main
from distml.config import Config, UsageError
from distml.data import load_dataset
from distml.gpt import GPT
from distml.losses import make_loss
from distml.models import build_model
from distml.per_sample import add_clipped_grad_sum_, check_private_model, per_sample_grads
from distml.privacy import Accountant, AdaptiveClip, NoiseSource, calibrate, poisson_sample, update_noise_multiplier
from distml.strategies.sync import SyncStrategy

BN_MODEL = Path(__file__).parent / "mpi" / "bn_model.py"
DIGITS = ["--dataset", "digits", "--hidden", "16", "--quiet"]


def _conv_net():
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))


def _loop_grads(model, loss, x, y):
    """Every sample's gradient by its own backward: the reference."""
    rows = []
    for i in range(len(x)):
        model.zero_grad()
        loss(model(x[i:i + 1]), y[i:i + 1]).sum().backward()
        rows.append({n: p.grad.clone() for n, p in model.named_parameters()})
    return rows


@pytest.mark.parametrize("kind", ["conv_groupnorm", "gpt"])
def test_per_sample_gradients_equal_a_loop_over_single_samples(kind):
    gen = torch.Generator().manual_seed(0)
    if kind == "gpt":
        torch.manual_seed(2)
        model = GPT(11, 6, layers=1, heads=2, embed=8)
        x, y = torch.randint(0, 11, (5, 6), generator=gen), torch.randint(0, 11, (5, 6), generator=gen)
    else:
        model = _conv_net()
        x, y = torch.rand(5, 1, 8, 8, generator=gen), torch.randint(0, 10, (5,), generator=gen)
    loss = make_loss("cross_entropy", "classification")

    grads, losses = per_sample_grads(model, loss, x, y)

    for i, reference in enumerate(_loop_grads(model, loss, x, y)):
        for name, g in reference.items():
            assert torch.allclose(grads[name][i], g, atol=1e-6, rtol=0), (kind, i, name)
    assert torch.allclose(losses, loss(model(x), y), atol=1e-6)


def test_clipped_sum_with_a_clip_that_never_binds_equals_an_ordinary_backward():
    model, loss = _conv_net(), make_loss("cross_entropy", "classification")
    gen = torch.Generator().manual_seed(3)
    x, y = torch.rand(7, 1, 8, 8, generator=gen), torch.randint(0, 10, (7,), generator=gen)
    expected = 9.5  # the expected batch divides, not the 7 drawn

    add_clipped_grad_sum_(model, loss, x, y, clip=1e6, scale=1 / expected)
    dp = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    (loss(model(x), y).sum() / expected).backward()

    for n, p in model.named_parameters():
        assert torch.allclose(dp[n], p.grad, atol=1e-6, rtol=0), n


def test_a_binding_clip_bounds_each_samples_contribution_to_the_clip():
    model, loss = _conv_net(), make_loss("cross_entropy", "classification")
    gen = torch.Generator().manual_seed(4)
    x, y = torch.rand(1, 1, 8, 8, generator=gen), torch.randint(0, 10, (1,), generator=gen)
    grads, _ = per_sample_grads(model, loss, x, y)
    norm = math.sqrt(sum(g.pow(2).sum().item() for g in grads.values()))
    clip = norm / 3  # binds

    add_clipped_grad_sum_(model, loss, x, y, clip=clip, scale=1.0)

    clipped = math.sqrt(sum(p.grad.pow(2).sum().item() for p in model.parameters()))
    assert clipped == pytest.approx(clip, rel=1e-5)


def _sync(**settings):
    cfg = Config(**{"dataset": "digits", "hidden": "16", "dp_clip": 1.0, "quiet": True, **settings})
    cfg.validate(writes_outputs=False)
    dataset = load_dataset(cfg)
    model = build_model(cfg.model, dataset, cfg.hidden_sizes(), cfg.seed)
    strategy = SyncStrategy(cfg, dataset, model, comm.Comm(MPI.COMM_SELF))
    strategy.setup()
    return strategy


def test_dp_sgd_step_without_noise_is_sgd_on_the_poisson_batch_over_its_expected_size():
    strategy = _sync(dp_noise=0.0, batch_size=50, momentum=0.0, lr=0.3, lr_schedule="constant", dp_clip=1e6)
    dataset, model = strategy.dataset, strategy.model
    reference = build_model("mlp", dataset, (16,), 0)
    q = 50 / len(dataset.train)
    drawn = poisson_sample(0, "dp-batch", (0, 1), len(dataset.train), q)
    x, y = dataset.train.batch(drawn)

    strategy.run_unit(0, 0, _no_flags)
    reference.load_state_dict(model.state_dict())  # after step 0; step 1 is compared
    strategy.run_unit(0, 1, _no_flags)
    (make_loss("cross_entropy", "classification")(reference(x), y).sum() / 50).backward()
    with torch.no_grad():
        for p in reference.parameters():
            p -= 0.3 * p.grad

    assert strategy.private.sample_rate == q and len(drawn) != 50  # a drawn size, not the expected one
    for (n, p), r in zip(model.named_parameters(), reference.parameters()):
        assert torch.allclose(p, r, atol=1e-6, rtol=0), n


def _no_flags():
    from distml.strategies.base import Flags
    return Flags()


def test_the_added_noise_has_std_z_times_clip_over_the_expected_batch():
    strategy = _sync(dp_noise=1.3, batch_size=40, dp_clip=0.7)
    params = [p for p in strategy.model.parameters()]
    for p in params:
        p.grad = torch.zeros_like(p)

    strategy._add_noise(position=5, expected=40)

    noise = torch.cat([p.grad.reshape(-1) for p in params]) * 40
    assert noise.numel() > 1000
    assert noise.std().item() == pytest.approx(1.3 * 0.7, rel=0.04)  # 1,210 draws: 2% standard error
    assert abs(noise.mean().item()) < 4 * 0.91 / math.sqrt(noise.numel())


@pytest.mark.parametrize("secure", [False, True])
def test_noise_source_draws_have_the_asked_std_and_seeded_ones_repeat(secure):
    source = NoiseSource(seed=3, secure=secure)

    a, b = source.gaussian((400_000,), 2.5, 7), source.gaussian((400_000,), 2.5, 7)

    assert a.std().item() == pytest.approx(2.5, rel=0.005)
    assert abs(a.mean().item()) < 4 * 2.5 / math.sqrt(4e5)
    assert torch.equal(a, b) != secure  # seeded: the same draws; OS entropy: never
    assert not torch.equal(a, source.gaussian((400_000,), 2.5, 8))


@pytest.mark.parametrize("q,z,steps", [(128 / 1438, 2.0, 720), (0.01, 0.8, 3000), (0.2, 4.0, 10)])
def test_epsilon_equals_dp_accounting_for_the_poisson_gaussian_event(q, z, steps):
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), steps)
    reference = pld.PLDAccountant()  # its default, finer grid
    reference.compose(event)
    upper = rdp.RdpAccountant()
    upper.compose(event)

    ours = Accountant(q, z, 1e-5).epsilon(steps)

    assert ours == pytest.approx(reference.get_epsilon(1e-5), rel=2e-3)
    assert ours <= upper.get_epsilon(1e-5)  # PLD is tighter than RDP's bound


def test_calibrated_noise_ends_the_run_just_under_the_target():
    z = calibrate(0.05, 400, 2.0, 1e-5)

    assert 1.98 <= Accountant(0.05, z, 1e-5).epsilon(400) <= 2.0
    assert Accountant(0.05, z * 0.99, 1e-5).epsilon(400) > 2.0


def test_a_run_reports_epsilon_for_the_steps_it_did_and_ends_under_dp_epsilon(tmp_path, capsys):
    metrics = tmp_path / "m.jsonl"

    code = main(["train", *DIGITS, "--epochs", "3", "--batch-size", "100", "--dp-clip", "1",
                 "--dp-epsilon", "1.5", "--metrics", str(metrics)])

    assert code == 0, capsys.readouterr().err
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    summary, epochs = records[-1], records[:-1]
    q, steps_per_epoch = 100 / 1438, math.ceil(1438 / 100)
    z = summary["noise_multiplier"]
    assert summary["dp_sample_rate"] == pytest.approx(q)
    for r in epochs:  # each epoch line's epsilon is the event performed so far
        event = dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), r["epoch"] * steps_per_epoch)
        reference = pld.PLDAccountant()
        reference.compose(event)
        assert r["epsilon"] == pytest.approx(reference.get_epsilon(1e-5), rel=2e-3)
    assert 1.45 <= summary["epsilon"] <= 1.5 and summary["delta"] == 1e-5 and summary["dp_clip"] == 1.0


@pytest.mark.parametrize("start", [0.1, 250.0])  # 50x too small, 50x too large
def test_adaptive_clip_converges_to_the_target_quantile_of_known_norms(start):
    gen = np.random.default_rng(0)
    median = 5.0  # norms log-normal around 5: the 0.5 quantile is 5
    clip = AdaptiveClip(start, quantile=0.5, expected_clients=100)

    history = []
    for _ in range(300):
        norms = median * np.exp(gen.normal(0, 0.5, 100))
        centred = (norms <= clip.clip).sum() - 0.5 * len(norms) + gen.normal(0, clip.count_stddev)
        history.append(clip.update(centred))

    assert np.median(history[-50:]) == pytest.approx(median, rel=0.1)
    quantile = 0.8  # and another quantile: exp(0.5 * 0.8416) x 5
    clip = AdaptiveClip(start, quantile=quantile, expected_clients=100)
    for _ in range(300):
        clip.update((median * np.exp(gen.normal(0, 0.5, 100)) <= clip.clip).sum() - 50)
    assert clip.clip == pytest.approx(median * math.exp(0.5 * 0.8416), rel=0.1)


def test_update_noise_multiplier_pays_for_the_count_as_tff():
    assert update_noise_multiplier(1.0, 5.0) == pytest.approx((1.0 - 0.01) ** -0.5)
    with pytest.raises(UsageError, match="needs z < 1"):
        update_noise_multiplier(2.0, 0.5)  # 2 sigma_b = 1 < z


def test_batchnorm_is_refused_with_groupnorm_named():
    with pytest.raises(UsageError, match="GroupNorm"):
        check_private_model(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)))
    check_private_model(_conv_net())


FED = ["--mode", "federated", "--clients", "10"]
BAD = {
    "negative noise": (["--dp-clip", "1", "--dp-noise", "-0.5"], "--dp-noise must be >= 0"),
    "clip zero": (["--dp-clip", "0", "--dp-noise", "1"], "--dp-clip must be > 0"),
    "noise and epsilon": (["--dp-clip", "1", "--dp-noise", "1", "--dp-epsilon", "2"], "not both"),
    "noise without clip": (["--dp-noise", "1"], "needs --dp-clip"),
    "unreachable epsilon": (["--dp-clip", "1", "--dp-epsilon", "1e-4", "--batch-size", "700", "--epochs", "50"],
                            "out of reach"),
    "quantile outside": ([*FED, "--dp-clip", "1", "--dp-noise", "1", "--dp-adaptive-clip", "1.5"],
                         "--dp-adaptive-clip must be a quantile in (0, 1)"),
    "batchnorm": (["--dp-clip", "1", "--dp-noise", "1", "--model", f"{BN_MODEL}:make"], "use GroupNorm"),
    "dp in async": (["--mode", "async", "--dp-clip", "1", "--dp-noise", "1"], "async applies each gradient"),
    "secagg in async": (["--mode", "async", "--secure-aggregation"], "--secure-aggregation is for --mode federated"),
    "scaffold with dp": ([*FED, "--algorithm", "scaffold", "--momentum", "0", "--dp-clip", "1", "--dp-noise", "1"],
                         "--algorithm scaffold with differential privacy"),
    "secagg with 2 clients": ([*FED, "--clients-per-round", "2", "--secure-aggregation"], "at least 3 clients"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_privacy_input_exits_2_with_one_line_before_training(tmp_path, case, capsys, monkeypatch):
    flags, expected = BAD[case]
    monkeypatch.chdir(tmp_path)

    code = main(["train", *DIGITS, "--epochs", "2", *flags, "--metrics", str(tmp_path / "m.jsonl")])

    out, err = capsys.readouterr()
    ours = [line for line in err.splitlines() if line.startswith("distml:")]
    assert code == 2 and len(ours) == 1 and expected in ours[0], err
    assert "epoch" not in out and not (tmp_path / "m.jsonl").exists()


def test_missing_privacy_extra_names_the_pip_command(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "dp_accounting", None)  # import fails as if not installed

    code = main(["train", *DIGITS, "--dp-clip", "1", "--dp-noise", "1"])

    err = capsys.readouterr().err
    assert code == 2 and "pip install 'distml[privacy]'" in err, err


SECURE = ["--mode", "federated", "--clients", "9", "--clients-per-round", "8", "--rounds", "3", "--local-steps", "2",
          "--batch-size", "16", "--seed", "3", "--secagg-neighbors", "6"]


def _weights(path):
    return torch.load(path, weights_only=True)


def test_secure_aggregation_on_one_rank_ends_where_plain_fedavg_ends_with_clients_dropping(tmp_path, capsys):
    for name, extra in (("plain", []), ("secure", ["--secure-aggregation"])):
        code = main(["train", *DIGITS, *SECURE, "--dropout", "0.15", *extra,
                     "--save-model", str(tmp_path / f"{name}.pt"), "--metrics", str(tmp_path / f"{name}.jsonl")])
        assert code == 0, capsys.readouterr().err

    plain, secure = _weights(tmp_path / "plain.pt"), _weights(tmp_path / "secure.pt")
    assert max((plain[k] - secure[k]).abs().max().item() for k in plain) <= 1e-5
    summary = json.loads((tmp_path / "secure.jsonl").read_text().splitlines()[-1])
    assert summary["rounds_failed"] == 0
    assert sum(json.loads(line).get("clients_dropped", 0) for line in (tmp_path / "secure.jsonl").open()) == 4


def test_too_few_survivors_stop_the_round_with_one_line_and_no_update(tmp_path, capsys):
    metrics = tmp_path / "m.jsonl"

    code = main(["train", *DIGITS, *SECURE, "--dropout", "0.25", "--secure-aggregation", "--metrics", str(metrics)])

    err = capsys.readouterr().err
    records = [json.loads(line) for line in metrics.read_text().splitlines()][:-1]
    failed = [r for r in records if "round_failed" in r]
    lines = [line for line in err.splitlines() if line.startswith("distml: round")]
    assert code == 0 and failed and len(lines) == len(failed)
    assert all("secure aggregation cannot go on" in line and "the threshold is 4" in line for line in lines)
    assert all(f"round {r['round']}:" in line for r, line in zip(failed, lines))


def test_resumed_private_run_keeps_counting_epsilon_and_its_adaptive_clip(tmp_path, capsys):
    flags = [*DIGITS, "--mode", "federated", "--clients", "20", "--clients-per-round", "10", "--local-steps", "2",
             "--batch-size", "16", "--dp-clip", "0.05", "--dp-noise", "0.8", "--dp-adaptive-clip", "0.5"]
    whole, part = tmp_path / "whole.jsonl", tmp_path / "part.jsonl"
    assert main(["train", *flags, "--rounds", "4", "--metrics", str(whole), "--save-model", str(tmp_path / "whole.pt"),
                 "--checkpoint-dir", str(tmp_path / "ck"), "--keep", "4"]) == 0

    code = main(["train", *flags, "--rounds", "4", "--resume", str(tmp_path / "ck" / "checkpoint-000000002.pt"),
                 "--metrics", str(part), "--save-model", str(tmp_path / "part.pt")])

    assert code == 0, capsys.readouterr().err
    a, b = [[json.loads(line) for line in p.read_text().splitlines()] for p in (whole, part)]
    assert [r["epsilon"] for r in a[2:4]] == [r["epsilon"] for r in b[-3:-1]]  # rounds 3 and 4
    assert [r["dp_clip"] for r in a[2:4]] == [r["dp_clip"] for r in b[-3:-1]] and a[3]["dp_clip"] != 0.05
    w, p = _weights(tmp_path / "whole.pt"), _weights(tmp_path / "part.pt")
    assert all(torch.equal(w[k], p[k]) for k in w)


@pytest.mark.parametrize("adaptive", [None, 0.5])
def test_dp_fedavg_noise_has_std_z_update_times_clip_on_the_update_and_sigma_b_on_the_count(adaptive):
    from distml.strategies.federated import FederatedStrategy
    cfg = Config(mode="federated", dataset="digits", clients=200, clients_per_round=100, dp_clip=0.4,
                 dp_noise=1.2, dp_adaptive_clip=adaptive, quiet=True).validate(writes_outputs=False)
    dataset = load_dataset(cfg)
    strategy = FederatedStrategy(cfg, dataset, build_model(cfg.model, dataset, cfg.hidden_sizes(), 0),
                                 comm.Comm(MPI.COMM_SELF))
    strategy.setup()

    noise = strategy._noise(round_=3)

    update = noise[strategy.slices["params"]]
    z_update = 1.2 if adaptive is None else (1.2 ** -2 - 10.0 ** -2) ** -0.5  # sigma_b = 100 / 20
    assert update.std().item() == pytest.approx(z_update * 0.4, rel=0.02)  # 17,226 draws: 0.5% standard error
    counts = [strategy._noise(round_=r)[strategy.slices["dp"]][1].item() for r in range(400)]
    assert np.std(counts) == pytest.approx(0.0 if adaptive is None else 5.0, abs=0.5)


def test_thresholds_exceed_what_any_other_rank_holds_of_a_client():
    from distml import secagg
    from distml.strategies.secure import thresholds
    clients = list(range(8))
    graph = secagg.neighbors(clients, 7, seed=0, round_=0)  # all pairs: 7 neighbours, a majority is 4
    dealt = {c: c % 2 for c in clients}  # rank 1 plays 4 of client 0's 7 neighbours

    t = thresholds(graph, dealt)

    assert t[0] == 5 and secagg.threshold(7) == 4  # a majority alone would let rank 1 rebuild client 0
    with pytest.raises(secagg.TooFewSurvivors, match="rank 1 plays 7 of its 7 neighbours"):
        thresholds(graph, {c: int(c > 0) for c in clients})  # client 0 alone on rank 0


def test_the_clipped_count_is_centred_so_one_client_moves_it_by_a_half(monkeypatch):
    from distml.strategies.federated import FederatedStrategy
    cfg = Config(mode="federated", dataset="digits", hidden="16", clients=10, clients_per_round=10, dp_clip=0.05,
                 dp_noise=0.0, dp_adaptive_clip=0.5, local_steps=2, quiet=True).validate(writes_outputs=False)
    dataset = load_dataset(cfg)
    strategy = FederatedStrategy(cfg, dataset, build_model(cfg.model, dataset, cfg.hidden_sizes(), 0),
                                 comm.Comm(MPI.COMM_SELF))
    strategy.setup()
    parts = []
    monkeypatch.setattr(strategy, "_contribute", lambda client, part: parts.append(part.clone()))

    strategy.train_round(0)

    counts = {float(p[strategy.slices["dp"]][1]) for p in parts}
    assert len(parts) > 0 and counts <= {-0.5, 0.5}
