"""Certify a recommender's removal against LightGCNs retrained without the deleted interactions.

``certify_recommendation(model, graph, forget_ids, references=RetrainRec(...), seeds=...)``
retrains one reference per seed on ``graph.without(forget_ids)`` (or takes given ones),
measures the unlearned model and each reference the same way on the remaining graph
(:func:`unlearn.recommend.metrics.forgetting_report`) and checks, like
:func:`unlearn.audit.certify` for classifiers, that the unlearned model falls inside the band
the references span (``mean ± max(k · std, floor)``, std with ddof = 1):

* ``recall@20``, ``ndcg@20``: two-sided; the floor is relative (3 % of the references' mean
  by default: "within 3 % of retraining");
* ``deleted_gap`` = mean score of the deleted pairs − mean score of never-seen random pairs:
  at most the band's top (the deleted pairs are not remembered better than retraining would
  score them from the collaborative signal alone);
* ``membership_auc`` (deleted pairs against never-seen pairs): two-sided, floor 0.05, since
  pushing deleted pairs far *below* what retraining gives also reveals that they were deleted.
  Its half-width also covers ``auc_z`` standard errors of the difference between the model's
  AUC and the references' mean AUC on the same pairs (DeLong's paired variance,
  :func:`paired_auc_se`): with few deleted edges an AUC moves by ``1/n`` per edge, and a
  difference the pairs cannot resolve is not evidence of remembering or over-forgetting;
* with ``strict_deleted=True`` one more check, ``deleted_below_never_seen``: ``deleted_gap <=
  0``, i.e. deleted pairs score no higher than random pairs nobody interacted with. Retrained
  models usually fail it (a user's deleted items are still items users like them like), so
  it is off by default and reported as a metric either way.

The cost section holds the removal's seconds, the references' training seconds and the
speed-up; a pre-training cost (UnlearnRec) is reported apart.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from unlearn.audit.certificate import (
    Check,
    _atomic_write,
    _jsonable,
    _timeline,
    check_lines,
)
from unlearn.recommend.data import InteractionGraph
from unlearn.recommend.metrics import _membership_pairs, forgetting_report
from unlearn.recommend.model import score_matrix
from unlearn.removal.base import RemovalResult

__all__ = ["REC_SCHEMA", "REC_METRICS", "REC_FLOORS", "RecCertificate", "RecReference",
           "certify_recommendation", "paired_auc_se", "retrain_rec_references"]

REC_SCHEMA = "unlearn.rec-certificate/1"
MIN_REFERENCES = 3

#: metric -> (direction, description)
REC_METRICS: dict[str, tuple[str, str]] = {
    "recall@20": ("both", "Recall@20 on the held-out interactions (remaining graph)"),
    "ndcg@20": ("both", "NDCG@20 on the held-out interactions (remaining graph)"),
    "deleted_gap": ("upper", "mean score of deleted pairs minus never-seen random pairs"),
    "membership_auc": ("both", "AUC of deleted-pair scores against never-seen pairs"),
}
#: the band's smallest half-width; recall and NDCG: a fraction of the references' mean
REC_FLOORS: dict[str, float] = {"recall@20": 0.03, "ndcg@20": 0.03, "deleted_gap": 0.25,
                                "membership_auc": 0.05}
_RELATIVE = frozenset({"recall@20", "ndcg@20"})


@dataclass
class RecCertificate:
    """The outcome of :func:`certify_recommendation` (JSON with :meth:`to_json`)."""

    passed: bool
    checks: list[Check]
    metrics: dict[str, float]  # the unlearned model: every measured quantity
    references: dict[str, list[float]]  # each reference's value of every metric
    relative_gaps: dict[str, float]  # (unlearned − reference mean) / |reference mean|
    original: dict[str, float] | None = None
    cost: dict[str, Any] = field(default_factory=dict)
    timeline: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""
    schema: str = REC_SCHEMA

    @property
    def failed(self) -> list[str]:
        return [c.name for c in self.checks if not c.passed]

    def summary(self) -> str:
        lines = check_lines("recommendation certificate", self.checks, width=24)
        sp = self.cost.get("speedup")
        if sp is not None:
            lines.append(f"  removal {self.cost['removal_seconds']:.3g} s vs retraining "
                         f"{self.cost['retrain_seconds_mean']:.3g} s: {sp:.1f}x")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(asdict(self))

    def to_json(self, path: str | os.PathLike[str] | None = None, *, indent: int = 2) -> str:
        """JSON text; written atomically to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=indent, allow_nan=False)
        if path is not None:
            _atomic_write(Path(path), text.encode())
        return text

    @classmethod
    def from_json(cls, source: str | os.PathLike[str]) -> RecCertificate:
        text = str(source)
        if not text.lstrip().startswith("{"):
            text = Path(source).read_text()
        data = json.loads(text)
        if data.get("schema") != REC_SCHEMA:
            raise ValueError(f"not a recommendation certificate: schema {data.get('schema')!r}")
        data["checks"] = [Check(**c) for c in data["checks"]]
        return cls(**data)


