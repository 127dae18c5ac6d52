"""The Lightning callbacks on a small MLP trained on scikit-learn digits (CPU, a few seconds)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad
from torch.utils.data import DataLoader, Sampler

pl = pytest.importorskip("pytorch_lightning")

from unlearn.data import IndexedDataset, flip_labels, load_digits  # noqa: E402
from unlearn.influence.ekfac import EKFACInfluence  # noqa: E402
from unlearn.ledger import Ledger  # noqa: E402
from unlearn.lightning import (  # noqa: E402
    GradientRestrictionCallback,
    InfluenceCallback,
    TrainingLogCallback,
    UnlearningCallback,
)
from unlearn.removal import IAU  # noqa: E402
from unlearn.tasks import ClassificationTask  # noqa: E402

N = 600
BATCH = 64
STEPS_PER_EPOCH = -(-N // BATCH)  # 10


class MLP(pl.LightningModule):
    def __init__(self, lr: float = 0.1, momentum: float = 0.9, seed: int = 0,
                 gamma: float = 0.5) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
        self.lr, self.momentum, self.gamma = lr, momentum, gamma
        self.seen: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        ids, x, y = batch
        self.seen.extend(ids.tolist())
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=self.gamma)]


class EpochSeededSampler(Sampler):
    """A shuffling sampler whose order depends only on (seed, epoch): resumable."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


@pytest.fixture(scope="module")
def digits() -> IndexedDataset:
    return load_digits().subset(list(range(N)))


def _loader(ds: IndexedDataset, seed: int = 0) -> DataLoader:
    return DataLoader(ds, batch_size=BATCH, sampler=EpochSeededSampler(len(ds), seed))


def _trainer(callbacks, max_epochs: int = 2, **kw) -> pl.Trainer:
    kw.setdefault("enable_checkpointing", False)
    return pl.Trainer(max_epochs=max_epochs, accelerator="cpu", logger=False,
                      enable_progress_bar=False, enable_model_summary=False,
                      callbacks=callbacks, **kw)


def _losses(model: nn.Module, ds: IndexedDataset) -> torch.Tensor:
    _, x, y = next(iter(DataLoader(ds, batch_size=len(ds))))
    with torch.no_grad():
        return F.cross_entropy(model(x), y, reduction="none")


def _requests(ledger: Ledger) -> list[tuple]:
    return [(r.id, r.state, r.model_version, r.ids) for r in ledger.list()]


# ---------------------------------------------------------------------- training log

def test_training_log_records_ids_lrs_and_checkpoints(digits, tmp_path):
    log = TrainingLogCallback(every_n_steps=5, checkpoint_dir=tmp_path / "ckpt")
    module = MLP()
    _trainer([log]).fit(module, _loader(digits))

    assert len(log.steps) == 2 * STEPS_PER_EPOCH
    assert [r.step for r in log.steps] == list(range(2 * STEPS_PER_EPOCH))
    for epoch, lr in ((0, 0.1), (1, 0.05)):
        recs = [r for r in log.steps if r.epoch == epoch]
        ids = [i for r in recs for i in r.ids]
        assert sorted(ids) == list(range(N))  # every id exactly once per epoch
        assert all(r.lrs == ((pytest.approx(lr),),) for r in recs)
    # the two epochs see different orders (the sampler shuffles)
    assert log.steps[0].ids != log.steps[STEPS_PER_EPOCH].ids

    hits = log.batches_containing([123])
    assert [r.epoch for r in hits] == [0, 1] and all(123 in r.ids for r in hits)

    assert [s for s, _ in log.checkpoints] == [0, 5, 10, 15, 20]
    assert all((tmp_path / "ckpt" / f"step_{s:08d}.pt").is_file() for s, _ in log.checkpoints)
    assert not list((tmp_path / "ckpt").glob("*.tmp"))
    final = log.load_checkpoint(20)
    for k, v in module.state_dict().items():
        assert torch.equal(final[k], v)
    first = log.load_checkpoint(0)
    assert torch.equal(first["net.0.weight"], MLP().state_dict()["net.0.weight"])
    assert log.optimizers[0]["class"] == "SGD" and log.optimizers[0]["defaults"]["momentum"] == 0.9


