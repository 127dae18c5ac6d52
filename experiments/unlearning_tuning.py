"""Hyper-parameters of the removal methods, chosen on a validation split (never the test digits).

    .venv/bin/python experiments/unlearning_mnist.py --tune-methods    # writes TUNED below

The split: the 8,000 training digits are cut once (permutation seed 1) into 6,000 train and
2,000 validation digits; a model is trained on the 6,000 (seed 0), 10% of them are forgotten at
random, and each candidate value is scored by its average gap to the model retrained without
them, measured on the validation digits in place of the test digits. The main run then reads
the chosen values from ``experiments/out/unlearning_tuning.json``.

What is tuned: the baselines' learning rate (Fisher forgetting's noise scale ``alpha``; SGD
steps at the library defaults diverged to NaN on the Adam-trained LeNet: NegGrad and SCRUB in
every seed), and the number of correction steps of IAU, with and without EK-FAC (its work
knob: the cheapest value whose validation gap is within ``STEPS_TOLERANCE`` pp of the best one
is kept, since the target is a gap *and* a speed-up).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import unlearning_mnist as um
from torch.utils.data import DataLoader

TUNED = um.ROOT / "experiments/out/unlearning_tuning.json"

#: method -> (keyword argument, candidate values)
GRIDS: dict[str, tuple[str, list[float]]] = {
    "finetune": ("lr", [1e-3, 3e-3, 1e-2, 3e-2, 0.1]),
    "neggrad": ("lr", [1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2]),
    "neggrad_plus": ("lr", [1e-3, 3e-3, 1e-2, 3e-2, 0.1]),
    "scrub": ("lr", [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2]),
    "salun": ("lr", [1e-3, 3e-3, 1e-2, 3e-2, 0.1]),
    "random_label": ("lr", [1e-3, 3e-3, 1e-2, 3e-2, 0.1]),
    "fisher": ("alpha", [1e-8, 1e-7, 1e-6, 1e-5]),
    "iau": ("retain_steps", [1, 2, 3, 5]),
    "iau_ekfac": ("retain_steps", [1, 2, 3, 5]),
}
#: IAU keeps the fewest correction steps within this many pp of the best gap
STEPS_TOLERANCE = 0.25


def validation_split(args: argparse.Namespace) -> tuple[Any, Any, dict[str, DataLoader]]:
    """``(train part, validation part, loaders)`` carved out of the training digits, with a 10%
    random forget set of the train part (seed 0); the test digits are never read."""
    train, _ = um.load_split(args.mnist_root, args.n_train, args.n_test)
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(1)).tolist()
    n_val = len(train) // 4
    sub = train.subset(train.ids[sorted(perm[n_val:])])
    val = train.subset(train.ids[sorted(perm[:n_val])])
    ids = um.forget_ids(sub, "random10", 0, args.forget_class)
    return sub, val, um.loaders(sub, val, ids)


def choose(method: str, gaps: dict[float, float]) -> float:
    """The chosen value: the smallest gap, or for IAU's number of correction steps the cheapest
    value within ``STEPS_TOLERANCE`` of it. Failed values (NaN gap) never win."""
    ok = {v: g for v, g in gaps.items() if math.isfinite(g)}
    if not ok:
        raise RuntimeError(f"{method}: every candidate failed on the validation split: {gaps}")
    best = min(ok.values())
    if method in ("iau", "iau_ekfac"):
        return min(v for v, g in ok.items() if g <= best + STEPS_TOLERANCE)
    return min(ok, key=ok.__getitem__)


def tune_methods(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    """Grid search of ``GRIDS`` (restricted to ``args.methods``) per model; returns what to
    store in ``TUNED``."""
    sub, val, ld = validation_split(args)
    out: dict[str, Any] = {"validation": f"{len(sub)} train / {len(val)} validation digits out "
                                         f"of the {args.n_train} training digits",
                           "tolerance_pp": STEPS_TOLERANCE, "per_model": {}}
    for kind in args.models:
        original, _ = um.train_model(kind, sub, 0)
        ref = um.evaluate(um.Retrain(um.TASK, um.FACTORIES[kind], recipe=um.RECIPES[kind],
                                     seed=0).unlearn(original, forget=ld["forget"],
                                                     retain=ld["retain"]).model, ld, 0)
        ctx: dict[str, Any] = {}
        if "iau_ekfac" in args.methods:
            damping = um.newton_damping(args.iau_ekfac_damping if args.iau_ekfac_damping
                                        != "newton" else args.newton_damping, kind)
            ctx["ekfac_iau"], _ = um.fit_ekfac(original, sub, damping)
        per: dict[str, Any] = {}
        for method, (key, grid) in GRIDS.items():
            if method not in args.methods:
                continue
            gaps: dict[float, float] = {}
            for value in grid:
                m = um.make_method(method, kind, 0, ctx, args, overrides={key: value})
                try:
                    res = m.unlearn(original, forget=ld["forget"],
                                    retain=um.method_retain(method, ld["retain"], 0, args))
                    gaps[value] = um.average_gap(um.evaluate(res.model, ld, 0), ref, um.GAP)
                except (FloatingPointError, RuntimeError, ValueError) as err:
                    gaps[value] = math.nan
                    log(f"  tune {kind} {method} {key}={value:g}: failed ({err})")
                    continue
                log(f"  tune {kind} {method} {key}={value:g}: validation gap "
                    f"{gaps[value]:.2f} pp ({res.seconds:.3f} s)")
            pick = choose(method, gaps)
            per[method] = {"key": key, "gaps": {f"{v:g}": g for v, g in gaps.items()},
                           "chosen": int(pick) if key == "retain_steps" else pick}
            log(f"  chosen {kind} {method}: {key}={pick:g}")
        out["per_model"][kind] = per
    return out


def merge(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``new`` over ``old``, per model and method (a run restricted by ``--models`` or
    ``--methods`` keeps the other choices)."""
    if not old or old.get("validation") != new["validation"]:
        return new
    per = {k: dict(v) for k, v in old["per_model"].items()}
    for kind, methods in new["per_model"].items():
        per.setdefault(kind, {}).update(methods)
    return {**new, "per_model": per}


def load_tuned(path: Path = TUNED) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def overrides(tuned: dict[str, Any], kind: str, method: str) -> dict[str, Any]:
    """The tuned keyword arguments of ``method`` on ``kind`` (empty if not tuned)."""
    got = tuned.get("per_model", {}).get(kind, {}).get(method)
    return {got["key"]: got["chosen"]} if got else {}


def report_lines(tuned: dict[str, Any]) -> list[str]:
    if not tuned:
        return ["Baselines ran at their documented defaults (no `--tune-methods` file).", ""]
    parts = []
    for kind, per in tuned["per_model"].items():
        for method, t in per.items():
            vals = ", ".join(f"{v} → {g:.2f}" for v, g in t["gaps"].items())
            parts.append(f"{kind.upper()} {um.LABELS[method]}: {t['key']} = "
                         f"**{t['chosen']:g}** ({vals})")
    return [f"Chosen by `--tune-methods` on {tuned['validation']} (seed 0, 10% random "
            "forgetting, validation gap to retraining in pp; the smallest gap wins, except "
            "for IAU's number of correction steps, where the fewest steps within "
            f"{tuned['tolerance_pp']:g} pp of the best gap win): " + "; ".join(parts) + ".", ""]
