"""FID and Inception score on the locally trained MNIST classifier (unlearn.generative.scores)."""

from pathlib import Path

import pytest
import torch

from unlearn.data import load_mnist
from unlearn.generative.scores import (
    FrechetDistance,
    InceptionScore,
    load_or_train_mnist_classifier,
    train_mnist_classifier,
)

MNIST = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "mnist-t10k"
pytestmark = pytest.mark.skipif(
    not (MNIST / "t10k-images-idx3-ubyte.gz").is_file(), reason="real MNIST not available"
)


@pytest.fixture(scope="module")
def digits():
    x, y = load_mnist(MNIST, train=False).tensors()[:2]
    return x, y


@pytest.fixture(scope="module")
def classifier(digits):
    x, y = digits
    return train_mnist_classifier(x[:3000], y[:3000], epochs=2, seed=0)


def test_classifier_learns_digits(classifier, digits):
    x, y = digits
    with torch.no_grad():
        acc = (classifier(x[8000:9000]).argmax(1) == y[8000:9000]).float().mean().item()
    assert acc > 0.85


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_perturbation(classifier, digits):
    x, _ = digits
    real = x[5000:6000]
    fid = FrechetDistance(classifier, real)
    assert abs(fid(real).item()) < 1e-3
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(real.shape, generator=g)
    values = [fid((real + s * noise).clamp(0, 1)).item() for s in (0.1, 0.3, 0.6)]
    assert 0.05 < values[0] < values[1] < values[2]
    # other real digits are much closer than noisy ones
    assert fid(x[6000:7000]).item() < values[1]


@pytest.mark.filterwarnings("ignore:Matrix is singular")
def test_fid_matches_scipy_sqrtm_formula(classifier, digits):
    scipy_linalg = pytest.importorskip("scipy.linalg")
    import numpy as np

    from unlearn.generative.scores import classifier_features

    x, _ = digits
    fid = FrechetDistance(classifier, x[5000:5600])
    other = x[7000:7600] * 0.8
    with torch.no_grad():
        fr, _ = classifier_features(classifier, x[5000:5600])
        fo, _ = classifier_features(classifier, other)
    a, b = fr.double().numpy(), fo.double().numpy()
    m1, m2 = a.mean(0), b.mean(0)
    c1, c2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy_linalg.sqrtm(c1 @ c2).real
    want = ((m1 - m2) ** 2).sum() + np.trace(c1 + c2 - 2 * covmean)
    assert fid(other).item() == pytest.approx(want, rel=1e-3, abs=1e-3)


def test_fid_is_differentiable_in_the_samples(classifier, digits):
    x, _ = digits
    fid = FrechetDistance(classifier, x[5000:5500])
    s = (x[6000:6300] * 0.7).requires_grad_(True)
    value = fid(s)
    value.backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    # a small step against the gradient lowers the distance
    with torch.no_grad():
        step = s - 0.5 * s.grad / s.grad.norm()
        assert fid(step).item() < value.item()


def test_inception_score_real_above_noise(classifier, digits):
    x, _ = digits
    score = InceptionScore(classifier)
    real = score(x[5000:6000]).item()
    noise = score(torch.rand(1000, 1, 28, 28, generator=torch.Generator().manual_seed(1))).item()
    assert 1.0 <= noise < real <= 10.0
    assert real > 5.0


def test_value_range_for_tanh_generators(classifier, digits):
    x, _ = digits
    a = InceptionScore(classifier)(x[:500]).item()
    b = InceptionScore(classifier, value_range=(-1.0, 1.0))(x[:500] * 2 - 1).item()
    assert a == pytest.approx(b, rel=1e-6)


def test_bad_samples(classifier, digits):
    x, _ = digits
    fid = FrechetDistance(classifier, x[:100])
    with pytest.raises(ValueError, match="NaN"):
        fid(torch.full((10, 1, 28, 28), float("nan")))
    with pytest.raises(ValueError, match="at least 2"):
        fid(x[:1])
    with pytest.raises(ValueError, match="shape"):
        fid(torch.zeros(10, 3, 32, 32))


def test_classifier_cache_reload_and_corrupt_file(tmp_path, monkeypatch):
    import unlearn.generative.scores as scores

    calls = []
    real_train = scores.train_mnist_classifier

    def counting(*a, **kw):
        calls.append(1)
        return real_train(*a, **kw)

    monkeypatch.setattr(scores, "train_mnist_classifier", counting)
    first = load_or_train_mnist_classifier(MNIST, cache_dir=tmp_path, epochs=1, n_train=500)
    second = load_or_train_mnist_classifier(MNIST, cache_dir=tmp_path, epochs=1, n_train=500)
    assert len(calls) == 1
    for p, q in zip(first.parameters(), second.parameters()):
        assert torch.equal(p, q)
    (path,) = tmp_path.glob("mnist_classifier_*.pt")
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="delete it to retrain"):
        load_or_train_mnist_classifier(MNIST, cache_dir=tmp_path, epochs=1, n_train=500)


def test_float64_samples_with_the_float32_classifier(classifier, digits):
    x, _ = digits
    fid = FrechetDistance(classifier, x[:300])
    s = x[300:600].double().requires_grad_(True)
    value = fid(s)
    value.backward()
    assert s.grad.dtype == torch.float64 and torch.isfinite(s.grad).all()
    assert value.item() == pytest.approx(fid(x[300:600]).item(), rel=1e-5)
