"""SGD-influence against the truth it approximates: the counterfactual SGD run without an
example (same batches, order and learning rates), on tiny float64 models of scikit-learn
digits. Checks: correlation with brute-force leave-one-out on logistic regression, the exact
derivative of the counterfactual run for every supported optimizer setting, the sign
convention, Lightning-log vs plain recorder, checkpoint+replay vs per-step storage, and bad
inputs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import kendalltau, pearsonr
from torch import nn
from torch.utils.data import DataLoader, Sampler

from unlearn.data import IndexedDataset, UnknownIdError, from_tensors, load_digits
from unlearn.influence import SGDInfluence
from unlearn.influence.sgd import (
    ReplayMismatchError,
    SGDConfig,
    Trajectory,
    TrajectoryRecorder,
    TrajectoryStep,
    UnsupportedOptimizerError,
    _mean_loss_at,
    loo_loss_changes,
    replay_without,
    train_sgd_recorded,
)
from unlearn.influence.sgd_trajectory import BatchFetcher, SGDReplay
from unlearn.tasks import ClassificationTask

TASK = ClassificationTask()


@pytest.fixture(scope="module")
def data() -> tuple[IndexedDataset, IndexedDataset]:
    x, y = load_digits().tensors()
    train = from_tensors(x[:60].double(), y[:60])
    query = from_tensors(x[200:260].double(), y[200:260], ids=range(200, 260))
    return train, query


def _linear(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Linear(64, 10).double()


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 10)).double()


def _loader(ds: IndexedDataset, batch_size: int = 30) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, shuffle=False)


def _fit(model, traj, train, **kw) -> SGDInfluence:
    return SGDInfluence(model, TASK, traj, train, progress=False, **kw).fit()


@pytest.fixture(scope="module")
def lr_run(data):
    train, query = data
    model = _linear()
    traj = train_sgd_recorded(model, TASK, train, epochs=3, lr=0.3, batch_size=10, seed=0,
                              weight_decay=1e-3)
    return model, traj


# ---------------------------------------------------------------------- against the truth

def test_logistic_regression_matches_leave_one_out_replay(data, lr_run):
    train, query = data
    model, traj = lr_run
    est = _fit(model, traj, train)
    estimate = est.influence(_loader(query))
    truth = loo_loss_changes(model, TASK, train, traj, _loader(query))
    assert estimate.shape == truth.shape == (len(train),)
    assert pearsonr(estimate, truth)[0] > 0.95
    assert kendalltau(estimate, truth)[0] > 0.85
    # sign convention: score = loss(without i) - loss(with i); the signs agree
    big = truth.abs() > truth.abs().median()
    assert (torch.sign(estimate[big]) == torch.sign(truth[big])).float().mean() > 0.95
    # and so the scale: not off by a factor (1/n, batch size, ...)
    assert 0.7 < float(estimate @ truth / (truth @ truth)) < 1.3
    # the Hessian term does real work: dropping it (the paper's ablation) is clearly worse
    first_order = _fit(model, traj, train, hessian=False).influence(_loader(query))
    assert pearsonr(first_order, truth)[0] < pearsonr(estimate, truth)[0] - 0.05


def _scaled_run(model, traj, train, query, sample_id: int, eps: float) -> float:
    """Mean query loss of the run where sample_id's loss weight is scaled by (1 - eps)."""
    steps = [TrajectoryStep(s.ids, torch.where(s.ids == sample_id, s.weights * (1 - eps),
                                               s.weights), s.lr) for s in traj.steps]
    scaled = Trajectory(steps, traj.optimizer, {0: traj.checkpoints[0]})
    replay = SGDReplay(model, TASK, train, scaled)
    theta, buf = replay.flat(traj.checkpoints[0], "start"), None
    for t in range(scaled.num_steps):
        theta, buf = replay.step(theta, buf, t)
    return _mean_loss_at(replay, _loader(query), theta)


@pytest.mark.parametrize("opt", [
    {},
    {"momentum": 0.9},
    {"momentum": 0.9, "nesterov": True},
    {"momentum": 0.5, "dampening": 0.3},
], ids=["plain", "momentum", "nesterov", "dampening"])
def test_estimate_is_the_derivative_of_the_counterfactual_run(data, opt):
    """SGD-influence is exactly d/dε of the run with example i's weight scaled by (1 − ε),
    for a non-convex MLP, with weight decay and every momentum variant, and with
    checkpoints only every 4 steps (replayed)."""
    train, query = data
    model = _mlp()
    traj = train_sgd_recorded(model, TASK, train, epochs=2, lr=0.1, batch_size=10, seed=1,
                              weight_decay=1e-2, checkpoint_every=4, **opt)
    est = _fit(model, traj, train, segment_steps=3)
    estimate = est.influence(_loader(query))
    eps = 1e-5
    first = int(traj.steps[0].ids[0])  # the first step differs (momentum buffer starts at g)
    last = int(traj.steps[-1].ids[0])
    for i in (first, last, 7):
        fd = (_scaled_run(model, traj, train, query, i, eps)
              - _scaled_run(model, traj, train, query, i, -eps)) / (2 * eps)
        assert float(estimate[i]) == pytest.approx(fd, rel=1e-5, abs=1e-10)


