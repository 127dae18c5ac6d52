"""GANModule under a Lightning Trainer with TrainingLogCallback, and its log → cleansing."""

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from unlearn.data import IndexedDataset, from_tensors
from unlearn.generative.metrics import AverageLogLikelihood
from unlearn.generative.models import gan_2d
from unlearn.generative.training import replay
from unlearn.influence.gan import GANInfluence
from unlearn.lightning import TrainingLogCallback
from unlearn.lightning.gan import GANModule, gan_batch_ids, latent_seed_for, trajectory_from_log
from unlearn.removal.gan import GANCleansing


def points(n=60, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, generator=gen, dtype=torch.float64) + 1.0


def fit(module, dataset, *, epochs=3, batch_size=20, log=None, shuffle=True):
    log = log or TrainingLogCallback(every_n_steps=10**6, get_ids=gan_batch_ids)
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=[log],
        logger=False,
        accelerator="cpu",
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(dataset, batch_size=batch_size, shuffle=shuffle))
    return log


@pytest.mark.parametrize("layout", ["ids_x_y", "ids_x"])
def test_fit_log_reconstructs_the_run_and_feeds_cleansing(layout):
    x = points()
    data = (
        from_tensors(x, torch.zeros(60, dtype=torch.long), ids=torch.arange(500, 560))
        if layout == "ids_x_y"
        else IndexedDataset(TensorDataset(x), ids=range(500, 560))
    )
    g, d = gan_2d(latent_dim=4, hidden_g=16, hidden_d=16, seed=1)
    module = GANModule(g, d, lr_d=0.05, lr_g=0.05, latent_seed=7)
    log = fit(module, data)
    assert len(log.steps) == 9 and all(len(r.lrs) == 2 for r in log.steps)
    traj = trajectory_from_log(log, module, data)
    assert len(traj) == 18  # a D step and a G step per batch
    # the replayed run ends at the weights Lightning produced (checked inside, and here)
    trained = torch.cat(
        [
            p.detach().reshape(-1)
            for p in [*module.generator.parameters(), *module.discriminator.parameters()]
        ]
    )
    assert torch.allclose(traj.final_params(), trained, atol=1e-10, rtol=0)
    # the batches are the loader's (shuffled) batches
    assert traj.batch(0) == list(log.steps[0].ids)
    # the cleansing path consumes it: influence, selection, replay without the harmful ids
    metric = AverageLogLikelihood(points(200, seed=5), bandwidth=0.5)
    scores = GANInfluence(traj, metric, eval_latents=50).scores()
    res = GANCleansing(k=3, renormalize=False).cleanse(traj, scores=scores, metric=metric)
    assert res.details["n_removed"] == 3
    assert set(res.details["removed_ids"]) <= set(range(500, 560))
    assert torch.equal(
        res.trajectory.final_params(), replay(traj, res.details["removed_ids"]).final_params()
    )


def test_minimax_and_weight_decay_replay_exactly_and_the_check_is_sensitive():
    """Lightning's SGD steps on GANModule's losses and train_gan's functional update rule are
    separate code; the reconstruction matches only if loss kind, weight decay, learning rates
    and latents all agree."""
    import copy

    x = points(40)
    data = from_tensors(x, torch.zeros(40, dtype=torch.long))
    g, d = gan_2d(latent_dim=3, hidden_g=8, hidden_d=8, seed=2)
    module = GANModule(
        g, d, lr_d=0.1, lr_g=0.02, latent_seed=11, loss="minimax", weight_decay_d=0.01
    )
    log = fit(module, data, epochs=2, batch_size=15, shuffle=False)
    traj = trajectory_from_log(log, module, data)  # raises if the replay missed the weights
    assert int(traj.seeds_d[0]) == latent_seed_for(11, 0, 0, "d")
    assert traj.loss == "minimax" and traj.weight_decay_d == 0.01
    assert traj.batch(0) == list(range(15)) and traj.batch(4) == list(range(30, 40))
    for change in (
        {"loss": "nonsaturating"},
        {"weight_decay_d": 0.0},
        {"seeds_g": traj.seeds_g + 1},
    ):
        wrong = copy.copy(traj)
        for k, v in change.items():
            setattr(wrong, k, v)
        assert not torch.allclose(
            replay(wrong).final_params(), traj.final_params(), atol=1e-6, rtol=0
        ), change


def test_momentum_run_reconstructs_exactly():
    x = points(30)
    data = from_tensors(x, torch.zeros(30, dtype=torch.long))
    g, d = gan_2d(latent_dim=3, hidden_g=8, hidden_d=8, seed=4)
    module = GANModule(g, d, lr_d=0.05, lr_g=0.05, momentum=0.9, latent_seed=1)
    log = fit(module, data, epochs=3, batch_size=10)
    traj = trajectory_from_log(log, module, data)  # raises if the replay missed the weights
    assert traj.momentum == 0.9
    import copy

    plain = copy.copy(traj)
    plain.momentum = 0.0
    plain.checkpoints = {0: traj.checkpoints[0][: traj.n_params]}
    assert not torch.allclose(replay(plain).final_params(), traj.final_params(), atol=1e-6)


def test_errors():
    x = points(20)
    data = from_tensors(x, torch.zeros(20, dtype=torch.long))
    g, d = gan_2d(latent_dim=3, hidden_g=8, hidden_d=8, seed=0)
    with pytest.raises(ValueError, match="loss"):
        GANModule(g, d, loss="wasserstein")
    module = GANModule(g, d)
    no_init = TrainingLogCallback(every_n_steps=None)
    fit(module, data, epochs=1, log=no_init)
    with pytest.raises(ValueError, match="step-0 checkpoint"):
        trajectory_from_log(no_init, module, data)
    with pytest.raises(ValueError, match="empty"):
        trajectory_from_log(TrainingLogCallback(), module, data)
    # the module trained further after the log: the replay no longer matches
    g2, d2 = gan_2d(latent_dim=3, hidden_g=8, hidden_d=8, seed=0)
    m2 = GANModule(g2, d2)
    log = fit(m2, data, epochs=1)
    with torch.no_grad():
        next(m2.generator.parameters()).add_(1.0)
    with pytest.raises(ValueError, match="does not reproduce"):
        trajectory_from_log(log, m2, data)
    # a batch without ids
    plain = TensorDataset(x)
    with pytest.raises(ValueError, match="ids"):
        fit(
            GANModule(*gan_2d(latent_dim=3, hidden_g=8, hidden_d=8)),
            plain,
            epochs=1,
            log=TrainingLogCallback(require_ids=False),
        )
