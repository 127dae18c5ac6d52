"""Measure every influence estimator against the truth.

Parts (run any subset; ``--all`` runs them all, then writes the report):

* ``--loo``: L2-regularised logistic regression on breast cancer (standardised, float64,
  trained to convergence); each estimator's scores against real leave-one-out retraining.
* ``--lds-lr`` / ``--lds-mlp``: linear datamodeling score on MNIST (5,000 train / 500 query
  from the t10k file): a 784→10 logistic regression and a 784-128-10 MLP, 50 half-size
  subsets, query loss as target.
* ``--mislabel``: 10% of the 5,000 MNIST training labels flipped; rank by self-influence
  (and by training loss as a baseline); fraction of flips found after inspecting 10% / 20% of
  the data, ROC AUC, and a plot.

Every part writes ``experiments/out/influence_<part>.json``; ``--report`` (implied by every
run) rebuilds ``docs/results/influence.md`` from the JSON files present. Expensive artefacts
(trained models, leave-one-out and LDS retraining losses, per-estimator scores) are cached
under ``experiments/out/cache/`` keyed by their configuration and by the estimator's source
code, so a rerun only recomputes what changed; ``--fresh`` ignores the estimator cache.

    .venv/bin/python experiments/influence_truth.py --all
    .venv/bin/python experiments/influence_truth.py --lds-mlp --mlp-seeds 3 --only EKFAC,CG
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import hashlib
import json
import os
import platform
import re
import shlex
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import pearsonr, spearmanr
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from unlearn import influence  # noqa: E402
from unlearn.data import (  # noqa: E402
    IndexedDataset,
    flip_labels,
    from_tensors,
    load_breast_cancer,
    mnist_split,
)
from unlearn.influence.evaluate import (  # noqa: E402
    found_at,
    lds_from_losses,
    lds_subsets,
    leave_one_out_lbfgs,
    mislabel_detection_curve,
    query_losses,
    subset_query_losses,
)
from unlearn.tasks import ClassificationTask, Task  # noqa: E402
from unlearn.training import train_lbfgs  # noqa: E402

OUT = ROOT / "experiments" / "out"
CACHE = OUT / "influence_cache"


def set_out(path: Path) -> None:
    """Write JSON and caches under ``path`` instead of ``experiments/out``."""
    global OUT, CACHE
    OUT, CACHE = path, path / "influence_cache"

DOC = ROOT / "docs" / "results" / "influence.md"
PLOT = ROOT / "docs" / "results" / "mislabel_mnist.png"
PARTS = ("loo", "lds_lr", "lds_mlp", "mislabel")


def log(msg: str) -> None:
    print(f"[{dt.datetime.now():%H:%M:%S}] {msg}", flush=True)


# ============================================================================ configuration


@dataclass
class Config:
    mnist_root: Path
    n_subsets: int = 50
    fraction: float = 0.5
    mlp_seeds: int = 3
    lr_l2: float = 1e-3
    cancer_l2: float = 0.1
    cancer_removed: int = 40
    mlp_epochs: int = 20
    mlp_lr: float = 0.05
    mlp_wd: float = 1e-3
    mlp_damping: float = 1e-3
    mlp_batch: int = 64
    tracin_checkpoints: int = 5
    only: tuple[str, ...] = ()
    fresh: bool = False
    progress: bool = True
    threads: int = 1


@dataclass
class Spec:
    """One estimator as run in one part: its label, class, keyword arguments and, for the
    matrix-free solvers whose cost grows with the number of solves, a cap on the queries."""

    label: str
    cls: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    queries: int | None = None
    note: str = ""


def loo_specs(l2: float) -> list[Spec]:
    return [
        Spec("Exact", "ExactInfluence", {"damping": l2, "curvature": "hessian"}),
        Spec("CG", "CGInfluence", {"damping": l2, "tol": 1e-10, "max_iter": 500}),
        Spec("LiSSA", "LiSSAInfluence", {"damping": l2}),
        Spec("Arnoldi r=20", "ArnoldiInfluence", {"damping": l2, "rank": 20}),
        Spec("Arnoldi r=40", "ArnoldiInfluence", {"damping": l2, "rank": 40}),
        Spec("EK-FAC", "EKFACInfluence", {"damping": l2}),
        Spec("EK-FAC exact Fisher", "EKFACInfluence", {"damping": l2, "fisher": "exact"}),
        Spec("K-FAC", "KFACInfluence", {"damping": l2}),
        Spec("GradientDot", "GradientDotInfluence", {}),
        Spec("GradientCosine", "GradientCosineInfluence", {}),
    ]


def lds_lr_specs(l2: float) -> list[Spec]:
    return [
        Spec("Exact (GGN)", "ExactInfluence", {"damping": l2, "curvature": "ggn"}),
        Spec("CG (GGN)", "CGInfluence", {"damping": l2, "curvature": "ggn", "tol": 1e-4,
                                         "max_iter": 100}, queries=50,
             note="first 50 queries (each CG iteration is a pass over the data per query)"),
        Spec("LiSSA (GGN)", "LiSSAInfluence", {"damping": l2, "curvature": "ggn",
                                               "depth": 300, "batch_size": 500},
             queries=50, note="first 50 queries; depth capped at 300 steps"),
        Spec("Arnoldi r=100", "ArnoldiInfluence", {"damping": l2, "curvature": "ggn",
                                                   "rank": 100}),
        Spec("Arnoldi r=100 +complement", "ArnoldiInfluence",
             {"damping": l2, "curvature": "ggn", "rank": 100, "complement": "damping"}),
        Spec("EK-FAC", "EKFACInfluence", {"damping": l2}),
        Spec("K-FAC", "KFACInfluence", {"damping": l2}),
        Spec("GradientDot", "GradientDotInfluence", {}),
        Spec("GradientCosine", "GradientCosineInfluence", {}),
    ]


def lds_mlp_specs(damping: float) -> list[Spec]:
    sensitivity = "sensitivity to damping only; the headline uses the prescribed damping"
    return [
        Spec("EK-FAC", "EKFACInfluence", {"damping": damping}),
        Spec("EK-FAC λ×10", "EKFACInfluence", {"damping": damping * 10}, note=sensitivity),
        Spec("EK-FAC λ×100", "EKFACInfluence", {"damping": damping * 100}, note=sensitivity),
        Spec("K-FAC", "KFACInfluence", {"damping": damping}),
        Spec("CG (GGN)", "CGInfluence", {"damping": damping, "curvature": "ggn", "tol": 1e-3,
                                         "max_iter": 200, "curvature_batches": 4},
             queries=50, note="first 50 queries; curvature on 1,000 examples"),
        Spec("CG (GGN) 30 it", "CGInfluence", {"damping": damping, "curvature": "ggn",
                                               "tol": 1e-3, "max_iter": 30,
                                               "curvature_batches": 4},
             queries=50, note="as above, stopped after 30 iterations"),
        Spec("LiSSA (GGN)", "LiSSAInfluence", {"damping": damping, "curvature": "ggn",
                                               "depth": 200, "batch_size": 250},
             queries=50, note="first 50 queries; depth capped at 200 steps"),
        Spec("Arnoldi r=100", "ArnoldiInfluence", {"damping": damping, "curvature": "ggn",
                                                   "rank": 100}),
        Spec("TracIn", "TracInInfluence", {}),
        Spec("GradientDot", "GradientDotInfluence", {}),
        Spec("GradientCosine", "GradientCosineInfluence", {}),
    ]


def mislabel_specs(damping: float, model: str) -> list[Spec]:
    curv = {"curvature": "ggn"}
    specs = [
        Spec("Exact (GGN)", "ExactInfluence", {"damping": damping, **curv}),
        Spec("EK-FAC", "EKFACInfluence", {"damping": damping}),
        Spec("K-FAC", "KFACInfluence", {"damping": damping}),
        Spec("Arnoldi r=100", "ArnoldiInfluence", {"damping": damping, **curv, "rank": 100}),
        Spec("TracIn", "TracInInfluence", {}),
        Spec("GradientDot", "GradientDotInfluence", {}),
    ]
    return [s for s in specs if not (model == "lr" and s.cls == "TracInInfluence")
            and not (model == "mlp" and s.cls == "ExactInfluence")]


# ============================================================================ caching


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


_IMPORT = re.compile(r"unlearn\.influence\.(\w+)|from unlearn\.influence import (\w+)")


def source_digest(cls_name: str) -> str:
    """Hash of the estimator's module and every ``unlearn.influence`` module it imports, with
    base.py, grads.py and tasks.py: an estimator's cached result is reused only while its code
    is unchanged."""
    module = influence._WHERE[cls_name]
    seen, todo = set(), [module, "base", "grads"]
    while todo:
        name = todo.pop()
        path = ROOT / "unlearn" / "influence" / f"{name}.py"
        if name in seen or not path.exists():
            continue
        seen.add(name)
        for a, b in _IMPORT.findall(path.read_text()):
            todo.append(a or b)
    h = hashlib.sha256()
    for name in sorted(seen):
        h.update((ROOT / "unlearn" / "influence" / f"{name}.py").read_bytes())
    h.update((ROOT / "unlearn" / "tasks.py").read_bytes())
    return h.hexdigest()[:16]


def cached_model(name: str, cfg: dict, build: Callable[[], nn.Module],
                 train: Callable[[nn.Module], nn.Module]) -> nn.Module:
    """Train once per configuration; later runs load the state dict."""
    path = CACHE / "models" / f"{name}-{_digest(cfg)}.pt"
    model = build()
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        model.eval()
        return model
    t0 = time.perf_counter()
    model = train(model)
    log(f"trained {name} in {time.perf_counter() - t0:.1f}s")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model


# ============================================================================ running estimators


@dataclass
class Run:
    """What one estimator produced in one part."""

    spec: Spec
    status: str  # ok | failed | unavailable
    values: np.ndarray | None = None
    fit_s: float | None = None
    score_s: float | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _estimator_class(name: str) -> type | None:
    try:
        return getattr(influence, name)
    except (ImportError, AttributeError):
        return None


def _diagnostics(est: Any) -> dict[str, Any]:
    out = {}
    for attr in ("last_iterations", "last_depth", "last_converged", "scale_value"):
        if hasattr(est, attr):
            v = getattr(est, attr)
            out[attr] = v if isinstance(v, (int, float, bool, type(None))) else str(v)
    if getattr(est, "last_residuals", None) is not None:
        out["max_residual"] = float(est.last_residuals.max())
    return out


def run_estimator(spec: Spec, part: str, model: nn.Module, task: Task,
                  compute: Callable[[Any], Tensor], key: dict, cfg: Config,
                  extra_kwargs: dict | None = None) -> Run:
    """Build, fit and score one estimator, or reuse its cached result."""
    cls = _estimator_class(spec.cls)
    if cls is None:
        return Run(spec, "unavailable", error=f"{spec.cls} does not import")
    full_key = {**key, "part": part, "cls": spec.cls, "kwargs": spec.kwargs,
                "queries": spec.queries, "source": source_digest(spec.cls)}
    path = CACHE / "scores" / part / f"{re.sub(r'[^A-Za-z0-9]+', '_', spec.label)}-" \
                                     f"{_digest(full_key)}.npz"
    if path.exists() and not cfg.fresh:
        with np.load(path, allow_pickle=False) as f:
            meta = json.loads(str(f["meta"]))
            return Run(spec, "ok", f["values"], meta["fit_s"], meta["score_s"],
                       extra={**meta["extra"], "cached": True})
    log(f"  {spec.label}: fitting")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            est = cls(model, task, **spec.kwargs, **(extra_kwargs or {}), progress=cfg.progress)
            t0 = time.perf_counter()
            est.fit(compute.train_loader)  # type: ignore[attr-defined]
            t1 = time.perf_counter()
            values = compute(est)
            t2 = time.perf_counter()
    except Exception as err:  # one estimator failing must not stop the others
        tb = traceback.format_exception_only(type(err), err)[-1].strip()
        log(f"  {spec.label}: FAILED: {tb}")
        return Run(spec, "failed", error=tb)
    extra = _diagnostics(est)
    msgs = sorted({str(w.message)[:300] for w in caught
                   if not issubclass(w.category, DeprecationWarning)})
    if msgs:
        extra["warnings"] = msgs
    vals = values.detach().double().cpu().numpy()
    if not np.isfinite(vals).all():
        return Run(spec, "failed", error="scores contain NaN or inf", fit_s=t1 - t0)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"fit_s": t1 - t0, "score_s": t2 - t1, "extra": extra, "key": full_key}
    np.savez(path, values=vals, meta=np.array(json.dumps(meta, default=str)))
    log(f"  {spec.label}: fit {t1 - t0:.1f}s, scoring {t2 - t1:.1f}s")
    return Run(spec, "ok", vals, t1 - t0, t2 - t1, extra=extra)


class ScoresOn:
    """``compute(est)`` = scores of (a prefix of) the queries on the training loader."""

    def __init__(self, train_loader: DataLoader, query_dataset: Dataset, batch: int,
                 n_queries: int | None = None) -> None:
        self.train_loader = train_loader
        n = len(query_dataset)  # type: ignore[arg-type]
        self.n = n if n_queries is None else min(n, n_queries)
        subset = query_dataset.subset(query_dataset.ids[: self.n]) \
            if isinstance(query_dataset, IndexedDataset) else query_dataset
        self.query_loader = DataLoader(subset, batch_size=batch, shuffle=False)

    def __call__(self, est: Any) -> Tensor:
        return est.scores(self.query_loader, self.train_loader)


class SelfInfluenceOn:
    def __init__(self, train_loader: DataLoader) -> None:
        self.train_loader = train_loader

    def __call__(self, est: Any) -> Tensor:
        return est.self_influence(self.train_loader)


def selected(specs: list[Spec], cfg: Config) -> list[Spec]:
    if not cfg.only:
        return specs
    return [s for s in specs if any(o.lower() in s.label.lower() for o in cfg.only)]


def run_record(run: Run, **metrics: Any) -> dict[str, Any]:
    return {"label": run.spec.label, "class": run.spec.cls, "kwargs": run.spec.kwargs,
            "queries": run.spec.queries, "note": run.spec.note, "status": run.status,
            "error": run.error, "fit_s": run.fit_s, "score_s": run.score_s,
            "diagnostics": run.extra, **metrics}


# ============================================================================ models and data


def mnist_lr() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(784, 10).double()


def mnist_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))


def as_double(ds: IndexedDataset) -> IndexedDataset:
    x, y = ds.tensors()
    return from_tensors(x.double(), y, ids=ds.ids)


def accuracy(model: nn.Module, ds: Dataset) -> float:
    correct, total = 0, 0
    with torch.no_grad():
        for _, x, y in DataLoader(ds, batch_size=2048):
            p = next(model.parameters())
            correct += int((model(x.to(p.dtype)).argmax(1) == y).sum())
            total += len(y)
    return correct / total


def lr_trainer(l2: float) -> Callable[[Dataset, nn.Module | None], nn.Module]:
    """Convex retraining: L-BFGS to convergence on the subset's own mean loss + l2/2||θ||²,
    warm-started from ``init`` (the optimum is unique, so the start only changes the time)."""
    task = ClassificationTask()

    def train_fn(dataset: Dataset, init: nn.Module | None) -> nn.Module:
        model = init if init is not None else mnist_lr()
        loader = DataLoader(dataset, batch_size=len(dataset), shuffle=False)  # type: ignore
        return train_lbfgs(model, task, loader, l2)

    return train_fn


@contextlib.contextmanager
def threads(n: int):
    """Small models train much faster on one thread, above all on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def mlp_trainer(cfg: Config, checkpoints: list | None = None) -> Callable[..., nn.Module]:
    """SGD (momentum 0.9, batch ``mlp_batch``, weight decay ``mlp_wd``) for ``mlp_epochs``
    epochs with the learning rate decayed linearly to 0, from a seeded initialisation and a
    seeded shuffle, on one thread. ``checkpoints`` (a list) receives ``(state_dict, lr)``
    pairs for TracIn."""
    task = ClassificationTask()

    def train_fn(dataset: IndexedDataset, init: nn.Module | None,
                 seed: int | None = 0) -> nn.Module:
        seed = 0 if seed is None else seed
        x, y = dataset.tensors()
        torch.manual_seed(seed)
        model = mnist_mlp()
        g = torch.Generator().manual_seed(seed)
        opt = torch.optim.SGD(model.parameters(), lr=cfg.mlp_lr, momentum=0.9,
                              weight_decay=cfg.mlp_wd)
        steps = -(-len(y) // cfg.mlp_batch)
        total = cfg.mlp_epochs * steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / total)
        every = max(1, cfg.mlp_epochs // max(cfg.tracin_checkpoints, 1))
        model.train()
        with threads(1):
            for epoch in range(cfg.mlp_epochs):
                lr_start = sched.get_last_lr()[0]
                perm = torch.randperm(len(y), generator=g)
                for s in range(steps):
                    idx = perm[s * cfg.mlp_batch : (s + 1) * cfg.mlp_batch]
                    opt.zero_grad()
                    task.per_sample_loss(model(x[idx]), y[idx]).mean().backward()
                    opt.step()
                    sched.step()
                if checkpoints is not None and (cfg.mlp_epochs - 1 - epoch) % every == 0:
                    # TracInCP: the checkpoint after the epoch, weighted by the epoch's mean lr
                    lr_mean = 0.5 * (lr_start + sched.get_last_lr()[0])
                    checkpoints.append((copy.deepcopy(model.state_dict()), lr_mean))
        model.eval()
        return model

    return train_fn


def mnist_data(cfg: Config) -> tuple[IndexedDataset, IndexedDataset, IndexedDataset]:
    return mnist_split(cfg.mnist_root, n_train=5000, n_query=500, seed=0, flatten=True)


# ============================================================================ part (a): LOO


def part_loo(cfg: Config) -> dict[str, Any]:
    """The main setting (l2 = ``cancer_l2``, every estimator) and a weakly regularised one
    (l2 = ``cancer_l2`` / 10, the curvature-based estimators only) that shows where the
    first-order approximation itself, not the estimators, starts to fail."""
    settings = [loo_setting(cfg, cfg.cancer_l2, loo_specs(cfg.cancer_l2))]
    weak = cfg.cancer_l2 / 10
    keep = ("Exact", "CG", "EK-FAC")
    settings.append(loo_setting(cfg, weak, [s for s in loo_specs(weak) if s.label in keep]))
    return {"settings": settings}


def loo_setting(cfg: Config, l2: float, specs: list[Spec]) -> dict[str, Any]:
    task = ClassificationTask()
    data = load_breast_cancer()
    x, y = data.tensors()
    x = x.double()
    n_train = 400
    train = from_tensors(x[:n_train], y[:n_train])
    query = from_tensors(x[n_train:], y[n_train:], ids=range(n_train, len(y)))
    setup = {"data": "breast_cancer", "n_train": n_train, "l2": l2, "dtype": "float64"}
    log(f"LOO setting l2={l2}")

    def fit(m: nn.Module) -> nn.Module:
        return train_lbfgs(m, task, DataLoader(train, batch_size=n_train), l2)

    def build() -> nn.Module:
        torch.manual_seed(0)
        return nn.Linear(30, 2).double()

    model = cached_model("cancer_lr", setup, build, fit)
    removed = np.sort(np.random.default_rng(0).choice(n_train, cfg.cancer_removed,
                                                      replace=False))
    truth = cached_array("loo_truth", {**setup, "removed": removed.tolist(),
                                       "model": model_digest(model)},
                         lambda: leave_one_out_lbfgs(model, task, train, query, removed, l2,
                                                     progress=cfg.progress).numpy())
    log(f"LOO truth: {truth.shape[1]} removals x {truth.shape[0]} queries, |Δloss| up to "
        f"{np.abs(truth).max():.2e}")
    train_loader = DataLoader(train, batch_size=100, shuffle=False)
    compute = ScoresOn(train_loader, query, batch=len(query))
    key = {**setup, "model": model_digest(model)}
    rows = []
    for spec in selected(specs, cfg):
        run = run_estimator(spec, "loo", model, task, compute, key, cfg)
        metrics = {}
        if run.status == "ok":
            pred = run.values[:, removed]
            metrics = {"pearson": float(pearsonr(pred.ravel(), truth.ravel())[0]),
                       "spearman": float(spearmanr(pred.ravel(), truth.ravel())[0]),
                       "scale_ratio": float(np.linalg.lstsq(truth.reshape(-1, 1),
                                                            pred.ravel(), rcond=None)[0][0])}
            log(f"  {spec.label}: Pearson {metrics['pearson']:.4f}, Spearman "
                f"{metrics['spearman']:.4f}")
        rows.append(run_record(run, **metrics))
    return {"setup": {**setup, "n_query": len(query), "n_removed": len(removed),
                      "max_abs_truth": float(np.abs(truth).max()),
                      "train_accuracy": accuracy(model, train),
                      "query_accuracy": accuracy(model, query)},
            "estimators": rows}


def cached_array(name: str, key: dict, compute: Callable[[], np.ndarray]) -> np.ndarray:
    path = CACHE / f"{name}-{_digest(key)}.npy"
    if path.exists():
        return np.load(path)
    value = np.asarray(compute())
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, value)
    return value