@dataclass
class RecReference:
    """A retrained reference: the model, its training seconds and seed."""

    model: nn.Module
    seconds: float | None
    seed: int | None = None
    cached: bool = False


def _measure(model: nn.Module, remaining: InteractionGraph, forget_ids: Any, n_random: int,
             seed: int) -> dict[str, float]:
    r = forgetting_report(model, remaining, forget_ids, k=20, n_random=n_random, seed=seed)
    return {"recall@20": r["recall@20"], "ndcg@20": r["ndcg@20"],
            "deleted_gap": r["deleted_mean"] - r["never_seen_mean"],
            "membership_auc": r["auc_vs_never_seen"],
            "deleted_mean": r["deleted_mean"], "never_seen_mean": r["never_seen_mean"],
            "retained_mean": r["retained_mean"], "auc_vs_retained": r["auc_vs_retained"]}


def _placements(pos: Tensor, neg: Tensor) -> tuple[Tensor, Tensor]:
    """DeLong's placements: for each positive the share of negatives below it, for each
    negative the share of positives above it (ties count half)."""
    neg_sorted, pos_sorted = torch.sort(neg).values, torch.sort(pos).values
    below = (torch.searchsorted(neg_sorted, pos, right=False)
             + torch.searchsorted(neg_sorted, pos, right=True)) / 2.0
    not_above = (torch.searchsorted(pos_sorted, neg, right=False)
                 + torch.searchsorted(pos_sorted, neg, right=True)) / 2.0
    return below / len(neg), (len(pos) - not_above) / len(pos)


def paired_auc_se(deleted: Tensor, never: Tensor, ref_deleted: Sequence[Tensor],
                  ref_never: Sequence[Tensor]) -> float:
    """Standard error of ``AUC(model) - mean AUC(references)``, each the AUC of deleted-pair
    scores against never-seen-pair scores on the *same* pairs (DeLong et al. 1988, paired):
    ``var = var(V10) / n_deleted + var(V01) / n_never`` with ``V10`` / ``V01`` the per-pair
    differences of the placements. Few deleted pairs give a large error."""
    d, n = deleted.double(), never.double()
    if d.numel() < 2 or n.numel() < 2:
        raise ValueError("paired_auc_se needs at least 2 deleted and 2 never-seen scores")
    if len(ref_deleted) != len(ref_never) or not ref_deleted:
        raise ValueError("give the references' deleted and never-seen scores, one of each per "
                         "reference")
    v10, v01 = _placements(d, n)
    refs = [_placements(rd.double(), rn.double()) for rd, rn in zip(ref_deleted, ref_never)]
    v10 = v10 - torch.stack([r[0] for r in refs]).mean(0)
    v01 = v01 - torch.stack([r[1] for r in refs]).mean(0)
    return float(torch.sqrt(v10.var() / len(d) + v01.var() / len(n)))


def _band(name: str, value: float, refs: Sequence[float], k: float,
          floors: Mapping[str, float], sampling: float = 0.0) -> Check:
    direction, desc = REC_METRICS[name]
    mean, std = float(np.mean(refs)), float(np.std(refs, ddof=1))
    floor = floors[name] * abs(mean) if name in _RELATIVE else floors[name]
    half = max(k * std, floor, sampling)
    low = None if direction == "upper" else mean - half
    high = None if direction == "lower" else mean + half
    ok = (low is None or value >= low) and (high is None or value <= high)
    return Check(name, float(value), low, high, bool(ok), direction, desc, mean, std)


def _forget_key(forget_ids: Any) -> str:
    ids = sorted(int(i) for i in torch.as_tensor(forget_ids).reshape(-1).tolist())
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()


