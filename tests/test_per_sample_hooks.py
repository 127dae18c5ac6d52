"""Per-sample gradients from layer hooks against one autograd pass per example; K-FAC /
EK-FAC eigenbasis scores against the dense per-sample-gradient formula; the layer-wise
Gauss-Newton build and the Cholesky solve of ExactInfluence against the generic ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from loo_fixtures import breast_cancer_lr, loo_truth, pearson
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import unlearn.influence.eigen_scores as eigen_scores
from unlearn.influence import EKFACInfluence, ExactInfluence, KFACInfluence
from unlearn.influence.base import InfluenceEstimator
from unlearn.influence.grads import ParamSpace, curvature_product, per_sample_grads, space_layers
from unlearn.influence.hook_grads import capture_layer_grads
from unlearn.tasks import ClassificationTask, RegressionTask

TASK = ClassificationTask()
F64 = torch.float64


def loop_grads(model: nn.Module, task, x: Tensor, y: Tensor, space: ParamSpace,
               query: bool = False) -> Tensor:
    """The truth: one forward and one autograd.grad per example."""
    params = dict(model.named_parameters())
    rows = []
    for i in range(x.shape[0]):
        out = model(x[i : i + 1])
        loss_of = task.query_loss if query else task.per_sample_loss
        loss = loss_of(out, y[i : i + 1]).sum()
        gs = torch.autograd.grad(loss, [params[n] for n in space.names], allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(params[n]) if g is None else g).reshape(-1)
                               for n, g in zip(space.names, gs, strict=True)]))
    return torch.stack(rows)


class Twice(nn.Module):
    """One Linear applied twice per example (shared weight, two positions)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.out = nn.Linear(6, 6), nn.Linear(6, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.a(torch.tanh(self.a(x)))))


class FunctionalReuse(nn.Module):
    """``fc.weight`` is also used outside ``fc`` (hooks cannot see it): must fall back."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.out = nn.Linear(6, 6), nn.Linear(6, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.fc(x)) + 0.3 * F.linear(x, self.fc.weight)
        return self.out(h)


class Tied(nn.Module):
    """An embedding whose weight is also the output layer's (tied weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(9, 5)
        self.dec = nn.Linear(5, 9, bias=False)
        self.dec.weight = self.emb.weight

    def forward(self, t: Tensor) -> Tensor:
        return self.dec(torch.tanh(self.emb(t).mean(1)))


class SeqFirst(nn.Module):
    """A Linear run on ``[T, B, d]`` (sequence first): with ``T == B`` the first dimension
    looks like the batch, so only the single-example check can tell the split is wrong."""

    def __init__(self) -> None:
        super().__init__()
        self.mix, self.out = nn.Linear(3, 3), nn.Linear(3, 4)

    def forward(self, x: Tensor) -> Tensor:  # x: [B, T, 3]
        h = torch.tanh(self.mix(x.transpose(0, 1)))  # [T, B, 3]
        return self.out(h.mean(0))


class Tokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 5, padding_idx=0)
        self.mix = nn.Linear(5, 5)  # on [B, T, 5]: T positions
        self.out = nn.Linear(5, 3)

    def forward(self, t: Tensor) -> Tensor:
        return self.out(torch.relu(self.mix(self.emb(t))).mean(1))


