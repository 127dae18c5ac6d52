"""Every removal method against retraining on MNIST: accuracy, MIA efficacy, time.

    .venv/bin/python experiments/unlearning_mnist.py --quick        # 1 seed, MLP, small check
    .venv/bin/python experiments/unlearning_mnist.py                # 3 seeds, MLP + CNN
    .venv/bin/python experiments/unlearning_mnist.py --report       # rebuild the markdown only

Data: the 10,000 t10k digits of ``../shared/data/mnist-t10k``, split once (fixed permutation,
seed 0) into 8,000 train / 2,000 test. Seeds vary the model initialisation, the training
order and the forget sets. Forget settings: 1%, 5%, 10% of the training set at random, and
every training digit of one class (``--forget-class``, default 3).

For each (model, seed) the original model is trained once on all 8,000 digits (recipe below,
timed), an EK-FAC estimator is fitted on it once (the one-off cost of the Newton removal, timed
and reported separately) and a SISA ensemble is trained once. For each forget setting the
reference is a model retrained from scratch on the retained digits with the same recipe and
seed. Each method gets the original model, a forget loader and a retain loader and returns an
unlearned model (``RemovalMethod.unlearn``); its seconds are ``RemovalResult.seconds``.

Columns: accuracy on the forget, retain and test digits; MIA efficacy (a logistic-regression
attack on loss/confidence/entropy trained on retain vs test outputs of the evaluated model,
balanced, scored on the forget set: fraction called non-member); average absolute gap of these
four numbers to the retrained model's (percentage points); seconds; speed-up = retrain seconds
/ method seconds. SISA is its own ensemble (5 shards x 3 slices): its unlearning equals
SISA retrained from scratch on the retained data by construction (same partition and seeds),
so its row is compared, like every other row, with the single retrained model.

No hyper-parameter is tuned on the test split: the baselines run with their documented
defaults, IAU with its defaults (chosen by ``experiments/iau_check.py --tune`` on a
validation split carved out of the training digits), Newton with damping ``--newton-damping``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from baselines import (  # noqa: E402
    SCRUB,
    SISA,
    FineTune,
    FisherForgetting,
    NegGrad,
    NegGradPlus,
    RandomLabel,
    Recipe,
    Retrain,
    SalUn,
)
from baselines.retrain import fit, seeded  # noqa: E402
from unlearn.audit import accuracy, average_gap, mia_efficacy  # noqa: E402
from unlearn.data import IndexedDataset, load_mnist  # noqa: E402
from unlearn.removal.base import RemovalMethod  # noqa: E402
from unlearn.tasks import ClassificationTask  # noqa: E402

TASK = ClassificationTask()
OUT = ROOT / "experiments/out/unlearning_mnist.json"
DOC = ROOT / "docs/results/unlearning.md"
TUNING = ROOT / "experiments/tuned/unlearning_newton_tuning.json"
TUNING_IAU = ROOT / "experiments/tuned/unlearning_iau_ekfac_tuning.json"
#: the average gap's four numbers: accuracies and the soft MIA efficacy (see ``evaluate``)
GAP = ("forget_acc", "retain_acc", "test_acc", "mia_soft")


def doc_path(out: Path) -> Path:
    """The markdown: ``docs/results/unlearning.md`` for the default ``--out``, else next to it
    (so a ``--quick`` run with its own ``--out`` never overwrites the published results)."""
    return DOC if out.resolve() == OUT.resolve() else out.with_suffix(".md")


def cert_path(out: Path) -> Path:
    return out.with_name(out.stem + "_certified.json")
SETTINGS = ("random1", "random5", "random10", "class")
MODELS = ("mlp", "cnn")
METHODS = ("retrain", "iau", "iau_faithful", "iau_ekfac", "newton", "finetune", "neggrad",
           "neggrad_plus", "scrub", "salun", "fisher", "random_label", "sisa")
LABELS = {"retrain": "Retrain (reference)", "iau": "IAU (default, scaled)",
          "iau_faithful": "IAU (faithful)", "iau_ekfac": "IAU + EK-FAC",
          "newton": "Newton (EK-FAC)",
          "finetune": "FineTune", "neggrad": "NegGrad", "neggrad_plus": "NegGrad+",
          "scrub": "SCRUB", "salun": "SalUn", "fisher": "Fisher", "random_label": "RandomLabel",
          "sisa": "SISA (5x3 ensemble)"}
RECIPES = {"mlp": Recipe(epochs=10, lr=0.05, batch_size=64, optimizer="sgd", momentum=0.9,
                         weight_decay=5e-4),
           "cnn": Recipe(epochs=8, lr=1e-3, batch_size=64, optimizer="adam", weight_decay=5e-4)}


# ---------------------------------------------------------------------------- models


def mlp() -> nn.Module:
    """784-256-10 ReLU MLP."""
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))


class LeNet(nn.Module):
    """The LeNet-5-style CNN of the IAU reference code (conv 6@5x5, pool, conv 16@5x5, pool,
    120-84-10), for 1x28x28 digits (the first convolution pads by 2, as LeNet-5 does)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        x = x.flatten(1)
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


FACTORIES: dict[str, Callable[[], nn.Module]] = {"mlp": mlp, "cnn": LeNet}


# ---------------------------------------------------------------------------- data


def load_split(root: str, n_train: int, n_test: int) -> tuple[IndexedDataset, IndexedDataset]:
    """Fixed train/test split of the t10k digits (permutation seed 0, same for every seed)."""
    full = load_mnist(root, train=False, flatten=False)
    if n_train + n_test > len(full):
        raise ValueError(f"n_train={n_train} + n_test={n_test} exceed {len(full)} digits")
    perm = torch.randperm(len(full), generator=torch.Generator().manual_seed(0)).tolist()
    return (full.subset(sorted(perm[:n_train])),
            full.subset(sorted(perm[n_train:n_train + n_test])))


def forget_ids(train: IndexedDataset, setting: str, seed: int, forget_class: int) -> torch.Tensor:
    if setting == "class":
        y = train.tensors()[1]
        return train.ids[y == forget_class]
    frac = {"random1": 0.01, "random5": 0.05, "random10": 0.10}[setting]
    g = torch.Generator().manual_seed(10_000 + seed)
    k = int(round(frac * len(train)))
    return train.ids[torch.randperm(len(train), generator=g)[:k]].sort().values


# ---------------------------------------------------------------------------- evaluation


def loaders(train: IndexedDataset, test: IndexedDataset, ids: torch.Tensor
            ) -> dict[str, DataLoader]:
    forget, retain = train.subset(ids), train.without(ids)
    return {"forget": DataLoader(forget, batch_size=256),
            "retain": DataLoader(retain, batch_size=256),
            "test": DataLoader(test, batch_size=512)}


def evaluate(model: nn.Module, ld: dict[str, DataLoader], seed: int) -> dict[str, float]:
    """Accuracies and the MIA efficacy, hard (share of forget digits called non-member) and
    soft (mean non-member probability): the hard one is what papers report, the soft one is
    what the gap uses, since the hard one is dominated by noise where the attack is near
    chance (``experiments/mia_noise.py`` measures how much each moves between attack fits)."""
    mia = mia_efficacy(model, forget=ld["forget"], retain=ld["retain"], test=ld["test"],
                       seed=seed)
    return {"forget_acc": accuracy(model, ld["forget"]),
            "retain_acc": accuracy(model, ld["retain"]),
            "test_acc": accuracy(model, ld["test"]),
            "mia_efficacy": mia.efficacy, "mia_soft": mia.soft_efficacy,
            "mia_attack_train_acc": mia.attack_train_accuracy}