def test_training_log_batches_without_ids(digits):
    x, y = digits.tensors()
    plain = DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH)

    class Plain(MLP):
        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self(batch[0]), batch[1])

    with pytest.raises(ValueError, match=r"needs batches of \(ids, x, y\).*batch 0 of epoch 0"):
        _trainer([TrainingLogCallback(every_n_steps=None)], max_epochs=1).fit(Plain(), plain)
    log = TrainingLogCallback(every_n_steps=None, require_ids=False)
    _trainer([log], max_epochs=1).fit(Plain(), plain)
    assert len(log.steps) == STEPS_PER_EPOCH and all(r.ids is None for r in log.steps)
    with pytest.raises(ValueError, match="without ids"):
        log.batches_containing([1])


# ---------------------------------------------------------------------- checkpoint and resume

def _resume_callbacks(tmp_path, name: str, digits):
    ledger = Ledger(tmp_path / f"{name}.db", models=tmp_path / f"{name}-models")
    ledger.submit(list(range(0, 40, 2)), requester="alice", reason="erase")
    ledger.submit([5, 99_999], requester="mallory", reason="bad ids")
    log = TrainingLogCallback(every_n_steps=7)
    unl = UnlearningCallback(ledger, IAU(ClassificationTask()), train_dataset=digits,
                             every_n_epochs=1)
    gr = GradientRestrictionCallback(0.01, log_name=None)
    return ledger, log, unl, gr


def test_checkpoint_and_resume_gives_the_same_state(digits, tmp_path):
    ledger_a, log_a, unl_a, gr_a = _resume_callbacks(tmp_path, "a", digits)
    full = MLP()
    _trainer([log_a, unl_a, gr_a]).fit(full, _loader(digits))

    ledger_b, log_b, unl_b, gr_b = _resume_callbacks(tmp_path, "b", digits)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _trainer([log_b, unl_b, gr_b, ckpt], max_epochs=1, enable_checkpointing=True).fit(
        MLP(), _loader(digits))
    ledger_b2, log_b2, unl_b2, gr_b2 = _resume_callbacks(tmp_path, "b", digits)  # fresh objects
    resumed = MLP(seed=1)  # different init: everything must come from the checkpoint
    ckpt2 = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt2")
    _trainer([log_b2, unl_b2, gr_b2, ckpt2], enable_checkpointing=True).fit(
        resumed, _loader(digits), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))

    assert [r.to_dict() for r in log_b2.steps] == [r.to_dict() for r in log_a.steps]
    assert [s for s, _ in log_b2.checkpoints] == [s for s, _ in log_a.checkpoints] == [0, 7, 14]
    assert _requests(ledger_b2) == _requests(ledger_a)
    assert [r.state for r in ledger_a.list()] == ["applied", "rejected"]
    assert len(ledger_b2.versions()) == len(ledger_a.versions()) == 2
    strip = [(r.applied, r.rejected, r.model_version, r.epoch) for r in unl_a.history]
    assert [(r.applied, r.rejected, r.model_version, r.epoch) for r in unl_b2.history] == strip
    assert (gr_b2.n_steps, gr_b2.penalty_sum) == (gr_a.n_steps, pytest.approx(gr_a.penalty_sum))
    for k, v in full.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v)
    assert ledger_b2.verify().ok


# ---------------------------------------------------------------------- gradient restriction

def _brute_gr_grad(module: MLP, x, y, alpha: float) -> dict[str, torch.Tensor]:
    params = {k: v.detach() for k, v in module.named_parameters()}

    def loss(p):
        return F.cross_entropy(functional_call(module, p, (x,)), y)

    def objective(p):
        g = grad(loss)(p)
        return loss(p) + alpha * torch.sqrt(sum((t * t).sum() for t in g.values()))

    return grad(objective)(params)


