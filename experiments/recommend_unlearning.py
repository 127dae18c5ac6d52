"""Recommendation unlearning on MovieLens-100K: every removal method against retraining.

    .venv/bin/python experiments/recommend_unlearning.py --tune       # choose settings (validation)
    .venv/bin/python experiments/recommend_unlearning.py              # 3 seeds, both scenarios
    .venv/bin/python experiments/recommend_unlearning.py --ledger-demo
    .venv/bin/python experiments/recommend_unlearning.py --report     # rebuild the markdown

Data: MovieLens-100K as implicit feedback (a rating >= 4 is an interaction; every user's
interactions split 80/20 into train/test, seed 0), LightGCN (64-d, 3 layers, BPR, the
backbone's default :class:`BPRConfig`).

``--tune`` chooses the backbone's learning rate and epochs and UnlearnRec's unlearning loss
on a validation split carved out of the training interactions (10 % of each user's, seed 0;
the test split is never read) and writes ``experiments/out/recommend_tuning.json``; the
chosen values are the library defaults the test run uses (the report says whether they
still match).

The test run, per seed: train the model (and a 4-shard user-partitioned ensemble for
sharded retraining), pre-train UnlearnRec's encoder once, then for each scenario (5 % of the
training interactions at random; all interactions of 5 % of the users) run every method on
the same request: retraining (the reference, its own seed), fine-tuning, the influence update
with spill-over, sharded retraining, UnlearnRec and its variants (the trade-off curve). Every
model is measured on the remaining graph with :func:`unlearn.recommend.forgetting_report`.

Writes ``experiments/out/recommend.json`` (every row, appended after each run so an
interrupted run resumes with ``--resume``) and ``docs/results/recommend.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from baselines.recommend import (  # noqa: E402
    FineTuneRec,
    InfluenceRec,
    RetrainRec,
    ShardedRetrainRec,
    train_sharded,
)
from unlearn.recommend import (  # noqa: E402
    BPRConfig,
    forgetting_report,
    load_movielens_100k,
    train_lightgcn,
)
from unlearn.recommend.protocol import forget_request  # noqa: E402
from unlearn.removal.recommend import UnlearnRec, UnlearnRecConfig  # noqa: E402

ML100K = ROOT.parent / "shared" / "data" / "ml-100k"
OUT = ROOT / "experiments" / "out" / "recommend.json"
TUNE_OUT = ROOT / "experiments" / "out" / "recommend_tuning.json"
MD = ROOT / "docs" / "results" / "recommend.md"
SCENARIOS = ("interactions-5%", "users-5%")
METHODS = ("retrain", "finetune", "influence", "sharded-retrain", "unlearnrec")
#: the unlearning weights of the trade-off curve (each pre-trained and applied with it)
SWEEP = (0.3, 1.0, 2.0, 4.0)
#: the configuration UnlearnRec had before the settings were chosen on validation
PREVIOUS = {"unlearn_reference": "global", "unlearn_floor": 1.0, "lambda_unlearn": 1.0,
            "finetune_steps": 10, "reset_emptied_users": False}


def describe(config: dict[str, Any]) -> str:
    """A configuration's tuned fields in words."""
    floor = config["unlearn_floor"]
    return (f"{config['unlearn_reference']} reference, "
            f"{'no floor' if floor is None else f'floor {floor:g}'}, "
            f"λ_unlearn {config['lambda_unlearn']:g}, {config['finetune_steps']} fine-tuning "
            "steps" + ("" if config.get("reset_emptied_users", True) else ", no reset"))


def variants(default: UnlearnRecConfig) -> dict[str, dict[str, Any]]:
    """UnlearnRec variants beside the default: the other fine-tuning step counts of
    :data:`FINETUNE_STEPS` (sharing the default's pre-training), the other unlearning weights
    of :data:`SWEEP`, the other reference level, with / without the floor, the previous
    default. Each changes only the fields named."""
    out: dict[str, dict[str, Any]] = {}
    for steps in FINETUNE_STEPS:
        if steps != default.finetune_steps:
            out[f"unlearnrec[finetune_steps={steps}]"] = {"finetune_steps": steps}
    out[f"unlearnrec[{'no reset' if default.reset_emptied_users else 'reset'}]"] = {
        "reset_emptied_users": not default.reset_emptied_users}
    for lam in SWEEP:
        if lam != default.lambda_unlearn:
            out[f"unlearnrec[lambda_u={lam:g}]"] = {"lambda_unlearn": lam}
    other = "user" if default.unlearn_reference == "global" else "global"
    out[f"unlearnrec[{other} reference]"] = {"unlearn_reference": other}
    if default.unlearn_floor is None:
        out["unlearnrec[floor 1]"] = {"unlearn_floor": 1.0}
    else:
        out["unlearnrec[no floor]"] = {"unlearn_floor": None}
    same = [name for name, change in out.items()
            if asdict(replace(default, **change)) == asdict(replace(default, **PREVIOUS))]
    if same:  # name the variant that is the previous default as such
        out[f"{same[0][:-1]}, = previous default]"] = out.pop(same[0])
    elif any(getattr(default, k) != v for k, v in PREVIOUS.items()):
        out["unlearnrec[previous default]"] = dict(PREVIOUS)
    return out


def forget_ids(graph: Any, scenario: str, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 + seed)
    if scenario == "interactions-5%":
        pick = torch.randperm(graph.n_train, generator=gen)[:round(0.05 * graph.n_train)]
        return torch.sort(graph.train_ids[pick]).values
    users = torch.randperm(graph.n_users, generator=gen)[:round(0.05 * graph.n_users)]
    return forget_request(graph, users=users)


def measure(model: Any, remaining: Any, forget: torch.Tensor) -> dict[str, float]:
    r = forgetting_report(model, remaining, forget, k=20, n_random=5000, seed=0)
    return {k: float(v) for k, v in r.items() if k != "users"}


def run_seed(graph: Any, seed: int, cfg: BPRConfig, rows: list[dict[str, Any]],
             save: Any, log: Any) -> None:
    done = {(r["seed"], r["scenario"], r["method"]) for r in rows}
    t = time.perf_counter()
    base = train_lightgcn(graph, replace(cfg, seed=seed))
    base_seconds = time.perf_counter() - t
    log(f"seed {seed}: base model trained in {base_seconds:.1f} s")
    t = time.perf_counter()
    sharded = train_sharded(graph, n_shards=4, partition="user", config=replace(cfg, seed=seed),
                            seed=seed)
    log(f"seed {seed}: sharded ensemble trained in {time.perf_counter() - t:.1f} s")
    unlearnrec = UnlearnRec(UnlearnRecConfig(seed=seed))
    report = unlearnrec.pretrain(base, graph)
    log(f"seed {seed}: UnlearnRec pre-trained in {report.seconds:.1f} s")
    pretrained: dict[str, UnlearnRec] = {}
    for scenario in SCENARIOS:
        forget = forget_ids(graph, scenario, seed)
        remaining = graph.without(forget)
        common = {"seed": seed, "scenario": scenario, "n_forget": len(forget),
                  "base_seconds": base_seconds}
        if (seed, scenario, "original") not in done:
            rows.append({**common, "method": "original", "seconds": 0.0,
                         **measure(base, remaining, forget)})
        methods: list[tuple[str, Any, Any, dict[str, Any]]] = [
            ("retrain", RetrainRec(replace(cfg, seed=seed + 100)), base, {}),
            ("finetune", FineTuneRec(seed=seed), base, {}),
            ("influence", InfluenceRec(), base, {}),
            ("sharded-retrain", ShardedRetrainRec(), sharded, {}),
            ("unlearnrec", unlearnrec, base,
             {"pretrain_seconds": report.seconds, "pretrain_steps": report.steps}),
        ]
        for name, change in variants(unlearnrec.config).items():
            if (seed, scenario, name) in done:
                continue
            if name not in pretrained and set(change) <= set(UnlearnRec.REQUEST_FIELDS):
                pretrained[name] = unlearnrec.with_request_settings(**change)
            elif name not in pretrained:
                variant = UnlearnRec(replace(unlearnrec.config, **change))
                variant.pretrain(base, graph)
                pretrained[name] = variant
            methods.append((name, pretrained[name], base,
                            {"pretrain_seconds": pretrained[name].pretrain_report.seconds,
                             "variant": change}))
        for name, method, model, extra in methods:
            if (seed, scenario, name) in done:
                continue
            res = method.unlearn(model, graph, forget)
            row = {**common, "method": name, "seconds": float(res.seconds), **extra,
                   **measure(res.model, remaining, forget)}
            rows.append(row)
            save(rows)
            log(f"seed {seed} {scenario:16s} {name:32s} {res.seconds:7.2f} s  "
                f"recall {row['recall@20']:.4f}  deleted {row['deleted_mean']:.3f}  "
                f"never-seen {row['never_seen_mean']:.3f}  below-user "
                f"{row['below_user_never_seen']:.2f}  auc {row['auc_vs_never_seen']:.3f}")


