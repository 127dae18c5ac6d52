"""GANInfluence against the truth it approximates: replaying the run without each instance.

Every test trains a tiny 2-D GAN (float64, a few dozen steps) and compares the estimate for
*every* training instance with the measured change of the target after a brute-force replay
without that instance (same batches, same latents).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from unlearn.data import UnknownIdError, from_tensors
from unlearn.generative.metrics import AverageLogLikelihood
from unlearn.generative.models import gan_2d
from unlearn.generative.training import replay, train_gan
from unlearn.influence import GANInfluence

N_TRAIN = 16


def _gaussian_2d(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([1.0, 0.5], dtype=torch.float64)
    return torch.randn(n, 2, generator=g, dtype=torch.float64) * scale + 1.0


@pytest.fixture(scope="module")
def data():
    x = _gaussian_2d(N_TRAIN, 0)
    x[3] = torch.tensor([4.0, -3.0], dtype=torch.float64)  # an outlier, to spread the scores
    return from_tensors(x, torch.zeros(N_TRAIN, dtype=torch.long)), _gaussian_2d(200, 1)


def _train(dataset, lr=0.05, **kw):
    g, d = gan_2d(latent_dim=3, hidden_g=8, hidden_d=8, seed=1)
    kw = {"epochs": 3, "batch_size": 4, "lr_d": lr, "lr_g": lr, "seed": 0, **kw}
    return train_gan(g, d, dataset, **kw)


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def _rel_err(est: torch.Tensor, truth: torch.Tensor) -> float:
    return float((est - truth).norm() / truth.norm())


def test_matches_brute_force_replay_for_every_instance(data):
    dataset, val = data
    traj = _train(dataset, lr=0.05)
    est = GANInfluence(traj, AverageLogLikelihood(val), eval_latents=200)
    scores, truth = est.scores(), est.replay_truth()
    assert scores.shape == truth.shape == (N_TRAIN,)
    assert truth.abs().max() > 0  # the check has teeth: removals do move the metric
    assert _corr(scores, truth) > 0.99
    assert _rel_err(scores, truth) < 0.1
    assert torch.equal(torch.sign(scores[3]), torch.sign(truth[3]))


def test_tiny_learning_rate_is_near_exact(data):
    dataset, val = data
    traj = _train(dataset, lr=1e-4)
    est = GANInfluence(traj, AverageLogLikelihood(val), eval_latents=200)
    scores, truth = est.scores(), est.replay_truth()
    assert _rel_err(scores, truth) < 1e-3


@pytest.mark.parametrize("options", [{}, {"momentum": 0.8}])
def test_estimate_is_the_exact_derivative_even_where_removal_is_nonlinear(data, options):
    """With a large learning rate, leaving a whole instance out is far outside the linear
    regime (the estimate misses the replay truth), yet the estimate must still equal the
    derivative: a finite difference that down-weights the instance by ε in the replay."""
    dataset, val = data
    traj = _train(dataset, lr=0.4, epochs=5, **options)
    est = GANInfluence(traj, AverageLogLikelihood(val), eval_latents=100)
    scores, base, eps = est.scores(), est.value(), 1e-6
    ids = dataset.ids.tolist()
    fd = torch.tensor(
        [(est.value(replay(traj, weights={i: 1 - eps}).final_params()) - base) / eps for i in ids]
    )
    fd_err = _rel_err(scores, fd)
    assert fd_err < 1e-4
    assert _rel_err(scores, est.replay_truth()) > 100 * fd_err  # the regime is nonlinear


def test_scores_on_a_reweighted_trajectory(data):
    """An instance with weight w in the recorded run: removing it moves w to 0; with a tiny
    learning rate the estimate matches the replay truth."""
    dataset, val = data
    traj = replay(_train(dataset, lr=1e-4), weights={5: 0.5, 7: 2.0})
    est = GANInfluence(traj, AverageLogLikelihood(val), eval_latents=100)
    truth = est.replay_truth(ids=[5, 7, 9])
    assert _rel_err(est.scores()[[5, 7, 9]], truth) < 1e-3


@pytest.mark.parametrize(
    "options",
    [
        {"schedule": "simultaneous"},
        {"n_disc": 2, "loss": "minimax"},
        {"weight_decay_d": 0.1, "weight_decay_g": 0.05, "n_fake": 6},
        {"momentum": 0.7, "n_disc": 2},
        {"momentum": 0.5, "schedule": "simultaneous", "checkpoint_every": 4},
    ],
)
def test_other_schedules_and_losses_match_brute_force(data, options):
    dataset, val = data
    traj = _train(dataset, lr=0.02, **options)
    est = GANInfluence(traj, AverageLogLikelihood(val, bandwidth=0.5), eval_latents=100)
    scores, truth = est.scores(), est.replay_truth()
    assert _corr(scores, truth) > 0.99
    assert _rel_err(scores, truth) < 0.1


def test_discriminator_loss_target_matches_brute_force(data):
    dataset, val = data
    traj = _train(dataset, lr=0.05)
    est = GANInfluence(traj, target="discriminator_loss", validation=val, eval_latents=100)
    assert est.higher_is_better is None
    scores, truth = est.scores(), est.replay_truth()
    assert _corr(scores, truth) > 0.99


def test_cross_terms_are_needed(data):
    """Dropping the G↔D Jacobian blocks (what a per-player SGD-influence would do) must be
    visibly worse than the joint estimate, so the test above really checks the cross terms."""
    dataset, val = data
    traj = _train(dataset, lr=0.05)
    est = GANInfluence(traj, AverageLogLikelihood(val), eval_latents=200)
    truth = est.replay_truth()
    joint_err = _rel_err(est.scores(), truth)

    class NoCross(GANInfluence):
        def _step_back(self, t, theta_t, u):
            ng = self.trajectory.n_g
            own = u.clone()  # keep only the moving player's adjoint block
            if int(self.trajectory.kinds[t]) == 1:
                own[:ng] = 0
            else:
                own[ng:] = 0
            u_new, rows, contrib = super()._step_back(t, theta_t, own)
            restore = slice(0, ng) if int(self.trajectory.kinds[t]) == 1 else slice(ng, None)
            u_new[restore] = u[restore]  # the other block passes through untouched
            return u_new, rows, contrib

    naive = NoCross(traj, AverageLogLikelihood(val), eval_latents=est.eval_latents)
    naive_err = _rel_err(naive.scores(), truth)
    assert naive_err > 2 * joint_err


def test_checkpointed_trajectory_gives_the_same_scores(data):
    dataset, val = data
    full = _train(dataset, lr=0.05)
    sparse = _train(dataset, lr=0.05, checkpoint_every=5)
    assert len(sparse.checkpoints) < len(full.checkpoints)
    metric = AverageLogLikelihood(val)
    a = GANInfluence(full, metric, eval_latents=50).scores()
    b = GANInfluence(sparse, metric, eval_latents=50).scores()
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


def test_last_steps_limits_the_trace(data):
    dataset, val = data
    traj = _train(dataset, lr=0.05)
    metric = AverageLogLikelihood(val)
    full = GANInfluence(traj, metric, eval_latents=50).scores()
    all_steps = GANInfluence(traj, metric, eval_latents=50, last_steps=len(traj)).scores()
    torch.testing.assert_close(full, all_steps)
    # only the last G step: no real batch is visited, so nothing is attributed
    last = GANInfluence(traj, metric, eval_latents=50, last_steps=1).scores()
    assert int(traj.kinds[-1]) == 2 and torch.count_nonzero(last) == 0


def test_scores_by_id_and_order(data):
    dataset, val = data
    traj = _train(dataset, lr=0.05)
    est = GANInfluence(traj, AverageLogLikelihood(val), eval_latents=50)
    by_id = est.scores_by_id()
    assert list(by_id) == dataset.ids.tolist()
    truth = est.replay_truth(ids=[5, 2])
    s = est.scores()
    assert _corr(torch.stack([s[5], s[2], s[3]]), torch.cat([truth, est.replay_truth([3])])) > 0.9


def test_bad_inputs(data):
    dataset, val = data
    traj = _train(dataset, lr=0.05, epochs=1)
    metric = AverageLogLikelihood(val)
    with pytest.raises(ValueError, match="needs a metric"):
        GANInfluence(traj)
    with pytest.raises(ValueError, match="target must be one of"):
        GANInfluence(traj, metric, target="fid")
    with pytest.raises(ValueError, match="validation"):
        GANInfluence(traj, target="discriminator_loss")
    with pytest.raises(ValueError, match="NaN"):
        bad = val.clone()
        bad[0, 0] = float("nan")
        GANInfluence(traj, target="discriminator_loss", validation=bad)
    with pytest.raises(ValueError, match="NaN"):
        z = torch.zeros(5, 3, dtype=torch.float64)
        z[1, 1] = float("nan")
        GANInfluence(traj, metric, eval_latents=z)
    with pytest.raises(ValueError, match="shape"):
        GANInfluence(traj, metric, eval_latents=torch.zeros(5, 4))
    with pytest.raises(ValueError, match="last_steps"):
        GANInfluence(traj, metric, last_steps=0)
    with pytest.raises(UnknownIdError, match="999"):
        GANInfluence(traj, metric, eval_latents=10).replay_truth(ids=[1, 999])
    empty = dataclasses.replace(
        traj,
        kinds=traj.kinds[:0],
        lr_d=traj.lr_d[:0],
        lr_g=traj.lr_g[:0],
        batch_offsets=traj.batch_offsets[:1],
        batch_ids=traj.batch_ids[:0],
        seeds_d=traj.seeds_d[:0],
        seeds_g=traj.seeds_g[:0],
        n_fake_d=traj.n_fake_d[:0],
        n_fake_g=traj.n_fake_g[:0],
        checkpoints={0: traj.checkpoints[0]},
    )
    with pytest.raises(ValueError, match="empty"):
        GANInfluence(empty, metric)

    def nan_metric(samples):
        return samples.sum() * float("nan")

    with pytest.raises(FloatingPointError, match="target"):
        GANInfluence(traj, nan_metric, eval_latents=10).scores()
