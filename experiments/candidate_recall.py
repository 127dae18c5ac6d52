"""Candidate filtering: recall of the true top-10 most influential training examples against
the speed-up of scoring only the candidates, on MNIST (nearest neighbours) and on MovieLens
token sequences (TF-IDF, ``--tokens``).

MNIST setup: 5,000 train / 100 query digits from the t10k file (``unlearn.data.mnist_split``),
a 784→10 logistic regression (L-BFGS, l2 = 1e-3) and a 784-128-10 MLP (SGD), EK-FAC with
damping 1e-3. Truth: the 10 largest full EK-FAC scores per query (most helpful) and the 10
largest by magnitude. Candidates: cosine nearest neighbours in raw pixel space and (MLP) in the
penultimate activations, for k = 5%, 10%, 25% of the training set. Speed-up (all 100 queries):
full scoring time / (candidate selection + ``scores_on_candidates``); "1 query": the same for
one query at a time (mean over 3 queries), the regime of a few queries on a large corpus.

MovieLens setup (``--tokens``): each MovieLens-100K user's rated items in time order form a
token sequence. 100 users are held out; from the others, 8 random cuts per user give training
examples (the last 20 items before the cut → the item at the cut). A next-item model (mean of
the history's item embeddings, then a Linear to item logits) is trained with Adam; its held-out
hit@10 over every cut of the held-out users is printed next to a popularity baseline. Queries:
one random cut per held-out user. Candidates: TF-IDF (a ``TfidfIndex`` of the training side,
built once) on history + next item (the example's whole sequence) and on the history alone,
and cosine nearest neighbours in the mean embedding (the Linear layer's input); "1 query" is
the mean over 10 queries.

    .venv/bin/python experiments/candidate_recall.py [--mnist ../shared/data/mnist-t10k]
    .venv/bin/python experiments/candidate_recall.py --tokens [--movielens ../shared/data/ml-100k]

Prints a Markdown table and writes ``experiments/out/candidate_recall.json``
(``candidate_recall_tokens.json`` with ``--tokens``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from unlearn.data import mnist_split  # noqa: E402
from unlearn.influence import EKFACInfluence  # noqa: E402
from unlearn.influence.candidates import (  # noqa: E402
    TfidfIndex,
    knn_candidates,
    layer_inputs,
    scores_on_candidates,
)
from unlearn.recommend.data import _find_ratings_file, read_movielens_ratings  # noqa: E402
from unlearn.tasks import ClassificationTask  # noqa: E402
from unlearn.training import train_lbfgs, train_sgd  # noqa: E402

FRACTIONS = (0.05, 0.10, 0.25)
Selector = Callable[[slice, int], torch.Tensor]  # (query rows, k) -> candidates [rows, k]
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


def knn_selector(fq: torch.Tensor, ft: torch.Tensor) -> Selector:
    return lambda rows, k: knn_candidates(fq[rows], ft, k)


def feature_spaces(model: nn.Module, train, query) -> dict[str, tuple[Selector, float]]:
    """name -> (candidate selector, seconds to extract its features)."""
    xq, xt = query.tensors()[0], train.tensors()[0]
    spaces = {"pixels": (knn_selector(xq, xt), 0.0)}
    if isinstance(model, nn.Sequential):
        last = str(len(model) - 1)
        (ft, fq), sec = timed(lambda: (layer_inputs(model, DataLoader(train, BATCH), last),
                                       layer_inputs(model, DataLoader(query, BATCH), last)))
        spaces["penultimate"] = (knn_selector(fq, ft), sec)
    return spaces


def run_model(name: str, model: nn.Module, train, query,
              spaces: dict[str, tuple[Selector, float]] | None = None,
              keep: dict | None = None, repeats: int = 3) -> list[dict]:
    """Recall and speed-up of each candidate selector (default: ``feature_spaces``); "1 query"
    times are means over the first ``repeats`` queries; the full score matrix goes to
    ``keep["full"]`` when ``keep`` is given."""
    task = ClassificationTask()
    train_loader, qloader = DataLoader(train, BATCH), DataLoader(query, BATCH)
    est, fit_s = timed(lambda: EKFACInfluence(model, task, DAMPING, progress=False)
                       .fit(train_loader))
    full, full_s = timed(lambda: est.scores(qloader, train_loader))
    truth = {"top": full.topk(10, dim=1).indices, "abs": full.abs().topk(10, dim=1).indices}
    if keep is not None:
        keep["full"] = full
    one = [Subset(query, [q]) for q in range(repeats)]
    full1_s = sum(timed(lambda d=d: est.scores(DataLoader(d, 1), train_loader))[1]
                  for d in one) / len(one)
    print(f"{name}: fit {fit_s:.1f}s, full scores 100x{len(train)} {full_s:.1f}s, "
          f"1 query {full1_s:.2f}s", flush=True)
    rows = []
    if spaces is None:
        spaces = feature_spaces(model, train, query)
    for space, (select, feat_s) in spaces.items():
        for frac in FRACTIONS:
            k = int(frac * len(train))
            cand, sel_s = timed(select, slice(None), k)
            (values, index), cand_s = timed(scores_on_candidates, est, qloader, train, cand,
                                            batch_size=BATCH)
            assert torch.allclose(values, full.gather(1, index), rtol=1e-4, atol=1e-9)
            cand1_s = one_query_seconds(est, query, train, select, k, repeats)
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


def one_query_seconds(est, query, train, select: Selector, k: int, repeats: int = 3) -> float:
    """Mean seconds to select and score the candidates of one query alone."""
    total = 0.0
    for q in range(repeats):
        t = time.perf_counter()
        cand = select(slice(q, q + 1), k)
        scores_on_candidates(est, DataLoader(Subset(query, [q]), 1), train, cand,
                             batch_size=BATCH)
        total += time.perf_counter() - t
    return total / repeats


# ------------------------------------------------------------ MovieLens token sequences

WINDOW, CUTS, MIN_HISTORY, N_QUERY_USERS, DIM = 20, 8, 5, 100, 32


class BagOfItems(nn.Module):
    """Next-item model: mean of the history's item embeddings (token 0 pads), then a Linear to
    item logits."""

    def __init__(self, n_items: int, dim: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(n_items + 1, dim, padding_idx=0)
        self.out = nn.Linear(dim, n_items)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = (x != 0).unsqueeze(-1).float()
        return self.out((self.emb(x) * mask).sum(1) / mask.sum(1).clamp_min(1))


def movielens_sequences(root: Path) -> tuple[list[np.ndarray], int]:
    """Each user's rated items (any rating) in time order, as tokens 1..n_items."""
    path = _find_ratings_file(root)
    if path is None:
        raise FileNotFoundError(f"no ml-100k.inter or u.data under {root}")
    r = read_movielens_ratings(path)
    r = r[np.lexsort((r[:, 1], r[:, 3], r[:, 0]))]  # by user, then time (ties: item id)
    _, tokens = np.unique(r[:, 1], return_inverse=True)
    _, starts = np.unique(r[:, 0], return_index=True)
    return np.split(tokens + 1, starts[1:]), int(tokens.max()) + 1