# ---------------------------------------------------------------------------- validation

#: share of each user's training interactions held out for choosing settings (seed 0)
VAL_FRACTION = 0.1
#: the backbone's grid: learning rates, each trained once and read every 20 epochs
BPR_LRS = (2e-3, 5e-3, 1e-2)
BPR_MAX_EPOCHS = 160
#: UnlearnRec's grid: the unlearning loss's reference level, its floor, its weight (each
#: pre-trained once), and the per-request settings sharing that pre-training: fine-tuning
#: steps, and whether users left without edges are re-initialised
LOSS_GRID = tuple({"unlearn_reference": ref, "unlearn_floor": floor, "lambda_unlearn": lam}
                  for ref in ("global", "user") for floor in (None, 1.0)
                  for lam in (0.3, 1.0, 2.0, 4.0))
FINETUNE_STEPS = (0, 1, 3, 5, 10)
REQUEST_GRID = tuple({"finetune_steps": steps, "reset_emptied_users": reset}
                     for reset in (True, False) for steps in FINETUNE_STEPS)
UNLEARN_GRID = tuple({**loss, **request} for loss in LOSS_GRID for request in REQUEST_GRID)
TUNE_SCENARIOS = ("interactions-5%", "users-5%", "small")
#: the selection rule's constraints: Recall@20 within 3 % of retraining's, and the deleted
#: pairs' membership AUC no more than the certificate's floor below retraining's
RECALL_TOL, AUC_FLOOR = 0.03, 0.05


def tune_requests(graph: Any, seed: int) -> dict[str, dict[str, torch.Tensor]]:
    """The validation requests of one seed (drawn apart from the test run's): 5 % random
    interactions, 5 % of the users, and a small mixed request like the ledger demo's (one
    whole user and 20 single interactions of other users)."""
    gen = torch.Generator().manual_seed(2000 + seed)
    inter = graph.train_ids[torch.randperm(graph.n_train, generator=gen)]
    users = torch.randperm(graph.n_users, generator=gen)[:round(0.05 * graph.n_users)]
    user = int(torch.randperm(graph.n_users, generator=gen)[0])
    pairs = graph.train_pairs()
    pairs = pairs[pairs[:, 0] != user]
    pairs = pairs[torch.randperm(len(pairs), generator=gen)[:20]]
    single = graph.ids_of_pairs(pairs[:, 0], pairs[:, 1])
    whole = graph.user_interaction_ids(user)
    return {"interactions-5%": {"all": torch.sort(inter[:round(0.05 * graph.n_train)]).values},
            "users-5%": {"all": forget_request(graph, users=users)},
            "small": {"all": torch.sort(torch.cat([whole, single])).values, "user": whole,
                      "pairs": single}}


def measure_groups(model: Any, remaining: Any, groups: dict[str, torch.Tensor]
                   ) -> dict[str, float]:
    """:func:`measure` of the whole request, plus the deleted-pair mean and membership AUC
    of each part of a mixed request (``user`` / ``pairs``)."""
    from unlearn.recommend.metrics import auc, never_seen_pairs
    from unlearn.recommend.model import score_matrix

    row = measure(model, remaining, groups["all"])
    if len(groups) > 1:
        scores = score_matrix(model, remaining)
        never = never_seen_pairs(remaining, 5000, 0)
        ns = scores[never[:, 0], never[:, 1]]
        for name, ids in groups.items():
            if name != "all":
                p = remaining.pairs(ids)
                d = scores[p[:, 0], p[:, 1]]
                row[f"{name}_deleted_mean"] = float(d.mean())
                row[f"{name}_auc"] = auc(d, ns)
    return row


def tune_backbone(val: Any, seeds: list[int], log: Any) -> dict[str, Any]:
    """Validation Recall@20 / NDCG@20 of the backbone for each learning rate and seed, every
    20 epochs up to ``BPR_MAX_EPOCHS`` (the same run as training for that many epochs)."""
    from unlearn.recommend.metrics import ranking_metrics
    from unlearn.recommend.model import fit_bpr, make_lightgcn

    rows = []
    base = BPRConfig()
    for seed in seeds:
        for lr in BPR_LRS:
            model = make_lightgcn(val, base.dim, base.num_layers, seed)
            start = time.perf_counter()

            def read(epoch: int, loss: float, lr: float = lr, model: Any = model,
                     start: float = start, seed: int = seed) -> None:
                if epoch % 20 == 0:
                    m = ranking_metrics(model, val, 20)
                    rows.append({"seed": seed, "lr": lr, "epochs": epoch,
                                 "recall@20": m["recall@20"], "ndcg@20": m["ndcg@20"],
                                 "loss": loss, "seconds": time.perf_counter() - start})
                    log(f"backbone seed {seed} lr {lr:g} epoch {epoch}: validation recall "
                        f"{m['recall@20']:.4f}")

            fit_bpr(model, val, epochs=BPR_MAX_EPOCHS, lr=lr, batch_size=base.batch_size,
                    reg=base.reg, seed=seed + 1, on_epoch=read)
    return {"rows": rows, "chosen": choose_backbone(rows)}


def backbone_means(rows: list[dict[str, Any]]) -> dict[tuple[float, int], tuple[float, float]]:
    """(lr, epochs) -> mean and std over seeds of the validation Recall@20."""
    keys = sorted({(r["lr"], r["epochs"]) for r in rows})
    out = {}
    for lr, ep in keys:
        vals = [r["recall@20"] for r in rows if r["lr"] == lr and r["epochs"] == ep]
        out[(lr, ep)] = (float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1
                         else 0.0)
    return out


