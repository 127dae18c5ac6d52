"""Small generators and discriminators for influence experiments on GANs.

Two families, both free of batch normalisation on purpose: batch statistics would couple the
samples of a batch, so leaving one real instance out would change the loss of every other
instance, and the per-instance influence would no longer be a clean derivative.

- ``MLPGenerator`` / ``MLPDiscriminator``: the fully connected 2-D GAN of the influence-for-GANs
  paper (latent → ReLU hidden layers → 2-D point; 2-D point → ReLU hidden layers → logit).
- ``DCGenerator`` / ``DCDiscriminator``: a small DCGAN-style pair for 28×28 single-channel
  images (MNIST) that trains in a few CPU minutes.

``build_model(spec)`` rebuilds a module from the plain ``spec`` dict that every model here
carries (``model.spec``); trajectories store these specs so they can be reloaded without code.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "MLPGenerator",
    "MLPDiscriminator",
    "DCGenerator",
    "DCDiscriminator",
    "build_model",
    "gan_2d",
    "gan_mnist",
]


def _check_positive(**values: int) -> None:
    for name, v in values.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")


def _mlp(sizes: list[int], bias: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for k in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[k], sizes[k + 1], bias=bias))
        if k < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class MLPGenerator(nn.Module):
    """Latent ``[B, latent_dim]`` → point ``[B, out_dim]`` through ReLU hidden layers."""

    def __init__(
        self,
        latent_dim: int = 10,
        hidden: int = 32,
        layers: int = 1,
        out_dim: int = 2,
        bias: bool = True,
    ) -> None:
        super().__init__()
        _check_positive(latent_dim=latent_dim, hidden=hidden, layers=layers, out_dim=out_dim)
        self.latent_dim = latent_dim
        self.latent_shape = (latent_dim,)
        self.spec: dict[str, Any] = {
            "kind": "mlp_generator",
            "latent_dim": latent_dim,
            "hidden": hidden,
            "layers": layers,
            "out_dim": out_dim,
            "bias": bias,
        }
        self.net = _mlp([latent_dim] + [hidden] * layers + [out_dim], bias)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)


class MLPDiscriminator(nn.Module):
    """Point ``[B, in_dim]`` → logit ``[B]`` through ReLU hidden layers."""

    def __init__(self, in_dim: int = 2, hidden: int = 64, layers: int = 1, bias: bool = True):
        super().__init__()
        _check_positive(in_dim=in_dim, hidden=hidden, layers=layers)
        self.spec: dict[str, Any] = {
            "kind": "mlp_discriminator",
            "in_dim": in_dim,
            "hidden": hidden,
            "layers": layers,
            "bias": bias,
        }
        self.net = _mlp([in_dim] + [hidden] * layers + [1], bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.reshape(len(x), -1)).squeeze(-1)


class DCGenerator(nn.Module):
    """Latent ``[B, latent_dim]`` → image ``[B, 1, 28, 28]``.

    Linear to a ``2w × 7 × 7`` map, then two stride-2 transposed convolutions (7 → 14 → 28).
    ``output``: ``"sigmoid"`` (images in (0, 1)) or ``"linear"`` (unbounded; clamp to [0, 1]
    for display). With plain SGD the sigmoid output tends to saturate at black early (its
    gradient vanishes there); the linear output keeps G's gradient alive.
    """

    def __init__(
        self, latent_dim: int = 32, width: int = 16, output: str = "sigmoid", norm: bool = True
    ) -> None:
        super().__init__()
        _check_positive(latent_dim=latent_dim, width=width)
        if output not in ("sigmoid", "linear"):
            raise ValueError(f"output must be 'sigmoid' or 'linear', got {output!r}")
        self.output = output
        self.latent_dim = latent_dim
        self.latent_shape = (latent_dim,)
        self.width = width
        self.spec: dict[str, Any] = {
            "kind": "dc_generator",
            "latent_dim": latent_dim,
            "width": width,
            "output": output,
            "norm": norm,
        }
        self.fc = nn.Linear(latent_dim, 2 * width * 7 * 7)
        self.up1 = nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1)
        self.up2 = nn.ConvTranspose2d(width, 1, 4, stride=2, padding=1)
        # group normalisation works per sample, so it keeps instances independent (unlike
        # batch normalisation) while steadying SGD training
        self.norm1 = nn.GroupNorm(min(8, 2 * width), 2 * width) if norm else nn.Identity()
        self.norm2 = nn.GroupNorm(min(8, width), width) if norm else nn.Identity()

    def forward(self, z: Tensor) -> Tensor:
        h = torch.relu(self.norm1(self.fc(z).reshape(len(z), 2 * self.width, 7, 7)))
        h = torch.relu(self.norm2(self.up1(h)))
        out = self.up2(h)
        return torch.sigmoid(out) if self.output == "sigmoid" else out


class DCDiscriminator(nn.Module):
    """Image ``[B, 1, 28, 28]`` (or ``[B, 784]``) → logit ``[B]``: two stride-2 convolutions
    with leaky ReLU (28 → 14 → 7), then a linear layer."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        _check_positive(width=width)
        self.spec: dict[str, Any] = {"kind": "dc_discriminator", "width": width}
        self.conv1 = nn.Conv2d(1, width, 4, stride=2, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 4, stride=2, padding=1)
        self.fc = nn.Linear(2 * width * 7 * 7, 1)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:
            x = x.reshape(len(x), 1, 28, 28)
        if x.shape[1:] != (1, 28, 28):
            raise ValueError(f"DCDiscriminator expects [B, 1, 28, 28] images, got {tuple(x.shape)}")
        h = nn.functional.leaky_relu(self.conv1(x), 0.2)
        h = nn.functional.leaky_relu(self.conv2(h), 0.2)
        return self.fc(h.flatten(1)).squeeze(-1)