def _cases() -> dict[str, tuple[nn.Module, Tensor, Tensor]]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x6 = torch.randn(24, 6, generator=g, dtype=F64)
    img = torch.randn(12, 2, 7, 7, generator=g, dtype=F64)
    tok = torch.randint(0, 12, (20, 4), generator=g)
    tok[0, :2] = 0  # padding tokens
    conv = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.ReLU(inplace=True),
                         nn.Conv2d(3, 4, 2, bias=False, padding="same",
                                   padding_mode="reflect"),
                         nn.Flatten(), nn.Linear(4 * 4 * 4, 5))
    return {
        "mlp": (nn.Sequential(nn.Linear(6, 8), nn.ReLU(inplace=True), nn.Linear(8, 4)),
                x6, torch.randint(0, 4, (24,), generator=g)),
        "conv": (conv, img, torch.randint(0, 5, (12,), generator=g)),
        "embedding": (Tokens(), tok, torch.randint(0, 3, (20,), generator=g)),
        "twice": (Twice(), x6, torch.randint(0, 4, (24,), generator=g)),
        "functional_reuse": (FunctionalReuse(), x6, torch.randint(0, 4, (24,), generator=g)),
        "tied": (Tied(), tok % 9, torch.randint(0, 9, (20,), generator=g)),
        "seq_first": (SeqFirst(), torch.randn(5, 5, 3, generator=g, dtype=F64),
                      torch.randint(0, 4, (5,), generator=g)),
    }


CASES = _cases()
HOOKED = ["mlp", "conv", "embedding", "twice"]
FALLBACK = ["functional_reuse", "tied", "seq_first"]


@pytest.mark.parametrize("name", HOOKED + FALLBACK)
@pytest.mark.parametrize("query", [False, True])
def test_hook_grads_equal_autograd_per_example(name, query):
    model, x, y = CASES[name]
    model = model.double().eval()
    space = ParamSpace.of(model)
    truth = loop_grads(model, TASK, x, y, space, query=query)
    hooked = per_sample_grads(model, TASK, (x, y), space, query=query)
    vmapped = per_sample_grads(model, TASK, (x, y), space, query=query, hooks=False)
    scale = float(truth.abs().max())
    assert float((hooked - truth).abs().max()) <= 1e-10 * scale
    assert float((vmapped - truth).abs().max()) <= 1e-10 * scale
    # which path answered: hooks for supported models, the vmap fallback for the others
    layers = space_layers(model, space)
    got = None if layers is None else capture_layer_grads(model, TASK, x, y, layers, set())
    assert (got is not None) == (name in HOOKED)


def test_restricted_space_and_frozen_bias():
    model, x, y = CASES["mlp"]
    model = model.double().eval()
    space = ParamSpace.of(model, ["0.weight", "2.weight", "2.bias"])  # no first bias
    truth = loop_grads(model, TASK, x, y, space)
    torch.testing.assert_close(per_sample_grads(model, TASK, (x, y), space), truth,
                               rtol=0, atol=1e-12)
    only_bias = ParamSpace.of(model, ["2.bias"])  # a bias without its weight: vmap
    assert space_layers(model, only_bias) is None
    torch.testing.assert_close(per_sample_grads(model, TASK, (x, y), only_bias),
                               loop_grads(model, TASK, x, y, only_bias), rtol=0, atol=1e-12)


def test_batchnorm_in_training_mode_falls_back():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)).double()
    x, y = torch.randn(10, 6, dtype=F64), torch.randint(0, 3, (10,))
    space = ParamSpace.of(model, ["0.weight", "0.bias", "2.weight", "2.bias"])
    layers = space_layers(model, space)
    assert layers is not None
    assert capture_layer_grads(model, TASK, x, y, layers, set()) is None  # training mode
    model.eval()
    assert capture_layer_grads(model, TASK, x, y, layers, set()) is not None


# ------------------------------------------------------------------ K-FAC / EK-FAC scores
def _dense_scores(est: KFACInfluence, q: DataLoader, t: DataLoader) -> Tensor:
    """The former path: vmap per-sample gradients, dense preconditioning, dense dot."""
    return InfluenceEstimator.scores(est, q, t)


def _always_raw(basis, n_query, n_train):
    """``raw_is_cheaper`` as if the training set were huge: every layer scored unrotated."""
    return eigen_scores.raw_is_cheaper(basis, n_query, 10**12)