def test_gradient_restriction_changes_the_update_and_leaves_the_module(digits):
    alpha, lr = 0.5, 1.0
    batch = next(iter(DataLoader(digits, batch_size=128)))
    loader = DataLoader(torch.utils.data.TensorDataset(*batch), batch_size=128)
    module = MLP(lr=lr, momentum=0.0)
    before = copy.deepcopy(module)
    cb = GradientRestrictionCallback(alpha, log_name="gr_penalty")
    _trainer([cb], max_epochs=1, max_steps=1).fit(module, loader)

    expected = _brute_gr_grad(before, batch[1], batch[2], alpha)
    plain = grad(lambda p: F.cross_entropy(functional_call(before, p, (batch[1],)), batch[2]))(
        {k: v.detach() for k, v in before.named_parameters()})
    moved = {k: (before.state_dict()[k] - v) / lr for k, v in module.named_parameters()}
    for k in expected:
        torch.testing.assert_close(moved[k], expected[k], rtol=1e-4, atol=1e-6)
    diff = torch.cat([(expected[k] - plain[k]).flatten() for k in plain]).norm()
    assert diff > 0.05 * torch.cat([g.flatten() for g in plain.values()]).norm()
    assert cb.n_steps == 1 and cb.last_penalty > 0

    assert "training_step" not in module.__dict__  # the user's module is unchanged
    assert type(module).training_step is MLP.training_step
    with pytest.raises(ValueError, match="alpha must be"):
        GradientRestrictionCallback(-1.0)


def test_gradient_restriction_refuses_manual_optimization(digits):
    class Manual(MLP):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

    with pytest.raises(ValueError, match="automatic optimization"):
        _trainer([GradientRestrictionCallback(0.1)], max_epochs=1).fit(Manual(), _loader(digits))


# ---------------------------------------------------------------------- influence

def test_influence_callback_saves_factors_and_flags_mislabeled(digits, tmp_path):
    noisy, flipped = flip_labels(digits, 0.02, num_classes=10, seed=3)
    cb = InfluenceCallback(EKFACInfluence, damping=1e-3, save_dir=tmp_path / "inf",
                           report_top=20, estimator_kwargs={"progress": False})
    module = MLP()
    _trainer([cb], max_epochs=4).fit(module, _loader(noisy))

    flagged = set(cb.top_ids) & set(flipped.tolist())
    assert len(cb.top_ids) == 20 and cb.top_scores == sorted(cb.top_scores, reverse=True)
    # 12 flipped labels among 600: a random top-20 holds 0.4 of them on average (measured: 5)
    assert len(flagged) >= 4, (sorted(flagged), flipped.tolist())
    loaded = EKFACInfluence.load(cb.estimator_path, module, progress=False)
    ordered = DataLoader(noisy, batch_size=BATCH)
    torch.testing.assert_close(loaded.self_influence(ordered), cb.estimator.self_influence(ordered))
    assert (tmp_path / "inf" / "report.json").is_file()
    state = cb.state_dict()
    other = InfluenceCallback(EKFACInfluence, save_dir=tmp_path / "inf")
    other.load_state_dict(state)
    assert other.top_ids == cb.top_ids and other.load_estimator(module).n_train == N


# ---------------------------------------------------------------------- unlearning