def gap_to(row: dict[str, float], ref: dict[str, float]) -> dict[str, float]:
    """``gap`` (with the soft MIA efficacy) and ``gap_hard`` (with the hard one) to ``ref``."""
    return {"gap": average_gap(row, ref, GAP), "gap_hard": average_gap(row, ref)}


def train_model(kind: str, data: IndexedDataset, seed: int) -> tuple[nn.Module, float]:
    """Train a fresh model on ``data`` with the kind's recipe under ``seed``; seconds."""
    start = time.perf_counter()
    with seeded(seed) as gen:
        model = FACTORIES[kind]()
        fit(model, TASK, DataLoader(data, batch_size=256), RECIPES[kind], gen)
    return model, time.perf_counter() - start


def make_method(name: str, kind: str, seed: int, ctx: dict[str, Any],
                args: argparse.Namespace, overrides: dict[str, Any] | None = None
                ) -> RemovalMethod:
    """The method ``name`` for model ``kind``: library defaults, then the values chosen on the
    validation split (``args.tuned``, see ``unlearning_tuning``), then ``overrides``."""
    from unlearning_tuning import overrides as tuned_overrides

    rec = RECIPES[kind]
    kw = {**tuned_overrides(getattr(args, "tuned", {}), kind, name), **(overrides or {})}
    kw.pop("retain_batch_size", None)  # the retain loader's, see method_retain
    if kw and name in ("retrain", "iau_faithful", "newton"):
        raise ValueError(f"{name} takes no tuned hyper-parameters, got {kw}")
    if name == "retrain":
        return Retrain(TASK, FACTORIES[kind], recipe=rec, seed=seed)
    if name == "iau":
        from unlearn.removal.iau import IAU
        return IAU(TASK, weight_decay=rec.weight_decay, **kw)
    if name == "iau_faithful":
        from unlearn.removal.iau import IAU
        return IAU(TASK, mode="faithful")
    if name == "iau_ekfac":  # the scaled mode preconditioned by Newton's EK-FAC fit
        from unlearn.removal.iau import IAU
        return IAU(TASK, weight_decay=rec.weight_decay, estimator=ctx["ekfac_iau"], **kw)
    if name == "newton":
        from unlearn.removal.newton import NewtonRemoval
        return NewtonRemoval(TASK, estimator=ctx["ekfac"])
    simple: dict[str, Callable[..., RemovalMethod]] = {
        "finetune": FineTune, "neggrad": NegGrad, "neggrad_plus": NegGradPlus, "scrub": SCRUB,
        "salun": SalUn, "random_label": RandomLabel}
    if name == "fisher":  # the empirical Fisher: the exact one costs 10 passes per sample
        return FisherForgetting(TASK, fisher="empirical", seed=seed, **kw)
    return simple[name](TASK, seed=seed, **kw)


def method_retain(name: str, retain: DataLoader, seed: int, args: argparse.Namespace,
                  batch_size: int = 128) -> DataLoader:
    """The retain loader a method gets: IAU reads shuffled batches of ``batch_size`` (a
    random subsample for its correction; the size chosen on the validation split, see
    :func:`iau_batch_size`), Fisher a random subsample of ``--fisher-samples``."""
    if name in ("iau", "iau_ekfac"):
        return DataLoader(retain.dataset, batch_size=batch_size, shuffle=True,
                          generator=torch.Generator().manual_seed(seed))
    if name == "fisher":  # the Fisher diagonal from a random retain subsample
        return _subsample(retain, args.fisher_samples, seed)
    return retain


IAU_RETAIN_BATCH = 128  # IAU's retain batch size where none was chosen on the validation split


def iau_batch_size(args: argparse.Namespace, kind: str, name: str) -> int:
    """The retain batch size chosen for IAU ``name`` on ``kind`` (``--tune-methods``)."""
    from unlearning_tuning import overrides as tuned_overrides

    got = tuned_overrides(getattr(args, "tuned", {}), kind, name)
    return int(got.get("retain_batch_size", IAU_RETAIN_BATCH))


def fit_ekfac(model: nn.Module, train: IndexedDataset, damping: float) -> tuple[Any, float]:
    from unlearn.influence import EKFACInfluence

    start = time.perf_counter()
    est = EKFACInfluence(model, TASK, damping=damping, progress=False)
    est.fit(DataLoader(train, batch_size=256))
    return est, time.perf_counter() - start


def newton_damping(spec: str, kind: str) -> float:
    """``--newton-damping``: one float for every model, or ``mlp=0.1,cnn=1``."""
    if "=" not in spec:
        return float(spec)
    table = dict(part.split("=", 1) for part in spec.split(","))
    if kind not in table:
        raise ValueError(f"--newton-damping {spec!r} gives no value for model {kind!r}")
    return float(table[kind])


def _damping_text(runs: list[dict[str, Any]], key: str = "newton_damping",
                  fallback: str | None = None) -> str:
    per = {}
    for r in runs:
        if key in r:
            per.setdefault(r["model"].upper(), set()).add(r[key])
    return ", ".join(f"{k} {'/'.join(f'{v:g}' for v in sorted(vs))}" for k, vs in per.items()
                     ) or (f"{fallback} (`--newton-damping`)" if fallback else "see the JSON")


def tune_newton(args: argparse.Namespace, log: Callable[[str], None],
                method: str = "newton") -> dict[str, Any]:
    """Choose the EK-FAC damping of ``method`` (the Newton removal, or ``iau_ekfac``) on a
    validation split carved out of the training digits (the test digits are never read):
    seed 0, 10% random forgetting."""
    from unlearning_tuning import fold_for, validation_split

    from unlearn.removal.iau import IAU
    from unlearn.removal.newton import NewtonRemoval

    sub, val, _ = validation_split(args)
    out: dict[str, Any] = {}
    for kind in args.models:
        fold = fold_for(kind, 0, args, ekfac=False)
        original, ld, ref = fold["original"], fold["ld"], fold["ref"]
        gaps = {}
        for damping in args.tune_dampings:
            est, _ = fit_ekfac(original, sub, damping)
            if method == "newton":
                model = NewtonRemoval(TASK, estimator=est).unlearn(
                    original, forget=ld["forget"]).model
            else:
                retain = DataLoader(ld["retain"].dataset, batch_size=128, shuffle=True,
                                    generator=torch.Generator().manual_seed(0))
                model = IAU(TASK, weight_decay=RECIPES[kind].weight_decay, estimator=est
                            ).unlearn(original, forget=ld["forget"], retain=retain).model
            gaps[damping] = average_gap(evaluate(model, ld, 0), ref, GAP)
            log(f"  tune {method} {kind} damping {damping:g}: validation gap "
                f"{gaps[damping]:.2f} pp")
        out[kind] = {"gaps": {f"{k:g}": v for k, v in gaps.items()},
                     "best": min(gaps, key=gaps.__getitem__)}
    spec = ",".join(f"{k}={v['best']:g}" for k, v in out.items())
    flag = "--newton-damping" if method == "newton" else "--iau-ekfac-damping"
    log(f"  chosen: {flag} {spec}")
    return {"validation": f"{len(sub)} train / {len(val)} validation digits out of the "
                          f"{len(sub) + len(val)} training digits", "per_model": out,
            "spec": spec}


def fit_sisa(kind: str, train: IndexedDataset, seed: int) -> tuple[SISA, nn.Module, float]:
    sisa = SISA(TASK, FACTORIES[kind], n_shards=5, n_slices=3, recipe=RECIPES[kind], seed=seed)
    start = time.perf_counter()
    ens = sisa.fit(train)
    return sisa, ens, time.perf_counter() - start


