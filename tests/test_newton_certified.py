"""Newton-step removal and certified removal, checked against real retraining.

Newton: an L2-regularised float64 logistic regression on scikit-learn's digits; removing 8% of
the training set with one Newton step must land much closer to the retrained model than the
original model is (retraining to the objective the step targets, see unlearn/removal/newton.py).

Certified removal: the actual gradient residual, computed directly, never exceeds the
accumulated bound; the budget triggers retraining; accuracy matches retraining.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from loo_fixtures import breast_cancer_lr, full_batch
from torch import nn
from torch.utils.data import DataLoader

from unlearn.data import from_tensors, load_breast_cancer, load_digits
from unlearn.influence import EKFACInfluence, ExactInfluence
from unlearn.influence.grads import ParamSpace, iter_grads
from unlearn.removal import split_loaders
from unlearn.removal.certified import (
    CertifiedLinearModel,
    CertifiedRemoval,
    CertifiedState,
    OneVsRestTask,
    budget_constant,
    train_certifiable,
)
from unlearn.removal.newton import NewtonRemoval
from unlearn.tasks import ClassificationTask
from unlearn.training import train_lbfgs

L2 = 1e-2


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


# ---------------------------------------------------------------------------- Newton


@pytest.fixture(scope="module")
def digits_lr():
    """Float64 multinomial LR on 800 digits, 64 of them (8%) to forget, and the retrained
    references for both targets: ``loo`` (full-n normaliser) and ``retrain`` (mean over the
    retained data)."""
    x, y = load_digits().tensors()
    train = from_tensors(x[:800].double(), y[:800])
    task = ClassificationTask()
    torch.manual_seed(0)
    model = nn.Linear(64, 10).double()
    train_lbfgs(model, task, full_batch(train), L2)
    n = len(train)
    forget_ids = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:64].tolist()
    forget, retain = split_loaders(train, forget_ids, batch_size=1024)
    refs = {}
    for target, normalizer in (("loo", n), ("retrain", None)):
        ref = copy.deepcopy(model)
        train_lbfgs(ref, task, retain, L2, normalizer=normalizer)
        refs[target] = flat(ref)
    exact = ExactInfluence(model, task, L2, progress=False).fit(full_batch(train))
    ekfac = EKFACInfluence(model, task, L2, fisher="exact", progress=False).fit(full_batch(train))
    return {"model": model, "task": task, "train": train, "forget": forget, "retain": retain,
            "refs": refs, "exact": exact, "ekfac": ekfac}


def _closeness(setup, estimator, curvature: str, target: str) -> tuple[float, float]:
    """(how many times closer to the retrained model than the original, cosine between the
    step and the true displacement)."""
    model, ref = setup["model"], setup["refs"][target]
    result = NewtonRemoval(setup["task"], estimator, curvature=curvature, target=target).unlearn(
        model, forget=setup["forget"], retain=setup["retain"])
    step, truth = flat(result.model) - flat(model), ref - flat(model)
    ratio = float(truth.norm() / (flat(result.model) - ref).norm())
    return ratio, float(step @ truth / (step.norm() * truth.norm()))


# measured (digits, 8% removed): exact full 9-11x, retain 47-61x; EK-FAC 2.3-2.9x, cos 0.93-0.95
@pytest.mark.parametrize("target", ["loo", "retrain"])
@pytest.mark.parametrize("curvature,min_ratio,min_cos",
                         [("full", 5.0, 0.99), ("retain", 25.0, 0.999)])
def test_newton_exact_approaches_retraining(digits_lr, target, curvature, min_ratio, min_cos):
    ratio, cos = _closeness(digits_lr, digits_lr["exact"], curvature, target)
    assert ratio > min_ratio, f"only {ratio:.1f}x closer to retraining than the original"
    assert cos > min_cos


@pytest.mark.parametrize("curvature", ["full", "retain"])
def test_newton_ekfac_approaches_retraining(digits_lr, curvature):
    ratio, cos = _closeness(digits_lr, digits_lr["ekfac"], curvature, "retrain")
    assert ratio > 1.8, f"only {ratio:.2f}x closer to retraining than the original"
    assert cos > 0.9


def test_newton_step_sign_and_scale_follow_the_score_convention():
    """Forgetting one point: the step is +(1/n)(H+λI)⁻¹∇ℓ_i, so the change in each query
    loss is the influence score (first order), and it matches leave-one-out retraining."""
    model, task, train, query = breast_cancer_lr(0.1)
    est = ExactInfluence(model, task, 0.1, progress=False).fit(full_batch(train))
    removed = [3, 17, 250]
    scores = est.scores(full_batch(query), full_batch(train))[:, removed]
    n = len(train)
    for col, i in enumerate(removed):
        forget, retain = split_loaders(train, [i])
        new = NewtonRemoval(task, est).unlearn(model, forget=forget).model
        g = next(iter_grads(model, task, forget, est.space))[0]
        expected = est.inverse_hvp(g) / n
        assert torch.allclose(flat(new) - flat(model), expected, rtol=1e-10, atol=1e-14)
        with torch.no_grad():
            change = task.loss(new, next(iter(full_batch(query)))) - task.loss(
                model, next(iter(full_batch(query))))
        assert torch.corrcoef(torch.stack([change, scores[:, col]]))[0, 1] > 0.999
        loo = copy.deepcopy(model)
        train_lbfgs(loo, task, retain, 0.1, normalizer=n)
        truth = flat(loo) - flat(model)
        # (L-BFGS retraining itself is only precise to about 1e-5 in the parameters here)
        assert float((flat(new) - flat(loo)).norm()) < 0.05 * float(truth.norm()) + 1e-5


def test_newton_moves_only_the_estimators_parameters(digits_lr):
    model, task = digits_lr["model"], digits_lr["task"]
    est = ExactInfluence(model, task, L2, params=["weight"], progress=False)
    est.fit(full_batch(digits_lr["train"]))
    result = NewtonRemoval(task, est).unlearn(model, forget=digits_lr["forget"])
    assert torch.equal(result.model.bias, model.bias)
    assert not torch.equal(result.model.weight, model.weight)
    assert result.details["params_updated"] == model.weight.numel()
    assert result.details["estimator"] == "ExactInfluence" and result.details["step_norm"] > 0
    assert result.details["curvature_drift"] == 0.0
    # reused after a removal, the curvature is stale, and the details say by how much
    again = NewtonRemoval(task, est).unlearn(result.model, forget=digits_lr["forget"])
    assert again.details["curvature_drift"] > 1e-3


def test_newton_bad_input(digits_lr):
    model, task, exact = digits_lr["model"], digits_lr["task"], digits_lr["exact"]
    with pytest.raises(ValueError, match="needs a fitted estimator"):
        NewtonRemoval(task)
    with pytest.raises(ValueError, match="not fitted"):
        NewtonRemoval(task, ExactInfluence(model, task, L2, progress=False))
    with pytest.raises(ValueError, match="curvature must be"):
        NewtonRemoval(task, exact, curvature="diag")
    with pytest.raises(ValueError, match="target must be"):
        NewtonRemoval(task, exact, target="mean")
    with pytest.raises(ValueError, match="damping"):
        NewtonRemoval(task, exact, damping=-1.0)
    with pytest.raises(ValueError, match="needs the retained data"):
        NewtonRemoval(task, exact, curvature="retain").unlearn(model, forget=digits_lr["forget"])
    small_retain = DataLoader(digits_lr["train"].subset(range(100, 200)), batch_size=64)
    forget = DataLoader(digits_lr["train"].subset(range(10)), batch_size=64)
    with pytest.raises(ValueError, match="fitted on 800 examples"):
        NewtonRemoval(task, exact).unlearn(model, forget=forget, retain=small_retain)


# ---------------------------------------------------------------------------- certified


def _digits_unit(n_train: int = 1400):
    """Digits with unit-norm rows (as in the paper), ids = original positions."""
    x, y = load_digits().tensors()
    x = x / x.norm(dim=1, keepdim=True)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:n_train], perm[n_train:]
    return from_tensors(x[tr], y[tr], ids=tr), x[te], y[te]


def _accuracy(model: CertifiedLinearModel, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model.predict(x) == y).double().mean())


@pytest.fixture(scope="module")
def certified_run():
    """20 sequential removals (single points, then batches of 3) from a certified OvR model."""
    train, x_test, y_test = _digits_unit()
    model = train_certifiable(DataLoader(train, batch_size=512), l2=L2, noise_std=1.0, seed=0)
    method = CertifiedRemoval(None, epsilon=1.0, delta=1e-4)
    order = train.ids[torch.randperm(len(train), generator=torch.Generator().manual_seed(1))]
    requests = [order[i : i + 1] for i in range(10)] + [order[10 + 3 * i : 13 + 3 * i]
                                                         for i in range(5)]
    current, steps, models = train, [], [model]
    for ids in requests:
        forget, retain = split_loaders(current, ids, batch_size=2048)
        result = method.unlearn(models[-1], forget=forget, retain=retain)
        current = current.without(ids)
        steps.append((result, retain))
        models.append(result.model)
    return {"train": train, "test": (x_test, y_test), "method": method, "steps": steps,
            "models": models, "retained": current}


def test_actual_residual_never_exceeds_the_accumulated_bound(certified_run):
    previous = certified_run["models"][0].state.residual_bound
    first = certified_run["steps"][0][0].details
    assert first["bound_step"] < 10 * first["residual_actual"]  # measured 4x: not vacuous
    for result, retain in certified_run["steps"]:
        d = result.details
        assert not d["retrained"]  # this run stays within its budget
        assert d["residual_bound"] == pytest.approx(previous + d["bound_step"])
        assert 0 < d["residual_actual"] <= d["residual_bound"] and d["bound_holds"]
        assert d["bound_step"] <= d["bound_paper"]
        # the residual recomputed independently, from the returned model alone
        assert result.model.residual_norm(retain) == pytest.approx(d["residual_actual"])
        assert d["budget"] == pytest.approx(1.0 * 1.0 / math.sqrt(2 * math.log(1.5e4)))
        assert d["budget_remaining"] == pytest.approx(d["budget"] - d["residual_bound"])
        assert d["epsilon_spent"] == pytest.approx(budget_constant(1e-4) * d["residual_bound"])
        previous = d["residual_bound"]
    final = certified_run["models"][-1].state
    assert final.num_removed == 25 and final.n_train == len(certified_run["retained"])


def test_certified_removal_matches_retraining(certified_run):
    """Same noise draw, retrained on the retained data: weights far closer than the
    original's, test accuracy within 0.5 percentage points."""
    x_test, y_test = certified_run["test"]
    original, removed = certified_run["models"][0], certified_run["models"][-1]
    retrained = train_certifiable(DataLoader(certified_run["retained"], batch_size=512), l2=L2,
                                  noise_std=1.0, seed=0)
    gap = (removed.weight_matrix() - retrained.weight_matrix()).norm()
    before = (original.weight_matrix() - retrained.weight_matrix()).norm()
    assert gap < before / 100
    assert abs(_accuracy(removed, x_test, y_test) - _accuracy(retrained, x_test, y_test)) <= 0.005