_BUILDERS: dict[str, type[nn.Module]] = {
    "mlp_generator": MLPGenerator,
    "mlp_discriminator": MLPDiscriminator,
    "dc_generator": DCGenerator,
    "dc_discriminator": DCDiscriminator,
}


def build_model(spec: dict[str, Any], dtype: torch.dtype = torch.float32) -> nn.Module:
    """A fresh module from a ``spec`` dict (``model.spec``); weights are newly initialised."""
    if not isinstance(spec, dict) or "kind" not in spec:
        raise ValueError(f"a model spec must be a dict with a 'kind' key, got {spec!r}")
    kind = spec["kind"]
    if kind not in _BUILDERS:
        raise ValueError(f"unknown model kind {kind!r}; known: {sorted(_BUILDERS)}")
    kwargs = {k: v for k, v in spec.items() if k != "kind"}
    return _BUILDERS[kind](**kwargs).to(dtype)


def gan_2d(
    latent_dim: int = 10,
    hidden_g: int = 32,
    hidden_d: int = 64,
    layers: int = 1,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> tuple[MLPGenerator, MLPDiscriminator]:
    """The paper's 2-D pair (defaults: z in R^10, G hidden 32, D hidden 64, one hidden layer
    each), initialised from ``seed``; float64 by default, as small-step influence checks need."""
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG alone
        torch.manual_seed(seed)
        g = MLPGenerator(latent_dim, hidden_g, layers, out_dim=2).to(dtype)
        d = MLPDiscriminator(2, hidden_d, layers).to(dtype)
    return g, d


def gan_mnist(
    latent_dim: int = 32,
    width: int = 16,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    output: str = "sigmoid",
    norm: bool = True,
) -> tuple[DCGenerator, DCDiscriminator]:
    """A small DCGAN-style pair for 28×28 MNIST, initialised from ``seed``.

    Measured recipe (5,000 t10k digits, 2-core CPU): ``train_gan(g, d, data, epochs=10,
    batch_size=64, lr_d=0.02, lr_g=0.02, momentum=0.5)`` takes about 40 s and gives digit-like
    strokes. Without the generator's group normalisation, SGD (with or without momentum 0.5,
    lr 0.01-0.05) collapsed to black images in our runs.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        g = DCGenerator(latent_dim, width, output, norm).to(dtype)
        return g, DCDiscriminator(width).to(dtype)
