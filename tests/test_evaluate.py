"""Verification utilities: LOO, LDS and mislabel detection against constructed truths, and one
end-to-end LDS check of real estimators on scikit-learn digits."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from unlearn.data import from_tensors, load_breast_cancer, load_digits
from unlearn.influence.evaluate import (
    found_at,
    lds_from_losses,
    lds_subsets,
    leave_one_out,
    leave_one_out_lbfgs,
    linear_datamodeling_score,
    mislabel_auc,
    mislabel_detection_curve,
    query_losses,
    subset_query_losses,
)
from unlearn.influence.grads import ParamSpace, per_sample_grads
from unlearn.tasks import ClassificationTask, Task
from unlearn.training import train_lbfgs

# ---------------------------------------------------------------- a model additive in its data


class Lookup(nn.Module):
    """Query q's "loss" is ``values[q]``; inputs are query indices."""

    def __init__(self, n_query: int) -> None:
        super().__init__()
        self.values = nn.Parameter(torch.zeros(n_query, dtype=torch.float64))

    def forward(self, x: Tensor) -> Tensor:
        return self.values[x.long()]


class IdentityLoss(Task):
    def per_sample_loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return outputs


def additive_setup(n_train: int = 60, n_query: int = 40, noise: float = 0.0, seed: int = 0):
    """Training example i lowers query q's loss by ``effect[q, i]`` when included, so removing
    it raises the loss by exactly ``effect[q, i]``: the true scores are ``effect``."""
    g = torch.Generator().manual_seed(seed)
    effect = torch.randn(n_query, n_train, generator=g, dtype=torch.float64)
    train = from_tensors(torch.arange(n_train).double(), torch.zeros(n_train))
    query = from_tensors(torch.arange(n_query).double(), torch.zeros(n_query))

    def train_fn(dataset, init, seed: int | None = None):
        x = dataset.tensors()[0].long()
        model = Lookup(n_query)
        rng = torch.Generator().manual_seed(1000 * (seed or 0) + int(x.sum()))
        jitter = noise * torch.randn(n_query, generator=rng, dtype=torch.float64)
        model.values.data = 5.0 - effect[:, x].sum(dim=1) + jitter
        return model

    return effect, train, query, train_fn


def test_lds_is_one_for_the_true_additive_scores():
    effect, train, query, train_fn = additive_setup()
    out = linear_datamodeling_score(effect, train_fn, train, query, IdentityLoss(),
                                    n_subsets=30, progress=False)
    assert out["lds"] == pytest.approx(1.0, abs=1e-12)
    assert out["per_query"].shape == (40,) and out["n_undefined"] == 0
    # the sign convention matters: flipped scores rank the subsets exactly backwards
    flipped = linear_datamodeling_score(-effect, train_fn, train, query, IdentityLoss(),
                                        n_subsets=30, progress=False)
    assert flipped["lds"] == pytest.approx(-1.0, abs=1e-12)
    # scale and a per-query offset do not change a rank correlation
    scaled = 3.0 * effect + torch.randn(40, 1, dtype=torch.float64)
    rescaled = linear_datamodeling_score(scaled, train_fn, train, query, IdentityLoss(),
                                         n_subsets=30, progress=False)
    assert rescaled["lds"] == pytest.approx(1.0, abs=1e-12)


def test_lds_is_near_zero_for_random_scores_and_partial_for_noisy_ones():
    effect, train, query, train_fn = additive_setup(n_query=200)
    g = torch.Generator().manual_seed(7)
    random_scores = torch.randn(effect.shape, generator=g, dtype=torch.float64)
    out = linear_datamodeling_score(random_scores, train_fn, train, query, IdentityLoss(),
                                    n_subsets=50, progress=False)
    assert abs(out["lds"]) < 0.05
    noisy = effect + 1.5 * torch.randn(effect.shape, generator=g, dtype=torch.float64)
    mid = linear_datamodeling_score(noisy, train_fn, train, query, IdentityLoss(),
                                    n_subsets=50, progress=False)["lds"]
    assert 0.3 < mid < 0.9


def test_lds_averages_seeds_and_the_cache_is_reused_and_checked(tmp_path):
    effect, train, query, train_fn = additive_setup(noise=3.0)
    cache = tmp_path / "lds.npz"
    one = linear_datamodeling_score(effect, train_fn, train, query, IdentityLoss(),
                                    n_subsets=20, seeds=(0,), cache=cache, progress=False)
    five = linear_datamodeling_score(effect, train_fn, train, query, IdentityLoss(),
                                     n_subsets=20, seeds=range(5), cache=cache, progress=False)
    assert 0.2 < one["lds"] < five["lds"] - 0.1  # averaging seeds removes training noise

    def must_not_train(dataset, init):
        raise AssertionError("the cache should have been used")

    again = linear_datamodeling_score(effect, must_not_train, train, query, IdentityLoss(),
                                      n_subsets=20, seeds=range(5), cache=cache, progress=False)
    assert again["lds"] == five["lds"]
    with pytest.raises(ValueError, match="other subsets"):
        linear_datamodeling_score(effect, must_not_train, train, query, IdentityLoss(),
                                  n_subsets=20, subset_seed=1, cache=cache, progress=False)
    with pytest.raises(ValueError, match="meta"):
        linear_datamodeling_score(effect, must_not_train, train, query, IdentityLoss(),
                                  n_subsets=20, cache=cache, meta={"l2": 0.1}, progress=False)