def test_unlearning_callback_applies_requests_at_fit_end(digits, tmp_path):
    ledger = Ledger(tmp_path / "ledger.db", models=tmp_path / "models")
    a = ledger.submit(list(range(100, 130)), requester="alice", reason="erase me")
    bad = ledger.submit([3, 4, 5000], requester="bob", reason="typo")
    c = ledger.submit([7, 8, 9, 10], requester="carol", reason="erase me")
    # IAU's default step_scale (tuned on MNIST MLPs) over-forgets this tiny model; 30 does not
    cb = UnlearningCallback(ledger, IAU(ClassificationTask(), step_scale=30.0),
                            train_dataset=digits)
    module = MLP(lr=0.5)
    _trainer([cb]).fit(module, _loader(digits))

    assert ledger.get(bad.id).state == "rejected"
    assert "5000" in ledger.get(bad.id).state_reason and "not in the training set" in \
        ledger.get(bad.id).state_reason
    for r in (a, c):
        assert ledger.get(r.id).state == "applied" and ledger.get(r.id).model_version == 2
    assert ledger.forgotten_ids() == sorted([*range(100, 130), 7, 8, 9, 10])
    details = ledger.show(a.id)["events"][-1]["data"]["details"]
    assert details["method"] == "iau" and details["seconds"] > 0 and details["n_forget"] == 34
    assert details["n_retain"] == N - 34
    assert cb.history[-1].applied == [a.id, c.id] and cb.history[-1].rejected.keys() == {bad.id}

    trained, unlearned = MLP(), MLP()
    trained.load_state_dict(ledger.load_model(1))
    unlearned.load_state_dict(ledger.load_model(2))
    for k, v in module.state_dict().items():  # the module holds the committed version
        assert torch.equal(v, unlearned.state_dict()[k])
    forget = digits.subset(ledger.forgotten_ids())
    rest = digits.without(ledger.forgotten_ids())
    rise = _losses(unlearned, forget).mean() - _losses(trained, forget).mean()
    drift = _losses(unlearned, rest).mean() - _losses(trained, rest).mean()
    # measured: forget loss 0.149 -> 0.285, retained 0.182 -> 0.183
    assert rise > 0.05 and rise > 5 * abs(drift), (float(rise), float(drift))
    assert ledger.verify().ok

    # a second run: nothing new is processed, and forgotten ids are no longer trained on
    module.seen.clear()
    cb2 = UnlearningCallback(ledger, IAU(ClassificationTask()), train_dataset=digits)
    _trainer([cb2], max_epochs=1).fit(module, _loader(digits))
    assert cb2.history[-1].applied == [] and cb2.history[-1].rejected == {}
    assert len(ledger.versions()) == 2
    assert not set(module.seen) & set(ledger.forgotten_ids())
    assert len(module.seen) == N - 34
    assert "training_step" not in module.__dict__


