"""Hyper-parameters of the removal methods, chosen on a validation split (never the test digits).

    .venv/bin/python experiments/unlearning_mnist.py --tune-methods    # writes TUNED below

The split: the 8,000 training digits are cut once (permutation seed 1) into 6,000 train and
2,000 validation digits; a model is trained on the 6,000 (seed 0), 10% of them are forgotten at
random, and each candidate value is scored by its average gap to the model retrained without
them, measured on the validation digits in place of the test digits. The main run then reads
the chosen values from ``experiments/out/unlearning_tuning.json``.

What is tuned: the baselines' learning rate (Fisher forgetting's noise scale ``alpha``; SGD
steps at the library defaults diverged to NaN on the Adam-trained LeNet: NegGrad and SCRUB in
every seed), and IAU's work knobs, with and without EK-FAC, since its target is a gap *and* a
speed-up: the batch size of the retained data its correction reads, the number of correction
steps and the size the first step starts from (``retain_lr``; the library default 0.2 suits
the SGD-trained MLP, while on the Adam-trained LeNet it is shortened three times, a forward
pass each, before it is accepted). They are searched jointly, and the cheapest combination
(:func:`correction_cost`) whose validation gap is within ``STEPS_TOLERANCE`` pp of the best
one is kept.
"""

from __future__ import annotations

import argparse
import itertools
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
}
#: IAU's work knobs, searched jointly: the correction's batch size (of the shuffled retain
#: loader it reads), number of steps, and the size its first step starts from
IAU_GRID: dict[str, list[float]] = {"retain_batch_size": [128, 64, 32],
                                    "retain_steps": [1, 2, 3, 5],
                                    "retain_lr": [0.2, 0.05, 0.02]}
IAU_METHODS = ("iau", "iau_ekfac")
#: IAU keeps the cheapest knobs whose validation gap is within this many pp of the best one
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
    """The value with the smallest gap; failed values (NaN gap) never win."""
    ok = {v: g for v, g in gaps.items() if math.isfinite(g)}
    if not ok:
        raise RuntimeError(f"{method}: every candidate failed on the validation split: {gaps}")
    return min(ok, key=ok.__getitem__)


def correction_cost(row: dict[str, Any]) -> int:
    """Work of IAU's correction in retained-example forward passes: each step one forward and
    backward pass over its batch (counted as 3 forwards), each Armijo try one forward."""
    return int(row["retain_batch_size"]) * (3 * int(row["retain_steps"]) + int(row["passes"]))