# ============================================================================ part (b): LDS


def part_lds_lr(cfg: Config) -> dict[str, Any]:
    task, l2 = ClassificationTask(), cfg.lr_l2
    train, query, heldout = (as_double(d) for d in mnist_data(cfg))
    setup = {"data": "mnist-t10k 5000/500 seed 0", "model": "linear 784->10", "l2": l2,
             "dtype": "float64", "trainer": "L-BFGS to convergence (tol 1e-10)"}
    train_fn = lr_trainer(l2)
    model = cached_model("mnist_lr", setup, mnist_lr, lambda m: train_fn(train, m))
    seeds = (0,)
    losses, subsets, retrain_s = lds_target(cfg, "lr", setup, train_fn, train, query, task,
                                            seeds, init_model=model)
    train_loader = DataLoader(train, batch_size=500, shuffle=False)
    rows = lds_rows(cfg, "lds_lr", lds_lr_specs(l2), model, task, train_loader, query,
                    subsets, losses, {**setup, "model_digest": model_digest(model)})
    return {"setup": {**setup, "n_subsets": cfg.n_subsets, "fraction": cfg.fraction,
                      "seeds": list(seeds), "retrain_s": retrain_s,
                      "train_accuracy": accuracy(model, train),
                      "heldout_accuracy": accuracy(model, heldout)},
            "estimators": rows}


