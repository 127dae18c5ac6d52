"""Certify an unlearned model against models retrained without the forgotten data.

``certify(model, reference=Retrain(...), forget=..., retain=..., test=...)`` retrains
reference models on the retained data (several seeds, cached on disk), measures the unlearned
model and every reference the same way, and checks that the unlearned model falls inside the
band the references span among themselves:

* accuracy on forget / retain / test, and the population MIA efficacy: two-sided band;
* KL divergence from the references (forget, test), parameter distance to them, the
  fraction of forget examples LiRA flags as seen in training and LiRA's mean deviation on the
  forget set (:mod:`unlearn.audit.lira`): at most the band's top;
* prediction agreement with the references (forget, test): at least the band's bottom.

For a reference, a model-to-reference quantity (KL, agreement, distance) is measured against
the *other* references and LiRA is run with the others as shadow models (leave-one-out), so
each reference yields one value of every metric. The band is ``mean ± h`` over the references
with ``h = max(k · std, floor)`` (std with ddof = 1, ``k = 3`` by default): with 3 to 5 seeds
the spread is itself uncertain, and when the references agree exactly (std = 0, e.g. all of
them at 100 % retain accuracy) the floor keeps an immaterial difference from failing. The
floors (:data:`DEFAULT_FLOORS`) are absolute in the metric's unit, except for the parameter
distance, whose floor is a fraction of the references' mean distance.

What a certificate does not promise: passing means the model is statistically
indistinguishable from retraining *by these tests at this number of references*; only the
(ε, δ) section of a certified removal is a formal guarantee.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from unlearn.audit.lira import LiRAResult, OfflineLiRA
from unlearn.audit.metrics import average_gap, parameter_distance, predict
from unlearn.audit.mia import mia_efficacy
from unlearn.removal.base import RemovalResult
from unlearn.tasks import ClassificationTask, Task

__all__ = ["SCHEMA", "SCHEMA_VERSION", "METRICS", "DEFAULT_FLOORS", "MIN_REFERENCES", "Check",
           "Certificate", "Reference", "certify", "retrain_references",
           "cache_key"]

SCHEMA_VERSION = 1
SCHEMA = f"unlearn.certificate/{SCHEMA_VERSION}"
MIN_REFERENCES = 3

#: metric -> (direction, description); direction "both" (two-sided band), "upper" (at most
#: the band's top) or "lower" (at least the band's bottom)
METRICS: dict[str, tuple[str, str]] = {
    "forget_acc": ("both", "accuracy on the forget set"),
    "retain_acc": ("both", "accuracy on the retained training data"),
    "test_acc": ("both", "accuracy on the test set"),
    "mia_efficacy": ("both", "forget examples the population MIA calls non-member"),
    "lira_flagged": ("upper", "forget examples LiRA flags as training members"),
    "lira_mean_t": ("upper", "mean LiRA deviation (φ − μ)/σ on the forget set, in σ"),
    "kl_forget": ("upper", "mean KL(reference || model) on the forget set, nats"),
    "kl_test": ("upper", "mean KL(reference || model) on the test set, nats"),
    "agreement_forget": ("lower", "same prediction as the references on the forget set"),
    "agreement_test": ("lower", "same prediction as the references on the test set"),
    "param_distance": ("upper", "L2 distance of the parameters to the references"),
}

#: the band's smallest half-width per metric (param_distance: a fraction of the mean)
DEFAULT_FLOORS: dict[str, float] = {
    "forget_acc": 0.02, "retain_acc": 0.02, "test_acc": 0.02, "mia_efficacy": 0.05,
    "lira_flagged": 0.05, "lira_mean_t": 0.5, "kl_forget": 0.02, "kl_test": 0.02,
    "agreement_forget": 0.02, "agreement_test": 0.02, "param_distance": 0.05,
}
_RELATIVE_FLOORS = frozenset({"param_distance"})
#: metrics that are fractions: their bands are clipped to [0, 1]
_FRACTIONS = frozenset({"forget_acc", "retain_acc", "test_acc", "mia_efficacy", "lira_flagged",
                        "agreement_forget", "agreement_test"})


# ---------------------------------------------------------------------------- results


@dataclass
class Check:
    """One pass/fail test: the unlearned model's ``value`` against ``[low, high]`` (None: no
    bound on that side)."""

    name: str
    value: float
    low: float | None
    high: float | None
    passed: bool
    direction: str
    description: str
    ref_mean: float | None = None
    ref_std: float | None = None


@dataclass
class Certificate:
    """The outcome of :func:`certify`; JSON with :meth:`to_json`, HTML with
    :meth:`render_html`."""

    passed: bool
    checks: list[Check]
    metrics: dict[str, float]  # the unlearned model
    references: dict[str, list[float]]  # each reference's value of every metric
    gaps: dict[str, float]  # unlearned − reference mean
    average_gap: float  # percentage points over GAP keys (see metrics.average_gap)
    original: dict[str, float] | None = None  # the model before unlearning, when given
    lira: dict[str, Any] = field(default_factory=dict)
    mia: dict[str, Any] = field(default_factory=dict)
    privacy: dict[str, Any] | None = None  # (ε, δ) of a certified removal
    cost: dict[str, Any] = field(default_factory=dict)
    histograms: dict[str, Any] = field(default_factory=dict)
    timeline: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""
    schema: str = SCHEMA

    @property
    def failed(self) -> list[str]:
        """Names of the checks that failed."""
        return [c.name for c in self.checks if not c.passed]

    def summary(self) -> str:
        """One line per check."""
        return "\n".join(check_lines("certificate", self.checks, width=18))

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(asdict(self))

    def to_json(self, path: str | os.PathLike[str] | None = None, *, indent: int = 2) -> str:
        """The certificate as JSON (schema :data:`SCHEMA`); written atomically to ``path`` when
        given."""
        text = json.dumps(self.to_dict(), indent=indent, allow_nan=False)
        if path is not None:
            _atomic_write(Path(path), text.encode())
        return text

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Certificate:
        _check_schema(data)
        d = dict(data)
        d["checks"] = [Check(**c) for c in d.get("checks", [])]
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"certificate has unknown fields {unknown}")
        return cls(**d)

    @classmethod
    def from_json(cls, source: str | os.PathLike[str]) -> Certificate:
        """Read a certificate from JSON text or a file path."""
        text = str(source)
        if not text.lstrip().startswith("{"):
            path = Path(source)
            if not path.is_file():
                raise FileNotFoundError(f"no certificate file at {str(path)!r}")
            text = path.read_text()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"the certificate is not valid JSON: {err}") from err
        return cls.from_dict(data)

    def render_html(self, path: str | os.PathLike[str]) -> Path:
        """Write a self-contained HTML report (figures embedded as PNG) to ``path``."""
        from unlearn.audit.report import render_html

        return render_html(self, path)


def _check_schema(data: Any) -> None:
    if not isinstance(data, Mapping) or not isinstance(data.get("schema"), str):
        raise ValueError("not an unlearn certificate: no 'schema' field")
    name, _, version = data["schema"].partition("/")
    if name != "unlearn.certificate" or not version.isdigit():
        raise ValueError(f"not an unlearn certificate: schema {data['schema']!r}")
    if int(version) > SCHEMA_VERSION:
        raise ValueError(f"the certificate uses schema {data['schema']!r}, newer than this "
                         f"version of unlearn reads ({SCHEMA!r}); upgrade unlearn")


def _fmt(v: float | None) -> str:
    return "-inf/inf" if v is None else f"{v:.4g}"


def check_lines(title: str, checks: list[Check], width: int) -> list[str]:
    """A verdict line, then one line per check with its value and band."""
    failed = sum(not c.passed for c in checks)
    lines = [f"{title}: {'FAIL' if failed else 'PASS'} ({len(checks) - failed}/{len(checks)} "
             "checks)"]
    for c in checks:
        lines.append(f"  {'ok  ' if c.passed else 'FAIL'} {c.name:{width}s} {c.value:10.4g} "
                     f"band [{_fmt(c.low)}, {_fmt(c.high)}]")
    return lines


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        v = float(x)
        return v if math.isfinite(v) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, (np.bool_,)):
        return bool(x)
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, Tensor):
        return _jsonable(x.tolist())
    return x


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------- references


def _ids(task: Task, loader: DataLoader, what: str) -> list[int] | None:
    out: list[int] = []
    for batch in loader:
        b = task.batch_ids(batch)
        if b is None:
            return None
        out.extend(int(i) for i in torch.as_tensor(b).reshape(-1))
    if not out:
        raise ValueError(f"the {what} set is empty")
    return out


def _recipe_of(method: Any) -> dict[str, Any]:
    recipe = getattr(method, "recipe", None)
    train_fn = getattr(method, "train_fn", None)
    out: dict[str, Any] = {"method": type(method).__name__}
    if recipe is not None:
        out["recipe"] = asdict(recipe)
    if train_fn is not None:
        out["train_fn"] = f"{getattr(train_fn, '__module__', '?')}." \
                          f"{getattr(train_fn, '__qualname__', type(train_fn).__name__)}"
    return out


def cache_key(forget_ids: Sequence[int], retain_ids: Sequence[int], method: Any, seed: int,
              model: nn.Module, task: Task) -> str:
    """sha256 naming one retrained reference: the forgotten and retained ids, the training
    recipe (or the train_fn's qualified name: edit its body and you must clear the cache),
    the seed, the task and the architecture."""
    arch = [(k, list(v.shape), str(v.dtype)) for k, v in model.state_dict().items()
            if isinstance(v, Tensor)]
    body = {"forget": hashlib.sha256(json.dumps(sorted(forget_ids)).encode()).hexdigest(),
            "retain": hashlib.sha256(json.dumps(sorted(retain_ids)).encode()).hexdigest(),
            "recipe": _recipe_of(method), "seed": int(seed), "task": type(task).__name__,
            "arch": arch}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


@dataclass
class Reference:
    """A retrained reference model, its training seconds (None if unknown) and cache key."""

    model: nn.Module
    seconds: float | None
    seed: int | None = None
    key: str | None = None
    cached: bool = False


def retrain_references(method: Any, model: nn.Module, *, forget: DataLoader,
                       retain: DataLoader, seeds: Sequence[int],
                       cache_dir: str | os.PathLike[str] | None = None,
                       progress: bool = False) -> list[Reference]:
    """Retrain one reference per seed with ``method`` (a :class:`baselines.Retrain`), loading
    any already in ``cache_dir`` (files ``retrain-<key>.pt``, written atomically)."""
    task = method.task
    keys: list[str | None] = [None] * len(seeds)
    if cache_dir is not None:
        f_ids, r_ids = _ids(task, forget, "forget"), _ids(task, retain, "retain")
        if f_ids is None or r_ids is None:
            raise ValueError("caching references needs loaders of (ids, x, y) to know which "
                             "examples were forgotten; pass cache_dir=None or use IndexedDataset")
        keys = [cache_key(f_ids, r_ids, method, s, model, task) for s in seeds]
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
    refs = []
    for seed, key in _bar(list(zip(seeds, keys, strict=True)), progress, "references"):
        path = Path(cache_dir) / f"retrain-{key[:40]}.pt" if key and cache_dir else None
        if path is not None and path.is_file():
            refs.append(_load_cached(path, model, seed, key))
            continue
        one = copy.copy(method)
        one.seed = int(seed)
        res = one.unlearn(model, forget=forget, retain=retain)
        refs.append(Reference(res.model.eval(), res.seconds, int(seed), key))
        if path is not None:
            _save_cached(path, res, int(seed), key)
    return refs


def _save_cached(path: Path, res: RemovalResult, seed: int, key: str | None) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save({"state_dict": res.model.state_dict(), "seconds": float(res.seconds),
                    "seed": seed, "key": key}, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _load_cached(path: Path, model: nn.Module, seed: int, key: str | None) -> Reference:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        new = copy.deepcopy(model)
        new.load_state_dict(blob["state_dict"])
    except Exception as err:
        raise ValueError(f"the cached reference {path} cannot be loaded ({err}); delete it to "
                         "retrain") from err
    if blob.get("key") != key:
        raise ValueError(f"the cached reference {path} was written for another request "
                         "(key mismatch); delete it to retrain")
    return Reference(new.eval(), float(blob["seconds"]), seed, key, cached=True)


def _bar(items: list[Any], progress: bool, desc: str) -> Iterable[Any]:
    if not progress:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc)


def _given_references(reference: Sequence[Any]) -> list[Reference]:
    refs = []
    for i, r in enumerate(reference):
        if isinstance(r, RemovalResult):
            refs.append(Reference(r.model, float(r.seconds), r.details.get("seed")))
        elif isinstance(r, nn.Module):
            refs.append(Reference(r, None))
        else:
            raise TypeError(f"reference[{i}] must be an nn.Module or a RemovalResult, got "
                            f"{type(r).__name__}")
    return refs


# ---------------------------------------------------------------------------- measuring


@dataclass
class _Outputs:
    """One model's logits and labels on the three sets."""

    model: nn.Module
    task: Task
    logits: dict[str, Tensor]
    labels: dict[str, Tensor]

    def accuracy(self, split: str) -> float:
        return float((self.logits[split].argmax(1) == self.labels[split]).double().mean())

    def forget_losses(self) -> np.ndarray:
        """The task's per-sample loss on the forget set."""
        with torch.no_grad():
            loss = self.task.per_sample_loss(self.logits["forget"], self.labels["forget"])
        return loss.double().numpy()


def _outputs(model: nn.Module, loaders: Mapping[str, DataLoader], task: Task) -> _Outputs:
    logits, labels = {}, {}
    for split, loader in loaders.items():
        logits[split], labels[split] = predict(model, loader, task)
    return _Outputs(model, task, logits, labels)


def _kl(p_logits: Tensor, q_logits: Tensor) -> float:
    """Mean ``KL(p || q)`` over rows (same as :func:`unlearn.audit.kl_divergence`)."""
    logp, logq = F.log_softmax(p_logits, 1), F.log_softmax(q_logits, 1)
    return float((logp.exp() * (logp - logq)).sum(1).mean())


def _agree(a: Tensor, b: Tensor) -> float:
    return float((a.argmax(1) == b.argmax(1)).double().mean())


def _pairwise(target: _Outputs, others: Sequence[_Outputs]) -> dict[str, float]:
    """KL from, agreement with and distance to ``others``, averaged over them."""
    out: dict[str, list[float]] = {k: [] for k in ("kl_forget", "kl_test", "agreement_forget",
                                                   "agreement_test", "param_distance")}
    for o in others:
        for split in ("forget", "test"):
            out[f"kl_{split}"].append(_kl(o.logits[split], target.logits[split]))
            out[f"agreement_{split}"].append(_agree(o.logits[split], target.logits[split]))
        out["param_distance"].append(parameter_distance(o.model, target.model))
    return {k: float(np.mean(v)) for k, v in out.items()}


def _own(o: _Outputs, loaders: Mapping[str, DataLoader], task: Task, seed: int
         ) -> tuple[dict[str, float], float]:
    m = {f"{s}_acc": o.accuracy(s) for s in ("forget", "retain", "test")}
    mia = mia_efficacy(o.model, forget=loaders["forget"], retain=loaders["retain"],
                       test=loaders["test"], seed=seed, task=task)
    m["mia_efficacy"] = mia.efficacy
    return m, mia.attack_train_accuracy


def _band(name: str, value: float, refs: Sequence[float], k: float,
          floors: Mapping[str, float]) -> Check:
    direction, desc = METRICS[name]
    mean, std = float(np.mean(refs)), float(np.std(refs, ddof=1))
    floor = floors[name] * abs(mean) if name in _RELATIVE_FLOORS else floors[name]
    half = max(k * std, floor)
    low = None if direction == "upper" else mean - half
    high = None if direction == "lower" else mean + half
    if name in _FRACTIONS:
        low = None if low is None else max(low, 0.0)
        high = None if high is None else min(high, 1.0)
    ok = (low is None or value >= low) and (high is None or value <= high)
    return Check(name, float(value), low, high, bool(ok), direction, desc, mean, std)


# ---------------------------------------------------------------------------- certify


def certify(model: nn.Module, reference: Any, *, forget: DataLoader, retain: DataLoader,
            test: DataLoader, task: Task | None = None, original: nn.Module | None = None,
            n_references: int | None = None, seeds: Sequence[int] | None = None,
            cache_dir: str | os.PathLike[str] | None = None,
            removal: RemovalResult | None = None, certified_state: Any = None,
            k: float = 3.0, floors: Mapping[str, float] | None = None, fpr: float = 0.05,
            lira_calibrate: str = "pooled",
            ledger: Any = None, request_ids: Iterable[int] | None = None,
            mia_seed: int = 0, progress: bool = False) -> Certificate:
    """Compare ``model`` (the unlearned model) with models retrained without ``forget``.

    ``reference`` is a :class:`baselines.Retrain` (retrained here once per seed: ``seeds``,
    default ``range(n_references)``, 3 by default; cached in ``cache_dir``) or a list of
    at least 3 already-retrained models (or their :class:`RemovalResult`). ``original``: the
    model before unlearning (reported, not checked). ``removal``: the removal's result (cost,
    and the (ε, δ) details of a certified removal); ``certified_state``: a
    :class:`CertifiedState` (or its dict), found on the model itself when it has one.
    ``k``, ``floors``: the band (module docstring); ``fpr``, ``lira_calibrate``: LiRA's
    false-positive rate and calibration (:mod:`unlearn.audit.lira`).
    ``ledger`` (+ ``request_ids``, default: the requests touching the forget ids): the
    request timeline.
    """
    loaders = {"forget": forget, "retain": retain, "test": test}
    task = _resolve_task(task, reference)
    _check_inputs(model, loaders, task, k, fpr, original, removal)
    floors = _check_floors(floors)
    lira = OfflineLiRA(fpr, calibrate=lira_calibrate, task=task)
    started = time.perf_counter()
    refs, seeds_used = _references(reference, model, loaders, n_references, seeds, cache_dir,
                                   progress)
    outs = [_outputs(r.model, loaders, task) for r in refs]
    lira.fit([r.model for r in refs], forget, test)
    mine = _outputs(model, loaders, task)
    metrics, mia_acc, mine_lira = _model_metrics(mine, outs, loaders, task, mia_seed, lira)
    references = _reference_metrics(outs, loaders, task, mia_seed, lira)
    checks = [_band(name, metrics[name], references[name], k, floors) for name in METRICS]
    orig_metrics, orig_out = None, None
    if original is not None:
        orig_out = _outputs(original, loaders, task)
        orig_metrics = _model_metrics(orig_out, outs, loaders, task, mia_seed, lira)[0]
    privacy = _privacy(model, removal, certified_state)
    checks += _budget_check(privacy)
    ref_mean = {n: float(np.mean(v)) for n, v in references.items()}
    f_ids = _ids(task, forget, "forget")
    return Certificate(
        passed=all(c.passed for c in checks),
        checks=checks,
        metrics=metrics,
        references=references,
        gaps={n: metrics[n] - ref_mean[n] for n in METRICS},
        average_gap=average_gap(metrics, ref_mean),
        original=orig_metrics,
        lira={"fpr": fpr, "threshold": mine_lira.threshold,
              "test_flagged": mine_lira.test_flagged, "n_references": len(refs),
              "variance": "per-example" if len(refs) >= lira.per_example_min else "pooled",
              "calibrate": lira_calibrate,
              "most_member_like": _top_ids(mine_lira.forget_scores, f_ids)},
        mia={"attack_train_accuracy": mia_acc, "seed": mia_seed},
        privacy=privacy,
        cost=_cost(removal, refs),
        histograms=_histograms(mine, outs, orig_out),
        timeline=_timeline(ledger, request_ids, f_ids),
        config={"k": float(k), "floors": floors, "relative_floors": sorted(_RELATIVE_FLOORS),
                "seeds": seeds_used, "n_references": len(refs),
                "reference": _describe_reference(reference),
                "cache_keys": [r.key for r in refs], "cached": [r.cached for r in refs],
                "n_forget": len(mine.labels["forget"]), "n_retain": len(mine.labels["retain"]),
                "n_test": len(mine.labels["test"]), "task": type(task).__name__,
                "audit_seconds": time.perf_counter() - started},
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def _check_floors(floors: Mapping[str, float] | None) -> dict[str, float]:
    out = {**DEFAULT_FLOORS, **dict(floors or {})}
    unknown = sorted(set(out) - set(METRICS))
    if unknown:
        raise ValueError(f"floors has unknown metric(s) {unknown}; metrics: {sorted(METRICS)}")
    bad = {n: v for n, v in out.items() if not (isinstance(v, (int, float)) and v >= 0)}
    if bad:
        raise ValueError(f"floors must be numbers >= 0, got {bad}")
    return {n: float(v) for n, v in out.items()}


def _model_metrics(o: _Outputs, refs: Sequence[_Outputs], loaders: Mapping[str, DataLoader],
                   task: Task, mia_seed: int, lira: OfflineLiRA
                   ) -> tuple[dict[str, float], float, LiRAResult]:
    """Every metric of one audited model against the references."""
    metrics, mia_acc = _own(o, loaders, task, mia_seed)
    metrics.update(_pairwise(o, refs))
    res = lira.audit(o.model)
    metrics["lira_flagged"], metrics["lira_mean_t"] = res.flagged, res.mean_t
    return metrics, mia_acc, res


def _reference_metrics(outs: Sequence[_Outputs], loaders: Mapping[str, DataLoader],
                       task: Task, mia_seed: int, lira: OfflineLiRA) -> dict[str, list[float]]:
    """Each reference's value of every metric, model-to-reference ones (and LiRA) measured
    against the other references."""
    rows = []
    for j, (o, res) in enumerate(zip(outs, lira.reference_flagged(), strict=True)):
        row, _ = _own(o, loaders, task, mia_seed)
        row.update(_pairwise(o, list(outs[:j]) + list(outs[j + 1:])))
        row["lira_flagged"], row["lira_mean_t"] = res.flagged, res.mean_t
        rows.append(row)
    return {name: [row[name] for row in rows] for name in METRICS}


def _budget_check(privacy: dict[str, Any] | None) -> list[Check]:
    """The (ε, δ) budget as a check, when the removal was certified."""
    if privacy is None or privacy.get("budget") is None \
            or privacy.get("residual_bound") is None:
        return []
    bound, budget = float(privacy["residual_bound"]), float(privacy["budget"])
    return [Check("certified_budget", bound, None, budget, bound <= budget, "upper",
                  "accumulated gradient-residual bound within the (ε, δ) budget")]


def _resolve_task(task: Task | None, reference: Any) -> Task:
    ref_task = getattr(reference, "task", None) if not isinstance(reference, (list, tuple)) \
        else None
    if task is None:
        task = ref_task if isinstance(ref_task, Task) else ClassificationTask()
    if not isinstance(task, Task):
        raise TypeError(f"task must be an unlearn.tasks.Task, got {type(task).__name__}")
    if isinstance(ref_task, Task) and type(ref_task) is not type(task):
        raise ValueError(f"the reference retrains with {type(ref_task).__name__} but task is "
                         f"{type(task).__name__}: certify with the task the model was trained "
                         "with")
    return task


def _check_inputs(model: nn.Module, loaders: Mapping[str, DataLoader], task: Task, k: float,
                  fpr: float, original: nn.Module | None, removal: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if original is not None and not isinstance(original, nn.Module):
        raise TypeError(f"original must be a torch.nn.Module, got {type(original).__name__}")
    if removal is not None and not isinstance(removal, RemovalResult):
        raise TypeError(f"removal must be a RemovalResult, got {type(removal).__name__}")
    if not (isinstance(k, (int, float)) and k > 0):
        raise ValueError(f"k must be a positive number of standard deviations, got {k!r}")
    if not 0 < fpr < 1:
        raise ValueError(f"fpr must lie in (0, 1), got {fpr!r}")
    for name, loader in loaders.items():
        if not isinstance(loader, DataLoader):
            raise TypeError(f"{name} must be a DataLoader, got {type(loader).__name__}")
        try:
            size = len(loader.dataset)  # type: ignore[arg-type]
        except TypeError:
            size = -1
        if size == 0:
            raise ValueError(f"the {name} set is empty: nothing to certify on")
    _check_task(model, loaders["forget"], task)


def _check_task(model: nn.Module, loader: DataLoader, task: Task) -> None:
    batch = next(iter(loader), None)
    if batch is None:
        raise ValueError("the forget set is empty: nothing to certify on")
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            from unlearn.influence.grads import to_model

            batch = to_model(batch, model)
            inputs, _ = task.split_batch(batch)
            out = task.forward(model, inputs)
            task.loss(model, batch)
    except Exception as err:
        raise ValueError(f"{type(task).__name__} cannot compute a loss for this model on the "
                         f"forget data ({type(err).__name__}: {err}); is it the task the model "
                         "was trained with?") from err
    finally:
        model.train(was)
    if out.dim() != 2 or out.shape[1] < 2:
        raise ValueError(f"certify audits classifiers with logits [B, C], C >= 2; the model "
                         f"gives outputs of shape {tuple(out.shape)} under "
                         f"{type(task).__name__}")


def _references(reference: Any, model: nn.Module, loaders: Mapping[str, DataLoader],
                n_references: int | None, seeds: Sequence[int] | None,
                cache_dir: Any, progress: bool) -> tuple[list[Reference], list[int] | None]:
    if isinstance(reference, (list, tuple)):
        if seeds is not None or n_references is not None:
            raise ValueError("seeds / n_references apply to a retraining method, not to a list "
                             "of reference models")
        refs = _given_references(reference)
        _enough(len(refs))
        return refs, [r.seed for r in refs] if all(r.seed is not None for r in refs) else None
    from baselines.retrain import Retrain

    if not isinstance(reference, Retrain):
        raise TypeError(f"reference must be a baselines.Retrain or a list of retrained models, "
                        f"got {type(reference).__name__}")
    if seeds is None:
        seeds = list(range(MIN_REFERENCES if n_references is None else n_references))
    seeds = [int(s) for s in seeds]
    if n_references is not None and n_references != len(seeds):
        raise ValueError(f"n_references={n_references} but {len(seeds)} seeds were given")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {seeds}")
    _enough(len(seeds))
    refs = retrain_references(reference, model, forget=loaders["forget"],
                              retain=loaders["retain"], seeds=seeds, cache_dir=cache_dir,
                              progress=progress)
    return refs, seeds


def _enough(n: int) -> None:
    if n < MIN_REFERENCES:
        raise ValueError(f"certify needs at least {MIN_REFERENCES} reference models, got {n}: "
                         "the pass/fail bands come from the seed-to-seed spread of the "
                         "retrained references, and fewer models have no usable spread")


def _describe_reference(reference: Any) -> dict[str, Any]:
    if isinstance(reference, (list, tuple)):
        return {"kind": "given", "n": len(reference)}
    return {"kind": "retrained", **_recipe_of(reference)}


def _top_ids(scores: np.ndarray, ids: list[int] | None, n: int = 10) -> list[dict[str, Any]]:
    order = np.argsort(-scores)[:n]
    return [{"id": None if ids is None else ids[i], "position": int(i),
             "score": float(scores[i])} for i in order]


def _cost(removal: RemovalResult | None, refs: Sequence[Reference]) -> dict[str, Any]:
    secs = [r.seconds for r in refs]
    known = [s for s in secs if s is not None]
    mean = float(np.mean(known)) if known else None
    rem = float(removal.seconds) if removal is not None else None
    return {"removal_seconds": rem, "removal_method": (removal.details.get("method")
                                                       if removal is not None else None),
            "retrain_seconds": secs, "retrain_seconds_mean": mean,
            "retrain_from_cache": [r.cached for r in refs],
            "speedup": mean / rem if mean is not None and rem else None}


def _histograms(mine: _Outputs, refs: Sequence[_Outputs], original: _Outputs | None,
                bins: int = 30) -> dict[str, Any]:
    """Forget-set loss histograms (log10 of the loss, densities summing to 1 per model)."""
    series = {"unlearned": mine.forget_losses(),
              "retrained": np.concatenate([o.forget_losses() for o in refs])}
    if original is not None:
        series["original"] = original.forget_losses()
    logs = {k: np.log10(np.clip(v, 1e-8, None)) for k, v in series.items()}
    lo = min(float(v.min()) for v in logs.values())
    hi = max(float(v.max()) for v in logs.values())
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
    counts = {k: (np.histogram(v, edges)[0] / len(v)).tolist() for k, v in logs.items()}
    medians = {k: float(np.median(v)) for k, v in series.items()}
    return {"x": "log10(loss)", "edges": edges.tolist(), "density": counts,
            "median_loss": medians}


def _privacy(model: nn.Module, removal: RemovalResult | None, state: Any
             ) -> dict[str, Any] | None:
    """The (ε, δ) section: the removal's details and the certified model's state."""
    details = dict(removal.details) if removal is not None else {}
    if state is None:
        state = getattr(model, "state", None)
    if state is not None and hasattr(state, "to_dict"):
        state = state.to_dict()
    if not isinstance(state, Mapping) or "noise_std" not in state:
        state = None
    if "epsilon" not in details and state is None:
        return None
    keys = ("epsilon", "delta", "noise_std", "budget", "residual_bound", "budget_remaining",
            "epsilon_spent", "residual_actual", "bound_holds", "retrained", "retrains",
            "num_removed", "l2")
    out = {k: details[k] for k in keys if k in details}
    if state is not None:
        for k in ("noise_std", "l2", "residual_bound", "retrains", "num_removed"):
            out.setdefault(k, state.get(k))
    out["certified"] = bool("epsilon" in out and out.get("bound_holds", True)
                            and (out.get("budget_remaining") is None
                                 or out["budget_remaining"] >= 0))
    return out


def _timeline(ledger: Any, request_ids: Iterable[int] | None, forget_ids: list[int] | None
              ) -> list[dict[str, Any]]:
    """Submitted / claimed / applied / certified times of the requests behind this audit."""
    if ledger is None:
        if request_ids is not None:
            raise ValueError("request_ids needs ledger=...")
        return []
    if request_ids is not None:
        requests = [ledger.get(int(i)) for i in request_ids]
    else:
        wanted = set(forget_ids or [])
        requests = [r for r in ledger.list() if wanted.intersection(r.ids)]
    out = []
    for r in requests:
        events = [{"kind": e.kind, "state": e.state, "at": e.at} for e in ledger.events(r.id)]
        out.append({"request_id": r.id, "requester": r.requester, "reason": r.reason,
                    "n_ids": len(r.ids), "state": r.state, "created_at": r.created_at,
                    "events": events})
    return out