def test_removing_a_query_duplicate_raises_its_loss(data, lr_run):
    train, _ = data
    model, traj = lr_run
    est = _fit(model, traj, train)
    me = train.subset([5])
    s = est.influence(_loader(me))
    truth = loo_loss_changes(model, TASK, train, traj, _loader(me), ids=[5])
    assert s[5] > 0 and truth[0] > 0
    assert int(s.argmax()) == 5  # nothing helps an example's loss more than itself


# ---------------------------------------------------------------------- protocol

def test_scores_follow_the_train_loader_and_average_to_the_mean_influence(data, lr_run):
    train, query = data
    model, traj = lr_run
    est = _fit(model, traj, train, query_chunk=25)
    order = [int(i) for i in torch.randperm(len(train), generator=torch.Generator()
                                            .manual_seed(0))[:40]]
    sub = train.subset(order)
    S = est.scores(_loader(query), _loader(sub, 16))
    assert S.shape == (len(query), 40)
    mean = est.influence(_loader(query))
    torch.testing.assert_close(S.mean(dim=0), mean[order], rtol=1e-9, atol=1e-12)
    values, cols = est.scores(_loader(query), _loader(sub), top_k=3)
    torch.testing.assert_close(values, S.topk(3, dim=1).values)
    self_inf = est.self_influence(_loader(sub))
    diag = est.scores(_loader(sub), _loader(sub)).diagonal()
    torch.testing.assert_close(self_inf, diag, rtol=1e-9, atol=1e-12)
    assert (self_inf > 0).float().mean() > 0.9
    with pytest.raises(NotImplementedError, match="no curvature"):
        est.inverse_hvp(torch.zeros(est.space.numel))


def test_checkpoints_with_replay_equal_per_step_storage(data):
    train, query = data
    runs = {}
    for every in (1, 5):
        model = _mlp(3)
        traj = train_sgd_recorded(model, TASK, train, epochs=2, lr=0.2, batch_size=8,
                                  seed=2, momentum=0.9, checkpoint_every=every)
        runs[every] = (model, traj)
    full = _fit(*runs[1], train).influence(_loader(query))
    model5, traj5 = runs[5]
    assert len(traj5.checkpoints) < len(runs[1][1].checkpoints) / 3
    sparse = _fit(model5, traj5, train, segment_steps=2).influence(_loader(query))
    torch.testing.assert_close(sparse, full, rtol=1e-7, atol=1e-12)
    # without the momentum buffers the anchors come from one forward replay from step 0
    no_buffers = Trajectory(traj5.steps, traj5.optimizer, traj5.checkpoints)
    est = _fit(model5, no_buffers, train)
    torch.testing.assert_close(est.influence(_loader(query)), full, rtol=1e-7, atol=1e-12)
    assert est.replay_gap < 1e-10


def test_replay_without_matches_retraining_from_scratch(data):
    """The counterfactual helper equals training again, with the same batches and steps,
    on batches that no longer contain the example."""
    train, _ = data
    model = _linear(4)
    traj = train_sgd_recorded(model, TASK, train, epochs=2, lr=0.3, batch_size=10, seed=0,
                              momentum=0.5, checkpoint_every=3)
    counterfactual = replay_without(model, TASK, train, traj, [3, 17])
    ref = _linear(4)
    opt = torch.optim.SGD(ref.parameters(), lr=0.3, momentum=0.5)
    fetch = BatchFetcher(train, ref)
    for step in traj.steps:
        ids = step.ids
        opt.zero_grad()
        losses = TASK.loss(ref, fetch(ids))
        keep = ~torch.isin(ids, torch.tensor([3, 17]))
        (losses[keep].sum() / len(ids)).backward()  # the batch keeps its normaliser
        opt.step()
    for (_, a), (_, b) in zip(counterfactual.named_parameters(), ref.named_parameters(),
                              strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert not torch.equal(counterfactual.weight, model.weight)


# ---------------------------------------------------------------------- Lightning log

pl = pytest.importorskip("pytorch_lightning")


class _Seeded(Sampler):
    def __init__(self, n: int) -> None:
        self.n, self.epoch = n, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=torch.Generator()
                                   .manual_seed(self.epoch)).tolist())

    def __len__(self) -> int:
        return self.n


class _Module(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = _mlp(5)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        _, x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9, weight_decay=1e-3)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)]