def part_lds_mlp(cfg: Config) -> dict[str, Any]:
    task = ClassificationTask()
    train, query, heldout = mnist_data(cfg)
    setup = {"data": "mnist-t10k 5000/500 seed 0", "model": "MLP 784-128-10 ReLU",
             "dtype": "float32", "optimizer": "SGD momentum 0.9, linear lr decay to 0",
             "loop": "tensor-indexed minibatches, 1 thread",
             "lr": cfg.mlp_lr, "epochs": cfg.mlp_epochs, "batch": cfg.mlp_batch,
             "weight_decay": cfg.mlp_wd}
    checkpoints: list = []
    train_fn = mlp_trainer(cfg)

    def fit(_: nn.Module) -> nn.Module:
        return mlp_trainer(cfg, checkpoints)(train, None, seed=0)

    model = cached_model("mnist_mlp", setup, mnist_mlp, fit)
    seeds = tuple(range(cfg.mlp_seeds))
    losses, subsets, retrain_s = lds_target(cfg, "mlp", setup, train_fn, train, query, task,
                                            seeds)
    ckpts = tracin_checkpoints(cfg, setup, train, checkpoints)
    train_loader = DataLoader(train, batch_size=250, shuffle=False)
    rows = lds_rows(cfg, "lds_mlp", lds_mlp_specs(cfg.mlp_damping), model, task, train_loader,
                    query, subsets, losses, {**setup, "model_digest": model_digest(model)},
                    tracin=ckpts)
    return {"setup": {**setup, "n_subsets": cfg.n_subsets, "fraction": cfg.fraction,
                      "seeds": list(seeds), "retrain_s": retrain_s,
                      "seed_consistency": seed_consistency("mlp", setup, seeds),
                      "damping": cfg.mlp_damping,
                      "train_accuracy": accuracy(model, train),
                      "heldout_accuracy": accuracy(model, heldout)},
            "estimators": rows}


