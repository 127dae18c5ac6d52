"""Layers that Kronecker-factored curvature (K-FAC, EK-FAC) understands.

Each supported module type has a small adapter that knows

* how to turn the module's input into activations ``a`` of shape ``[B, T, d_in]`` (a 1 is
  appended when the layer has a trainable bias) and the gradient at its output into
  ``g`` of shape ``[B, T, d_out]``; ``T`` counts the positions that share the weight (1 for
  ``Linear`` on ``[B, d]``, tokens for ``Linear`` on ``[B, T, d]``, patches for ``Conv2d``);
* how the module's parameters map to one matrix ``[d_out, d_in]`` and back, so that the
  per-sample gradient is ``DW = Σ_t g_t a_tᵀ``.

``Embedding`` is special: its input is a one-hot vector, so the activation covariance is
diagonal (token frequencies) and kept as a vector; :attr:`LayerAdapter.diagonal_a` says so.

New layer types are added with :func:`register_layer`.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "LayerAdapter",
    "LinearAdapter",
    "Conv2dAdapter",
    "EmbeddingAdapter",
    "register_layer",
    "adapter_for",
    "supported_types",
]


class LayerAdapter:
    """How one module of a supported type looks to K-FAC. Subclasses set ``module_type``."""

    module_type: ClassVar[type[nn.Module]] = nn.Module
    #: the activation covariance is diagonal (one-hot inputs) and stored as a vector
    diagonal_a: ClassVar[bool] = False

    def __init__(self, name: str, module: nn.Module) -> None:
        self.name = name
        self.module = module
        bias = getattr(module, "bias", None)
        self.has_bias = isinstance(bias, Tensor) and bias.requires_grad

    # -------------------------------------------------------------- parameters
    def _pname(self, attr: str) -> str:
        return f"{self.name}.{attr}" if self.name else attr

    @property
    def weight_name(self) -> str:
        return self._pname("weight")

    @property
    def bias_name(self) -> str | None:
        return self._pname("bias") if self.has_bias else None

    def param_names(self) -> list[str]:
        return [self.weight_name] + ([self.bias_name] if self.bias_name else [])

    @property
    def d_out(self) -> int:
        return int(self.module.weight.shape[0])

    @property
    def d_in(self) -> int:
        w = self.module.weight
        return int(w[0].numel()) + int(self.has_bias)

    def to_matrix(self, parts: dict[str, Tensor]) -> Tensor:
        """Parameter-shaped tensors ``[k, *shape]`` → matrices ``[k, d_out, d_in]``."""
        w = parts[self.weight_name]
        mat = w.reshape(w.shape[0], self.d_out, -1)
        if self.has_bias:
            mat = torch.cat([mat, parts[self.bias_name].unsqueeze(-1)], dim=-1)
        return mat

    def from_matrix(self, mat: Tensor) -> dict[str, Tensor]:
        """Inverse of :meth:`to_matrix`."""
        k = mat.shape[0]
        shape = self.module.weight.shape
        if self.has_bias:
            return {self.weight_name: mat[..., :-1].reshape(k, *shape),
                    self.bias_name: mat[..., -1]}
        return {self.weight_name: mat.reshape(k, *shape)}

    # -------------------------------------------------------------- hooks' data
    def activations(self, inputs: tuple) -> Tensor:
        """The module's forward inputs → ``a`` of shape ``[B, T, d_in]``."""
        raise NotImplementedError

    def output_grads(self, grad: Tensor) -> Tensor:
        """The gradient at the module's output → ``g`` of shape ``[B, T, d_out]``."""
        raise NotImplementedError

    def _append_one(self, a: Tensor) -> Tensor:
        if not self.has_bias:
            return a
        return torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)

    def check(self) -> None:
        """Raise a ValueError if this module's configuration is not supported."""


class LinearAdapter(LayerAdapter):
    """``nn.Linear`` on ``[B, d]`` or ``[B, *, d]`` (all middle positions share the weight)."""

    module_type = nn.Linear

    def activations(self, inputs: tuple) -> Tensor:
        x = inputs[0]
        if x.dim() < 2:
            raise ValueError(f"layer {self.name!r}: K-FAC needs a batch dimension, got an input "
                             f"of shape {tuple(x.shape)}")
        return self._append_one(x.reshape(x.shape[0], -1, x.shape[-1]))

    def output_grads(self, grad: Tensor) -> Tensor:
        return grad.reshape(grad.shape[0], -1, grad.shape[-1])


