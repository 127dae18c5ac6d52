"""Gauss-Newton products from layer factors (:mod:`unlearn.influence.layer_ggn`) against a
dense Gauss-Newton matrix built from autograd Jacobians, with their cache and fallbacks."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev
from torch.utils.data import DataLoader, TensorDataset

from unlearn.influence import (
    ArnoldiInfluence,
    CGInfluence,
    ExactInfluence,
    LiSSAInfluence,
    layer_ggn,
)
from unlearn.influence import exact as exact_mod
from unlearn.influence import grads as grads_mod
from unlearn.influence.grads import ParamSpace, curvature_product, iter_grads
from unlearn.tasks import ClassificationTask, RegressionTask


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1, stride=2)
        self.fc = nn.Linear(3 * 3 * 3, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


class Shared(nn.Module):
    """One Linear applied twice (two calls of the layer per example)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.tanh(self.a(torch.tanh(self.a(x)))))


class WithNorm(nn.Module):
    """A LayerNorm's parameters are outside the supported layers: the torch.func path."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 6)
        self.norm = nn.LayerNorm(6)
        self.out = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.norm(self.fc(x)))


def dense_ggn(model: nn.Module, task, x: Tensor, y: Tensor) -> Tensor:
    """``(1/n) Σ_b J_bᵀ H_b J_b`` from autograd Jacobians, in the flat parameter order."""
    space = ParamSpace.of(model)
    params = space.params(model)
    total = torch.zeros(space.numel, space.numel, dtype=x.dtype)
    for b in range(x.shape[0]):
        def out(p, xb=x[b : b + 1]):
            return functional_call(model, p, (xb,))[0]

        J = space.flatten(jacrev(out)(params), batch_dims=1)  # [m, P]
        o = out(params).detach()
        H = torch.autograd.functional.hessian(
            lambda o, yb=y[b : b + 1]: task.per_sample_loss(o.unsqueeze(0), yb).sum(), o)
        total += J.T @ H.reshape(o.numel(), o.numel()) @ J
    return total / x.shape[0]


def case(name: str) -> tuple[nn.Module, object, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    n = 24
    if name == "lr":
        model, x = nn.Linear(7, 4), torch.randn(n, 7, generator=gen)
    elif name == "mlp":
        model = nn.Sequential(nn.Linear(7, 8), nn.ReLU(), nn.Linear(8, 4))
        x = torch.randn(n, 7, generator=gen)
    elif name == "mlp-nobias":
        model = nn.Sequential(nn.Linear(7, 8, bias=False), nn.Tanh(), nn.Linear(8, 4))
        x = torch.randn(n, 7, generator=gen)
    elif name == "conv":
        model, x = ConvNet(), torch.randn(n, 2, 6, 6, generator=gen)
    elif name == "shared":
        model, x = Shared(), torch.randn(n, 6, generator=gen)
    else:
        model, x = WithNorm(), torch.randn(n, 5, generator=gen)
    model = model.double()
    m = model(x.double()).shape[1]
    y = torch.randint(0, m, (n,), generator=gen)
    return model, ClassificationTask(), x.double(), y


CASES = ["lr", "mlp", "mlp-nobias", "conv", "shared", "norm"]


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("chunked", [False, True], ids=["", "chunked"])
def test_products_equal_the_dense_gauss_newton_matrix(name, chunked, monkeypatch):
    if chunked:  # vectors split into chunks of one
        monkeypatch.setattr(layer_ggn, "_CHUNK_ELEMENTS", 1)
    model, task, x, y = case(name)
    loader = DataLoader(TensorDataset(x, y), batch_size=10)  # uneven last batch
    space = ParamSpace.of(model)
    V = torch.randn(7, space.numel, dtype=torch.float64, generator=torch.Generator()
                    .manual_seed(1))
    want = V @ dense_ggn(model, task, x, y)
    product = curvature_product(model, task, loader, space, "ggn")
    first, second = product(V), product(V)  # the second call reads the kept factors
    scale = float(want.norm())
    assert float((first - want).norm()) <= 1e-12 * scale
    assert float((second - want).norm()) <= 1e-12 * scale
    assert float((product(V[0]) - want[0]).norm()) <= 1e-12 * scale  # one vector, 1-D


def test_layer_path_is_taken_and_cached_for_supported_models(monkeypatch):
    model, task, x, y = case("mlp")
    loader = DataLoader(TensorDataset(x, y), batch_size=10)
    space = ParamSpace.of(model)
    calls = {"func": 0, "factors": 0}
    real_func, real_factors = grads_mod._ggn_batch, grads_mod._LayeredGGN.batch_product

    def func(*a, **k):
        calls["func"] += 1
        return real_func(*a, **k)

    def factors(self, *a, **k):
        calls["factors"] += 1
        return real_factors(self, *a, **k)

    monkeypatch.setattr(grads_mod, "_ggn_batch", func)
    monkeypatch.setattr(grads_mod._LayeredGGN, "batch_product", factors)
    product = curvature_product(model, task, loader, space, "ggn")
    V = torch.randn(3, space.numel, dtype=torch.float64)
    product(V)
    product(V)
    assert calls == {"func": 0, "factors": 3}  # three batches, factors computed once


def test_norm_layer_falls_back_to_torch_func(monkeypatch):
    model, task, x, y = case("norm")
    calls = []
    real = grads_mod._ggn_batch
    monkeypatch.setattr(grads_mod, "_ggn_batch", lambda *a, **k: calls.append(1) or real(*a, **k))
    space = ParamSpace.of(model)
    curvature_product(model, task, DataLoader(TensorDataset(x, y), batch_size=12), space,
                      "ggn")(torch.randn(2, space.numel, dtype=torch.float64))
    assert len(calls) == 2


def test_changed_weights_discard_the_kept_factors():
    model, task, x, y = case("mlp")
    loader = DataLoader(TensorDataset(x, y), batch_size=10)
    space = ParamSpace.of(model)
    V = torch.randn(2, space.numel, dtype=torch.float64)
    product = curvature_product(model, task, loader, space, "ggn")
    before = product(V)
    with torch.no_grad():
        model[0].weight.mul_(1.5)
    want = V @ dense_ggn(model, task, x, y)
    after = product(V)
    assert float((after - before).norm()) > 1e-3 * float(before.norm())
    assert float((after - want).norm()) <= 1e-12 * float(want.norm())


def test_regression_outputs_and_float32():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 2))
    x, y = torch.randn(20, 5), torch.randn(20, 2)
    task = RegressionTask()
    space = ParamSpace.of(model)
    V = torch.randn(4, space.numel)
    got = curvature_product(model, task, DataLoader(TensorDataset(x, y), batch_size=8), space,
                            "ggn")(V)
    want = V.double() @ dense_ggn(model.double(), task, x.double(), y.double())
    assert float((got.double() - want).norm()) <= 1e-5 * float(want.norm())


@pytest.mark.parametrize("est", ["cg", "arnoldi", "lissa"])
def test_solvers_on_the_layer_path_match_exact(est):
    model, task, x, y = case("conv")
    loader = DataLoader(TensorDataset(x, y), batch_size=24)
    exact = ExactInfluence(model, task, damping=0.1, curvature="ggn", progress=False)
    exact.fit(loader)
    G = torch.randn(3, exact.space.numel, dtype=torch.float64)
    want = exact.inverse_hvp(G)
    if est == "cg":
        solver = CGInfluence(model, task, damping=0.1, curvature="ggn", tol=1e-10,
                             max_iter=500, progress=False)
    elif est == "lissa":
        solver = LiSSAInfluence(model, task, damping=0.1, curvature="ggn", tol=1e-10,
                                depth=20000, progress=False)
    else:
        P = exact.space.numel
        solver = ArnoldiInfluence(model, task, damping=0.1, curvature="ggn", rank=P,
                                  n_iter=P, progress=False)
    got = solver.fit(loader).inverse_hvp(G)
    assert float((got - want).norm()) <= 1e-6 * float(want.norm())


# ------------------------------------------------------------ Exact: inputs that are always 0
@pytest.mark.parametrize("cache", [True, False], ids=["held", "streamed"])
def test_exact_with_always_zero_inputs_equals_the_dense_solve(cache, monkeypatch, tmp_path):
    if not cache:  # too little room to hold the batches: every input column is built
        monkeypatch.setattr(layer_ggn, "CACHE_BYTES", 0)
    model, task, x, y = case("mlp")
    x[:, [1, 4]] = 0.0  # two inputs zero in every training example
    loader = DataLoader(TensorDataset(x, y), batch_size=10)
    lam = 1e-2
    est = ExactInfluence(model, task, lam, curvature="ggn", progress=False).fit(loader)
    assert est.build == "layers" and est.solver == "cholesky"
    H = dense_ggn(model, task, x, y)
    assert float((est.factors["curvature"] - H).abs().max()) <= 1e-12 * float(H.abs().max())
    zero_rows = int((H == 0).all(dim=1).sum())
    assert zero_rows == 2 * 8  # the weights of inputs 1 and 4 into the 8 hidden units
    if cache:  # built and factorised without those rows, and without the softmax's
        # all-ones output direction of the last layer (its 8 inputs and the bias)
        assert est._basis is not None
        assert est._chol.shape[0] == est.space.numel - zero_rows - 9
    V = torch.randn(4, est.space.numel, dtype=torch.float64)  # non-zero on those weights too
    truth = torch.linalg.solve(H + lam * torch.eye(H.shape[0], dtype=torch.float64), V.T).T
    torch.testing.assert_close(est.inverse_hvp(V), truth, rtol=1e-9, atol=1e-12)
    est.save(tmp_path / "e")
    back = ExactInfluence.load(tmp_path / "e", model, task)
    torch.testing.assert_close(back.inverse_hvp(V), truth, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("complement", ["ignore", "damping"])
def test_arnoldi_scores_in_the_kept_coordinates_equal_the_dense_formula(complement):
    model, task, x, y = case("mlp")
    loader = DataLoader(TensorDataset(x, y), batch_size=10)
    est = ArnoldiInfluence(model, task, damping=0.05, curvature="ggn", rank=6,
                           complement=complement, progress=False).fit(loader)
    assert est._projects() == (complement == "ignore")
    G = torch.cat(list(iter_grads(model, task, loader, est.space)))
    want = est.inverse_hvp(G) @ G.T / len(x)  # the [P]-space inverse, scored densely
    S = est.scores(loader, loader)
    torch.testing.assert_close(S, want, rtol=1e-10, atol=1e-12)
    self_inf = (est.inverse_hvp(G) * G).sum(1) / len(x)
    torch.testing.assert_close(est.self_influence(loader), self_inf, rtol=1e-10, atol=1e-12)


# ---------------------------------------------- K-FAC / EK-FAC: input directions never reached
@pytest.mark.parametrize("corrected", [False, True], ids=["kfac", "ekfac"])
def test_eigen_scores_without_unreached_input_directions_equal_the_dense_path(corrected):
    from unlearn.influence import EKFACInfluence, InfluenceEstimator, KFACInfluence

    model, task, x, y = case("mlp")
    x[:, [0, 5]] = 0.0  # inputs no training example reaches
    train = DataLoader(TensorDataset(x, y), batch_size=10)
    gen = torch.Generator().manual_seed(3)
    xq = torch.randn(9, 7, dtype=torch.float64, generator=gen)  # queries do use them
    queries = DataLoader(TensorDataset(xq, torch.randint(0, 4, (9,), generator=gen)),
                         batch_size=4)
    cls = EKFACInfluence if corrected else KFACInfluence
    est = cls(model, task, 1e-2, progress=False).fit(train)
    bases = est._bases(torch.float64)
    assert bases[0].qa.shape[1] == 8 - 2  # two of the first layer's 8 input directions
    S = est.scores(queries, train)
    dense = InfluenceEstimator.scores(est, queries, train)  # (H + λI)⁻¹ on full gradients
    torch.testing.assert_close(S, dense, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(est.self_influence(train),
                               InfluenceEstimator.self_influence(est, train),
                               rtol=1e-10, atol=1e-13)


# ------------------------------------------------ Exact: output directions no example reaches
def exact_against_dense(model, task, x, y, lam=1e-3):
    loader = DataLoader(TensorDataset(x, y), batch_size=10)
    est = ExactInfluence(model, task, lam, curvature="ggn", progress=False).fit(loader)
    H = dense_ggn(model, task, x, y)
    V = torch.randn(5, est.space.numel, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(2))
    truth = torch.linalg.solve(H + lam * torch.eye(H.shape[0], dtype=torch.float64), V.T).T
    return est, H, V, truth


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("name", ["lr", "mlp", "mlp-nobias"])
def test_exact_rotates_out_the_softmax_null_direction(name, smoothing, monkeypatch, tmp_path):
    model, _, x, y = case(name)
    task = ClassificationTask(label_smoothing=smoothing)
    est, H, V, truth = exact_against_dense(model, task, x, y)
    assert est.solver == "cholesky" and est._basis is not None
    last = est._basis.rot[-1]
    assert last is not None and last.shape == (4, 3)  # 4 classes: 3 directions kept
    ones = torch.ones(4, dtype=torch.float64) / 2
    assert float((last.T @ ones).abs().max()) <= 1e-12  # the one left out is all-ones
    assert float((est.factors["curvature"] - H).abs().max()) <= 1e-12 * float(H.abs().max())
    got = est.inverse_hvp(V)
    torch.testing.assert_close(got, truth, rtol=1e-9, atol=1e-12)
    # and the same as the unrotated build to rounding
    monkeypatch.setattr(exact_mod, "_reached_outputs", lambda g: None)
    loader = DataLoader(TensorDataset(x, y), batch_size=10)
    plain = ExactInfluence(model, task, 1e-3, curvature="ggn", progress=False).fit(loader)
    assert plain._basis is None
    torch.testing.assert_close(got, plain.inverse_hvp(V), rtol=1e-10, atol=1e-12)
    est.save(tmp_path / "e")  # saved dense, loaded on the flat rows
    back = ExactInfluence.load(tmp_path / "e", model, task)
    torch.testing.assert_close(back.inverse_hvp(V), truth, rtol=1e-9, atol=1e-12)


def test_exact_regression_has_no_null_output_direction():
    model, _, x, _ = case("mlp")
    y = torch.randn(x.shape[0], 4, dtype=torch.float64, generator=torch.Generator()
                    .manual_seed(3))
    est, _, V, truth = exact_against_dense(model, RegressionTask(), x, y)
    assert est.solver == "cholesky" and est._basis is None
    torch.testing.assert_close(est.inverse_hvp(V), truth, rtol=1e-9, atol=1e-12)


def test_exact_rotation_in_float32():
    model, task, x, y = case("mlp")
    model, x = model.float(), x.float()
    loader = DataLoader(TensorDataset(x, y), batch_size=10)
    est = ExactInfluence(model, task, 1e-2, curvature="ggn", progress=False).fit(loader)
    assert est._basis is not None and est._basis.rot[-1].shape == (4, 3)
    H = dense_ggn(model.double(), task, x.double(), y)
    V = torch.randn(3, est.space.numel, generator=torch.Generator().manual_seed(4))
    truth = torch.linalg.solve(H + 1e-2 * torch.eye(H.shape[0], dtype=torch.float64),
                               V.double().T).T
    got = est.inverse_hvp(V).double()
    assert float((got - truth).norm()) <= 1e-4 * float(truth.norm())


def test_batches_with_different_square_root_columns(monkeypatch):
    """The output Hessian's square root drops the columns zero for a whole batch, so K can
    differ between batches (float32 softmax, a one-example last batch): the kept factors
    still merge, and Exact and the cached products equal the dense Gauss-Newton matrix."""
    from unlearn.influence import ekfac

    real, calls = ekfac._hessian_sqrt, []

    def uneven(*a, **k):  # every other batch: one more (all-zero) column, same curvature
        R = real(*a, **k)
        calls.append(R.shape[0])
        return torch.cat([R, R[:1] * 0]) if len(calls) % 2 else R

    monkeypatch.setattr(ekfac, "_hessian_sqrt", uneven)
    model, task, x, y = case("mlp")
    loader = DataLoader(TensorDataset(x, y), batch_size=10)
    H = dense_ggn(model, task, x, y)
    est = ExactInfluence(model, task, 1e-2, curvature="ggn", progress=False).fit(loader)
    assert est.build == "layers" and len(calls) == 3
    assert float((est.factors["curvature"] - H).abs().max()) <= 1e-12 * float(H.abs().max())
    space = ParamSpace.of(model)
    V = torch.randn(3, space.numel, dtype=torch.float64, generator=torch.Generator()
                    .manual_seed(5))
    product = curvature_product(model, task, loader, space, "ggn")
    first, second = product(V), product(V)  # the second from the merged factors
    want = V @ H
    assert float((first - want).norm()) <= 1e-12 * float(want.norm())
    assert float((second - want).norm()) <= 1e-12 * float(want.norm())



@pytest.mark.parametrize("per_group", [1, 2])
def test_query_batches_preconditioned_in_groups_give_the_same_scores(per_group, monkeypatch):
    """Query batches are preconditioned together up to ``_QUERY_GROUP_ELEMENTS`` entries:
    any grouping (each batch alone; two at a time and a remainder) gives the same scores as
    one group, for Exact's triangular solves and Arnoldi (projected coordinates, and full
    ones with rank-limited queries)."""
    from unlearn.influence import base

    model, task, x, y = case("mlp")
    q, t = DataLoader(TensorDataset(x, y), batch_size=5), DataLoader(TensorDataset(x, y),
                                                                     batch_size=10)
    exact = ExactInfluence(model, task, 1e-2, curvature="ggn", progress=False).fit(t)
    arnoldi = ArnoldiInfluence(model, task, damping=0.05, curvature="ggn", rank=6,
                               progress=False).fit(t)
    for est in (exact, arnoldi):
        for rank in (None, 2):
            est.query_rank = rank
            with monkeypatch.context() as m:
                m.setattr(base, "_QUERY_GROUP_ELEMENTS", 1 << 40)  # all queries in one group
                ref = est.scores(q, t)
            width = est._transform(torch.zeros(1, est.space.numel, dtype=torch.float64))
            with monkeypatch.context() as m:  # flush after per_group batches of 5 queries
                m.setattr(base, "_QUERY_GROUP_ELEMENTS", per_group * 5 * width.shape[1])
                got = est.scores(q, t)
            torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-15)
