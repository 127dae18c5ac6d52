"""Gradients in a flat parameter space: per-sample gradients, mean gradients and
curvature-vector products (Hessian or Gauss-Newton) over a loader.

Everything here streams over a loader batch by batch, so memory is bounded by one batch of
per-sample gradients ``[B, P]``, never ``[n_train, P]``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vmap
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.data import DataLoader, RandomSampler

from unlearn.tasks import Task


@dataclass(frozen=True)
class ParamSpace:
    """An ordered selection of a model's parameters, flattened into one vector."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @classmethod
    def of(cls, model: nn.Module, names: Sequence[str] | None = None) -> ParamSpace:
        params = dict(model.named_parameters())
        if names is None:
            names = [n for n, p in params.items() if p.requires_grad]
        unknown = [n for n in names if n not in params]
        if unknown:
            raise KeyError(f"unknown parameter names {unknown[:5]}; the model has {list(params)}")
        if not names:
            raise ValueError("the model has no trainable parameters to compute influence on")
        return cls(tuple(names), tuple(params[n].shape for n in names))

    @property
    def numel(self) -> int:
        return sum(s.numel() for s in self.shapes)

    def params(self, model: nn.Module) -> dict[str, Tensor]:
        named = dict(model.named_parameters())
        return {n: named[n].detach() for n in self.names}

    def flatten(self, tensors: dict[str, Tensor], batch_dims: int = 0) -> Tensor:
        parts = []
        for n in self.names:
            t = tensors[n]
            parts.append(t.reshape(*t.shape[:batch_dims], -1))
        return torch.cat(parts, dim=-1)

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """Split ``[..., P]`` into named tensors ``[..., *shape]``."""
        if flat.shape[-1] != self.numel:
            raise ValueError(
                f"vector has {flat.shape[-1]} entries but the parameter space has {self.numel}"
            )
        out, start = {}, 0
        lead = flat.shape[:-1]
        for n, s in zip(self.names, self.shapes, strict=True):
            out[n] = flat[..., start : start + s.numel()].reshape(*lead, *s)
            start += s.numel()
        return out

    def slices(self) -> dict[str, slice]:
        out, start = {}, 0
        for n, s in zip(self.names, self.shapes, strict=True):
            out[n] = slice(start, start + s.numel())
            start += s.numel()
        return out


def model_dtype_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    p = next(model.parameters())
    return p.dtype, p.device


def to_model(batch: Any, model: nn.Module) -> Any:
    """Move a batch to the model's device; cast floating tensors to the model's dtype."""
    dtype, device = model_dtype_device(model)

    def move(t: Any) -> Any:
        if isinstance(t, Tensor):
            t = t.to(device)
            return t.to(dtype) if t.is_floating_point() else t
        return t

    return tree_map(move, batch)


def check_loader(loader: DataLoader, what: str, ordered: bool = True) -> None:
    """Clear errors for loaders the estimators cannot use."""
    if not isinstance(loader, DataLoader):
        raise TypeError(f"{what} must be a torch.utils.data.DataLoader, got {type(loader)}")
    if ordered and isinstance(loader.sampler, RandomSampler):
        raise ValueError(
            f"{what} shuffles (RandomSampler); score columns follow the loader's order, so "
            "build it with shuffle=False"
        )
    try:
        n = len(loader.dataset)  # type: ignore[arg-type]
    except TypeError:
        return
    if n == 0:
        raise ValueError(f"{what} is empty: its dataset has no examples")


def all_finite(t: Tensor) -> bool:
    """Whether ``t`` has no NaN or inf, by one float64 reduction (a NaN or inf anywhere makes
    the sum non-finite; float32 or smaller values cannot overflow a float64 sum): several
    times faster than ``isfinite(t).all()``, which it falls back to for float64 tensors."""
    if t.dtype == torch.float64 or not t.is_floating_point():
        return bool(torch.isfinite(t).all())
    return bool(torch.isfinite(t.sum(dtype=torch.float64)))


def check_finite_batch(batch: Any) -> None:
    """Raise a ValueError if any floating tensor of a batch holds NaN or inf."""
    leaves = [t for t in tree_flatten(batch)[0] if isinstance(t, Tensor) and t.is_floating_point()]
    for i, t in enumerate(leaves):
        if not all_finite(t):
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(
                f"a batch holds NaN or inf: {bad} non-finite value(s) in its floating tensor "
                f"#{i} of shape {tuple(t.shape)}; clean the data before computing influence"
            )


def _single(x: Any) -> Any:
    return tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, x)