def next_item_examples(seqs: list[np.ndarray], rng: np.random.Generator,
                       cuts: int | None) -> TensorDataset:
    """(last ``WINDOW`` items before a cut, left-padded with 0; the item at the cut - 1), for
    ``cuts`` random cuts per sequence (all cuts with ``None``), at least ``MIN_HISTORY`` in."""
    xs, ys = [], []
    for s in seqs:
        pos = np.arange(MIN_HISTORY, len(s))
        if cuts is not None:
            pos = np.sort(rng.choice(pos, size=min(cuts, len(pos)), replace=False))
        for t in pos:
            h = s[max(0, t - WINDOW) : t]
            xs.append(np.pad(h, (WINDOW - len(h), 0)))
            ys.append(s[t] - 1)
    return TensorDataset(torch.from_numpy(np.stack(xs)), torch.from_numpy(np.asarray(ys)))


def train_next_item(train: TensorDataset, n_items: int, epochs: int = 10) -> BagOfItems:
    torch.manual_seed(0)
    model = BagOfItems(n_items, DIM)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
    loader = DataLoader(train, batch_size=128, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return model


def hit_rate(top: torch.Tensor, y: torch.Tensor) -> float:
    return float((top == y[:, None]).any(1).float().mean())


def token_lists(data: TensorDataset, with_target: bool) -> list[list[int]]:
    x, y = data.tensors
    return [[t for t in row if t != 0] + ([int(target) + 1] if with_target else [])
            for row, target in zip(x.tolist(), y)]


def run_tokens(root: Path) -> tuple[list[dict], dict]:
    seqs, n_items = movielens_sequences(root)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(seqs))
    held = [seqs[u] for u in order[:N_QUERY_USERS]]
    train = next_item_examples([seqs[u] for u in order[N_QUERY_USERS:]], rng, CUTS)
    heldout = next_item_examples(held, rng, None)
    query = next_item_examples(held, rng, 1)  # one random cut per held-out user
    model = train_next_item(train, n_items)
    with torch.no_grad():
        top = model(heldout.tensors[0]).topk(10, dim=1).indices
    popular = torch.bincount(train.tensors[1], minlength=n_items).topk(10).indices
    info = {"users": len(seqs), "items": n_items, "train_examples": len(train),
            "heldout_examples": len(heldout), "queries": len(query),
            "heldout_hit@10": hit_rate(top, heldout.tensors[1]),
            "heldout_hit@10_popularity": hit_rate(popular.expand(len(heldout), -1),
                                                  heldout.tensors[1]),
            "heldout_accuracy": hit_rate(top[:, :1], heldout.tensors[1])}
    print(f"MovieLens next-item: {len(train)} train examples, {len(query)} queries; held-out "
          f"hit@10 {info['heldout_hit@10']:.3f} (popularity "
          f"{info['heldout_hit@10_popularity']:.3f}), accuracy {info['heldout_accuracy']:.3f}",
          flush=True)
    spaces: dict[str, tuple[Selector, float]] = {}
    for label, with_target in (("TF-IDF history+next", True), ("TF-IDF history", False)):
        tq, tt = token_lists(query, with_target), token_lists(train, with_target)
        # the training side is indexed once, as the kNN features are computed once; its time
        # counts like theirs (all of it for 100 queries, 1/100 of it for one)
        index, sec = timed(lambda tt=tt: TfidfIndex(tt))
        spaces[label] = (lambda rows, k, tq=tq, index=index: index.candidates(tq[rows], k), sec)
    (ft, fq), sec = timed(lambda: (layer_inputs(model, DataLoader(train, BATCH), "out"),
                                   layer_inputs(model, DataLoader(query, BATCH), "out")))
    spaces["kNN mean embedding"] = (knn_selector(fq, ft), sec)
    name = f"bag-of-items {n_items}-{DIM}-{n_items}"
    keep: dict = {}
    rows = run_model(name, model, train, query, spaces, keep, repeats=10)
    # how much of the truth shares the query's next item (what the target token lets TF-IDF see)
    yq, yt = query.tensors[1], train.tensors[1]
    same = yt[keep["full"].topk(10, dim=1).indices] == yq[:, None]
    info["top10_same_next_item"] = float(same.float().mean())
    info["train_same_next_item_median"] = float((yt[None] == yq[:, None]).sum(1).median())
    info["top10_positive"] = float((keep["full"].topk(10, dim=1).values > 0).float().mean())
    print(f"true top-10 sharing the query's next item: {info['top10_same_next_item']:.3f}; "
          f"median train examples with that next item: {info['train_same_next_item_median']}",
          flush=True)
    return rows, info


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
    ap.add_argument("--tokens", action="store_true",
                    help="run the MovieLens token-sequence part (TF-IDF) instead of MNIST")
    ap.add_argument("--movielens", default=str(ROOT.parent / "shared" / "data" / "ml-100k"))
    ap.add_argument("--out", default=None, help="JSON output (default experiments/out/"
                    "candidate_recall.json, candidate_recall_tokens.json with --tokens)")
    args = ap.parse_args()
    info: dict = {}
    if args.tokens:
        rows, info = run_tokens(Path(args.movielens))
    else:
        train, query, _ = mnist_split(args.mnist, n_train=5000, n_query=100)
        rows = []
        for name, model in train_models(train).items():
            rows += run_model(name, model, train, query)
    print()
    print(table(rows))
    stem = "candidate_recall_tokens" if args.tokens else "candidate_recall"
    out = Path(args.out or ROOT / "experiments" / "out" / f"{stem}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python experiments/candidate_recall.py" + (" --tokens" if args.tokens else "")
    meta = {"command": command, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "machine": platform.platform(), **info}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))

if __name__ == "__main__":
    main()
