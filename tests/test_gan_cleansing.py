"""GAN data cleansing (unlearn.removal.gan) against brute-force replay on a tiny 2-D GAN."""

import pytest
import torch

from unlearn.data import UnknownIdError, from_tensors
from unlearn.generative.metrics import AverageLogLikelihood
from unlearn.generative.models import gan_2d
from unlearn.generative.training import replay, train_gan
from unlearn.influence.gan import GANInfluence
from unlearn.removal.gan import GANCleansing, metric_of, selection_harm, tail_of
from unlearn.removal.gan_selection import (
    harm_from_influence,
    isolation_forest_harm,
    random_harm,
    removal_count,
    select_top,
)

MEAN = torch.tensor([1.0, 1.0], dtype=torch.float64)
COV = torch.tensor([[1.0, 0.8], [0.8, 1.0]], dtype=torch.float64)


def gaussian(n, gen):
    return (
        torch.randn(n, 2, generator=gen, dtype=torch.float64) @ torch.linalg.cholesky(COV).T + MEAN
    )


@pytest.fixture(scope="module")
def run():
    """40 training points (two of them far outliers), 8 epochs of batch 10: 64 SGD steps."""
    gen = torch.Generator().manual_seed(0)
    x = gaussian(40, gen)
    x[7] = torch.tensor([6.0, -4.0], dtype=torch.float64)
    x[23] = torch.tensor([-5.0, 5.0], dtype=torch.float64)
    data = from_tensors(x, torch.zeros(40, dtype=torch.long), ids=torch.arange(100, 140))
    g, d = gan_2d(latent_dim=4, hidden_g=16, hidden_d=16, seed=0)
    traj = train_gan(g, d, data, epochs=8, batch_size=10, lr_d=0.05, lr_g=0.05, seed=0)
    metric = AverageLogLikelihood(gaussian(300, gen), bandwidth=0.5)
    z = torch.randn(300, 4, generator=gen, dtype=torch.float64)
    return traj, data, metric, z


def final_of(result):
    return result.trajectory.final_params()


def test_replay_excluding_nothing_equals_the_original(run):
    traj, _, metric, z = run
    res = GANCleansing(k=0).cleanse(traj, harm=torch.zeros(40), metric=metric, eval_latents=z)
    assert torch.equal(final_of(res), traj.final_params())
    assert res.details["n_removed"] == 0 and res.details["metric_change"] == 0.0
    g0, _ = traj.models()
    for p, q in zip(res.generator.parameters(), g0.parameters()):
        assert torch.equal(p, q)


def test_removing_brute_force_harmful_instances_improves_the_metric(run):
    traj, _, metric, z = run
    est = GANInfluence(traj, metric, eval_latents=z)
    truth = est.replay_truth()  # true metric change of each single removal
    k = 4
    harmful = traj.train_ids[torch.argsort(truth, descending=True)[:k]].tolist()
    # replay_truth keeps each batch's divisor: cleanse with the same protocol
    res = GANCleansing(k=k, renormalize=False).cleanse(
        traj, remove_ids=harmful, metric=metric, eval_latents=z
    )
    assert res.details["metric_before"] == pytest.approx(est.value(), abs=1e-12)
    assert res.details["improved"] and res.details["metric_change"] > 0
    # better than removing k random instances, on average over several draws
    random_changes = [
        GANCleansing(k=k, renormalize=False)
        .cleanse(traj, harm=random_harm(40, s), metric=metric, eval_latents=z)
        .details["metric_change"]
        for s in range(5)
    ]
    assert res.details["metric_change"] > max(random_changes)
    # the influence estimate picks instances whose removal helps as well
    by_influence = GANCleansing(k=k, renormalize=False).cleanse(
        traj, scores=est.scores(), metric=metric, eval_latents=z
    )
    assert by_influence.details["metric_change"] > sum(random_changes) / len(random_changes)
    assert by_influence.details["metric_change"] > 0


def test_renormalized_replay_averages_over_the_kept_instances(run):
    """Default replay: each batch's real term is the mean over the instances it keeps. Checked
    against a hand-written first D step with torch.optim.SGD."""
    import torch.nn.functional as F

    traj, data, *_ = run
    batch0 = traj.batch(0)
    removed = batch0[:3] + [i for i in traj.train_ids.tolist() if i not in batch0][:2]
    res = GANCleansing().cleanse(traj, remove_ids=removed)
    assert res.details["divisor"] == "retained"
    g, d = traj.models(0)
    kept = [i for i in batch0 if i not in removed]
    x = data.tensors()[0][data.index_of(kept)]
    opt = torch.optim.SGD(d.parameters(), lr=float(traj.lr_d[0]))
    with torch.no_grad():
        fake = g(traj.latents(0, "d"))
    loss = F.softplus(-d(x)).mean() + F.softplus(d(fake)).mean()
    loss.backward()
    opt.step()
    _, d1 = res.trajectory.models(1)
    for p, q in zip(d.parameters(), d1.parameters()):
        assert torch.allclose(p, q, atol=1e-12, rtol=0)
    # the batch-size divisor (renormalize=False) is a different update
    _, d1_fixed = (
        GANCleansing(renormalize=False).cleanse(traj, remove_ids=removed).trajectory.models(1)
    )
    assert not all(torch.allclose(p, q) for p, q in zip(d1_fixed.parameters(), d.parameters()))
    # every later batch lost exactly the removed ids
    for t in range(len(traj)):
        assert res.trajectory.batch(t) == [i for i in traj.batch(t) if i not in removed]


