"""First-order estimators (gradient dot, gradient cosine, TracIn) against brute-force autograd."""

from __future__ import annotations

import copy

import pytest
import torch
from sklearn.datasets import load_digits
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from unlearn.influence import GradientCosineInfluence, GradientDotInfluence, TracInInfluence
from unlearn.tasks import ClassificationTask, RegressionTask
from unlearn.training import train_sgd

TASK = ClassificationTask()
N_TRAIN, N_QUERY = 120, 9



@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: with two intra-op threads on a busy 2-core machine every op waits for a
    descheduled thread (measured 600x slower), so run this module single-threaded."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

@pytest.fixture(scope="module")
def digits() -> tuple[TensorDataset, TensorDataset]:
    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float64)
    y = torch.tensor(d.target, dtype=torch.long)
    return TensorDataset(x[:N_TRAIN], y[:N_TRAIN]), TensorDataset(x[-N_QUERY:], y[-N_QUERY:])


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 10)).double()


def loader(ds: TensorDataset, batch_size: int = 16) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size)


def brute_grads(model: nn.Module, ds: TensorDataset, task=TASK) -> Tensor:
    """Per-sample gradients one example at a time with plain autograd, ``[n, P]``."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for x, y in ds:
        loss = task.per_sample_loss(model(x[None]), y[None]).sum()
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)


def weights(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(model: nn.Module, expected: dict[str, Tensor]) -> None:
    for k, v in model.state_dict().items():
        assert torch.equal(v, expected[k]), f"{k} changed"


# ----------------------------------------------------------------- gradient dot / cosine
def test_gradient_dot_matches_brute_force(digits):
    train, query = digits
    model = mlp()
    est = GradientDotInfluence(model, TASK, progress=False).fit(loader(train))
    Gt, Gq = brute_grads(model, train), brute_grads(model, query)
    S = est.scores(loader(query, 4), loader(train))
    torch.testing.assert_close(S, Gq @ Gt.T / N_TRAIN, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(est.self_influence(loader(train)), (Gt**2).sum(1) / N_TRAIN,
                               rtol=1e-10, atol=1e-14)
    v = torch.randn(5, Gt.shape[1], dtype=torch.float64)
    torch.testing.assert_close(est.inverse_hvp(v), v)  # identity, damping unused


def test_gradient_cosine_matches_brute_force(digits):
    train, query = digits
    model = mlp()
    est = GradientCosineInfluence(model, TASK, progress=False).fit(loader(train))
    Gt, Gq = brute_grads(model, train), brute_grads(model, query)
    Gt, Gq = Gt / Gt.norm(dim=1, keepdim=True), Gq / Gq.norm(dim=1, keepdim=True)
    S = est.scores(loader(query, 4), loader(train, 7))
    assert S.min() >= -1 - 1e-12 and S.max() <= 1 + 1e-12
    assert S.min() < 0 < S.max()  # both signs occur: not a degenerate output
    torch.testing.assert_close(S, Gq @ Gt.T, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(est.self_influence(loader(train)),
                               torch.ones(N_TRAIN, dtype=torch.float64))


def test_gradient_cosine_zero_gradient_scores_zero():
    # a linear regressor at x = 0 with target = bias fits that example exactly: zero gradient
    model = nn.Linear(3, 1).double()
    torch.manual_seed(1)
    x = torch.randn(6, 3, dtype=torch.float64)
    x[2] = 0
    with torch.no_grad():
        y = model(x).squeeze(1) + torch.randn(6, dtype=torch.float64)
        y[2] = model.bias.item()
    ds = TensorDataset(x, y[:, None])
    est = GradientCosineInfluence(model, RegressionTask(), progress=False).fit(loader(ds))
    S = est.scores(loader(ds), loader(ds))
    assert torch.all(S[:, 2] == 0) and torch.all(S[2] == 0)
    self_inf = est.self_influence(loader(ds))
    torch.testing.assert_close(self_inf, torch.tensor([1, 1, 0, 1, 1, 1.0], dtype=torch.float64))


# ----------------------------------------------------------------- TracIn
def test_tracin_one_checkpoint_is_n_times_gradient_dot(digits):
    train, query = digits
    model = mlp()
    dot = GradientDotInfluence(model, TASK, progress=False).fit(loader(train))
    tracin = TracInInfluence(model, TASK, [model.state_dict()], 0.5, progress=False)
    tracin.fit(loader(train))
    S_dot = dot.scores(loader(query), loader(train))
    torch.testing.assert_close(tracin.scores(loader(query), loader(train)),
                               0.5 * N_TRAIN * S_dot, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(tracin.self_influence(loader(train)),
                               0.5 * N_TRAIN * dot.self_influence(loader(train)))
    v = torch.randn(tracin.space.numel, dtype=torch.float64)
    torch.testing.assert_close(tracin.inverse_hvp(v), 0.5 * v)


@pytest.fixture(scope="module")
def sgd_run(digits):
    """Three real SGD epochs on digits, a checkpoint after each, with a decaying lr."""
    train, _ = digits
    model = mlp(seed=3)
    lrs = [0.2, 0.1, 0.05]
    shuffled = DataLoader(train, batch_size=16, shuffle=True,
                          generator=torch.Generator().manual_seed(0))
    checkpoints = []
    for lr in lrs:
        train_sgd(model, TASK, shuffled, epochs=1, lr=lr, momentum=0.0)
        checkpoints.append(weights(model))
    assert not torch.equal(checkpoints[0]["0.weight"], checkpoints[2]["0.weight"])
    return model, checkpoints, lrs


def brute_tracin(checkpoints, lrs, query, train) -> Tensor:
    total = 0
    for sd, lr in zip(checkpoints, lrs):
        m = mlp()
        m.load_state_dict(sd)
        total = total + lr * brute_grads(m, query) @ brute_grads(m, train).T
    return total


def test_tracin_sums_checkpoints_like_brute_force(digits, sgd_run, tmp_path):
    train, query = digits
    _, checkpoints, lrs = sgd_run
    model = mlp(seed=7)  # same architecture, weights unlike every checkpoint
    paths = []
    for i in (0, 1):
        paths.append(tmp_path / f"epoch{i}.pt")
        torch.save(checkpoints[i], paths[i])
    before = weights(model)
    est = TracInInfluence(model, TASK, [paths[0], str(paths[1]), checkpoints[2]], lrs,
                          progress=False).fit(loader(train))
    truth = brute_tracin(checkpoints, lrs, query, train)
    S = est.scores(loader(query, 4), loader(train, 32))
    torch.testing.assert_close(S, truth, rtol=1e-9, atol=1e-12)
    assert_same_weights(model, before)
    # the scale really is the sum over checkpoints: no single one explains it
    assert all((S - lr * brute_tracin([c], [1.0], query, train)).abs().max() > 1e-3
               for c, lr in zip(checkpoints, lrs))
    S_train = est.scores(loader(train), loader(train))
    torch.testing.assert_close(est.self_influence(loader(train, 7)), S_train.diagonal(),
                               rtol=1e-10, atol=1e-12)
    values, index = est.scores(loader(query), loader(train, 13), top_k=5)
    ref_values, ref_index = truth.topk(5, dim=1)
    torch.testing.assert_close(values, ref_values, rtol=1e-9, atol=1e-12)
    assert torch.equal(index, ref_index)
    assert_same_weights(model, before)
    torch.testing.assert_close(est.inverse_hvp({k: v for k, v in model.named_parameters()}),
                               {k: sum(lrs) * v.detach() for k, v in model.named_parameters()})


def test_tracin_query_rank_one_is_exact_for_linear_layers(digits, sgd_run):
    # a single example's gradient of a Linear weight is the rank-1 outer product δ xᵀ
    train, query = digits
    model, checkpoints, lrs = sgd_run
    dense = TracInInfluence(model, TASK, checkpoints, lrs, progress=False).fit(loader(train))
    low = TracInInfluence(model, TASK, checkpoints, lrs, query_rank=1, progress=False)
    low.fit(loader(train))
    torch.testing.assert_close(low.scores(loader(query), loader(train)),
                               dense.scores(loader(query), loader(train)), rtol=1e-8, atol=1e-12)


def test_tracin_restores_weights_when_scoring_fails(digits, sgd_run):
    train, query = digits
    model, checkpoints, lrs = sgd_run
    before = weights(model)
    est = TracInInfluence(model, TASK, checkpoints, lrs, progress=False).fit(loader(train))
    x, y = train.tensors
    bad_x = x.clone()
    bad_x[40] = float("nan")  # in the third batch of 16, after checkpoints were swapped in
    with pytest.raises(ValueError, match="NaN"):
        est.scores(loader(query), loader(TensorDataset(bad_x, y)))
    assert_same_weights(model, before)
    with pytest.raises(ValueError, match="NaN"):
        est.self_influence(loader(TensorDataset(bad_x, y)))
    assert_same_weights(model, before)
    with pytest.raises(ValueError, match="yielded 112 examples"):
        est.self_influence(DataLoader(train, batch_size=16, drop_last=True))
    assert_same_weights(model, before)


def test_tracin_save_load_round_trip(digits, sgd_run, tmp_path):
    train, query = digits
    model, checkpoints, lrs = sgd_run
    est = TracInInfluence(model, TASK, checkpoints, lrs, progress=False).fit(loader(train))
    S = est.scores(loader(query), loader(train))
    est.save(tmp_path / "tracin")
    fresh = mlp(seed=9)
    loaded = TracInInfluence.load(tmp_path / "tracin", fresh, TASK, progress=False)
    assert loaded.learning_rates == lrs and loaded.n_train == N_TRAIN
    torch.testing.assert_close(loaded.scores(loader(query), loader(train)), S)
    assert_same_weights(fresh, weights(mlp(seed=9)))
    wider = nn.Sequential(nn.Linear(64, 9), nn.Tanh(), nn.Linear(9, 10)).double()
    with pytest.raises(ValueError, match="checkpoint 0 does not match the model"):
        TracInInfluence.load(tmp_path / "tracin", wider, TASK)


def test_tracin_bad_checkpoints(digits, sgd_run, tmp_path):
    model, checkpoints, _ = sgd_run
    missing = tmp_path / "nowhere" / "epoch7.pt"
    with pytest.raises(FileNotFoundError, match="epoch7.pt"):
        TracInInfluence(model, TASK, [checkpoints[0], missing])
    other = nn.Sequential(nn.Linear(64, 5), nn.Tanh(), nn.Linear(5, 10)).double()
    with pytest.raises(ValueError, match=r"checkpoint 1 .*'0.weight'"):
        TracInInfluence(model, TASK, [checkpoints[0], other.state_dict()])
    renamed = {f"net.{k}": v for k, v in checkpoints[0].items()}
    with pytest.raises(ValueError, match="missing keys"):
        TracInInfluence(model, TASK, [renamed])
    not_weights = tmp_path / "junk.pt"
    not_weights.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        TracInInfluence(model, TASK, [not_weights])
    nan = copy.deepcopy(checkpoints[0])
    nan["2.bias"][3] = float("nan")
    with pytest.raises(ValueError, match="'2.bias'"):
        TracInInfluence(model, TASK, [nan])
    with pytest.raises(ValueError, match="2 learning rates for 3 checkpoints"):
        TracInInfluence(model, TASK, checkpoints, [0.1, 0.2])
    with pytest.raises(ValueError, match="non-empty"):
        TracInInfluence(model, TASK, [])
    with pytest.raises(ValueError, match=">= 0"):
        TracInInfluence(model, TASK, checkpoints, -0.1)