class Conv2dAdapter(LayerAdapter):
    """``nn.Conv2d`` with ``groups=1``; patches unfolded with the layer's stride, padding
    (any ``padding_mode``, ``"same"`` included) and dilation."""

    module_type = nn.Conv2d

    def check(self) -> None:
        conv: nn.Conv2d = self.module  # type: ignore[assignment]
        if conv.groups != 1:
            raise ValueError(
                f"layer {self.name!r} is a Conv2d with groups={conv.groups}; K-FAC supports "
                "groups=1 only. Leave it out with modules=[...] (its parameters then get no "
                "influence) or use CG/Arnoldi influence"
            )

    def activations(self, inputs: tuple) -> Tensor:
        conv: nn.Conv2d = self.module  # type: ignore[assignment]
        x = inputs[0]
        if x.dim() != 4:
            raise ValueError(f"layer {self.name!r}: K-FAC needs Conv2d inputs [B, C, H, W], got "
                             f"{tuple(x.shape)}")
        pad = getattr(conv, "_reversed_padding_repeated_twice", None)
        if pad is None:  # older torch: only numeric, zero padding
            ph, pw = conv.padding  # type: ignore[misc]
            pad = [pw, pw, ph, ph]
        if any(p != 0 for p in pad):
            mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
            x = F.pad(x, list(pad), mode=mode)
        patches = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=0,
                           stride=conv.stride)  # [B, C*kh*kw, L]
        return self._append_one(patches.transpose(1, 2))

    def output_grads(self, grad: Tensor) -> Tensor:
        return grad.reshape(grad.shape[0], grad.shape[1], -1).transpose(1, 2)


class EmbeddingAdapter(LayerAdapter):
    """``nn.Embedding``: the input is a one-hot token, so ``a`` is the token id (``[B, T]``,
    padding tokens set to -1) and the activation covariance is the diagonal of token
    frequencies. The weight ``[V, d]`` is the transpose of its ``[d_out=d, d_in=V]`` matrix."""

    module_type = nn.Embedding
    diagonal_a = True

    def __init__(self, name: str, module: nn.Module) -> None:
        super().__init__(name, module)
        self.has_bias = False

    def check(self) -> None:
        if self.module.max_norm is not None:
            raise ValueError(
                f"layer {self.name!r} is an Embedding with max_norm={self.module.max_norm}, "
                "which rescales rows inside the forward pass; K-FAC does not support it"
            )

    @property
    def d_out(self) -> int:
        return int(self.module.weight.shape[1])

    @property
    def d_in(self) -> int:
        return int(self.module.weight.shape[0])

    def to_matrix(self, parts: dict[str, Tensor]) -> Tensor:
        return parts[self.weight_name].transpose(1, 2)

    def from_matrix(self, mat: Tensor) -> dict[str, Tensor]:
        return {self.weight_name: mat.transpose(1, 2)}

    def activations(self, inputs: tuple) -> Tensor:
        ids = inputs[0]
        if ids.dim() < 1:
            raise ValueError(f"layer {self.name!r}: K-FAC needs a batch of token ids, got a "
                             "scalar")
        ids = ids.reshape(ids.shape[0], -1).long()
        pad = self.module.padding_idx
        if pad is not None:
            ids = torch.where(ids == pad, torch.full_like(ids, -1), ids)
        return ids

    def output_grads(self, grad: Tensor) -> Tensor:
        return grad.reshape(grad.shape[0], -1, grad.shape[-1])


_REGISTRY: dict[type[nn.Module], type[LayerAdapter]] = {}


def register_layer(adapter: type[LayerAdapter]) -> type[LayerAdapter]:
    """Register an adapter for ``adapter.module_type`` (usable as a class decorator)."""
    if not (isinstance(adapter, type) and issubclass(adapter, LayerAdapter)):
        raise TypeError(f"register_layer expects a LayerAdapter subclass, got {adapter!r}")
    _REGISTRY[adapter.module_type] = adapter
    return adapter


for _cls in (LinearAdapter, Conv2dAdapter, EmbeddingAdapter):
    register_layer(_cls)


def supported_types() -> list[str]:
    return [t.__name__ for t in _REGISTRY]


def adapter_for(name: str, module: nn.Module) -> LayerAdapter | None:
    """The adapter for ``module`` (its exact type, else the nearest registered base class
    whose ``forward`` it does not override), or ``None`` if its type is not supported."""
    for cls in type(module).__mro__:
        if cls in _REGISTRY:
            if type(module).forward is not cls.forward:
                return None  # a subclass computing something else; its maths is unknown
            return _REGISTRY[cls](name, module)
    return None
