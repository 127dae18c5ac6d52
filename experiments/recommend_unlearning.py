"""Recommendation unlearning on MovieLens-100K: every removal method against retraining.

    .venv/bin/python experiments/recommend_unlearning.py              # 3 seeds, both scenarios
    .venv/bin/python experiments/recommend_unlearning.py --report     # rebuild the markdown

Data: MovieLens-100K as implicit feedback (a rating >= 4 is an interaction; every user's
interactions split 80/20 into train/test, seed 0), LightGCN (64-d, 3 layers, BPR, 80 epochs,
the backbone's default :class:`BPRConfig`). Per seed: train the model (and a 4-shard
user-partitioned ensemble for sharded retraining), pre-train UnlearnRec's encoder once, then
for each scenario (5 % of the training interactions at random; all interactions of 5 % of the
users) run every method on the same request: retraining (the reference, its own seed),
fine-tuning, the influence update with spill-over, sharded retraining, UnlearnRec. Every model
is measured on the remaining graph with :func:`unlearn.recommend.forgetting_report`.

Writes ``experiments/out/recommend.json`` (every row, appended after each run so an
interrupted run resumes with ``--resume``) and ``docs/results/recommend.md``.
"""

from __future__ import annotations

import argparse
import copy
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
MD = ROOT / "docs" / "results" / "recommend.md"
SCENARIOS = ("interactions-5%", "users-5%")
METHODS = ("retrain", "finetune", "influence", "sharded-retrain", "unlearnrec")
#: UnlearnRec's unlearning weight at request time (same pre-trained encoder), the trade-off
SWEEP = (0.3, 3.0)


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
        for lam in SWEEP:
            variant = copy.copy(unlearnrec)  # the same pre-trained encoder, another weight
            variant.config = replace(unlearnrec.config, lambda_unlearn=lam)
            methods.append((f"unlearnrec[lambda_u={lam:g}]", variant, base,
                            {"pretrain_seconds": report.seconds, "sweep": lam}))
        for name, method, model, extra in methods:
            if (seed, scenario, name) in done:
                continue
            res = method.unlearn(model, graph, forget)
            row = {**common, "method": name, "seconds": float(res.seconds), **extra,
                   **measure(res.model, remaining, forget)}
            rows.append(row)
            save(rows)
            log(f"seed {seed} {scenario:16s} {name:26s} {res.seconds:7.2f} s  "
                f"recall {row['recall@20']:.4f}  deleted {row['deleted_mean']:.3f}  "
                f"never-seen {row['never_seen_mean']:.3f}  auc {row['auc_vs_never_seen']:.3f}")


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
           "mean score | never-seen mean score | deleted ≤ never-seen | MIA AUC (deleted vs "
           "never-seen) | seconds | speed-up |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
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
            f"{_ms([r['auc_vs_never_seen'] for r in rs], '{:.3f}')} | "
            f"{_ms([r['seconds'] for r in rs], '{:.2f}')} | "
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
    sweep = [f"unlearnrec[lambda_u={lam:g}]" for lam in SWEEP]
    sweep.insert(1, "unlearnrec")
    n_forget = {sc: sorted({r["n_forget"] for r in rows if r["scenario"] == sc})
                for sc in SCENARIOS}
    pre = [r["pretrain_seconds"] for r in rows if r["method"] == "unlearnrec"
           and r["scenario"] == SCENARIOS[0]]
    base = sorted({(r["seed"], r["base_seconds"]) for r in rows})
    lines = [
        "# Recommendation unlearning on MovieLens-100K",
        "",
        f"Generated by `{data['command']}` on {data['date']} ({data['machine']}). Other jobs "
        "were sharing the 2-core machine, so absolute times are noisy; the methods of one "
        "seed and scenario ran back to back under the same conditions. Commit "
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
        f"{data['unlearnrec']['unlearn_margin']}).",
        "",
        f"UnlearnRec's pre-training ({data['unlearnrec']['pretrain_steps']} steps on "
        "simulated requests, half random 5 % edge drops, half random whole users covering "
        "5 % of the edges) is a one-off cost per trained model, not counted in the per-request "
        f"seconds: {_ms(pre, '{:.1f}')} s per seed.",
        "",
    ]
    for scenario in SCENARIOS:
        lines += [f"## {scenario}", "", *table(rows, scenario, names), ""]
    lines += ["## Targets (UnlearnRec, default configuration)", ""]
    for scenario in SCENARIOS:
        lines += verdict(rows, scenario)
    lines += [
        "",
        "## The trade-off: UnlearnRec's unlearning weight at request time",
        "",
        "The same pre-trained encoder, fine-tuned on the request with λ_unlearn "
        f"{', '.join(f'{lam:g}' for lam in SWEEP)} beside the default "
        f"{data['unlearnrec']['lambda_unlearn']:g} (everything else unchanged).",
        "",
    ]
    for scenario in SCENARIOS:
        lines += [f"### {scenario}", "", *table(rows, scenario, ["retrain", *sweep]), ""]
    lines += [NOTES, ""]
    demo_file = OUT.parent / "recommend_ledger.json"
    if demo_file.is_file():
        lines += ledger_section(json.loads(demo_file.read_text()))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def ledger_demo(graph: Any, cfg: BPRConfig, out_dir: Path, log: Any) -> dict[str, Any]:
    """Requests through the ledger on ML-100K: one whole user and a few single interactions,
    applied with UnlearnRec in one batch, certified against 3 retrained references."""
    import shutil

    from unlearn.ledger import Ledger
    from unlearn.recommend.requests import (
        apply_requests,
        certify_requests,
        submit_pairs,
        submit_user,
    )

    work = out_dir / "recommend_ledger_demo"
    shutil.rmtree(work, ignore_errors=True)
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
                                out=work / "certificate.json", cache_dir=out_dir / "rec_refs")
        log("ledger demo: " + cert.summary().replace("\n", " | "))
        return {"user": user, "n_pairs": len(pairs), "n_requests": len(applied.request_ids),
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
        f"Generated by `{demo['command']}` on {demo['date']}. The seed-0 model; "
        f"{demo['n_requests']} requests (user {demo['user']} as a whole and "
        f"{demo['n_pairs']} single interactions of other users, each named as a (user, item) "
        f"pair) submitted to a fresh ledger, applied in one batch by UnlearnRec "
        f"({demo['n_forget']} interactions, {demo['seconds']:.2f} s, plus "
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
              f"{cost['removal_seconds']:.2f} s vs retraining "
              f"{cost['retrain_seconds_mean']:.1f} s on average"
              + (f" ({sp:.0f}× faster)" if sp else "") + "; deleted-pair mean score "
              f"{cert['metrics']['deleted_mean']:.3f} vs never-seen "
              f"{cert['metrics']['never_seen_mean']:.3f}.", ""]
    mia = next(c for c in cert["checks"] if c["name"] == "membership_auc")
    if not mia["passed"] and mia["low"] is not None and mia["value"] < mia["low"]:
        lines += ["The membership check fails on the low side: the deleted pairs look *less* "
                  "like members than under retraining (over-forgetting). The default "
                  "λ_unlearn pushes single interactions down to random pairs' level, while "
                  "retraining still predicts them from the rest of the graph; the certificate "
                  "catches exactly this. The requests stay `applied` (`certify_requests` "
                  "moves them to `certified` only when the certificate passes, unless "
                  "`certify_failed=True`).", ""]
    return lines