@pytest.mark.parametrize("raw", [False, True], ids=["rotated", "raw"])
@pytest.mark.parametrize("name", HOOKED + ["functional_reuse", "seq_first"])
@pytest.mark.parametrize("cls", [KFACInfluence, EKFACInfluence])
def test_eigenbasis_scores_equal_dense_scores(name, cls, raw, monkeypatch):
    import unlearn.influence.ekfac as ekfac

    model, x, y = CASES[name]
    model = model.double().eval()
    ds = TensorDataset(x, y)
    q, t = DataLoader(ds, batch_size=5), DataLoader(ds, batch_size=7)
    est = cls(model, TASK, 1e-2, progress=False).fit(t)
    monkeypatch.setattr(ekfac, "raw_is_cheaper", _always_raw if raw else
                        lambda *a: None)
    with monkeypatch.context() as m:
        m.setattr("unlearn.influence.grads._hooked_per_sample_grads", lambda *a: None)
        ref = _dense_scores(est, q, t)
        ref_self = InfluenceEstimator.self_influence(est, t)
    if name in HOOKED:  # the eigenbasis path must not need vmap at all
        def no_vmap(*a, **k):
            raise AssertionError("vmap fallback used")

        monkeypatch.setattr(eigen_scores, "per_sample_grads", no_vmap)
    S = est.scores(q, t)
    scale = float(ref.abs().max())
    assert float((S - ref).abs().max()) <= 1e-10 * scale
    torch.testing.assert_close(est.self_influence(t), ref_self, rtol=1e-10, atol=0)
    values, index = est.scores(q, t, top_k=3)
    torch.testing.assert_close(values, ref.topk(3, dim=1).values, rtol=1e-10, atol=1e-14)


def test_eigenbasis_scores_float32_memmap_and_query_rank(tmp_path):
    model, x, y = CASES["conv"]
    model = model.float().eval()
    ds = TensorDataset(x.float(), y)
    loader = DataLoader(ds, batch_size=4)
    est = EKFACInfluence(model, TASK, 1e-2, progress=False).fit(loader)
    S = est.scores(loader, loader)
    assert S.dtype == torch.float32
    ref = _dense_scores(est, loader, loader)
    assert float((S - ref).norm() / ref.norm()) < 1e-5
    mm = est.scores(loader, loader, out=tmp_path / "s.npy")
    np.testing.assert_allclose(np.asarray(mm), S.numpy(), rtol=1e-6, atol=1e-7)
    errors = []
    for rank in (1, 2, 3):
        est.query_rank = rank
        errors.append(float((est.scores(loader, loader) - S).norm() / S.norm()))
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.5, errors
    est.query_rank = 64  # above both sides of every matrix: stored densely, the same
    torch.testing.assert_close(est.scores(loader, loader), S)


def test_regression_task_and_nan_batches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    x, y = torch.randn(30, 4, dtype=F64), torch.randn(30, 2, dtype=F64)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    task = RegressionTask()
    est = KFACInfluence(model, task, 1e-2, progress=False).fit(loader)
    S = est.scores(loader, loader)
    torch.testing.assert_close(S, InfluenceEstimator.scores(est, loader, loader),
                               rtol=1e-10, atol=1e-14)
    bad = x.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        est.scores(loader, DataLoader(TensorDataset(bad, y), batch_size=8))


# ------------------------------------------------------------------ Exact: build and solve
def _generic_ggn(model, task, loader, space) -> Tensor:
    return curvature_product(model, task, loader, space, "ggn")(
        torch.eye(space.numel, dtype=F64))


@pytest.mark.parametrize("name", ["mlp", "conv", "twice", "functional_reuse"])
def test_layerwise_ggn_equals_generic_ggn(name):
    model, x, y = CASES[name]
    model = model.double().eval()
    loader = DataLoader(TensorDataset(x, y), batch_size=7)
    est = ExactInfluence(model, TASK, 1e-2, curvature="ggn", progress=False).fit(loader)
    # the layer-wise build applies to one position per layer call; the rest use products
    assert est.build == ("layers" if name == "mlp" else "products")
    H = _generic_ggn(model, TASK, loader, est.space)
    assert float((est.factors["curvature"] - H).abs().max()) <= 1e-12 * float(H.abs().max())