def test_unlearning_callback_process_now_and_bad_arguments(digits, tmp_path):
    ledger = Ledger(tmp_path / "ledger.db", models=tmp_path / "models")
    cb = UnlearningCallback(ledger, IAU(ClassificationTask()), train_dataset=digits,
                            when="manual")
    module = MLP()
    trainer = _trainer([cb], max_epochs=1)
    trainer.fit(module, _loader(digits))
    assert cb.history == [] and ledger.head() is None
    heard: list[tuple[list[int], int | None]] = []
    cb.add_listener(lambda rep, tr, m: heard.append((rep.applied, rep.model_version)))
    r = ledger.submit([1, 2, 3], requester="dave", reason="now")
    report = cb.process_now(trainer, module)
    assert report.applied == [r.id] and report.model_version == 2
    assert ledger.get(r.id).state == "applied"
    again = ledger.submit([2, 3], requester="erin", reason="already gone")
    report = cb.process_now(trainer, module)  # every id already forgotten: no new weights
    assert report.model_version == 2 and ledger.get(again.id).model_version == 2
    assert heard == [([r.id], 2), ([again.id], 2)]
    cb.process_now(trainer, module)  # nothing pending: listeners are not called
    assert len(heard) == 2

    with pytest.raises(ValueError, match="every_n_epochs"):
        UnlearningCallback(ledger, IAU(ClassificationTask()), train_dataset=digits,
                           every_n_epochs=0)
    with pytest.raises(ValueError, match="when must be"):
        UnlearningCallback(ledger, IAU(ClassificationTask()), train_dataset=digits, when="soon")
    with pytest.raises(ValueError, match="models="):
        UnlearningCallback(Ledger(tmp_path / "other.db"), IAU(ClassificationTask()),
                           train_dataset=digits)
    with pytest.raises(TypeError, match="IndexedDataset"):
        UnlearningCallback(ledger, IAU(ClassificationTask()), train_dataset=list(range(3)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cb.state_dict()["history"][0]["applied"] == [r.id]


def test_resume_from_a_checkpoint_older_than_a_removal(digits, tmp_path):
    ledger = Ledger(tmp_path / "ledger.db", models=tmp_path / "models")
    req = ledger.submit(list(range(50, 70)), requester="alice", reason="erase")
    method = IAU(ClassificationTask(), step_scale=30.0)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    cb = UnlearningCallback(ledger, method, train_dataset=digits)  # fit_end: after the ckpt
    _trainer([cb, ckpt], max_epochs=1, enable_checkpointing=True).fit(MLP(lr=0.5),
                                                                      _loader(digits))
    assert ledger.get(req.id).state == "applied" and len(ledger.versions()) == 2

    last = str(tmp_path / "ckpt" / "last.ckpt")
    warn_cb = UnlearningCallback(ledger, method, train_dataset=digits, when="manual")
    with pytest.warns(RuntimeWarning, match=rf"requests \[{req.id}\] as applied after"):
        _trainer([warn_cb], max_epochs=1).fit(MLP(lr=0.5), _loader(digits), ckpt_path=last)
    assert len(ledger.versions()) == 2

    module = MLP(lr=0.5)
    fix_cb = UnlearningCallback(ledger, method, train_dataset=digits, when="manual",
                                reapply_missing=True)
    _trainer([fix_cb], max_epochs=1).fit(module, _loader(digits), ckpt_path=last)
    versions = ledger.versions()
    assert len(versions) == 3 and versions[-1]["meta"]["requests"] == [req.id]
    restored = MLP()
    restored.load_state_dict(torch.load(last, weights_only=True)["state_dict"])
    forget = digits.subset(list(range(50, 70)))
    unlearned = MLP()
    unlearned.load_state_dict(ledger.load_model(3))
    assert _losses(unlearned, forget).mean() > _losses(restored, forget).mean() + 0.05
    assert fix_cb.applied_requests == [req.id] and ledger.verify().ok


def test_iau_uses_the_estimator_the_influence_callback_fits(digits, tmp_path):
    ledger = Ledger(tmp_path / "ledger.db", models=tmp_path / "models")
    req = ledger.submit(list(range(100, 130)), requester="alice", reason="erase me")
    influence = InfluenceCallback(EKFACInfluence, damping=1e-3,
                                  train_dataloader=DataLoader(digits, batch_size=200))
    method = IAU(ClassificationTask(), estimator=lambda: influence.estimator)
    unl = UnlearningCallback(ledger, method, train_dataset=digits)
    module = MLP(lr=0.5)
    _trainer([influence, unl]).fit(module, _loader(digits))  # influence first: fitted before

    assert ledger.get(req.id).state == "applied"
    details = ledger.show(req.id)["events"][-1]["data"]["details"]
    assert details["preconditioner"] == "EKFACInfluence.inverse_hvp"
    trained, unlearned = MLP(), MLP()
    trained.load_state_dict(ledger.load_model(1))
    unlearned.load_state_dict(ledger.load_model(2))
    forget = digits.subset(range(100, 130))
    assert _losses(unlearned, forget).mean() > _losses(trained, forget).mean()

    # the same request with the callback order reversed: the provider has nothing yet
    ledger2 = Ledger(tmp_path / "ledger2.db", models=tmp_path / "models2")
    req2 = ledger2.submit(list(range(100, 130)), requester="alice", reason="erase me")
    late = InfluenceCallback(EKFACInfluence, damping=1e-3,
                             train_dataloader=DataLoader(digits, batch_size=200))
    unl2 = UnlearningCallback(ledger2, IAU(ClassificationTask(), estimator=lambda: late.estimator),
                              train_dataset=digits)
    with pytest.raises(TypeError, match="fitted before this removal"):
        _trainer([unl2, late]).fit(MLP(lr=0.5), _loader(digits))
    assert ledger2.get(req2.id).state == "failed"
    assert "fitted before this removal" in ledger2.get(req2.id).state_reason