def run_one(kind: str, seed: int, train: IndexedDataset, test: IndexedDataset,
            args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    """All settings and methods for one (model, seed)."""
    original, train_s = train_model(kind, train, seed)
    ctx: dict[str, Any] = {}
    rec: dict[str, Any] = {"model": kind, "seed": seed, "train_seconds": train_s,
                           "settings": {}}
    log(f"[{kind} seed {seed}] trained in {train_s:.1f}s, test acc "
        f"{accuracy(original, DataLoader(test, batch_size=512)):.4f}")
    if "newton" in args.methods or "iau_ekfac" in args.methods:
        damping = newton_damping(args.newton_damping, kind)
        ctx["ekfac"], rec["ekfac_fit_seconds"] = fit_ekfac(original, train, damping)
        rec["newton_damping"] = damping
        log(f"  EK-FAC fitted in {rec['ekfac_fit_seconds']:.1f}s")
    if "iau_ekfac" in args.methods:
        damping = (rec["newton_damping"] if args.iau_ekfac_damping == "newton"
                   else newton_damping(args.iau_ekfac_damping, kind))
        rec["iau_ekfac_damping"] = damping
        if damping == rec["newton_damping"]:  # reuse Newton's fit: one fit serves both
            ctx["ekfac_iau"] = ctx["ekfac"]
            rec.pop("ekfac_iau_fit_seconds", None)
        else:
            ctx["ekfac_iau"], rec["ekfac_iau_fit_seconds"] = fit_ekfac(original, train, damping)
            log(f"  EK-FAC (damping {damping:g}) for IAU fitted in "
                f"{rec['ekfac_iau_fit_seconds']:.1f}s")
    if "sisa" in args.methods:
        sisa, ens, rec["sisa_train_seconds"] = fit_sisa(kind, train, seed)
        log(f"  SISA trained in {rec['sisa_train_seconds']:.1f}s")
    for setting in args.settings:
        ids = forget_ids(train, setting, seed, args.forget_class)
        ld = loaders(train, test, ids)
        rows: dict[str, Any] = {"n_forget": len(ids),
                                "original": evaluate(original, ld, seed)}
        ref_time = None
        for name in ["retrain"] + [m for m in args.methods if m != "retrain"]:
            if name == "sisa":
                res = sisa.unlearn(ens, forget=ld["forget"], retain=ld["retain"])
            else:
                method = make_method(name, kind, seed, ctx, args)
                retain = method_retain(name, ld["retain"], seed, args,
                                       iau_batch_size(args, kind, name))
                try:
                    res = method.unlearn(original, forget=ld["forget"], retain=retain)
                except (FloatingPointError, RuntimeError, ValueError) as err:
                    if name == "retrain":
                        raise
                    rows[name] = {"error": f"{type(err).__name__}: {err}"}
                    log(f"  {setting:8s} {name:13s} FAILED: {rows[name]['error']}")
                    continue
            row = {**evaluate(res.model, ld, seed), "seconds": res.seconds,
                   "details": _jsonable(res.details)}
            if name == "retrain":
                ref_time, ref = res.seconds, row
            row.update(gap_to(row, ref))
            row["speedup"] = ref_time / res.seconds if res.seconds > 0 else math.inf
            rows[name] = row
            log(f"  {setting:8s} {name:13s} forget {row['forget_acc']:.3f} retain "
                f"{row['retain_acc']:.3f} test {row['test_acc']:.3f} mia "
                f"{row['mia_efficacy']:.3f}/{row['mia_soft']:.3f} gap {row['gap']:6.2f}pp "
                f"{res.seconds:8.3f}s "
                f"x{row['speedup']:.0f}")
        rows["original"].update(gap_to(rows["original"], rows["retrain"]))
        rec["settings"][setting] = rows
    return rec


def _subsample(loader: DataLoader, k: int, seed: int) -> DataLoader:
    data = loader.dataset
    assert isinstance(data, IndexedDataset)
    if k >= len(data):
        return loader
    pick = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:k]
    return DataLoader(data.subset(data.ids[pick.sort().values]), batch_size=loader.batch_size)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (int, float, str, bool)) or obj is None:
        return obj
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    return str(obj)


# ---------------------------------------------------------------------------- certified


