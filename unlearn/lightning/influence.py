"""InfluenceCallback: fit an influence estimator when training ends and store its factors.

>>> cb = InfluenceCallback(EKFACInfluence, damping=1e-3, save_dir="run/influence", report_top=20)
>>> Trainer(callbacks=[cb]).fit(module, loader)
>>> cb.top_ids            # the 20 training ids with the highest self-influence (suspicious)
>>> EKFACInfluence.load(cb.estimator_path, module)

The estimator is fitted in ``on_train_end`` (the end of ``fit``, while the strategy and its
process group are still up) on a *non-shuffled* loader over the training set: the one passed
as ``train_dataloader``, or one rebuilt from the trainer's training loader's dataset, batch
size and collate function. Only rank zero fits and writes; the top-k report is broadcast.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from unlearn.influence.base import InfluenceEstimator
from unlearn.lightning._common import batch_ids
from unlearn.tasks import ClassificationTask, Task

__all__ = ["InfluenceCallback"]


class InfluenceCallback(pl.Callback):
    """Fit ``estimator_cls(module, task, damping, **estimator_kwargs)`` at the end of fit.

    Args:
        estimator_cls: an :class:`~unlearn.influence.InfluenceEstimator` subclass.
        damping: λ of ``(H + λI)⁻¹``.
        task: how the per-sample loss is computed (default ``ClassificationTask()``).
        train_dataloader: the (non-shuffled) training loader to fit on; default: rebuilt from
            the trainer's.
        save_dir: folder for ``estimator/`` (``estimator_cls.save``) and ``report.json``.
        report_top: compute self-influence and keep the ``report_top`` highest (most
            suspicious: mislabeled or atypical examples) as ``top_ids`` / ``top_scores``.
        estimator_kwargs: extra constructor arguments (e.g. ``modules=...``).
    """

    def __init__(self, estimator_cls: type[InfluenceEstimator], *, damping: float = 1e-3,
                 task: Task | None = None, train_dataloader: DataLoader | None = None,
                 save_dir: str | os.PathLike[str] | None = None, report_top: int | None = None,
                 estimator_kwargs: dict[str, Any] | None = None) -> None:
        if not (isinstance(estimator_cls, type) and issubclass(estimator_cls, InfluenceEstimator)):
            raise TypeError(f"estimator_cls must be an InfluenceEstimator subclass, got "
                            f"{estimator_cls!r}")
        if report_top is not None and (isinstance(report_top, bool)
                                       or not isinstance(report_top, int) or report_top < 1):
            raise ValueError(f"report_top must be a positive integer or None, got {report_top!r}")
        if train_dataloader is not None and not isinstance(train_dataloader, DataLoader):
            raise TypeError(f"train_dataloader must be a DataLoader, got {type(train_dataloader)}")
        self.estimator_cls, self.damping = estimator_cls, float(damping)
        self.task = task if task is not None else ClassificationTask()
        self.train_dataloader = train_dataloader
        self.save_dir = None if save_dir is None else Path(save_dir)
        self.report_top = report_top
        self.estimator_kwargs = dict(estimator_kwargs or {})
        self.estimator: InfluenceEstimator | None = None
        self.estimator_path: str | None = None
        self.top_ids: list[int] | None = None
        self.top_scores: list[float] | None = None
        self.fitted_at_step: int | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(estimator=self.estimator_cls.__name__,
                                        save_dir=str(self.save_dir))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        report = None
        error: str | None = None
        if trainer.is_global_zero:
            try:
                report = self.fit_now(trainer, pl_module)
            except Exception as err:
                error = f"{type(err).__name__}: {err}"
                if trainer.world_size == 1:
                    raise
        report, error = trainer.strategy.broadcast((report, error), src=0)
        if error is not None:
            raise RuntimeError(f"InfluenceCallback failed on rank zero: {error}")
        if not trainer.is_global_zero and report is not None:
            self._set(report)

    def fit_now(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """Fit (and save, and rank) now, on this process; returns the report."""
        loader = self._loader(trainer)
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.inference_mode(False), torch.enable_grad():
                est = self.estimator_cls(pl_module, self.task, self.damping,
                                         **self.estimator_kwargs)
                est.fit(loader)
                self.estimator = est
                top = self._rank(est, loader) if self.report_top else None
        finally:
            pl_module.train(was_training)
        report: dict[str, Any] = {
            "estimator": self.estimator_cls.__name__, "damping": self.damping,
            "n_train": est.n_train, "global_step": int(trainer.global_step),
            "path": None, "top_ids": None, "top_scores": None}
        if top is not None:
            report["top_ids"], report["top_scores"] = top
        if self.save_dir is not None:
            path = self.save_dir / "estimator"
            est.save(path)
            report["path"] = str(path)
            _write_json(self.save_dir / "report.json", report)
        self._set(report)
        return report

    def _set(self, report: dict[str, Any]) -> None:
        self.estimator_path = report["path"]
        self.top_ids, self.top_scores = report["top_ids"], report["top_scores"]
        self.fitted_at_step = report["global_step"]

    def _loader(self, trainer: pl.Trainer) -> DataLoader:
        if self.train_dataloader is not None:
            return self.train_dataloader
        dl = trainer.train_dataloader
        if not isinstance(dl, DataLoader):
            raise ValueError(f"InfluenceCallback rebuilds a loader from the trainer's training "
                             f"DataLoader, but it is a {type(dl).__name__}; pass "
                             "train_dataloader=... (a non-shuffled DataLoader)")
        return DataLoader(dl.dataset, batch_size=dl.batch_size or 256, shuffle=False,
                          collate_fn=dl.collate_fn, num_workers=0)

    def _rank(self, est: InfluenceEstimator, loader: DataLoader
              ) -> tuple[list[int], list[float]]:
        scores = est.self_influence(loader).detach().cpu()
        ids = _loader_ids(loader, len(scores))
        k = min(int(self.report_top or 0), len(scores))
        values, pos = torch.topk(scores, k)
        return [ids[int(p)] for p in pos], [float(v) for v in values]

    def load_estimator(self, model: torch.nn.Module) -> InfluenceEstimator:
        """The saved estimator for ``model`` (needs ``save_dir``)."""
        if self.estimator_path is None:
            raise FileNotFoundError("no saved estimator: the callback has not fitted one with "
                                    "save_dir set")
        return self.estimator_cls.load(self.estimator_path, model, self.task)

    def state_dict(self) -> dict[str, Any]:
        return {"estimator": self.estimator_cls.__name__, "path": self.estimator_path,
                "top_ids": self.top_ids, "top_scores": self.top_scores,
                "global_step": self.fitted_at_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.estimator_path = state_dict.get("path")
        self.top_ids, self.top_scores = state_dict.get("top_ids"), state_dict.get("top_scores")
        self.fitted_at_step = state_dict.get("global_step")


def _loader_ids(loader: DataLoader, n: int) -> list[int]:
    """Sample ids in loader order (positions when the batches carry no ids)."""
    out: list[int] = []
    for batch in loader:
        ids = batch_ids(batch)
        if ids is None:
            return list(range(n))
        out.extend(int(i) for i in ids.tolist())
    return out


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)