def test_cholesky_solve_equals_eigen_solve_and_save_load(tmp_path):
    model, x, y = CASES["mlp"]
    model = model.double().eval()
    loader = DataLoader(TensorDataset(x, y), batch_size=24)
    est = ExactInfluence(model, TASK, 1e-2, curvature="ggn", progress=False).fit(loader)
    assert est.solver == "cholesky"
    V = torch.randn(3, est.space.numel, dtype=F64)
    H = est.factors["curvature"]
    truth = torch.linalg.solve(H + 1e-2 * torch.eye(H.shape[0], dtype=F64), V.T).T
    torch.testing.assert_close(est.inverse_hvp(V), truth, rtol=1e-9, atol=0)
    evals, evecs = est.factors["eigenvalues"], est.factors["eigenvectors"]  # on demand
    torch.testing.assert_close(evecs @ torch.diag(evals) @ evecs.T, H, rtol=0, atol=1e-12)
    clipped = ExactInfluence(model, TASK, 1e-2, curvature="ggn", clip_negative=True,
                             progress=False).fit(loader)
    assert clipped.solver == "eigh"
    torch.testing.assert_close(clipped.inverse_hvp(V), truth, rtol=1e-8, atol=0)
    est.save(tmp_path / "e")
    back = ExactInfluence.load(tmp_path / "e", model, TASK)
    assert back.solver == "cholesky"
    # the fitted estimator factorised the block with the softmax's all-ones output direction
    # rotated out, the loaded one the saved dense matrix on the flat rows: equal to rounding
    assert est._basis is not None and back._basis is None
    torch.testing.assert_close(back.inverse_hvp(V), est.inverse_hvp(V), rtol=1e-12, atol=0)
    # a file from before the Cholesky path (eigenvalues and eigenvectors only) still loads
    old = ExactInfluence(model, TASK, 1e-2, curvature="ggn", progress=False)
    old.n_train = est.n_train
    old.factors = {"eigenvalues": evals, "eigenvectors": evecs}
    old.save(tmp_path / "old")
    back = ExactInfluence.load(tmp_path / "old", model, TASK)
    assert back.solver == "eigh"
    torch.testing.assert_close(back.inverse_hvp(V), truth, rtol=1e-8, atol=0)


def test_zero_damping_singular_ggn_is_refused():
    model, x, y = CASES["mlp"]
    model = model.double().eval()
    loader = DataLoader(TensorDataset(x, y), batch_size=24)
    est = ExactInfluence(model, TASK, 0.0, curvature="ggn", progress=False).fit(loader)
    assert est.solver == "eigh"  # the softmax GGN is singular
    with pytest.raises(FloatingPointError, match="singular"):
        est.inverse_hvp(torch.randn(est.space.numel, dtype=F64))


L2 = 0.1
REMOVED = list(range(3, 400, 13))


def test_float32_build_keeps_leave_one_out_correlation():
    model, task, train, query = breast_cancer_lr(L2)
    truth = loo_truth(model, task, train, query, L2, REMOVED)
    loader, qloader = DataLoader(train, batch_size=128), DataLoader(query, batch_size=128)
    full = ExactInfluence(model, task, L2, curvature="ggn", progress=False).fit(loader)
    fast = ExactInfluence(model, task, L2, curvature="ggn", build_dtype=torch.float32,
                          progress=False).fit(loader)
    assert full.build == fast.build == "layers"
    S, S32 = full.scores(qloader, loader), fast.scores(qloader, loader)
    assert float((S32 - S).norm() / S.norm()) < 1e-5
    r = pearson(S32[:, REMOVED], truth)
    print(f"float32-built Exact (GGN): LOO Pearson {r:.4f}")
    assert r >= 0.99


