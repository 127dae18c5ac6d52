"""Per-sample gradients of Kronecker-structured layers from forward and backward hooks.

For a supported layer (``Linear``, ``Conv2d``, ``Embedding``; see :mod:`.layers`) the gradient
of example ``b``'s loss with respect to its weight matrix is ``DW_b = Σ_t g_bt a_btᵀ``: ``a``
the layer input (a 1 appended for the bias) seen in a forward hook, ``g`` the gradient at the
layer output from ONE ordinary backward pass of the summed per-sample losses (each example's
loss depends on its own outputs only). Keeping ``(a, g)`` instead of ``DW`` costs
``B·T·(d_in + d_out)`` numbers instead of ``B·d_out·d_in``, and lets the estimators rotate
into an eigenbasis (``Q_Gᵀ g`` and ``Q_Aᵀ a``) or take dot products without ever building
the ``[B, P]`` matrix that ``torch.func.vmap`` produces.

The hooks only see what passes through the covered modules, so every batch is checked:
each recorded call must keep the batch in its first dimension, and the summed per-sample
gradients must equal autograd's gradient of the summed loss for each covered weight and bias
(to rounding), and the first example's must equal autograd's on that example alone (which
catches a batch split the wrong way and forwards that mix examples). A weight that is also
used outside its module (tied to another module, ``F.linear(x, self.fc.weight)`` somewhere
else) fails these checks, and so does any other situation the hooks cannot describe;
:func:`capture_layer_grads` then returns ``None`` and callers fall back to vmap, which is
exact for any model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from unlearn.influence.layers import LayerAdapter
from unlearn.tasks import Task

__all__ = ["Capture", "LayerGrads", "capture_layer_grads", "materialise", "batch_coupled"]

_MATERIALISE_ELEMENTS = 1 << 24  # per-sample [c, d_out, d_in] matrices built at once


@dataclass
class _Record:
    activations: Tensor
    output: Tensor
    in_tensor: Tensor | None
    in_version: int
    out_version: int


class Capture:
    """Forward hooks that record each covered layer's activations and output tensor; removed
    on exit, exceptions included. ``clone`` names layers whose input or output the model
    modifies in place (an in-place ReLU after a Linear): those are copied when recorded."""

    def __init__(self, layers: Sequence[LayerAdapter], clone: set[str]) -> None:
        self.layers = list(layers)
        self.clone = clone
        self.records: dict[str, list[_Record]] = {layer.name: [] for layer in self.layers}
        self.handles: list[Any] = []

    def __enter__(self) -> Capture:
        try:
            for layer in self.layers:
                self.handles.append(layer.module.register_forward_hook(self._hook(layer)))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.clear()

    def _hook(self, layer: LayerAdapter) -> Any:
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor | None:
            x = inputs[0] if inputs and isinstance(inputs[0], Tensor) else None
            a = layer.activations(tuple(t.detach() if isinstance(t, Tensor) else t
                                        for t in inputs))
            copy = layer.name in self.clone
            if copy:
                a = a.clone()
            self.records[layer.name].append(_Record(
                a, output, x, x._version if x is not None else 0, output._version))
            return output.clone() if copy else None

        return hook

    def clear(self) -> None:
        for recs in self.records.values():
            recs.clear()

    def stale(self) -> set[str]:
        """Layers whose recorded input or output was later modified in place."""
        out = set()
        for name, recs in self.records.items():
            for r in recs:
                moved_in = r.in_tensor is not None and r.in_tensor._version != r.in_version
                if moved_in or r.output._version != r.out_version:
                    out.add(name)
        return out

    def activations(self, layer: LayerAdapter) -> Tensor:
        """``a`` of every call of ``layer`` in this batch, concatenated along positions."""
        recs = self.records[layer.name]
        if not recs:
            return empty_activations(layer)
        return torch.cat([r.activations for r in recs], dim=1)

    def forward(self, run: Any) -> Any:
        """``run()`` with the hooks recording; redone once with copies if the model modified
        a recorded input or output in place."""
        self.clear()
        outputs = run()
        stale = self.stale()
        if stale:
            self.clone |= stale
            self.clear()
            outputs = run()
        return outputs


def empty_activations(layer: LayerAdapter) -> Tensor:
    if layer.diagonal_a:
        return torch.empty(0, 0, dtype=torch.long)
    w = layer.module.weight
    return w.new_zeros(0, 0, layer.d_in)


@dataclass
class LayerGrads:
    """One layer's per-sample gradient factors for a batch: ``a`` ``[B, T, d_in]`` (token
    ids ``[B, T]`` with -1 for padding for an embedding) and ``g`` ``[B, T, d_out]``, so that
    ``DW_b = Σ_t g_bt a_btᵀ``."""

    a: Tensor
    g: Tensor

    @property
    def positions(self) -> int:
        return int(self.g.shape[1])


def batch_coupled(model: nn.Module) -> bool:
    """True if a module mixes the examples of a batch in the current mode (BatchNorm in
    training mode): one backward pass then does not give per-sample gradients."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
               for m in model.modules())