NOTES = """## Reading the results

* Retraining itself scores the deleted pairs far above never-seen pairs when the deletion is
  a random sample of interactions: a user's deleted items are still items liked by users
  like them, so the collaborative signal ranks them high without the edge. "Deleted pairs no
  higher than random non-interacted pairs" is therefore a stronger demand than "as if never
  trained on them"; on random interactions no method here meets it, and pushing UnlearnRec
  towards it costs ranking quality (the trade-off table: a larger λ_unlearn lowers the
  deleted pairs' scores and Recall@20 together). For whole users retraining does meet it
  (the user's embedding is never trained), and in this run so did the influence update,
  sharded retraining and UnlearnRec, not fine-tuning.
* Sharded retraining pays for its exactness with the ensemble's quality (each shard model
  sees a quarter of the users) and, with 5 % of the interactions or users deleted at random,
  every shard almost surely holds some of them, so every shard is retrained.
* The MIA AUC of the retrained model is the reference: below it a method over-forgets
  (deleted pairs look *less* like members than under retraining, itself a signal that they
  were deleted), above it the model still remembers. Fine-tuning stays at the original
  model's AUC: it does not forget.
* The never-seen mean moves with the method too: UnlearnRec's unlearning step lowers scores
  beyond the deleted pairs (with λ_unlearn 3 visibly so), which is part of its recall cost.
* Times: other jobs shared the 2-core machine during the run, so absolute seconds are
  noisy; each speed-up is computed from runs made back to back on the same request.
* UnlearnRec's defaults (λ_unlearn 1, λ_preserve 1, 10 fine-tuning steps, 150 pre-training
  steps) were chosen on development runs on this same data (the seed-0 model, other random
  requests, Recall@20 on the same test split), not on a separate validation split: treat
  the default row as tuned, and the trade-off table as the more honest picture.
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--resume", action="store_true", help="keep the rows already in the JSON")
    p.add_argument("--report", action="store_true", help="rebuild the markdown only")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--md", type=Path, default=MD)
    p.add_argument("--ledger-demo", action="store_true",
                   help="only the request-through-the-ledger demo with its certificate")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.report:
        write_report(json.loads(args.out.read_text()), args.md)
        return 0
    graph = load_movielens_100k(ML100K, download=False, min_rating=4)
    cfg = BPRConfig()
    command = "python experiments/recommend_unlearning.py " + " ".join(argv or sys.argv[1:])
    if args.ledger_demo:
        demo = ledger_demo(graph, cfg, args.out.parent, _log)
        demo.update(command=command.strip(),
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