def tracin_checkpoints(cfg: Config, setup: dict, train: Dataset, fresh: list) -> dict | None:
    """The full model's per-epoch checkpoints and learning rates (cached with the model)."""
    path = CACHE / "models" / f"mnist_mlp_tracin-{_digest(setup)}-{cfg.tracin_checkpoints}.pt"
    if fresh:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"states": [s for s, _ in fresh], "lrs": [lr for _, lr in fresh]}, path)
    if not path.exists():  # the model was cached before: retrain deterministically
        got: list = []
        mlp_trainer(cfg, got)(train, None, seed=0)
        torch.save({"states": [s for s, _ in got], "lrs": [lr for _, lr in got]}, path)
    saved = torch.load(path, weights_only=True)
    return {"checkpoints": saved["states"], "learning_rates": saved["lrs"]}


def lds_target(cfg: Config, name: str, setup: dict, train_fn: Callable, train: Dataset,
               query: Dataset, task: Task, seeds: tuple[int, ...],
               init_model: nn.Module | None = None) -> tuple[Tensor, Tensor, float]:
    subsets = lds_subsets(len(train), cfg.n_subsets, cfg.fraction, seed=0)
    cache = CACHE / f"lds_{name}_losses-{_digest(setup)}.npz"
    log(f"LDS target for {name}: {cfg.n_subsets} subsets x {len(seeds)} seed(s) "
        f"(cached at {cache})")
    t0 = time.perf_counter()
    losses = subset_query_losses(train_fn, train, query, task, subsets, seeds,
                                 init_model=init_model, cache=cache, meta=setup,
                                 progress=cfg.progress)
    elapsed = time.perf_counter() - t0
    log(f"LDS target for {name} ready ({elapsed:.0f}s this run)")
    return losses, subsets, elapsed


