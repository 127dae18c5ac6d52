"""Measure the LightGCN backbone and the recommendation baselines on MovieLens-100K.

    python -m unlearn.recommend.backbone --root ../shared/data/ml-100k \\
        --out experiments/out/recommend_backbone.json

Trains LightGCN with the default :class:`~unlearn.recommend.model.BPRConfig`, reports
Recall@20 / NDCG@20 and the training time, then (unless ``--no-baselines``) runs the baselines
of :mod:`baselines.recommend` on two requests — whole users, and random interactions — and
reports each one's time, ranking quality and forgetting metrics next to retraining's
(``--sweep``: the influence step under several curvatures and dampings as well).
``--validation F`` measures everything on a validation split instead (``F`` of each user's
training interactions held out, :meth:`InteractionGraph.validation_split`): the mode for
choosing settings, which must never be chosen on the test split.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from unlearn.recommend.data import load_movielens_100k
from unlearn.recommend.metrics import forgetting_report, ranking_metrics
from unlearn.recommend.model import BPRConfig, train_lightgcn
from unlearn.recommend.protocol import forget_request


def _rounded(d: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in d.items()}


def run(root: str | None, seed: int, n_users: int, fraction: float, baselines: bool,
        shards: int, sweep: bool = False, validation: float | None = None) -> dict[str, Any]:
    from baselines.recommend import (
        FineTuneRec,
        InfluenceRec,
        RetrainRec,
        ShardedRetrainRec,
        train_sharded,
    )

    graph = load_movielens_100k(root, download=root is None, seed=seed)
    split = "80/20 per user"
    if validation is not None:  # held-out = validation interactions; the test split unused
        graph = graph.validation_split(validation, seed=seed)
        split += f", then {validation:.0%} of each user's training held out for validation"
    config = BPRConfig(seed=seed)
    start = time.perf_counter()
    model = train_lightgcn(graph, config)
    train_s = time.perf_counter() - start
    out: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, "
                   f"{torch.get_num_threads()} torch thread(s)",
        "data": {"users": graph.n_users, "items": graph.n_items, "train": graph.n_train,
                 "test": len(graph.test_ids), "implicit": "rating >= 4", "split": split,
                 "evaluated_on": "validation" if validation is not None else "test"},
        "config": config.to_dict(),
        "train_seconds": round(train_s, 2),
        "final_bpr_loss": round(model.bpr_history[-1], 4),
        "test": _rounded(ranking_metrics(model, graph, 20)),  # validation with --validation
    }
    print(json.dumps(out, indent=1), flush=True)
    if not baselines:
        return out
    gen = torch.Generator().manual_seed(seed)
    users = torch.randperm(graph.n_users, generator=gen)[:n_users].tolist()
    n_random = max(1, int(fraction * graph.n_train))
    requests = {
        f"{n_users} users": forget_request(graph, users=users),
        f"{fraction:.0%} random interactions":
            graph.train_ids[torch.randperm(graph.n_train, generator=gen)[:n_random]],
    }
    sharded_model = train_sharded(graph, shards, "user", config, seed)
    out["sharded_original"] = _rounded(ranking_metrics(sharded_model, graph, 20))
    out["requests"] = {}
    for name, forget in requests.items():
        remaining = graph.without(forget)
        rows = {"original": _rounded(forgetting_report(model, remaining, forget))}
        methods = {"retrain": RetrainRec(config),
                   "finetune": FineTuneRec(epochs=5, lr=1e-3, seed=seed),
                   "influence": InfluenceRec(damping=0.1)}
        if sweep:  # the influence step's sensitivity to curvature and damping
            for curvature in ("ggn", "hessian"):
                for damping in (0.01, 0.1, 1.0):
                    methods[f"influence {curvature} λ={damping}"] = InfluenceRec(
                        damping=damping, curvature=curvature)
        for label, method in methods.items():
            result = method.unlearn(model, graph, forget)
            rows[label] = {"seconds": round(result.seconds, 2),
                           **_rounded(forgetting_report(result.model, remaining, forget))}
            if isinstance(method, InfluenceRec):
                cg = result.details["cg"]
                rows[label]["cg_iterations"] = cg["iterations"]
                rows[label]["negative_curvature"] = cg["negative_curvature"]
            print(name, label, rows[label], flush=True)
        result = ShardedRetrainRec().unlearn(sharded_model, graph, forget)
        rows["sharded-retrain"] = {
            "seconds": round(result.seconds, 2),
            "retrained_shards": len(result.details["retrained_shards"]),
            **_rounded(forgetting_report(result.model, remaining, forget))}
        out["requests"][name] = {"n_forget": len(forget), "rows": rows}
    return out


def markdown_tables(out: dict[str, Any]) -> str:
    """The measured tables of a :func:`run` result, as markdown."""
    d, c = out["data"], out["config"]
    lines = [
        "# Recommendation backbone and baselines on MovieLens-100K", "",
        f"Command: `{out.get('command', '')}` (from the repository root). "
        f"Machine: {out['machine']}. Date: {out['date'][:10]}. Seed {c['seed']} (split, "
        "initialisation, negatives, request sampling).", "",
        f"Data: ML-100K, {d['implicit']} as implicit feedback, {d['users']} users, "
        f"{d['items']} items, {d['train']} training / {d['test']} "
        f"{d.get('evaluated_on', 'test')} interactions "
        f"({d['split']}). Backbone: torch-geometric LightGCN, dim {c['dim']}, "
        f"{c['num_layers']} layers, BPR (one uniform negative per interaction per epoch, reg "
        f"{c['reg']} on the triple's ego embeddings), Adam lr {c['lr']}, batch "
        f"{c['batch_size']}, {c['epochs']} epochs.", "",
        f"Training took {out['train_seconds']} s: **Recall@20 {out['test']['recall@20']}, "
        f"NDCG@20 {out['test']['ndcg@20']}** (full ranking, training items excluded; on the "
        f"{d.get('evaluated_on', 'test')} interactions).",
    ]
    if "sharded_original" in out:
        so = out["sharded_original"]
        lines += ["", f"User-sharded ensemble (same config per shard): Recall@20 "
                  f"{so['recall@20']}, NDCG@20 {so['ndcg@20']}."]
    for name, r in out.get("requests", {}).items():
        lines += ["", f"## Request: {name} ({r['n_forget']} interactions)", "",
                  "| method | seconds | Recall@20 | NDCG@20 | deleted | never seen | retained "
                  "| AUC del>never | AUC ret>del | CG its |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for label, row in r["rows"].items():
            if "retrained_shards" in row:
                label += f" ({row['retrained_shards']} shards retrained)"
            its = row.get("cg_iterations", "")
            if row.get("negative_curvature"):
                its = f"{its} (neg. curvature)"
            lines.append(
                f"| {label} | {row.get('seconds', '—')} | {row['recall@20']:.4f} | "
                f"{row['ndcg@20']:.4f} | {row['deleted_mean']:.3f} | "
                f"{row['never_seen_mean']:.3f} | {row['retained_mean']:.3f} | "
                f"{row['auc_vs_never_seen']:.3f} | {row['auc_vs_retained']:.3f} | {its} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", default=None, help="folder with ml-100k.inter or u.data "
                   "(default: download into the cache)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--users", type=int, default=5, help="users in the whole-user request")
    p.add_argument("--fraction", type=float, default=0.01,
                   help="share of training interactions in the random request")
    p.add_argument("--shards", type=int, default=5)
    p.add_argument("--no-baselines", action="store_true")
    p.add_argument("--sweep", action="store_true",
                   help="also run the influence step for curvature ggn/hessian x damping "
                        "0.01/0.1/1")
    p.add_argument("--validation", type=float, default=None, metavar="F",
                   help="hold out F of each user's training interactions and measure on them "
                        "(choosing settings), not on the test split")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="JSON file to write")
    p.add_argument("--markdown", default=None, help="markdown tables to write")
    argv = sys.argv[1:] if argv is None else argv
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    out = run(a.root, a.seed, a.users, a.fraction, not a.no_baselines, a.shards, a.sweep,
              a.validation)
    out["command"] = "python -m unlearn.recommend.backbone " + " ".join(argv)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(out, indent=1))
    if a.markdown:
        Path(a.markdown).write_text(markdown_tables(out))


if __name__ == "__main__":
    main()
