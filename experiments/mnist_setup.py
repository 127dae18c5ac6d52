"""The MNIST influence problems of ``experiments/influence_truth.py`` (5,000 train / 500
query, logistic regression and MLP 784-128-10), loaded from its caches for other scripts.

Reuses influence_truth's training recipes and cache layout: the trained models come from
``experiments/out/influence_cache/models`` (trained and stored there the same way when
missing) and the LDS retraining losses are READ ONLY from its cache (an LDS needs the 50
subset retrains that ``influence_truth.py --lds-lr`` / ``--lds-mlp`` compute).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

import influence_truth as it  # noqa: E402

from unlearn.data import IndexedDataset, from_tensors, mnist_split  # noqa: E402
from unlearn.influence.evaluate import lds_subsets  # noqa: E402
from unlearn.tasks import ClassificationTask, Task  # noqa: E402

__all__ = ["Problem", "lr_setup", "mlp_setup", "load_problem", "synthetic_problem"]


@dataclass
class Problem:
    """A trained model with its data, damping, and (when cached) the LDS target."""

    name: str
    model: nn.Module
    task: Task
    train: IndexedDataset
    query: IndexedDataset
    damping: float
    train_batch: int
    subsets: Tensor | None = None
    losses: Tensor | None = None
    lds_note: str = ""
    tracin: dict[str, Any] | None = None


def lr_setup(cfg: it.Config) -> dict[str, Any]:
    """The configuration key ``influence_truth.part_lds_lr`` caches under (kept identical)."""
    return {"data": "mnist-t10k 5000/500 seed 0", "model": "linear 784->10", "l2": cfg.lr_l2,
            "dtype": "float64", "trainer": "L-BFGS to convergence (tol 1e-10)"}


def mlp_setup(cfg: it.Config) -> dict[str, Any]:
    """The configuration key ``influence_truth.part_lds_mlp`` caches under (kept identical)."""
    return {"data": "mnist-t10k 5000/500 seed 0", "model": "MLP 784-128-10 ReLU",
            "dtype": "float32", "optimizer": "SGD momentum 0.9, linear lr decay to 0",
            "loop": "tensor-indexed minibatches, 1 thread",
            "lr": cfg.mlp_lr, "epochs": cfg.mlp_epochs, "batch": cfg.mlp_batch,
            "weight_decay": cfg.mlp_wd}


def _cached_losses(cfg: it.Config, name: str, setup: dict, n_train: int,
                   seeds: tuple[int, ...]) -> tuple[Tensor | None, Tensor | None, str]:
    subsets = lds_subsets(n_train, cfg.n_subsets, cfg.fraction, seed=0)
    path = it.CACHE / f"lds_{name}_losses-{it._digest(setup)}.npz"
    if not path.exists():
        return None, None, f"no LDS cache at {path.relative_to(ROOT)}"
    with np.load(path, allow_pickle=False) as f:
        missing = [s for s in seeds if f"done_{s}" not in f.files or not f[f"done_{s}"].all()]
        if missing or not np.array_equal(f["subsets"], subsets.numpy()):
            return None, None, f"LDS cache {path.name} incomplete (seeds {missing} unfinished)"
        losses = np.mean([f[f"losses_{s}"] for s in seeds], axis=0)
    return subsets, torch.from_numpy(losses), f"{len(seeds)} seed(s), {cfg.n_subsets} subsets"


def load_problem(name: str, n_train: int = 5000, cfg: it.Config | None = None) -> Problem:
    """``"lr"`` or ``"mlp"`` on the first ``n_train`` of influence_truth's 5,000 training
    digits (seed-0 split; LDS only at 5,000), with the cached trained model."""
    cfg = cfg or it.Config(mnist_root=ROOT.parent / "shared/data/mnist-t10k")
    train, query, _ = mnist_split(cfg.mnist_root, n_train=5000, n_query=500, seed=0,
                                  flatten=True)
    if n_train > 5000:
        train, query, _ = mnist_split(cfg.mnist_root, n_train=n_train, n_query=500, seed=0,
                                      flatten=True)
    elif n_train < 5000:
        train = train.subset(train.ids[:n_train])
    task = ClassificationTask()
    if name == "lr":
        train, query = it.as_double(train), it.as_double(query)
        setup = lr_setup(cfg)
        key = setup if n_train == 5000 else {**setup, "n_train": n_train}
        fn = it.lr_trainer(cfg.lr_l2)
        model = it.cached_model("mnist_lr", key, it.mnist_lr, lambda m: fn(train, m))
        prob = Problem("lr", model, task, train, query, cfg.lr_l2, 500)
        seeds: tuple[int, ...] = (0,)
    elif name == "mlp":
        setup = mlp_setup(cfg)
        key = setup if n_train == 5000 else {**setup, "n_train": n_train}
        model = it.cached_model("mnist_mlp", key, it.mnist_mlp,
                                lambda _: it.mlp_trainer(cfg)(train, None, seed=0))
        prob = Problem("mlp", model, task, train, query, cfg.mlp_damping, 250)
        seeds = tuple(range(cfg.mlp_seeds))
    else:
        raise ValueError(f"problem must be 'lr' or 'mlp', got {name!r}")
    if n_train == 5000:
        prob.subsets, prob.losses, prob.lds_note = _cached_losses(cfg, name, setup, n_train,
                                                                  seeds)
    else:
        prob.lds_note = "no LDS target for this size"
    return prob


def tracin_checkpoints(cfg: it.Config | None = None) -> dict[str, Any]:
    """The MLP's per-epoch checkpoints and learning rates (influence_truth's cache)."""
    cfg = cfg or it.Config(mnist_root=ROOT.parent / "shared/data/mnist-t10k")
    train, _, _ = mnist_split(cfg.mnist_root, n_train=5000, n_query=500, seed=0, flatten=True)
    return it.tracin_checkpoints(cfg, mlp_setup(cfg), train, [])


def synthetic_problem(n_train: int, n_query: int = 100, seed: int = 0) -> Problem:
    """Random 784-dimensional inputs and labels on the trained LR weights: for timing the
    fitting and scoring at sizes MNIST does not have (no LDS)."""
    g = torch.Generator().manual_seed(seed)
    base = load_problem("lr")
    x = torch.rand(n_train + n_query, 784, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (n_train + n_query,), generator=g)
    train = from_tensors(x[:n_train], y[:n_train])
    query = from_tensors(x[n_train:], y[n_train:], ids=range(n_train, n_train + n_query))
    return Problem(f"synthetic-{n_train}", base.model, base.task, train, query, base.damping,
                   500, lds_note="synthetic: no LDS")
