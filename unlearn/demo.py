"""The influence demo on scikit-learn's 8x8 digits (``unlearn influence-demo``).

Steps, all deterministic for a given seed:

1. split the 1,797 digits into train / test by sample id and train an L2-regularised
   logistic regression (64 -> 10) to convergence with L-BFGS, in float64;
2. fit an influence estimator with ``damping`` equal to the L2 strength, so that the scores
   predict real retraining (the model is convex);
3. for a few test images, show the most helpful and most harmful training images
   (``influence_grid.png``, ``influence_table.txt``) and check the prediction by actually
   retraining without them;
4. flip 10% of the training labels, retrain, and rank the training set by self-influence:
   how many flipped labels are found after inspecting 10% / 20% of the data, against the
   random and the training-loss rankings (``mislabel_curve.png``);
5. write every number to ``summary.json``.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from unlearn import influence
from unlearn.data import IndexedDataset, flip_labels, load_digits
from unlearn.influence.base import InfluenceEstimator
from unlearn.influence.evaluate import DetectionCurve, found_at, mislabel_detection_curve
from unlearn.tasks import ClassificationTask
from unlearn.training import train_lbfgs

__all__ = ["DemoConfig", "FAST", "run_demo", "estimator_names", "available_estimators",
           "resolve_estimator", "DemoError"]

NUM_CLASSES = 10
BATCH = 256
#: the settings of ``unlearn influence-demo --fast``: a smaller split and no retraining check
FAST = {"n_train": 600, "n_test": 200, "retrain_check": False}
#: estimators the demo cannot build from (model, task, damping) alone, and why
_NOT_IN_DEMO = {
    "tracin": "TracIn needs checkpoints of an SGD run; the demo trains with L-BFGS",
    "sgd": "SGD-influence needs the recorded SGD trajectory; the demo trains with L-BFGS",
    "lissa": "LiSSA runs thousands of minibatch steps per solve, so the self-influence of "
    "every training image takes many minutes; see docs/index.md for using it directly",
}
#: estimators whose self-influence carries no ranking (explained in the demo's output)
_NO_SELF_INFLUENCE = {"gradientcosine": "the cosine of a gradient with itself is 1 for every "
                      "example, so its self-influence cannot rank anything (expect ~random)"}


class DemoError(ValueError):
    """A bad demo setting (reported to the user without a traceback)."""


# ---------------------------------------------------------------------------- estimators


def estimator_names() -> dict[str, str]:
    """Short CLI names -> class names, e.g. ``"ekfac" -> "EKFACInfluence"``."""
    return {
        cls.removesuffix("Influence").lower(): cls
        for cls in influence.__all__
        if cls.endswith("Influence")
    }


def _load_class(cls: str) -> type[InfluenceEstimator] | None:
    """The estimator class, or ``None`` while its module is not part of the package yet."""
    try:
        return getattr(influence, cls)
    except ModuleNotFoundError as err:
        if err.name and err.name.startswith("unlearn.influence."):
            return None
        raise


def available_estimators() -> list[str]:
    """Short names of the estimators whose module is installed."""
    return [short for short, cls in estimator_names().items() if _load_class(cls) is not None]


def resolve_estimator(name: str) -> type[InfluenceEstimator]:
    """The estimator class for a short name (``"exact"``) or class name (``"ExactInfluence"``)."""
    names = estimator_names()
    short = name.removesuffix("Influence").lower()
    if short not in names:
        raise DemoError(f"unknown estimator {name!r}; choose one of {', '.join(names)}")
    if short in _NOT_IN_DEMO:
        raise DemoError(f"estimator {name!r} cannot run in the demo: {_NOT_IN_DEMO[short]}")
    if short not in available_estimators():
        raise DemoError(
            f"estimator {name!r} ({names[short]}) is not available in this installation; "
            f"available: {', '.join(available_estimators())}"
        )
    return _load_class(names[short])  # type: ignore[return-value]


# ---------------------------------------------------------------------------- config


@dataclass
class DemoConfig:
    """Settings of the demo; ``dataclasses.replace(cfg, **FAST)`` gives the small version
    behind ``unlearn influence-demo --fast``."""

    out: Path
    estimator: str = "ekfac"
    n_train: int = 1297
    n_test: int = 500
    n_queries: int = 4
    n_top: int = 5
    l2: float = 1e-3
    flip_fraction: float = 0.1
    seed: int = 0
    retrain_check: bool = True
    progress: bool = True

    def validate(self) -> None:
        total = len(load_digits())
        if self.n_train < 50 or self.n_test < 1:
            raise DemoError(f"need n_train >= 50 and n_test >= 1, got {self.n_train}, "
                            f"{self.n_test}")
        if self.n_train + self.n_test > total:
            raise DemoError(f"n_train + n_test = {self.n_train + self.n_test} exceeds the "
                            f"{total} digits")
        if not 1 <= self.n_queries <= min(self.n_test, 20):
            raise DemoError(f"queries must be between 1 and {min(self.n_test, 20)}, got "
                            f"{self.n_queries}")
        if not 1 <= self.n_top <= 10:
            raise DemoError(f"top must be between 1 and 10, got {self.n_top}")
        if not (self.l2 > 0 and np.isfinite(self.l2)):
            raise DemoError(f"l2 must be a positive number, got {self.l2}")
        if not 0 < self.flip_fraction < 0.5:
            raise DemoError(f"flip fraction must be in (0, 0.5), got {self.flip_fraction}")
        if self.out.exists() and not self.out.is_dir():
            raise DemoError(f"--out {self.out} exists and is not a directory")


# ---------------------------------------------------------------------------- pieces


def split_digits(n_train: int, n_test: int, seed: int) -> tuple[IndexedDataset, IndexedDataset]:
    """A seeded random train / test split of the digits by sample id (each part in id order)."""
    full = load_digits()
    perm = torch.randperm(len(full), generator=torch.Generator().manual_seed(seed))
    ids = full.ids[perm]
    train = full.subset(ids[:n_train].sort().values)
    test = full.subset(ids[n_train : n_train + n_test].sort().values)
    return train, test


def loader(data: IndexedDataset) -> DataLoader:
    return DataLoader(data, batch_size=BATCH, shuffle=False)


def train_logreg(data: IndexedDataset, l2: float, init: nn.Module | None = None) -> nn.Module:
    """Softmax regression 64 -> 10 trained to convergence on ``mean CE + l2/2 ||θ||²``."""
    model = copy.deepcopy(init) if init is not None else nn.Linear(64, NUM_CLASSES).double()
    return train_lbfgs(model, ClassificationTask(), loader(data), l2)


def per_sample_losses(model: nn.Module, data: IndexedDataset) -> Tensor:
    x, y = data.tensors()[:2]
    with torch.no_grad():
        return ClassificationTask().per_sample_loss(model(x.double()), y)


def accuracy(model: nn.Module, data: IndexedDataset) -> float:
    x, y = data.tensors()[:2]
    with torch.no_grad():
        return float((model(x.double()).argmax(1) == y).double().mean())


def pick_queries(model: nn.Module, test: IndexedDataset, k: int) -> list[int]:
    """Test ids: the first ``ceil(k/2)`` correctly classified ones and the ``floor(k/2)`` with
    the highest loss (usually mistakes), so both kinds are shown."""
    x, y = test.tensors()[:2]
    with torch.no_grad():
        pred = model(x.double()).argmax(1)
    losses = per_sample_losses(model, test)
    hard = losses.argsort(descending=True)[: k // 2].tolist()
    easy = [p for p in range(len(test)) if pred[p] == y[p] and p not in hard][: k - len(hard)]
    return [int(test.ids[p]) for p in easy + hard]


def fit_estimator(name: str, model: nn.Module, data: IndexedDataset, damping: float,
                  progress: bool) -> InfluenceEstimator:
    cls = resolve_estimator(name)
    try:
        est = cls(model, ClassificationTask(), damping=damping, progress=progress)
    except TypeError as err:
        raise DemoError(f"{cls.__name__} cannot be built from (model, task, damping) for this "
                        f"demo: {err}") from err
    return est.fit(loader(data))


# ---------------------------------------------------------------------------- part (a)


def influence_examples(est: InfluenceEstimator, model: nn.Module, train: IndexedDataset,
                       test: IndexedDataset, query_ids: list[int], n_top: int
                       ) -> list[dict[str, Any]]:
    """For each query: its label, prediction, loss and the ``n_top`` most helpful / harmful
    training examples (id, label, score)."""
    queries = test.subset(query_ids)
    S = est.scores(loader(queries), loader(train))
    y_train = train.tensors()[1]
    xq, yq = queries.tensors()[:2]
    with torch.no_grad():
        pred = model(xq.double()).argmax(1)
    losses = per_sample_losses(model, queries)
    rows = []
    for q, qid in enumerate(query_ids):
        order = S[q].argsort(descending=True)

        def pick(cols: Tensor, row: int = q) -> list[dict[str, Any]]:
            return [{"id": int(train.ids[c]), "label": int(y_train[c]),
                     "score": float(S[row, c])} for c in cols.tolist()]

        rows.append({
            "id": qid, "label": int(yq[q]), "pred": int(pred[q]), "loss": float(losses[q]),
            "helpful": pick(order[:n_top]), "harmful": pick(order.flip(0)[:n_top]),
        })
    return rows


def retrain_check(model: nn.Module, train: IndexedDataset, test: IndexedDataset,
                  rows: list[dict[str, Any]], l2: float) -> list[dict[str, Any]]:
    """Retrain without each query's top helpful / harmful example, then without the whole
    group, and compare the real change of the query's loss with the summed scores."""
    out = []
    for row in rows:
        query = test.subset([row["id"]])
        base = float(per_sample_losses(model, query)[0])
        for kind in ("helpful", "harmful"):
            group = row[kind]
            for removed in ([group[0]], group) if len(group) > 1 else ([group[0]],):
                ids = [r["id"] for r in removed]
                retrained = train_logreg(train.without(ids), l2, init=model)
                actual = float(per_sample_losses(retrained, query)[0]) - base
                out.append({"query_id": row["id"], "removed": kind, "removed_ids": ids,
                            "predicted_change": sum(r["score"] for r in removed),
                            "actual_change": actual})
    return out