def test_influence_selection_follows_the_metric_direction(run):
    traj, *_ = run
    scores = torch.linspace(-1, 1, 40)
    up = GANCleansing(k=3).select(traj, scores=scores, higher_is_better=True)
    down = GANCleansing(k=3).select(traj, scores=scores, higher_is_better=False)
    ids = traj.train_ids.tolist()
    assert up == [ids[39], ids[38], ids[37]]  # removal raises a higher-is-better metric most
    assert down == [ids[0], ids[1], ids[2]]  # removal lowers a lower-is-better one (FID) most
    assert torch.equal(harm_from_influence(scores, higher_is_better=False), -scores.double())


def test_selection_baselines(run):
    traj, data, metric, z = run
    r0 = selection_harm("random", traj, seed=0)
    assert torch.equal(r0, selection_harm("random", traj, seed=0))
    assert not torch.equal(r0, selection_harm("random", traj, seed=1))
    forest = selection_harm("isolation_forest", traj, seed=0)
    top2 = GANCleansing(k=2).select(traj, harm=forest)
    assert set(top2) == {107, 123}  # the two planted outliers
    # on given features (e.g. classifier features of images) instead of the raw samples
    feats = data.tensors()[0].flip(1)
    assert set(select_top(isolation_forest_harm(feats), traj.train_ids, 2).tolist()) == {107, 123}
    dloss = selection_harm("discriminator_loss", traj, validation=metric.validation, eval_latents=z)
    infl = selection_harm("influence", traj, metric=metric, eval_latents=z)
    assert dloss.shape == infl.shape == (40,)
    assert torch.isfinite(dloss).all() and torch.isfinite(infl).all()
    assert not torch.allclose(dloss, infl)


def test_retrain_mode_trains_on_the_retained_data(run):
    traj, data, metric, z = run
    same = GANCleansing(k=0, mode="retrain").cleanse(traj, harm=torch.zeros(40))
    assert torch.equal(final_of(same), traj.final_params())  # same data, seed, init: same run
    res = GANCleansing(fraction=0.1, mode="retrain").cleanse(
        traj, harm=selection_harm("isolation_forest", traj), metric=metric, eval_latents=z
    )
    assert res.details["n_removed"] == 4
    kept = set(res.trajectory.train_ids.tolist())
    assert kept.isdisjoint(res.details["removed_ids"]) and len(kept) == 36
    # a fresh run, not the counterfactual replay
    assert not torch.allclose(
        final_of(res), replay(traj, res.details["removed_ids"]).final_params()
    )
    calls = []

    def retrain_fn(retained):
        calls.append(len(retained))
        return train_gan(*traj.models(0), retained, epochs=1, batch_size=10, seed=1)

    GANCleansing(k=2, mode="retrain", retrain_fn=retrain_fn).cleanse(traj, harm=torch.ones(40))
    assert calls == [38]


def test_last_steps_replays_the_end_of_the_run(run):
    """One-epoch retraining: the tail from the recorded state; GANInfluence(last_steps=k)
    predicts exactly this counterfactual (to first order)."""
    traj, _, metric, z = run
    nothing = GANCleansing(k=0, last_steps=4).cleanse(traj, harm=torch.zeros(40))
    assert torch.equal(final_of(nothing), traj.final_params())
    assert nothing.details["replayed_steps"] == 4
    tail = tail_of(traj, 4)
    in_tail = {i for t in range(4) for i in tail.batch(t)}
    outside = [i for i in traj.train_ids.tolist() if i not in in_tail]
    assert outside  # 4 steps = 2 batches of 10 out of 40 points
    res = GANCleansing(last_steps=4).cleanse(traj, remove_ids=outside[:3])
    assert torch.equal(final_of(res), traj.final_params())  # not seen in the tail: no effect
    inside = sorted(in_tail)[:3]
    res = GANCleansing(last_steps=4).cleanse(traj, remove_ids=inside)
    assert not torch.equal(final_of(res), traj.final_params())
    # the influence traced over the same steps ranks single removals as the tail replay does
    est = GANInfluence(traj, metric, eval_latents=z, last_steps=16)
    ids = traj.train_ids[::5].tolist()
    base = est.value()
    truth = torch.tensor(
        [
            metric_of(
                GANCleansing(last_steps=16, renormalize=False)
                .cleanse(traj, remove_ids=[i])
                .generator,
                metric,
                z,
            )
            - base
            for i in ids
        ]
    )
    pred = est.scores()[::5]
    assert torch.corrcoef(torch.stack([pred, truth]))[0, 1] > 0.95
    with pytest.raises(ValueError, match="mode='replay'"):
        GANCleansing(k=1, mode="retrain", last_steps=4)
    with pytest.raises(ValueError, match="last_steps must be in"):
        GANCleansing(k=1, last_steps=10_000).cleanse(traj, harm=torch.zeros(40))


