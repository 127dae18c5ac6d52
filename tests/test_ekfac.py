"""K-FAC / EK-FAC influence: the factors against brute force, the curvature against the exact
Gauss-Newton matrix, the scores against real leave-one-out retraining."""

from __future__ import annotations

import warnings

import pytest
import torch
from loo_fixtures import breast_cancer_lr, loo_truth, pearson
from torch import Tensor, nn
from torch.utils.data import DataLoader

from unlearn.data import from_tensors, load_digits
from unlearn.influence import EKFACInfluence, ExactInfluence, KFACInfluence
from unlearn.influence.grads import per_sample_grads
from unlearn.tasks import ClassificationTask, RegressionTask
from unlearn.training import train_sgd

ESTIMATORS = [KFACInfluence, EKFACInfluence]


def _loader(x: Tensor, y: Tensor, batch_size: int = 32) -> DataLoader:
    return DataLoader(from_tensors(x, y), batch_size=batch_size)


def _factor(est: KFACInfluence, layer: str, part: str) -> Tensor:
    return est.factors[f"{layer or '(root)'}.{part}"]


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _regression(n: int = 120, d: int = 5, k: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    Y = X @ torch.randn(d, k, generator=g, dtype=torch.float64)
    Y += 0.3 * torch.randn(n, k, generator=g, dtype=torch.float64)
    torch.manual_seed(seed)
    return nn.Linear(d, k).double(), X, Y


# ------------------------------------------------------------------ exactness where it holds
@pytest.mark.parametrize("cls", ESTIMATORS)
def test_linear_regression_exact_fisher_is_the_ggn(cls):
    """One Linear layer, squared loss: the GGN is exactly A ⊗ I, so both methods are exact."""
    model, X, Y = _regression()
    loader, task = _loader(X, Y), RegressionTask()
    exact = ExactInfluence(model, task, 1e-2, curvature="ggn", progress=False).fit(loader)
    est = cls(model, task, 1e-2, fisher="exact", progress=False).fit(loader)
    V = torch.randn(4, est.space.numel, dtype=torch.float64)
    assert _rel(est.inverse_hvp(V), exact.inverse_hvp(V)) < 1e-10


@pytest.mark.parametrize("cls", ESTIMATORS)
def test_inputs_no_example_reaches_stay_exact(cls):
    """Two input features are 0 in every example (as MNIST's border pixels): the activation
    eigenbasis keeps them as exact unit vectors of eigenvalue 0, the inverse skips them in
    its rotations (``_precondition_reached``), and the result is still the exact GGN inverse
    for a linear model with squared loss, for vectors inside and outside the reached span."""
    model, X, Y = _regression()
    X[:, [1, 3]] = 0.0
    loader, task = _loader(X, Y), RegressionTask()
    exact = ExactInfluence(model, task, 1e-2, curvature="ggn", progress=False).fit(loader)
    est = cls(model, task, 1e-2, fisher="exact", progress=False).fit(loader)
    qa, ea = est.factors["(root).qa"], est.factors["(root).ea"]
    reached = ea > 0
    assert int((~reached).sum()) == 2
    assert bool((qa[[1, 3]][:, reached] == 0).all())  # exact zeros, not rounding
    assert est._reached[est.layers[0].name] is not None  # the skipping path is taken
    V = torch.randn(4, est.space.numel, dtype=torch.float64)
    assert _rel(est.inverse_hvp(V), exact.inverse_hvp(V)) < 1e-10


@pytest.mark.parametrize("cls", ESTIMATORS)
def test_true_fisher_approaches_the_ggn_with_many_samples(cls):
    model, X, Y = _regression()
    loader, task = _loader(X, Y), RegressionTask()
    exact = ExactInfluence(model, task, 1e-2, curvature="ggn", progress=False).fit(loader)
    V = torch.randn(4, exact.space.numel, dtype=torch.float64)
    ref = exact.inverse_hvp(V)
    one = _rel(cls(model, task, 1e-2, progress=False).fit(loader).inverse_hvp(V), ref)
    many = _rel(cls(model, task, 1e-2, n_samples=50, progress=False).fit(loader)
                .inverse_hvp(V), ref)
    print(f"{cls.__name__}: true-Fisher error with 1 draw {one:.3f}, with 50 draws {many:.3f}")
    assert many < 0.06 and many < one / 2


class _SeqMLP(nn.Module):
    """Linear layers on [B, T, d] with an in-place ReLU between them, summed over positions."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.l2(torch.relu_(self.l1(x))).sum(dim=1)


class _MeanPool(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=1)


def _brute_force_case(kind: str):
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    y = torch.randint(0, 3, (36,), generator=g)
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
        x = torch.randn(36, 5, generator=g)
    elif kind == "sequence":
        model, x = _SeqMLP(), torch.randn(36, 5, 4, generator=g)
    elif kind == "conv":
        model = nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), nn.ReLU(inplace=True),
            nn.Conv2d(3, 4, 3, stride=2, dilation=2, padding=2, bias=False), nn.Flatten(),
            nn.Linear(64, 3))
        x = torch.randn(36, 2, 7, 7, generator=g)
    elif kind == "conv-same":
        model = nn.Sequential(nn.Conv2d(2, 3, 4, padding="same"), nn.Flatten(),
                              nn.Linear(108, 3))
        x = torch.randn(36, 2, 6, 6, generator=g)
    else:  # embedding with padding and repeated tokens
        model = nn.Sequential(nn.Embedding(12, 5, padding_idx=0), _MeanPool(), nn.Linear(5, 3))
        x = torch.randint(0, 12, (36, 6), generator=g)
    model = model.double()
    x = x.double() if x.is_floating_point() else x
    return model, _loader(x, y, batch_size=16)


def _brute_lambda(est: KFACInfluence, loader: DataLoader, weighted_targets=None):
    """(1/N) Σ_n E_y (Q_Gᵀ DW_n Q_A)² from vmap per-sample gradients."""
    acc: dict[str, Tensor] = {}
    n = 0
    for batch in loader:
        draws = [(None, 1.0)] if weighted_targets is None else weighted_targets(batch)
        n += batch[0].shape[0]
        for targets, w in draws:
            G = per_sample_grads(est.model, est.task, batch, est.space, targets=targets)
            parts = est.space.unflatten(G)
            for layer in est.layers:
                R = _factor(est, layer.name, "qg").T @ layer.to_matrix(parts)
                if not layer.diagonal_a:
                    R = R @ _factor(est, layer.name, "qa")
                w_ = w if isinstance(w, float) else w.reshape(-1, 1, 1)
                acc[layer.name] = acc.get(layer.name, 0) + (w_ * R**2).sum(0)
    return {k: v / n for k, v in acc.items()}


@pytest.mark.parametrize("kind", ["mlp", "sequence", "conv", "conv-same", "embedding"])
def test_ekfac_eigenvalues_equal_brute_force(kind):
    """With the data's labels the corrected eigenvalues are deterministic: the mean squared
    per-sample gradient in the Kronecker eigenbasis. This checks the unfolding of Conv2d
    (stride, dilation, reflect and 'same' padding), positions of a Linear on [B, T, d],
    embedding tokens (padding, repeats) and the in-place ReLU after a hooked layer."""
    model, loader = _brute_force_case(kind)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        est = EKFACInfluence(model, ClassificationTask(), 1e-3, fisher="empirical",
                             progress=False).fit(loader)
    assert not [w for w in caught if "covers" in str(w.message)]  # every parameter covered
    expected = _brute_lambda(est, loader)
    for layer in est.layers:
        assert _rel(_factor(est, layer.name, "lambda"), expected[layer.name]) < 1e-10
    if kind == "sequence":
        assert est._clone == {"l1"}  # the in-place ReLU was detected


@pytest.mark.parametrize("kind", ["mlp", "sequence", "conv", "embedding"])
def test_exact_fisher_eigenvalues_are_the_class_expectation(kind):
    """fisher='exact' on cross-entropy: every class weighted by its probability (several
    backward directions per batch, run as one batched backward pass)."""
    model, loader = _brute_force_case(kind)
    est = EKFACInfluence(model, ClassificationTask(), 1e-3, fisher="exact",
                         progress=False).fit(loader)

    def every_class(batch):
        x = batch[1].double() if batch[1].is_floating_point() else batch[1]
        with torch.no_grad():
            probs = torch.softmax(model(x), dim=1)
        return [(torch.full((probs.shape[0],), c), probs[:, c]) for c in range(3)]

    expected = _brute_lambda(est, loader, every_class)
    for layer in est.layers:
        assert _rel(_factor(est, layer.name, "lambda"), expected[layer.name]) < 1e-10
    if kind != "mlp":
        return
    # the output layer's G is then the mean output Hessian, diag(p) - p pᵀ
    x = loader.dataset.tensors()[0].double()
    with torch.no_grad():
        p = torch.softmax(model(x), dim=1)
    H = (torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)).mean(0)
    qg, eg = _factor(est, "2", "qg"), _factor(est, "2", "eg")
    assert _rel(qg @ torch.diag(eg) @ qg.T, H) < 1e-10


def test_unbatched_backward_fallback_gives_the_same_factors(monkeypatch):
    """Where a model op has no vmap batching rule, the K backward passes run one by one."""
    model, loader = _brute_force_case("sequence")
    task = ClassificationTask()
    batched = EKFACInfluence(model, task, fisher="exact", progress=False).fit(loader)
    real_grad = torch.autograd.grad

    def no_batching(*args, **kw):
        if kw.get("is_grads_batched"):
            raise RuntimeError("no batching rule")
        return real_grad(*args, **kw)

    monkeypatch.setattr(torch.autograd, "grad", no_batching)
    looped = EKFACInfluence(model, task, fisher="exact", progress=False).fit(loader)
    for k, v in batched.factors.items():
        assert torch.allclose(looped.factors[k].abs(), v.abs(), rtol=1e-8, atol=1e-12), k


def test_activation_covariance_averages_over_positions():
    model, loader = _brute_force_case("sequence")
    est = KFACInfluence(model, ClassificationTask(), 1e-3, progress=False).fit(loader)
    x = loader.dataset.tensors()[0].double().reshape(-1, 4)
    a = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
    qa, ea = _factor(est, "l1", "qa"), _factor(est, "l1", "ea")
    assert _rel(qa @ torch.diag(ea) @ qa.T, a.T @ a / a.shape[0]) < 1e-10
    assert torch.allclose(_factor(est, "l1", "lambda"), torch.outer(_factor(est, "l1", "eg"), ea))


# ------------------------------------------------------------------ leave-one-out truth
L2 = 0.1
REMOVED = list(range(3, 400, 13))  # 31 points


@pytest.fixture(scope="module")
def lr_truth():
    model, task, train, query = breast_cancer_lr(L2)
    truth = loo_truth(model, task, train, query, L2, REMOVED)
    return model, task, train, query, truth


@pytest.mark.parametrize(("cls", "floor"), [(KFACInfluence, 0.97), (EKFACInfluence, 0.95)])
@pytest.mark.parametrize("fisher", ["true", "exact"])
def test_scores_match_leave_one_out_retraining(lr_truth, cls, floor, fisher):
    model, task, train, query, truth = lr_truth
    train_loader = DataLoader(train, batch_size=128)
    est = cls(model, task, damping=L2, fisher=fisher, progress=False).fit(train_loader)
    S = est.scores(DataLoader(query, batch_size=128), train_loader)[:, REMOVED]
    r = pearson(S, truth)
    print(f"{cls.__name__} fisher={fisher}: LOO Pearson {r:.4f}")
    assert r >= floor


# ------------------------------------------------------------------ real networks
def _corr(a: Tensor, b: Tensor) -> float:
    return pearson(a, b)


def _against_exact(model, task, loader, cls, **kw) -> tuple[float, float]:
    """Correlation with the exact-GGN inverse of the preconditioned per-sample gradients,
    and of the gradient-by-gradient scores."""
    exact = ExactInfluence(model, task, 1e-3, curvature="ggn", progress=False).fit(loader)
    est = cls(model, task, 1e-3, progress=False, **kw).fit(loader)
    G = per_sample_grads(model, task, next(iter(loader)), exact.space)[:16]
    P, R = est.inverse_hvp(G), exact.inverse_hvp(G)
    assert torch.isfinite(P).all()
    return _corr(P, R), _corr(G @ P.T, G @ R.T)


@pytest.fixture(scope="module")
def digits_cnn():
    data = load_digits(flatten=False)
    x, y = data.tensors()
    keep = torch.nonzero(y < 4).squeeze(1)[:120]
    x, y = x[keep], y[keep]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(inplace=True),
                          nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(64, 4))
    task = ClassificationTask()
    train_sgd(model, task, DataLoader(from_tensors(x, y), batch_size=16, shuffle=True),
              epochs=10, lr=0.05, seed=0)
    return model, task, _loader(x, y, batch_size=60)


@pytest.mark.parametrize("cls", ESTIMATORS)
def test_cnn_float32_against_exact_ggn(digits_cnn, cls):
    model, task, loader = digits_cnn
    vec, score = _against_exact(model, task, loader, cls, fisher="exact")
    print(f"{cls.__name__} CNN: preconditioned-vector corr {vec:.3f}, score corr {score:.3f}")
    assert vec > 0.6 and score > 0.95
    est = cls(model, task, 1e-3, progress=False).fit(loader)
    assert torch.isfinite(est.scores(loader, loader)).all()
    for t in est.factors.values():
        assert t.dtype == torch.float32 and torch.isfinite(t).all()


@pytest.fixture(scope="module")
def token_model():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 30, (150, 8), generator=g)
    ids[:, 6:][torch.rand(150, 2, generator=g) < 0.5] = 0  # padding at the end
    votes = torch.nn.functional.one_hot(ids % 3, 3) * (ids > 0).unsqueeze(-1)
    y = votes.sum(1).argmax(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(30, 6, padding_idx=0), _MeanPool(), nn.Linear(6, 3))
    task = ClassificationTask()
    train_sgd(model, task, DataLoader(from_tensors(ids, y), batch_size=16, shuffle=True),
              epochs=10, lr=0.1, seed=0)
    return model, task, _loader(ids, y, batch_size=50)


@pytest.mark.parametrize("cls", ESTIMATORS)
def test_embedding_model_against_exact_ggn(token_model, cls):
    model, task, loader = token_model
    vec, score = _against_exact(model, task, loader, cls, fisher="exact")
    print(f"{cls.__name__} embedding: preconditioned-vector corr {vec:.3f}, score {score:.3f}")
    assert vec > 0.6 and score > 0.85
    est = cls(model, task, 1e-3, progress=False).fit(loader)
    assert torch.isfinite(est.scores(loader, loader)).all()
    # the padding row gets no gradient, so it has no curvature either
    assert float(_factor(est, "0", "ea")[0]) == 0.0


# ------------------------------------------------------------------ coverage and errors
def test_model_without_supported_layers_is_refused():
    model = nn.Sequential(nn.LayerNorm(5), nn.BatchNorm1d(5)).double()
    with pytest.raises(ValueError, match="no layer it supports"):
        EKFACInfluence(model, RegressionTask())


def test_unsupported_modules_are_left_out_with_a_warning():
    torch.manual_seed(0)
    model = nn.Sequential(nn.LayerNorm(5), nn.Linear(5, 3)).double()
    _, X, Y = _regression()
    loader, task = _loader(X, Y), RegressionTask()
    with pytest.warns(UserWarning, match=r"0 \(LayerNorm\)"):
        est = EKFACInfluence(model, task, 1e-2, fisher="exact", progress=False)
    assert est.space.names == ("1.weight", "1.bias")
    est.fit(loader)
    exact = ExactInfluence(model, task, 1e-2, curvature="ggn", params=["1.weight", "1.bias"],
                           progress=False).fit(loader)
    V = torch.randn(3, est.space.numel, dtype=torch.float64)
    assert _rel(est.inverse_hvp(V), exact.inverse_hvp(V).detach()) < 1e-10
    assert est.scores(loader, loader).shape == (len(X), len(X))


def test_module_selection_and_grouped_conv():
    model = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten(), nn.Linear(4, 2))
    with pytest.warns(UserWarning, match="groups=2"):
        est = KFACInfluence(model, ClassificationTask())
    assert [layer.name for layer in est.layers] == ["2"]
    with pytest.raises(ValueError, match="groups=2"):
        KFACInfluence(model, ClassificationTask(), modules=["0"])
    with pytest.raises(ValueError, match="Flatten"):
        KFACInfluence(model, ClassificationTask(), modules=["1"])
    with pytest.raises(ValueError, match="unknown modules"):
        KFACInfluence(model, ClassificationTask(), modules=["nope"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        weight_only = KFACInfluence(model, ClassificationTask(), params=["2.weight"])
    assert weight_only.space.names == ("2.weight",)
    assert not weight_only.layers[0].has_bias
    with pytest.warns(UserWarning, match="0.weight"):
        KFACInfluence(model, ClassificationTask(), params=["0.weight", "2.weight"])


@pytest.mark.parametrize("bad", [{"fisher": "diagonal"}, {"n_samples": 0},
                                 {"fisher": "empirical", "n_samples": 3}])
def test_bad_arguments_are_named(bad):
    model, _, _ = _regression()
    key = next(iter(bad)) if "n_samples" not in bad else "n_samples"
    with pytest.raises(ValueError, match=key):
        KFACInfluence(model, RegressionTask(), **bad)


class _Broken(RegressionTask):
    def per_sample_loss(self, outputs, targets):
        raise RuntimeError("boom")


def test_hooks_are_removed_after_fit_and_after_errors():
    model, loader = _brute_force_case("conv")
    EKFACInfluence(model, ClassificationTask(), progress=False).fit(loader)
    assert all(not m._forward_hooks for m in model.modules())
    with pytest.raises(RuntimeError, match="boom"):
        EKFACInfluence(model, _Broken(), fisher="empirical", progress=False).fit(loader)
    assert all(not m._forward_hooks for m in model.modules())
    assert not model.training


def test_save_load_round_trip(tmp_path):
    model, loader = _brute_force_case("conv")
    task = ClassificationTask()
    est = EKFACInfluence(model, task, 1e-3, n_samples=2, seed=5, progress=False).fit(loader)
    est.save(tmp_path / "ekfac")
    back = EKFACInfluence.load(tmp_path / "ekfac", model, task, progress=False)
    assert back.config() == est.config()
    assert back.factors.keys() == est.factors.keys()
    for k, v in est.factors.items():
        assert torch.equal(back.factors[k], v)
    assert torch.equal(back.scores(loader, loader), est.scores(loader, loader))
    other = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(75, 3)).double()
    with pytest.raises(ValueError):
        EKFACInfluence.load(tmp_path / "ekfac", other, task)


@pytest.mark.parametrize("cls", ESTIMATORS)
def test_degenerate_activations_stay_finite(cls):
    """Duplicated and constant features make A singular; damping keeps everything finite,
    and the result is still the exact GGN inverse for squared loss."""
    model, X, Y = _regression(d=6)
    X[:, 1] = X[:, 0]
    X[:, 2] = 0.0
    X[:, 3] = 1.0  # duplicates the bias column
    loader, task = _loader(X, Y), RegressionTask()
    est = cls(model, task, 1e-3, fisher="exact", progress=False).fit(loader)
    for t in est.factors.values():
        assert torch.isfinite(t).all()
    assert float(_factor(est, "", "ea").min()) >= 0
    exact = ExactInfluence(model, task, 1e-3, curvature="ggn", progress=False).fit(loader)
    V = torch.randn(2, est.space.numel, dtype=torch.float64)
    assert _rel(est.inverse_hvp(V), exact.inverse_hvp(V)) < 1e-8
    assert torch.isfinite(est.self_influence(loader)).all()
    singular = cls(model, task, 0.0, fisher="exact", progress=False).fit(loader)
    with pytest.raises(FloatingPointError, match="damping"):
        singular.inverse_hvp(V)