def test_budget_exhaustion_triggers_retraining():
    train, _, _ = _digits_unit(600)
    model = train_certifiable(DataLoader(train, batch_size=512), l2=L2, noise_std=1.0, seed=3)
    method = CertifiedRemoval(None, epsilon=0.2, delta=1e-4)  # budget ≈ 2 steps' bounds
    current, m, retrained_at = train, model, []
    for k, i in enumerate(train.ids[:6].tolist()):
        forget, retain = split_loaders(current, [i], batch_size=1024)
        result = method.unlearn(m, forget=forget, retain=retain)
        d = result.details
        assert d["residual_actual"] <= d["residual_bound"] <= d["budget"]
        if d["retrained"]:
            retrained_at.append(k)
            assert d["residual_bound"] == result.model.state.training_residual < 1e-3
            assert d["bound_step"] + result.model.state.residual_bound > 0
        current, m = current.without([i]), result.model
    assert retrained_at, "the budget never ran out"
    assert len(retrained_at) < 6, "every request retrained: the test no longer mixes both"
    assert m.state.retrains == len(retrained_at) == m.state.noise_draw
    # the retrained model is the certifiable optimum on the retained data with a fresh draw
    assert m.residual_norm(DataLoader(current, batch_size=1024)) <= m.state.residual_bound
    reference = train_certifiable(DataLoader(current, batch_size=1024), l2=L2, noise_std=1.0,
                                  seed=3, noise_draw=m.state.noise_draw)
    if retrained_at[-1] == 5:  # retrained at the last request: the very same optimum
        assert torch.allclose(m.weight_matrix(), reference.weight_matrix(), atol=1e-6)
    else:
        assert (m.weight_matrix() - reference.weight_matrix()).norm() < 1e-2