def choose_backbone(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The fewest epochs whose mean validation Recall@20 over seeds is within 1 % (relative)
    of the grid's best mean (more epochs cost retraining time for no measurable gain), then
    the best lr."""
    means = backbone_means(rows)
    best = max(m for m, _ in means.values())
    near = [(ep, -m, lr) for (lr, ep), (m, _) in means.items() if m >= 0.99 * best]
    ep, neg, lr = min(near)
    return {"lr": lr, "epochs": ep, "recall@20": -neg, "best_recall@20": best}


def tune_unlearnrec(val: Any, cfg: BPRConfig, seeds: list[int], log: Any) -> dict[str, Any]:
    """Every :data:`UNLEARN_GRID` configuration (pre-trained and applied with it) against
    retraining on the validation requests of each seed."""
    rows: list[dict[str, Any]] = []
    for seed in seeds:
        base = train_lightgcn(val, replace(cfg, seed=seed))
        reqs = tune_requests(val, seed)
        remaining = {sc: val.without(g["all"]) for sc, g in reqs.items()}
        for sc, groups in reqs.items():
            ref = RetrainRec(replace(cfg, seed=seed + 100)).unlearn(base, val, groups["all"])
            rows.append({"seed": seed, "scenario": sc, "method": "retrain",
                         **measure_groups(ref.model, remaining[sc], groups)})
            rows.append({"seed": seed, "scenario": sc, "method": "original",
                         **measure_groups(base, remaining[sc], groups)})
        log(f"tune seed {seed}: base and references trained")
        for loss in LOSS_GRID:
            pretrained = UnlearnRec(UnlearnRecConfig(seed=seed, **loss))
            pretrained.pretrain(base, val)
            for request in REQUEST_GRID:
                method = pretrained.with_request_settings(**request)
                for sc, groups in reqs.items():
                    res = method.unlearn(base, val, groups["all"])
                    row = {"seed": seed, "scenario": sc, "method": "unlearnrec", **loss,
                           **request, "seconds": float(res.seconds),
                           **measure_groups(res.model, remaining[sc], groups)}
                    rows.append(row)
                log(f"tune seed {seed} {loss} {request}: " + "; ".join(
                    f"{r['scenario']} recall {r['recall@20']:.4f} "
                    f"auc {r['auc_vs_never_seen']:.3f}" for r in rows[-len(reqs):]))
    return {"rows": rows, "chosen": choose_unlearnrec(rows)}


def grid_key(row: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(row[k] for k in UNLEARN_GRID[0])


def grid_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per grid configuration and request type, the mean over seeds of the Recall@20 gap
    and of the membership-AUC shortfall to retraining; the worst request type decides
    feasibility. Objective: the deleted pairs' mean score minus never-seen pairs', averaged
    over seeds and request types."""
    out = []
    for grid in UNLEARN_GRID:
        mine = [r for r in rows if r["method"] == "unlearnrec" and grid_key(r) == tuple(
            grid.values())]
        if not mine:
            continue
        gaps, shortfalls, deleted, ref_deleted = [], [], [], []
        for sc in TUNE_SCENARIOS:
            g, sh = [], []
            for r in (r for r in mine if r["scenario"] == sc):
                ref = _by(rows, seed=r["seed"], scenario=sc, method="retrain")[0]
                g.append((r["recall@20"] - ref["recall@20"]) / ref["recall@20"])
                sh.append(ref["auc_vs_never_seen"] - r["auc_vs_never_seen"])
                deleted.append(r["deleted_mean"] - r["never_seen_mean"])
                ref_deleted.append(ref["deleted_mean"] - ref["never_seen_mean"])
            gaps.append(float(np.mean(g)))
            shortfalls.append(float(np.mean(sh)))
        inter = [r for r in mine if r["scenario"] == "interactions-5%"]
        out.append({**grid, "worst_recall_gap": min(gaps), "worst_auc_shortfall":
                    max(shortfalls), "worst_auc_gap": max(abs(x) for x in shortfalls),
                    "deleted_gap": float(np.mean(deleted)),
                    "retrain_deleted_gap": float(np.mean(ref_deleted)),
                    "seconds": float(np.mean([r["seconds"] for r in mine])),
                    "inter_deleted_gap": float(np.mean(
                        [r["deleted_mean"] - r["never_seen_mean"] for r in inter])),
                    "below_user": float(np.mean([r["below_user_never_seen"] for r in inter])),
                    "feasible": min(gaps) >= -RECALL_TOL and max(shortfalls) <= AUC_FLOOR})
    return out


def choose_unlearnrec(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The validation rule. Feasible: Recall@20 within 3 % of retraining and no
    over-forgetting (membership AUC at most 0.05 below retraining's) on every request type
    (means over seeds). Among the feasible configurations whose deleted pairs stand out
    against never-seen pairs no more than under retraining (the deleted − never-seen mean
    score, averaged over seeds and request types, at most retraining's on the same requests:
    the issue's target, held to the gold standard), the one with the fewest fine-tuning steps
    (the cheapest request), then the one closest to retraining's membership AUC (smallest
    worst gap over the request types). If none forgets that much, the feasible one whose
    deleted pairs score lowest."""
    feasible = [s for s in grid_summary(rows) if s["feasible"]]
    if not feasible:
        return None
    enough = [s for s in feasible if s["deleted_gap"] <= s["retrain_deleted_gap"]]
    if enough:
        pick = min(enough, key=lambda s: (s["finetune_steps"], s["worst_auc_gap"]))
    else:
        pick = min(feasible, key=lambda s: s["deleted_gap"])
    return {k: pick[k] for k in UNLEARN_GRID[0]}


def run_tuning(graph: Any, seeds: list[int], path: Path, log: Any) -> dict[str, Any]:
    val = graph.validation_split(VAL_FRACTION, seed=0)
    log(f"validation graph: {val}")
    start = time.perf_counter()
    backbone = tune_backbone(val, seeds, log)
    chosen = backbone["chosen"]
    cfg = replace(BPRConfig(), lr=chosen["lr"], epochs=chosen["epochs"])
    log(f"backbone chosen on validation: lr {cfg.lr:g}, {cfg.epochs} epochs")
    unlearn = tune_unlearnrec(val, cfg, seeds, log)
    log(f"UnlearnRec chosen on validation: {unlearn['chosen']}")
    data = {"command": "python experiments/recommend_unlearning.py --tune",
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": _commit(), "machine": machine(), "val_fraction": VAL_FRACTION,
            "n_train": val.n_train, "n_val": len(val.test_ids), "seeds": seeds,
            "backbone": backbone, "bpr": cfg.to_dict(), "unlearnrec": unlearn,
            "total_seconds": time.perf_counter() - start}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))
    return data


# ---------------------------------------------------------------------------- report


def _ms(values: list[float], fmt: str = "{:.4f}") -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(np.mean(values))} ± {fmt.replace('+', '').format(np.std(values, ddof=1))}"


def _by(rows: list[dict[str, Any]], **match: Any) -> list[dict[str, Any]]:
    return [r for r in rows if all(r.get(k) == v for k, v in match.items())]


def _rel(rows: list[dict[str, Any]], row: dict[str, Any], key: str) -> float:
    ref = _by(rows, seed=row["seed"], scenario=row["scenario"], method="retrain")[0]
    return (row[key] - ref[key]) / ref[key]


def _speedup(rows: list[dict[str, Any]], row: dict[str, Any]) -> float:
    ref = _by(rows, seed=row["seed"], scenario=row["scenario"], method="retrain")[0]
    return ref["seconds"] / row["seconds"] if row["seconds"] > 0 else float("nan")


def table(rows: list[dict[str, Any]], scenario: str, names: list[str]) -> list[str]:
    out = ["| method | Recall@20 | gap to retrain | NDCG@20 | gap to retrain | deleted-pair "
           "mean score | never-seen mean score | deleted ≤ never-seen | deleted pairs ≤ own "
           "user's never-seen mean | MIA AUC (deleted vs never-seen) | seconds | speed-up |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in names:
        rs = _by(rows, scenario=scenario, method=name)
        if not rs:
            continue
        below = sum(r["deleted_mean"] <= r["never_seen_mean"] for r in rs)
        speed = [_speedup(rows, r) for r in rs] if name not in ("retrain", "original") else []
        out.append(
            f"| {name} | {_ms([r['recall@20'] for r in rs])} | "
            f"{_ms([100 * _rel(rows, r, 'recall@20') for r in rs], '{:+.1f}')} % | "
            f"{_ms([r['ndcg@20'] for r in rs])} | "
            f"{_ms([100 * _rel(rows, r, 'ndcg@20') for r in rs], '{:+.1f}')} % | "
            f"{_ms([r['deleted_mean'] for r in rs], '{:.2f}')} | "
            f"{_ms([r['never_seen_mean'] for r in rs], '{:.2f}')} | {below}/{len(rs)} | "
            f"{_ms([100 * r.get('below_user_never_seen', np.nan) for r in rs], '{:.0f}')} % | "
            f"{_ms([r['auc_vs_never_seen'] for r in rs], '{:.3f}')} | "
            f"{_ms([r['seconds'] for r in rs], '{:.3f}')} | "
            f"{_ms(speed, '{:.1f}') + '×' if speed else '–'} |")
    return out


def verdict(rows: list[dict[str, Any]], scenario: str, name: str = "unlearnrec") -> list[str]:
    rs = _by(rows, scenario=scenario, method=name)
    if not rs:
        return []
    speed = float(np.mean([_speedup(rows, r) for r in rs]))
    gap = float(np.mean([100 * _rel(rows, r, "recall@20") for r in rs]))
    worst = max(abs(100 * _rel(rows, r, "recall@20")) for r in rs)
    below = sum(r["deleted_mean"] <= r["never_seen_mean"] for r in rs)
    ok = "met" if speed >= 10 else "missed"
    return [
        f"* {scenario}: speed-up {speed:.1f}× over retraining (target ≥ 10×: {ok}; aim 50×: "
        f"{'met' if speed >= 50 else 'missed'}); Recall@20 {gap:+.1f} % relative to "
        f"retraining on average, worst seed {worst:.2f} % (target within 3 %: "
        f"{'met' if worst <= 3 else 'missed'}); deleted pairs no higher than never-seen "
        f"pairs in {below}/{len(rs)} seeds (target: "
        f"{'met' if below == len(rs) else 'missed'})."]


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{os.cpu_count()} CPU cores ({cpu}); torch {torch.__version__} with "
            f"{torch.get_num_threads()} thread(s); Python {platform.python_version()}; no GPU")


def write_report(data: dict[str, Any], path: Path) -> None:
    rows = data["rows"]
    seeds = sorted({r["seed"] for r in rows})
    names = ["original", *METHODS]
    n_forget = {sc: sorted({r["n_forget"] for r in rows if r["scenario"] == sc})
                for sc in SCENARIOS}
    pre = [r["pretrain_seconds"] for r in rows if r["method"] == "unlearnrec"
           and r["scenario"] == SCENARIOS[0]]
    base = sorted({(r["seed"], r["base_seconds"]) for r in rows})
    lines = [
        "# Recommendation unlearning on MovieLens-100K",
        "",
        f"Generated by `{data['command']}` on {data['date']} ({data['machine']}). The "
        "methods of one seed and scenario ran back to back under the same conditions, one "
        "thread each. Commit "
        f"{data.get('commit', '?')} at the start of the run; `--report` rebuilds these tables "
        "from `experiments/out/recommend.json`."
        + (f" The whole run took {data['total_seconds'] / 60:.1f} min."
           if "total_seconds" in data else ""),
        "",
        f"Seeds: {', '.join(map(str, seeds))} (the seed sets the base model's training, the "
        "sharded ensemble, the request sample and the seeds of fine-tuning and UnlearnRec; "
        "retraining uses seed + 100, so it is "
        "a genuinely different run, not a replay of the base model). Values are mean ± std "
        "over seeds.",
        "",
        "Data: MovieLens-100K (`/work/shared/data/ml-100k/ml-100k.inter`) as implicit "
        f"feedback: a rating ≥ 4 is an interaction ({data['n_interactions']:,} "
        f"interactions; {data['n_users']} users, {data['n_items']:,} items), each user's "
        "interactions split 80/20 into train/test (seed 0): "
        f"{data['n_train']:,} training interactions. Model: torch-geometric LightGCN, "
        f"{data['bpr']['dim']}-d, {data['bpr']['num_layers']} layers, BPR with one uniform "
        f"negative per interaction, Adam lr {data['bpr']['lr']}, {data['bpr']['epochs']} "
        f"epochs, batch {data['bpr']['batch_size']}, reg {data['bpr']['reg']} "
        "(`BPRConfig()` defaults); training took "
        f"{', '.join(f'{s:.1f} s' for _, s in base)} per seed.",
        "",
        "Requests: *interactions-5%*: 5 % of the training interactions at random "
        f"({', '.join(map(str, n_forget[SCENARIOS[0]]))} ids); *users-5%*: every training "
        f"interaction of 5 % of the users ({round(0.05 * data['n_users'])} users; "
        f"{', '.join(map(str, n_forget[SCENARIOS[1]]))} ids, depending on the seed). "
        "Every model is measured on the remaining graph: Recall@20 / NDCG@20 over all items "
        "(the user's remaining training items excluded, so deleted items compete again), "
        "mean score of the deleted pairs, mean score of 5,000 never-seen pairs (in no "
        "interaction at all, train or test), MIA AUC = AUC of deleted-pair scores against "
        "those never-seen pairs (a model that remembers the deleted edges scores them like "
        "members; compare with retraining, not with 0.5). Time = `RemovalResult.seconds`; "
        "speed-up = retraining's seconds / the method's, per seed and scenario.",
        "",
        "Methods: retrain = `RetrainRec` (from scratch on the remaining graph); finetune = "
        "`FineTuneRec()` (5 BPR epochs on the remaining graph, lr 1e-3); influence = "
        "`InfluenceRec()` (one damped Newton step on the ego embeddings within the "
        "propagation's reach, with the deleted edges' spill-over); sharded-retrain = "
        "`ShardedRetrainRec()` on a 4-shard user-partitioned ensemble (`train_sharded`), "
        "retraining every shard that held a deleted interaction; unlearnrec = `UnlearnRec("
        "UnlearnRecConfig(seed=s))`: one encoder pass plus "
        f"{data['unlearnrec']['finetune_steps']} fine-tuning steps on the request "
        f"(λ_unlearn {data['unlearnrec']['lambda_unlearn']}, λ_preserve "
        f"{data['unlearnrec']['lambda_preserve']}, λ_contrast "
        f"{data['unlearnrec']['lambda_contrast']}, margin "
        f"{data['unlearnrec']['unlearn_margin']}, reference level "
        f"{data['unlearnrec'].get('unlearn_reference', 'global')}, floor "
        f"{data['unlearnrec'].get('unlearn_floor')}).",
        "",
        f"UnlearnRec's pre-training ({data['unlearnrec']['pretrain_steps']} steps on "
        "simulated requests, half random 5 % edge drops, half random whole users covering "
        "5 % of the edges) is a one-off cost per trained model, not counted in the per-request "
        f"seconds: {_ms(pre, '{:.1f}')} s per seed.",
        "",
    ]
    if TUNE_OUT.is_file():
        lines += tuning_section(json.loads(TUNE_OUT.read_text()), data)
    for scenario in SCENARIOS:
        lines += [f"## {scenario}", "", *table(rows, scenario, names), ""]
    lines += ["## Targets (UnlearnRec, default configuration)", ""]
    for scenario in SCENARIOS:
        lines += verdict(rows, scenario)
    lines += [
        "",
        "## UnlearnRec's variants: the trade-off between forgetting and recall",
        "",
        "Each variant changes only the named fields of the default (and is pre-trained and "
        "applied with them, on the same base model and request; `finetune_steps=k`: k "
        "fine-tuning steps per request, and `no reset` / `reset`: without / with the "
        "re-initialisation of users left without edges, both sharing the default's "
        "pre-training); `lambda_u` = λ_unlearn, "
        "`user reference` / `global reference` = the unlearning hinge's level, `floor 1` / "
        "`no floor` = with / without the pull-up of deleted pairs more than 1 below it, "
        f"`previous default` = the configuration before this validation ({describe(PREVIOUS)}).",
        "",
    ]
    extra = [n for n in dict.fromkeys(r["method"] for r in rows)
             if n.startswith("unlearnrec[")]
    for scenario in SCENARIOS:
        lines += [f"### {scenario}", "",
                  *table(rows, scenario, ["retrain", "unlearnrec", *extra]), ""]
    lines += reading_notes(rows)
    suppression_file = OUT.parent / "recommend_suppression.json"
    if suppression_file.is_file():
        from recommend_suppression import section as suppression_section

        lines += suppression_section(json.loads(suppression_file.read_text()))
    demo_file = OUT.parent / "recommend_ledger.json"
    if demo_file.is_file():
        lines += ledger_section(json.loads(demo_file.read_text()))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def tuning_section(tune: dict[str, Any], data: dict[str, Any]) -> list[str]:
    """The validation choice: the backbone's grid, UnlearnRec's grid and what was chosen,
    and whether the test run used it."""
    bb = tune["backbone"]
    chosen_bb = bb["chosen"]
    # the rule of this code, applied to the stored rows (the stored choice is the rule's at
    # tuning time)
    chosen_ur = choose_unlearnrec(tune["unlearnrec"]["rows"])
    summary_all = grid_summary(tune["unlearnrec"]["rows"])
    retrain_gap = summary_all[0]["retrain_deleted_gap"] if summary_all else float("nan")
    lines = [
        "## Settings chosen on validation",
        "",
        f"Generated by `{tune['command']}` on {tune['date']} (commit {tune['commit']}; "
        f"{tune.get('machine', 'machine not recorded')}). "
        f"Nothing below the test tables was tuned on the test split: {tune['val_fraction']:.0%} "
        "of every user's training interactions (`InteractionGraph.validation_split("
        f"{tune['val_fraction']}, seed=0)`; {tune['n_val']:,} interactions) were held out, "
        f"models trained on the other {tune['n_train']:,}, and the settings chosen on "
        "Recall@20 over the held-out ones (the test interactions are in neither part).",
        "",
        f"**Backbone** (seeds {', '.join(map(str, tune['seeds']))}): LightGCN with the other "
        f"`BPRConfig()` fields, for each learning rate and seed one run of {BPR_MAX_EPOCHS} "
        "epochs read every 20 epochs. Rule: the fewest epochs whose mean validation Recall@20 "
        "is within 1 % (relative) of the grid's best mean, then the best lr. Chosen: **lr "
        f"{chosen_bb['lr']:g}, {chosen_bb['epochs']} epochs** (mean validation Recall@20 "
        f"{chosen_bb['recall@20']:.4f}; grid best {chosen_bb['best_recall@20']:.4f}). Mean ± "
        "std over seeds:",
        "",
    ]
    means = backbone_means(bb["rows"])
    epochs = sorted({ep for _, ep in means})
    lines += ["| lr | " + " | ".join(f"{e} epochs" for e in epochs) + " |",
              "| --- |" + " --- |" * len(epochs)]
    for lr in sorted({lr for lr, _ in means}):
        lines.append(f"| {lr:g} | " + " | ".join(
            f"{means[(lr, e)][0]:.4f} ± {means[(lr, e)][1]:.4f}" for e in epochs) + " |")
    urows = tune["unlearnrec"]["rows"]
    orig_gaps = [(r["recall@20"] - ref["recall@20"]) / ref["recall@20"]
                 for r in urows if r["method"] == "original"
                 for ref in _by(urows, seed=r["seed"], scenario=r["scenario"],
                                method="retrain")]
    lines += [
        "",
        f"**UnlearnRec** (validation seeds {', '.join(map(str, tune['seeds']))}; the chosen "
        "backbone; per seed a base model, and three requests drawn apart from the test run's: "
        "5 % random interactions, 5 % of the users, and a small mixed request like the ledger "
        "demo's, one whole user and 20 single interactions of other users; each against a "
        "retrained model). Every loss setting of the grid is pre-trained and applied with "
        "its own settings. Rule: keep the configurations whose Recall@20 stays within "
        f"{RECALL_TOL:.0%} of retraining and whose membership AUC falls at most {AUC_FLOOR} "
        "below retraining's (the certificate's floor: lower is over-forgetting) for every "
        "request type, each as the mean over seeds (a single seed's gap mixes in the base "
        "model's own seed noise: before any unlearning, the base model's Recall@20 on the "
        "remaining graph is already "
        f"{100 * min(orig_gaps):+.1f} % to {100 * max(orig_gaps):+.1f} % off its retrained "
        "counterpart across seeds and requests; a first attempt that required every single "
        "seed within 3 % found no feasible configuration); among them keep those whose "
        "deleted pairs stand out against never-seen pairs no more than under retraining (the "
        "deleted − never-seen mean score, averaged over seeds and request types, at most "
        f"retraining's {retrain_gap:.2f}: the issue's target held to the gold standard), and "
        "take the one with the fewest fine-tuning steps per request (the cheapest), then the "
        "one closest to retraining's membership AUC (smallest worst gap over the request "
        "types); if none forgets that much, the feasible one whose deleted pairs score "
        "lowest. This rule replaced, before any test run with this grid, one that took the "
        "lowest score and, within 0.1 of it, the fewest steps: that one picked 10 steps whose "
        "score was below retraining's own (forgetting more than the gold standard), and its "
        "0.1 had been justified as the seed-to-seed spread of the score, which the grid "
        "showed to be about 0.3. The loss settings are "
        "pre-trained once per seed; the per-request settings (fine-tuning steps, the reset "
        "of users left without edges) share that pre-training "
        "(`UnlearnRec.with_request_settings`). Chosen: **"
        + (", ".join(f"{k} {v}" for k, v in chosen_ur.items()) if chosen_ur else "none "
           "feasible") + "**.",
        "",
        "Each cell: deleted − never-seen mean score over all requests (the objective; lower "
        "is more forgetting), marked ✗ where the configuration is not feasible; bold: chosen.",
        "",
        "| reference | floor | λ_unlearn | " + " | ".join(
            f"{r['finetune_steps']} steps{'' if r['reset_emptied_users'] else ', no reset'}"
            for r in REQUEST_GRID) + " |",
        "| --- | --- | --- |" + " --- |" * len(REQUEST_GRID),
    ]
    summary = grid_summary(urows)
    for loss in LOSS_GRID:
        cells = []
        for request in REQUEST_GRID:
            sm = next((x for x in summary if all(x[k] == v for k, v in
                                                 {**loss, **request}.items())), None)
            if sm is None:
                cells.append("–")
                continue
            cell = f"{sm['deleted_gap']:.2f}" + ("" if sm["feasible"] else " ✗")
            if chosen_ur and all(sm[k] == v for k, v in chosen_ur.items()):
                cell = f"**{cell}**"
            cells.append(cell)
        lines.append(f"| {loss['unlearn_reference']} | {loss['unlearn_floor']} | "
                     f"{loss['lambda_unlearn']:g} | " + " | ".join(cells) + " |")
    if chosen_ur:
        lines += ["", "The chosen loss settings with each per-request setting (means over "
                  "seeds; seconds = one request, pre-training excluded; reset = users left "
                  "without edges re-initialised):", "",
                  "| fine-tuning steps | reset | worst mean Recall@20 gap | worst mean AUC "
                  "shortfall | worst mean \\|AUC gap\\| | deleted − never-seen (all "
                  "requests) | interactions-5%: deleted − never-seen | interactions-5%: "
                  "deleted ≤ own user's level | seconds | feasible |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for sm in summary:
            if any(sm[k] != v for k, v in chosen_ur.items() if k in LOSS_GRID[0]):
                continue
            mark = "**" if all(sm[k] == chosen_ur[k] for k in REQUEST_GRID[0]) else ""
            lines.append(
                f"| {mark}{sm['finetune_steps']}{mark} | "
                f"{'yes' if sm['reset_emptied_users'] else 'no'} | "
                f"{100 * sm['worst_recall_gap']:+.1f} % "
                f"| {sm['worst_auc_shortfall']:+.3f} | {sm['worst_auc_gap']:.3f} | "
                f"{sm['deleted_gap']:.2f} | "
                f"{sm['inter_deleted_gap']:.2f} | {100 * sm['below_user']:.0f} % | "
                f"{sm['seconds']:.3f} | {'yes' if sm['feasible'] else 'no'} |")
    ret = [r for r in urows if r["method"] == "retrain" and r["scenario"] == "interactions-5%"]
    lines += ["", "Retraining on the same validation requests: interactions-5% deleted − "
              "never-seen "
              f"{np.mean([r['deleted_mean'] - r['never_seen_mean'] for r in ret]):.2f}, "
              "deleted ≤ own user's level "
              f"{100 * np.mean([r['below_user_never_seen'] for r in ret]):.0f} %.", ""]
    # the small mixed request, part by part (the ledger demo's diagnosis)
    lines += ["Small mixed request on validation (mean over seeds): the deleted user's pairs "
              "and the 20 single interactions, each as mean score / membership AUC against "
              "never-seen pairs.", "",
              "| model | whole user: mean | whole user: AUC | single pairs: mean | single "
              "pairs: AUC | all: AUC | Recall@20 |", "| --- | --- | --- | --- | --- | --- | --- |"]
    picks = [("retrain", {"method": "retrain"}), ("original", {"method": "original"}),
             ("previous default", {"method": "unlearnrec", **PREVIOUS})]
    if chosen_ur:
        picks.append(("chosen", {"method": "unlearnrec", **chosen_ur}))
    for label, match in picks:
        rs = _by(urows, scenario="small", **match)
        if rs:
            lines.append(
                f"| {label} | {np.mean([r['user_deleted_mean'] for r in rs]):.2f} | "
                f"{np.mean([r['user_auc'] for r in rs]):.3f} | "
                f"{np.mean([r['pairs_deleted_mean'] for r in rs]):.2f} | "
                f"{np.mean([r['pairs_auc'] for r in rs]):.3f} | "
                f"{np.mean([r['auc_vs_never_seen'] for r in rs]):.3f} | "
                f"{np.mean([r['recall@20'] for r in rs]):.4f} |")
    used = {"bpr": all(data["bpr"].get(k) == chosen_bb[k] for k in ("lr", "epochs")),
            "unlearnrec": bool(chosen_ur) and all(
                data["unlearnrec"].get(k) == v for k, v in chosen_ur.items())}
    lines += ["", "The test run below uses these choices as the library defaults: backbone "
              f"{'yes' if used['bpr'] else 'NO'}, UnlearnRec "
              f"{'yes' if used['unlearnrec'] else 'NO'}.", ""]
    return lines


def ledger_demo(graph: Any, cfg: BPRConfig, out_dir: Path, log: Any) -> dict[str, Any]:
    """Requests through the ledger on ML-100K: one whole user and a few single interactions,
    applied with UnlearnRec in one batch, certified against 3 retrained references."""
    import shutil

    from unlearn.audit.recommend import certify_recommendation, retrain_rec_references
    from unlearn.ledger import Ledger
    from unlearn.recommend.requests import (
        apply_requests,
        certify_requests,
        submit_pairs,
        submit_user,
    )

    # a fresh directory, reference cache included: the references' retraining seconds are
    # the speed-up's denominator and must come from this code, not an earlier run's
    work = out_dir / "recommend_ledger_demo"
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(out_dir / "rec_refs", ignore_errors=True)  # where earlier runs kept them
    work.mkdir(parents=True)
    base = train_lightgcn(graph, replace(cfg, seed=0))
    log("ledger demo: base model trained")
    gen = torch.Generator().manual_seed(7)
    user = int(torch.randperm(graph.n_users, generator=gen)[0])
    others = graph.train_pairs()
    others = others[others[:, 0] != user]
    pairs = others[torch.randperm(len(others), generator=gen)[:20]].tolist()
    with Ledger(work / "ledger.db", models=work / "models") as ledger:
        submit_user(ledger, graph, user, requester=f"user-{user}", reason="erase my history")
        for u, i in pairs:
            submit_pairs(ledger, graph, [(u, i)], requester=f"user-{u}",
                         reason="remove one interaction")
        applied = apply_requests(ledger, graph, base, UnlearnRec(UnlearnRecConfig(seed=0)))
        log(f"ledger demo: applied {len(applied.request_ids)} requests in "
            f"{applied.seconds:.2f} s (+ {applied.pretrain_seconds:.1f} s pre-training)")
        cert = certify_requests(ledger, graph, base, RetrainRec(cfg), seeds=(0, 1, 2),
                                out=work / "certificate.json", cache_dir=work / "rec_refs")
        log("ledger demo: " + cert.summary().replace("\n", " | "))
        # the request part by part: the whole user and the single interactions (the same
        # references, from the cache)
        forgotten = torch.as_tensor(sorted(ledger.forgotten_ids()))
        groups = {"all": forgotten, "user": graph.user_interaction_ids(user),
                  "pairs": graph.ids_of_pairs(*torch.tensor(pairs).T)}
        remaining = graph.without(forgotten)
        refs = retrain_rec_references(RetrainRec(cfg), base, graph, forgotten, (0, 1, 2),
                                      cache_dir=work / "rec_refs")
        # the configuration before the validation, on the same request and references
        previous = UnlearnRec(UnlearnRecConfig(seed=0, **PREVIOUS)).unlearn(base, graph,
                                                                           forgotten)
        prev_cert = certify_recommendation(previous.model, graph, forgotten,
                                           references=[r.model for r in refs])
        log("ledger demo, previous default: " + prev_cert.summary().replace("\n", " | "))
        parts = {"original": measure_groups(base, remaining, groups),
                 "unlearnrec": measure_groups(applied.result.model, remaining, groups),
                 "previous default": measure_groups(previous.model, remaining, groups),
                 "references": [measure_groups(r.model, remaining, groups) for r in refs]}
        return {"user": user, "n_pairs": len(pairs), "n_requests": len(applied.request_ids),
                "parts": parts, "config": asdict(UnlearnRecConfig(seed=0)),
                "previous_certificate": prev_cert.to_dict(),
                "n_forget": applied.n_forget, "seconds": applied.seconds,
                "pretrain_seconds": applied.pretrain_seconds, "summary": cert.summary(),
                "certificate": cert.to_dict(),
                "states": sorted({r.state for r in ledger.list()}),
                "verify_ok": bool(ledger.verify().ok)}


def ledger_section(demo: dict[str, Any]) -> list[str]:
    cert = demo["certificate"]
    lines = [
        "## A request through the ledger, with its certificate",
        "",
        f"Generated by `{demo['command']}` on {demo['date']} (commit "
        f"{demo.get('commit', '?')}; {demo.get('machine', 'machine not recorded')}). "
        "The seed-0 model; "
        f"{demo['n_requests']} requests (user {demo['user']} as a whole and "
        f"{demo['n_pairs']} single interactions of other users, each named as a (user, item) "
        f"pair) submitted to a fresh ledger, applied in one batch by UnlearnRec "
        f"({demo['n_forget']} interactions, {demo['seconds']:.3f} s, plus "
        f"{demo['pretrain_seconds']:.1f} s of pre-training on the first request), then "
        "certified by `certify_requests` against 3 LightGCNs retrained without them "
        f"(seeds 0, 1, 2). Requests end in state(s) {', '.join(demo['states'])}; the ledger's "
        f"hash chain verifies: {demo['verify_ok']}.",
        "",
        "| check | value | band | references (mean ± std) | passed |",
        "| --- | --- | --- | --- | --- |"]
    for c in cert["checks"]:
        lo = "−∞" if c["low"] is None else f"{c['low']:.4g}"
        hi = "∞" if c["high"] is None else f"{c['high']:.4g}"
        lines.append(f"| {c['name']} | {c['value']:.4g} | [{lo}, {hi}] | "
                     f"{c['ref_mean']:.4g} ± {c['ref_std']:.2g} | "
                     f"{'yes' if c['passed'] else 'no'} |")
    cost = cert["cost"]
    sp = cost.get("speedup")
    lines += ["", f"Certificate: {'PASS' if cert['passed'] else 'FAIL'}. Removal "
              f"{cost['removal_seconds']:.3f} s vs retraining "
              f"{cost['retrain_seconds_mean']:.1f} s on average"
              + (f" ({sp:.0f}× faster)" if sp else "") + "; deleted-pair mean score "
              f"{cert['metrics']['deleted_mean']:.3f} vs never-seen "
              f"{cert['metrics']['never_seen_mean']:.3f}.", ""]
    mia = next(c for c in cert["checks"] if c["name"] == "membership_auc")
    se = cert["config"].get("membership_auc_se")
    if se is not None:
        lines += [f"The membership band is mean ± max(3 × the references' std, 0.05, "
                  f"{cert['config']['auc_z']:g} × the standard error of the paired AUC "
                  f"difference); over these {cert['config']['n_forget']} deleted pairs that "
                  f"standard error (DeLong, paired) is {se:.3f}.", ""]
    if not mia["passed"] and mia["low"] is not None and mia["value"] < mia["low"]:
        lines += ["The membership check fails on the low side: the deleted pairs look *less* "
                  "like members than under retraining (over-forgetting). The requests stay "
                  "`applied` (`certify_requests` moves them to `certified` only when the "
                  "certificate passes, unless `certify_failed=True`).", ""]
    parts = demo.get("parts")
    if parts:
        n_cert = demo.get("certificate", {}).get("config", {}).get("n_random")
        lines += ["The request part by part (mean score of the deleted pairs / their "
                  "membership AUC against 5,000 never-seen pairs, the test tables' sample; "
                  "the certificate above draws its own"
                  + (f" {n_cert:,}" if isinstance(n_cert, int) else "")
                  + ", so its 'all' AUCs differ from this table's in the third decimal):", "",
                  "| model | whole user | single interactions | all |",
                  "| --- | --- | --- | --- |"]
        refs = parts["references"]
        rows = [("retrained (3 seeds, mean)", {k: float(np.mean([r[k] for r in refs]))
                                               for k in refs[0]}),
                ("original", parts["original"]), ("UnlearnRec (default)", parts["unlearnrec"])]
        if "previous default" in parts:
            rows.append((f"UnlearnRec (previous default: {describe(PREVIOUS)})",
                         parts["previous default"]))
        for label, r in rows:
            lines.append(f"| {label} | {r['user_deleted_mean']:.2f} / {r['user_auc']:.3f} | "
                         f"{r['pairs_deleted_mean']:.2f} / {r['pairs_auc']:.3f} | "
                         f"{r['deleted_mean']:.2f} / {r['auc_vs_never_seen']:.3f} |")
        lines.append("")
    prev = demo.get("previous_certificate")
    if prev:
        pm = next(c for c in prev["checks"] if c["name"] == "membership_auc")
        se = prev["config"]["membership_auc_se"]
        terms = {"3 × the references' std": 3 * pm["ref_std"], "the 0.05 floor": 0.05,
                 f"{prev['config']['auc_z']:g} × the standard error": prev["config"]["auc_z"] * se}
        how = "half-width set by " + max(terms, key=lambda t: terms[t])
        bad = ", ".join(c["name"] for c in prev["checks"] if not c["passed"])
        lines += [f"The configuration before the validation ({describe(PREVIOUS)}), applied "
                  "to the same "
                  f"request and certified against the same references: "
                  f"{'PASS' if prev['passed'] else f'FAIL ({bad})'}; membership AUC "
                  f"{pm['value']:.3f}, band [{pm['low']:.3f}, {pm['high']:.3f}] ({how}; "
                  f"paired standard error {se:.3f}, the deviation from the references' mean "
                  f"is {abs(pm['value'] - pm['ref_mean']) / se:.1f}"
                  " standard errors).", ""]
    return lines


def reading_notes(rows: list[dict[str, Any]]) -> list[str]:
    """What the tables say, every figure computed from ``rows`` (means over seeds)."""
    def mean(scenario: str, method: str, key: str) -> float:
        return float(np.mean([r[key] for r in _by(rows, scenario=scenario, method=method)]))

    def gap(scenario: str, method: str) -> float:
        return 100 * float(np.mean([_rel(rows, r, "recall@20")
                                    for r in _by(rows, scenario=scenario, method=method)]))

    def speed(scenario: str, method: str) -> float:
        return float(np.mean([_speedup(rows, r)
                              for r in _by(rows, scenario=scenario, method=method)]))

    inter, users = SCENARIOS
    have = {r["method"] for r in rows}
    lines = ["## Reading the results", ""]
    lines.append(
        "* Speed. Every model, retraining included, propagates with the same kernel "
        "(`symmetric_matmul`: the backward of a product with the symmetric normalised "
        "adjacency is one more product with it), so the speed-ups compare like with like; "
        f"retraining takes {mean(inter, 'retrain', 'seconds'):.1f} s. UnlearnRec's default, "
        "chosen on validation, is the pre-trained encoder's one pass with no fine-tuning: "
        f"{mean(inter, 'unlearnrec', 'seconds') * 1000:.0f} ms per request, "
        f"{speed(inter, 'unlearnrec'):.0f}× faster than retraining.")
    steps = sorted((int(m.split("=")[1].rstrip("]")), m) for m in have
                   if m.startswith("unlearnrec[finetune_steps="))
    if steps:
        lines.append(
            "  With fine-tuning steps (variants below) the deleted-pair mean on random "
            "interactions is "
            f"{mean(inter, 'unlearnrec', 'deleted_mean'):.2f} (no steps), "
            + ", ".join(f"{mean(inter, m, 'deleted_mean'):.2f} ({k} step{'s' * (k > 1)}, "
                        f"{speed(inter, m):.0f}×)" for k, m in steps)
            + f" against retraining's {mean(inter, 'retrain', 'deleted_mean'):.2f}; on whole "
            "users the membership AUC goes from "
            f"{mean(users, 'unlearnrec', 'auc_vs_never_seen'):.3f} to "
            + ", ".join(f"{mean(users, m, 'auc_vs_never_seen'):.3f} ({k})" for k, m in steps)
            + f" against retraining's {mean(users, 'retrain', 'auc_vs_never_seen'):.3f}.")
    lines.append(
        "* Random interactions: no method meets \"deleted pairs no higher than random "
        "non-interacted pairs\", and retraining does not either: it scores the deleted pairs "
        f"{mean(inter, 'retrain', 'deleted_mean'):.2f} against "
        f"{mean(inter, 'retrain', 'never_seen_mean'):.2f} for never-seen pairs, and only "
        f"{100 * mean(inter, 'retrain', 'below_user_never_seen'):.0f} % of them fall below "
        "their own user's never-seen level, because a user's deleted items are still items "
        "liked by users like them. The target asks for more than \"as if never trained on "
        "them\"; the section after the variants sizes what forcing it costs. UnlearnRec "
        f"stays within 3 % of retraining ({gap(inter, 'unlearnrec'):+.1f} % Recall@20) with "
        "a membership AUC of "
        f"{mean(inter, 'unlearnrec', 'auc_vs_never_seen'):.3f} against retraining's "
        f"{mean(inter, 'retrain', 'auc_vs_never_seen'):.3f} (the original model: "
        f"{mean(inter, 'original', 'auc_vs_never_seen'):.3f}).")
    shortfall = (mean(users, "retrain", "auc_vs_never_seen")
                 - mean(users, "unlearnrec", "auc_vs_never_seen"))
    lines.append(
        "* Whole users: retraining scores the deleted pairs at "
        f"{mean(users, 'retrain', 'deleted_mean'):.2f} (the user's embedding stays at its "
        "random initialisation), below never-seen pairs; so do the influence step, sharded "
        "retraining and UnlearnRec. Fine-tuning does not forget (the user's embedding gets no "
        "gradient once it has no interactions). UnlearnRec's membership AUC is "
        f"{mean(users, 'unlearnrec', 'auc_vs_never_seen'):.3f} against retraining's "
        f"{mean(users, 'retrain', 'auc_vs_never_seen'):.3f}: below it is over-forgetting "
        "(the deleted pairs look less like members than under retraining, itself a signal). "
        f"Retraining's AUC minus UnlearnRec's is {shortfall:+.3f}: "
        + ("within" if shortfall <= AUC_FLOOR else "past")
        + f" the one-sided {AUC_FLOOR} bound on over-forgetting that the selection rule put "
        "on the validation means, and "
        + ("within" if abs(shortfall) <= AUC_FLOOR else "outside")
        + " the certificate's two-sided 0.05 floor."
        + ("" if "unlearnrec[no reset]" not in have else
           " The deleted users' rows are re-drawn from LightGCN's initialisation, which is "
           "where retraining leaves them; without that (variant `no reset`) the encoder "
           "drives them to "
           f"{mean(users, 'unlearnrec[no reset]', 'deleted_mean'):.2f} and the membership AUC "
           f"to {mean(users, 'unlearnrec[no reset]', 'auc_vs_never_seen'):.3f}."))
    lines += [
        "* Sharded retraining pays for its exactness with the ensemble's quality "
        f"({gap(inter, 'sharded-retrain'):+.1f} % Recall@20: each shard model sees a quarter "
        "of the users) and, with 5 % of the interactions or users deleted at random, every "
        "shard almost surely holds some of them, so every shard is retrained.",
        "* The never-seen mean moves with the method too: UnlearnRec's unlearning lowers "
        f"scores beyond the deleted pairs ({mean(inter, 'unlearnrec', 'never_seen_mean'):.2f} "
        f"vs {mean(inter, 'retrain', 'never_seen_mean'):.2f} on random interactions), part "
        "of its recall cost.",
        "* Times: the methods of one seed and request ran back to back; times of a few "
        "milliseconds are noisy in absolute terms (see the ± columns).",
        ""]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--resume", action="store_true", help="keep the rows already in the JSON")
    p.add_argument("--report", action="store_true", help="rebuild the markdown only")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--md", type=Path, default=MD)
    p.add_argument("--tune", action="store_true",
                   help="only choose the backbone's and UnlearnRec's settings on a validation "
                        "split of the training interactions (seeds: --seeds)")
    p.add_argument("--ledger-demo", action="store_true",
                   help="only the request-through-the-ledger demo with its certificate")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.report:
        write_report(json.loads(args.out.read_text()), args.md)
        return 0
    graph = load_movielens_100k(ML100K, download=False, min_rating=4)
    cfg = BPRConfig()
    if args.tune:
        run_tuning(graph, args.seeds, TUNE_OUT, _log)
        if args.out.is_file():
            write_report(json.loads(args.out.read_text()), args.md)
        return 0
    command = "python experiments/recommend_unlearning.py " + " ".join(argv or sys.argv[1:])
    if args.ledger_demo:
        demo = ledger_demo(graph, cfg, args.out.parent, _log)
        demo.update(command=command.strip(), commit=_commit(), machine=machine(),
                    date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
        (args.out.parent / "recommend_ledger.json").write_text(json.dumps(demo, indent=1))
        if args.out.is_file():
            write_report(json.loads(args.out.read_text()), args.md)
        return 0
    data: dict[str, Any] = {
        "command": command.strip(), "machine": machine(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": _commit(), "n_train": graph.n_train,
        "n_interactions": len(graph.interactions), "n_users": graph.n_users,
        "n_items": graph.n_items, "bpr": cfg.to_dict(),
        "unlearnrec": asdict(UnlearnRecConfig()), "rows": []}
    if args.resume and args.out.is_file():
        data["rows"] = json.loads(args.out.read_text())["rows"]

    def save(rows: list[dict[str, Any]]) -> None:
        data["rows"] = rows
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, args.out)

    log = _log
    start = time.perf_counter()
    for seed in args.seeds:
        run_seed(graph, seed, cfg, data["rows"], save, log)
        save(data["rows"])
        write_report(data, args.md)
    data["total_seconds"] = time.perf_counter() - start
    save(data["rows"])
    write_report(data, args.md)
    log(f"done in {data['total_seconds'] / 60:.1f} min; wrote {args.out} and {args.md}")
    return 0


def _log(msg: str) -> None:
    print(f"[{datetime.now(timezone.utc).strftime('%H:%M:%S')}] {msg}", flush=True)


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


if __name__ == "__main__":
    raise SystemExit(main())