def test_an_interrupted_lds_run_resumes_from_its_cache(tmp_path):
    effect, train, query, train_fn = additive_setup()
    cache, calls, stop_at = tmp_path / "lds.npz", [], [4]

    def flaky(dataset, init, seed=None):
        calls.append(seed)
        if len(calls) == stop_at[0]:
            raise RuntimeError("interrupted")
        return train_fn(dataset, init, seed=seed)

    with pytest.raises(RuntimeError, match="interrupted"):
        linear_datamodeling_score(effect, flaky, train, query, IdentityLoss(), n_subsets=10,
                                  cache=cache, progress=False)
    calls.clear()
    stop_at[0] = -1
    out = linear_datamodeling_score(effect, flaky, train, query, IdentityLoss(), n_subsets=10,
                                    cache=cache, progress=False)
    assert len(calls) == 7  # 3 were saved before the interruption
    assert out["lds"] == pytest.approx(1.0)


def test_lds_errors():
    effect, train, query, train_fn = additive_setup()
    task = IdentityLoss()
    with pytest.raises(ValueError, match="query rows"):
        linear_datamodeling_score(effect[:5], train_fn, train, query, task, progress=False)
    with pytest.raises(ValueError, match="columns"):
        linear_datamodeling_score(effect[:, :5], train_fn, train, query, task, progress=False)
    bad = effect.clone()
    bad[3, 4] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or inf \(first at \[3, 4\]\)"):
        linear_datamodeling_score(bad, train_fn, train, query, task, progress=False)
    with pytest.raises(ValueError, match="fraction"):
        lds_subsets(60, 10, fraction=1.0)
    with pytest.raises(ValueError, match="n_subsets"):
        lds_subsets(60, 2)
    with pytest.raises(ValueError, match="empty"):
        linear_datamodeling_score(effect, train_fn, train, query.subset([]), task,
                                  progress=False)
    subsets = lds_subsets(60, 10)
    with pytest.raises(ValueError, match="do not match"):
        lds_from_losses(effect, subsets, np.zeros((9, 40)))
    with pytest.raises(ValueError, match="do not vary"):
        lds_from_losses(effect, subsets, np.ones((10, 40)))


# ---------------------------------------------------------------- leave-one-out


def _cancer_lr(n_train: int = 300, l2: float = 0.1):
    data = load_breast_cancer()
    x, y = data.tensors()
    train = from_tensors(x[:n_train].double(), y[:n_train])
    query = from_tensors(x[n_train:n_train + 20].double(), y[n_train:n_train + 20])
    torch.manual_seed(0)
    model = nn.Linear(30, 2).double()
    train_lbfgs(model, ClassificationTask(), DataLoader(train, batch_size=512), l2)
    return model, train, query


def test_leave_one_out_lbfgs_matches_a_manual_retrain():
    model, train, query = _cancer_lr()
    task, l2, removed = ClassificationTask(), 0.1, [4, 17, 250]
    before = [p.clone() for p in model.parameters()]
    loo = leave_one_out_lbfgs(model, task, train, query, removed, l2, progress=False)
    assert loo.shape == (20, 3) and loo.dtype == torch.float64
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # untouched
    base = query_losses(model, task, query)
    for j, pos in enumerate(removed):
        manual = train_lbfgs(copy.deepcopy(model), task,
                             DataLoader(train.without([pos]), batch_size=512), l2,
                             normalizer=len(train))
        truth = query_losses(manual, task, query) - base
        torch.testing.assert_close(loo[:, j], truth, atol=1e-9, rtol=1e-6)
    # removing a training point changes query losses by a visible, non-zero amount
    assert loo.abs().max() > 1e-4


def test_leave_one_out_with_a_custom_train_fn_retrains_from_scratch():
    _, train, query = _cancer_lr(n_train=100)
    task, calls = ClassificationTask(), []

    def train_fn(dataset, init):
        calls.append((len(dataset), init))
        torch.manual_seed(0)
        return train_lbfgs(nn.Linear(30, 2).double(), task, DataLoader(dataset, batch_size=512),
                           0.1, normalizer=100)

    loo = leave_one_out(train_fn, train, query, torch.tensor([0, 5]), task=task,
                        warm_start=False, progress=False)
    assert [c[0] for c in calls] == [100, 99, 99] and all(c[1] is None for c in calls)
    assert loo.shape == (20, 2) and torch.isfinite(loo).all()