def capture_layer_grads(
    model: nn.Module,
    task: Task,
    inputs: Any,
    targets: Tensor,
    layers: Sequence[LayerAdapter],
    clone: set[str],
    *,
    query: bool = False,
) -> dict[str, LayerGrads] | None:
    """Per-sample gradient factors of every layer in ``layers`` for one batch (already on the
    model's device and dtype), from one forward and one backward pass; ``None`` if the hooks
    cannot give exact per-sample gradients for this model and batch (see the module
    docstring). ``query=True`` differentiates ``task.query_loss``."""
    if batch_coupled(model) or not all(p.requires_grad for layer in layers
                                       for p in _layer_params(layer)):
        return None
    loss_of = task.query_loss if query else task.per_sample_loss
    with Capture(layers, clone) as capture, torch.enable_grad():
        outputs = capture.forward(lambda: model(inputs))
        if not isinstance(outputs, Tensor) or not outputs.requires_grad:
            return None
        losses = loss_of(outputs, targets)
        B = outputs.shape[0] if outputs.dim() else 0
        if losses.dim() != 1 or losses.shape[0] != B or B == 0:
            return None
        recs = [(layer, r) for layer in layers for r in capture.records[layer.name]]
        if any(r.activations.shape[0] != B or r.output.dim() == 0 or r.output.shape[0] != B
               for _, r in recs):
            return None  # the batch is not the first dimension of some call
        params = [p for layer in layers for p in _layer_params(layer)]
        grads = torch.autograd.grad(losses.sum(), [r.output for _, r in recs] + params,
                                    allow_unused=True)
    out_grads, param_grads = grads[: len(recs)], grads[len(recs):]
    per: dict[str, list[tuple[Tensor, Tensor]]] = {layer.name: [] for layer in layers}
    for (layer, r), gr in zip(recs, out_grads, strict=True):
        g = r.output.new_zeros(r.output.shape) if gr is None else gr.detach()
        per[layer.name].append((r.activations, layer.output_grads(g)))
    result: dict[str, LayerGrads] = {}
    for layer in layers:
        parts = per[layer.name]
        if parts:
            a = torch.cat([p[0] for p in parts], dim=1)
            g = torch.cat([p[1] for p in parts], dim=1)
        else:  # never called: a zero gradient with no positions
            a = empty_activations(layer).new_zeros((B, 0) if layer.diagonal_a
                                                   else (B, 0, layer.d_in))
            g = layer.module.weight.new_zeros(B, 0, layer.d_out)
        if layer.diagonal_a:  # embedding: no gradient reaches padding tokens
            g = g * (a >= 0).unsqueeze(-1).to(g.dtype)
        result[layer.name] = LayerGrads(a, g)
    if not _sums_match(layers, result, param_grads):
        return None
    if not _first_example_matches(model, loss_of, inputs, targets, layers, result, B):
        return None
    return result


def _first_example_matches(model: nn.Module, loss_of: Any, inputs: Any, targets: Tensor,
                           layers: Sequence[LayerAdapter], grads: dict[str, LayerGrads],
                           B: int) -> bool:
    """Example 0's hooked gradient equals autograd's on that example alone. The sum check
    cannot see a wrong split of the batch (a layer run on ``[T, B, d]`` with ``T == B``) or
    a forward that mixes examples; one single-example pass can, for little cost."""

    def first(t: Any) -> Any:
        return t[:1] if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == B else t

    params = [p for layer in layers for p in _layer_params(layer)]
    with torch.enable_grad():
        loss = loss_of(model(tree_map(first, inputs)), first(targets)).sum()
        auto = torch.autograd.grad(loss, params, allow_unused=True)
    i = 0
    for layer in layers:
        pieces = []
        for p in _layer_params(layer):
            pieces.append(torch.zeros_like(p) if auto[i] is None else auto[i].detach())
            i += 1
        want = layer.to_matrix({n: t.unsqueeze(0) for n, t in
                                zip(layer.param_names(), pieces, strict=True)})[0]
        lg = grads[layer.name]
        got = materialise(layer, LayerGrads(lg.a[:1], lg.g[:1]))[0]
        g_norm = lg.g[0].norm(dim=-1)
        a_norm = torch.ones_like(g_norm) if layer.diagonal_a else lg.a[0].norm(dim=-1)
        scale = max(float((g_norm * a_norm).sum()), float(want.norm()), 1e-30)
        if float((got - want).norm()) > 1e4 * torch.finfo(got.dtype).eps * scale:
            return False
    return True