def seed_consistency(name: str, setup: dict, seeds: tuple[int, ...]) -> float | None:
    """Mean over queries of the Spearman correlation, across subsets, between the losses of
    seed 0 and the mean of the other seeds: how reproducible the target itself is."""
    if len(seeds) < 2:
        return None
    with np.load(CACHE / f"lds_{name}_losses-{_digest(setup)}.npz") as f:
        first = f[f"losses_{seeds[0]}"]
        rest = np.mean([f[f"losses_{s}"] for s in seeds[1:]], axis=0)
    from unlearn.influence.evaluate import _spearman_columns

    return float(np.nanmean(_spearman_columns(first, rest)))


def lds_rows(cfg: Config, part: str, specs: list[Spec], model: nn.Module, task: Task,
             train_loader: DataLoader, query: Dataset, subsets: Tensor, losses: Tensor,
             key: dict, tracin: dict | None = None) -> list[dict]:
    rows = []
    for spec in selected(specs, cfg):
        extra = tracin if spec.cls == "TracInInfluence" else None
        if spec.cls == "TracInInfluence" and tracin is None:
            continue
        compute = ScoresOn(train_loader, query, batch=100, n_queries=spec.queries)
        run = run_estimator(spec, part, model, task, compute, key, cfg, extra)
        metrics: dict[str, Any] = {}
        if run.status == "ok":
            out = lds_from_losses(run.values, subsets, losses[:, : compute.n])
            metrics = {"lds": out["lds"], "n_queries": compute.n,
                       "lds_std_over_queries": float(np.nanstd(out["per_query"])),
                       "per_query": [round(float(v), 4) for v in out["per_query"]]}
            log(f"  {spec.label}: LDS {out['lds']:.3f} over {compute.n} queries")
        rows.append(run_record(run, **metrics))
    return rows


# ============================================================================ part (c): mislabels


def part_mislabel(cfg: Config) -> dict[str, Any]:
    task = ClassificationTask()
    clean, _, heldout = mnist_data(cfg)
    noisy, flipped = flip_labels(clean, 0.1, num_classes=10, seed=0)
    mask = np.zeros(len(noisy), dtype=bool)
    mask[noisy.index_of(flipped)] = True
    log(f"mislabel: {int(mask.sum())} of {len(mask)} labels flipped")
    out: dict[str, Any] = {"setup": {"data": "mnist-t10k 5000 train, 10% labels flipped "
                                             "(flip_labels seed 0)",
                                     "n_flipped": int(mask.sum())}, "models": {}}
    curves: dict[str, dict[str, Any]] = {}
    for name in ("lr", "mlp"):
        res, curves[name] = mislabel_model(cfg, name, noisy, heldout, task, mask)
        out["models"][name] = res
    plot_curves(curves, PLOT, float(mask.mean()))
    return out