def format_table(rows: list[dict[str, Any]], checks: list[dict[str, Any]] | None) -> str:
    """The plain-text table printed by the demo and written to ``influence_table.txt``."""
    lines = [
        "Influence of training images on test images (digits, logistic regression).",
        "score = predicted change of the test image's loss if that training image were removed",
        "and the model retrained: positive = it helped, negative = it harmed.",
    ]
    by_query: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for c in checks or []:
        by_query.setdefault((c["query_id"], c["removed"]), []).append(c)
    width = 33
    for row in rows:
        wrong = "" if row["label"] == row["pred"] else " (wrong)"
        lines += ["", f"test id {row['id']}: label {row['label']}, predicted {row['pred']}"
                      f"{wrong}, loss {row['loss']:.4f}",
                  f"  {'most helpful (id, label, score)':<{width}}  most harmful"]
        for h, b in zip(row["helpful"], row["harmful"]):
            lines.append(f"  {_cell(h):<{width}}  {_cell(b)}")
        for kind in ("helpful", "harmful"):
            for check in by_query.get((row["id"], kind), []):
                k = len(check["removed_ids"])
                what = f"the most {kind}" if k == 1 else f"all {k} most {kind}"
                lines.append(f"  retrained without {what + ':':<21} loss change predicted "
                             f"{check['predicted_change']:+.4f}, actual "
                             f"{check['actual_change']:+.4f}")
    return "\n".join(lines)