def retrain_rec_references(retrain: Any, model: nn.Module, graph: InteractionGraph,
                           forget_ids: Any, seeds: Sequence[int],
                           cache_dir: str | os.PathLike[str] | None = None
                           ) -> list[RecReference]:
    """One :class:`baselines.recommend.RetrainRec` per seed (its config with ``seed``
    replaced), loaded from ``cache_dir`` when a file for the same deleted ids, config and seed
    is there (written atomically)."""
    refs = []
    for seed in seeds:
        one = type(retrain)(replace(retrain.config, seed=int(seed)))
        path = None
        if cache_dir is not None:
            body = {"forget": _forget_key(forget_ids), "config": one.config.to_dict(),
                    "graph": [graph.n_users, graph.n_items, graph.n_train]}
            key = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:40]
            path = Path(cache_dir) / f"rec-retrain-{key}.pt"
            if path.is_file():
                blob = torch.load(path, map_location="cpu", weights_only=True)
                new = _fresh_copy(model)
                new.load_state_dict(blob["state_dict"])
                refs.append(RecReference(new.eval(), float(blob["seconds"]), int(seed), True))
                continue
        res = one.unlearn(model, graph, forget_ids)
        refs.append(RecReference(res.model.eval(), float(res.seconds), int(seed)))
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            torch.save({"state_dict": res.model.state_dict(), "seconds": res.seconds}, tmp)
            os.replace(tmp, path)
    return refs


def _fresh_copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


def certify_recommendation(
        model: nn.Module, graph: InteractionGraph, forget_ids: Any, *,
        references: Any, seeds: Sequence[int] | None = None, original: nn.Module | None = None,
        removal: RemovalResult | None = None, k: float = 3.0,
        floors: Mapping[str, float] | None = None, strict_deleted: bool = False,
        auc_z: float = 2.0,
        cache_dir: str | os.PathLike[str] | None = None, n_random: int = 2000,
        metric_seed: int = 0, ledger: Any = None, request_ids: Iterable[int] | None = None,
) -> RecCertificate:
    """Audit ``model`` (unlearned; it propagates on ``graph.without(forget_ids)``) against
    retraining without ``forget_ids``.

    ``graph``: the training graph the removal started from (all deleted ids are its training
    interactions). ``references``: a :class:`baselines.recommend.RetrainRec` (retrained here
    once per seed, ``seeds`` default ``(0, 1, 2)``, cached in ``cache_dir``) or a list of at
    least 3 retrained models / :class:`RemovalResult`. ``original``: the model before the
    removal (reported, not checked). ``removal``: its :class:`RemovalResult` (cost).
    ``ledger`` (+ ``request_ids``): the request timeline. ``auc_z``: how many standard
    errors of the paired AUC difference the membership band spans at least (0: none).
    """
    if not isinstance(graph, InteractionGraph):
        raise TypeError(f"graph must be an InteractionGraph, got {type(graph).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not (isinstance(k, (int, float)) and k > 0):
        raise ValueError(f"k must be a positive number of standard deviations, got {k!r}")
    if not (isinstance(auc_z, (int, float)) and auc_z >= 0):
        raise ValueError(f"auc_z must be a number of standard errors >= 0, got {auc_z!r}")
    floors = {**REC_FLOORS, **dict(floors or {})}
    unknown = sorted(set(floors) - set(REC_METRICS))
    if unknown:
        raise ValueError(f"floors has unknown metric(s) {unknown}; metrics: "
                         f"{sorted(REC_METRICS)}")
    forget = graph.check_train_ids(forget_ids)
    remaining = graph.without(forget)
    started = time.perf_counter()
    refs = _references(references, model, graph, forget, seeds, cache_dir)
    ref_rows = [_measure(r.model, remaining, forget, n_random, metric_seed) for r in refs]
    mine = _measure(model, remaining, forget, n_random, metric_seed)
    ref_lists = {name: [row[name] for row in ref_rows] for name in mine}
    auc_se = _membership_se(model, [r.model for r in refs], remaining, forget, n_random,
                            metric_seed)
    checks = [_band(name, mine[name], ref_lists[name], k, floors,
                    auc_z * auc_se if name == "membership_auc" else 0.0)
              for name in REC_METRICS]
    if strict_deleted:
        gap = mine["deleted_gap"]
        checks.append(Check("deleted_below_never_seen", gap, None, 0.0, gap <= 0.0, "upper",
                            "deleted pairs score no higher than never-seen random pairs",
                            float(np.mean(ref_lists["deleted_gap"])),
                            float(np.std(ref_lists["deleted_gap"], ddof=1))))
    orig = None
    if original is not None:
        orig = _measure(original, graph, forget, n_random, metric_seed)
    rel = {n: (mine[n] - float(np.mean(v))) / abs(float(np.mean(v)))
           if float(np.mean(v)) != 0 else float("nan") for n, v in ref_lists.items()}
    f_ids = forget.tolist()
    return RecCertificate(
        passed=all(c.passed for c in checks), checks=checks, metrics=mine,
        references=ref_lists, relative_gaps=rel, original=orig,
        cost=_cost(removal, refs), timeline=_timeline(ledger, request_ids, f_ids),
        config={"k": float(k), "floors": floors, "relative_floors": sorted(_RELATIVE),
                "strict_deleted": bool(strict_deleted), "n_references": len(refs),
                "auc_z": float(auc_z), "membership_auc_se": auc_se,
                "seeds": [r.seed for r in refs], "cached": [r.cached for r in refs],
                "n_forget": len(forget), "n_remaining": remaining.n_train,
                "n_test": len(graph.test_ids), "n_random": n_random,
                "metric_seed": metric_seed, "audit_seconds": time.perf_counter() - started},
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))