def per_sample_grads(
    model: nn.Module,
    task: Task,
    batch: Any,
    space: ParamSpace,
    *,
    targets: Tensor | None = None,
    query: bool = False,
    hooks: bool = True,
) -> Tensor:
    """Per-sample gradients of the loss, ``[B, P]`` in ``space``'s order.

    ``targets`` replaces the batch's own targets (sampled labels for the true Fisher);
    ``query=True`` differentiates ``task.query_loss`` instead of the training loss.

    When every parameter of ``space`` belongs to a supported layer (Linear, Conv2d,
    Embedding), the gradients come from layer hooks and one ordinary backward pass
    (:mod:`unlearn.influence.hook_grads`), checked against autograd on every batch;
    otherwise, or with ``hooks=False``, from ``torch.func.vmap`` over the examples.
    """
    batch = to_model(batch, model)
    check_finite_batch(batch)
    inputs, batch_targets = task.split_batch(batch)
    if targets is None:
        targets = batch_targets
    if hooks:
        flat = _hooked_per_sample_grads(model, task, inputs, targets, space, query)
        if flat is not None:
            check_finite_grads(flat)
            return flat
    params = space.params(model)
    loss_of = task.query_loss if query else task.per_sample_loss

    def loss_one(p: dict[str, Tensor], x: Any, y: Tensor) -> Tensor:
        out = functional_call(model, p, (_single(x),))
        return loss_of(out, _single(y)).sum()

    grads = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, inputs, targets)
    flat = space.flatten(grads, batch_dims=1)
    check_finite_grads(flat)
    return flat


def check_finite_grads(flat: Tensor) -> None:
    """A clear error where per-sample gradients hold NaN or inf (see :func:`all_finite`)."""
    if not all_finite(flat):
        raise FloatingPointError(
            "per-sample gradients contain NaN or inf: check the model weights and inputs"
        )


# layers whose input or output the model modifies in place, remembered per model so that
# the hooks copy them from the first forward pass on
_CLONE: weakref.WeakKeyDictionary[nn.Module, set[str]] = weakref.WeakKeyDictionary()


def space_layers(model: nn.Module, space: ParamSpace) -> list[Any] | None:
    """The supported layers (``unlearn.influence.layers`` adapters) whose parameters make up
    exactly ``space``, or ``None`` if some parameter of the space belongs to no supported
    layer (or a layer's bias is in the space without its weight)."""
    from unlearn.influence.layers import adapter_for

    wanted = set(space.names)
    layers, covered = [], set()
    for name, module in model.named_modules():
        own = {f"{name}.{n}" if name else n for n, _ in module.named_parameters(recurse=False)}
        mine = own & wanted - covered
        if not mine:
            continue
        layer = adapter_for(name, module)
        if layer is None or layer.weight_name not in mine:
            return None
        try:
            layer.check()
        except ValueError:
            return None
        layer.has_bias = layer.bias_name is not None and layer.bias_name in mine
        if set(layer.param_names()) != mine:
            return None
        layers.append(layer)
        covered |= mine
    return layers if covered == wanted else None


def _hooked_per_sample_grads(model: nn.Module, task: Task, inputs: Any, targets: Tensor,
                             space: ParamSpace, query: bool) -> Tensor | None:
    """Per-sample gradients from layer hooks (one backward pass), or ``None`` where they
    cannot be exact (see :mod:`unlearn.influence.hook_grads`)."""
    from unlearn.influence.hook_grads import capture_layer_grads, flat_per_sample

    layers = space_layers(model, space)
    if layers is None:
        return None
    clone = _CLONE.setdefault(model, set())
    grads = capture_layer_grads(model, task, inputs, targets, layers, clone, query=query)
    if grads is None:
        return None
    return flat_per_sample(layers, grads, space.names)


def iter_grads(
    model: nn.Module,
    task: Task,
    loader: DataLoader,
    space: ParamSpace,
    *,
    query: bool = False,
    progress: Callable[[Iterator], Iterator] | None = None,
) -> Iterator[Tensor]:
    """Yield per-sample gradient chunks ``[B, P]`` batch by batch."""
    batches = iter(loader) if progress is None else progress(iter(loader))
    for batch in batches:
        yield per_sample_grads(model, task, batch, space, query=query)


def mean_loss(model: nn.Module, task: Task, loader: DataLoader) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in loader:
            losses = task.loss(model, to_model(batch, model))
            total += float(losses.sum())
            count += losses.shape[0]
    return total / max(count, 1)