def test_lightning_log_gives_the_plain_recorders_estimate(data):
    from unlearn.lightning import TrainingLogCallback

    train, query = data
    log = TrainingLogCallback(every_n_steps=4)
    module = _Module()
    pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False,
               enable_model_summary=False, enable_checkpointing=False, callbacks=[log]).fit(
        module, DataLoader(train, batch_size=16, sampler=_Seeded(len(train))))
    from_log = _fit(module, log, train, segment_steps=3).influence(_loader(query))

    # the same run as a plain loop, recorded at every step
    plain = _Module()
    opt = torch.optim.SGD(plain.parameters(), lr=0.2, momentum=0.9, weight_decay=1e-3)
    rec, fetch = TrajectoryRecorder(plain, opt, checkpoint_every=1), BatchFetcher(train, plain)
    for r in log.steps:
        for g in opt.param_groups:
            g["lr"] = r.lrs[0][0]
        opt.zero_grad()
        TASK.loss(plain, fetch(torch.tensor(r.ids))).mean().backward()
        rec.record(r.ids)
        opt.step()
    assert [r.lrs[0][0] for r in log.steps][-1] == pytest.approx(0.1)
    from_recorder = _fit(plain, rec.trajectory(), train).influence(_loader(query))
    torch.testing.assert_close(from_log, from_recorder, rtol=1e-6, atol=1e-12)


def test_lightning_log_with_gradient_accumulation(data):
    """Lightning divides each batch's loss by accumulate_grad_batches, also when an epoch
    ends with a shorter group (4 batches per epoch, groups of 3 and 1): replay must agree."""
    from unlearn.lightning import TrainingLogCallback

    train, query = data
    log = TrainingLogCallback(every_n_steps=1)
    module = _Module()
    pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False,
               enable_model_summary=False, enable_checkpointing=False, callbacks=[log],
               accumulate_grad_batches=3).fit(
        module, DataLoader(train, batch_size=16, sampler=_Seeded(len(train))))
    traj = Trajectory.from_training_log(log)
    assert traj.num_steps == 4 and len(traj.steps[0].ids) == 48
    est = _fit(module, log, train, replay_rtol=1e-9)  # every checkpoint and the end checked
    assert est.replay_gap < 1e-12
    assert torch.isfinite(est.influence(_loader(query))).all()


# ---------------------------------------------------------------------- bad input

def _fake_log(ids=(0, 1), cls="SGD", lrs=((0.1,),)):
    from unlearn.lightning import StepRecord

    rec = StepRecord(step=0, epoch=0, batch_idx=0, ids=None if ids is None else tuple(ids),
                     lrs=lrs)
    return SimpleNamespace(steps=[rec], checkpoints=[(0, _linear().state_dict())],
                           optimizers=[{"class": cls, "defaults": {"momentum": 0.0}}])


def test_bad_logs_and_optimizers():
    with pytest.raises(ValueError, match="without ids"):
        Trajectory.from_training_log(_fake_log(ids=None))
    with pytest.raises(UnsupportedOptimizerError, match="Adam"):
        Trajectory.from_training_log(_fake_log(cls="Adam"))
    with pytest.raises(UnsupportedOptimizerError, match="different learning rates"):
        Trajectory.from_training_log(_fake_log(lrs=((0.1, 0.2),)))
    with pytest.raises(ValueError, match="no steps"):
        Trajectory.from_training_log(SimpleNamespace(steps=[], checkpoints=[], optimizers=[]))
    model = _linear()
    with pytest.raises(UnsupportedOptimizerError, match="Adam"):
        TrajectoryRecorder(model, torch.optim.Adam(model.parameters()))
    with pytest.raises(ValueError, match="Nesterov"):
        SGDConfig(momentum=0.0, nesterov=True)
    with pytest.raises(ValueError, match="momentum"):
        SGDConfig(momentum=float("nan"))


def test_bad_inputs(data, lr_run):
    train, query = data
    model, traj = lr_run
    unknown = Trajectory([TrajectoryStep(torch.tensor([0, 999]), torch.full((2,), 0.5), 0.1)],
                         SGDConfig(), {0: model.state_dict()})
    with pytest.raises(UnknownIdError, match="999"):
        SGDInfluence(model, TASK, unknown, train)
    with pytest.raises(UnknownIdError, match="12345"):
        replay_without(model, TASK, train, traj, [12345])
    with pytest.raises(ValueError, match="nothing to remove"):
        replay_without(model, TASK, train, traj, [])
    with pytest.raises(ValueError, match="checkpoint 0"):
        _fit(model, Trajectory(traj.steps, traj.optimizer, {traj.num_steps: model.state_dict()}),
             train)
    est = _fit(model, traj, train)
    with pytest.raises(ValueError, match="empty"):
        est.influence(_loader(query.subset([])))
    with pytest.raises(ValueError, match="NaN"):
        est.propagate(torch.full((est.space.numel,), float("nan")))
    with pytest.raises(ValueError, match="shape"):
        est.propagate(torch.zeros(3))
    x, y = query.tensors()
    x = x.clone()
    x[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        est.influence(_loader(from_tensors(x, y)))
    # training data with NaN: the replay refuses it
    tx, ty = train.tensors()
    tx = tx.clone()
    tx[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        _fit(model, traj, from_tensors(tx, ty))
    # a model that is not the end of this trajectory
    other = _linear(9)
    with pytest.raises(ReplayMismatchError, match="model's weights"):
        _fit(other, traj, train)
    with pytest.raises(TypeError, match="Trajectory"):
        SGDInfluence(model, TASK, [1, 2], train)
