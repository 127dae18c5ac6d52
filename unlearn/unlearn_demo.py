"""The unlearning demo (``unlearn demo`` / ``make demo``): ledger, callbacks, removal, certificate.

Steps, deterministic for a given seed:

1. split scikit-learn's 1,797 8x8 digits into train / test by sample id;
2. record deletion requests in a fresh ledger (``ledger.db``, model versions in ``models/``):
   a few single examples from different people, one requester's block of ids, a duplicate
   (recorded once) and one naming an id the training set does not have (rejected);
3. run IAU once on a throwaway model, so the removal time reported later is the steady cost
   and not torch.func's one-time initialisation (the warm-up's seconds are reported too);
4. train a small MLP (64 -> hidden -> 10) with a Lightning ``Trainer`` and the callbacks: the
   training log, IAU's gradient restriction, the unlearning callback (IAU, at the end of fit)
   and the certification callback;
5. at the end of fit the valid requests are applied (a new model version) and certified
   against ``n_references`` models retrained from scratch without the forgotten ids with the
   *same* recipe (epochs, learning rate, batch size, momentum, weight decay: the Lightning
   module's ``configure_optimizers`` and the references' :class:`baselines.Recipe` are built
   from one :class:`UnlearnDemoConfig`); references are cached in ``references/``;
6. write ``certificate.json``, ``report.html``, ``summary.json`` and print a summary.

Torch runs on one thread during the demo: for a model this small, intra-op threads cost more
in synchronisation than they gain (measured on a busy 2-core machine: 3 epochs took 3.5 s on
2 threads and 0.06 s on 1).
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from baselines.retrain import Recipe
from unlearn.data import IndexedDataset, load_digits
from unlearn.ledger import Ledger
from unlearn.lightning import (
    GradientRestrictionCallback,
    TrainingLogCallback,
    UnlearningCallback,
)
from unlearn.lightning.certification import CertificationCallback
from unlearn.removal import IAU
from unlearn.tasks import ClassificationTask

__all__ = ["UnlearnDemoConfig", "FAST", "DigitsMLP", "run_unlearn_demo", "DemoError"]

#: ``unlearn demo --fast``: a smaller split and shorter training (the test suite's setting)
FAST = {"n_train": 600, "n_test": 200, "epochs": 8, "block": 20}
#: files of a previous run that a new run replaces (the reference cache is kept)
_RUN_FILES = ("ledger.db", "ledger.db-wal", "ledger.db-shm", "ledger.db.applier.lock",
              "certificate.json", "report.html", "summary.json")
_RUN_DIRS = ("models", "checkpoints", "certificates")


class DemoError(ValueError):
    """A bad demo setting (reported to the user without a traceback)."""


@dataclass
class UnlearnDemoConfig:
    """Settings of the demo (defaults: ``make demo``)."""

    out: Path = Path("demo-output")
    n_train: int = 1400
    n_test: int = 397
    hidden: int = 64
    epochs: int = 15
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 64
    gr_alpha: float = 0.01  # gradient-restriction strength while training
    step_scale: float = 10.0  # IAU's step (see unlearn.removal.iau)
    n_single: int = 5  # single-example requests
    block: int = 40  # size of one requester's block of ids
    n_references: int = 3
    seed: int = 0
    progress: bool = True

    def recipe(self) -> Recipe:
        """The training recipe shared by the Lightning run and the retrained references."""
        return Recipe(epochs=self.epochs, lr=self.lr, batch_size=self.batch_size,
                      optimizer="sgd", momentum=self.momentum, weight_decay=self.weight_decay)

    def check(self) -> None:
        if self.out.exists() and not self.out.is_dir():
            raise DemoError(f"--out {str(self.out)!r} is not a directory")
        if self.n_train < 50 or self.n_test < 20 or self.n_train + self.n_test > 1797:
            raise DemoError(f"need n_train >= 50, n_test >= 20 and n_train + n_test <= 1797 "
                            f"digits, got {self.n_train} + {self.n_test}")
        if self.n_single + self.block >= self.n_train // 2:
            raise DemoError(f"the requests ({self.n_single} + {self.block} ids) must be less "
                            f"than half of the {self.n_train} training examples")
        if self.epochs < 1 or self.n_references < 3:
            raise DemoError(f"need epochs >= 1 and n_references >= 3, got {self.epochs} and "
                            f"{self.n_references}")


class DigitsMLP(pl.LightningModule):
    """A one-hidden-layer MLP on flattened digits, trained with SGD as ``Recipe`` says."""

    def __init__(self, hidden: int = 64, lr: float = 0.05, momentum: float = 0.9,
                 weight_decay: float = 5e-4) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        _, x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        return torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum,
                               weight_decay=hp.weight_decay)


# ---------------------------------------------------------------------------- steps


def split_digits(cfg: UnlearnDemoConfig) -> tuple[IndexedDataset, IndexedDataset]:
    data = load_digits()
    order = np.random.default_rng(cfg.seed).permutation(len(data))
    ids = [int(data.ids[i]) for i in order]
    return data.subset(sorted(ids[:cfg.n_train])), data.subset(
        sorted(ids[cfg.n_train:cfg.n_train + cfg.n_test]))


def fresh_output(out: Path) -> None:
    """Remove a previous run's ledger, models and reports (keep the reference cache)."""
    out.mkdir(parents=True, exist_ok=True)
    for name in _RUN_FILES:
        (out / name).unlink(missing_ok=True)
    for name in _RUN_DIRS:
        shutil.rmtree(out / name, ignore_errors=True)