def _cell(item: dict[str, Any]) -> str:
    return f"id {item['id']:>4}  y={item['label']}  {item['score']:+.2e}"


def plot_grid(path: Path, rows: list[dict[str, Any]], train: IndexedDataset,
              test: IndexedDataset, estimator: str) -> None:
    """One row per test image: the image, its most helpful and its most harmful training
    images, each titled with id, label and score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_top = len(rows[0]["helpful"])
    ncols = 2 * n_top + 2  # query, spacer, helpful..., harmful...
    fig, axes = plt.subplots(len(rows), ncols, figsize=(1.35 * ncols, 1.9 * len(rows) + 1.0),
                             squeeze=False,
                             gridspec_kw={"width_ratios": [1, 0.25] + [1] * (2 * n_top)})
    x_train, x_test = train.tensors()[0], test.tensors()[0]
    for r, row in enumerate(rows):
        ax = axes[r]
        q_img = x_test[test.index_of([row["id"]])[0]]
        mark = "" if row["label"] == row["pred"] else "  (wrong)"
        _show(ax[0], q_img, f"test id {row['id']}\nlabel {row['label']} pred {row['pred']}"
              f"{mark}", "tab:blue")
        ax[1].axis("off")
        items = [("helpful", "tab:green"), ("harmful", "tab:red")]
        for k, (kind, color) in enumerate(items):
            for j, item in enumerate(row[kind]):
                img = x_train[train.index_of([item["id"]])[0]]
                _show(ax[2 + k * n_top + j], img,
                      f"id {item['id']} y={item['label']}\n{item['score']:+.1e}", color)
    fig.suptitle(f"Training images that most helped / harmed each test image ({estimator})\n"
                 "score = predicted rise of the test image's loss if that training image were "
                 "removed and the model retrained", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.925), h_pad=1.2)
    for k, (kind, color) in enumerate(items):
        first = axes[0][2 + k * n_top].get_position()
        last = axes[0][1 + (k + 1) * n_top].get_position()
        fig.text((first.x0 + last.x1) / 2, first.y1 + 0.045, f"{n_top} most {kind}",
                 ha="center", va="bottom",
                 color=color, fontsize=10, fontweight="bold")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _show(ax: Any, img: Tensor, title: str, color: str) -> None:
    ax.imshow(img.reshape(8, 8).numpy(), cmap="gray_r", interpolation="nearest", vmin=0, vmax=1)
    ax.set_title(title, fontsize=7.5, color=color)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor(color)
        spine.set_linewidth(1.5)


# ---------------------------------------------------------------------------- part (b)


def mislabel_experiment(train: IndexedDataset, test: IndexedDataset, cfg: DemoConfig,
                        log: Callable[[str], None]) -> dict[str, Any]:
    """Flip labels, retrain, rank by self-influence and by loss; the found-vs-inspected
    curves and their values at 10% and 20%."""
    short = cfg.estimator.removesuffix("Influence").lower()
    if short in _NO_SELF_INFLUENCE:
        log(f"    note: {_NO_SELF_INFLUENCE[short]}")
    noisy, flipped = flip_labels(train, cfg.flip_fraction, NUM_CLASSES, seed=cfg.seed)
    log(f"flipped {len(flipped)} of {len(noisy)} training labels; retraining")
    torch.manual_seed(cfg.seed)
    model = train_logreg(noisy, cfg.l2)
    est = fit_estimator(cfg.estimator, model, noisy, cfg.l2, cfg.progress)
    is_flipped = torch.isin(noisy.ids, flipped)
    inspected = np.arange(len(noisy) + 1) / len(noisy)
    curves = {
        "self-influence": mislabel_detection_curve(est.self_influence(loader(noisy)),
                                                   is_flipped),
        "training loss": mislabel_detection_curve(per_sample_losses(model, noisy), is_flipped),
        "random": DetectionCurve(inspected, inspected, 0.5),  # the expectation of any order
    }
    return {
        "n_flipped": len(flipped),
        "n_train": len(noisy),
        "flipped_ids": flipped.tolist(),
        "test_accuracy_noisy": accuracy(model, test),
        "found_at": {name: {"10%": found_at(c, 0.1), "20%": found_at(c, 0.2)}
                     for name, c in curves.items()},
        "auc": {name: c.auc for name, c in curves.items()},
        "curves": curves,
    }


def plot_curve(path: Path, result: dict[str, Any], estimator: str, fraction: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    styles = {"self-influence": ("tab:red", "-"), "training loss": ("tab:blue", "--"),
              "random": ("gray", ":")}
    for name, curve in result["curves"].items():
        color, ls = styles[name]
        label = f"{name} ({estimator})" if name == "self-influence" else name
        if name == "random":
            label = "random order (expected)"
        else:
            label += f", AUC {curve.auc:.3f}"
        ax.plot(curve.inspected, curve.found, ls, color=color, lw=2, label=label)
    xs = np.linspace(0, 1, 200)
    ax.plot(xs, np.minimum(1, xs / fraction), color="black", lw=0.8, alpha=0.4,
            label="perfect ranking")
    for f in (0.1, 0.2):
        ax.axvline(f, color="black", lw=0.5, alpha=0.3)
        v = result["found_at"]["self-influence"][f"{int(f * 100)}%"]
        ax.annotate(f"{v:.0%}", (f, v), textcoords="offset points", xytext=(6, -12),
                    color="tab:red", fontsize=9)
    ax.set_xlim(0, min(0.5, 3 * fraction))
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("fraction of training set inspected (highest score first)")
    ax.set_ylabel("fraction of flipped labels found")
    ax.set_title(f"Mislabel detection on digits: {result['n_flipped']} of "
                 f"{result['n_train']} training labels flipped", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="center right", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------- driver


def run_demo(cfg: DemoConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the whole demo, write its files into ``cfg.out`` and return the summary."""
    cfg.validate()
    resolve_estimator(cfg.estimator)
    cfg.out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    # The models are tiny: one thread is fastest, and multi-threaded LAPACK (eigh) can be
    # 100x slower when other processes share the cores.
    torch.set_num_threads(1)
    try:
        return _run(cfg, log)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: DemoConfig, log: Callable[[str], None]) -> dict[str, Any]:
    cls = resolve_estimator(cfg.estimator)
    start = time.perf_counter()
    step = _stepper(log, start)

    step(f"1/5 digits: {cfg.n_train} train / {cfg.n_test} test; training logistic regression "
         f"(L2 {cfg.l2:g}) with L-BFGS")
    train, test = split_digits(cfg.n_train, cfg.n_test, cfg.seed)
    torch.manual_seed(cfg.seed)
    model = train_logreg(train, cfg.l2)
    test_acc = accuracy(model, test)
    log(f"    test accuracy {test_acc:.1%}")

    step(f"2/5 fitting {cls.__name__} (damping {cfg.l2:g})")
    est = fit_estimator(cfg.estimator, model, train, cfg.l2, cfg.progress)

    step(f"3/5 most helpful / harmful training images for {cfg.n_queries} test images")
    query_ids = pick_queries(model, test, cfg.n_queries)
    rows = influence_examples(est, model, train, test, query_ids, cfg.n_top)
    checks = None
    if cfg.retrain_check:
        step("    retraining without each group to check the predictions")
        checks = retrain_check(model, train, test, rows, cfg.l2)
    table = format_table(rows, checks)
    log(table)
    (cfg.out / "influence_table.txt").write_text(table + "\n")
    plot_grid(cfg.out / "influence_grid.png", rows, train, test, cls.__name__)

    step(f"4/5 mislabel detection: flipping {cfg.flip_fraction:.0%} of the training labels")
    mis = mislabel_experiment(train, test, cfg, log)
    plot_curve(cfg.out / "mislabel_curve.png", mis, cls.__name__, cfg.flip_fraction)
    for name, vals in mis["found_at"].items():
        log(f"    {name:<15} found {vals['10%']:.0%} of flipped labels in the top 10%, "
            f"{vals['20%']:.0%} in the top 20% (AUC {mis['auc'][name]:.3f})")

    step("5/5 writing summary.json")
    summary = _summary(cfg, cls.__name__, test_acc, rows, checks, mis,
                       time.perf_counter() - start)
    (cfg.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(f"done in {summary['seconds']:.1f} s; files in {cfg.out}/: influence_grid.png, "
        "influence_table.txt, mislabel_curve.png, summary.json")
    return summary


def _stepper(log: Callable[[str], None], start: float) -> Callable[[str], None]:
    def step(msg: str) -> None:
        log(f"[{time.perf_counter() - start:5.1f}s] {msg}")

    return step


def _summary(cfg: DemoConfig, estimator: str, test_acc: float, rows: list[dict[str, Any]],
             checks: list[dict[str, Any]] | None, mis: dict[str, Any], seconds: float
             ) -> dict[str, Any]:
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    config.pop("progress")
    out: dict[str, Any] = {
        "config": config,
        "estimator": estimator,
        "model": "logistic regression 64->10, float64, trained with L-BFGS to convergence",
        "test_accuracy": test_acc,
        "queries": rows,
        "retrain_check": checks,
        "mislabel": {k: v for k, v in mis.items() if k != "curves"},
        "seconds": seconds,
    }
    if checks:
        pred = np.array([c["predicted_change"] for c in checks])
        act = np.array([c["actual_change"] for c in checks])
        out["retrain_check_pearson"] = float(np.corrcoef(pred, act)[0, 1])
    return out