def test_binary_model_and_bound():
    data = load_breast_cancer()
    x, y = data.tensors()
    x = x / x.norm(dim=1, keepdim=True)
    train = from_tensors(x[:450], y[:450])
    model = train_certifiable(DataLoader(train, batch_size=512), l2=1e-2, noise_std=1.0,
                              seed=0, binary=True)
    assert model.num_outputs == 1
    method = CertifiedRemoval(OneVsRestTask(), 1.0, 1e-3)
    current, m = train, model
    for ids in ([5], [9, 40], [100]):
        forget, retain = split_loaders(current, ids, batch_size=512)
        d = (result := method.unlearn(m, forget=forget, retain=retain)).details
        assert d["residual_actual"] <= d["residual_bound"]
        current, m = current.without(ids), result.model
    assert _accuracy(m, x[450:], y[450:]) > 0.9


def test_noise_is_in_the_training_objective():
    train, _, _ = _digits_unit(500)
    loader = DataLoader(train, batch_size=512)
    a = train_certifiable(loader, l2=L2, noise_std=1.0, seed=0)
    b = train_certifiable(loader, l2=L2, noise_std=1.0, seed=1)
    assert (a.weight_matrix() - b.weight_matrix()).norm() > 1e-2
    q0 = train_certifiable(loader, l2=L2, noise_std=0.0, seed=0)
    q1 = train_certifiable(loader, l2=L2, noise_std=0.0, seed=1)
    assert torch.allclose(q0.weight_matrix(), q1.weight_matrix(), atol=1e-8)
    # at the optimum the noiseless gradient (mean form) balances the noise: ∇ = −B/n
    W = a.weight_matrix().requires_grad_(True)
    x, y = train.tensors()
    X = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
    z = X @ W.T
    loss = OneVsRestTask().per_sample_loss(z, y).mean() + 0.5 * L2 * (W**2).sum()
    (grad,) = torch.autograd.grad(loss, W)
    B = a.noise()
    assert B.std() == pytest.approx(1.0, rel=0.1)
    assert torch.allclose(grad, -B / len(train), atol=1e-8)
    assert a.state.training_residual < 1e-4