def run_certified(train: IndexedDataset, test: IndexedDataset, args: argparse.Namespace,
                  log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Certified removal (Guo et al.) on L2 logistic regression over unit-norm pixels.

    Per seed: (a) the 1% forget set removed as a sequence of requests of ``--cert-request``
    digits (the model returned by one request is passed to the next, so the residual bound
    accumulates and retraining is triggered when it passes the budget), and (b) the 10% forget
    set removed in one request. Each is compared with ``train_certifiable`` on the retained
    digits under the same seed (the first noise draw)."""
    from unlearn.removal.base import split_loaders
    from unlearn.removal.certified import CertifiedRemoval, UnitNorm, train_certifiable

    rows = []
    kw = {"l2": args.cert_l2, "noise_std": args.cert_sigma, "features": UnitNorm()}
    xt, yt = test.tensors()
    for seed in range(args.seeds):
        start = time.perf_counter()
        model = train_certifiable(DataLoader(train, batch_size=1024), seed=seed, **kw)
        train_s = time.perf_counter() - start
        method = CertifiedRemoval(None, epsilon=args.cert_epsilon, delta=args.cert_delta)
        for setting, size in (("random1", args.cert_request), ("random10", None)):
            ids = forget_ids(train, setting, seed, args.forget_class)
            chunks = [ids] if size is None else list(torch.split(ids, size))
            current, m, seconds, details = train, model, 0.0, []
            for chunk in chunks:
                forget, retain = split_loaders(current, chunk, batch_size=2048)
                res = method.unlearn(m, forget=forget, retain=retain)
                current, m = current.without(chunk), res.model
                seconds += res.seconds
                details.append(_jsonable(res.details))
            start = time.perf_counter()
            retrained = train_certifiable(DataLoader(current, batch_size=1024), seed=seed, **kw)
            retrain_s = time.perf_counter() - start
            last = details[-1]
            row = {"seed": seed, "setting": setting, "n_forget": len(ids),
                   "requests": len(chunks), "request_size": len(chunks[0]),
                   "train_seconds": train_s, "retrain_seconds": retrain_s, "seconds": seconds,
                   "test_acc": _acc(m, xt, yt), "retrain_test_acc": _acc(retrained, xt, yt),
                   "original_test_acc": _acc(model, xt, yt),
                   "retrains": sum(bool(d["retrained"]) for d in details),
                   "max_bound_step": max(d["bound_step"] for d in details),
                   "bound_holds_all": all(d["bound_holds"] for d in details),
                   "max_residual_actual": max(d["residual_actual"] for d in details),
                   "max_residual_bound": max(d["residual_bound"] for d in details),
                   **{k: last[k] for k in ("epsilon", "delta", "noise_std", "l2", "c",
                                           "budget", "residual_bound", "residual_actual",
                                           "epsilon_spent")},
                   "requests_detail": details}
            rows.append(row)
            log(f"  certified {setting} seed {seed} ({len(chunks)} request(s)): test "
                f"{row['test_acc']:.4f} vs retrain {row['retrain_test_acc']:.4f}; retrains "
                f"{row['retrains']}, max step bound {row['max_bound_step']:.3g}, budget "
                f"{row['budget']:.3g}, bound holds {row['bound_holds_all']}; {seconds:.2f}s vs "
                f"{retrain_s:.2f}s")
    return rows


def _acc(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).double().mean())


# ---------------------------------------------------------------------------- report


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        ram = f"{kb / 2**20:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return {"nproc": os.cpu_count(), "cpu": cpu, "ram": ram, "torch": torch.__version__,
            "python": platform.python_version(), "torch_threads": torch.get_num_threads(),
            "loadavg": [round(x, 2) for x in os.getloadavg()]}


def machine_text(mach: dict[str, Any]) -> str:
    return (f"{mach['nproc']} CPU cores, {mach['cpu']}, {mach['ram']} RAM; torch "
            f"{mach['torch']} with {mach['torch_threads']} thread(s); no GPU")


def provenance() -> dict[str, Any]:
    """How a result file was made: the command line, the date, the commit, the machine."""
    return {"command": "python experiments/unlearning_mnist.py " + " ".join(sys.argv[1:]),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": _git_rev(), "machine": machine()}


def provenance_text(record: dict[str, Any], path: Path) -> str:
    """``record``'s provenance in words; for files written before it was recorded, what git
    knows of the file instead."""
    prov = record.get("provenance")
    if prov:
        return (f"by `{prov['command']}` on {prov['date']} (commit {prov['commit']}; "
                f"{machine_text(prov['machine'])})")
    try:
        log = subprocess.run(["git", "log", "-1", "--format=%h %cd", "--date=format:%Y-%m-%d",
                              "--", str(path)], cwd=ROOT, capture_output=True, text=True,
                             check=False).stdout.strip()
    except OSError:
        log = ""
    return ("at a date and on a machine the file does not record (it predates provenance "
            "records" + (f"; last committed in {log}" if log else "") + ")")


def _ms(vals: list[float], scale: float = 100.0, digits: int = 1) -> str:
    a = np.asarray(vals, dtype=float) * scale
    if len(a) == 1:
        return f"{a[0]:.{digits}f}"
    return f"{a.mean():.{digits}f} ± {a.std(ddof=1):.{digits}f}"


def _time(s: float) -> str:
    return f"{s:.3f}" if s < 1 else f"{s:.1f}"


def _speed(x: float) -> str:
    return f"{x:.0f}×" if x >= 10 else f"{x:.1f}×" if x >= 0.95 else f"{x:.2f}×"


def pareto(points: dict[str, tuple[float, float]]) -> set[str]:
    """Methods not dominated in (gap, seconds): nobody else is at least as good in both and
    strictly better in one."""
    front = set()
    for m, (g, t) in points.items():
        if not any((g2 <= g and t2 <= t) and (g2 < g or t2 < t)
                   for m2, (g2, t2) in points.items() if m2 != m):
            front.add(m)
    return front


def summarise(runs: list[dict[str, Any]], kind: str, setting: str) -> list[dict[str, Any]]:
    recs = [r["settings"][setting] for r in runs if r["model"] == kind and setting in
            r["settings"]]
    if not recs:
        return []
    names = ["original"] + [m for m in METHODS if all(m in rec for rec in recs)]
    out = []
    for m in names:
        failed = [rec[m]["error"] for rec in recs if "error" in rec[m]]
        rows = [rec[m] for rec in recs if "error" not in rec[m]]
        if not rows:
            out.append({"method": m, "n": 0, "failed": failed})
            continue
        out.append({"method": m, "n": len(rows), "failed": failed,
                    **{k: [row.get(k, math.nan) for row in rows] for k in
                       ("forget_acc", "retain_acc", "test_acc", "mia_efficacy", "mia_soft",
                        "gap", "gap_hard")},
                    "seconds": [row.get("seconds", math.nan) for row in rows],
                    "speedup": [row.get("speedup", math.nan) for row in rows]})
    return out


def table(summary: list[dict[str, Any]]) -> list[str]:
    pts = {s["method"]: (float(np.mean(s["gap"])),
                         0.0 if s["method"] == "original" else float(np.mean(s["seconds"])))
           for s in summary if s["n"] and not s["failed"]}
    front = pareto(pts)
    lines = ["| method | forget acc | retain acc | test acc | MIA efficacy (soft) | avg gap "
             "(pp) | MIA efficacy (hard) | gap with hard MIA (pp) | time (s) | speed-up | "
             "Pareto |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        m = s["method"]
        if not s["n"]:
            lines.append(f"| {LABELS.get(m, m)} | failed in every seed: {s['failed'][0][:90]} "
                         "| | | | | | | | | |")
            continue
        if m == "original":
            label, t, sp = "original (no removal)", "0", "–"
            par = "**✓**" if m in front else ""
        else:
            label = LABELS.get(m, m)
            t = _time(float(np.mean(s["seconds"])))
            sp = "1×" if m == "retrain" else _speed(float(np.mean(s["speedup"])))
            par = "**✓**" if m in front else ""
            if s["failed"]:
                label += f" (failed in {len(s['failed'])} seed(s): {s['failed'][0][:60]})"
        lines.append(f"| {label} | {_ms(s['forget_acc'])} | {_ms(s['retain_acc'])} | "
                     f"{_ms(s['test_acc'])} | {_ms(s['mia_soft'])} | "
                     f"**{_ms(s['gap'], 1.0, 2)}** | {_ms(s['mia_efficacy'])} | "
                     f"{_ms(s['gap_hard'], 1.0, 2)} | {t} | {sp} | {par} |")
    return lines


def _shared(runs: list[dict[str, Any]]) -> str:
    """' (and IAU + EK-FAC, same estimator)' where every run's IAU + EK-FAC reused it."""
    return (" (and IAU + EK-FAC, same estimator)" if all(
        "iau_ekfac_damping" in r and "ekfac_iau_fit_seconds" not in r for r in runs) else "")


def ekfac_verdict(runs: list[dict[str, Any]], kind: str) -> str | None:
    """The target line for IAU + EK-FAC at 10% random, with its one-off fit beside the speed-up:
    speed-up with the fit = retrain s / (removal s + fit s), per seed, averaged."""
    rows = [(r, r["settings"]["random10"]) for r in runs if r["model"] == kind
            and "random10" in r["settings"] and "iau_ekfac" in r["settings"]["random10"]]
    if not rows or len(rows) != sum(r["model"] == kind for r in runs):
        return None  # none, or not every seed has the row yet
    if any("error" in rec["iau_ekfac"] for _, rec in rows):
        return f"* **{kind.upper()}**, 10% random: IAU + EK-FAC failed in some seed (see JSON)."
    gap = float(np.mean([rec["iau_ekfac"]["gap"] for _, rec in rows]))
    hard = float(np.mean([rec["iau_ekfac"].get("gap_hard", math.nan) for _, rec in rows]))
    sp = float(np.mean([rec["iau_ekfac"]["speedup"] for _, rec in rows]))
    fit = [r.get("ekfac_iau_fit_seconds", r.get("ekfac_fit_seconds", math.nan)) for r, _ in rows]
    ref = [rec["iau_ekfac"].get("retrain_seconds_same_run", rec["retrain"]["seconds"])
           for _, rec in rows]
    with_fit = float(np.mean([t / (rec["iau_ekfac"]["seconds"] + f)
                              for t, f, (_, rec) in zip(ref, fit, rows)]))
    ok = gap <= 1.5 and sp >= 50
    misses = " and ".join(w for w, bad in (("gap", gap > 1.5), ("speed-up", sp < 50)) if bad)
    lam = "/".join(f"{v:g}" for v in sorted({r["iau_ekfac_damping"] for r, _ in rows
                                             if "iau_ekfac_damping" in r})) or "see the JSON"
    return (f"* **{kind.upper()}**, 10% random forgetting: IAU + EK-FAC (λ = {lam}) average gap "
            f"{gap:.2f} pp (target ≤ 1.5; {hard:.2f} pp with the hard MIA efficacy), "
            f"speed-up per removal {_speed(sp)} (target ≥ 50×): "
            f"**{'met' if ok else 'NOT met'}**" + ("" if ok else f" ({misses} misses)")
            + f". Its one-off EK-FAC fit takes {np.mean(fit):.1f} s (retraining here: "
            f"{np.mean(ref):.1f} s), so counting the fit for a single removal the speed-up is "
            f"{_speed(with_fit)}; the fit is paid once per trained model and amortised over "
            "later removals.")


def held_out_text(runs: list[dict[str, Any]], kind: str, method: str, seeds: list[int]) -> str:
    """`` On seeds …: gap …, speed-up …`` for ``method`` at 10% random over ``seeds`` (those
    added after every hyper-parameter was chosen), or ``""``."""
    recs = [r["settings"]["random10"][method] for r in runs if r["model"] == kind
            and r["seed"] in seeds and method in r["settings"].get("random10", {})]
    recs = [x for x in recs if "error" not in x]
    if not recs:
        return ""
    return (f" On the seeds added after every choice was made ({', '.join(map(str, seeds))}) "
            f"alone: gap {np.mean([x['gap'] for x in recs]):.2f} pp, speed-up "
            f"{_speed(float(np.mean([x['speedup'] for x in recs])))}.")


def held_out_seeds(meta: dict[str, Any], method: str) -> list[int]:
    """Seeds added (``--resume``) after the last ``--update`` of ``method``'s rows: their
    rows were made with choices fixed before those seeds were run."""
    last = max((u["date"] for u in meta.get("updates", []) if method in u["methods"]),
               default="")
    return [s for res in meta.get("resumed", []) if res["date"] > last for s in res["seeds"]]


def verdict(runs: list[dict[str, Any]], held: dict[str, list[int]] | None = None
            ) -> list[str]:
    out = []
    for kind in MODELS:
        summ = {s["method"]: s for s in summarise(runs, kind, "random10") if s["n"]}
        if "iau" not in summ:
            continue
        gap = float(np.mean(summ["iau"]["gap"]))
        hard = float(np.mean(summ["iau"]["gap_hard"]))
        sp = float(np.mean(summ["iau"]["speedup"]))
        ok = gap <= 1.5 and sp >= 50
        misses = " and ".join(w for w, bad in (("gap", gap > 1.5), ("speed-up", sp < 50)) if bad)
        line = (f"* **{kind.upper()}**, 10% random forgetting: IAU default average gap "
                f"{gap:.2f} pp (target ≤ 1.5; {hard:.2f} pp with the hard MIA efficacy), "
                f"speed-up {sp:.0f}× (target ≥ 50×): "
                f"**{'met' if ok else 'NOT met'}**" + ("" if ok else f" ({misses} misses)"))
        if "iau_faithful" in summ:
            line += (f"; faithful mode: gap {np.mean(summ['iau_faithful']['gap']):.2f} pp, "
                     f"{_speed(float(np.mean(summ['iau_faithful']['speedup'])))}")
        line += f"; no removal at all: gap {np.mean(summ['original']['gap']):.2f} pp."
        out.append(line + held_out_text(runs, kind, "iau", (held or {}).get("iau", [])))
        extra = ekfac_verdict(runs, kind)
        if extra:
            out.append(extra + held_out_text(runs, kind, "iau_ekfac",
                                             (held or {}).get("iau_ekfac", [])))
        bound = work_bound(runs, kind)
        if bound:
            out.append(bound)
    return out


def work_bound(runs: list[dict[str, Any]], kind: str) -> str | None:
    """How many per-example gradients IAU + EK-FAC computes against retraining, at 10% random
    forgetting (mean over seeds, read from each removal's details): the speed-up it could reach
    if every example cost the same and nothing else did (a forward-only pass counts a third of
    a gradient)."""
    rows = [rec["iau_ekfac"] for r in runs if r["model"] == kind
            for rec in [r["settings"].get("random10", {})] if "details" in rec.get("iau_ekfac", {})]
    if not rows:
        return None
    work, parts = [], []
    for row in rows:
        d = row["details"]
        n_forget = d["n_forget"]
        # runs before the counts were recorded read batches of IAU_RETAIN_BATCH
        retain = d.get("retain_examples_used", d.get("retain_batches_used", 0) * IAU_RETAIN_BATCH)
        batch = retain / max(d.get("retain_batches_used", 1), 1)
        guard = d.get("forget_guard")
        # the guard: one forward before the step and one per try (the last one is the first
        # correction step's forward when reused); Armijo: one forward per try
        guard_fw = 0 if guard is None else (2 + guard["halvings"]) * guard.get(
            "examples", guard.get("batches", 1) * IAU_RETAIN_BATCH)
        armijo_fw = (d.get("retain_steps", 0) + d.get("retain_halvings", 0)) * batch
        reused = batch if d.get("first_objective_reused") else 0
        work.append(n_forget + retain + (guard_fw + armijo_fw - reused) / 3)
        parts.append((n_forget, retain, guard_fw + armijo_fw - reused))
    iau = float(np.mean(work))
    n_forget, retain, fw = (float(np.mean(x)) for x in zip(*parts))
    n_train = rows[0]["details"]["n_train"]
    retrain = RECIPES[kind].epochs * (n_train - rows[0]["details"]["n_forget"])
    return (f"* **{kind.upper()}**, work count at 10% forgetting: one IAU + EK-FAC removal "
            f"computes about {iau:,.0f} per-example gradient equivalents ({n_forget:,.0f} forget "
            f"gradients, {retain:,.0f} retain gradients for the correction, {fw:,.0f} "
            f"forward-only passes for the guard and the backtracking), plus the EK-FAC "
            f"rotations; retraining computes {retrain:,} ({RECIPES[kind].epochs} epochs × "
            f"{n_train - rows[0]['details']['n_forget']}). With nothing else costing time the "
            f"ratio would be {retrain / iau:.0f}×; the forget set's own gradients alone bound it "
            f"by {retrain / n_forget:.0f}×.")


def certified_lines(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    r0 = rows[0]
    lines = ["## Certified removal on a linear model", "",
             f"L2-regularised one-vs-rest logistic regression on unit-norm pixels "
             f"(`train_certifiable`, λ = {r0['l2']:g}, loss-perturbation σ = "
             f"{r0['noise_std']:g}), (ε, δ) = ({r0['epsilon']:g}, {r0['delta']:g}), budget "
             f"σε/c = {r0['budget']:.3g}. `CertifiedRemoval` takes one Newton step on the "
             "retained data per request and retrains (with a fresh noise draw) when the "
             "accumulated gradient-residual bound would pass the budget. Rows: the 1% forget "
             "set as a sequence of small requests (the returned model is passed to the next "
             "request), and the 10% forget set as one request. Retrain = `train_certifiable` "
             "on the retained digits with the same seed.", "",
             "| forget | requests | test acc (removal) | test acc (retrain) | abs diff (pp) | "
             "retrains triggered | max bound per step | final accumulated bound | max actual "
             "residual | bound ≥ actual, every request | ε spent at the end | time (s) | "
             "retrain (s) |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for setting in ("random1", "random10"):
        rs = [r for r in rows if r["setting"] == setting]
        if not rs:
            continue
        diff = [abs(r["test_acc"] - r["retrain_test_acc"]) for r in rs]
        lines.append(
            f"| {setting[6:]}% ({rs[0]['n_forget']}) | {rs[0]['requests']} × "
            f"{rs[0]['request_size']} | {_ms([r['test_acc'] for r in rs], digits=2)} | "
            f"{_ms([r['retrain_test_acc'] for r in rs], digits=2)} | {_ms(diff, digits=2)} | "
            f"{sum(r['retrains'] for r in rs)} over {len(rs)} seed(s) | "
            f"{max(r['max_bound_step'] for r in rs):.3g} | "
            f"{np.mean([r['residual_bound'] for r in rs]):.3g} | "
            f"{max(r['max_residual_actual'] for r in rs):.3g} | "
            f"{all(r['bound_holds_all'] for r in rs)} | "
            f"{np.mean([r['epsilon_spent'] for r in rs]):.3g} | "
            f"{np.mean([r['seconds'] for r in rs]):.2f} | "
            f"{np.mean([r['retrain_seconds'] for r in rs]):.2f} |")
    worst = max(abs(r["test_acc"] - r["retrain_test_acc"]) for r in rows) * 100
    lines += ["", f"Largest test-accuracy difference to retraining over all rows and seeds: "
              f"{worst:.2f} pp (target ≤ 0.5 pp: **{'met' if worst <= 0.5 else 'NOT met'}**). "
              "The bound is the data-dependent bound the method certifies; the actual residual "
              "‖∇L_b(W⁻; D′)‖ is recomputed on the retained data after each request. A "
              "request whose step bound alone exceeds the budget always triggers retraining, "
              "which is exact but no faster than retraining.", ""]
    return lines


def observations(runs: list[dict[str, Any]], models: list[str]) -> list[str]:
    """Per (model, setting): doing nothing as a yardstick, the best method, who does worse."""
    out = []
    for kind in models:
        for setting in SETTINGS:
            summ = {s["method"]: s for s in summarise(runs, kind, setting)}
            if "original" not in summ:
                continue
            gaps = {m: float(np.mean(s["gap"])) for m, s in summ.items()
                    if m not in ("original", "retrain") and s["n"]}
            if not gaps:
                continue
            none = float(np.mean(summ["original"]["gap"]))
            best = min(gaps, key=gaps.__getitem__)
            worse = sorted((m for m, g in gaps.items() if g > none), key=gaps.__getitem__)
            out.append(f"* {kind.upper()}, {setting}: no removal at all leaves a gap of "
                       f"{none:.2f} pp; best method {LABELS[best]} ({gaps[best]:.2f} pp); "
                       f"worse than doing nothing: "
                       f"{', '.join(f'{LABELS[m]} ({gaps[m]:.2f})' for m in worse) or 'none'}.")
    for kind in models:
        mine = [r for r in runs if r["model"] == kind and "sisa_train_seconds" in r]
        parts = []
        for setting in SETTINGS:
            rows = [(r["settings"][setting]["sisa"], r["sisa_train_seconds"]) for r in mine
                    if setting in r["settings"] and "seconds" in r["settings"][setting].get(
                        "sisa", {})]
            if rows:
                t = float(np.mean([row["seconds"] for row, _ in rows]))
                work = float(np.mean([row["details"]["work_fraction"] for row, _ in rows]))
                parts.append(f"{setting} {t:.1f} s ({work:.0%} of the shard-slice work)")
        if parts:
            out.append(f"* SISA, {kind.upper()}: its unlearning is exact for its own ensemble "
                       "(retraining the affected shards from their checkpoints gives the "
                       "ensemble SISA would train from scratch without the forget set; "
                       "`tests/test_baselines.py` checks this), so its gap to *its own* retrain "
                       "is 0 by construction. Against the ensemble's from-scratch training "
                       f"({np.mean([r['sisa_train_seconds'] for r in mine]):.1f} s) it took: "
                       + "; ".join(parts) + ". Its gap in the tables is to the single retrained "
                       "model: the 5-shard ensemble is simply a weaker model (each member sees "
                       "1/5 of the data).")
    return out


def write_report(data: dict[str, Any], out: Path) -> Path:
    runs = data["runs"]
    meta = data["meta"]
    mach = meta["machine"]
    lines = ["# Unlearning on MNIST: every removal against retraining", "",
             f"Generated by `{meta['command']}` on {meta['date']} "
             f"({machine_text(mach)}; load average at "
             f"the start {mach.get('loadavg', '?')}). All methods of one row set ran back to "
             "back under the same conditions; other jobs on the machine inflate absolute "
             "times.", "",
             f"Seeds completed: {meta['seeds_done']}. Models: {', '.join(meta['models'])}. "
             f"Data: {meta['n_train']} train / {meta['n_test']} test digits (fixed split of "
             "the MNIST t10k files). Values are mean ± std over seeds (in %, except the gap "
             "in percentage points and the time in seconds).", "",
             "What the columns mean: forget/retain/test accuracy of the unlearned model; MIA "
             "efficacy: a membership attack (logistic regression on log-loss, true-label "
             "confidence and entropy, fitted on retain vs test outputs of the same model, "
             "balanced) is applied to the forget digits; *hard* = the share it calls "
             "non-member (what papers report), *soft* = its mean non-member probability; avg "
             "gap = mean |difference| of forget, retain and test accuracy and the soft MIA "
             "efficacy to the retrained model, per seed, then averaged (the gap with the hard "
             "efficacy instead is shown beside it); time = "
             "`RemovalResult.seconds`; speed-up = retrain time / method time (per seed, "
             "averaged). Pareto ✓: nothing else has both a smaller-or-equal mean gap and a "
             "smaller-or-equal mean time (one of them strictly). Doing nothing (the original "
             "model, 0 s) counts as a candidate, so a method whose gap is larger than not "
             "unlearning at all is never on the front; retraining is on it by definition (gap "
             "0). Methods that failed (NaN) in some seed are left off the front. Why the gap "
             "uses the soft efficacy: where the attack is near chance (the CNN generalises "
             "well, so members and non-members look alike) "
             "its probabilities all sit near 1/2 and the hard decision flips for most forget "
             "digits with tiny moves of the fitted boundary, and the hard column then measures "
             "the attack's noise, not the model.", "",
             "Training recipes: " + "; ".join(
                 f"{k.upper()}: {v}" for k, v in meta["recipes"].items()) + ".", "",
             "Hyper-parameters: baselines at their documented defaults except the values "
             "chosen on the validation split below (Fisher with the "
             "empirical Fisher estimated on 1,000 random retained digits, to keep its cost "
             "bounded); IAU default = `IAU(task, weight_decay=<training weight decay>, "
             "retain_steps=<chosen below>, retain_lr=<chosen below>)`, the scaled mode with the "
             "library's other defaults (retain loader: shuffled batches of the size chosen "
             "below); IAU faithful = "
             "`IAU(task, mode=\"faithful\")`, one fresh-Adam step "
             "(lr 1e-3) on the equally weighted retain/forget gradient, as the reference "
             "code; Newton = "
             f"θ + (1/n)(H + λI)⁻¹ Σ∇ℓ(forget) with EK-FAC (λ: "
             f"{_damping_text(runs, fallback=meta.get('newton_damping'))}) fitted "
             "once on the full training set; IAU + EK-FAC = `IAU(task, weight_decay=<training "
             "weight decay>, estimator=<EK-FAC>)`, the default scaled mode whose forget step is "
             "preconditioned, θ += (1/n)(H + λI)⁻¹ Σ∇ℓ(forget), followed by the same "
             "backtracked correction on the retained data (its own batch size, number of steps "
             "and first step size chosen below), "
             f"λ: {_damping_text(runs, 'iau_ekfac_damping')} (where equal to Newton's λ it "
             "reuses Newton's estimator, else its own EK-FAC fitted once on the full training "
             "set; either fit is a one-off cost, not in the per-removal time). Nothing was "
             "tuned on the test digits.", ""]
    events = [(res["date"], f"Seeds {', '.join(map(str, res['seeds']))} (every method) were "
               f"then added on {res['date']} by `{res['command']}` (load average at the start "
               f"{res['machine'].get('loadavg', '?')}), with the code and hyper-parameters of "
               "that date.") for res in meta.get("resumed", [])]
    for up in meta.get("updates", []):
        seeds = f" (seeds {', '.join(map(str, up['seeds']))})" if "seeds" in up else ""
        events.append((up["date"], f"Rows of {', '.join(up['methods'])}{seeds} were then rerun "
                       f"on {up['date']} by `{up['command']}` (retraining rerun beside them for "
                       "their speed-up) and replaced; `unlearn/removal/iau.py` at sha1 "
                       f"{up['sources'].get('unlearn/removal/iau.py', '?')}."))
    for _, text in sorted(events):
        lines += [text, ""]
    from unlearning_tuning import TUNED, load_tuned, report_lines

    lines += report_lines(meta["tuned"] if "tuned" in meta else load_tuned(TUNED))
    noise = ROOT / "experiments/out/mia_noise.json"
    if noise.exists():
        from mia_noise import sentence

        lines += ["How noisy each efficacy is: " + sentence(json.loads(noise.read_text())), ""]
    if TUNING.exists():
        tune = json.loads(TUNING.read_text())
        per = "; ".join(f"{k.upper()}: " + ", ".join(f"λ={d} → {g:.2f} pp" for d, g in
                                                      v["gaps"].items())
                        for k, v in tune["per_model"].items())
        lines += [f"Newton's EK-FAC damping was chosen by `--tune-newton` on {tune['validation']}"
                  f" (seed 0, 10% random forgetting, validation gap to retraining), "
                  f"run {provenance_text(tune, TUNING)}: {per}.", ""]
    if TUNING_IAU.exists():
        tune = json.loads(TUNING_IAU.read_text())
        per = "; ".join(f"{k.upper()}: " + ", ".join(f"λ={d} → {g:.2f} pp" for d, g in
                                                      v["gaps"].items())
                        for k, v in tune["per_model"].items())
        lines += [f"The EK-FAC damping of IAU + EK-FAC was chosen by `--tune-iau-ekfac` on the "
                  f"same split ({tune['validation']}; seed 0, 10% random forgetting, validation "
                  f"gap to retraining), run {provenance_text(tune, TUNING_IAU)}: {per}. The "
                  "damping search ran IAU with its library-default correction (retain batches "
                  "of 128, 5 steps, first step size 0.2), not with the work knobs chosen below "
                  "for the main run (those are searched with the damping given by "
                  "--iau-ekfac-damping).", ""]
    cert_file = cert_path(out)
    cert = json.loads(cert_file.read_text()) if cert_file.exists() else {}
    if cert:
        mach = cert.get("machine")
        lines += [f"The certified-removal part was run by `{cert['command']}` on "
                  f"{cert['date']}" + (f" ({machine_text(mach)})" if mach else
                                       " (machine not recorded)") + ".", ""]
    held = {m: held_out_seeds(meta, m) for m in ("iau", "iau_ekfac")}
    lines += ["## Targets", ""] + (verdict(runs, held) or ["* (no 10% random run yet)"]) + [""]
    for kind in meta["models"]:
        one_off = [r for r in runs if r["model"] == kind]
        if not one_off:
            continue
        lines += [f"## {kind.upper()}", "",
                  "One-off costs (mean over seeds): training the original model "
                  f"{np.mean([r['train_seconds'] for r in one_off]):.1f} s"
                  + (f"; fitting EK-FAC for Newton{_shared(one_off)} "
                     f"{np.mean([r['ekfac_fit_seconds'] for r in one_off]):.1f} s"
                     if all("ekfac_fit_seconds" in r for r in one_off) else "")
                  + (f"; fitting EK-FAC (its own λ) for IAU + EK-FAC "
                     f"{np.mean([r['ekfac_iau_fit_seconds'] for r in one_off]):.1f} s"
                     if all("ekfac_iau_fit_seconds" in r for r in one_off) else "")
                  + (f"; training the SISA ensemble "
                     f"{np.mean([r['sisa_train_seconds'] for r in one_off]):.1f} s"
                     if all("sisa_train_seconds" in r for r in one_off) else "") + ".", ""]
        for setting in SETTINGS:
            summ = summarise(runs, kind, setting)
            if not summ:
                continue
            nf = runs[[r["model"] for r in runs].index(kind)]["settings"][setting]["n_forget"]
            title = {"random1": "1% random", "random5": "5% random", "random10": "10% random",
                     "class": f"whole class {meta['forget_class']}"}[setting]
            lines += [f"### {kind.upper()}, forget {title} ({nf} digits; {summ[0]['n']} "
                      "seed(s))", ""] + table(summ) + [""]
    lines += certified_lines(cert.get("rows", []))
    lines += ["## Reading the table honestly", ""] + observations(runs, meta["models"])
    lines += data.get("notes", []) + [""]
    doc = doc_path(out)
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text("\n".join(lines))
    return doc


# ---------------------------------------------------------------------------- main


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="1 seed, MLP only, 3,000 train / 1,000 test: a smoke run")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--models", default="mlp,cnn")
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--forget-class", type=int, default=3)
    p.add_argument("--n-train", type=int, default=8000)
    p.add_argument("--n-test", type=int, default=2000)
    p.add_argument("--newton-damping", default="0.01",
                   help="EK-FAC damping of the Newton removal: a float, or mlp=X,cnn=Y")
    p.add_argument("--tune-newton", action="store_true",
                   help="choose the Newton damping on a validation split of the training "
                        "digits, store it in --out and print the --newton-damping to use")
    p.add_argument("--iau-ekfac-damping", default="newton",
                   help="EK-FAC damping of IAU + EK-FAC: 'newton' (reuse the Newton row's "
                        "estimator, one fit for both), a float, or mlp=X,cnn=Y (own fit)")
    p.add_argument("--tune-iau-ekfac", action="store_true",
                   help="like --tune-newton, for the damping of IAU + EK-FAC")
    p.add_argument("--tune-dampings", type=float, nargs="+", default=[1e-3, 1e-2, 1e-1, 1.0])
    p.add_argument("--tune-methods", action="store_true",
                   help="choose the baselines' learning rates and IAU + EK-FAC's correction "
                        "steps on a validation split (experiments/unlearning_tuning.py); the "
                        "main run reads them from experiments/tuned/unlearning_tuning.json")
    p.add_argument("--fisher-samples", type=int, default=1000,
                   help="retained samples the Fisher diagonal is estimated from")
    p.add_argument("--no-certified", action="store_true")
    p.add_argument("--cert-l2", type=float, default=1e-3)
    p.add_argument("--cert-sigma", type=float, default=1.0)
    p.add_argument("--cert-epsilon", type=float, default=1.0)
    p.add_argument("--cert-delta", type=float, default=1e-4)
    p.add_argument("--cert-request", type=int, default=5,
                   help="digits per request in the sequential certified removal")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--mnist-root", default=str(ROOT.parent / "shared/data/mnist-t10k"))
    p.add_argument("--out", default=None,
                   help=f"JSON path (default {OUT.relative_to(ROOT)}; with --quick "
                        "experiments/out/unlearning_mnist_quick.json, whose markdown goes next "
                        "to it)")
    p.add_argument("--resume", action="store_true",
                   help="keep the (model, seed) runs already in --out and add the missing ones")
    p.add_argument("--report", action="store_true", help="rebuild the markdown from --out")
    p.add_argument("--certified-only", action="store_true",
                   help="(re)run only the certified-removal part and merge it into --out")
    p.add_argument("--update", action="store_true",
                   help="rerun only --methods on the (model, seed) runs already in --out and "
                        "replace their rows (retraining reruns beside them for the speed-up)")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.n_train, args.n_test = 1, 3000, 1000
        if args.models == "mlp,cnn":
            args.models = "mlp"
    if args.out is None:
        args.out = str(OUT.with_name("unlearning_mnist_quick.json") if args.quick else OUT)
    args.models = [m for m in args.models.split(",") if m]
    args.settings = [s for s in args.settings.split(",") if s]
    args.methods = [m for m in args.methods.split(",") if m]
    for what, vals, ok in (("models", args.models, MODELS), ("settings", args.settings, SETTINGS),
                           ("methods", args.methods, METHODS)):
        bad = [v for v in vals if v not in ok]
        if bad:
            p.error(f"unknown {what} {bad}; choose from {list(ok)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    out = Path(args.out)
    if args.report:
        print(f"wrote {write_report(json.loads(out.read_text()), out)}")
        return
    torch.set_num_threads(args.threads)
    from unlearning_tuning import TUNED, load_tuned, merge, tune_methods

    args.tuned = {} if args.tune_methods else load_tuned(TUNED)
    if args.update:
        update(args, out)
        return
    if args.tune_methods:
        TUNED.parent.mkdir(parents=True, exist_ok=True)
        tuned = {**merge(load_tuned(TUNED), tune_methods(args, print)),
                 "provenance": provenance()}
        TUNED.write_text(json.dumps(tuned, indent=1))
        print(f"wrote {TUNED}")
        return
    if args.tune_newton or args.tune_iau_ekfac:
        method, path = (("newton", TUNING) if args.tune_newton else ("iau_ekfac", TUNING_IAU))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**tune_newton(args, print, method),
                                    "provenance": provenance()}, indent=1))
        print(f"wrote {path}")
        return
    if args.certified_only:
        train, test = load_split(args.mnist_root, args.n_train, args.n_test)
        certified(args, train, test, print)
        if out.exists():
            write_report(json.loads(out.read_text()), out)
        return
    data: dict[str, Any] = {"runs": []}
    if args.resume and out.exists():
        data = json.loads(out.read_text())
    cmd = "python experiments/unlearning_mnist.py " + " ".join(sys.argv[1:] if argv is None
                                                               else argv)
    meta = {"command": cmd.strip(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine(), "models": args.models, "settings": args.settings,
            "n_train": args.n_train, "n_test": args.n_test,
            "forget_class": args.forget_class, "newton_damping": args.newton_damping,
            "recipes": {k: asdict(v) for k, v in RECIPES.items() if k in args.models},
            "tuned": args.tuned,
            "git": _git_rev(), "sources": sources()}
    if args.resume and "meta" in data:  # the first run's header stays; the resume is listed
        added = sorted({s for s in range(args.seeds)} - {r["seed"] for r in data["runs"]})
        data["meta"].setdefault("resumed", []).append(
            {k: meta[k] for k in ("command", "date", "machine", "git", "sources")}
            | {"seeds": added})
        data["meta"]["tuned"] = args.tuned
    else:
        data["meta"] = meta
    data.setdefault("notes", [])
    train, test = load_split(args.mnist_root, args.n_train, args.n_test)
    logf = out.with_suffix(".log")
    out.parent.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(msg, flush=True)
        with logf.open("a") as f:
            f.write(msg + "\n")

    log(f"=== {data['meta']['date']} {cmd}")
    done = {(r["model"], r["seed"]) for r in data["runs"]}
    t0 = time.perf_counter()
    for seed in range(args.seeds):  # seed-major: a stopped run still has every model
        for kind in args.models:
            if (kind, seed) in done:
                continue
            data["runs"].append(run_one(kind, seed, train, test, args, log))
            _finish(data, out)
            log(f"  elapsed {time.perf_counter() - t0:.0f}s")
    if not args.no_certified:
        certified(args, train, test, log)
    _finish(data, out)
    log(f"done in {time.perf_counter() - t0:.0f}s; wrote {out} and {doc_path(out)}")


def certified(args: argparse.Namespace, train: IndexedDataset, test: IndexedDataset,
              log: Callable[[str], None]) -> None:
    """Run the certified part and write it to its own JSON (read by the report)."""
    rows = run_certified(train, test, args, log)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cmd = "python experiments/unlearning_mnist.py " + " ".join(sys.argv[1:])
    path = cert_path(Path(args.out))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"command": cmd.strip(), "date": date, "machine": machine(),
                                "rows": rows}, indent=1))


