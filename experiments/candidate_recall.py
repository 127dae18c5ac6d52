"""Candidate filtering on MNIST: recall of the true top-10 most influential training examples
against the speed-up of scoring only the candidates.

Setup: 5,000 train / 100 query digits from the t10k file (``unlearn.data.mnist_split``), a
784→10 logistic regression (L-BFGS, l2 = 1e-3) and a 784-128-10 MLP (SGD), EK-FAC with
damping 1e-3. Truth: the 10 largest full EK-FAC scores per query (most helpful) and the 10
largest by magnitude. Candidates: cosine nearest neighbours in raw pixel space and (MLP) in the
penultimate activations, for k = 5%, 10%, 25% of the training set. Speed-up (all 100 queries):
full scoring time / (candidate selection + ``scores_on_candidates``); "1 query": the same for
one query at a time (mean over 3 queries), the regime of a few queries on a large corpus.

    .venv/bin/python experiments/candidate_recall.py [--mnist ../shared/data/mnist-t10k]

Prints a Markdown table and writes ``experiments/out/candidate_recall.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from unlearn.data import mnist_split  # noqa: E402
from unlearn.influence import EKFACInfluence  # noqa: E402
from unlearn.influence.candidates import (  # noqa: E402
    knn_candidates,
    layer_inputs,
    scores_on_candidates,
)
from unlearn.tasks import ClassificationTask  # noqa: E402
from unlearn.training import train_lbfgs, train_sgd  # noqa: E402

FRACTIONS = (0.05, 0.10, 0.25)
DAMPING = 1e-3
BATCH = 256


def train_models(train) -> dict[str, nn.Module]:
    task = ClassificationTask()
    torch.manual_seed(0)
    lr = nn.Linear(784, 10)
    train_lbfgs(lr, task, DataLoader(train, batch_size=len(train)), DAMPING)
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))
    train_sgd(mlp, task, DataLoader(train, batch_size=64, shuffle=True), epochs=20, lr=0.05,
              weight_decay=1e-3, seed=0)
    return {"LR 784-10": lr, "MLP 784-128-10": mlp}


def timed(fn, *args, **kw):
    t = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - t


def recall(truth: torch.Tensor, cand: torch.Tensor) -> float:
    hits = sum(len(set(t.tolist()) & set(c.tolist())) for t, c in zip(truth, cand))
    return hits / truth.numel()


def feature_spaces(model: nn.Module, train, query) -> dict[str, tuple]:
    """name -> (query features, train features, seconds to extract them)."""
    xq, xt = query.tensors()[0], train.tensors()[0]
    spaces = {"pixels": (xq, xt, 0.0)}
    if isinstance(model, nn.Sequential):
        last = str(len(model) - 1)
        (ft, fq), sec = timed(lambda: (layer_inputs(model, DataLoader(train, BATCH), last),
                                       layer_inputs(model, DataLoader(query, BATCH), last)))
        spaces["penultimate"] = (fq, ft, sec)
    return spaces


def run_model(name: str, model: nn.Module, train, query) -> list[dict]:
    task = ClassificationTask()
    train_loader, qloader = DataLoader(train, BATCH), DataLoader(query, BATCH)
    est, fit_s = timed(lambda: EKFACInfluence(model, task, DAMPING, progress=False)
                       .fit(train_loader))
    full, full_s = timed(lambda: est.scores(qloader, train_loader))
    truth = {"top": full.topk(10, dim=1).indices, "abs": full.abs().topk(10, dim=1).indices}
    one = [Subset(query, [q]) for q in range(3)]
    full1_s = sum(timed(lambda d=d: est.scores(DataLoader(d, 1), train_loader))[1]
                  for d in one) / len(one)
    print(f"{name}: fit {fit_s:.1f}s, full scores 100x{len(train)} {full_s:.1f}s, "
          f"1 query {full1_s:.2f}s", flush=True)
    rows = []
    for space, (fq, ft, feat_s) in feature_spaces(model, train, query).items():
        for frac in FRACTIONS:
            k = int(frac * len(train))
            cand, sel_s = timed(knn_candidates, fq, ft, k)
            (values, index), cand_s = timed(scores_on_candidates, est, qloader, train, cand,
                                            batch_size=BATCH)
            assert torch.allclose(values, full.gather(1, index), rtol=1e-4, atol=1e-9)
            cand1_s = one_query_seconds(est, query, train, fq, ft, k)
            rows.append({
                "model": name, "features": space, "k": k, "fraction": frac,
                "recall_top10": recall(truth["top"], cand),
                "recall_top10_abs": recall(truth["abs"], cand),
                "union": int(torch.unique(cand).numel()),
                "full_s": full_s, "select_s": sel_s + feat_s, "candidates_s": cand_s,
                "speedup": full_s / (sel_s + feat_s + cand_s),
                "speedup_1query": full1_s / (cand1_s + feat_s / len(query)),
                "fit_s": fit_s,
            })
            r = rows[-1]
            print(f"  {space:12s} k={k:5d} recall {r['recall_top10']:.3f} "
                  f"(|s| {r['recall_top10_abs']:.3f}) union {r['union']} "
                  f"speed-up {r['speedup']:.2f}x, 1 query {r['speedup_1query']:.1f}x", flush=True)
    return rows


def one_query_seconds(est, query, train, fq, ft, k: int, repeats: int = 3) -> float:
    """Mean seconds to select and score the candidates of one query alone."""
    total = 0.0
    for q in range(repeats):
        t = time.perf_counter()
        cand = knn_candidates(fq[q : q + 1], ft, k)
        scores_on_candidates(est, DataLoader(Subset(query, [q]), 1), train, cand,
                             batch_size=BATCH)
        total += time.perf_counter() - t
    return total / repeats


def table(rows: list[dict]) -> str:
    lines = ["| model | features | k (share) | recall@10 (top) | recall@10 (\\|score\\|) | "
             "random | union of candidates | speed-up, 100 queries | speed-up, 1 query |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['features']} | {r['k']} ({r['fraction']:.0%}) | "
            f"{r['recall_top10']:.3f} | {r['recall_top10_abs']:.3f} | {r['fraction']:.2f} | "
            f"{r['union']} | {r['speedup']:.2f}× | {r['speedup_1query']:.1f}× |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mnist", default=str(ROOT.parent / "shared" / "data" / "mnist-t10k"))
    ap.add_argument("--out", default=str(ROOT / "experiments" / "out" / "candidate_recall.json"))
    args = ap.parse_args()
    train, query, _ = mnist_split(args.mnist, n_train=5000, n_query=100)
    rows = []
    for name, model in train_models(train).items():
        rows += run_model(name, model, train, query)
    print()
    print(table(rows))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python experiments/candidate_recall.py", "torch": torch.__version__,
            "threads": torch.get_num_threads(), "machine": platform.platform()}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
