"""Population membership-inference attack, the "MIA-efficacy" of unlearning papers
(SCRUB, Kurmanji et al. 2023; SalUn, Fan et al. 2024).

A binary classifier (logistic regression on standardised per-sample features of the model's
predictions: log-loss, true-label confidence and predictive entropy) is trained to tell
members (retained training samples) from non-members (test samples), on equally many of each.
It is then applied to the forget set:

    MIA efficacy = fraction of forget samples the attack calls NON-member.

``MIAResult.soft_efficacy`` is the mean predicted non-member probability over the forget set
instead. Where the attack is near chance (a model that generalises well: members and
non-members give similar outputs) its probabilities all sit near 1/2 and the hard decision
flips for most of the forget set with tiny shifts of the fitted boundary, so the hard efficacy
of equally good models ranges widely (on an MNIST LeNet, see docs/results/unlearning.md); the
soft one stays near 1/2 there and still moves where the attack has signal.

Higher means the forget set looks less like training data. It is not "higher is better"
without limit: the target is the efficacy of the model retrained without the forget set
(forgotten samples of a well-generalising class still look like members of it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from unlearn.audit.metrics import SampleOutputs, per_sample_outputs
from unlearn.tasks import Task

__all__ = ["FEATURES", "MIAResult", "PopulationMIA", "attack_features", "mia_efficacy"]

#: the per-sample features the attack can use
FEATURES = ("loss", "confidence", "entropy", "max_prob")


def attack_features(outputs: SampleOutputs, features: Sequence[str] = FEATURES[:3]) -> np.ndarray:
    """``[N, len(features)]`` float64 features (the loss enters as ``log(loss + 1e-12)`` so
    that the near-zero losses of memorised samples are spread out)."""
    unknown = [f for f in features if f not in FEATURES]
    if unknown or not features:
        raise ValueError(f"features must be a non-empty subset of {FEATURES}, got "
                         f"{list(features)}")
    cols = []
    for f in features:
        if f == "loss":
            cols.append(torch.log(outputs.loss.clamp_min(0) + 1e-12))
        else:
            cols.append(getattr(outputs, f))
    return torch.stack(cols, dim=1).double().numpy()


@dataclass
class MIAResult:
    efficacy: float  # fraction of forget samples predicted non-member
    soft_efficacy: float  # mean predicted non-member probability over the forget samples
    attack_train_accuracy: float  # balanced accuracy on the members/non-members it fitted
    n_members: int  # samples per class used to fit (after balancing)
    n_forget: int


class PopulationMIA:
    """Logistic-regression attack on per-sample prediction features.

    ``fit(model, members, nonmembers)`` balances the two sets by subsampling the larger one
    (seeded) and fits; ``member_probability(model, loader)`` scores any loader.
    """

    def __init__(self, features: Sequence[str] = FEATURES[:3], *, seed: int = 0,
                 C: float = 1.0, task: Task | None = None) -> None:
        attack_features(_empty_outputs(), features)  # validates the names
        if not C > 0:
            raise ValueError(f"C must be positive, got {C!r}")
        self.features = tuple(features)
        self.seed, self.C, self.task = int(seed), float(C), task
        self.clf_ = None
        self.train_accuracy_: float | None = None
        self.n_per_class_: int | None = None

    def _x(self, model: nn.Module, loader: DataLoader, what: str) -> np.ndarray:
        if not isinstance(loader, DataLoader):
            raise TypeError(f"{what} must be a DataLoader, got {type(loader).__name__}")
        try:
            out = per_sample_outputs(model, loader, self.task)
        except ValueError as err:
            raise ValueError(f"the {what} set: {err}") from err
        return attack_features(out, self.features)

    def fit(self, model: nn.Module, members: DataLoader, nonmembers: DataLoader) -> PopulationMIA:
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        xm = self._x(model, members, "members (retain)")
        xn = self._x(model, nonmembers, "non-members (test)")
        k = min(len(xm), len(xn))
        rng = np.random.default_rng(self.seed)
        xm = xm[np.sort(rng.choice(len(xm), k, replace=False))]
        xn = xn[np.sort(rng.choice(len(xn), k, replace=False))]
        x = np.concatenate([xm, xn])
        y = np.concatenate([np.ones(k), np.zeros(k)])
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=self.C, max_iter=1000))
        clf.fit(x, y)
        self.clf_ = clf
        self.train_accuracy_ = float((clf.predict(x) == y).mean())
        self.n_per_class_ = k
        return self

    def member_probability(self, model: nn.Module, loader: DataLoader) -> np.ndarray:
        if self.clf_ is None:
            raise RuntimeError("call PopulationMIA.fit(model, members, nonmembers) first")
        return self.clf_.predict_proba(self._x(model, loader, "scored"))[:, 1]

    def efficacy(self, model: nn.Module, forget: DataLoader) -> float:
        """Fraction of ``forget`` predicted non-member (probability of membership < 1/2)."""
        return float((self.member_probability(model, forget) < 0.5).mean())


def mia_efficacy(model: nn.Module, *, forget: DataLoader, retain: DataLoader,
                 test: DataLoader, seed: int = 0, task: Task | None = None,
                 features: Sequence[str] = FEATURES[:3]) -> MIAResult:
    """Fit the attack on ``retain`` (members) vs ``test`` (non-members) with ``model``'s
    outputs and score ``forget``; see the module docstring."""
    attack = PopulationMIA(features, seed=seed, task=task).fit(model, retain, test)
    probs = attack.member_probability(model, forget)
    assert attack.train_accuracy_ is not None and attack.n_per_class_ is not None
    return MIAResult(efficacy=float((probs < 0.5).mean()),
                     soft_efficacy=float((1.0 - probs).mean()),
                     attack_train_accuracy=attack.train_accuracy_,
                     n_members=attack.n_per_class_, n_forget=len(probs))


def _empty_outputs() -> SampleOutputs:
    z = torch.zeros(1, dtype=torch.float64)
    return SampleOutputs(ids=None, labels=torch.zeros(1, dtype=torch.long),
                         predictions=torch.zeros(1, dtype=torch.long), loss=z, confidence=z,
                         max_prob=z, entropy=z)