def update(args: argparse.Namespace, out: Path) -> None:
    """Rerun ``args.methods`` for the runs in ``out`` and merge their rows."""
    data = json.loads(out.read_text())
    train, test = load_split(args.mnist_root, data["meta"]["n_train"], data["meta"]["n_test"])
    args.settings = [s for s in args.settings if s in data["meta"]["settings"]]
    logf = out.with_suffix(".log")

    def log(msg: str) -> None:
        print(msg, flush=True)
        with logf.open("a") as f:
            f.write(msg + "\n")

    cmd = "python experiments/unlearning_mnist.py " + " ".join(sys.argv[1:])
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    log(f"=== {date} {cmd}")
    for run in data["runs"]:
        if run["model"] not in args.models or run["seed"] >= args.seeds:
            continue
        new = run_one(run["model"], run["seed"], train, test, args, log)
        if "ekfac_fit_seconds" in new and "ekfac_iau_fit_seconds" not in run \
                and "iau_ekfac_damping" in run and "iau_ekfac" not in args.methods:
            # IAU + EK-FAC shared Newton's fit, which is being replaced: keep its own time
            run["ekfac_iau_fit_seconds"] = run.get("ekfac_fit_seconds")
        for key in ("ekfac_fit_seconds", "sisa_train_seconds", "iau_ekfac_damping",
                    "ekfac_iau_fit_seconds", "newton_damping"):
            if key in new:
                run[key] = new[key]
            elif key == "ekfac_iau_fit_seconds" and "iau_ekfac" in args.methods:
                run.pop(key, None)
        for setting, rows in new["settings"].items():
            old = run["settings"][setting]
            same = all(abs(rows[k][a] - old[k][a]) < 1e-9 for k in ("original", "retrain")
                       for a in ("forget_acc", "retain_acc", "test_acc"))
            log(f"  {run['model']} seed {run['seed']} {setting}: original and retrained models "
                f"{'identical to' if same else 'DIFFER from'} the first run's")
            for m in args.methods:
                if m != "retrain" and m in rows:
                    rows[m]["retrain_seconds_same_run"] = rows["retrain"]["seconds"]
                    rows[m]["updated"] = date
                    rows[m]["same_models_as_first_run"] = same
                    run["settings"][setting][m] = rows[m]
        _finish(data, out)
    data["meta"]["tuned"] = args.tuned  # the rerun rows used the current choices
    data["meta"].setdefault("updates", []).append(
        {"command": cmd.strip(), "date": date, "methods": args.methods, "sources": sources(),
         "seeds": sorted({r["seed"] for r in data["runs"] if r["seed"] < args.seeds})})
    _finish(data, out)
    log(f"updated {out} and {doc_path(out)}")


def sources() -> dict[str, str]:
    """Short hashes of the removal and baseline sources, to tell which version made a row."""
    import hashlib

    files = sorted([*ROOT.glob("unlearn/removal/*.py"), *ROOT.glob("baselines/*.py")])
    return {str(f.relative_to(ROOT)): hashlib.sha1(f.read_bytes()).hexdigest()[:10]
            for f in files}


def _finish(data: dict[str, Any], out: Path) -> None:
    seeds = sorted({r["seed"] for r in data["runs"]})
    data["meta"]["seeds_done"] = (f"{len(seeds)} ({', '.join(map(str, seeds))})" if seeds
                                  else "none")
    out.write_text(json.dumps(data, indent=1))
    write_report(data, out)


def _git_rev() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                              capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return ""


if __name__ == "__main__":
    main()
