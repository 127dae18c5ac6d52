"""Gauss-Newton products for many vectors at once from layer factors (Linear / Conv2d models).

For a model whose parameters all sit in Linear / Conv2d layers, the Gauss-Newton matrix of
one example is ``Σ_k (J_bᵀ r_bk)(J_bᵀ r_bk)ᵀ`` with ``r_bk`` the columns of a square root of
the example's output Hessian. Back-propagating each ``r_bk`` gives, at every layer, the
gradient ``g_bkt`` at the layer's output (``t`` the positions sharing the weight), and with
``a_bt`` the layer's input (a 1 appended for the bias), the derivative of ``r_bkᵀ f(x_b)``
along a weight direction ``V_l`` is ``Σ_t g_bktᵀ V_l a_bt``. So for k vectors ``V``:

* ``c_bkj = Σ_l Σ_t g_bktᵀ V_jl a_bt``: one GEMM per layer (``a @ V_lᵀ`` for all j at
  once) and a small batched product with ``g``;
* ``(G V)_jl = Σ_b Σ_t (Σ_k c_bkj g_bkt) a_btᵀ``: again a small batched product and one
  GEMM per layer.

``a`` and ``g`` depend on the data and weights only, not on ``V``: they are computed once per
batch (one forward pass, the output Hessian's square root, one batched backward pass) and
kept between products while they fit in :data:`CACHE_BYTES`, so the passes of CG, Arnoldi or
LiSSA cost two GEMMs per layer each. Every batch's factors come from the hooks of
:mod:`unlearn.influence.hook_grads`, whose per-sample gradients are checked against
autograd; where the hooks cannot describe the model (another layer type, weights used
outside their module, too many outputs), :func:`layer_ggn_factors` returns ``None`` and the
caller uses ``torch.func`` instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from unlearn.influence.layers import LayerAdapter
from unlearn.tasks import Task

__all__ = ["LayerFactors", "layer_ggn_factors", "layer_ggn_product", "merge_factors",
           "CACHE_BYTES"]

#: factors of all batches kept between products up to this many bytes (else recomputed)
CACHE_BYTES = 256 * 2**20
#: elements of the ``[B, T, k, d_out]`` intermediate built at once (vectors are chunked)
_CHUNK_ELEMENTS = 1 << 24


@dataclass
class LayerFactors:
    """One batch's Gauss-Newton factors: per layer ``a [B, T, d_in]`` and
    ``g [B, K, T·d_out]`` (K square-root columns of the output Hessian)."""

    a: list[Tensor]
    g: list[Tensor]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.a, *self.g])


def layer_ggn_factors(model: nn.Module, task: Task, layers: Sequence[LayerAdapter],
                      inputs: Any, targets: Tensor, clone: set[str],
                      max_outputs: int = 256) -> LayerFactors | None:
    """The factors of one batch (already on the model's device and dtype), or ``None`` where
    the hooks cannot give the exact Gauss-Newton matrix: an embedding, per-sample gradients
    that fail autograd's check, more than ``max_outputs`` outputs per example."""
    from unlearn.influence.ekfac import _backward, _collect, _hessian_sqrt
    from unlearn.influence.hook_grads import Capture, capture_layer_grads

    if any(layer.diagonal_a for layer in layers):
        return None
    # the hooks must describe this model exactly (weights used only inside their module,
    # the batch in the first dimension): checked against autograd on the plain loss
    if capture_layer_grads(model, task, inputs, targets, layers, clone) is None:
        return None
    with Capture(layers, clone) as capture, torch.enable_grad():
        outputs = capture.forward(lambda: model(inputs))
        if not isinstance(outputs, Tensor) or outputs.dim() == 0:
            return None
        if outputs[0].numel() > max_outputs:
            return None
        o = outputs.detach().requires_grad_(True)
        R = _hessian_sqrt(task, o, targets, max_outputs)  # [K, *outputs.shape]
        acts = {layer.name: capture.activations(layer) for layer in layers}
        outs = [(layer, rec.output) for layer in layers for rec in capture.records[layer.name]]
        grads = _backward(outputs, [t for _, t in outs], R)
        g = _collect(list(layers), outs, grads, acts)  # [K, B, T, d_out]
    B, K = outputs.shape[0], R.shape[0]
    return LayerFactors(
        a=[acts[layer.name] for layer in layers],
        g=[g[layer.name].permute(1, 0, 2, 3).reshape(B, K, -1) for layer in layers])


def merge_factors(batches: list[LayerFactors]) -> list[LayerFactors]:
    """The batches' factors as one batch (fewer, larger GEMMs per product) where every layer
    has the same positions in all of them; else unchanged. The number of square-root columns
    K may differ between batches (the output Hessian's square root leaves out the columns
    that are zero for the whole batch): the smaller ones are padded with zero columns, which
    add nothing to any product."""
    if len(batches) < 2:
        return batches
    first = batches[0]
    same = all(x.shape[1:] == y.shape[1:] for f in batches[1:]
               for x, y in zip(f.a, first.a, strict=True)) and \
        all(x.shape[2:] == y.shape[2:] for f in batches[1:]
            for x, y in zip(f.g, first.g, strict=True))
    if not same:
        return batches
    K = max(f.g[0].shape[1] for f in batches)
    return [LayerFactors(
        a=[torch.cat(ts) for ts in zip(*(f.a for f in batches), strict=True)],
        g=[torch.cat([t if t.shape[1] == K else nn.functional.pad(t, (0, 0, 0, K - t.shape[1]))
                      for t in ts])
           for ts in zip(*(f.g for f in batches), strict=True)])]


def layer_ggn_product(layers: Sequence[LayerAdapter], f: LayerFactors,
                      mats: Sequence[Tensor]) -> list[Tensor]:
    """``Σ_b G_b V`` for one batch: ``mats[l]`` is layer l's part of the k vectors as
    ``[k, d_out, d_in]`` matrices; returns the products in the same shapes."""
    k = mats[0].shape[0]
    B = f.a[0].shape[0]
    size = max(a.shape[1] * layer.d_out for layer, a in zip(layers, f.a, strict=True))
    step = max(1, _CHUNK_ELEMENTS // max(1, B * size))
    if step < k:
        parts = [layer_ggn_product(layers, f, [m[s : s + step] for m in mats])
                 for s in range(0, k, step)]
        return [torch.cat(p) for p in zip(*parts, strict=True)]
    c = None  # [B, K, k]: r_bkᵀ J_b v_j
    for layer, a, g, m in zip(layers, f.a, f.g, mats, strict=True):
        T = a.shape[1]
        ds = (a.reshape(B * T, -1) @ m.reshape(k * layer.d_out, -1).T)  # [B·T, k·d_out]
        ds = ds.view(B, T, k, layer.d_out).transpose(2, 3).reshape(B, T * layer.d_out, k)
        term = torch.bmm(g, ds)
        c = term if c is None else c + term
    assert c is not None
    cT = c.transpose(1, 2)  # [B, k, K]
    out = []
    for layer, a, g in zip(layers, f.a, f.g, strict=True):
        T = a.shape[1]
        w = torch.bmm(cT, g)  # [B, k, T·d_out]
        w = w.view(B, k, T, layer.d_out).transpose(1, 2).reshape(B * T, k * layer.d_out)
        prod = a.reshape(B * T, -1).T @ w  # [d_in, k·d_out]
        out.append(prod.T.reshape(k, layer.d_out, -1))
    return out