def test_frozen_feature_extractor():
    train, x_test, y_test = _digits_unit(600)
    torch.manual_seed(0)
    extractor = nn.Sequential(nn.Linear(64, 48), nn.Tanh())
    before = copy.deepcopy(extractor.state_dict())
    model = train_certifiable(DataLoader(train, batch_size=256), l2=L2, noise_std=1.0, seed=0,
                              features=extractor)
    assert all(not p.requires_grad for p in model.features.parameters())
    assert model.head.in_features == 48
    forget, retain = split_loaders(train, train.ids[:2], batch_size=1024)
    result = CertifiedRemoval(None, 1.0, 1e-4).unlearn(model, forget=forget, retain=retain)
    assert result.details["residual_actual"] <= result.details["residual_bound"]
    for k, v in result.model.features.state_dict().items():
        assert torch.equal(v, before[k])
    assert not torch.equal(result.model.head.weight, model.head.weight)
    assert ParamSpace.of(result.model).names == ("head.weight", "head.bias")


def test_state_serialises_and_travels_with_the_model(certified_run):
    first, last = certified_run["models"][0], certified_run["models"][-1]
    assert first.state.num_removed == 0  # the input model is untouched
    data = json.loads(json.dumps(last.certificate()))
    assert CertifiedState.from_dict(data) == last.state
    assert data["num_removed"] == 25 and data["noise_std"] == 1.0 and data["l2"] == L2
    fresh = CertifiedLinearModel(64, 10, CertifiedState(1.0, 1.0, 9, 1))
    fresh.load_state_dict(last.state_dict())
    assert fresh.state == last.state
    assert torch.equal(fresh.weight_matrix(), last.weight_matrix())
    with pytest.raises(ValueError, match="not a certified-model state"):
        CertifiedState.from_dict({"l2": 1.0})