def _layer_params(layer: LayerAdapter) -> list[Tensor]:
    p = [layer.module.weight]
    if layer.has_bias:
        p.append(layer.module.bias)
    return p


def _sums_match(layers: Sequence[LayerAdapter], grads: dict[str, LayerGrads],
                param_grads: Sequence[Tensor | None]) -> bool:
    """Σ_b DW_b equals autograd's gradient of the summed loss for every covered parameter."""
    i = 0
    for layer in layers:
        lg = grads[layer.name]
        total = summed_matrix(layer, lg)  # [d_out, d_in]
        pieces = []
        for p in _layer_params(layer):
            gp = param_grads[i]
            i += 1
            pieces.append(torch.zeros_like(p) if gp is None else gp.detach())
        auto = layer.to_matrix({n: t.unsqueeze(0) for n, t in
                                zip(layer.param_names(), pieces, strict=True)})[0]
        # rounding bound of the sum: Σ_bt |g_bt| |a_bt|
        g_norm = lg.g.norm(dim=-1)
        a_norm = torch.ones_like(g_norm) if layer.diagonal_a else lg.a.norm(dim=-1)
        scale = float((g_norm * a_norm).sum())
        eps = torch.finfo(total.dtype).eps
        if float((total - auto).norm()) > 1e4 * eps * max(scale, float(auto.norm()), 1e-30):
            return False
    return True


def summed_matrix(layer: LayerAdapter, lg: LayerGrads) -> Tensor:
    """``Σ_b DW_b`` as a ``[d_out, d_in]`` matrix."""
    g2 = lg.g.reshape(-1, lg.g.shape[-1])
    if layer.diagonal_a:
        ids = lg.a.reshape(-1)
        valid = ids >= 0
        out = g2.new_zeros(layer.d_in, layer.d_out).index_add_(0, ids[valid], g2[valid])
        return out.T
    a2 = lg.a.reshape(-1, lg.a.shape[-1])
    return g2.T @ a2


def materialise(layer: LayerAdapter, lg: LayerGrads, qg: Tensor | None = None,
                qa: Tensor | None = None) -> Tensor:
    """Per-sample matrices ``[B, d_out, d_in]`` ``= Σ_t g_bt a_btᵀ`` (rotated to
    ``Q_Gᵀ DW Q_A`` when the eigenbases are given; an embedding has no ``Q_A``)."""
    g = lg.g if qg is None else lg.g @ qg
    B, T, d_out = g.shape
    if layer.diagonal_a:
        V = layer.d_in
        out = g.new_zeros(B * V, d_out)
        ids = lg.a
        valid = ids >= 0
        rows = torch.arange(B, device=ids.device).unsqueeze(1).expand_as(ids)
        out.index_add_(0, (rows * V + ids)[valid], g[valid])
        return out.reshape(B, V, d_out).transpose(1, 2)
    a = lg.a if qa is None else lg.a @ qa
    if T == 1:
        return g[:, 0, :, None] * a[:, 0, None, :]
    return g.transpose(1, 2) @ a


def flat_per_sample(layers: Sequence[LayerAdapter], grads: dict[str, LayerGrads],
                    names: Sequence[str]) -> Tensor:
    """The per-sample gradients ``[B, P]`` in the order of ``names`` (which must be exactly
    the parameters of ``layers``), built chunk by chunk from the factors."""
    parts: dict[str, Tensor] = {}
    for layer in layers:
        lg = grads[layer.name]
        B = lg.g.shape[0]
        chunk = max(1, _MATERIALISE_ELEMENTS // max(1, layer.d_out * layer.d_in))
        mats = [materialise(layer, LayerGrads(lg.a[s : s + chunk], lg.g[s : s + chunk]))
                for s in range(0, B, chunk)]
        mat = torch.cat(mats) if mats else lg.g.new_zeros(0, layer.d_out, layer.d_in)
        parts.update(layer.from_matrix(mat))
    return torch.cat([parts[n].reshape(parts[n].shape[0], -1) for n in names], dim=1)