def mislabel_model(cfg: Config, name: str, noisy: IndexedDataset, heldout: IndexedDataset,
                   task: Task, mask: np.ndarray) -> tuple[dict, dict]:
    checkpoints: list = []
    if name == "lr":
        data, held = as_double(noisy), as_double(heldout)
        setup = {"model": "linear 784->10", "l2": cfg.lr_l2, "noisy": True, "dtype": "float64"}
        fn = lr_trainer(cfg.lr_l2)
        model = cached_model("mnist_lr_noisy", setup, mnist_lr, lambda m: fn(data, m))
        damping, batch, tracin = cfg.lr_l2, 500, None
    else:
        data, held = noisy, heldout
        setup = {"model": "MLP 784-128-10", "noisy": True, "lr": cfg.mlp_lr,
                 "loop": "tensor-indexed minibatches, 1 thread",
                 "epochs": cfg.mlp_epochs, "batch": cfg.mlp_batch, "weight_decay": cfg.mlp_wd}
        model = cached_model("mnist_mlp_noisy", setup, mnist_mlp,
                             lambda _: mlp_trainer(cfg, checkpoints)(data, None, seed=0))
        damping, batch = cfg.mlp_damping, 250
        tracin = tracin_checkpoints(cfg, {**setup, "noisy": True}, data, checkpoints)
    log(f"mislabel {name}: train acc (noisy labels) {accuracy(model, data):.3f}, "
        f"held-out acc {accuracy(model, held):.3f}")
    loader = DataLoader(data, batch_size=batch, shuffle=False)
    key = {**setup, "model_digest": model_digest(model)}
    rows, curves = [], {}
    loss = query_losses(model, task, data).numpy()
    rows.append(mislabel_row("training loss (baseline)", loss, mask, curves))
    rows[-1].update({"status": "ok", "class": None})
    for spec in selected(mislabel_specs(damping, name), cfg):
        extra = tracin if spec.cls == "TracInInfluence" else None
        run = run_estimator(spec, f"mislabel_{name}", model, task, SelfInfluenceOn(loader),
                            key, cfg, extra)
        metrics = {}
        if run.status == "ok":
            metrics = mislabel_row(spec.label, run.values, mask, curves)
        rows.append(run_record(run, **metrics))
    res = {"setup": {**setup, "damping": damping, "train_accuracy_noisy": accuracy(model, data),
                     "heldout_accuracy": accuracy(model, held)},
           "estimators": rows}
    return res, curves


def mislabel_row(label: str, values: np.ndarray, mask: np.ndarray, curves: dict) -> dict:
    curve = mislabel_detection_curve(values, mask)
    curves[label] = curve
    r = {"label": label, "found_at_10": found_at(curve, 0.1), "found_at_20": found_at(curve, 0.2),
         "auc": curve.auc}
    log(f"  {label}: found {r['found_at_10']:.3f} at 10%, {r['found_at_20']:.3f} at 20%, "
        f"AUC {r['auc']:.3f}")
    return r


def plot_curves(curves: dict[str, dict], path: Path, flipped: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 4.5), squeeze=False)
    titles = {"lr": "logistic regression", "mlp": "MLP 784-128-10"}
    for ax, (name, by_label) in zip(axes[0], curves.items()):
        for label, curve in by_label.items():
            style = "--" if "baseline" in label else "-"
            ax.plot(curve.inspected, curve.found, style, label=f"{label} (AUC {curve.auc:.3f})")
        ax.plot([0, 1], [0, 1], ":", color="grey", label="random")
        ax.plot([0, flipped, 1], [0, 1, 1], ":", color="black", label="perfect")
        ax.set_xlim(0, 0.4)
        ax.set_ylim(0, 1)
        ax.set_xlabel("fraction of training data inspected")
        ax.set_ylabel("fraction of flipped labels found")
        ax.set_title(f"MNIST, 10% flipped: {titles.get(name, name)}")
        ax.legend(fontsize=7, loc="lower right")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ============================================================================ report

ANCHORS_LR = {"Exact (GGN)": "0.91 (exact inverse Hessian); dattri ≈ 0.80",
              "CG (GGN)": "dattri ≈ 0.80", "EK-FAC": "0.80 (kronfluence)",
              "GradientDot": "0.20"}
ANCHORS_MLP = {"EK-FAC": "0.47 (kronfluence, damping 1e-3)", "GradientDot": "0.14",
               "CG (GGN)": "dattri ≈ 0.26", "TracIn": "TRAK-50: 0.45 (dattri, not run here)"}
TARGETS = {"loo": {"Exact": 0.99, "CG": 0.99, "EK-FAC": 0.95, "LiSSA": 0.95},
           "lds_lr": {"Exact (GGN)": 0.90, "CG (GGN)": 0.90, "EK-FAC": 0.80},
           "lds_mlp": {"EK-FAC": 0.47}}


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "unknown"
    with contextlib.suppress(OSError, IndexError, ValueError):
        kb = int(Path("/proc/meminfo").read_text().split("\n")[0].split()[1])
        mem = f"{kb / 2**20:.1f} GiB"
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"nproc": os.cpu_count(), "cpu": cpu, "ram": mem, "torch_threads":
            torch.get_num_threads(), "torch": torch.__version__, "python":
            platform.python_version(), "load_avg_at_start": load}


def fmt(v: Any, spec: str = ".3f") -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def verdict(part: str, label: str, value: float | None) -> str:
    base = label.split(" r=")[0] if part != "loo" else label.split(" r=")[0]
    target = TARGETS.get(part, {}).get(base)
    if target is None or value is None:
        return ""
    return f"≥ {target} {'✅' if value >= target else '❌ missed'}"


def header(res: dict) -> list[str]:
    m = res["machine"]
    load = m.get("load_avg_at_start")
    load_s = " / ".join(f"{v:.1f}" for v in load) if load else "unknown"
    return [f"Command: `{res['command']}`  ",
            f"Date: {res['date']}  ",
            f"Machine: {m['nproc']} × {m['cpu']} cores, {m['ram']} RAM, torch {m['torch']} "
            f"with {m['torch_threads']} thread(s); load average at start {load_s} (1/5/15 "
            "min; other jobs shared the machine, so times are upper bounds)  ",
            f"Part wall time: {res['wall_s']:.0f} s (cached artefacts reused: see "
            "`experiments/README.md`)", ""]


def setup_line(s: dict, keys: tuple[str, ...]) -> str:
    return "; ".join(f"{k.replace('_', ' ')} {s[k]}" for k in keys if k in s)


def md_summary(results: dict) -> list[str]:
    """Every estimator with a target, its number and whether it met the target."""
    rows = []
    if "loo" in results:
        for r in results["loo"]["settings"][0]["estimators"]:
            if r["label"] in TARGETS["loo"]:
                rows.append(("LOO Pearson, breast cancer LR", r, r.get("pearson"),
                             TARGETS["loo"][r["label"]]))
    for part, what in (("lds_lr", "LDS, MNIST LR"), ("lds_mlp", "LDS, MNIST MLP")):
        if part in results:
            for r in results[part]["estimators"]:
                if r["label"] in TARGETS[part]:
                    rows.append((what, r, r.get("lds"), TARGETS[part][r["label"]]))
    if not rows:
        return []
    lines = ["## Summary against the targets", "",
             "| check | estimator | measured | target | met |", "|---|---|---|---|---|"]
    for what, r, value, target in rows:
        ok = value is not None and value >= target
        n = f" ({r['n_queries']} queries)" if r.get("n_queries") else ""
        lines.append(f"| {what} | {r['label']}{n} | {fmt(value)} | ≥ {target} | "
                     f"{'yes' if ok else '**no**'} |")
    walls = {p: res["wall_s"] for p, res in results.items()}
    lines += ["", "Wall time per part of the runs recorded here: " + ", ".join(
        f"{p} {w:.0f} s" for p, w in walls.items()) + f" (total {sum(walls.values()):.0f} s).",
        ""]
    return lines