def choose_iau(method: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """IAU's knobs: the cheapest (:func:`correction_cost`; ties: the smaller gap) among the rows
    whose gap is within ``STEPS_TOLERANCE`` of the best; failed rows never win."""
    ok = [r for r in rows if math.isfinite(r["gap"])]
    if not ok:
        raise RuntimeError(f"{method}: every candidate failed on the validation split")
    best = min(r["gap"] for r in ok)
    pick = min((r for r in ok if r["gap"] <= best + STEPS_TOLERANCE),
               key=lambda r: (correction_cost(r), r["gap"]))
    return {k: pick[k] for k in IAU_GRID}


def _validation_gap(method: str, kind: str, kw: dict[str, Any], ctx: dict[str, Any],
                    args: argparse.Namespace, ld: dict[str, DataLoader], ref: dict[str, float]
                    ) -> tuple[float, Any]:
    """``(validation gap, RemovalResult)`` of ``method`` with keyword arguments ``kw``."""
    m = um.make_method(method, kind, 0, ctx, args, overrides=kw)
    retain = um.method_retain(method, ld["retain"], 0, args,
                              int(kw.get("retain_batch_size", um.IAU_RETAIN_BATCH)))
    res = m.unlearn(ctx["original"], forget=ld["forget"], retain=retain)
    return um.average_gap(um.evaluate(res.model, ld, 0), ref, um.GAP), res


def tune_iau(method: str, kind: str, ctx: dict[str, Any], args: argparse.Namespace,
             ld: dict[str, DataLoader], ref: dict[str, float], log: Callable[[str], None]
             ) -> dict[str, Any]:
    """Every combination of ``IAU_GRID``: its validation gap, correction passes and cost."""
    rows = []
    for values in itertools.product(*IAU_GRID.values()):
        kw = dict(zip(IAU_GRID, values, strict=True))
        row: dict[str, Any] = {**kw, "gap": math.nan, "passes": 0}
        try:
            row["gap"], res = _validation_gap(method, kind, kw, ctx, args, ld, ref)
            d = res.details
            row["passes"] = len(d["retain_step_lrs"]) + int(d["retain_halvings"])
            row["seconds"] = res.seconds
        except (FloatingPointError, RuntimeError, ValueError) as err:
            log(f"  tune {kind} {method} {kw}: failed ({err})")
        row["cost"] = correction_cost(row)
        rows.append(row)
        log(f"  tune {kind} {method} {kw}: validation gap {row['gap']:.2f} pp, "
            f"{row['passes']} correction passes, cost {row['cost']}")
    chosen = choose_iau(method, rows)
    log(f"  chosen {kind} {method}: {chosen}")
    return {"key": ",".join(IAU_GRID), "grid": rows, "chosen": chosen}


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
        ctx: dict[str, Any] = {"original": original}
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
                try:
                    gaps[value], res = _validation_gap(method, kind, {key: value}, ctx, args,
                                                       ld, ref)
                except (FloatingPointError, RuntimeError, ValueError) as err:
                    gaps[value] = math.nan
                    log(f"  tune {kind} {method} {key}={value:g}: failed ({err})")
                    continue
                log(f"  tune {kind} {method} {key}={value:g}: validation gap "
                    f"{gaps[value]:.2f} pp ({res.seconds:.3f} s)")
            pick = choose(method, gaps)
            per[method] = {"key": key, "gaps": {f"{v:g}": g for v, g in gaps.items()},
                           "chosen": pick}
            log(f"  chosen {kind} {method}: {key}={pick:g}")
        for method in IAU_METHODS:
            if method in args.methods:
                per[method] = tune_iau(method, kind, ctx, args, ld, ref, log)
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
    if not got:
        return {}
    return dict(got["chosen"]) if isinstance(got["chosen"], dict) else {got["key"]: got["chosen"]}


def report_lines(tuned: dict[str, Any]) -> list[str]:
    if not tuned:
        return ["Baselines ran at their documented defaults (no `--tune-methods` file).", ""]
    parts, iau = [], []
    for kind, per in tuned["per_model"].items():
        for method, t in per.items():
            if isinstance(t["chosen"], dict):
                iau.extend(_iau_lines(kind, method, t))
                continue
            vals = ", ".join(f"{v} → {g:.2f}" for v, g in t["gaps"].items())
            parts.append(f"{kind.upper()} {um.LABELS[method]}: {t['key']} = "
                         f"**{t['chosen']:g}** ({vals})")
    return [f"Chosen by `--tune-methods` on {tuned['validation']} (seed 0, 10% random "
            "forgetting, validation gap to retraining in pp; the smallest gap wins): "
            + "; ".join(parts) + ".", "",
            "IAU's work knobs (the correction's batch size, number of steps and first step "
            f"size), chosen jointly on the same split: the cheapest combination of {grid_text()} "
            f"whose validation gap is within {tuned['tolerance_pp']:g} pp of the best one, the "
            "cost being the retained examples the correction passes forward (a step's forward "
            "and backward counted as 3, each backtracking try as 1):", "", *iau, ""]


def grid_text() -> str:
    return " × ".join(f"{k} ∈ {{{', '.join(f'{v:g}' for v in vals)}}}"
                      for k, vals in IAU_GRID.items())


def _iau_lines(kind: str, method: str, t: dict[str, Any]) -> list[str]:
    """The chosen knobs and the cheapest few rows near the best gap."""
    ok = [r for r in t["grid"] if math.isfinite(r["gap"])]
    best = min(r["gap"] for r in ok)
    shown = sorted(ok, key=lambda r: r["gap"])[:3] + sorted(ok, key=correction_cost)[:3]
    seen, cells = set(), []
    for r in shown:
        key = tuple(r[k] for k in IAU_GRID)
        if key not in seen:
            seen.add(key)
            cells.append(f"({', '.join(f'{v:g}' for v in key)}) → {r['gap']:.2f} pp, cost "
                         f"{correction_cost(r):,}")
    chosen = ", ".join(f"{k} = {v:g}" for k, v in t["chosen"].items())
    return [f"* {kind.upper()} {um.LABELS[method]}: **{chosen}** (best gap {best:.2f} pp; "
            f"the three best and the three cheapest of {len(t['grid'])}: "
            + "; ".join(cells) + ")"]