def submit_requests(ledger: Ledger, train: IndexedDataset, cfg: UnlearnDemoConfig
                    ) -> dict[str, Any]:
    """Singles from different people, one requester's block, a duplicate, an unknown id."""
    rng = np.random.default_rng(cfg.seed + 1)
    ids = [int(i) for i in train.ids]
    start = int(rng.integers(0, len(ids) - cfg.block))
    block = ids[start:start + cfg.block]
    rest = sorted(set(ids) - set(block))
    singles = [int(i) for i in rng.choice(rest, cfg.n_single, replace=False)]
    for n, i in enumerate(singles):
        ledger.submit([i], requester=f"user-{1000 + n}", reason="GDPR art. 17 erasure request")
    ledger.submit(block, requester="clinic-b", reason="consent withdrawn for a batch of scans",
                  key="clinic-b/2026-11")
    _, created = ledger.submit_once([singles[0]], requester="user-1000",
                                    reason="GDPR art. 17 erasure request")
    unknown = max(ids) + 10_000
    ledger.submit([unknown], requester="user-9999", reason="typo in the id")
    return {"singles": singles, "block": block, "duplicate_recorded_again": created,
            "unknown_id": unknown}


def make_callbacks(ledger: Ledger, train: IndexedDataset, test: IndexedDataset,
                   cfg: UnlearnDemoConfig) -> list[pl.Callback]:
    task = ClassificationTask()
    log = TrainingLogCallback(every_n_steps=100, checkpoint_dir=cfg.out / "checkpoints")
    gr = GradientRestrictionCallback(cfg.gr_alpha, log_name=None)
    unl = UnlearningCallback(ledger, IAU(task, step_scale=cfg.step_scale), train_dataset=train)
    cert = CertificationCallback(ledger, cfg.recipe(), train_dataset=train, test_dataset=test,
                                 out_dir=cfg.out, cache_dir=cfg.out / "references",
                                 n_references=cfg.n_references, task=task,
                                 progress=cfg.progress).attach(unl)
    return [log, gr, unl, cert]