def md_loo(res: dict) -> list[str]:
    lines = ["## (a) Leave-one-out on breast cancer", ""] + header(res)
    for k, setting in enumerate(res["settings"]):
        s = setting["setup"]
        lines += [
            f"**l2 = damping = {s['l2']}**" + ("" if k == 0 else
                                                " (weak regularisation, large removals)"),
            "",
            f"L2-regularised logistic regression (2 logits, float64), {s['n_train']} training "
            f"examples, trained to convergence with L-BFGS; train / query accuracy "
            f"{s['train_accuracy']:.3f} / {s['query_accuracy']:.3f}. Truth: retraining "
            f"without each of {s['n_removed']} random training points (warm-started L-BFGS, "
            f"normaliser n), loss change on all {s['n_query']} held-out queries (largest "
            f"|change| {s['max_abs_truth']:.3g}); correlations over all (query, removed) "
            "pairs. `scale` is the least-squares slope of the scores on the truth (1 = the "
            "leave-one-out scale).", "",
            *([] if k == 0 else [
                "Where Exact and CG agree with each other but less with retraining, the gap "
                "is the first-order (influence-function) approximation itself: one removal "
                "moves a weakly regularised model further than a linearisation follows.",
                ""]),
            "| estimator | Pearson | Spearman | scale | fit s | score s | target | notes |",
            "|---|---|---|---|---|---|---|---|"]
        for r in setting["estimators"]:
            target = verdict("loo", r["label"], r.get("pearson")) if k == 0 else ""
            lines.append(
                f"| {r['label']} | {fmt(r.get('pearson'), '.4f')} | "
                f"{fmt(r.get('spearman'), '.4f')} | {fmt(r.get('scale_ratio'), '.3f')} | "
                f"{fmt(r['fit_s'], '.2f')} | {fmt(r['score_s'], '.2f')} | {target} | "
                f"{notes(r)} |")
        lines.append("")
    return lines


def notes(r: dict) -> str:
    parts = []
    if r["status"] != "ok":
        parts.append(f"**{r['status']}**: {r['error']}")
    if r.get("note"):
        parts.append(r["note"])
    d = r.get("diagnostics") or {}
    for k in ("last_iterations", "last_depth", "last_converged", "max_residual"):
        if k in d:
            parts.append(f"{k}={fmt(d[k], '.3g') if isinstance(d[k], float) else d[k]}")
    if d.get("warnings"):
        parts.append("warned: " + "; ".join(w[:140] for w in d["warnings"]))
    return "; ".join(parts).replace("|", "\\|").replace("\n", " ")


def md_lds(res: dict, part: str, title: str, anchors: dict) -> list[str]:
    s = res["setup"]
    acc = (f"train / held-out accuracy {s['train_accuracy']:.3f} / "
           f"{s['heldout_accuracy']:.3f}")
    seeds = f"{len(s['seeds'])} training seed(s) per subset ({s['seeds']})"
    cons = s.get("seed_consistency")
    keys = ("data", "model", "dtype", "trainer", "optimizer", "lr", "epochs", "batch",
            "weight_decay", "l2", "damping")
    lines = [f"## (b) LDS: {title}", ""] + header(res) + [
        f"Setup: {setup_line(s, keys)}; retraining for the target took "
        f"{s['retrain_s']:.0f} s in this run (0 when cached).", "",
        f"{acc}. {s['n_subsets']} random subsets of {s['fraction']:.0%} of the training "
        f"data, {seeds}; target = query loss averaged over seeds; LDS = mean over queries of "
        "the Spearman correlation across subsets."
        + (f" Seed-to-seed consistency of the target itself (Spearman between seed 0 and the "
           f"mean of the other seeds): {cons:.3f}." if cons is not None else ""), "",
        "| estimator | LDS (ours) | queries | fit s | score s | target | anchor (not measured "
        "here) | notes |", "|---|---|---|---|---|---|---|---|"]
    full = [r for r in res["estimators"] if r.get("per_query")]
    n_all = max((r["n_queries"] for r in full), default=0)
    ref = next((r for r in full if r["n_queries"] == n_all), None)
    for r in res["estimators"]:
        note = notes(r)
        if ref is not None and r.get("per_query") and r["n_queries"] < n_all:
            same = float(np.nanmean(np.asarray(ref["per_query"][: r["n_queries"]], float)))
            note = f"{ref['label']} on the same queries: {same:.3f}; " + note
        lines.append(
            f"| {r['label']} | {fmt(r.get('lds'))} | {fmt(r.get('n_queries'))} | "
            f"{fmt(r['fit_s'], '.1f')} | {fmt(r['score_s'], '.1f')} | "
            f"{verdict(part, r['label'], r.get('lds'))} | {anchors.get(r['label'], '')} | "
            f"{note} |")
    return lines + [""]


