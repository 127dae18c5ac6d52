"""K-FAC and EK-FAC influence: Kronecker-factored curvature, layer by layer.

For a layer whose per-sample gradient is ``DW = Σ_t g_t a_tᵀ`` (``a`` the layer input with a 1
for the bias, ``g`` the gradient at its output, ``t`` the positions sharing the weight), the
Fisher / Gauss-Newton block of the *mean* training loss is approximated by ``A ⊗ G`` with

* ``A = E[a aᵀ]`` averaged over all positions of all examples, and
* ``G = (1/N) Σ_i Σ_t E_y[g_t g_tᵀ]``, summed over an example's positions and averaged over
  the N examples, ``g`` from backpropagating the per-sample loss at targets ``y``,

so that ``A ⊗ G`` has the scale of the curvature of the mean loss and ``damping`` means what
it means for :class:`~unlearn.influence.ExactInfluence`. With ``A = Q_A diag(λ_A) Q_Aᵀ`` and
``G = Q_G diag(λ_G) Q_Gᵀ`` (float64 ``eigh``), K-FAC uses the eigenvalues
``Λ = λ_G λ_Aᵀ`` and EK-FAC (George et al. 2018; Grosse et al. 2023) replaces them by the
exact second moments of the per-sample gradients in that eigenbasis,
``Λ[i, j] = (1/N) Σ_n E_y[(Q_Gᵀ DW_n Q_A)[i, j]²]``, one more pass over the data.
``(H + λI)⁻¹`` is then ``Q_G [(Q_Gᵀ V Q_A) / (Λ + λ)] Q_Aᵀ`` per layer.

Targets ``y``: ``fisher="true"`` samples them from the model (``task.sample_targets``, seeded;
``n_samples`` draws per example), ``"empirical"`` uses the data's labels, ``"exact"`` takes
the expectation exactly by backpropagating the columns of a square root of the per-sample
output Hessian (for cross-entropy: every class weighted by its probability), which makes the
Fisher equal to the Gauss-Newton matrix.

Scoring never builds per-sample gradients ``[B, P]``: layer hooks give each example's
``(a, g)``, queries are preconditioned once and kept in the eigenbasis, and a training
example's score against them is ``g̃ᵀ R_q ã`` per layer (:mod:`unlearn.influence.eigen_scores`);
batches the hooks cannot describe exactly fall back to vmap.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from unlearn.influence.base import InfluenceEstimator, _check_count
from unlearn.influence.eigen_scores import (
    EigenBasis,
    EigenQueries,
    RotatedBatch,
    RowGroupSink,
    raw_is_cheaper,
    rotated_batches,
    self_scores,
)
from unlearn.influence.grads import check_finite_batch, check_loader, model_dtype_device, to_model
from unlearn.influence.hook_grads import Capture as _Capture
from unlearn.influence.layers import LayerAdapter, adapter_for, supported_types
from unlearn.tasks import Task

__all__ = ["KFACInfluence", "EKFACInfluence"]

FISHERS = ("true", "empirical", "exact")
_CHUNK_ELEMENTS = 1 << 24  # per-sample [c, d_out, d_in] gradients materialised at once
_DIRECTION_ELEMENTS = 1 << 26  # layer-output gradients of one batched backward pass
_QUERY_GROUP_BYTES = 32 << 20  # preconditioned queries held at once while scoring
_TRAIN_CACHE_BYTES = 64 << 20  # rotated training factors kept for the next query group


class KFACInfluence(InfluenceEstimator):
    """Kronecker-factored (K-FAC) influence over the model's Linear, Conv2d and Embedding
    layers.

    Coverage: only the parameters (weight and bias) of supported layers get influence; the
    parameters of every other module (LayerNorm, BatchNorm, custom layers, free
    ``nn.Parameter``s) are left out of the parameter space, with a warning that names them, as
    if they were frozen. A model with no supported layer raises a ValueError.
    ``modules=[names]`` chooses the layers explicitly (no warning); ``params=[names]``
    restricts to the given parameter names. New layer types are added with
    :func:`unlearn.influence.layers.register_layer`.

    Args:
        model, task, damping: as for every estimator.
        modules: names of the layers to cover (default: every supported layer).
        params: parameter names to cover (layers whose weight is not listed are left out;
            a bias not listed is left out too).
        fisher: ``"true"`` (targets sampled from the model), ``"empirical"`` (the data's
            labels) or ``"exact"`` (the expectation over targets, exact; needs per-sample
            outputs of at most ``max_outputs`` entries).
        n_samples: target draws per example for ``fisher="true"``.
        seed: seed of the target sampling.
        max_outputs: the largest per-sample output ``fisher="exact"`` accepts.
    """

    name = "kfac"
    corrected: ClassVar[bool] = False

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        damping: float = 1e-3,
        *,
        modules: Sequence[str] | None = None,
        params: Sequence[str] | None = None,
        fisher: str = "true",
        n_samples: int = 1,
        seed: int = 0,
        max_outputs: int = 256,
        **kw: Any,
    ) -> None:
        if fisher not in FISHERS:
            raise ValueError(f"fisher must be one of {FISHERS}, got {fisher!r}")
        if not isinstance(n_samples, int) or n_samples < 1:
            raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
        if fisher != "true" and n_samples != 1:
            raise ValueError(f"n_samples={n_samples} only makes sense with fisher='true' "
                             f"(fisher={fisher!r} has no random draws)")
        if not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        if not isinstance(max_outputs, int) or max_outputs < 1:
            raise ValueError(f"max_outputs must be a positive integer, got {max_outputs!r}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model)}")
        self.layers = _select_layers(model, modules, params, type(self).__name__)
        names = [n for layer in self.layers for n in layer.param_names()]
        super().__init__(model, task, damping, params=names, **kw)
        self.fisher = fisher
        self.n_samples = n_samples
        self.seed = seed
        self.max_outputs = max_outputs
        self._clone: set[str] = set()

    def config(self) -> dict[str, Any]:
        return {
            "damping": self.damping,
            "modules": [layer.name for layer in self.layers],
            "params": list(self.space.names),
            "fisher": self.fisher,
            "n_samples": self.n_samples,
            "seed": self.seed,
            "max_outputs": self.max_outputs,
            "query_rank": self.query_rank,
        }

    # ----------------------------------------------------------------- fitting
    def _fit(self, train_loader: DataLoader) -> None:
        _, device = model_dtype_device(self.model)
        gen = torch.Generator(device=device)
        gen.manual_seed(self.seed)
        stats = {layer.name: _Stats() for layer in self.layers}
        n = self._pass(train_loader, gen, stats, "covariances", self._accumulate_covariances)
        unused = [name for name, st in stats.items() if st.calls == 0]
        if unused:
            raise ValueError(
                f"layers {unused} were never called in the forward pass (their weights are "
                "used some other way, or not at all); leave them out with modules=[...]"
            )
        factors: dict[str, Tensor] = {}
        for layer in self.layers:
            st = stats[layer.name]
            A = st.A / max(st.positions, 1)
            G = st.G / n
            if layer.diagonal_a:
                ea = A.clamp_min(0)
            else:
                ea, factors[_key(layer, "qa")] = _activation_eigh(A, layer.name)
            eg, factors[_key(layer, "qg")] = _stable_eigh(G, f"gradient ({layer.name!r})")
            factors[_key(layer, "ea")], factors[_key(layer, "eg")] = ea, eg
            factors[_key(layer, "lambda")] = torch.outer(eg, ea)
        dtype, _ = model_dtype_device(self.model)
        self.factors = {k: v.to(dtype).contiguous() for k, v in factors.items()}
        if self.corrected:
            for st in stats.values():
                st.L = None
            n = self._pass(train_loader, gen, stats, "eigenvalue correction",
                           self._accumulate_corrections)
            for layer in self.layers:
                self.factors[_key(layer, "lambda")] = (stats[layer.name].L / n).to(dtype)
        self._after_load()

    def _pass(self, loader: DataLoader, gen: torch.Generator, stats: dict[str, _Stats],
              desc: str, accumulate: Any) -> int:
        """One pass over ``loader``; returns the number of examples seen."""
        n = 0
        total = len(loader) if hasattr(loader, "__len__") else None
        with _Capture(self.layers, self._clone) as capture:
            for batch in self._bar(iter(loader), desc, total):
                size, acts, directions = self._batch(batch, gen, capture)
                for layer in self.layers:
                    stats[layer.name].calls += len(capture.records[layer.name])
                accumulate(acts, directions, stats)
                n += size
        n = self._reduce_stats(stats, n)
        if n == 0:
            raise ValueError("train_loader yielded no examples")
        return n

    def _reduce_stats(self, stats: dict[str, _Stats], n: int) -> int:
        """Hook for fitting across processes (:mod:`unlearn.influence.distributed` replaces it
        on the instance): combine this process's partial sums in ``stats`` with the other
        processes' and return the total number of examples. Here: the identity."""
        return n

    def _batch(self, batch: Any, gen: torch.Generator,
               capture: _Capture) -> tuple[int, dict[str, Tensor], Any]:
        """Forward once; return the batch size, each layer's ``a`` and an iterator over
        ``(weight, {layer: g[K, B, T, d_out]})``: K backward directions per group, run as one
        batched backward pass."""
        batch = to_model(batch, self.model)
        check_finite_batch(batch)
        inputs, targets = self.task.split_batch(batch)
        with torch.enable_grad():
            outputs = self._forward(inputs, capture)
            w, R = self._directions(outputs, targets, gen)
        acts = {layer.name: capture.activations(layer) for layer in self.layers}
        outs = [(layer, rec.output) for layer in self.layers
                for rec in capture.records[layer.name]]
        per_direction = max(1, sum(o.numel() for _, o in outs))
        group = max(1, min(R.shape[0], _DIRECTION_ELEMENTS // per_direction))

        def directions():
            try:
                for s in range(0, R.shape[0], group):
                    grads = _backward(outputs, [o for _, o in outs], R[s : s + group])
                    yield w, _collect(self.layers, outs, grads, acts)
            finally:
                capture.clear()

        return outputs.shape[0], acts, directions()

    def _forward(self, inputs: Any, capture: _Capture) -> Tensor:
        """Forward with hooks; redone once with copies if the model modifies a layer's input
        or output in place (an in-place ReLU after a Linear, say)."""
        capture.clear()
        outputs = self.task.forward(self.model, inputs)
        stale = capture.stale()
        if stale:
            self._clone |= stale
            capture.clone = self._clone
            capture.clear()
            outputs = self.task.forward(self.model, inputs)
        if not isinstance(outputs, Tensor) or not outputs.requires_grad:
            raise ValueError("the model's output does not depend on the covered layers' "
                             "trainable weights (is the forward run under torch.no_grad?)")
        return outputs

    def _directions(self, outputs: Tensor, targets: Tensor,
                    gen: torch.Generator) -> tuple[float, Tensor]:
        """Gradients ``R[K, *outputs.shape]`` of the per-sample losses at the model's output
        (K target draws, classes or Hessian square-root columns) and their common weight."""
        o = outputs.detach().requires_grad_(True)
        if self.fisher == "exact":
            return 1.0, _hessian_sqrt(self.task, o, targets, self.max_outputs)
        if self.fisher == "empirical":
            draws = [targets]
        else:
            draws = [self.task.sample_targets(o.detach(), gen) for _ in range(self.n_samples)]
        out = []
        for y in draws:
            with torch.enable_grad():
                loss = self.task.per_sample_loss(o, y).sum()
                (R,) = torch.autograd.grad(loss, o)
            out.append(R)
        return 1.0 / len(draws), torch.stack(out)

    def _accumulate_covariances(self, acts: dict[str, Tensor], directions: Any,
                                stats: dict[str, _Stats]) -> None:
        for layer in self.layers:
            a, st = acts[layer.name], stats[layer.name]
            if layer.diagonal_a:
                valid = a[a >= 0]
                counts = torch.bincount(valid, minlength=layer.d_in)
                st.add("A", counts.double())
                st.positions += valid.numel()
            else:
                a2 = a.reshape(-1, a.shape[-1])
                st.add("A", (a2.T @ a2).double())
                st.positions += a2.shape[0]
        for w, grads in directions:
            for layer in self.layers:
                g = grads[layer.name]
                g2 = g.reshape(-1, g.shape[-1])
                stats[layer.name].add("G", w * (g2.T @ g2).double())

    def _accumulate_corrections(self, acts: dict[str, Tensor], directions: Any,
                                stats: dict[str, _Stats]) -> None:
        rotated = {}
        for layer in self.layers:
            a = acts[layer.name]
            rotated[layer.name] = a if layer.diagonal_a else a @ self.factors[_key(layer, "qa")]
        for w, grads in directions:
            for layer in self.layers:
                g = grads[layer.name] @ self.factors[_key(layer, "qg")]
                sq = _squared_rotated_grads(layer, rotated[layer.name], g)
                stats[layer.name].add("L", w * sq.double())

    # ----------------------------------------------------------------- applying
    def _after_load(self) -> None:
        """Check the factors against the covered layers (a saved file for another model
        fails here with a clear message)."""
        for layer in self.layers:
            expect = {"qg": (layer.d_out, layer.d_out), "eg": (layer.d_out,),
                      "ea": (layer.d_in,), "lambda": (layer.d_out, layer.d_in)}
            if not layer.diagonal_a:
                expect["qa"] = (layer.d_in, layer.d_in)
            for part, shape in expect.items():
                t = self.factors.get(_key(layer, part))
                if t is None or tuple(t.shape) != shape:
                    got = None if t is None else tuple(t.shape)
                    raise ValueError(f"factor {_key(layer, part)!r} should have shape {shape} "
                                     f"for layer {layer.name!r}, got {got}; were the factors "
                                     "fitted for another model?")
        self._slices = self.space.slices()
        self._reached = {layer.name: _reached_block(self.factors, layer) for layer in self.layers}

    def _precondition(self, G: Tensor) -> Tensor:
        out = torch.empty_like(G)
        parts = self.space.unflatten(G)
        k = G.shape[0]
        for layer in self.layers:
            lam = self._eigenvalues(layer, G.dtype)
            qg = self.factors[_key(layer, "qg")].to(G.dtype)
            reached = self._reached.get(layer.name)
            if reached is not None and self.damping > 0:
                M = _precondition_reached(layer.to_matrix(parts), qg, self.damping, *reached)
            else:
                M = qg.T @ layer.to_matrix(parts)
                if not layer.diagonal_a:
                    qa = self.factors[_key(layer, "qa")].to(G.dtype)
                    M = M @ qa
                M = qg @ (M / (lam + self.damping))
                if not layer.diagonal_a:
                    M = M @ qa.T
            for name, t in layer.from_matrix(M).items():
                out[:, self._slices[name]] = t.reshape(k, -1)
        return out

    # ----------------------------------------------------------------- scoring
    def _eigen_scoring(self) -> bool:
        """Score in the eigenbasis unless a subclass changed how gradients are transformed
        or preconditioned (then the generic dense path of the base class is used)."""
        cls = type(self)
        return (cls._transform is InfluenceEstimator._transform
                and cls._precondition is KFACInfluence._precondition)

    def _eigenvalues(self, layer: LayerAdapter, dtype: torch.dtype) -> Tensor:
        """The layer's eigenvalue matrix Λ; a clear error where (Λ + damping) is singular."""
        lam = self.factors[_key(layer, "lambda")].to(dtype)
        if self.damping == 0 and bool((lam <= _rank_tol(lam)).any()):
            raise FloatingPointError(
                f"layer {layer.name!r}: the curvature has zero eigenvalues and damping=0, "
                "so (H + λI) is singular; use damping > 0")
        return lam

    def _bases(self, dtype: torch.dtype) -> list[EigenBasis]:
        out = []
        for layer in self.layers:
            lam = self._eigenvalues(layer, dtype)
            qa = None if layer.diagonal_a else self.factors[_key(layer, "qa")].to(dtype)
            reached = self._reached.get(layer.name)
            if reached is not None:
                # input directions no training example reaches (eigenvalue 0 of the
                # activation covariance: an MNIST border pixel) add nothing to any score:
                # every training gradient is zero there, so they are left out of the GEMMs
                qa, lam = (t.to(dtype) for t in reached)
            out.append(EigenBasis(layer, self.factors[_key(layer, "qg")].to(dtype), qa,
                                  lam + self.damping))
        return out

    def _rotated(self, loader: DataLoader, bases: list[EigenBasis], desc: str,
                 query: bool = False) -> Any:
        total = len(loader) if hasattr(loader, "__len__") else None
        return rotated_batches(self.model, self.task, loader, self.space, bases, self._clone,
                               query=query, progress=lambda it: self._bar(it, desc, total))

    def scores(self, query_loader: DataLoader, train_loader: DataLoader, *,
               top_k: int | None = None, out: Any = None) -> Any:
        """As :meth:`InfluenceEstimator.scores`, computed in the Kronecker eigenbasis from
        layer hooks (:mod:`unlearn.influence.eigen_scores`): no ``[B, P]`` per-sample
        gradients, queries preconditioned once. Preconditioned queries are held in groups
        of about ``_QUERY_GROUP_BYTES``; each group is scored against the whole training
        set, whose rotated gradient factors are cached between groups while they fit in
        ``_TRAIN_CACHE_BYTES`` (and recomputed otherwise)."""
        if not self._eigen_scoring():
            return super().scores(query_loader, train_loader, top_k=top_k, out=out)
        self._check_scores_call(query_loader, train_loader, top_k, out)
        dtype, _ = model_dtype_device(self.model)
        bases = self._bases(dtype)
        rows = _dataset_len(query_loader)
        n_cols = len(train_loader.dataset)  # type: ignore[arg-type]
        if rows is not None:  # few queries, many training examples: rotate the queries back
            bases = [replace(b, raw=raw_is_cheaper(b, rows, n_cols)) for b in bases]
        scale = self._score_scale()
        per_query = sum(layer.d_out * layer.d_in for layer in self.layers)
        per_query *= torch.finfo(dtype).bits // 8
        grouped = rows is not None and rows * per_query > _QUERY_GROUP_BYTES
        cache: list[RotatedBatch] | None = None

        def train_batches() -> Any:
            nonlocal cache
            if cache is not None:
                yield from cache
                return
            kept: list[RotatedBatch] | None = [] if grouped else None
            size = 0
            for batch in self._rotated(train_loader, bases, "scoring"):
                if kept is not None:
                    size += batch.nbytes
                    if size <= _TRAIN_CACHE_BYTES:
                        kept.append(batch)
                    else:
                        kept = None
                yield batch
            cache = kept

        sink: RowGroupSink | None = None
        row = 0

        def flush(store: EigenQueries) -> None:
            nonlocal sink, row
            if sink is None:
                sink = RowGroupSink(rows if rows is not None else store.n, n_cols, top_k, out,
                                    store.dtype)
            sink.begin(store.n)
            col = 0
            for batch in train_batches():
                _check_count("train_loader", col + batch.size, n_cols, at_most=True)
                sink.add(row, col, store.dot(batch) * scale)
                col += batch.size
            _check_count("train_loader", col, n_cols)
            row += store.n

        try:
            store = EigenQueries(bases, self.query_rank)
            for batch in self._rotated(query_loader, bases, "queries", query=True):
                if rows is not None:
                    _check_count("query_loader", row + store.n + batch.size, rows,
                                 at_most=True)
                store.add(batch)
                if grouped and store.nbytes >= _QUERY_GROUP_BYTES:
                    flush(store)
                    store = EigenQueries(bases, self.query_rank)
            if store.n or sink is None:
                flush(store)
            if rows is not None:
                _check_count("query_loader", row, rows)
        except BaseException:
            if sink is not None:
                sink.abort()
            raise
        assert sink is not None
        return sink.result()

    def self_influence(self, train_loader: DataLoader) -> Tensor:
        if not self._eigen_scoring():
            return super().self_influence(train_loader)
        self._require_fitted()
        check_loader(train_loader, "train_loader")
        dtype, _ = model_dtype_device(self.model)
        bases = self._bases(dtype)
        scale = self._score_scale()
        parts = [self_scores(bases, b) * scale
                 for b in self._rotated(train_loader, bases, "self-influence")]
        result = torch.cat(parts)
        _check_count("train_loader", result.shape[0],
                     len(train_loader.dataset))  # type: ignore[arg-type]
        return result


class EKFACInfluence(KFACInfluence):
    name = "ekfac"
    corrected = True


EKFACInfluence.__doc__ = (
    """Eigenvalue-corrected K-FAC (EK-FAC) influence: K-FAC's eigenbases, with the exact
    second moments of the per-sample gradients in them as eigenvalues (one more pass over the
    data): the diagonal in K-FAC's eigenbasis closest to the Fisher (Frobenius norm), for
    the same memory as K-FAC.
"""
    + (KFACInfluence.__doc__ or "").split("\n", 2)[-1]
)


# --------------------------------------------------------------------------- helpers


def _dataset_len(loader: DataLoader) -> int | None:
    try:
        return len(loader.dataset)  # type: ignore[arg-type]
    except TypeError:
        return None


def _key(layer: LayerAdapter, part: str) -> str:
    return f"{layer.name or '(root)'}.{part}"


@dataclass
class _Stats:
    """Running sums for one layer."""

    A: Tensor | None = None
    G: Tensor | None = None
    L: Tensor | None = None
    positions: int = 0
    calls: int = 0

    def add(self, what: str, value: Tensor) -> None:
        cur = getattr(self, what)
        setattr(self, what, value if cur is None else cur + value)


#: up to this many output directions run as plain backward passes of scalars: the batched
#: pass (``grad_outputs`` with ``is_grads_batched``) imports torch.fx's symbolic shapes and
#: sympy on first use (measured 0.4–0.7 s and ~60 MB of resident memory per process)
_PLAIN_DIRECTIONS = 32


def _backward(outputs: Tensor, targets: list[Tensor], R: Tensor) -> list[Tensor | None]:
    """Gradients ``[K, *t.shape]`` at each tensor of ``targets`` for the K output gradients
    ``R``: K backward passes of ``Σ outputs·R_k`` for small K, else one vmapped pass (or K
    plain ones where an op has no batching rule)."""
    with torch.enable_grad():
        if R.shape[0] > _PLAIN_DIRECTIONS:
            try:
                return list(torch.autograd.grad(outputs, targets, grad_outputs=R,
                                                retain_graph=True, allow_unused=True,
                                                is_grads_batched=True))
            except RuntimeError:
                pass
        per = [torch.autograd.grad((outputs * r).sum(), targets, retain_graph=True,
                                   allow_unused=True) for r in R]
    return [None if per[0][j] is None else torch.stack([p[j] for p in per])
            for j in range(len(targets))]


def _collect(layers: list[LayerAdapter], outs: list[tuple[LayerAdapter, Tensor]],
             grads: Sequence[Tensor | None], acts: dict[str, Tensor]) -> dict[str, Tensor]:
    """Per-layer ``g`` ``[K, B, T, d_out]`` from the gradients ``[K, *out.shape]`` at each
    recorded call's output."""
    per: dict[str, list[Tensor]] = {layer.name: [] for layer in layers}
    K = next((gr.shape[0] for gr in grads if gr is not None), 1)
    for (layer, o), gr in zip(outs, grads):
        if gr is None:  # the call's output did not reach the loss
            gr = o.new_zeros(K, *o.shape)
        g = layer.output_grads(gr.detach().flatten(0, 1))
        per[layer.name].append(g.reshape(K, -1, *g.shape[1:]))
    out = {}
    for layer in layers:
        parts = per[layer.name]
        if not parts:
            w = layer.module.weight
            out[layer.name] = w.new_zeros(K, 0, 0, layer.d_out)
            continue
        g = torch.cat(parts, dim=2)
        if layer.diagonal_a:  # embedding: no gradient reaches padding tokens
            g = g * (acts[layer.name] >= 0).unsqueeze(-1).to(g.dtype)
        out[layer.name] = g
    return out


def _squared_rotated_grads(layer: LayerAdapter, a: Tensor, g: Tensor) -> Tensor:
    """``Σ_k Σ_n (Q_Gᵀ DW_kn Q_A)²``, ``[d_out, d_in]``, from rotated ``a[B, T, d_in]`` and
    ``g[K, B, T, d_out]`` (``a`` holds token ids for an embedding)."""
    K, B, T, d_out = g.shape
    if layer.diagonal_a:
        V = layer.d_in
        valid = a >= 0
        rows = torch.arange(K * B, device=a.device).reshape(K, B, 1).expand(K, B, T)
        keys = rows[:, valid] * V + a[valid]
        uniq, inv = torch.unique(keys.reshape(-1), return_inverse=True)
        sums = g.new_zeros(uniq.shape[0], d_out).index_add_(0, inv, g[:, valid].reshape(-1, d_out))
        out = g.new_zeros(V, d_out).index_add_(0, uniq % V, sums**2)
        return out.T
    if T == 1:  # DW = g aᵀ: the squares factor, and the K draws add up before the product
        return (g[:, :, 0] ** 2).sum(0).T @ (a[:, 0] ** 2)
    d_in = a.shape[-1]
    chunk = max(1, _CHUNK_ELEMENTS // (d_out * d_in))
    out = g.new_zeros(d_out, d_in)
    for k in range(K):
        for s in range(0, B, chunk):
            dw = g[k, s : s + chunk].transpose(1, 2) @ a[s : s + chunk]
            out += (dw**2).sum(dim=0)
    return out


def _hessian_sqrt(task: Task, o: Tensor, targets: Tensor, max_outputs: int) -> Tensor:
    """Columns ``R[K, *o.shape]`` with ``Σ_k R_k R_kᵀ`` = each sample's Hessian of its loss
    w.r.t. its outputs; backpropagating them gives the Gauss-Newton matrix exactly."""
    B = o.shape[0]
    m = o[0].numel()
    if m > max_outputs:
        raise ValueError(
            f"fisher='exact' needs one backward pass per output entry; the model has {m} "
            f"outputs per sample (> max_outputs={max_outputs}); use fisher='true' or raise "
            "max_outputs")
    with torch.enable_grad():
        loss = task.per_sample_loss(o, targets).sum()
        (g,) = torch.autograd.grad(loss, o, create_graph=True)
        g = g.reshape(B, m)
        rows = []
        for j in range(m):
            h = None
            if g.requires_grad:
                (h,) = torch.autograd.grad(g[:, j].sum(), o, retain_graph=True,
                                           allow_unused=True)
            rows.append(torch.zeros_like(g) if h is None else h.reshape(B, m))
    H = torch.stack(rows, dim=1).double()  # H[b, j, :] = ∂²ℓ_b / ∂o_bj ∂o_b
    evals, evecs = _stable_eigh(H, "output Hessian")
    L = evecs * evals.sqrt().unsqueeze(1)  # H_b = L_b L_bᵀ
    L = L[:, :, evals.amax(dim=0) > 0]  # columns that are zero for every sample add nothing
    return L.permute(2, 0, 1).reshape(-1, *o.shape).to(o.dtype).detach()


def _rank_tol(values: Tensor) -> float:
    """Eigenvalues at or below this are zero to working precision."""
    if values.numel() == 0:
        return 0.0
    return float(values.max()) * values.shape[-1] * torch.finfo(values.dtype).eps


def _reached_block(factors: dict[str, Tensor], layer: LayerAdapter
                   ) -> tuple[Tensor, Tensor] | None:
    """``(Q, Λ)``: the activation eigenvectors with a non-zero eigenvalue (the input directions
    some training example reaches) and their columns of the eigenvalue matrix, when some
    eigenvalue is 0; ``None`` when every direction is reached or the factor is diagonal.
    Zero means zero to float64 rounding (the eigendecomposition runs in float64), whatever the
    model's dtype: rare but real inputs stay."""
    qa = factors.get(_key(layer, "qa"))
    if qa is None:
        return None
    ea = factors[_key(layer, "ea")].double()
    cols = ea > _rank_tol(ea)
    if bool(cols.all()):
        return None
    lam = factors[_key(layer, "lambda")]
    return qa[:, cols].contiguous(), lam[:, cols].contiguous()


def _precondition_reached(M: Tensor, qg: Tensor, damping: float, Q: Tensor, lam: Tensor
                          ) -> Tensor:
    """``Q_G [(Q_Gᵀ M Q_A) / (Λ + damping)] Q_Aᵀ`` for ``M[k, d_out, d_in]`` when some
    activation eigenvalues are 0. Along those directions Λ is 0 (no example has an activation
    there), so their part is ``M P₀ / damping`` with ``P₀ = I − Q Qᵀ`` the projection onto
    them, and only the reached eigenvectors ``Q`` are multiplied: on the MNIST MLP of
    ``experiments/unlearning_mnist.py`` the 126 of 785 first-layer input directions that no
    digit reaches (border pixels) drop out of both rotations."""
    R = M @ Q
    X = qg @ ((qg.T @ R) / (lam.to(M.dtype) + damping)) - R / damping
    return M / damping + X @ Q.T


def _activation_eigh(A: Tensor, layer: str) -> tuple[Tensor, Tensor]:
    """Eigendecomposition of an activation covariance whose inputs may include coordinates that
    are exactly zero in every example (an MNIST border pixel): those are their own
    eigenvectors with eigenvalue 0, so only the block of the other coordinates is decomposed
    (a smaller eigh, and no rounding mixes the dead coordinates into the other directions)."""
    live = A.diagonal() > 0
    if bool(live.all()) or not bool(live.any()):
        return _stable_eigh(A, f"activation ({layer!r})")
    idx = live.nonzero().squeeze(1)
    ea_live, q_live = _stable_eigh(A[idx][:, idx], f"activation ({layer!r})")
    d, n_dead = A.shape[0], A.shape[0] - idx.numel()
    q = torch.zeros(d, d, dtype=q_live.dtype, device=q_live.device)
    q[(~live).nonzero().squeeze(1), torch.arange(n_dead, device=q.device)] = 1.0
    q[idx.unsqueeze(1), torch.arange(n_dead, d, device=q.device)] = q_live
    return torch.cat([ea_live.new_zeros(n_dead), ea_live]), q


def _stable_eigh(C: Tensor, what: str) -> tuple[Tensor, Tensor]:
    """Eigendecomposition of a (batch of) symmetric PSD matrices in float64: symmetrised,
    retried with growing jitter if LAPACK fails, tiny negative eigenvalues clamped to 0."""
    C = C.double()
    if not torch.isfinite(C).all():
        raise FloatingPointError(f"the {what} covariance holds NaN or inf; check the model "
                                 "and data for overflow")
    C = 0.5 * (C + C.transpose(-1, -2))
    eye = torch.eye(C.shape[-1], dtype=C.dtype, device=C.device)
    scale = float(C.diagonal(dim1=-2, dim2=-1).abs().max()) if C.numel() else 0.0
    scale = scale if scale > 0 else 1.0
    last: Exception | None = None
    for jitter in (0.0, 1e-12, 1e-9, 1e-6):
        try:
            evals, evecs = torch.linalg.eigh(C + jitter * scale * eye)
        except RuntimeError as err:  # torch.linalg.LinAlgError subclasses RuntimeError
            last = err
            continue
        if torch.isfinite(evals).all() and torch.isfinite(evecs).all():
            evals = evals - jitter * scale
            evals = torch.where(evals > _rank_tol(evals), evals, torch.zeros_like(evals))
            return evals, evecs
    raise FloatingPointError(f"the eigendecomposition of the {what} covariance failed even "
                             f"with jitter ({last}); its entries may be too large or "
                             "ill-scaled")


def _select_layers(model: nn.Module, modules: Sequence[str] | None,
                   params: Sequence[str] | None, who: str) -> list[LayerAdapter]:
    """The covered layers, with warnings naming the parameters that are left out."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model)}")
    named = dict(model.named_modules())
    if isinstance(modules, str) or isinstance(params, str):
        raise TypeError("modules and params take lists of names, not a single string")
    layers: list[LayerAdapter] = []
    skipped: list[str] = []
    if modules is not None:
        unknown = [m for m in modules if m not in named]
        if unknown:
            raise ValueError(f"unknown modules {unknown[:5]}; the model has "
                             f"{[n for n in named if n][:20]}")
        for m in modules:
            layer = adapter_for(m, named[m])
            if layer is None:
                raise ValueError(f"module {m!r} is a {type(named[m]).__name__}, which {who} "
                                 f"does not support (supported: {supported_types()})")
            if not layer.module.weight.requires_grad:
                raise ValueError(f"module {m!r} has a frozen weight (requires_grad=False)")
            layer.check()
            layers.append(layer)
    else:
        inside_mha = {f"{n}.out_proj" if n else "out_proj" for n, m in named.items()
                      if isinstance(m, nn.MultiheadAttention)}
        for name, module in named.items():
            layer = adapter_for(name, module) if name not in inside_mha else None
            if layer is None or not layer.module.weight.requires_grad:
                if any(p.requires_grad for p in module.parameters(recurse=False)):
                    skipped.append(f"{name or '(root)'} ({type(module).__name__})")
                continue
            try:
                layer.check()
            except ValueError as err:
                skipped.append(f"{name} ({err})")
                continue
            layers.append(layer)
    layers = _drop_tied(layers, skipped)
    if params is not None:  # then only the listed parameters that are left out are named
        skipped.clear()
        layers = _restrict_to_params(model, layers, params, skipped)
    if not layers:
        kinds = sorted({type(m).__name__ for m in named.values()})
        raise ValueError(f"{who} found no layer it supports ({supported_types()}) with "
                         f"trainable weights in the model (module types: {kinds}); use "
                         "ExactInfluence, CGInfluence or ArnoldiInfluence for this model")
    if skipped:
        warnings.warn(f"{who} covers {supported_types()} layers only; the parameters of these "
                      f"modules get no influence: {skipped}", UserWarning, stacklevel=3)
    return layers


def _drop_tied(layers: list[LayerAdapter], skipped: list[str]) -> list[LayerAdapter]:
    seen: dict[int, str] = {}
    out = []
    for layer in layers:
        key = id(layer.module.weight)
        if key in seen:
            skipped.append(f"{layer.name} (shares its weight with {seen[key]})")
            continue
        seen[key] = layer.name
        out.append(layer)
    return out


def _restrict_to_params(model: nn.Module, layers: list[LayerAdapter], params: Sequence[str],
                        skipped: list[str]) -> list[LayerAdapter]:
    wanted = set(params)
    unknown = wanted - set(dict(model.named_parameters()))
    if unknown:
        raise ValueError(f"unknown parameter names {sorted(unknown)[:5]}")
    out = []
    for layer in layers:
        if layer.weight_name not in wanted:
            continue
        if layer.bias_name is not None and layer.bias_name not in wanted:
            layer.has_bias = False
        out.append(layer)
    covered = {n for layer in out for n in layer.param_names()}
    skipped.extend(sorted(wanted - covered))
    return out
