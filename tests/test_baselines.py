"""Tests for the removal baselines (baselines/): protocol, forgetting, determinism, SISA.

One small MLP is trained once on sklearn digits; the main request forgets one whole class.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from baselines import (
    SCRUB,
    SISA,
    FineTune,
    FisherForgetting,
    NegGrad,
    NegGradPlus,
    RandomLabel,
    Recipe,
    Retrain,
    SalUn,
    SISAEnsemble,
)
from baselines.salun import forget_gradient
from unlearn.data import IndexedDataset, UnknownIdError, from_tensors, load_digits, split_by_ids
from unlearn.removal import RemovalResult
from unlearn.tasks import ClassificationTask, RegressionTask
from unlearn.training import train_sgd

TASK = ClassificationTask()
FORGET_CLASS = 3
RECIPE = Recipe(epochs=30, lr=0.05, batch_size=64, weight_decay=5e-4)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def accuracy(model: nn.Module, data: IndexedDataset) -> float:
    x, y = data.tensors()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def mean_loss(model: nn.Module, data: IndexedDataset) -> float:
    x, y = data.tensors()
    with torch.no_grad():
        return float(TASK.per_sample_loss(model(x), y).mean())


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


class Setup:
    """Digits split 1,400 train / 397 test, a trained MLP and a forget-one-class request."""

    def __init__(self) -> None:
        full = load_digits()
        perm = torch.randperm(len(full), generator=torch.Generator().manual_seed(0))
        self.train = full.subset(sorted(full.ids[perm[:1400]].tolist()))
        self.test = full.subset(sorted(full.ids[perm[1400:]].tolist()))
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.model = mlp()
        train_sgd(self.model, TASK, DataLoader(self.train, batch_size=64, shuffle=True),
                  epochs=RECIPE.epochs, lr=RECIPE.lr, weight_decay=RECIPE.weight_decay, seed=0)
        y = self.train.tensors()[1]
        self.forget_ids = self.train.ids[y == FORGET_CLASS]
        self.f_set, self.r_set = split_by_ids(self.train, self.forget_ids)
        y_test = self.test.tensors()[1]
        self.test_f, self.test_r = split_by_ids(self.test, self.test.ids[y_test == FORGET_CLASS])
        self.forget = DataLoader(self.f_set, batch_size=256)
        self.retain = DataLoader(self.r_set, batch_size=256)
        self.before = copy.deepcopy(self.model.state_dict())

    def metrics(self, model: nn.Module) -> dict[str, float]:
        return {"forget": accuracy(model, self.f_set), "retain": accuracy(model, self.r_set),
                "test_r": accuracy(model, self.test_r), "test_f": accuracy(model, self.test_f),
                "forget_loss": mean_loss(model, self.f_set)}


@pytest.fixture(scope="module")
def setup() -> Setup:
    return Setup()


METHODS: dict[str, Callable[[int], object]] = {
    "retrain": lambda seed: Retrain(TASK, mlp, recipe=RECIPE, seed=seed),
    "finetune": lambda seed: FineTune(TASK, seed=seed),
    "neggrad": lambda seed: NegGrad(TASK, seed=seed),
    "neggrad+": lambda seed: NegGradPlus(TASK, seed=seed),
    "scrub": lambda seed: SCRUB(TASK, seed=seed),
    "salun": lambda seed: SalUn(TASK, seed=seed),
    "fisher": lambda seed: FisherForgetting(TASK, seed=seed),
    "random_label": lambda seed: RandomLabel(TASK, seed=seed),
}


@pytest.fixture(scope="module")
def results(setup: Setup) -> dict[str, RemovalResult]:
    """Each method once, default settings, seed 0, on the forget-one-class request."""
    return {name: make(0).unlearn(setup.model, forget=setup.forget, retain=setup.retain)
            for name, make in METHODS.items()}


def test_original_model_knows_the_class(setup: Setup) -> None:
    m = setup.metrics(setup.model)
    assert m["forget"] > 0.97 and m["retain"] > 0.97 and m["test_f"] > 0.85


# ---------------------------------------------------------------------------- protocol


@pytest.mark.parametrize("name", list(METHODS))
def test_protocol_new_model_input_untouched(name: str, setup: Setup,
                                            results: dict[str, RemovalResult]) -> None:
    res = results[name]
    assert isinstance(res, RemovalResult)
    assert res.model is not setup.model
    assert res.details["method"] == name
    assert res.seconds > 0
    assert not res.model.training
    assert same_weights(setup.model, setup.model)  # sanity
    after = setup.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in setup.before.items()), "input modified"
    assert not same_weights(res.model, setup.model), "the method changed nothing"


@pytest.mark.parametrize("name", list(METHODS))
def test_seeded(name: str, setup: Setup, results: dict[str, RemovalResult]) -> None:
    again = METHODS[name](0).unlearn(setup.model, forget=setup.forget, retain=setup.retain)
    assert same_weights(again.model, results[name].model)
    other = METHODS[name](1).unlearn(setup.model, forget=setup.forget, retain=setup.retain)
    assert not same_weights(other.model, results[name].model)


# ---------------------------------------------------------------------------- forgetting


@pytest.mark.parametrize("name", ["neggrad", "neggrad+", "random_label", "salun", "scrub"])
def test_forgets_a_class(name: str, setup: Setup, results: dict[str, RemovalResult]) -> None:
    orig, new = setup.metrics(setup.model), setup.metrics(results[name].model)
    assert new["forget"] < 0.2 < orig["forget"] - 0.7, (orig, new)
    assert new["test_f"] < 0.2, new
    assert new["forget_loss"] > orig["forget_loss"] + 1.0, (orig, new)


@pytest.mark.parametrize("name,max_drop", [("neggrad+", 0.07), ("scrub", 0.02),
                                           ("finetune", 0.01), ("salun", 0.04),
                                           ("random_label", 0.04)])
def test_keeps_retain_accuracy(name: str, max_drop: float, setup: Setup,
                               results: dict[str, RemovalResult]) -> None:
    orig, new = setup.metrics(setup.model), setup.metrics(results[name].model)
    assert new["retain"] >= orig["retain"] - max_drop, (orig, new)
    assert new["test_r"] >= orig["test_r"] - max_drop - 0.01, (orig, new)


def test_retrain_never_saw_the_class(setup: Setup, results: dict[str, RemovalResult]) -> None:
    m = setup.metrics(results["retrain"].model)
    assert m["forget"] <= 0.01 and m["test_f"] <= 0.02, m
    assert m["retain"] > 0.97 and m["test_r"] > 0.95, m


def test_retrain_trains_only_on_retain(setup: Setup) -> None:
    seen: set[int] = set()

    def train_fn(model: nn.Module, loader: DataLoader) -> None:
        for ids, _, _ in loader:
            seen.update(ids.tolist())
        train_sgd(model, TASK, loader, epochs=2, lr=0.05)

    res = Retrain(TASK, mlp, train_fn=train_fn, seed=3).unlearn(
        setup.model, forget=setup.forget, retain=setup.retain)
    assert seen == set(setup.r_set.ids.tolist())
    assert not seen & set(setup.forget_ids.tolist())
    assert res.details["examples_processed"] is None


def test_retrain_rejects_other_architecture(setup: Setup) -> None:
    wide = Retrain(TASK, lambda: nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)))
    with pytest.raises(ValueError, match="shape"):
        wide.unlearn(setup.model, forget=setup.forget, retain=setup.retain)
    with pytest.raises(ValueError, match="recipe or train_fn"):
        Retrain(TASK, mlp, recipe=RECIPE, train_fn=lambda m, d: None)


# ---------------------------------------------------------------------------- SalUn


def test_salun_updates_only_salient_weights(setup: Setup) -> None:
    method = SalUn(TASK, saliency=0.3)
    res = method.unlearn(setup.model, forget=setup.forget, retain=setup.retain)
    mask = method.mask_
    assert mask is not None
    total = sum(m.numel() for m in mask.values())
    assert abs(res.details["salient_fraction"] - 0.3) <= 1 / total
    grads = forget_gradient(copy.deepcopy(setup.model), TASK, setup.forget)
    g_in = torch.cat([g[mask[n]].abs() for n, g in grads.items()])
    g_out = torch.cat([g[~mask[n]].abs() for n, g in grads.items()])
    assert g_in.min() >= g_out.max()
    new, old = dict(res.model.named_parameters()), dict(setup.model.named_parameters())
    for n, m in mask.items():
        assert torch.equal(new[n][~m], old[n][~m]), f"non-salient weights of {n} moved"
    moved = sum(int((new[n][m] != old[n][m]).sum()) for n, m in mask.items())
    assert moved > 0.9 * res.details["salient_weights"]
    thr = SalUn(TASK, threshold=float(g_out.max()) * 10)
    thr.unlearn(setup.model, forget=setup.forget, retain=setup.retain)
    assert sum(int(m.sum()) for m in thr.mask_.values()) < 0.3 * total


# ---------------------------------------------------------------------------- Fisher


def brute_force_fisher(model: nn.Module, data: IndexedDataset) -> dict[str, torch.Tensor]:
    """``mean_x Σ_c p(c|x) (∂ log p(c|x))²`` by one autograd call per (sample, class)."""
    params = dict(model.named_parameters())
    out = {n: torch.zeros_like(p) for n, p in params.items()}
    x, _ = data.tensors()
    for i in range(len(x)):
        logp = torch.log_softmax(model(x[i : i + 1]), dim=1)[0]
        for c in range(logp.shape[0]):
            grads = torch.autograd.grad(logp[c], list(params.values()), retain_graph=True)
            for n, g in zip(params, grads, strict=True):
                out[n] += logp[c].exp().detach() * g**2
    return {n: f / len(x) for n, f in out.items()}


def test_fisher_diagonal_matches_brute_force(setup: Setup) -> None:
    small = setup.r_set.subset(setup.r_set.ids[:24])
    method = FisherForgetting(TASK)
    got = method.fisher(setup.model, DataLoader(small, batch_size=10))
    want = brute_force_fisher(setup.model, small)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-9)


def test_fisher_noise_scales_with_inverse_fisher(setup: Setup,
                                                 results: dict[str, RemovalResult]) -> None:
    method = FisherForgetting(TASK)
    fisher = method.fisher(setup.model, setup.retain)
    var = {n: 1e-5 * (1 / (f + 1e-8)).clamp(max=1e3) for n, f in fisher.items()}  # the formula
    old = dict(setup.model.named_parameters())
    new = dict(results["fisher"].model.named_parameters())
    delta = torch.cat([(new[n] - old[n]).detach().reshape(-1) for n in var])
    f = torch.cat([fisher[n].reshape(-1) for n in var])
    v = torch.cat([var[n].reshape(-1) for n in var])
    z2 = (delta**2 / v).mean()  # standardised noise: E[z²] = 1 if var is the noise variance
    assert 0.9 < float(z2) < 1.1, float(z2)
    order = f.argsort()
    quarter = len(f) // 4
    for part in (order[:quarter], order[-quarter:]):  # E|N(0, v)| = sqrt(2v/π), per quartile
        expected = (v[part] * 2 / torch.pi).sqrt().mean()
        assert abs(float(delta[part].abs().mean() / expected) - 1) < 0.1
    low, high = delta[order[:quarter]].abs().mean(), delta[order[-quarter:]].abs().mean()
    assert low > 2 * high, (float(low), float(high))  # low-Fisher weights move more
    assert results["fisher"].details["fraction_clipped"] > 0


# ---------------------------------------------------------------------------- SISA


@pytest.fixture(scope="module")
def sisa(setup: Setup) -> tuple[SISA, SISAEnsemble]:
    method = SISA(TASK, mlp, n_shards=3, n_slices=3, recipe=Recipe(epochs=10, lr=0.05), seed=0)
    return method, method.fit(setup.train)


def _without(partition: list[list[torch.Tensor]], ids: torch.Tensor) -> list[list[torch.Tensor]]:
    return [[t[~torch.isin(t, ids)] for t in shard] for shard in partition]


def test_sisa_ensemble_accuracy(setup: Setup, sisa: tuple[SISA, SISAEnsemble]) -> None:
    _, ens = sisa
    assert accuracy(ens, setup.test) > 0.9
    assert sorted(ens.ids().tolist()) == sorted(setup.train.ids.tolist())
    x = setup.test.tensors()[0][:5]
    probs = torch.stack([torch.softmax(m(x), 1) for m in ens.members]).mean(0)
    torch.testing.assert_close(ens(x).exp(), probs)


def test_sisa_retrains_only_the_affected_shard(setup: Setup,
                                               sisa: tuple[SISA, SISAEnsemble]) -> None:
    method, ens = sisa
    before = copy.deepcopy(ens)
    ids = ens.partition[1][1][:4]
    res = method.unlearn(ens, forget=DataLoader(setup.train.subset(ids), batch_size=2))
    new = res.model
    assert res.details["n_shards_retrained"] == 1 and res.details["shards_retrained"] == [1]
    assert res.details["first_slice"] == {1: 1}
    sizes = [len(t) for t in _without(ens.partition, ids)[1]]  # steps 1 and 2 of shard 1 only
    assert res.details["examples_processed"] == 10 * (sum(sizes[:2]) + sum(sizes))
    assert 0 < res.details["work_fraction"] < 1 / 3
    assert same_weights(new.members[0], ens.members[0])
    assert same_weights(new.members[2], ens.members[2])
    assert not same_weights(new.members[1], ens.members[1])
    assert not torch.isin(new.ids(), ids).any() and len(new.ids()) == len(setup.train) - 4
    for k in range(2):  # checkpoints before the affected slice are kept
        c_new, c_old = new.checkpoint(1, k), ens.checkpoint(1, k)
        assert all(torch.equal(c_new[key], c_old[key]) for key in c_old)
    # the input ensemble is untouched
    assert same_weights(ens, before)
    assert all(torch.equal(a, b) for s, t in zip(ens.partition, before.partition, strict=True)
               for a, b in zip(s, t, strict=True))
    # equals retraining shard 1 from its checkpoint after slice 0 on the remaining data
    member = mlp()
    member.load_state_dict(ens.checkpoint(1, 1))
    method.train_slices(member, 1, _without(ens.partition, ids)[1], 1)
    assert same_weights(member, new.members[1])
    # ... and SISA trained from scratch without the ids on the same partition
    scratch = SISA(TASK, mlp, n_shards=3, n_slices=3, recipe=Recipe(epochs=10, lr=0.05), seed=0)
    ref = scratch.fit(setup.train.without(ids), partition=_without(ens.partition, ids))
    assert all(same_weights(a, b) for a, b in zip(ref.members, new.members, strict=True))
    # a second request on the new ensemble; already forgotten ids are unknown
    with pytest.raises(UnknownIdError):
        method.unlearn(new, forget=DataLoader(setup.train.subset(ids[:1]), batch_size=1))


def test_sisa_last_slice_is_cheap_and_class_forget_retrains_all(
        setup: Setup, sisa: tuple[SISA, SISAEnsemble]) -> None:
    method, ens = sisa
    last = method.unlearn(ens, forget=DataLoader(setup.train.subset(ens.partition[2][2][:3])))
    assert last.details["slice_steps_retrained"] == {2: 1}
    shard2 = sum(len(t) for t in ens.partition[2]) - 3  # the last step trains on all of it
    sizes = [[len(t) for t in shard] for shard in last.model.partition]
    full = sum(sum(s[: k + 1]) for s in sizes for k in range(3))
    assert last.details["work_fraction"] == pytest.approx(shard2 / full)
    assert last.details["work_fraction"] < 0.17  # about (1/2 of a shard's work) / 3 shards
    cls = method.unlearn(ens, forget=setup.forget)
    assert cls.details["n_shards_retrained"] == 3 and cls.details["work_fraction"] == 1.0
    assert accuracy(cls.model, setup.f_set) <= 0.01
    assert accuracy(cls.model, setup.test_r) > 0.9


def test_sisa_checkpoint_dir(setup: Setup, tmp_path) -> None:
    small = setup.train.subset(setup.train.ids[:300])
    method = SISA(TASK, mlp, n_shards=2, n_slices=2, recipe=Recipe(epochs=2), seed=1,
                  checkpoint_dir=tmp_path)
    ens = method.fit(small)
    files = set(tmp_path.iterdir())
    assert len(files) == 2 * 3
    res = method.unlearn(ens, forget=DataLoader(small.subset(ens.partition[0][0][:2])))
    assert set(tmp_path.iterdir()) > files  # new checkpoints; the old ones are kept
    assert len(set(tmp_path.iterdir()) - files) == 2
    assert res.model.checkpoints[0][0] == ens.checkpoints[0][0]
    assert same_weights(res.model.members[1], ens.members[1])


# ---------------------------------------------------------------------------- bad input


def test_bad_input(setup: Setup, sisa: tuple[SISA, SISAEnsemble]) -> None:
    empty = DataLoader(setup.train.subset([]), batch_size=8)
    everything = DataLoader(setup.train, batch_size=256)
    no_retain = DataLoader(setup.train.subset([]), batch_size=8)
    with pytest.raises(ValueError, match="forget set is empty"):
        FineTune(TASK).unlearn(setup.model, forget=empty, retain=setup.retain)
    with pytest.raises(ValueError, match="whole training set"):
        NegGradPlus(TASK).unlearn(setup.model, forget=everything, retain=no_retain)
    with pytest.raises(ValueError, match="needs the retained data"):
        SCRUB(TASK).unlearn(setup.model, forget=setup.forget)
    method, ens = sisa
    with pytest.raises(ValueError, match="whole training set"):
        method.unlearn(ens, forget=everything)
    with pytest.raises(UnknownIdError, match="99999"):
        x, y = setup.train.subset(setup.train.ids[:2]).tensors()
        stranger = from_tensors(x, y, ids=[int(setup.train.ids[0]), 99999])
        method.unlearn(ens, forget=DataLoader(stranger))
    with pytest.raises(ValueError, match="ids, x, y"):
        x, y = setup.f_set.tensors()
        method.unlearn(ens, forget=DataLoader(torch.utils.data.TensorDataset(x, y)))
    with pytest.raises(TypeError, match="SISAEnsemble"):
        method.unlearn(setup.model, forget=setup.forget)
    with pytest.raises(RuntimeError, match="fit"):
        SISA(TASK, mlp).unlearn(ens, forget=setup.forget)


def test_bad_settings() -> None:
    for cls in (SCRUB, SalUn, RandomLabel):
        with pytest.raises(TypeError, match="ClassificationTask"):
            cls(RegressionTask())
    with pytest.raises(ValueError, match="msteps"):
        SCRUB(TASK, epochs=2, msteps=3)
    with pytest.raises(ValueError, match="saliency"):
        SalUn(TASK, saliency=1.5)
    with pytest.raises(ValueError, match="alpha"):
        FisherForgetting(TASK, alpha=0.0)
    with pytest.raises(ValueError, match="optimizer"):
        FineTune(TASK, optimizer="lion")
    with pytest.raises(ValueError, match="n_shards"):
        SISA(TASK, mlp, n_shards=0)
    with pytest.raises(ValueError, match="cannot fill"):
        SISA(TASK, mlp, n_shards=10, n_slices=10).fit(load_digits().subset(range(50)))


def test_sisa_emptied_shard_leaves_the_vote(setup: Setup) -> None:
    small = setup.train.subset(setup.train.ids[:200])
    method = SISA(TASK, mlp, n_shards=2, n_slices=2, recipe=Recipe(epochs=2), seed=2)
    ens = method.fit(small)
    shard0 = torch.cat(ens.partition[0])
    res = method.unlearn(ens, forget=DataLoader(small.subset(shard0), batch_size=64))
    assert res.details["shards_emptied"] == [0] and res.model.active == [False, True]
    x = small.tensors()[0][:8]
    torch.testing.assert_close(res.model(x), torch.log_softmax(res.model.members[1](x), 1))
    assert ens.active == [True, True]
