"""Inception-style score and Fréchet distance on a small MNIST classifier trained here.

The Inception score (IS) and the Fréchet Inception distance (FID) read an image classifier's
class probabilities and penultimate features. For MNIST we train our own small CNN on the real
digits instead of downloading Inception weights (so the numbers are not comparable with
published FIDs; they compare models evaluated with the same classifier, which is what data
cleansing needs).

Both metrics are differentiable in the samples, so an influence estimator can take their
gradient with respect to generated images (and through them, the generator):

* FID: ``|mu_r - mu_g|^2 + tr(S_r) + tr(S_g) - 2 tr sqrt(S_r^{1/2} S_g S_r^{1/2})``. The last
  trace is the sum of square roots of the eigenvalues of a symmetric PSD matrix; it equals
  ``tr sqrt(S_r S_g)`` and is differentiated through ``torch.linalg.eigvalsh``, whose backward
  pass uses only the eigenvectors (no ``1/(l_i - l_j)`` terms, so repeated eigenvalues are safe).
  The square root's slope is capped near zero eigenvalues (see :func:`frechet_distance`).
* IS: ``exp(mean_x KL(p(y|x) || p(y)))`` with ``p(y)`` the mean of ``p(y|x)`` over the samples.

>>> clf = load_or_train_mnist_classifier("../shared/data/mnist-t10k", cache_dir="cache")
>>> fid = FrechetDistance(clf, real_images)          # reference statistics computed once
>>> fid(generated)                                  # scalar tensor, lower is better
>>> InceptionScore(clf)(generated)                  # scalar tensor, higher is better
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = [
    "MnistClassifier",
    "train_mnist_classifier",
    "load_or_train_mnist_classifier",
    "FrechetDistance",
    "InceptionScore",
    "frechet_distance",
    "inception_score",
    "classifier_features",
]

#: width of the classifier's penultimate layer, the space FID is computed in
FEATURE_DIM = 64


class MnistClassifier(nn.Module):
    """A small LeNet-style CNN for 1x28x28 images in [0, 1]. ``features(x)`` is the
    ``FEATURE_DIM``-wide penultimate layer (after its ReLU); ``forward(x)`` the 10 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 5, padding=2)
        self.conv2 = nn.Conv2d(16, 32, 5, padding=2)
        self.fc1 = nn.Linear(32 * 7 * 7, FEATURE_DIM)
        self.fc2 = nn.Linear(FEATURE_DIM, 10)

    def features(self, x: Tensor) -> Tensor:
        x = _as_images(x)
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.relu(self.fc1(x.flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.features(x))


def _as_images(x: Tensor) -> Tensor:
    if x.dim() == 2 and x.shape[1] == 784:
        return x.reshape(-1, 1, 28, 28)
    if x.dim() == 3 and tuple(x.shape[1:]) == (28, 28):
        return x.unsqueeze(1)
    if x.dim() != 4 or tuple(x.shape[1:]) != (1, 28, 28):
        raise ValueError(
            f"expected MNIST images of shape [n, 1, 28, 28] (or [n, 784]), got {tuple(x.shape)}"
        )
    return x


# ---------------------------------------------------------------------------- training, cache


def train_mnist_classifier(
    images: Tensor,
    labels: Tensor,
    *,
    epochs: int = 3,
    batch_size: int = 64,
    lr: float = 0.05,
    seed: int = 0,
) -> MnistClassifier:
    """Train :class:`MnistClassifier` with SGD (momentum 0.9) on ``images`` in [0, 1]."""
    images = _as_images(torch.as_tensor(images, dtype=torch.float32))
    labels = torch.as_tensor(labels, dtype=torch.long)
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(
            f"need as many labels as images (and at least one): got {len(images)} "
            f"images, {len(labels)} labels"
        )
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = MnistClassifier()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=gen)
        for start in range(0, len(images), batch_size):
            idx = order[start : start + batch_size]
            loss = F.cross_entropy(model(images[idx]), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_or_train_mnist_classifier(
    mnist_root: str | os.PathLike | None,
    *,
    cache_dir: str | os.PathLike,
    epochs: int = 3,
    seed: int = 0,
    n_train: int | None = None,
) -> MnistClassifier:
    """The scoring classifier for MNIST: loaded from ``cache_dir`` when a file for this
    configuration is there, else trained on real MNIST (``unlearn.data.load_mnist(mnist_root,
    train=False)``, the first ``n_train`` digits, default all) and saved there atomically.

    The cached file holds the configuration it was trained with; a file whose configuration or
    tensors do not match raises a ``ValueError`` naming it (delete it to retrain)."""
    from unlearn.data import load_mnist

    config = {
        "arch": "MnistClassifier-v1",
        "epochs": int(epochs),
        "seed": int(seed),
        "n_train": None if n_train is None else int(n_train),
    }
    tag = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
    path = Path(cache_dir) / f"mnist_classifier_{tag}.pt"
    if path.is_file():
        return _load_classifier(path, config)
    data = load_mnist(mnist_root, train=False)
    x, y = data.tensors()[:2]
    if n_train is not None:
        if not 1 <= n_train <= len(x):
            raise ValueError(f"n_train must be in 1..{len(x)}, got {n_train}")
        x, y = x[:n_train], y[:n_train]
    model = train_mnist_classifier(x, y, epochs=epochs, seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save({"config": config, "state_dict": model.state_dict()}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return model


def _load_classifier(path: Path, config: dict) -> MnistClassifier:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        saved, state = blob["config"], blob["state_dict"]
    except Exception as err:
        raise ValueError(
            f"{path}: not a readable classifier file ({type(err).__name__}: {err}); "
            "delete it to retrain"
        ) from err
    if saved != config:
        raise ValueError(f"{path}: trained with {saved}, expected {config}; delete it to retrain")
    model = MnistClassifier()
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(
            f"{path}: weights do not fit MnistClassifier ({err}); delete it to retrain"
        ) from err
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# ---------------------------------------------------------------------------- metrics


def _to_unit_range(x: Tensor, value_range: tuple[float, float]) -> Tensor:
    lo, hi = value_range
    if (lo, hi) == (0.0, 1.0):
        return x
    return (x - lo) / (hi - lo)


def classifier_features(
    classifier: MnistClassifier,
    images: Tensor,
    *,
    value_range: tuple[float, float] = (0.0, 1.0),
    batch_size: int = 1000,
) -> tuple[Tensor, Tensor]:
    """``(features [n, FEATURE_DIM], log-probabilities [n, 10])`` of ``images`` (pixels in
    ``value_range``), in batches; differentiable when ``images`` requires grad."""
    _check_samples(images)
    dtype = next(classifier.parameters()).dtype
    feats, logps = [], []
    for start in range(0, len(images), batch_size):
        x = _to_unit_range(images[start : start + batch_size], value_range)
        x = x.to(dtype)  # float64 generators with the float32 classifier (autograd casts back)
        f = classifier.features(x)
        feats.append(f)
        logps.append(F.log_softmax(classifier.fc2(f), dim=1))
    return torch.cat(feats), torch.cat(logps)


def _check_samples(x: Tensor, at_least: int = 1) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"samples must be a tensor, got {type(x).__name__}")
    if len(x) < at_least:
        raise ValueError(f"need at least {at_least} samples, got {len(x)}")
    if not torch.isfinite(x).all():
        raise ValueError("samples contain NaN or infinite values")


def _mean_cov(f: Tensor) -> tuple[Tensor, Tensor]:
    f = f.to(torch.float64)
    mu = f.mean(0)
    centred = f - mu
    return mu, centred.T @ centred / (len(f) - 1)


def _sym_sqrt(a: Tensor) -> Tensor:
    vals, vecs = torch.linalg.eigh(a)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def frechet_distance(
    mu1: Tensor,
    cov1_sqrt: Tensor,
    cov1_trace: Tensor,
    mu2: Tensor,
    cov2: Tensor,
    smoothing: float = 1e-4,
) -> Tensor:
    """Fréchet distance between N(mu1, cov1) and N(mu2, cov2), given ``cov1``'s symmetric
    square root and trace (fixed reference) and ``cov2`` (differentiable).

    The value is exact. Its gradient is smoothed: ``d sqrt(l)/dl = 1/(2 sqrt(l))`` is infinite
    at a zero eigenvalue (a feature that is constant over the generated samples but varies over
    the real ones) and huge near one, which would let a few degenerate directions dominate an
    influence estimate; the gradient used is that of ``sqrt(l + e)`` with ``e = smoothing``
    times the mean eigenvalue (straight-through: value of ``sqrt(l)``, slope of
    ``sqrt(l + e)``)."""
    middle = cov1_sqrt @ cov2 @ cov1_sqrt
    middle = (middle + middle.T) / 2  # exact symmetry for eigvalsh
    vals = torch.linalg.eigvalsh(middle).clamp_min(0)  # round-off can give tiny negatives
    e = smoothing * float(vals.detach().mean().clamp_min(1e-300))
    smooth = (vals + e).sqrt()
    exact = vals.detach().sqrt()
    tr_sqrt = ((exact - smooth).detach() + smooth).sum()
    return (mu1 - mu2).square().sum() + cov1_trace + torch.diagonal(cov2).sum() - 2 * tr_sqrt


class FrechetDistance:
    """FID on the classifier's features: ``fid(samples) -> scalar tensor`` (float64; lower is
    better), against the statistics of ``real`` computed once here. ``value_range`` is the
    pixel range of both ``real`` and the samples (``(-1, 1)`` for a tanh generator)."""

    higher_is_better = False
    name = "fid"

    def __init__(
        self,
        classifier: MnistClassifier,
        real: Tensor,
        *,
        value_range: tuple[float, float] = (0.0, 1.0),
    ) -> None:
        _check_samples(real, at_least=2)
        self.classifier = classifier
        self.value_range = value_range
        with torch.no_grad():
            f, _ = classifier_features(classifier, real, value_range=value_range)
            self.mu, cov = _mean_cov(f)
        self.cov_sqrt = _sym_sqrt(cov)
        self.cov_trace = torch.diagonal(cov).sum()

    def __call__(self, samples: Tensor) -> Tensor:
        _check_samples(samples, at_least=2)
        f, _ = classifier_features(self.classifier, samples, value_range=self.value_range)
        mu, cov = _mean_cov(f)
        return frechet_distance(self.mu, self.cov_sqrt, self.cov_trace, mu, cov)


def inception_score(log_probs: Tensor) -> Tensor:
    """``exp(mean_x KL(p(y|x) || p(y)))`` from per-sample class log-probabilities ``[n, c]``."""
    log_probs = log_probs.to(torch.float64)
    log_marginal = torch.logsumexp(log_probs, dim=0) - torch.log(
        torch.tensor(float(len(log_probs)), dtype=torch.float64)
    )
    kl = (log_probs.exp() * (log_probs - log_marginal)).sum(1)
    return kl.mean().exp()


class InceptionScore:
    """IS on the classifier's class probabilities: ``is_(samples) -> scalar tensor`` (float64;
    higher is better, at most the number of classes, 10)."""

    higher_is_better = True
    name = "is"

    def __init__(
        self, classifier: MnistClassifier, *, value_range: tuple[float, float] = (0.0, 1.0)
    ) -> None:
        self.classifier = classifier
        self.value_range = value_range

    def __call__(self, samples: Tensor) -> Tensor:
        _check_samples(samples)
        _, logp = classifier_features(self.classifier, samples, value_range=self.value_range)
        return inception_score(logp)
