"""Certified removal for L2-regularised logistic regression (Guo, Goldstein, Hannun and van der
Maaten, "Certified Data Removal from Machine Learning Models", ICML 2020).

The model is a linear head ``z = W x̃`` (``x̃`` = features with a 1 appended for the bias) on
frozen features, one binary logistic regression per output: a single logit for a binary
problem, one-vs-rest for K classes. Training minimises, in the paper's sum form,

    L_b(W; D) = Σ_{i∈D} Σ_k ℓ(s_ik w_kᵀ x̃_i) + (λ n / 2) ||W||² + ⟨B, W⟩,

``ℓ(m) = log(1 + e^{-m})``, ``s_ik = ±1`` (is i of class k), n = |D|, and the loss-perturbation
noise ``B ~ N(0, σ² I)`` drawn once per training. Dividing by n gives what is optimised: mean
loss + (λ/2)||W||² + ⟨B, W⟩/n.

Removing a set F (m examples) takes one Newton step on the retained data D' (n' = n − m):
``Δ = Σ_{i∈F} ∇ℓ_i + λ m W`` (so ``∇L_b(W; D') = −Δ`` when W was optimal on D),
``H = ∇²L(W; D')`` (per class ``X'ᵀ diag(p(1−p)) X' + λ n' I``), ``W⁻ = W + H⁻¹Δ``.

The gradient residual ``r = ∇L_b(W⁻; D')`` is what could leak the removed data; W⁻ is the exact
optimum of the objective with noise ``B − r``, so Theorem 3 of the paper gives (ε, δ)-certified
removal while ``||r|| ≤ σ ε / c`` with ``c = sqrt(2 log(1.5/δ))``. Bounding the residual: with
``h = H⁻¹Δ`` and ℓ'' γ-Lipschitz (γ = 1/4 for the logistic loss, the paper's constant),

    r = Σ_i x̃_i (x̃_iᵀh) ∫₀¹ [ℓ''(x̃_iᵀ(W + t h)) − ℓ''(x̃_iᵀW)] dt,   |∫…| ≤ (γ/2)|x̃_iᵀh|,

hence ``||r_k|| ≤ (γ/2) ||X'||₂ (Σ_i (x̃_iᵀh_k)⁴)^{1/2}`` per class and ``||r|| ≤ (Σ_k
bound_k²)^{1/2}``, plus ``||H h − Δ||`` (computed exactly) for the rounding of the solve.
This is the paper's data-dependent Corollary 1 (``γ ||X'||₂ ||h|| ||X'h||`` for rows of norm
≤ 1) made tighter and free of the unit-norm assumption; ``details["bound_paper"]`` reports the
paper's form (times the largest row norm when rows are longer than 1) for comparison.

Each removal step computes Δ from the forget set only, so earlier residuals carry over: the
bounds add up across sequential removals, starting from the optimiser's own residual after
training. When the sum would pass the budget ``σ ε / c``, the model is retrained on D' with
fresh noise instead (and the sum restarts).

All certificate arithmetic is float64; the head is kept in float64 so that rounding the weights
cannot add a residual of its own.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from unlearn.data import from_tensors
from unlearn.removal.base import RemovalMethod
from unlearn.tasks import Task

__all__ = [
    "OneVsRestTask",
    "UnitNorm",
    "CertifiedState",
    "CertifiedLinearModel",
    "CertifiedRemoval",
    "train_certifiable",
    "label_signs",
    "budget_constant",
]

#: Lipschitz constant of ℓ'' used for the logistic loss (the paper's γ = 1/4; the tightest
#: value is 1/(6√3) ≈ 0.096, so 1/4 is conservative).
GAMMA_LOGISTIC = 0.25
STATE_FORMAT = "unlearn.certified/1"


# ---------------------------------------------------------------------------- task


def label_signs(labels: Tensor, num_outputs: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """``[B, K]`` of ±1: +1 where the example belongs to output k's class. With one output
    the labels must be 0/1 (binary); otherwise class indices in ``[0, K)`` (one-vs-rest)."""
    y = torch.as_tensor(labels).reshape(-1)
    if y.is_floating_point() and not torch.equal(y, y.round()):
        raise ValueError("labels must be integer class indices")
    y = y.long()
    top = 1 if num_outputs == 1 else num_outputs - 1
    if y.numel() and (int(y.min()) < 0 or int(y.max()) > top):
        raise ValueError(f"labels must lie in [0, {top}] for a model with {num_outputs} "
                         f"output(s), got {int(y.min())}..{int(y.max())}")
    if num_outputs == 1:
        return (2 * y - 1).to(dtype).unsqueeze(1)
    signs = -torch.ones(y.shape[0], num_outputs, dtype=dtype, device=y.device)
    signs[torch.arange(y.shape[0], device=y.device), y] = 1
    return signs


class OneVsRestTask(Task):
    """Sum over outputs of the binary logistic loss ``log(1 + exp(−s_k z_k))``; one output
    with 0/1 labels is ordinary binary logistic regression."""

    def per_sample_loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        if outputs.dim() != 2:
            raise ValueError(f"OneVsRestTask needs outputs of shape [B, K]; got "
                             f"{tuple(outputs.shape)}")
        signs = label_signs(targets, outputs.shape[1], outputs.dtype).to(outputs.device)
        return F.softplus(-signs * outputs).sum(dim=1)


class UnitNorm(nn.Module):
    """Scale each input row to unit L2 norm (flattened), as the paper does with its features:
    it keeps the residual bound and the noise on a fixed scale."""

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(x.shape[0], -1)
        return flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)


# ---------------------------------------------------------------------------- state


@dataclass
class CertifiedState:
    """What a certified model must remember between removal requests (JSON-serialisable).

    ``residual_bound`` is the accumulated bound on the gradient residual ``||∇L_b(W; D)||``
    of the current weights on the current training set (sum form); ``noise_draw`` numbers the
    noise vector drawn from ``seed`` (it advances at each retraining).
    """

    l2: float
    noise_std: float
    seed: int
    n_train: int
    residual_bound: float = 0.0
    training_residual: float = 0.0
    noise_draw: int = 0
    retrains: int = 0
    removed_ids: list[int] = field(default_factory=list)
    gamma: float = GAMMA_LOGISTIC

    @property
    def num_removed(self) -> int:
        return len(self.removed_ids)

    def to_dict(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, **asdict(self), "num_removed": self.num_removed}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CertifiedState:
        if not isinstance(data, dict) or data.get("format") != STATE_FORMAT:
            raise ValueError(f"not a certified-model state (expected format {STATE_FORMAT!r}, "
                             f"got {data.get('format') if isinstance(data, dict) else data!r})")
        names = {f for f in cls.__dataclass_fields__}
        missing = sorted(names - {"residual_bound", "training_residual", "noise_draw",
                                  "retrains", "removed_ids", "gamma"} - data.keys())
        if missing:
            raise ValueError(f"certified-model state lacks {missing}")
        kwargs = {k: data[k] for k in names if k in data}
        kwargs["removed_ids"] = [int(i) for i in kwargs.get("removed_ids", [])]
        return cls(**kwargs)


# ---------------------------------------------------------------------------- model


class CertifiedLinearModel(nn.Module):
    """A float64 linear head on frozen features, with its certification state.

    ``features`` is any module mapping inputs to ``[B, ...]`` features (flattened to
    ``[B, d]``); its parameters are frozen (``requires_grad=False``) and it always runs in
    eval mode. Only the head is trained and certified. The state travels with the model
    (``copy.deepcopy``, ``state_dict`` extra state), so the caller keeps the model returned by
    each removal and passes it to the next one.
    """

    def __init__(self, in_features: int, num_outputs: int, state: CertifiedState, *,
                 features: nn.Module | None = None, bias: bool = True) -> None:
        super().__init__()
        if in_features < 1 or num_outputs < 1:
            raise ValueError(f"need in_features >= 1 and num_outputs >= 1, got {in_features} "
                             f"and {num_outputs}")
        self.features = features if features is not None else nn.Flatten()
        for p in self.features.parameters():
            p.requires_grad_(False)
        self.features.eval()
        self.head = nn.Linear(in_features, num_outputs, bias=bias, dtype=torch.float64)
        self.state = state

    def train(self, mode: bool = True) -> CertifiedLinearModel:
        super().train(mode)
        self.features.eval()  # frozen: BatchNorm statistics and dropout stay fixed
        return self

    @property
    def num_outputs(self) -> int:
        return self.head.out_features

    def embed(self, x: Tensor) -> Tensor:
        """Frozen features as float64 ``[B, d]``."""
        return _embed(self.features, x, self.head.weight.device)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.embed(x))

    def predict(self, x: Tensor) -> Tensor:
        """Class predictions (``z > 0`` for one output, argmax otherwise)."""
        with torch.no_grad():
            z = self(x)
        return (z[:, 0] > 0).long() if self.num_outputs == 1 else z.argmax(dim=1)

    def weight_matrix(self) -> Tensor:
        """``W̃ [K, D]``: the weight with the bias as its last column."""
        w = self.head.weight.detach()
        if self.head.bias is None:
            return w.clone()
        return torch.cat([w, self.head.bias.detach().unsqueeze(1)], dim=1)

    def set_weight_matrix(self, W: Tensor) -> None:
        d = self.head.in_features
        with torch.no_grad():
            self.head.weight.copy_(W[:, :d])
            if self.head.bias is not None:
                self.head.bias.copy_(W[:, d])

    def noise(self) -> Tensor:
        """The loss-perturbation noise ``B [K, D]`` of the current training draw."""
        shape = tuple(self.weight_matrix().shape)
        return _draw_noise(shape, self.state.noise_std, self.state.seed, self.state.noise_draw,
                           self.head.weight.device)

    def certificate(self) -> dict[str, Any]:
        """The certification state as a JSON-serialisable dict."""
        return self.state.to_dict()

    def residual_norm(self, data: DataLoader) -> float:
        """``||∇L_b(W; D)||`` over ``data`` (sum form, with this model's noise): the quantity the
        certificate bounds, computed directly."""
        design = _design(self, OneVsRestTask(), data)
        return float(_objective_grad(self.weight_matrix(), design.X, design.S, self.state.l2,
                                     self.noise()).norm())

    def get_extra_state(self) -> dict[str, Any]:
        return self.state.to_dict()

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.state = CertifiedState.from_dict(state)


def _embed(features: nn.Module, x: Tensor, device: torch.device) -> Tensor:
    """``features(x)`` without gradients, flattened to float64 ``[B, d]`` on ``device``."""
    ref = next(features.parameters(), None)
    if ref is not None:
        x = x.to(device=ref.device, dtype=ref.dtype if x.is_floating_point() else x.dtype)
    with torch.no_grad():
        f = features(x)
    return f.reshape(f.shape[0], -1).to(device=device, dtype=torch.float64)


def _draw_noise(shape: tuple[int, ...], std: float, seed: int, draw: int,
                device: torch.device) -> Tensor:
    words = np.random.SeedSequence([int(seed), int(draw)]).generate_state(2, dtype=np.uint32)
    gen = torch.Generator().manual_seed(int(words[0]) << 32 | int(words[1]))
    return (std * torch.randn(shape, generator=gen, dtype=torch.float64)).to(device)


# ---------------------------------------------------------------------------- design matrix


@dataclass
class _Design:
    X: Tensor  # [n, D] float64, a 1 appended when the head has a bias
    S: Tensor  # [n, K] of ±1
    ids: list[int] | None


def _collect(features: nn.Module, bias: bool, task: Task, loader: DataLoader,
             device: torch.device) -> tuple[Tensor, Tensor, list[int] | None]:
    """One pass: features ``[n, D]`` (a 1 appended with ``bias``), labels ``[n]`` and the ids
    (``None`` when the batches carry none)."""
    xs, ys, ids = [], [], []
    have_ids = True
    for batch in loader:
        inputs, targets = task.split_batch(batch)
        feats = _embed(features, inputs, device)
        if bias:
            feats = torch.cat([feats, feats.new_ones(feats.shape[0], 1)], dim=1)
        xs.append(feats)
        ys.append(torch.as_tensor(targets).reshape(-1).to(device))
        b = task.batch_ids(batch)
        have_ids = have_ids and b is not None
        if b is not None:
            ids.extend(int(i) for i in b)
    if not xs:
        raise ValueError("the loader yielded no batches")
    X = torch.cat(xs)
    if not torch.isfinite(X).all():
        raise ValueError("the features hold NaN or inf")
    return X, torch.cat(ys), ids if have_ids else None


def _design(model: CertifiedLinearModel, task: Task, loader: DataLoader) -> _Design:
    X, y, ids = _collect(model.features, model.head.bias is not None, task, loader,
                         model.head.weight.device)
    return _Design(X, label_signs(y, model.num_outputs).to(X.device), ids)


# ---------------------------------------------------------------------------- the objective


def _objective_grad(W: Tensor, X: Tensor, S: Tensor, l2: float, B: Tensor) -> Tensor:
    """Sum-form gradient ``Σ_i ∇ℓ_i + λ n W + B``, ``[K, D]``."""
    Z = X @ W.T
    coef = -S * torch.sigmoid(-S * Z)  # dℓ/dz
    return coef.T @ X + l2 * X.shape[0] * W + B


def _loss_grad_sum(W: Tensor, X: Tensor, S: Tensor) -> Tensor:
    """``Σ_i ∇ℓ_i`` over the rows of X, ``[K, D]``."""
    coef = -S * torch.sigmoid(-S * (X @ W.T))
    return coef.T @ X


def _newton_direction(W: Tensor, X: Tensor, l2: float, Delta: Tensor) -> Tensor:
    """``h_k = H_k⁻¹ Δ_k`` with ``H_k = Xᵀ diag(p_k(1−p_k)) X + λ n I`` (the Hessian of the
    sum-form objective on X's rows at W), class by class."""
    n, D = X.shape
    P = torch.sigmoid(X @ W.T)
    curv = P * (1 - P)
    eye = torch.eye(D, dtype=X.dtype, device=X.device)
    out = torch.empty_like(Delta)
    for k in range(W.shape[0]):
        H = X.T @ (curv[:, k : k + 1] * X) + l2 * n * eye
        L = torch.linalg.cholesky(H)
        out[k] = torch.cholesky_solve(Delta[k].unsqueeze(1), L).squeeze(1)
    return out


def _solve_error(W: Tensor, X: Tensor, l2: float, Delta: Tensor, h: Tensor) -> float:
    """``||H h − Δ||`` over all classes, by exact Hessian-vector products: the part of the
    residual a (rounded) solve leaves, added to the bound so that it stays rigorous."""
    P = torch.sigmoid(X @ W.T)
    Hh = ((P * (1 - P)) * (X @ h.T)).T @ X + l2 * X.shape[0] * h
    return float((Hh - Delta).norm())


def _spectral_norm(X: Tensor) -> float:
    """``||X||₂``, the largest singular value, from the eigenvalues of ``XᵀX``."""
    return math.sqrt(max(float(torch.linalg.eigvalsh(X.T @ X).max()), 0.0))


def _step_bounds(X: Tensor, h: Tensor, gamma: float) -> tuple[float, float]:
    """(ours, the paper's Corollary-1 form) bounds on the residual left by the step h."""
    x_norm = _spectral_norm(X)
    Xh = X @ h.T  # [n, K]
    ours = (gamma / 2) * x_norm * (Xh**4).sum(dim=0).sqrt()
    row = max(float(X.norm(dim=1).max()), 1.0)
    paper = gamma * x_norm * h.norm(dim=1) * Xh.norm(dim=0) * row
    return float(ours.norm()), float(paper.norm())


def _fit_head(model: CertifiedLinearModel, design: _Design, *, warm_start: bool,
              max_iter: int, tol: float) -> float:
    """Minimise the mean-form objective for the model's current noise draw, in place;
    return the sum-form gradient residual left by the optimiser."""
    state = model.state
    X, S = design.X, design.S
    n = X.shape[0]
    B = model.noise()
    W0 = model.weight_matrix() if warm_start else torch.zeros_like(model.weight_matrix())
    W = W0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([W], lr=1, max_iter=max_iter, tolerance_grad=tol,
                            tolerance_change=1e-20, history_size=50,
                            line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.softplus(-S * (X @ W.T)).sum() / n
        loss = loss + 0.5 * state.l2 * (W**2).sum() + (B * W).sum() / n
        loss.backward()
        return loss

    for _ in range(5):  # restart after a line-search stall
        opt.step(closure)
        if float(W.grad.abs().max()) < tol:
            break
    W = W.detach()
    model.set_weight_matrix(W)
    return float(_objective_grad(W, X, S, state.l2, B).norm())


# ---------------------------------------------------------------------------- training


def train_certifiable(
    data: DataLoader | Dataset | Tensor,
    labels: Tensor | None = None,
    *,
    l2: float,
    noise_std: float,
    seed: int = 0,
    noise_draw: int = 0,
    num_classes: int | None = None,
    binary: bool = False,
    features: nn.Module | None = None,
    bias: bool = True,
    batch_size: int = 1024,
    max_iter: int = 1000,
    tol: float = 1e-10,
) -> CertifiedLinearModel:
    """Train a removal-enabled logistic-regression head with loss perturbation.

    Minimises ``mean_i Σ_k ℓ(s_ik z_ik) + (l2/2)||W||² + ⟨B, W⟩/n`` with
    ``B ~ N(0, noise_std² I)`` drawn from ``seed``: the paper's ``L_b`` divided by n.

    Args:
        data: a DataLoader (or Dataset) of ``(ids, x, y)`` / ``(x, y)``, or a tensor of inputs
            with ``labels``. Keep the ids: removal requests are made in ids.
        l2: λ > 0 (strong convexity is what the certificate rests on).
        noise_std: σ ≥ 0; the removal budget is ``σ ε / c``, so σ = 0 allows no removal
            without retraining.
        seed: seeds the noise draws (retraining after the budget is spent draws afresh).
        noise_draw: which draw of ``seed`` to use (0 for a first training; pass a certified
            model's ``state.noise_draw`` to retrain a reference with the very same noise).
        num_classes: number of classes (default: largest label + 1).
        binary: one output for a two-class problem (labels 0/1) instead of two one-vs-rest
            outputs.
        features: a frozen feature extractor (any module); default: flatten the inputs.
    """
    _check_positive(l2, "l2")
    if not (isinstance(noise_std, (int, float)) and math.isfinite(noise_std) and noise_std >= 0):
        raise ValueError(f"noise_std must be a finite number >= 0, got {noise_std!r}")
    for value, what in ((seed, "seed"), (noise_draw, "noise_draw")):
        if not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{what} must be a non-negative integer, got {value!r}")
    loader = _as_loader(data, labels, batch_size)
    n = len(loader.dataset)  # type: ignore[arg-type]
    if n == 0:
        raise ValueError("the training set is empty")
    features = features if features is not None else nn.Flatten()
    features.eval()
    device = next(features.parameters(), torch.empty(0)).device
    X, y, ids = _collect(features, bias, OneVsRestTask(), loader, device)
    k = _num_outputs(y, num_classes, binary)
    state = CertifiedState(float(l2), float(noise_std), int(seed), n,
                           noise_draw=int(noise_draw))
    in_features = X.shape[1] - int(bias)
    model = CertifiedLinearModel(in_features, k, state, features=features, bias=bias).to(device)
    design = _Design(X, label_signs(y, k).to(device), ids)
    residual = _fit_head(model, design, warm_start=False, max_iter=max_iter, tol=tol)
    model.state.training_residual = residual
    model.state.residual_bound = residual
    model.eval()
    return model


def _as_loader(data: Any, labels: Tensor | None, batch_size: int) -> DataLoader:
    if isinstance(data, DataLoader):
        if labels is not None:
            raise ValueError("pass labels only with a tensor of inputs, not with a DataLoader")
        return data
    if isinstance(data, Tensor):
        if labels is None:
            raise ValueError("a tensor of inputs needs labels=...")
        data = from_tensors(data, labels)
    elif labels is not None:
        raise ValueError("pass labels only with a tensor of inputs")
    return DataLoader(data, batch_size=batch_size, shuffle=False)


def _num_outputs(labels: Tensor, num_classes: int | None, binary: bool) -> int:
    top = int(labels.max())
    if num_classes is None:
        num_classes = max(top + 1, 2)
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if top >= num_classes:
        raise ValueError(f"label {top} out of range for num_classes={num_classes}")
    if binary and num_classes != 2:
        raise ValueError(f"binary=True needs two classes, got num_classes={num_classes}")
    return 1 if binary else num_classes


# ---------------------------------------------------------------------------- removal


def budget_constant(delta: float) -> float:
    """``c = sqrt(2 log(1.5/δ))`` of Theorem 3: noise ``σ = c ε'/ε`` certifies a residual ε'."""
    return math.sqrt(2 * math.log(1.5 / delta))


class CertifiedRemoval(RemovalMethod):
    """(ε, δ)-certified removal from a :class:`CertifiedLinearModel` (one Newton step on the
    retained data; retraining when the accumulated residual bound passes ``σ ε / c``).

    ``unlearn(model, forget=..., retain=...)`` needs loaders of ``(ids, x, y)``; ``retain``
    must be the model's whole current training set minus ``forget``. The returned model
    carries the updated state (accumulated bound, removed ids, retrain count): pass it to the
    next request. ``details`` reports ε, δ, the budget, the step's bound, the accumulated bound,
    the remaining budget, the ε spent so far and the actual residual ``||∇L_b(W⁻; D')||``.
    """

    name = "certified"
    needs_retain = True

    def __init__(self, task: Task | None, epsilon: float, delta: float, *,
                 max_iter: int = 1000, tol: float = 1e-10) -> None:
        task = OneVsRestTask() if task is None else task
        if not isinstance(task, OneVsRestTask):
            raise TypeError(f"certified removal is derived for the logistic loss of "
                            f"OneVsRestTask, got {type(task).__name__}")
        super().__init__(task)
        _check_positive(epsilon, "epsilon")
        if not (isinstance(delta, (int, float)) and 0 < delta < 1):
            raise ValueError(f"delta must lie in (0, 1), got {delta!r}")
        self.epsilon, self.delta = float(epsilon), float(delta)
        self.c = budget_constant(self.delta)
        self.max_iter, self.tol = max_iter, tol

    def budget(self, noise_std: float) -> float:
        """The largest residual certifiable at (ε, δ) with noise σ: ``σ ε / c``."""
        return noise_std * self.epsilon / self.c

    def _unlearn(self, model: nn.Module, forget: DataLoader,
                 retain: DataLoader | None) -> dict[str, Any]:
        if not isinstance(model, CertifiedLinearModel):
            raise TypeError("CertifiedRemoval works on a CertifiedLinearModel (see "
                            f"train_certifiable), got {type(model).__name__}")
        assert retain is not None
        state = model.state
        if state.noise_std <= 0:
            raise ValueError("the model was trained without loss-perturbation noise "
                             "(noise_std=0): nothing can be removed with a certificate; "
                             "retrain it with train_certifiable(..., noise_std > 0)")
        fset, rset = _design(model, self.task, forget), _design(model, self.task, retain)
        self._check_request(state, fset, rset)
        m, n_retain = fset.X.shape[0], rset.X.shape[0]
        W = model.weight_matrix()
        Delta = _loss_grad_sum(W, fset.X, fset.S) + state.l2 * m * W
        h = _newton_direction(W, rset.X, state.l2, Delta)
        bound, bound_paper = _step_bounds(rset.X, h, state.gamma)
        solve_error = _solve_error(W, rset.X, state.l2, Delta, h)
        bound, bound_paper = bound + solve_error, bound_paper + solve_error
        budget = self.budget(state.noise_std)
        accumulated = state.residual_bound + bound
        retrained = accumulated > budget
        state.n_train = n_retain
        state.removed_ids.extend(fset.ids or [])
        if retrained:
            state.noise_draw += 1
            state.retrains += 1
            residual = _fit_head(model, rset, warm_start=True, max_iter=self.max_iter,
                                 tol=self.tol)
            if residual > budget:
                raise RuntimeError(f"retraining left a gradient residual {residual:.3g} above "
                                   f"the budget {budget:.3g}; lower tol or raise max_iter")
            state.training_residual = residual
            accumulated = residual
        else:
            model.set_weight_matrix(W + h)
        state.residual_bound = accumulated
        actual = float(_objective_grad(model.weight_matrix(), rset.X, rset.S, state.l2,
                                       model.noise()).norm())
        return {
            "epsilon": self.epsilon,
            "delta": self.delta,
            "noise_std": state.noise_std,
            "l2": state.l2,
            "c": self.c,
            "budget": budget,
            "bound_step": bound,
            "bound_paper": bound_paper,
            "solve_error": solve_error,
            "residual_bound": accumulated,
            "budget_remaining": budget - accumulated,
            "epsilon_spent": self.c * accumulated / state.noise_std,
            "residual_actual": actual,
            "bound_holds": actual <= accumulated,
            "retrained": retrained,
            "step_norm": float(h.norm()),
            "n_forget": m,
            "n_train": n_retain,
            "num_removed": state.num_removed,
            "retrains": state.retrains,
        }

    @staticmethod
    def _check_request(state: CertifiedState, fset: _Design, rset: _Design) -> None:
        if fset.ids is None or rset.ids is None:
            raise ValueError("CertifiedRemoval keeps track of removed ids: use loaders of "
                             "(ids, x, y), e.g. from unlearn.removal.split_loaders")
        removed = set(state.removed_ids)
        again = sorted(removed.intersection(fset.ids))
        if again:
            raise ValueError(f"{len(again)} id(s) were already removed from this model, e.g. "
                             f"{again[:10]}")
        stale = sorted(removed.intersection(rset.ids))
        if stale:
            raise ValueError(f"the retain set holds {len(stale)} id(s) removed earlier, e.g. "
                             f"{stale[:10]}")
        if len(set(fset.ids)) != len(fset.ids):
            raise ValueError("the forget set repeats ids")
        total = len(fset.ids) + len(rset.ids)
        if total != state.n_train:
            raise ValueError(
                f"forget ({len(fset.ids)}) + retain ({len(rset.ids)}) = {total} examples, but "
                f"the model's training set now holds {state.n_train}; retain must be the "
                "whole current training set minus the forget set"
            )


def _check_positive(value: Any, what: str) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{what} must be a finite number > 0, got {value!r}")