@pytest.mark.parametrize("cache_bytes", [0, 1 << 30], ids=["restream", "cached"])
def test_query_groups_give_the_same_scores(cache_bytes, monkeypatch, tmp_path):
    """Scoring in groups of queries (each against the whole training set, its factors
    cached or recomputed) equals scoring all queries at once: dense, top-k and memmap."""
    import unlearn.influence.ekfac as ekfac

    model, x, y = CASES["twice"]
    model = model.double().eval()
    ds = TensorDataset(x, y)
    q, t = DataLoader(ds, batch_size=5), DataLoader(ds, batch_size=7)
    est = EKFACInfluence(model, TASK, 1e-2, progress=False).fit(t)
    S = est.scores(q, t)
    top = est.scores(q, t, top_k=4)
    monkeypatch.setattr(ekfac, "_QUERY_GROUP_BYTES", 1)  # one query batch per group
    monkeypatch.setattr(ekfac, "_TRAIN_CACHE_BYTES", cache_bytes)
    torch.testing.assert_close(est.scores(q, t), S, rtol=1e-12, atol=1e-15)
    values, index = est.scores(q, t, top_k=4)
    torch.testing.assert_close(values, top[0], rtol=1e-12, atol=1e-15)
    assert torch.equal(index, top[1])
    mm = est.scores(q, t, out=tmp_path / "s.npy")
    np.testing.assert_allclose(np.asarray(mm), S.numpy(), rtol=1e-12, atol=1e-15)
    bad = x.clone()
    bad[20, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        est.scores(q, DataLoader(TensorDataset(bad, y), batch_size=7), out=tmp_path / "b.npy")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npy"]


def test_unrotated_scoring_for_few_queries_and_always_zero_inputs(monkeypatch):
    """Few queries against many training examples: the queries are rotated back (no training
    example is rotated), over the input columns some example reaches; the scores equal
    the rotated path's, also with rank-limited queries."""
    import unlearn.influence.ekfac as ekfac

    model, x, y = CASES["mlp"]
    model = model.double().eval()
    g = torch.Generator().manual_seed(5)
    xt = torch.randn(400, 6, generator=g, dtype=F64)
    xt[:, [1, 4]] = 0.0  # two inputs zero in every training example
    yt = torch.randint(0, 4, (400,), generator=g)
    t = DataLoader(TensorDataset(xt, yt), batch_size=64)
    q = DataLoader(TensorDataset(x[:2], y[:2]), batch_size=2)
    est = EKFACInfluence(model, TASK, 1e-2, progress=False).fit(t)
    bases = est._bases(F64)
    cols = eigen_scores.raw_is_cheaper(bases[0], 2, 400)
    assert cols is not None and cols.tolist() == [0, 2, 3, 5, 6]  # inputs + bias, not 1, 4
    assert eigen_scores.raw_is_cheaper(bases[0], 400, 2) is None  # many queries: rotate
    calls = []
    real = eigen_scores._rotate_factors
    monkeypatch.setattr(eigen_scores, "_rotate_factors",
                        lambda b, lg: calls.append(b.raw is not None) or real(b, lg))
    S = est.scores(q, t)
    assert all(calls)  # every batch, queries and training, taken unrotated
    for rank in (None, 1):
        est.query_rank = rank
        with monkeypatch.context() as m:
            m.setattr(ekfac, "raw_is_cheaper", lambda *a: None)
            ref = est.scores(q, t)
        got = est.scores(q, t)
        assert float((got - ref).abs().max()) <= 1e-12 * float(ref.abs().max())
    est.query_rank = None
    torch.testing.assert_close(est.scores(q, t), S)
    dense = _dense_scores(est, q, t)
    assert float((S - dense).abs().max()) <= 1e-10 * float(dense.abs().max())
