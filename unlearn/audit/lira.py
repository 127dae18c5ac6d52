"""Per-example likelihood-ratio membership attack (LiRA), offline variant, with retrained
references as the shadow models (Carlini et al. 2022, "Membership Inference Attacks From
First Principles").

Models retrained without the forget set are OUT models for every forget example (they never
saw it) and for every held-out test example. For each example x the attack fits a Gaussian
``N(μ_x, σ_x²)`` to its logit-scaled confidence across the references,

    φ = log(p / (1 − p)) = z_y − logsumexp_{j≠y} z_j     (p: probability of the true label),

and scores an audited model's φ by the one-sided test "is φ larger than an OUT model gives?":
``t = (φ − μ_x) / σ_x`` and ``score = −log P_OUT(Φ ≥ φ) = −log sf(t)`` (large: IN-like), with
``σ_x`` inflated by ``sqrt(1 + 1/m)`` since μ_x is itself estimated from m references. The
threshold is the ``1 − fpr`` quantile of the audited model's scores on the test examples (its
non-members), so an OUT model flags about ``fpr`` of an exchangeable set; ``flagged`` is the
fraction of forget examples above it. ``mean_t`` (mean of t over the forget set) is the same
evidence as one continuous number: about 0 for an OUT model, large for a model that still fits
the forget set.

With few references (fewer than ``per_example_min``, 8 by default) the per-example variance
is unreliable, so one variance pooled over the examples of each set is used (the paper's
"fixed variance" option for small shadow counts); μ_x stays per example.

Models trained with different seeds disagree most on a class as a whole (the logits of a class
they never saw shift together), so for a forgotten class the flagged fraction of a genuine OUT
model swings between 0 and most of the class from seed to seed, and its band in a certificate
is wide; ``mean_t`` is the steadier test there. ``calibrate="class"`` compares each forget
example with the threshold (and pooled σ) of the test examples of its own class instead (all
test examples when fewer than ``min_per_class`` have that label): steady across seeds, but it
then asks "was this example memorised beyond its class?", which a model that merely still
knows a forgotten class passes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import norm
from torch import nn
from torch.utils.data import DataLoader

from unlearn.audit.metrics import predict
from unlearn.tasks import Task

__all__ = ["LiRAResult", "OfflineLiRA", "logit_confidence", "phi_from_logits"]

_SIGMA_FLOOR = 1e-3


def phi_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """``φ = z_y − logsumexp_{j≠y} z_j = log(p_y / (1 − p_y))``, computed stably, float64."""
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"LiRA needs logits of shape [N, C] with C >= 2, got "
                         f"{tuple(logits.shape)}")
    z = logits.double()
    zy = z.gather(1, labels.long()[:, None])[:, 0]
    others = z.scatter(1, labels.long()[:, None], float("-inf"))
    return (zy - torch.logsumexp(others, dim=1)).numpy()


def logit_confidence(model: nn.Module, loader: DataLoader, task: Task | None = None
                     ) -> np.ndarray:
    """φ of every sample of ``loader`` under ``model`` (loader order)."""
    logits, labels = predict(model, loader, task)
    return phi_from_logits(logits, labels)


@dataclass
class LiRAResult:
    flagged: float  # fraction of forget examples whose score passes the threshold
    fpr: float  # target false-positive rate
    threshold: float  # 1 − fpr quantile of all test scores (per-class ones may differ)
    test_flagged: float  # fraction of test examples flagged (≈ fpr by construction)
    mean_t: float  # mean standardised deviation (φ − μ) / σ over the forget set
    forget_scores: np.ndarray  # per-example −log sf, forget-loader order
    n_references: int


def _pooled(dev: np.ndarray) -> float:
    """Pooled within-example standard deviation from deviations ``[m, n]`` to the means."""
    m, n = dev.shape
    return max(float(np.sqrt((dev ** 2).sum() / (n * (m - 1)))), _SIGMA_FLOOR)


class OfflineLiRA:
    """Offline LiRA from OUT reference models.

    ``fit(references, forget, test)`` records every reference's φ on both sets;
    ``audit(model)`` scores a model against all references; ``reference_flagged()`` scores
    each reference against the others (leave-one-out): the rates a genuine OUT model gets.
    """

    def __init__(self, fpr: float = 0.05, *, per_example_min: int = 8,
                 calibrate: str = "pooled", min_per_class: int = 20,
                 task: Task | None = None) -> None:
        if not 0 < fpr < 1:
            raise ValueError(f"fpr must lie in (0, 1), got {fpr!r}")
        if per_example_min < 2:
            raise ValueError(f"per_example_min must be >= 2, got {per_example_min!r}")
        if calibrate not in ("class", "pooled"):
            raise ValueError(f"calibrate must be 'class' or 'pooled', got {calibrate!r}")
        self.fpr, self.per_example_min, self.task = float(fpr), int(per_example_min), task
        self.calibrate, self.min_per_class = calibrate, int(min_per_class)
        self.forget_phi_: np.ndarray | None = None  # [m, n_forget]
        self.test_phi_: np.ndarray | None = None  # [m, n_test]

    def fit(self, references: Sequence[nn.Module], forget: DataLoader, test: DataLoader
            ) -> OfflineLiRA:
        if len(references) < 2:
            raise ValueError(f"LiRA needs at least 2 reference models to fit a Gaussian per "
                             f"example, got {len(references)}")
        self.forget, self.test = forget, test
        f = [self._phi(r, forget) for r in references]
        t = [self._phi(r, test) for r in references]
        self.forget_labels_, self.test_labels_ = f[0][1], t[0][1]
        self.forget_phi_ = np.stack([p for p, _ in f])
        self.test_phi_ = np.stack([p for p, _ in t])
        return self

    def _phi(self, model: nn.Module, loader: DataLoader) -> tuple[np.ndarray, np.ndarray]:
        logits, labels = predict(model, loader, self.task)
        return phi_from_logits(logits, labels), labels.numpy()

    def _thresholds(self, s_t: np.ndarray) -> tuple[float, np.ndarray]:
        """The pooled threshold and one per forget example (its class's, or the pooled)."""
        pooled = float(np.quantile(s_t, 1.0 - self.fpr))
        per = np.full(len(self.forget_labels_), pooled)
        if self.calibrate == "class":
            for c in np.unique(self.forget_labels_):
                mask = self.test_labels_ == c
                if mask.sum() >= self.min_per_class:
                    per[self.forget_labels_ == c] = np.quantile(s_t[mask], 1.0 - self.fpr)
        return pooled, per

    def _gaussians(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                    np.ndarray]:
        assert self.forget_phi_ is not None and self.test_phi_ is not None
        f, t = self.forget_phi_[rows], self.test_phi_[rows]
        m = len(rows)
        if m < 2:
            raise ValueError("LiRA needs at least 2 references per fit")
        mu_f, mu_t = f.mean(0), t.mean(0)
        if m >= self.per_example_min:
            sd_f = np.maximum(f.std(0, ddof=1), _SIGMA_FLOOR)
            sd_t = np.maximum(t.std(0, ddof=1), _SIGMA_FLOOR)
        else:
            sd_f, sd_t = self._pooled_sd(f, mu_f, t, mu_t)
        return mu_f, sd_f, mu_t, sd_t

    def _pooled_sd(self, f: np.ndarray, mu_f: np.ndarray, t: np.ndarray, mu_t: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
        """Pooled σ: per class over both sets (``calibrate="class"``, classes with at least
        ``min_per_class`` test examples), otherwise per set."""
        sd_f = np.full_like(mu_f, _pooled(f - mu_f))
        sd_t = np.full_like(mu_t, _pooled(t - mu_t))
        if self.calibrate == "class":
            for c in np.unique(self.forget_labels_):
                mf, mt = self.forget_labels_ == c, self.test_labels_ == c
                if mt.sum() >= self.min_per_class:
                    dev = np.concatenate([f[:, mf] - mu_f[mf], t[:, mt] - mu_t[mt]], axis=1)
                    sd_f[mf] = sd_t[mt] = _pooled(dev)
        return sd_f, sd_t

    def _result(self, phi_f: np.ndarray, phi_t: np.ndarray, rows: np.ndarray) -> LiRAResult:
        mu_f, sd_f, mu_t, sd_t = self._gaussians(rows)
        inflate = np.sqrt(1.0 + 1.0 / len(rows))
        t_f = (phi_f - mu_f) / (sd_f * inflate)
        s_f, s_t = -norm.logsf(t_f), -norm.logsf((phi_t - mu_t) / (sd_t * inflate))
        thr, per = self._thresholds(s_t)
        return LiRAResult(flagged=float((s_f > per).mean()), fpr=self.fpr, threshold=thr,
                          test_flagged=float((s_t > thr).mean()), mean_t=float(t_f.mean()),
                          forget_scores=s_f, n_references=len(rows))

    def audit(self, model: nn.Module) -> LiRAResult:
        """Score ``model`` against every reference."""
        if self.forget_phi_ is None or self.test_phi_ is None:
            raise RuntimeError("call OfflineLiRA.fit(references, forget, test) first")
        phi_f, phi_t = self._phi(model, self.forget)[0], self._phi(model, self.test)[0]
        return self._result(phi_f, phi_t, np.arange(len(self.forget_phi_)))

    def reference_flagged(self) -> list[LiRAResult]:
        """Each reference scored against the others (needs at least 3 references)."""
        if self.forget_phi_ is None or self.test_phi_ is None:
            raise RuntimeError("call OfflineLiRA.fit(references, forget, test) first")
        m = len(self.forget_phi_)
        if m < 3:
            raise ValueError(f"leave-one-out LiRA needs at least 3 references, got {m}")
        return [self._result(self.forget_phi_[j], self.test_phi_[j],
                             np.array([i for i in range(m) if i != j])) for j in range(m)]