def _membership_se(model: nn.Module, refs: Sequence[nn.Module], remaining: InteractionGraph,
                   forget: Tensor, n_random: int, seed: int) -> float:
    """:func:`paired_auc_se` on the pairs :func:`forgetting_report` measures the AUC on."""
    deleted, never = _membership_pairs(remaining, forget, n_random, seed)

    def scores(m: nn.Module) -> tuple[Tensor, Tensor]:
        s = score_matrix(m, remaining).float()
        return s[deleted[:, 0], deleted[:, 1]], s[never[:, 0], never[:, 1]]

    if len(deleted) < 2:
        return 0.0  # one deleted pair: no spread to estimate; the floor alone applies
    d, n = scores(model)
    ref_scores = [scores(r) for r in refs]
    return paired_auc_se(d, n, [r[0] for r in ref_scores], [r[1] for r in ref_scores])


def _references(references: Any, model: nn.Module, graph: InteractionGraph, forget: Any,
                seeds: Sequence[int] | None, cache_dir: Any) -> list[RecReference]:
    if isinstance(references, (list, tuple)):
        if seeds is not None:
            raise ValueError("seeds apply to a retraining method, not to given reference models")
        refs = []
        for i, r in enumerate(references):
            if isinstance(r, RemovalResult):
                refs.append(RecReference(r.model, float(r.seconds),
                                         r.details.get("config", {}).get("seed")))
            elif isinstance(r, nn.Module):
                refs.append(RecReference(r, None))
            else:
                raise TypeError(f"references[{i}] must be an nn.Module or a RemovalResult, "
                                f"got {type(r).__name__}")
    else:
        from baselines.recommend import RetrainRec

        if not isinstance(references, RetrainRec):
            raise TypeError(f"references must be a baselines.recommend.RetrainRec or a list "
                            f"of retrained models, got {type(references).__name__}")
        seeds = [0, 1, 2] if seeds is None else [int(s) for s in seeds]
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must be distinct, got {seeds}")
        if len(seeds) < MIN_REFERENCES:
            raise ValueError(f"certify needs at least {MIN_REFERENCES} references, got "
                             f"{len(seeds)} seeds")
        refs = retrain_rec_references(references, model, graph, forget, seeds, cache_dir)
    if len(refs) < MIN_REFERENCES:
        raise ValueError(f"certify needs at least {MIN_REFERENCES} reference models, got "
                         f"{len(refs)}: the bands come from their seed-to-seed spread")
    return refs


def _cost(removal: RemovalResult | None, refs: Sequence[RecReference]) -> dict[str, Any]:
    known = [r.seconds for r in refs if r.seconds is not None]
    mean = float(np.mean(known)) if known else None
    rem = float(removal.seconds) if removal is not None else None
    details = removal.details if removal is not None else {}
    return {"removal_seconds": rem, "removal_method": details.get("method"),
            "pretrain_seconds": details.get("pretrain_seconds_total"),
            "retrain_seconds": [r.seconds for r in refs], "retrain_seconds_mean": mean,
            "retrain_from_cache": [r.cached for r in refs],
            "speedup": mean / rem if mean is not None and rem else None}