def test_leave_one_out_errors():
    model, train, query = _cancer_lr(n_train=50)
    task = ClassificationTask()
    with pytest.raises(ValueError, match="empty"):
        leave_one_out_lbfgs(model, task, train, query, [], 0.1, progress=False)
    with pytest.raises(ValueError, match="position 50, outside 0..49"):
        leave_one_out_lbfgs(model, task, train, query, [1, 50], 0.1, progress=False)
    with pytest.raises(ValueError, match="duplicate"):
        leave_one_out_lbfgs(model, task, train, query, [1, 1], 0.1, progress=False)
    with pytest.raises(ValueError, match="integer positions"):
        leave_one_out_lbfgs(model, task, train, query, [0.5], 0.1, progress=False)
    with pytest.raises(ValueError, match="l2"):
        leave_one_out_lbfgs(model, task, train, query, [1], float("nan"), progress=False)


# ---------------------------------------------------------------- mislabel detection


def test_mislabel_curve_on_a_constructed_ranking():
    # 10 examples, flipped ones at positions 2, 5, 9; scores rank 5 first, 2 third, 9 last
    scores = np.array([0.5, 0.1, 0.8, 0.9, 0.0, 2.0, 0.3, 0.2, 0.4, -1.0])
    mask = np.zeros(10, dtype=bool)
    mask[[2, 5, 9]] = True
    curve = mislabel_detection_curve(scores, mask)
    np.testing.assert_allclose(curve.inspected, np.arange(11) / 10)
    np.testing.assert_allclose(curve.found[:4], [0, 1 / 3, 1 / 3, 2 / 3])
    assert curve.found[-2] == pytest.approx(2 / 3) and curve.found[-1] == 1.0
    assert found_at(curve, 0.1) == pytest.approx(1 / 3)
    assert found_at(curve, 0.25) == pytest.approx(2 / 3)  # rounds up to 3 examples
    # AUC: pairs (flipped, clean) ranked correctly: 5 beats all 7, 2 beats 6 of 7, 9 beats 0
    assert curve.auc == pytest.approx((7 + 6 + 0) / 21)
    assert mislabel_auc(torch.tensor(scores), torch.tensor(mask)) == pytest.approx(curve.auc)
    perfect = mislabel_detection_curve(mask.astype(float), mask)
    assert perfect.auc == 1.0 and found_at(perfect, 0.3) == 1.0


def test_mislabel_errors():
    mask = np.array([True, False, False])
    with pytest.raises(ValueError, match="boolean"):
        mislabel_detection_curve(np.ones(3), np.array([0, 1, 0]))
    with pytest.raises(ValueError, match="shape"):
        mislabel_detection_curve(np.ones(4), mask)
    with pytest.raises(ValueError, match="no flipped"):
        mislabel_detection_curve(np.ones(3), np.zeros(3, dtype=bool))
    with pytest.raises(ValueError, match="every label"):
        mislabel_detection_curve(np.ones(3), np.ones(3, dtype=bool))
    with pytest.raises(ValueError, match="NaN"):
        mislabel_detection_curve(np.array([1.0, np.nan, 0.0]), mask)
    with pytest.raises(ValueError, match="1-D"):
        mislabel_detection_curve(np.ones((3, 1)), mask)
    with pytest.raises(ValueError, match="fraction"):
        found_at(mislabel_detection_curve(np.arange(3.0), mask), 1.5)


# ---------------------------------------------------------------- end to end on real data


def test_lds_of_exact_influence_on_digits_is_high():
    """Exact influence on a converged L2 logistic regression predicts which half-size subsets
    give a query a high loss; gradient similarity (no curvature) predicts it less well."""
    from unlearn.influence import ExactInfluence

    data = load_digits()
    x, y = data.tensors()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    tr, qu = perm[:600].sort().values, perm[600:650].sort().values
    train = from_tensors(x[tr].double(), y[tr], ids=tr)
    query = from_tensors(x[qu].double(), y[qu], ids=qu)
    task, l2 = ClassificationTask(), 1e-2
    torch.manual_seed(0)
    model = train_lbfgs(nn.Linear(64, 10).double(), task, DataLoader(train, batch_size=1024), l2)

    def train_fn(dataset, init):
        return train_lbfgs(init, task, DataLoader(dataset, batch_size=1024), l2)

    train_loader = DataLoader(train, batch_size=600)
    query_loader = DataLoader(query, batch_size=50)
    subsets = lds_subsets(len(train), 30)
    losses = subset_query_losses(train_fn, train, query, task, subsets, init_model=model,
                                 progress=False)
    est = ExactInfluence(model, task, damping=l2, progress=False).fit(train_loader)
    exact = lds_from_losses(est.scores(query_loader, train_loader), subsets, losses)["lds"]
    assert exact > 0.8, exact
    # gradient similarity without any curvature: the plain dot product of loss gradients
    space = ParamSpace.of(model)
    gq = per_sample_grads(model, task, next(iter(query_loader)), space, query=True)
    gt = per_sample_grads(model, task, next(iter(train_loader)), space)
    dot = lds_from_losses(gq @ gt.T, subsets, losses)["lds"]
    print(f"digits LR LDS: exact {exact:.3f}, gradient dot {dot:.3f}")
    assert dot < exact - 0.2, (dot, exact)
