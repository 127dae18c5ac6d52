"""unlearn.audit: metrics against brute force, and the membership attack's direction."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from unlearn.audit import (
    PopulationMIA,
    accuracy,
    average_gap,
    kl_divergence,
    mia_efficacy,
    parameter_distance,
    per_sample_outputs,
    prediction_agreement,
)
from unlearn.data import flip_labels, from_tensors, load_digits


def _data(n: int = 97, d: int = 5, c: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = torch.randint(0, c, (n,), generator=g)
    return from_tensors(x, y)


def _model(d: int = 5, c: int = 4, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 8), nn.Tanh(), nn.Linear(8, c))


def test_metrics_match_brute_force():
    ds = _data()
    loader = DataLoader(ds, batch_size=10)  # several batches, the last one partial
    a, b = _model(seed=0), _model(seed=1)
    acc_a = kl = agree = 0.0
    losses, confs, ents = [], [], []
    for k in range(len(ds)):
        _, x, y = ds[k]
        with torch.no_grad():
            pa = torch.softmax(a(x[None]).double(), 1)[0]
            pb = torch.softmax(b(x[None]).double(), 1)[0]
        acc_a += float(pa.argmax() == y)
        agree += float(pa.argmax() == pb.argmax())
        kl += sum(float(pa[j] * (math.log(pa[j]) - math.log(pb[j]))) for j in range(len(pa)))
        losses.append(-math.log(pa[y]))
        confs.append(float(pa[y]))
        ents.append(-sum(float(p * math.log(p)) for p in pa))
    n = len(ds)
    assert accuracy(a, loader) == pytest.approx(acc_a / n, abs=1e-12)
    assert prediction_agreement(a, b, loader) == pytest.approx(agree / n, abs=1e-12)
    assert kl_divergence(a, b, loader) == pytest.approx(kl / n, rel=1e-5)
    assert kl_divergence(a, a, loader) == pytest.approx(0.0, abs=1e-12)
    out = per_sample_outputs(a, loader)
    np.testing.assert_allclose(out.loss.numpy(), losses, rtol=1e-5)
    np.testing.assert_allclose(out.confidence.numpy(), confs, rtol=1e-5)
    np.testing.assert_allclose(out.entropy.numpy(), ents, rtol=1e-5)
    assert torch.equal(out.ids, ds.ids)
    assert out.correct.double().mean().item() == pytest.approx(acc_a / n)
    flat = torch.cat([(p - q).reshape(-1) for p, q in zip(a.parameters(), b.parameters(),
                                                           strict=True)])
    assert parameter_distance(a, b) == pytest.approx(float(flat.detach().norm()), rel=1e-6)
    assert parameter_distance(a, a) == 0.0


def test_eval_mode_restored_and_model_unchanged():
    model = nn.Sequential(nn.Linear(5, 4), nn.Dropout(0.5))
    model.train()
    before = [p.detach().clone() for p in model.parameters()]
    loader = DataLoader(_data(), batch_size=16)
    assert accuracy(model, loader) == accuracy(model, loader)  # dropout off: deterministic
    assert model.training
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters(), strict=True))


def test_average_gap():
    ref = {"forget_acc": 0.9, "retain_acc": 1.0, "test_acc": 0.95, "mia_efficacy": 0.2}
    got = {"forget_acc": 1.0, "retain_acc": 0.98, "test_acc": 0.95, "mia_efficacy": 0.1}
    assert average_gap(got, ref) == pytest.approx(100 * (0.1 + 0.02 + 0.0 + 0.1) / 4)
    assert average_gap(ref, ref) == 0.0
    assert average_gap(got, ref, keys=("forget_acc",)) == pytest.approx(10.0)
    with pytest.raises(KeyError, match="mia_efficacy"):
        average_gap({k: v for k, v in got.items() if k != "mia_efficacy"}, ref)
    with pytest.raises(ValueError, match="fractions"):
        average_gap({**got, "test_acc": 95.0}, ref)


def test_clear_errors():
    a = _model()
    empty = DataLoader(from_tensors(torch.zeros(0, 5), torch.zeros(0).long()))
    with pytest.raises(ValueError, match="empty"):
        accuracy(a, empty)
    with pytest.raises(TypeError, match="DataLoader"):
        accuracy(a, [(torch.zeros(2, 5), torch.zeros(2).long())])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shape"):
        parameter_distance(a, _model(c=3))
    with pytest.raises(ValueError, match="different parameters"):
        parameter_distance(a, nn.Linear(5, 4))
    with pytest.raises(ValueError, match="labels must lie"):
        per_sample_outputs(a, DataLoader(from_tensors(torch.zeros(3, 5),
                                                      torch.tensor([0, 1, 7]))))
    data = DataLoader(_data(), batch_size=32)
    with pytest.raises(ValueError, match="forget|scored"):
        mia_efficacy(a, forget=empty, retain=data, test=data)
    with pytest.raises(ValueError, match="features"):
        PopulationMIA(features=("loss", "margin"))
    with pytest.raises(RuntimeError, match="fit"):
        PopulationMIA().efficacy(a, data)


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int) -> nn.Module:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(epochs):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def digits_mia():
    """An MLP that memorised a forget set F (trained on R ∪ F) and one that never saw it
    (trained on R only); the attack is fitted on R vs held-out T for each. F's labels are
    random, so only a model that memorised F fits them (clean digits generalise too well for
    any population attack to tell members apart reliably)."""
    ds = load_digits()
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))
    r, t = ds.subset(perm[:600]), ds.subset(perm[800:1400])
    f, _ = flip_labels(ds.subset(perm[600:800]), 1.0, 10, seed=0)
    xr, yr = r.tensors()
    xf, yf = f.tensors()
    torch.manual_seed(0)
    seen = _train(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)),
                  torch.cat([xr, xf]), torch.cat([yr, yf]), 400)
    torch.manual_seed(0)
    unseen = _train(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)), xr, yr, 400)
    loaders = {k: DataLoader(v, batch_size=256) for k, v in (("forget", f), ("retain", r),
                                                              ("test", t))}
    return seen, unseen, loaders


def test_mia_efficacy_separates_memorised_from_unseen(digits_mia):
    seen, unseen, ld = digits_mia
    mem = mia_efficacy(seen, **ld)
    new = mia_efficacy(unseen, **ld)
    # the memorised forget set looks like training data: few called non-member
    assert mem.efficacy < 0.5
    # the unseen forget set looks like test data: called non-member about as often as test
    assert new.efficacy > mem.efficacy + 0.5
    assert new.n_members == 600 and new.n_forget == 200
    assert mem.attack_train_accuracy > 0.6
    # the soft efficacy is the mean non-member probability, and orders the models the same way
    attack = PopulationMIA(seed=0).fit(seen, ld["retain"], ld["test"])
    assert mem.soft_efficacy == pytest.approx(
        float((1 - attack.member_probability(seen, ld["forget"])).mean()), abs=1e-12)
    assert 0 <= mem.soft_efficacy < 0.5 < new.soft_efficacy <= 1


def test_soft_mia_efficacy_is_stable_where_the_attack_is_at_chance(digits_mia):
    """Members and non-members drawn from one distribution (retain split in two halves): the
    attack has no signal, the soft efficacy stays near 1/2 for every attack subsample, and it
    varies across those fits much less than the hard one."""
    _, unseen, ld = digits_mia
    ds = ld["test"].dataset
    half = len(ds) // 2
    a = DataLoader(ds.subset(ds.ids[:half]), batch_size=256)
    b = DataLoader(ds.subset(ds.ids[half:]), batch_size=256)
    res = [mia_efficacy(unseen, forget=ld["retain"], retain=a, test=b, seed=s) for s in range(6)]
    soft = np.array([r.soft_efficacy for r in res])
    hard = np.array([r.efficacy for r in res])
    assert np.abs(soft - 0.5).max() < 0.1
    assert soft.std() < hard.std() / 3


def test_mia_on_members_and_nonmembers_themselves(digits_mia):
    """Scored on its own fitting sets, the attack calls most test samples non-members and
    more test than retain samples non-members; on balanced fitting sets its training accuracy
    is the mean of the two rates (up to the 600-of-600 subsample being the full sets)."""
    _, unseen, ld = digits_mia
    attack = PopulationMIA(seed=1).fit(unseen, ld["retain"], ld["test"])
    on_test, on_retain = attack.efficacy(unseen, ld["test"]), attack.efficacy(unseen, ld["retain"])
    assert on_test > on_retain + 0.1
    assert attack.train_accuracy_ == pytest.approx(0.5 * (on_test + 1 - on_retain), abs=0.02)
    probs = attack.member_probability(unseen, ld["forget"])
    assert probs.shape == (200,) and ((probs >= 0) & (probs <= 1)).all()