def test_certified_bad_input(certified_run):
    method = certified_run["method"]
    last, retained = certified_run["models"][-1], certified_run["retained"]
    removed = certified_run["models"][-1].state.removed_ids
    # removing an id twice
    again = DataLoader(certified_run["train"].subset(removed[:1]), batch_size=8)
    with pytest.raises(ValueError, match="already removed"):
        method.unlearn(last, forget=again, retain=DataLoader(retained, batch_size=2048))
    # retain that is not the current training set minus forget
    forget, retain = split_loaders(retained, retained.ids[:1], batch_size=2048)
    short = DataLoader(retained.without(retained.ids[:5]), batch_size=2048)
    with pytest.raises(ValueError, match="whole current training set"):
        method.unlearn(last, forget=forget, retain=short)
    stale = DataLoader(certified_run["train"].without(retained.ids[:1]), batch_size=2048)
    with pytest.raises(ValueError, match="removed earlier"):
        method.unlearn(last, forget=forget, retain=stale)
    # empty forget set
    empty = DataLoader(retained.subset([]), batch_size=8)
    with pytest.raises(ValueError, match="empty"):
        method.unlearn(last, forget=empty, retain=retain)
    # loaders without ids
    x, y = retained.tensors()
    with pytest.raises(ValueError, match="ids"):
        method.unlearn(last, forget=DataLoader(torch.utils.data.TensorDataset(x[:1], y[:1])),
                       retain=DataLoader(torch.utils.data.TensorDataset(x[1:], y[1:])))
    for eps in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="epsilon"):
            CertifiedRemoval(None, eps, 1e-4)
    for delta in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="delta"):
            CertifiedRemoval(None, 1.0, delta)
    with pytest.raises(TypeError, match="OneVsRestTask"):
        CertifiedRemoval(ClassificationTask(), 1.0, 1e-4)
    with pytest.raises(TypeError, match="CertifiedLinearModel"):
        method.unlearn(nn.Linear(64, 10).double(), forget=forget, retain=retain)
    noiseless = train_certifiable(DataLoader(retained, batch_size=2048), l2=L2, noise_std=0.0)
    with pytest.raises(ValueError, match="without loss-perturbation noise"):
        method.unlearn(noiseless, forget=forget, retain=retain)
    with pytest.raises(ValueError, match="l2"):
        train_certifiable(DataLoader(retained, batch_size=2048), l2=0.0, noise_std=1.0)
    with pytest.raises(ValueError, match="noise_std"):
        train_certifiable(DataLoader(retained, batch_size=2048), l2=L2, noise_std=-1.0)


def test_estimators_without_inverse_curvature_are_refused():
    from unlearn.influence import GradientDotInfluence
    from unlearn.removal import IAU

    model, task, train, _ = breast_cancer_lr(0.1)
    dot = GradientDotInfluence(model, task, progress=False).fit(full_batch(train))
    with pytest.raises(ValueError, match="no inverse curvature"):
        NewtonRemoval(task, estimator=dot)
    with pytest.raises(ValueError, match="no inverse curvature"):
        IAU(task, estimator=dot)
    forget, retain = split_loaders(train, [0, 1, 2], batch_size=400)
    with pytest.raises(ValueError, match="no inverse curvature"):  # a provider is checked too
        IAU(task, estimator=lambda: dot).unlearn(model, forget=forget, retain=retain)
    factory = NewtonRemoval(task, curvature="retain", damping=0.1,
                            estimator_factory=lambda m, t, d: GradientDotInfluence(m, t))
    with pytest.raises(ValueError, match="no inverse curvature"):
        factory.unlearn(model, forget=forget, retain=retain)