def test_removal_count():
    assert removal_count(40, fraction=0.1) == 4
    assert removal_count(40, k=40) == 40
    assert removal_count(40, fraction=0.0) == 0


def test_bad_inputs(run):
    traj, *_ = run
    with pytest.raises(ValueError, match="larger than the training set"):
        GANCleansing(k=41).cleanse(traj, harm=torch.zeros(40))
    with pytest.raises(UnknownIdError, match="unknown id"):
        GANCleansing().cleanse(traj, remove_ids=[100, 5])
    with pytest.raises(ValueError, match="empty"):
        GANCleansing(k=1).cleanse(traj, harm=torch.zeros(0))
    nan = torch.zeros(40)
    nan[3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        GANCleansing(k=1).cleanse(traj, scores=nan, higher_is_better=True)
    with pytest.raises(ValueError, match="40 instances"):
        GANCleansing(k=1).cleanse(traj, harm=torch.zeros(39))
    with pytest.raises(ValueError, match="direction"):
        GANCleansing(k=1).cleanse(traj, scores=torch.zeros(40))
    with pytest.raises(ValueError, match="exactly one"):
        GANCleansing(k=1).cleanse(traj, scores=torch.zeros(40), harm=torch.zeros(40))
    with pytest.raises(ValueError, match="at most one"):
        GANCleansing(k=1, fraction=0.1)
    with pytest.raises(ValueError, match="fraction"):
        GANCleansing(fraction=1.5)
    with pytest.raises(ValueError, match="k= or fraction="):
        GANCleansing().cleanse(traj, harm=torch.zeros(40))
    with pytest.raises(ValueError, match="duplicate"):
        GANCleansing().cleanse(traj, remove_ids=[100, 100])
    with pytest.raises(ValueError, match="mode"):
        GANCleansing(k=1, mode="finetune")
    with pytest.raises(ValueError, match="unknown selection"):
        selection_harm("loss", traj)
    with pytest.raises(ValueError, match="needs a metric"):
        selection_harm("influence", traj)
    with pytest.raises(TypeError, match="GANTrajectory"):
        GANCleansing(k=1).cleanse("run", harm=torch.zeros(40))


def _cli(argv):
    import argparse

    from unlearn import cli_gan

    parser = argparse.ArgumentParser(prog="unlearn")
    cli_gan.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.mark.parametrize("selection", ["influence", "isolation_forest"])
def test_cli_gan_cleanse_2d_writes_a_summary(tmp_path, selection):
    import json

    out = tmp_path / selection
    code = _cli(
        [
            "gan-cleanse",
            "--dataset",
            "2d",
            "--n-train",
            "60",
            "--epochs",
            "3",
            "--batch-size",
            "20",
            "--fraction",
            "0.1",
            "--selection",
            selection,
            "--out",
            str(out),
        ]
    )
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_removed"] == 6 and len(summary["removed_ids"]) == 6
    assert summary["metric_change"] == pytest.approx(
        summary["metric_after"] - summary["metric_before"]
    )
    assert (out / "generator.pt").is_file() and (out / "discriminator.pt").is_file()


def test_cli_gan_cleanse_last_epochs(tmp_path):
    import json

    out = tmp_path / "last"
    assert _cli(["gan-cleanse", "--n-train", "60", "--epochs", "3", "--batch-size", "20",
                 "--last-epochs", "1", "--out", str(out), "--json"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 18 and summary["replayed_steps"] == 6


def test_cli_gan_cleanse_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _cli(["gan-cleanse", "--fraction", "1.5"])
    assert "fraction" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _cli(["gan-cleanse", "--momentum", "1"])
    assert "momentum" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _cli(["gan-cleanse", "--selection", "loss"])
    from unlearn.cli import UserError

    with pytest.raises(UserError, match="--mode replay"):
        _cli(["gan-cleanse", "--mode", "retrain", "--last-epochs", "1",
              "--out", str(tmp_path / "o")])
    with pytest.raises(UserError, match="cannot load MNIST"):
        _cli(
            [
                "gan-cleanse",
                "--dataset",
                "mnist",
                "--mnist-root",
                str(tmp_path),
                "--out",
                str(tmp_path / "o"),
            ]
        )
