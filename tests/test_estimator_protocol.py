"""The shared estimator machinery (unlearn.influence.base / grads), exercised through
ExactInfluence and GradientDotInfluence on small models of real data (sklearn digits)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from unlearn.influence import (
    ExactInfluence,
    GradientDotInfluence,
    InfluenceEstimator,
    NotFittedError,
)
from unlearn.influence.grads import curvature_product
from unlearn.tasks import ClassificationTask

TASK = ClassificationTask()
N_TRAIN, N_QUERY, L2 = 150, 11, 0.05



@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: with two intra-op threads on a busy 2-core machine every op waits for a
    descheduled thread (measured 600x slower), so run this module single-threaded."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

@pytest.fixture(scope="module")
def data() -> tuple[Tensor, Tensor]:
    """Digits pooled to 4x4 = 16 features (float64), labels 0-9."""
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float64).reshape(-1, 1, 8, 8) / 16.0
    x = F.avg_pool2d(x, 2).reshape(-1, 16)
    return x, torch.tensor(d.target, dtype=torch.long)


@pytest.fixture(scope="module")
def train(data) -> TensorDataset:
    x, y = data
    return TensorDataset(x[:N_TRAIN], y[:N_TRAIN])


@pytest.fixture(scope="module")
def query(data) -> TensorDataset:
    x, y = data
    return TensorDataset(x[-N_QUERY:], y[-N_QUERY:])


def loader(ds, batch_size: int = 32, **kw) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, **kw)


def trained(model: nn.Module, ds: TensorDataset, steps: int = 60) -> nn.Module:
    """A short full-batch Adam run: the protocol holds at any weights, not only optima."""
    x, y = ds.tensors
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def logreg(train) -> nn.Module:
    torch.manual_seed(0)
    return trained(nn.Linear(16, 10).double(), train)


@pytest.fixture(scope="module")
def net(train) -> nn.Module:
    """A 2-layer MLP (172 parameters); its Hessian is indefinite, so Exact uses the GGN."""
    torch.manual_seed(1)
    return trained(nn.Sequential(nn.Linear(16, 6), nn.Tanh(), nn.Linear(6, 10)).double(), train)


@pytest.fixture(scope="module")
def fitted(net, train) -> dict[str, InfluenceEstimator]:
    """One fitted estimator of each kind on ``net``, shared by the read-only tests."""
    return {"exact": exact(net, train), "dot": dot(net, train)}


def exact(model: nn.Module, ds, curvature: str = "ggn", **kw) -> ExactInfluence:
    est = ExactInfluence(model, TASK, damping=L2, curvature=curvature, progress=False, **kw)
    return est.fit(loader(ds, 150))


def dot(model: nn.Module, ds, **kw) -> GradientDotInfluence:
    return GradientDotInfluence(model, TASK, progress=False, **kw).fit(loader(ds))


BUILDERS = [pytest.param(exact, id="exact"), pytest.param(dot, id="dot")]
KINDS = ["exact", "dot"]


# ----------------------------------------------------------------- the numbers themselves
def test_exact_matches_dense_hessian_formula(logreg, train, query):
    """(1/n) g_qᵀ (H + λI)⁻¹ g_i with H from torch.autograd.functional.hessian."""
    params = dict(logreg.named_parameters())
    names = list(params)
    flat0 = torch.cat([params[n].detach().reshape(-1) for n in names])
    split = [params[n].numel() for n in names]

    def as_params(flat: Tensor) -> dict[str, Tensor]:
        return {n: t.reshape(params[n].shape) for n, t in zip(names, flat.split(split))}

    def loss(flat: Tensor, x: Tensor, y: Tensor) -> Tensor:
        out = torch.func.functional_call(logreg, as_params(flat), (x,))
        return F.cross_entropy(out, y, reduction="none")

    xt, yt = train.tensors
    xq, yq = query.tensors
    H = torch.autograd.functional.hessian(lambda f: loss(f, xt, yt).mean(), flat0,
                                          vectorize=True)
    def jac(f, x):
        return torch.autograd.functional.jacobian(f, x, vectorize=True)

    Gt, Gq = jac(lambda f: loss(f, xt, yt), flat0), jac(lambda f: loss(f, xq, yq), flat0)
    truth = Gq @ torch.linalg.solve(H + L2 * torch.eye(len(flat0), dtype=H.dtype), Gt.T)
    truth /= N_TRAIN
    S = exact(logreg, train, curvature="hessian").scores(loader(query), loader(train))
    torch.testing.assert_close(S, truth, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_columns_follow_the_loader(kind, fitted, train, query):
    est = fitted[kind]
    S = est.scores(loader(query), loader(train))
    assert S.shape == (N_QUERY, N_TRAIN) and S.dtype == torch.float64
    perm = torch.randperm(N_TRAIN, generator=torch.Generator().manual_seed(0))
    x, y = train.tensors
    S_perm = est.scores(loader(query), loader(TensorDataset(x[perm], y[perm])))
    torch.testing.assert_close(S_perm, S[:, perm], rtol=1e-12, atol=1e-15)
    assert not torch.allclose(S_perm, S)  # the permutation really moved columns


@pytest.mark.parametrize("kind", KINDS)
def test_chunking_invariance(kind, fitted, train, query):
    est = fitted[kind]
    small = est.scores(loader(query, 5), loader(train, 13))
    large = est.scores(loader(query, 64), loader(train, 64))
    torch.testing.assert_close(small, large, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("kind", KINDS)
def test_top_k_matches_dense(kind, fitted, train, query):
    est = fitted[kind]
    S = est.scores(loader(query), loader(train))
    values, index = est.scores(loader(query), loader(train, 9), top_k=6)
    ref_values, ref_index = S.topk(6, dim=1)
    torch.testing.assert_close(values, ref_values, rtol=1e-12, atol=1e-15)
    assert torch.equal(index, ref_index)
    values, index = est.scores(loader(query), loader(train, 9), top_k=10 * N_TRAIN)
    assert values.shape == (N_QUERY, N_TRAIN)
    torch.testing.assert_close(S.gather(1, index), values)
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        est.scores(loader(query), loader(train), top_k=0)


@pytest.mark.parametrize("kind", KINDS)
def test_out_memmap_equals_dense_and_leaves_nothing_partial(kind, fitted, train, query, tmp_path):
    est = fitted[kind]
    S = est.scores(loader(query), loader(train))
    mm = est.scores(loader(query), loader(train, 16), out=tmp_path / "scores.npy")
    assert isinstance(mm, np.memmap)
    np.testing.assert_allclose(np.asarray(mm), S.numpy(), rtol=1e-12, atol=1e-15)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.npy"]
    # a run that fails half-way leaves neither the file nor a partial one
    x, y = train.tensors
    bad = x.clone()
    bad[100] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        est.scores(loader(query), loader(TensorDataset(bad, y), 16), out=tmp_path / "bad.npy")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.npy"]
    with pytest.raises(ValueError, match="one of top_k and out"):
        est.scores(loader(query), loader(train), top_k=3, out=tmp_path / "x.npy")


# ----------------------------------------------------------------- query batching
def test_query_rank(net, train, query):
    est = exact(net, train)
    ref = est.scores(loader(query), loader(train))
    # rank >= both matrix sides: stored densely, identical
    est.query_rank = 6
    full = est.scores(loader(query), loader(train))
    torch.testing.assert_close(full, ref, rtol=1e-12, atol=1e-15)
    # the preconditioned query of a curvature estimator has full rank: errors fall with rank
    errors = []
    for rank in (1, 2, 3, 5):
        est.query_rank = rank
        approx = est.scores(loader(query), loader(train))
        errors.append(float((approx - ref).norm() / ref.norm()))
    print("query_rank relative errors (ranks 1, 2, 3, 5):", errors)
    assert errors == sorted(errors, reverse=True), errors
    assert errors[0] < 0.5 and errors[-1] < 0.02, errors
    # one example's gradient of a Linear weight is rank 1, so rank 1 is exact for grad-dot
    dense = dot(net, train).scores(loader(query), loader(train))
    low = dot(net, train, query_rank=1).scores(loader(query, 4), loader(train, 16))
    torch.testing.assert_close(low, dense, rtol=1e-9, atol=1e-14)


# ----------------------------------------------------------------- self-influence, iHVP
@pytest.mark.parametrize("kind", KINDS)
def test_self_influence_is_the_diagonal(kind, fitted, train):
    est = fitted[kind]
    S = est.scores(loader(train, 25), loader(train, 32))
    torch.testing.assert_close(est.self_influence(loader(train, 13)), S.diagonal(),
                               rtol=1e-12, atol=1e-15)
    assert (S.diagonal() > 0).all()


def test_inverse_hvp_forms(net, train, fitted):
    est = fitted["exact"]
    P = est.space.numel
    V = torch.randn(3, P, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    X = est.inverse_hvp(V)
    assert X.shape == (3, P)
    # truth: (H + λI) X = V with H from independent Hessian-vector products
    H = curvature_product(net, TASK, loader(train), est.space, mode="ggn")
    torch.testing.assert_close(H(X) + L2 * X, V, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(est.inverse_hvp(V[1]), X[1])
    as_dict = est.space.unflatten(V[2])
    out = est.inverse_hvp({k: v.float() for k, v in as_dict.items()})  # cast to the model's
    assert set(out) == set(as_dict) and all(out[k].shape == as_dict[k].shape for k in out)
    torch.testing.assert_close(est.space.flatten(out), X[2], rtol=1e-6, atol=1e-6)


def test_inverse_hvp_bad_input(net, train, fitted):
    est = fitted["dot"]
    P = est.space.numel
    for shape in [(P + 1,), (2, P - 1), (2, 2, P), ()]:
        with pytest.raises(ValueError, match=f"{P} entries"):
            est.inverse_hvp(torch.zeros(shape, dtype=torch.float64))
    nan = torch.zeros(P, dtype=torch.float64)
    nan[5] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        est.inverse_hvp(nan)
    good = {k: v.detach() for k, v in net.named_parameters()}
    with pytest.raises(ValueError, match="lacks parameters.*2.bias"):
        est.inverse_hvp({k: v for k, v in good.items() if k != "2.bias"})
    with pytest.raises(ValueError, match=r"'0.weight' has shape \(16, 6\)"):
        est.inverse_hvp({**good, "0.weight": good["0.weight"].T})
    with pytest.raises(NotFittedError):
        GradientDotInfluence(net, TASK).inverse_hvp(torch.zeros(P))


# ----------------------------------------------------------------- save / load
@pytest.mark.parametrize("cls", [ExactInfluence, GradientDotInfluence])
def test_save_load_round_trip(cls, net, train, query, tmp_path):
    est = cls(net, TASK, damping=L2, progress=False).fit(loader(train))
    S = est.scores(loader(query), loader(train))
    with pytest.raises(NotFittedError):
        cls(net, TASK).save(tmp_path / "unfitted")
    est.save(tmp_path / "est")
    est.save(tmp_path / "est")  # overwriting is fine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["est"]
    loaded = cls.load(tmp_path / "est", net, TASK, progress=False)
    assert loaded.n_train == N_TRAIN and loaded.damping == L2
    torch.testing.assert_close(loaded.scores(loader(query), loader(train)), S,
                               rtol=1e-12, atol=1e-15)
    other = GradientDotInfluence if cls is ExactInfluence else ExactInfluence
    with pytest.raises(ValueError, match=f"holds a {cls.__name__}, not a {other.__name__}"):
        other.load(tmp_path / "est", net, TASK)


def test_load_corrupt_files(net, fitted, tmp_path):
    fitted["exact"].save(tmp_path / "est")
    cfg, fac = tmp_path / "est" / "config.json", tmp_path / "est" / "factors.safetensors"
    good_cfg, good_fac = cfg.read_text(), fac.read_bytes()
    with pytest.raises(FileNotFoundError, match="not a saved estimator"):
        ExactInfluence.load(tmp_path / "nothing", net)
    cfg.write_text(good_cfg[: len(good_cfg) // 2])
    with pytest.raises(ValueError, match="cannot read"):
        ExactInfluence.load(tmp_path / "est", net)
    cfg.write_text(json.dumps(["not", "a", "config"]))
    with pytest.raises(ValueError, match="not an estimator config"):
        ExactInfluence.load(tmp_path / "est", net)
    cfg.write_text(json.dumps({**json.loads(good_cfg), "format_version": 99}))
    with pytest.raises(ValueError, match="newer"):
        ExactInfluence.load(tmp_path / "est", net)
    cfg.write_text(good_cfg)
    fac.write_bytes(good_fac[:100])
    with pytest.raises(ValueError, match="cannot read"):
        ExactInfluence.load(tmp_path / "est", net)
    fac.write_bytes(good_fac)
    assert ExactInfluence.load(tmp_path / "est", net).n_train == N_TRAIN


# ----------------------------------------------------------------- dtypes and batch shapes
@pytest.mark.parametrize("build", BUILDERS)
def test_float32_and_float64(build, net, train, query):
    S64 = build(net, train).scores(loader(query), loader(train))
    net32 = nn.Sequential(nn.Linear(16, 6), nn.Tanh(), nn.Linear(6, 10))
    net32.load_state_dict({k: v.float() for k, v in net.state_dict().items()})
    S32 = build(net32, train).scores(loader(query), loader(train))  # float64 data, cast
    assert S32.dtype == torch.float32
    torch.testing.assert_close(S32.double(), S64, rtol=2e-3, atol=2e-3 * S64.abs().max().item())


@pytest.mark.parametrize("build", BUILDERS)
def test_batches_with_ids(build, net, train, query):
    est = build(net, train)
    S = est.scores(loader(query), loader(train))
    x, y = train.tensors
    with_ids = TensorDataset(torch.arange(1000, 1000 + N_TRAIN), x, y)
    xq, yq = query.tensors
    q_ids = TensorDataset(torch.arange(N_QUERY), xq, yq)
    est_ids = build(net, with_ids)
    torch.testing.assert_close(est_ids.scores(loader(q_ids), loader(with_ids)), S)
    torch.testing.assert_close(est_ids.self_influence(loader(with_ids)),
                               est.self_influence(loader(train)))


# ----------------------------------------------------------------- bad input
def test_bad_loaders(net, train, query):
    est = dot(net, train)
    empty = TensorDataset(torch.zeros(0, 16, dtype=torch.float64), torch.zeros(0).long())
    with pytest.raises(ValueError, match="empty"):
        GradientDotInfluence(net, TASK).fit(loader(empty))
    with pytest.raises(ValueError, match="empty"):
        est.scores(loader(query), loader(empty))
    shuffled = loader(train, shuffle=True)
    with pytest.raises(ValueError, match="train_loader shuffles.*shuffle=False"):
        est.scores(loader(query), shuffled)
    with pytest.raises(ValueError, match="query_loader shuffles"):
        est.scores(loader(query, shuffle=True), loader(train))
    with pytest.raises(ValueError, match="shuffle"):
        est.self_influence(shuffled)
    GradientDotInfluence(net, TASK, progress=False).fit(shuffled)  # fitting may shuffle
    with pytest.raises(ValueError, match=f"yielded 128 examples but its dataset has {N_TRAIN}"):
        est.scores(loader(query), loader(train, 32, drop_last=True))
    with pytest.raises(TypeError, match="DataLoader"):
        est.scores(list(query), loader(train))


def test_nan_weights_and_inputs(net, train, query):
    broken = nn.Sequential(nn.Linear(16, 6), nn.Tanh(), nn.Linear(6, 10)).double()
    broken.load_state_dict(net.state_dict())
    with torch.no_grad():
        broken[2].weight[1, 1] = float("nan")
    for cls in (ExactInfluence, GradientDotInfluence):
        with pytest.raises(ValueError, match="'2.weight'.*NaN"):
            cls(broken, TASK)
    x, y = train.tensors
    bad = x.clone()
    bad[3, 7] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        ExactInfluence(net, TASK, progress=False).fit(loader(TensorDataset(bad, y)))
    est = dot(net, train)
    with pytest.raises(ValueError, match="NaN or inf"):
        est.scores(loader(TensorDataset(bad[:5], y[:5])), loader(train))
    with pytest.raises(ValueError, match="NaN or inf"):
        est.self_influence(loader(TensorDataset(bad, y)))


def test_not_fitted_and_bad_arguments(net, train, query):
    for cls in (ExactInfluence, GradientDotInfluence):
        est = cls(net, TASK)
        with pytest.raises(NotFittedError, match="fit"):
            est.scores(loader(query), loader(train))
        with pytest.raises(NotFittedError):
            est.self_influence(loader(train))
    with pytest.raises(ValueError, match="damping"):
        GradientDotInfluence(net, TASK, damping=-1.0)
    with pytest.raises(ValueError, match="query_rank"):
        GradientDotInfluence(net, TASK, query_rank=0)
    with pytest.raises(TypeError, match="Task"):
        GradientDotInfluence(net, "classification")  # type: ignore[arg-type]
    with pytest.raises(KeyError, match="nope"):
        GradientDotInfluence(net, TASK, params=["nope"])
    assert isinstance(dot(net, train), InfluenceEstimator)


def test_params_selection(net, train, query):
    """Influence over a subset of parameters equals the full estimator restricted to it."""
    est = dot(net, train, params=["2.weight", "2.bias"])
    assert est.space.numel == 70
    full = dot(net, train)
    Gq = torch.cat([g for g in full._train_grads(loader(query), "q")])[:, -70:]
    Gt = torch.cat([g for g in full._train_grads(loader(train), "t")])[:, -70:]
    torch.testing.assert_close(est.scores(loader(query), loader(train)), Gq @ Gt.T / N_TRAIN)


def test_all_finite_sees_every_nan_and_inf_and_no_false_alarm():
    """The one-reduction finiteness check: any NaN or inf anywhere is caught, and finite
    float32 values whose float32 sum would overflow are not reported (the sum is float64)."""
    from unlearn.influence.grads import all_finite

    v = torch.randn(10_000)
    assert all_finite(v)
    for bad in (float("nan"), float("inf"), float("-inf")):
        w = v.clone()
        w[1234] = bad
        assert not all_finite(w)
    both = v.clone()
    both[0], both[1] = float("inf"), float("-inf")  # inf - inf is NaN: still caught
    assert not all_finite(both)
    huge = torch.full((1000,), 3e38)  # float32 sum overflows to inf; the values are finite
    assert torch.isinf(huge.sum()) and all_finite(huge)
    assert all_finite(torch.full((10,), 1e308, dtype=torch.float64))  # float64: elementwise
    assert not all_finite(torch.tensor([1.0, float("nan")], dtype=torch.float64))
    assert all_finite(torch.arange(5))  # integers are always finite
