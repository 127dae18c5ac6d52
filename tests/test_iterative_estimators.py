"""CG, LiSSA and Arnoldi against the dense exact inverse and against real leave-one-out
retraining (float64 logistic regression on breast cancer), plus a float32 MLP on digits."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from loo_fixtures import breast_cancer_lr, full_batch, loo_truth, pearson
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from unlearn.influence import (
    ArnoldiInfluence,
    CGInfluence,
    ExactInfluence,
    LiSSAInfluence,
    NotFittedError,
)
from unlearn.influence.cg import IndefiniteCurvatureError
from unlearn.influence.grads import iter_grads
from unlearn.tasks import ClassificationTask
from unlearn.training import train_sgd

N_QUERY = 6
REMOVED = list(range(0, 400, 10))  # 40 leave-one-out retrains per l2


@pytest.fixture(scope="module")
def lr(request) -> SimpleNamespace:
    """Logistic regression with l2 = damping = request.param, its exact inverse on query
    gradients plus two random vectors, and the true leave-one-out loss changes."""
    l2 = request.param
    model, task, train, query = breast_cancer_lr(l2)
    queries = Subset(query, range(N_QUERY))
    loader, qloader = full_batch(train), full_batch(queries)
    exact = ExactInfluence(model, task, damping=l2, progress=False).fit(loader)
    G = torch.cat(list(iter_grads(model, task, qloader, exact.space, query=True)))
    gen = torch.Generator().manual_seed(1)
    V = torch.cat([G, torch.randn(2, G.shape[1], generator=gen, dtype=G.dtype)])
    truth = loo_truth(model, task, train, queries, l2, REMOVED)
    return SimpleNamespace(l2=l2, model=model, task=task, train=train, loader=loader,
                           qloader=qloader, exact=exact, V=V, X=exact.inverse_hvp(V),
                           truth=truth, P=exact.space.numel)


BOTH = pytest.mark.parametrize("lr", [0.1, 0.01], indirect=True, ids=["l2=0.1", "l2=0.01"])
EASY = pytest.mark.parametrize("lr", [0.1], indirect=True, ids=["l2=0.1"])
HARD = pytest.mark.parametrize("lr", [0.01], indirect=True, ids=["l2=0.01"])


def rel_err(Y: Tensor, X: Tensor) -> float:
    """Worst row-wise relative error."""
    return float(((Y - X).norm(dim=1) / X.norm(dim=1)).max())


def loo_pearson(est, case: SimpleNamespace) -> float:
    S = est.scores(case.qloader, case.loader)
    return pearson(S[:, REMOVED], case.truth)


# ----------------------------------------------------------------------------- vs exact


@BOTH
def test_cg_matches_exact(lr):
    est = CGInfluence(lr.model, lr.task, damping=lr.l2, tol=1e-10, max_iter=200,
                      progress=False).fit(lr.loader)
    assert rel_err(est.inverse_hvp(lr.V), lr.X) < 1e-6
    assert 0 < est.last_iterations <= 2 * lr.P
    assert float(est.last_residuals.max()) <= 1e-10


@BOTH
def test_lissa_matches_exact(lr):
    est = LiSSAInfluence(lr.model, lr.task, damping=lr.l2, tol=1e-5,
                         progress=False).fit(lr.loader)
    Y = est.inverse_hvp(lr.V)
    assert rel_err(Y, lr.X) < 1e-3
    # full batch: deterministic Richardson iteration that stops on its own
    assert est.last_converged and est.last_depth < est.depth
    top = float(lr.exact.factors["eigenvalues"].max()) + lr.l2
    assert top < est.scale_value < 1.2 * top


@BOTH
@pytest.mark.parametrize("complement", ["ignore", "damping"])
def test_arnoldi_full_rank_is_exact(lr, complement):
    # The 2-logit softmax has a 31-dimensional null space, where a single Krylov sequence
    # breaks down; the restart on breakdown still completes the basis.
    est = ArnoldiInfluence(lr.model, lr.task, damping=lr.l2, rank=lr.P, complement=complement,
                           progress=False).fit(lr.loader)
    assert rel_err(est.inverse_hvp(lr.V), lr.X) < 1e-8
    exact_evals = lr.exact.factors["eigenvalues"].sort().values
    torch.testing.assert_close(est.factors["eigenvalues"].sort().values, exact_evals,
                               rtol=0, atol=1e-10)


@BOTH
def test_arnoldi_low_rank_is_the_exact_inverse_on_its_subspace(lr):
    rank, lam = 5, lr.l2
    est = ArnoldiInfluence(lr.model, lr.task, damping=lam, rank=rank, n_iter=25,
                           progress=False).fit(lr.loader)
    exact_top = lr.exact.factors["eigenvalues"].sort(descending=True).values[:rank]
    torch.testing.assert_close(est.factors["eigenvalues"], exact_top, rtol=1e-8, atol=0)
    assert float(est.ritz_residuals.max()) < 1e-8
    U = est.factors["eigenvectors"]
    projected = lr.X @ U @ U.T  # the exact inverse-HVP restricted to the top-5 space
    Y = est.inverse_hvp(lr.V)
    assert rel_err(Y, projected) < 1e-8
    # the part of the exact answer that rank 5 explains (measured 0.08-0.25 per row here:
    # the inverse is dominated by the small eigenvalues that a low rank drops)
    explained = projected.norm(dim=1) / lr.X.norm(dim=1)
    assert bool(((explained > 0) & (explained < 1)).all())
    damped = ArnoldiInfluence(lr.model, lr.task, damping=lam, rank=rank, n_iter=25,
                              complement="damping", progress=False).fit(lr.loader)
    rest = lr.V - lr.V @ U @ U.T
    torch.testing.assert_close(damped.inverse_hvp(lr.V), Y + rest / lam, rtol=1e-8, atol=1e-12)


# ----------------------------------------------------------------------------- vs leave-one-out


@BOTH
def test_cg_scores_match_leave_one_out(lr):
    # measured: 0.9997 (l2=0.1), 0.9945 (l2=0.01), the same as ExactInfluence
    est = CGInfluence(lr.model, lr.task, damping=lr.l2, progress=False).fit(lr.loader)
    assert loo_pearson(est, lr) >= 0.99


@BOTH
def test_lissa_scores_match_leave_one_out(lr):
    # default settings, full-batch loader (Richardson iteration): measured as CG
    est = LiSSAInfluence(lr.model, lr.task, damping=lr.l2, progress=False).fit(lr.loader)
    assert loo_pearson(est, lr) >= 0.95


@HARD
def test_minibatch_lissa_scores_match_leave_one_out(lr):
    # batches of 50 of 400, 1000 steps, tail averaging: measured 0.993 (0.86 without
    # averaging); relative error of the inverse-HVP about 5%
    est = LiSSAInfluence(lr.model, lr.task, damping=lr.l2, batch_size=50, depth=1000,
                         progress=False).fit(lr.loader)
    Q = est.inverse_hvp(lr.V[:N_QUERY])  # the query gradients: one solve, shared below
    assert est.last_depth == 1000 and not est.last_converged
    assert rel_err(Q, lr.X[:N_QUERY]) < 0.15
    train_grads = torch.cat(list(iter_grads(lr.model, lr.task, lr.loader, est.space)))
    scores = Q @ train_grads[REMOVED].T / est.n_train
    assert pearson(scores, lr.truth) >= 0.95


@EASY
def test_low_rank_arnoldi_scores_correlate_with_leave_one_out(lr):
    # rank 10 of 62 (94% of the curvature's trace): measured 0.974 with complement="ignore",
    # 0.998 with "damping"; on the harder l2=0.01 rank 10 gives 0.82 / 0.89
    kw = dict(damping=lr.l2, rank=10, progress=False)
    ignore = ArnoldiInfluence(lr.model, lr.task, **kw).fit(lr.loader)
    damping = ArnoldiInfluence(lr.model, lr.task, complement="damping", **kw).fit(lr.loader)
    assert loo_pearson(ignore, lr) > 0.95
    assert loo_pearson(damping, lr) > 0.99


# ----------------------------------------------------------------------------- protocol


def _estimators(case: SimpleNamespace) -> dict[str, object]:
    m, t, lam = case.model, case.task, case.l2
    return {
        "cg": CGInfluence(m, t, damping=lam, tol=1e-10, progress=False),
        # tol=1e-12 makes both recursions run to depth, so no stopping decision can differ
        "lissa": LiSSAInfluence(m, t, damping=lam, depth=40, tol=1e-12, progress=False),
        "lissa-minibatch": LiSSAInfluence(m, t, damping=lam, depth=40, batch_size=50,
                                          repeat=2, tol=1e-12, progress=False),
        "arnoldi": ArnoldiInfluence(m, t, damping=lam, rank=8, complement="damping",
                                    progress=False),
    }


@EASY
@pytest.mark.parametrize("name", ["cg", "lissa", "lissa-minibatch", "arnoldi"])
def test_batched_equals_one_at_a_time(lr, name):
    est = _estimators(lr)[name].fit(lr.loader)
    batched = est.inverse_hvp(lr.V)
    single = torch.stack([est.inverse_hvp(v) for v in lr.V[[0, 3, -1]]])
    batched = batched[[0, 3, -1]]
    torch.testing.assert_close(batched, single, rtol=1e-9, atol=1e-12)


@EASY
@pytest.mark.parametrize("name", ["cg", "lissa-minibatch", "arnoldi"])
def test_save_load_round_trip(lr, name, tmp_path):
    est = _estimators(lr)[name].fit(lr.loader)
    before = est.scores(lr.qloader, lr.loader)
    est.save(tmp_path / name)
    cls = type(est)
    if name == "arnoldi":
        loaded = cls.load(tmp_path / name, lr.model, lr.task, progress=False)
    else:
        with pytest.raises(NotFittedError, match="train_loader"):
            cls.load(tmp_path / name, lr.model, lr.task, progress=False).inverse_hvp(lr.V)
        with pytest.raises(ValueError, match="examples"):
            cls.load(tmp_path / name, lr.model, lr.task,
                     train_loader=full_batch(Subset(lr.train, range(10))))
        loaded = cls.load(tmp_path / name, lr.model, lr.task, train_loader=lr.loader,
                          progress=False)
    assert loaded.config() == est.config()
    if name.startswith("lissa"):
        assert loaded.scale_value == est.scale_value
    # identical up to rounding (loaded tensors may sit differently in memory, changing the
    # BLAS summation order at the 1e-19 level)
    torch.testing.assert_close(loaded.scores(lr.qloader, lr.loader), before, rtol=1e-12, atol=0)


@EASY
def test_curvature_batches_use_a_fixed_subsample(lr):
    loader = DataLoader(lr.train, batch_size=100)
    first = full_batch(Subset(lr.train, range(200)))
    sub_exact = ExactInfluence(lr.model, lr.task, damping=lr.l2, progress=False).fit(first)
    X = sub_exact.inverse_hvp(lr.V)
    cg = CGInfluence(lr.model, lr.task, damping=lr.l2, tol=1e-10, curvature_batches=2,
                     progress=False).fit(loader)
    assert rel_err(cg.inverse_hvp(lr.V), X) < 1e-6
    arnoldi = ArnoldiInfluence(lr.model, lr.task, damping=lr.l2, rank=lr.P,
                               curvature_batches=2, progress=False).fit(loader)
    assert rel_err(arnoldi.inverse_hvp(lr.V), X) < 1e-8
    assert cg.n_train == 400  # scores keep the full training set's 1/n


# ----------------------------------------------------------------------------- bad input


@EASY
def test_cg_warns_when_max_iter_is_too_small(lr):
    est = CGInfluence(lr.model, lr.task, damping=lr.l2, max_iter=2, progress=False)
    with pytest.warns(RuntimeWarning, match="max_iter=2"):
        est.fit(lr.loader).inverse_hvp(lr.V)
    assert est.last_iterations == 2


@EASY
def test_lissa_scale_too_small_diverges_with_a_clear_error(lr):
    top = float(lr.exact.factors["eigenvalues"].max()) + lr.l2
    est = LiSSAInfluence(lr.model, lr.task, damping=lr.l2, scale=0.3 * top, progress=False)
    with pytest.raises(FloatingPointError, match="diverged"):
        est.fit(lr.loader).inverse_hvp(lr.V)


def _bad_args(P: int) -> list[tuple[type, dict]]:
    return [
        (CGInfluence, {"max_iter": 0}),
        (CGInfluence, {"tol": -1.0}),
        (CGInfluence, {"curvature": "fisher"}),
        (CGInfluence, {"curvature_batches": 0}),
        (CGInfluence, {"on_indefinite": "ignore"}),
        (LiSSAInfluence, {"depth": 0}),
        (LiSSAInfluence, {"repeat": 1.5}),
        (LiSSAInfluence, {"scale": -1.0}),
        (LiSSAInfluence, {"scale": "big"}),
        (LiSSAInfluence, {"tol": 0.0}),
        (LiSSAInfluence, {"batch_size": 0}),
        (LiSSAInfluence, {"average": "yes"}),
        (ArnoldiInfluence, {"rank": 0}),
        (ArnoldiInfluence, {"rank": P + 1}),
        (ArnoldiInfluence, {"rank": 10, "n_iter": 5}),
        (ArnoldiInfluence, {"complement": "drop"}),
        (ArnoldiInfluence, {"complement": "damping", "damping": 0.0}),
        (ArnoldiInfluence, {"curvature": "fisher"}),
    ]


@pytest.mark.parametrize("index", range(len(_bad_args(62))))
def test_invalid_arguments_raise_value_error(index):
    model = nn.Linear(30, 2)
    cls, kw = _bad_args(62)[index]
    bad = next(iter(kw.items()))
    with pytest.raises(ValueError, match=str(bad[0])):
        cls(model, ClassificationTask(), **kw)


# ----------------------------------------------------------------------------- float32 MLP


@pytest.fixture(scope="module")
def mlp() -> SimpleNamespace:
    """A small tanh MLP (1,210 parameters, float32) trained briefly on 300 digits."""
    from unlearn.data import load_digits

    digits = load_digits()
    train, query = Subset(digits, range(300)), Subset(digits, range(1500, 1508))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))
    task = ClassificationTask()
    train_sgd(model, task, DataLoader(train, batch_size=32, shuffle=True), epochs=30, lr=0.1,
              seed=0)
    loader, qloader = DataLoader(train, batch_size=100), DataLoader(query, batch_size=8)
    exact = ExactInfluence(model, task, damping=1e-2, curvature="ggn", progress=False)
    exact.fit(loader)
    G = torch.cat(list(iter_grads(model, task, qloader, exact.space, query=True)))
    return SimpleNamespace(model=model, task=task, loader=loader, qloader=qloader, G=G,
                           S=exact.scores(qloader, loader))


@pytest.mark.parametrize("name", ["cg", "lissa", "arnoldi"])
def test_float32_mlp_with_gauss_newton(mlp, name):
    kw = dict(damping=1e-2, curvature="ggn", progress=False)
    est = {
        "cg": CGInfluence(mlp.model, mlp.task, tol=1e-5, max_iter=300, **kw),
        # batches of 100 of 300: stochastic, averaged
        "lissa": LiSSAInfluence(mlp.model, mlp.task, depth=300, **kw),
        "arnoldi": ArnoldiInfluence(mlp.model, mlp.task, rank=20, n_iter=40,
                                    complement="damping", **kw),
    }[name]
    S = est.fit(mlp.loader).scores(mlp.qloader, mlp.loader)
    assert S.dtype == torch.float32 and S.shape == (8, 300) and torch.isfinite(S).all()
    # against the exact Gauss-Newton scores; measured: CG relative error 2e-5, LiSSA
    # Pearson 0.997 (relative error 0.09), Arnoldi rank 20 of 1,210 Pearson 0.96
    if name == "cg":
        assert float((S - mlp.S).norm() / mlp.S.norm()) < 1e-3
    else:
        assert pearson(S, mlp.S) > {"lissa": 0.98, "arnoldi": 0.9}[name]


def test_cg_refuses_negative_curvature_with_zero_damping(mlp):
    exact = ExactInfluence(mlp.model, mlp.task, damping=0.0, progress=False).fit(mlp.loader)
    evals, evecs = exact.factors["eigenvalues"], exact.factors["eigenvectors"]
    assert float(evals[0]) < -1e-3  # the trained MLP's Hessian is indefinite
    v = evecs[:, 0]
    est = CGInfluence(mlp.model, mlp.task, damping=0.0, progress=False).fit(mlp.loader)
    with pytest.raises(IndefiniteCurvatureError, match="not positive definite.*ggn"):
        est.inverse_hvp(v)
    warn = CGInfluence(mlp.model, mlp.task, damping=0.0, on_indefinite="warn",
                       progress=False).fit(mlp.loader)
    with pytest.warns(RuntimeWarning, match="non-positive curvature"):
        out = warn.inverse_hvp(torch.stack([v, mlp.G[0]]))
    assert torch.isfinite(out).all() and torch.equal(out[0], torch.zeros_like(v))


def test_preconditioned_cg_reaches_the_same_solution_in_fewer_passes():
    from unlearn.influence import EKFACInfluence

    l2 = 1e-3
    model, task, train, _ = breast_cancer_lr(l2)
    loader = full_batch(train)
    exact = ExactInfluence(model, task, damping=l2, progress=False).fit(loader)
    V = torch.randn(5, exact.space.numel, generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64)
    X = exact.inverse_hvp(V)
    kw = dict(damping=l2, tol=1e-10, max_iter=500, progress=False)
    plain = CGInfluence(model, task, **kw).fit(loader)
    ekfac = EKFACInfluence(model, task, damping=l2, fisher="exact", progress=False).fit(loader)
    pcg = CGInfluence(model, task, preconditioner=ekfac, **kw).fit(loader)
    assert rel_err(plain.inverse_hvp(V), X) < 1e-8
    assert rel_err(pcg.inverse_hvp(V), X) < 1e-8  # the same solution ...
    assert rel_err(ekfac.inverse_hvp(V), X) > 1e-2  # ... which the preconditioner is not
    # ... in fewer passes over the data (measured: 40 plain, 29 preconditioned)
    assert pcg.last_iterations < 0.85 * plain.last_iterations, (
        pcg.last_iterations, plain.last_iterations)


def test_cg_preconditioner_must_cover_the_same_parameters(mlp):
    from unlearn.influence import EKFACInfluence

    last = EKFACInfluence(mlp.model, mlp.task, params=["2.weight", "2.bias"], progress=False)
    with pytest.raises(ValueError, match="other parameters"):
        CGInfluence(mlp.model, mlp.task, preconditioner=last)
    with pytest.raises(TypeError, match="fitted InfluenceEstimator"):
        CGInfluence(mlp.model, mlp.task, preconditioner="ekfac")


def test_preconditioner_is_passed_again_to_load(tmp_path):
    from unlearn.influence import EKFACInfluence

    model, task, train, _ = breast_cancer_lr(1e-3)
    loader = full_batch(train)
    ekfac = EKFACInfluence(model, task, damping=1e-3, fisher="exact", progress=False).fit(loader)
    pcg = CGInfluence(model, task, damping=1e-3, preconditioner=ekfac, progress=False).fit(loader)
    pcg.save(tmp_path / "cg")
    back = CGInfluence.load(tmp_path / "cg", model, task, train_loader=loader,
                            preconditioner=ekfac)
    assert back.preconditioner is ekfac
    V = torch.randn(3, ekfac.space.numel, dtype=torch.float64)
    assert rel_err(back.inverse_hvp(V), pcg.inverse_hvp(V)) < 1e-8
    assert CGInfluence.load(tmp_path / "cg", model, task).preconditioner is None