def curvature_product(
    model: nn.Module,
    task: Task,
    loader: DataLoader,
    space: ParamSpace,
    mode: str = "hessian",
) -> Callable[[Tensor], Tensor]:
    """Return ``V[k, P] -> C V`` with C the Hessian (``"hessian"``) or generalised
    Gauss-Newton (``"ggn"``) of the *mean* training loss over ``loader``.

    Each call is one pass over the loader; the k vectors are handled together with vmap.
    The Gauss-Newton products of a model made of Linear / Conv2d layers take the layer path
    of :mod:`unlearn.influence.layer_ggn` instead (two GEMMs per layer and batch for all k
    vectors): its per-batch factors are computed on the first call and, while they fit in
    ``layer_ggn.CACHE_BYTES``, kept for later calls, which then do not read the loader again
    (the curvature is that of the data as the first call saw it; a change of the weights
    discards the factors).
    """
    if mode not in ("hessian", "ggn"):
        raise ValueError(f"curvature mode must be 'hessian' or 'ggn', got {mode!r}")
    params = space.params(model)
    n_total = len(loader.dataset)  # type: ignore[arg-type]
    layered = _LayeredGGN(model, task, space) if mode == "ggn" else None

    def product(vectors: Tensor) -> Tensor:
        squeeze = vectors.dim() == 1
        V = vectors.unsqueeze(0) if squeeze else vectors
        if layered is not None:
            cached = layered.cached_product(V)
            if cached is not None:
                cached /= n_total
                return cached[0] if squeeze else cached
            layered.start_pass()
        out = torch.zeros_like(V)
        tangents = space.unflatten(V)
        for raw in loader:
            batch = to_model(raw, model)
            check_finite_batch(batch)
            inputs, targets = task.split_batch(batch)
            if mode == "hessian":

                def total_loss(p: dict[str, Tensor], inputs: Any = inputs, y: Tensor = targets):
                    return task.per_sample_loss(functional_call(model, p, (inputs,)), y).sum()

                def hvp(t: dict[str, Tensor], f: Callable = total_loss) -> Tensor:
                    g = jvp(grad(f), (params,), (t,))[1]
                    return space.flatten(g)

                out += vmap(hvp)(tangents)
            else:
                got = None if layered is None else layered.batch_product(inputs, targets, V)
                if got is None:
                    got = _ggn_batch(model, task, params, space, inputs, targets, tangents)
                out += got
        if layered is not None:
            layered.end_pass()
        out /= n_total
        return out[0] if squeeze else out

    return product


def _ggn_batch(
    model: nn.Module,
    task: Task,
    params: dict[str, Tensor],
    space: ParamSpace,
    inputs: Any,
    targets: Tensor,
    tangents: dict[str, Tensor],
) -> Tensor:
    """Sum over the batch of J^T H_out J v, vmapped over the tangents."""

    def outputs_of(p: dict[str, Tensor]) -> Tensor:
        return functional_call(model, p, (inputs,))

    out0 = outputs_of(params).detach()

    def loss_of_out(o: Tensor) -> Tensor:
        return task.per_sample_loss(o, targets).sum()

    def ggn_vp(t: dict[str, Tensor]) -> Tensor:
        _, jv = jvp(outputs_of, (params,), (t,))
        hjv = jvp(grad(loss_of_out), (out0,), (jv,))[1]
        _, vjp_fn = torch.func.vjp(outputs_of, params)
        return space.flatten(vjp_fn(hjv)[0])

    return vmap(ggn_vp)(tangents)


class _LayeredGGN:
    """Gauss-Newton products over a loader from layer factors, with the factors of every
    batch kept between passes while they fit in ``CACHE_BYTES`` (see
    :mod:`unlearn.influence.layer_ggn`)."""

    def __init__(self, model: nn.Module, task: Task, space: ParamSpace) -> None:
        self.model, self.task, self.space = model, task, space
        self.layers = space_layers(model, space)
        self.cache: list[Any] | None = None  # every batch's factors after a complete pass
        self._pass: list[Any] | None = None
        self._bytes = 0
        self._stamp = self._versions()

    def _versions(self) -> tuple[int, ...]:
        named = dict(self.model.named_parameters())
        return tuple(named[n]._version for n in self.space.names)

    def _valid(self) -> bool:
        if self._versions() != self._stamp:  # the weights changed in place: refit factors
            self.cache, self._stamp = None, self._versions()
        return self.layers is not None

    def start_pass(self) -> None:
        self._pass, self._bytes = ([] if self._valid() else None), 0

    def end_pass(self) -> None:
        from unlearn.influence.layer_ggn import merge_factors

        if self._pass is not None:
            self.cache = merge_factors(self._pass)
        self._pass = None

    def cached_product(self, V: Tensor) -> Tensor | None:
        """``Σ_b G_b V`` from the kept factors, or ``None`` if there are none."""
        if not self._valid() or self.cache is None:
            return None
        out = torch.zeros_like(V)
        for f in self.cache:
            out += self._apply(f, V)
        return out

    def batch_product(self, inputs: Any, targets: Tensor, V: Tensor) -> Tensor | None:
        """``Σ_b G_b V`` over one batch, or ``None`` where the layer path does not apply."""
        from unlearn.influence.layer_ggn import CACHE_BYTES, layer_ggn_factors

        if self.layers is None:
            return None
        clone = _CLONE.setdefault(self.model, set())
        f = layer_ggn_factors(self.model, self.task, self.layers, inputs, targets, clone)
        if f is None:
            self._pass = None  # this pass is not all layers: keep nothing
            return None
        if self._pass is not None:
            self._bytes += f.nbytes
            if self._bytes <= CACHE_BYTES:
                self._pass.append(f)
            else:
                self._pass = None
        return self._apply(f, V)

    def _apply(self, f: Any, V: Tensor) -> Tensor:
        from unlearn.influence.layer_ggn import layer_ggn_product

        assert self.layers is not None
        parts = self.space.unflatten(V)
        mats = [layer.to_matrix(parts) for layer in self.layers]
        prods = layer_ggn_product(self.layers, f, mats)
        named: dict[str, Tensor] = {}
        for layer, p in zip(self.layers, prods, strict=True):
            named.update(layer.from_matrix(p))
        return self.space.flatten(named, batch_dims=1)
