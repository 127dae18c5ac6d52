"""``unlearn gan-cleanse``: train a small GAN, score its training data, remove the harmful part
and retrain, on the paper's 2-D Gaussian data or on real MNIST digits.

Wiring (in ``unlearn.cli``): ``cli_gan.add_parser(subparsers)`` declares the subcommand and sets
``func=cli_gan.run``; ``run(args)`` returns the exit status and raises ``unlearn.cli.UserError``
for bad requests. Building the parser does not import torch.

Writes into ``--out``: ``summary.json`` (configuration, metric before / after, removed ids,
timings) and ``generator.pt`` / ``discriminator.pt`` (state dicts of the cleansed GAN).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from unlearn.cli import positive_float, positive_int, unit_fraction

__all__ = ["add_parser", "run"]

SELECTIONS = ("influence", "discriminator_loss", "random", "isolation_forest")
MODES = ("replay", "retrain")
DEFAULT_MNIST = Path("../shared/data/mnist-t10k")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "gan-cleanse",
        help="data cleansing for GANs: remove harmful training instances and retrain",
        description="Train a small GAN with recorded SGD (the 2-D Gaussian GAN of Terashita et "
        "al., or a small DCGAN on real MNIST digits), rank its training instances by a "
        "selection method (influence on the evaluation metric, influence on the "
        "discriminator loss, Isolation Forest or random), remove the top fraction and "
        "retrain (replay: same batches and latents; retrain: a fresh run). Reports the "
        "metric on held-out data before and after (2-D: average log-likelihood, higher is "
        "better; MNIST: FID or Inception score on a locally trained classifier). Writes "
        "summary.json, generator.pt and discriminator.pt into --out.",
    )
    p.add_argument("--dataset", choices=("2d", "mnist"), default="2d",
                   help="2d (default) or mnist")
    p.add_argument("--fraction", type=unit_fraction, default=0.1,
                   help="fraction of the training set to remove (default: 0.1)")
    p.add_argument("--selection", choices=SELECTIONS, default="influence",
                   help="how harmful instances are chosen (default: influence)")
    p.add_argument("--mode", choices=MODES, default="replay",
                   help="replay the recorded run without them (default) or retrain afresh")
    p.add_argument("--last-epochs", type=positive_int, default=None,
                   help="trace influence over the last N epochs and replay only those (the "
                   "paper's one-epoch retraining; replay mode only; default: the whole run)")
    p.add_argument("--metric", choices=("fid", "is"), default="fid",
                   help="MNIST only: the metric influence targets and the report uses "
                   "(default: fid)")
    p.add_argument("--out", type=Path, default=Path("gan-cleanse-output"),
                   help="output folder (default: gan-cleanse-output)")
    p.add_argument("--n-train", type=positive_int, default=None,
                   help="training instances (default: 1000 for 2d, 2000 for mnist)")
    p.add_argument("--epochs", type=positive_int, default=None,
                   help="training epochs (default: 30 for 2d, 12 for mnist)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="batch size (default: 100 for 2d, 50 for mnist)")
    p.add_argument("--lr", type=positive_float, default=None,
                   help="SGD learning rate of both players (default: 0.01 for 2d, 0.02 for "
                   "mnist)")
    p.add_argument("--momentum", type=unit_fraction, default=None,
                   help="SGD momentum of both players (default: 0 for 2d, 0.5 for mnist)")
    p.add_argument("--mnist-root", type=Path, default=DEFAULT_MNIST,
                   help="folder with t10k-images-idx3-ubyte(.gz) and t10k-labels (default: "
                   f"{DEFAULT_MNIST})")
    p.add_argument("--cache", type=Path, default=None,
                   help="MNIST only: where the scoring classifier is cached (default: "
                   "<out>/cache)")
    p.add_argument("--seed", type=int, default=0, help="seed of data, model and training")
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads (default: 1)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)
    return p


DEFAULTS = {"2d": {"n_train": 1000, "epochs": 30, "batch_size": 100, "lr": 0.01, "momentum": 0.0},
            "mnist": {"n_train": 2000, "epochs": 12, "batch_size": 50, "lr": 0.02,
                      "momentum": 0.5}}


def _setting(args: argparse.Namespace) -> dict[str, Any]:
    cfg = dict(DEFAULTS[args.dataset])
    for key in cfg:
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    return cfg


def _prepare_2d(cfg: dict[str, Any], seed: int) -> dict[str, Any]:
    import torch

    from unlearn.data import from_tensors
    from unlearn.generative.metrics import AverageLogLikelihood
    from unlearn.generative.models import gan_2d

    mean = torch.tensor([1.0, 1.0], dtype=torch.float64)
    chol = torch.linalg.cholesky(torch.tensor([[1.0, 0.8], [0.8, 1.0]], dtype=torch.float64))
    gen = torch.Generator().manual_seed(seed)

    def draw(n: int) -> torch.Tensor:
        return torch.randn(n, 2, generator=gen, dtype=torch.float64) @ chol.T + mean

    x_train, x_val, x_test = draw(cfg["n_train"]), draw(1000), draw(1000)
    g, d = gan_2d(seed=seed)
    return {"data": from_tensors(x_train, torch.zeros(len(x_train), dtype=torch.long)),
            "g": g, "d": d, "validation": x_val,
            "val_metric": AverageLogLikelihood(x_val, bandwidth=1.0),
            "test_metric": AverageLogLikelihood(x_test, bandwidth=1.0),
            "metric_name": "average log-likelihood (KDE, bandwidth 1)", "features": None}


def _prepare_mnist(cfg: dict[str, Any], seed: int, args: argparse.Namespace) -> dict[str, Any]:
    from unlearn.cli import UserError
    from unlearn.data import mnist_split
    from unlearn.generative.models import gan_mnist
    from unlearn.generative.scores import (
        FrechetDistance,
        InceptionScore,
        load_or_train_mnist_classifier,
    )

    if cfg["n_train"] + 2000 > 10000:
        raise UserError(f"--n-train {cfg['n_train']} leaves too few digits for validation and "
                        "test (1,000 each out of 10,000): use at most 8000")
    try:
        train, val_set, rest = mnist_split(args.mnist_root, n_train=cfg["n_train"],
                                           n_query=1000, seed=seed, flatten=False)
    except (FileNotFoundError, ValueError) as err:
        raise UserError(f"cannot load MNIST from {args.mnist_root}: {err}") from err
    clf = load_or_train_mnist_classifier(args.mnist_root,
                                         cache_dir=args.cache or args.out / "cache")
    x_val, x_test = val_set.tensors()[0], rest.tensors()[0][:1000]
    if args.metric == "fid":
        val_metric, test_metric = FrechetDistance(clf, x_val), FrechetDistance(clf, x_test)
        name = "FID (local MNIST classifier features)"
    else:
        val_metric = test_metric = InceptionScore(clf)
        name = "Inception score (local MNIST classifier)"
    g, d = gan_mnist(seed=seed)
    return {"data": train, "g": g, "d": d, "validation": x_val, "val_metric": val_metric,
            "test_metric": test_metric, "metric_name": name, "features": clf.features}


def run(args: argparse.Namespace) -> int:
    import torch

    from unlearn.cli import UserError
    from unlearn.generative.training import train_gan
    from unlearn.removal.gan import GANCleansing, eval_latents_for, metric_of, selection_harm

    torch.set_num_threads(args.threads)
    cfg = _setting(args)
    if args.last_epochs is not None:
        if args.mode != "replay":
            raise UserError("--last-epochs replays the end of the run: use --mode replay")
        if args.last_epochs > cfg["epochs"]:
            raise UserError(f"--last-epochs {args.last_epochs} is more than the "
                            f"{cfg['epochs']} training epochs")
    if args.dataset == "2d":
        setup = _prepare_2d(cfg, args.seed)
    else:
        setup = _prepare_mnist(cfg, args.seed, args)
    t0 = time.perf_counter()
    try:
        traj = train_gan(setup["g"], setup["d"], setup["data"], epochs=cfg["epochs"],
                         batch_size=cfg["batch_size"], lr_d=cfg["lr"], lr_g=cfg["lr"],
                         momentum=cfg["momentum"],
                         seed=args.seed, checkpoint_every=1 if args.dataset == "2d" else 20)
    except FloatingPointError as err:
        raise UserError(f"{err}; try a smaller --lr") from err
    train_s = time.perf_counter() - t0
    z_val = eval_latents_for(traj, 500 if args.dataset == "mnist" else 1000, seed=args.seed + 1)
    z_test = eval_latents_for(traj, 1000, seed=args.seed + 2)
    last = None if args.last_epochs is None else args.last_epochs * (len(traj) // cfg["epochs"])
    t0 = time.perf_counter()
    harm = selection_harm(args.selection, traj, metric=setup["val_metric"],
                          validation=setup["validation"], features=setup["features"],
                          eval_latents=z_val, seed=args.seed, last_steps=last)
    select_s = time.perf_counter() - t0
    result = GANCleansing(fraction=args.fraction, mode=args.mode, last_steps=last).cleanse(
        traj, harm=harm)
    g0, _ = traj.models()
    test_metric = setup["test_metric"]
    before, after = metric_of(g0, test_metric, z_test), metric_of(result.generator, test_metric,
                                                                  z_test)
    higher = bool(getattr(test_metric, "higher_is_better", True))
    summary = {
        "dataset": args.dataset, "selection": args.selection, "mode": args.mode,
        "fraction": args.fraction, "seed": args.seed, "training": cfg, "steps": len(traj),
        "replayed_steps": result.details["replayed_steps"],
        "metric": setup["metric_name"], "higher_is_better": higher,
        "metric_before": before, "metric_after": after, "metric_change": after - before,
        "improved": after > before if higher else after < before,
        "n_train": len(traj.train_ids), "n_removed": result.details["n_removed"],
        "removed_ids": result.details["removed_ids"],
        "seconds": {"train": train_s, "select": select_s, "retrain": result.seconds},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(result.generator.state_dict(), args.out / "generator.pt")
    torch.save(result.discriminator.state_dict(), args.out / "discriminator.pt")
    tmp = args.out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(args.out / "summary.json")
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"{args.dataset}: removed {summary['n_removed']} of {summary['n_train']} by "
              f"{args.selection} ({args.mode}); {setup['metric_name']} on held-out data "
              f"{before:.4f} -> {after:.4f} ({after - before:+.4f}, "
              f"{'better' if summary['improved'] else 'not better'}); wrote "
              f"{args.out / 'summary.json'}", file=sys.stdout)
    return 0