def warm_up(data: IndexedDataset, cfg: UnlearnDemoConfig) -> float:
    """Run IAU once on a throwaway model so that the removal time reported is the steady
    cost, not torch.func's one-time initialisation (about half a second, once per process);
    returns the seconds it took."""
    start = time.perf_counter()
    ids = [int(i) for i in data.ids[:8]]
    kw = {"batch_size": 256}
    with torch.random.fork_rng():  # leaves the seeded state of the real run untouched
        IAU(ClassificationTask(), step_scale=cfg.step_scale).unlearn(
            DigitsMLP(cfg.hidden), forget=DataLoader(data.subset(ids), **kw),
            retain=DataLoader(data.without(ids).subset([int(i) for i in data.ids[8:264]]),
                              **kw))
    return time.perf_counter() - start


def train(module: DigitsMLP, data: IndexedDataset, callbacks: list[pl.Callback],
          cfg: UnlearnDemoConfig) -> float:
    """Fit with Lightning (shuffled with the seed); returns the seconds of the fit."""
    loader = DataLoader(data, batch_size=cfg.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(cfg.seed))
    trainer = pl.Trainer(max_epochs=cfg.epochs, accelerator="cpu", devices=1,
                         callbacks=callbacks, logger=False, enable_checkpointing=False,
                         enable_progress_bar=cfg.progress, enable_model_summary=False,
                         num_sanity_val_steps=0)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
        trainer.fit(module, loader)
    return time.perf_counter() - start


# ---------------------------------------------------------------------------- run


def run_unlearn_demo(cfg: UnlearnDemoConfig, log: Callable[[str], None] = print
                     ) -> dict[str, Any]:
    """Run the demo; returns the summary (also written to ``summary.json``)."""
    cfg.check()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small: intra-op threads cost more than they gain
    try:
        return _run(cfg, log)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: UnlearnDemoConfig, log: Callable[[str], None]) -> dict[str, Any]:
    started = time.perf_counter()
    fresh_output(cfg.out)
    # the references are retrained with seeds 0..n-1; the demo's own model gets another seed,
    # so that it shares its initialisation with none of them
    pl.seed_everything(cfg.seed + 1000, verbose=False)
    train_set, test_set = split_digits(cfg)
    log(f"digits: {len(train_set)} train / {len(test_set)} test; output in {cfg.out}/")
    with Ledger(cfg.out / "ledger.db", models=cfg.out / "models") as ledger:
        sent = submit_requests(ledger, train_set, cfg)
        log(f"ledger: {len(ledger.list())} deletion requests pending")
        warmup = warm_up(train_set, cfg)
        callbacks = make_callbacks(ledger, train_set, test_set, cfg)
        module = DigitsMLP(cfg.hidden, cfg.lr, cfg.momentum, cfg.weight_decay)
        log(f"training a {cfg.hidden}-unit MLP for {cfg.epochs} epochs with the callbacks "
            "(then IAU removal and certification against retraining) ...")
        fit_seconds = train(module, train_set, callbacks, cfg)
        unl, cert_cb = callbacks[2], callbacks[3]
        summary = _summary(ledger, unl, cert_cb, sent, fit_seconds, cfg,  # type: ignore[arg-type]
                           time.perf_counter() - started)
    summary["warmup_seconds"] = warmup
    (cfg.out / "summary.json").write_text(json.dumps(summary, indent=2))
    log(format_summary(summary))
    return summary