def md_mislabel(res: dict) -> list[str]:
    lines = ["## (c) Mislabel detection on MNIST", ""] + header(res) + [
        f"{res['setup']['data']}: {res['setup']['n_flipped']} flipped. Each model is trained "
        "on the noisy labels (same recipe as in (b)); training examples are inspected in "
        "decreasing self-influence (the baseline: decreasing training loss). Columns: fraction "
        "of the flipped labels found after inspecting 10% / 20% of the data, and the ROC AUC "
        "of the ranking. Curves: `docs/results/mislabel_mnist.png`.", ""]
    for name, m in res["models"].items():
        s = m["setup"]
        lines += [f"**{ {'lr': 'Logistic regression', 'mlp': 'MLP'}[name] }** (damping "
                  f"{s['damping']}; accuracy on the noisy training labels "
                  f"{s['train_accuracy_noisy']:.3f}, held-out {s['heldout_accuracy']:.3f})", "",
                  "| ranking | found @10% | found @20% | AUC | fit s | score s | notes |",
                  "|---|---|---|---|---|---|---|"]
        for r in m["estimators"]:
            lines.append(f"| {r['label']} | {fmt(r.get('found_at_10'))} | "
                         f"{fmt(r.get('found_at_20'))} | {fmt(r.get('auc'))} | "
                         f"{fmt(r.get('fit_s'), '.1f')} | {fmt(r.get('score_s'), '.1f')} | "
                         f"{notes(r) if 'diagnostics' in r else ''} |")
        lines.append("")
    return lines + ["![mislabel detection curves](mislabel_mnist.png)", ""]


def write_report() -> None:
    results = {p: json.loads((OUT / f"influence_{p}.json").read_text())
               for p in PARTS if (OUT / f"influence_{p}.json").exists()}
    lines = ["# Influence estimators against the truth", "",
             "Generated by `experiments/influence_truth.py` from the JSON files in "
             "`experiments/out/`; each section names the command, machine and date that made "
             "it. Score convention: `scores[q, i]` predicts `loss_q(θ without i) − loss_q(θ)`. "
             "Anchor numbers are published or previously measured figures given for "
             "comparison; they were not produced by this script.", ""]
    lines += md_summary(results)
    if "loo" in results:
        lines += md_loo(results["loo"])
    if "lds_lr" in results:
        lines += md_lds(results["lds_lr"], "lds_lr", "logistic regression on MNIST", ANCHORS_LR)
    if "lds_mlp" in results:
        lines += md_lds(results["lds_mlp"], "lds_mlp", "MLP on MNIST", ANCHORS_MLP)
    if "mislabel" in results:
        lines += md_mislabel(results["mislabel"])
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text("\n".join(lines))
    log(f"wrote {DOC.relative_to(ROOT)}")


# ============================================================================ main


PART_FUNCS = {"loo": part_loo, "lds_lr": part_lds_lr, "lds_mlp": part_lds_mlp,
              "mislabel": part_mislabel}


def parse_args(argv: list[str] | None = None) -> tuple[list[str], Config]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--all", action="store_true", help="run every part")
    for part in PARTS:
        p.add_argument(f"--{part.replace('_', '-')}", action="store_true", dest=part)
    p.add_argument("--report", action="store_true", help="only rebuild the markdown")
    p.add_argument("--out", type=Path, default=OUT,
                   help="folder for the JSON results and the caches (default experiments/out)")
    p.add_argument("--mnist-root", type=Path, default=ROOT.parent / "shared/data/mnist-t10k")
    p.add_argument("--n-subsets", type=int, default=50)
    p.add_argument("--mlp-seeds", type=int, default=3)
    p.add_argument("--mlp-epochs", type=int, default=20)
    p.add_argument("--only", default="", help="comma-separated estimator labels (substrings)")
    p.add_argument("--fresh", action="store_true", help="ignore cached estimator results")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared 2-core machine one thread was "
                        "2-5x faster than two; try 2 on an idle machine)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    parts = list(PARTS) if a.all else [q for q in PARTS if getattr(a, q)]
    if not parts and not a.report:
        p.error("choose --all, one or more parts (--loo --lds-lr --lds-mlp --mislabel) or "
                "--report")
    if a.n_subsets < 3 or a.mlp_seeds < 1 or a.mlp_epochs < 1 or a.threads < 1:
        p.error("--n-subsets must be >= 3; --mlp-seeds, --mlp-epochs and --threads >= 1")
    cfg = Config(mnist_root=a.mnist_root, n_subsets=a.n_subsets, mlp_seeds=a.mlp_seeds,
                 mlp_epochs=a.mlp_epochs, only=tuple(o for o in a.only.split(",") if o),
                 fresh=a.fresh, progress=not a.no_progress, threads=a.threads)
    set_out(a.out.resolve())
    return parts, cfg


def main(argv: list[str] | None = None) -> None:
    parts, cfg = parse_args(argv)
    torch.set_num_threads(cfg.threads)
    command = ".venv/bin/python experiments/influence_truth.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    OUT.mkdir(parents=True, exist_ok=True)
    for part in parts:
        log(f"=== part {part}")
        info = machine()
        t0 = time.perf_counter()
        res = PART_FUNCS[part](cfg)
        path = OUT / f"influence_{part}.json"
        if cfg.only and path.exists():  # merge a partial rerun into the previous results
            res = merge(json.loads(path.read_text()), res)
        res.update(command=command, date=dt.datetime.now().isoformat(timespec="seconds"),
                   machine=info, wall_s=time.perf_counter() - t0)
        tmp = path.with_suffix(".json.partial")
        tmp.write_text(json.dumps(res, indent=1, default=_json_default))
        os.replace(tmp, path)
        log(f"=== part {part} done in {res['wall_s']:.0f}s -> {path}")
    write_report()


def merge(old: dict, new: dict) -> dict:
    """Replace the rows of re-run estimators in ``old``; keep the others."""
    def merge_rows(a: list[dict], b: list[dict]) -> list[dict]:
        fresh = {r["label"]: r for r in b}
        kept = [fresh.pop(r["label"], r) for r in a]
        return kept + list(fresh.values())

    out = dict(new)
    if "settings" in new and "settings" in old and len(old["settings"]) == len(new["settings"]):
        out["settings"] = [{**n, "estimators": merge_rows(o["estimators"], n["estimators"])}
                           for o, n in zip(old["settings"], new["settings"])]
    if "estimators" in new and "estimators" in old:
        out["estimators"] = merge_rows(old["estimators"], new["estimators"])
    if "models" in new and "models" in old:
        out["models"] = {k: {**v, "estimators": merge_rows(
            old["models"].get(k, {}).get("estimators", []), v["estimators"])}
            for k, v in new["models"].items()}
    return out


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


if __name__ == "__main__":
    main()
