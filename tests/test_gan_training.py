"""Recorded GAN training: exact replay, exclusion, checkpoints, save/load, metrics, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from unlearn.data import UnknownIdError, from_tensors
from unlearn.generative.metrics import AverageLogLikelihood, scott_bandwidth
from unlearn.generative.models import DCDiscriminator, DCGenerator, build_model, gan_2d, gan_mnist
from unlearn.generative.training import GANTrajectory, replay, train_gan


def _data(n: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g, dtype=torch.float64) + 1.0
    return from_tensors(x, torch.zeros(n, dtype=torch.long), ids=range(100, 100 + n))


def _train(dataset=None, **kw):
    dataset = _data() if dataset is None else dataset
    g, d = gan_2d(latent_dim=3, hidden_g=8, hidden_d=8, seed=1)
    kw = {"epochs": 2, "batch_size": 5, "lr_d": 0.05, "lr_g": 0.05, "seed": 0, **kw}
    return train_gan(g, d, dataset, **kw)


def test_replay_without_exclusion_is_bit_exact():
    traj = _train()
    again = replay(traj)
    assert set(again.checkpoints) == set(traj.checkpoints)
    for t, theta in traj.checkpoints.items():
        assert torch.equal(again.checkpoints[t], theta), t
    assert not torch.equal(traj.final_params(), traj.checkpoints[0])  # it did train


def test_momentum_state_replays_exactly_and_survives_save_load(tmp_path):
    traj = _train(momentum=0.9, checkpoint_every=3)
    P = traj.n_params
    assert traj.state_size == 2 * P and traj.checkpoints[0][P:].abs().sum() == 0
    assert traj.final_params().shape == (P,)
    assert torch.equal(replay(traj).final_params(), traj.final_params())
    plain = _train(momentum=0.0)
    assert not torch.allclose(plain.final_params(), traj.final_params())
    loaded = GANTrajectory.load(traj.save(tmp_path / "m.safetensors"), dataset=traj.dataset)
    assert loaded.momentum == 0.9
    assert torch.equal(replay(loaded, [105]).final_params(), replay(traj, [105]).final_params())
    with pytest.raises(ValueError, match="momentum"):
        _train(momentum=1.0)


def test_training_does_not_touch_the_input_modules_and_models_hold_the_result():
    g, d = gan_2d(latent_dim=3, hidden_g=8, hidden_d=8, seed=1)
    before = [p.clone() for p in [*g.parameters(), *d.parameters()]]
    traj = train_gan(g, d, _data(), epochs=1, batch_size=4, lr_d=0.1, lr_g=0.1)
    for p, q in zip([*g.parameters(), *d.parameters()], before, strict=True):
        assert torch.equal(p, q)
    g2, d2 = traj.models()
    flat = torch.cat([p.detach().reshape(-1) for p in [*g2.parameters(), *d2.parameters()]])
    assert torch.equal(flat, traj.final_params())


def test_schedule_records_batches_latents_and_rates():
    traj = _train(n_disc=2, lr_d=lambda t: 0.01 * (t + 1), epochs=1)
    # 12 samples, batches of 5: 3 D steps; a G step after every 2nd D step
    assert traj.kinds.tolist() == [1, 1, 2, 1]
    assert [len(traj.batch(t)) for t in range(4)] == [5, 5, 0, 2]
    assert sorted(sum((traj.batch(t) for t in range(4)), [])) == list(range(100, 112))
    assert traj.lr_d.tolist() == pytest.approx([0.01, 0.02, 0.0, 0.04])
    assert traj.lr_g.tolist() == [0.0, 0.0, 0.05, 0.0]
    z = traj.latents(0, "d")
    assert z.shape == (5, 3) and torch.equal(z, traj.latents(0, "d"))
    assert not torch.equal(z, traj.latents(1, "d"))


def test_replay_excluding_ids_equals_training_on_weights_with_them_dropped():
    traj = _train()
    out = replay(traj, exclude_ids=[103, 107])
    assert out.excluded_ids.tolist() == [103, 107]
    assert not torch.equal(out.final_params(), traj.final_params())
    # exclusions compose: excluding one then the other equals excluding both at once
    twice = replay(replay(traj, [103]), [107])
    assert torch.equal(twice.final_params(), out.final_params())
    # excluding an id that only one batch holds changes nothing before that batch
    t_first = min(t for t in range(len(traj)) if 103 in traj.batch(t) or 107 in traj.batch(t))
    for t in range(t_first + 1):
        assert torch.equal(out.params_at(t), traj.params_at(t))


def test_replay_with_weights():
    traj = _train()
    zero = replay(traj, weights={103: 0.0})
    dropped = replay(traj, [103])
    torch.testing.assert_close(zero.final_params(), dropped.final_params(), rtol=1e-12, atol=1e-14)
    assert torch.equal(replay(traj, weights={103: 1.0}).final_params(), traj.final_params())
    heavy = replay(traj, weights={103: 3.0})
    assert not torch.allclose(heavy.final_params(), traj.final_params())
    assert dict(zip(heavy.weight_ids.tolist(), heavy.weight_values.tolist())) == {103: 3.0}
    with pytest.raises(ValueError, match="weight of id 103"):
        replay(traj, weights={103: -1.0})
    with pytest.raises(ValueError, match="weight of id 103"):
        replay(traj, weights={103: float("nan")})
    with pytest.raises(UnknownIdError):
        replay(traj, weights={7: 0.5})


def test_replay_bad_inputs():
    traj = _train()
    with pytest.raises(UnknownIdError, match="5"):
        replay(traj, [5])
    with pytest.raises(ValueError, match="duplicate"):
        replay(traj, [101, 101])
    with pytest.raises(ValueError, match="integers"):
        replay(traj, [101.5])
    with pytest.raises(ValueError, match="not the one"):
        replay(traj, [101], dataset=_data(seed=3))
    with pytest.raises(TypeError, match="GANTrajectory"):
        replay("trajectory.safetensors")


def test_checkpoints_every_k_recompute_exactly():
    full = _train(checkpoint_every=1)
    sparse = _train(checkpoint_every=3)
    T = len(full)
    assert set(sparse.checkpoints) == set(range(0, T, 3)) | {T}
    for t in range(T + 1):
        assert torch.equal(sparse.params_at(t), full.params_at(t)), t
    backward = list(sparse.iter_states_backward())
    assert [t for t, _ in backward] == list(range(T - 1, -1, -1))
    for t, theta in backward:
        assert torch.equal(theta, full.checkpoints[t])


def test_save_load_round_trip(tmp_path):
    traj = _train(checkpoint_every=2, n_disc=2, weight_decay_d=0.01)
    path = traj.save(tmp_path / "run" / "traj.safetensors")
    assert [p.name for p in path.parent.iterdir()] == ["traj.safetensors"]  # no temp left
    loaded = GANTrajectory.load(path, dataset=traj.dataset)
    for name in ("kinds", "lr_d", "lr_g", "batch_offsets", "batch_ids", "seeds_d", "train_ids"):
        assert torch.equal(getattr(loaded, name), getattr(traj, name)), name
    assert set(loaded.checkpoints) == set(traj.checkpoints)
    assert (loaded.n_disc, loaded.weight_decay_d, loaded.loss) == (2, 0.01, "nonsaturating")
    weighted = replay(traj, weights={104: 0.5})
    again = GANTrajectory.load(weighted.save(tmp_path / "w.safetensors"), dataset=traj.dataset)
    assert torch.equal(replay(again).final_params(), weighted.final_params())
    assert torch.equal(replay(loaded).final_params(), traj.final_params())
    assert torch.equal(replay(loaded, [104]).final_params(), replay(traj, [104]).final_params())
    # without a data set it still loads; replay then asks for one
    bare = GANTrajectory.load(path)
    with pytest.raises(ValueError, match="no data set"):
        replay(bare)
    with pytest.raises(ValueError, match="not the one"):
        GANTrajectory.load(path, dataset=_data(seed=5))


def test_load_rejects_missing_corrupt_and_foreign_files(tmp_path):
    traj = _train()
    path = traj.save(tmp_path / "t.safetensors")
    with pytest.raises(FileNotFoundError):
        GANTrajectory.load(tmp_path / "missing.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01not a safetensors file")
    with pytest.raises(ValueError, match="corrupt"):
        GANTrajectory.load(garbage)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="corrupt"):
        GANTrajectory.load(truncated)
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(3)}, foreign)
    with pytest.raises(ValueError, match="not a GAN trajectory"):
        GANTrajectory.load(foreign)
    # well-formed file, inconsistent contents: each named in the error
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(path, "pt") as f:
        meta = f.metadata()
    for key, change, message in [
        ("batch_ids", lambda t: t + 1000, "not in train_ids"),
        ("lr_d", lambda t: t[:-1], "lr_d has shape"),
        ("checkpoint.0", lambda t: t * float("nan"), "NaN"),
        ("kinds", lambda t: t * 0 + 7, "step kinds"),
    ]:
        tensors = load_file(path)
        tensors[key] = change(tensors[key])
        bad = tmp_path / f"bad_{key}.safetensors"
        save_file(tensors, bad, metadata=meta)
        with pytest.raises(ValueError, match=message):
            GANTrajectory.load(bad)


def test_custom_architecture_needs_templates_to_load(tmp_path):
    class Gen(nn.Module):
        latent_dim = 2

        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, z):
            return self.lin(z)

    class Disc(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 1)

        def forward(self, x):
            return self.lin(x).squeeze(-1)

    torch.manual_seed(0)
    ds = from_tensors(torch.randn(6, 2), torch.zeros(6, dtype=torch.long))
    traj = train_gan(Gen(), Disc(), ds, epochs=1, batch_size=3)
    path = traj.save(tmp_path / "c.safetensors")
    with pytest.raises(ValueError, match="pass generator"):
        GANTrajectory.load(path)
    loaded = GANTrajectory.load(path, generator=Gen(), discriminator=Disc(), dataset=ds)
    assert torch.equal(replay(loaded).final_params(), traj.final_params())
    with pytest.raises(ValueError, match="do not match"):
        GANTrajectory.load(path, generator=nn.Linear(2, 3), discriminator=Disc())


def test_train_bad_inputs():
    g, d = gan_2d(latent_dim=3, hidden_g=8, hidden_d=8)
    ds = _data()
    with pytest.raises(ValueError, match="loss"):
        train_gan(g, d, ds, loss="wasserstein")
    with pytest.raises(ValueError, match="schedule"):
        train_gan(g, d, ds, schedule="random")
    with pytest.raises(ValueError, match="batch_size"):
        train_gan(g, d, ds, batch_size=0)
    with pytest.raises(ValueError, match="lr_d"):
        train_gan(g, d, ds, lr_d=float("nan"))
    with pytest.raises(TypeError, match="IndexedDataset"):
        train_gan(g, d, torch.randn(4, 2))
    x = torch.randn(5, 2, dtype=torch.float64)
    x[2, 1] = float("nan")
    with pytest.raises(ValueError, match="id 2 has NaN"):
        train_gan(g, d, from_tensors(x, torch.zeros(5, dtype=torch.long)))
    bn = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    with pytest.raises(ValueError, match="batch normalisation"):
        train_gan(g, bn, ds)
    with pytest.raises(FloatingPointError, match="diverged"):
        train_gan(g, d, ds, lr_d=1e300, lr_g=1e300)


def test_mnist_pair_shapes_and_a_short_run():
    g, d = gan_mnist(latent_dim=8, width=4, seed=0)
    assert g(torch.randn(3, 8)).shape == (3, 1, 28, 28)
    assert d(torch.rand(3, 1, 28, 28)).shape == (3,)
    assert d(torch.rand(3, 784)).shape == (3,)
    x = torch.rand(6, 1, 28, 28)
    traj = train_gan(g, d, from_tensors(x, torch.zeros(6, dtype=torch.long)), batch_size=3)
    assert len(traj) == 4 and torch.equal(replay(traj).final_params(), traj.final_params())
    rebuilt = build_model(g.spec)
    assert isinstance(rebuilt, DCGenerator) and isinstance(build_model(d.spec), DCDiscriminator)
    with pytest.raises(ValueError, match="unknown model kind"):
        build_model({"kind": "transformer"})


def test_average_log_likelihood_matches_a_direct_computation():
    torch.manual_seed(0)
    val = torch.randn(7, 2, dtype=torch.float64)
    gen = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    metric = AverageLogLikelihood(val, bandwidth=0.7)
    value = metric(gen)
    direct = 0.0
    for x in val:
        dens = sum(
            math.exp(-float(((x - g) ** 2).sum()) / (2 * 0.49)) / (2 * math.pi * 0.49)
            for g in gen.detach()
        )
        direct += math.log(dens / 5)
    assert value.item() == pytest.approx(direct / 7, rel=1e-12)
    (grad,) = torch.autograd.grad(value, gen)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    # the image path (d > 64) agrees with the small-d path
    big_val, big_gen = (
        torch.rand(4, 100, dtype=torch.float64),
        torch.rand(3, 100, dtype=torch.float64),
    )
    m = AverageLogLikelihood(big_val, bandwidth=0.5)
    x, g = big_val, big_gen
    sq = ((x[:, None] - g[None]) ** 2).sum(-1)
    expect = (
        torch.logsumexp(-sq / 0.5 - 50 * math.log(2 * math.pi * 0.25), 1) - math.log(3)
    ).mean()
    assert float(m(big_gen)) == pytest.approx(float(expect), rel=1e-10)
    # Scott's rule: sigma * n^(-1/(d+4)), fixed from the validation samples
    assert AverageLogLikelihood(val).bandwidth == pytest.approx(scott_bandwidth(val))
    assert scott_bandwidth(val) == pytest.approx(float(val.std(0).mean()) * 7 ** (-1 / 6))
    with pytest.raises(ValueError, match="NaN"):
        metric(torch.full((2, 2), float("nan"), dtype=torch.float64))
    with pytest.raises(ValueError, match="features"):
        metric(torch.zeros(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="bandwidth"):
        AverageLogLikelihood(val, bandwidth=-1.0)
