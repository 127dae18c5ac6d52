"""Generative models: small GANs, recorded SGD training with exact replay, sample metrics.

- :mod:`unlearn.generative.models`: the 2-D MLP GAN of the influence-for-GANs paper and a small
  DCGAN-style pair for 28×28 MNIST.
- :mod:`unlearn.generative.training`: ``train_gan`` (records every step: batch ids, latent
  seeds, learning rates, parameters) and ``replay(trajectory, exclude_ids=...)``.
- :mod:`unlearn.generative.metrics`: differentiable metrics ``callable(samples) -> scalar``,
  e.g. the KDE average log-likelihood.

Influence on these runs lives in :class:`unlearn.influence.GANInfluence`.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "MLPGenerator": "models",
    "MLPDiscriminator": "models",
    "DCGenerator": "models",
    "DCDiscriminator": "models",
    "build_model": "models",
    "gan_2d": "models",
    "gan_mnist": "models",
    "GANTrajectory": "training",
    "train_gan": "training",
    "replay": "training",
    "AverageLogLikelihood": "metrics",
    "SampleMetric": "metrics",
    "scott_bandwidth": "metrics",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'unlearn.generative' has no attribute {name!r}")
    return getattr(importlib.import_module(f"unlearn.generative.{_WHERE[name]}"), name)