def _summary(ledger: Ledger, unl: UnlearningCallback, cert_cb: CertificationCallback,
             sent: dict[str, Any], fit_seconds: float, cfg: UnlearnDemoConfig,
             seconds: float) -> dict[str, Any]:
    cert = cert_cb.last
    if cert is None:
        raise RuntimeError("no certificate was produced: no request was applied")
    verify = ledger.verify()
    cost = cert.cost
    return {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "requests": [{"id": r.id, "requester": r.requester, "n_ids": len(r.ids),
                      "state": r.state, "reason": r.state_reason} for r in ledger.list()],
        "duplicate_recorded_again": sent["duplicate_recorded_again"],
        "model_versions": [v["version"] for v in ledger.versions()],
        "passed": cert.passed,
        "checks": [{"name": c.name, "passed": c.passed, "value": c.value, "low": c.low,
                    "high": c.high} for c in cert.checks],
        "metrics": {"unlearned": cert.metrics, "original": cert.original,
                    "retrained_mean": {k: float(np.mean(v)) for k, v in
                                       cert.references.items()}},
        "original_inside_band": _inside(cert),
        "removal_seconds": cost.get("removal_seconds"),
        "retrain_seconds_mean": cost.get("retrain_seconds_mean"),
        "references_from_cache": cost.get("retrain_from_cache"),
        "fit_seconds": fit_seconds,
        "ledger_verified": verify.ok,
        "files": {"certificate": "certificate.json", "report": "report.html",
                  "ledger": "ledger.db", "models": "models/"},
        "seconds": seconds,
    }


def _inside(cert: Any) -> list[str] | None:
    """The checks whose band the *original* (pre-removal) model also falls inside: when that
    is all of them, forgetting these examples barely changes the model, and passing says
    little about the removal itself."""
    if cert.original is None:
        return None
    return [c.name for c in cert.checks if c.name in cert.original
            and (c.low is None or cert.original[c.name] >= c.low)
            and (c.high is None or cert.original[c.name] <= c.high)]


def format_summary(s: dict[str, Any]) -> str:
    """The printed summary: requests, checks, costs, files."""
    lines = ["", "requests:"]
    for r in s["requests"]:
        why = f"  ({r['reason']})" if r["reason"] else ""
        lines.append(f"  #{r['id']:<3} {r['requester']:<10} {r['n_ids']:>3} ids  "
                     f"{r['state']}{why}")
    lines.append(f"  (the duplicate submission was {'recorded again' if s['duplicate_recorded_again'] else 'recognised: recorded once'})")  # noqa: E501
    n_ok = sum(c["passed"] for c in s["checks"])
    lines.append(f"certificate: {'PASS' if s['passed'] else 'FAIL'} ({n_ok}/{len(s['checks'])} "
                 "checks inside the retrained references' band)")
    for c in s["checks"]:
        band = f"[{_f(c['low'])}, {_f(c['high'])}]"
        lines.append(f"  {'ok  ' if c['passed'] else 'FAIL'} {c['name']:<17} "
                     f"{c['value']:8.4f}  band {band}")
    m = s["metrics"]
    orig = m["original"] or {}
    lines.append(f"forget accuracy: original {_f(orig.get('forget_acc'))}, unlearned "
                 f"{_f(m['unlearned']['forget_acc'])}, retrained "
                 f"{_f(m['retrained_mean']['forget_acc'])}")
    inside = s.get("original_inside_band")
    if inside is not None:
        lines.append(f"the original model (before removal) is inside {len(inside)}/"
                     f"{len(s['checks'])} bands" + (": these examples barely move a model "
                                                    "this well generalising, so passing is "
                                                    "weak evidence here" if len(inside) ==
                                                    len(s["checks"]) else ""))
    rem, ret = s["removal_seconds"], s["retrain_seconds_mean"]
    speed = "" if not (rem and ret) else (f" ({ret / rem:.1f}x faster)" if ret >= rem
                                          else f" ({rem / ret:.1f}x slower)")
    cached = " (references from the cache)" if all(s["references_from_cache"] or [False]) else ""
    lines.append(f"cost: removal {_f(rem)} s vs retraining {_f(ret)} s per reference"
                 f"{speed}{cached}; torch.func's one-time warm-up ({_f(s.get('warmup_seconds'))}"
                 " s) ran before and is not counted")
    lines.append(f"ledger: hash chain {'verified' if s['ledger_verified'] else 'BROKEN'}, "
                 f"model versions {s['model_versions']}")
    lines.append(f"wrote certificate.json, report.html, ledger.db, models/, summary.json "
                 f"in {s['seconds']:.0f} s")
    return "\n".join(lines)


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.3g}"
