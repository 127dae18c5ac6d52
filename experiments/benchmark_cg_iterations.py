"""How many CG iterations the MLP benchmark row uses, chosen on validation queries.

The benchmark (``benchmark_peers.py``) scores the first 50 queries with CG. Here the next 50
(queries 50-99: disjoint, same distribution, their retraining losses are in the same LDS
cache) are solved with our CG (Gauss-Newton, damping as in the benchmark) for 100 iterations,
keeping the iterate after every 10, and the LDS of each iterate is measured on them. The
rule: the fewest iterations whose validation LDS is within 0.01 of the 100-iteration one.
The test queries (0-49) are not looked at.

    .venv/bin/python experiments/benchmark_cg_iterations.py

Writes ``experiments/out/benchmark_cg_iterations.json``.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

STEP, MAX_ITER = 10, 100


def main() -> None:
    torch.set_num_threads(1)
    import mnist_setup as ms

    from unlearn.influence import CGInfluence
    from unlearn.influence.evaluate import lds_from_losses
    from unlearn.influence.grads import iter_grads

    prob = ms.load_problem("mlp")
    assert prob.losses is not None, prob.lds_note
    lo, hi = 50, 100
    query = prob.query.subset(prob.query.ids[lo:hi])
    train_loader = DataLoader(prob.train, batch_size=prob.train_batch, shuffle=False)
    query_loader = DataLoader(query, batch_size=100, shuffle=False)
    # tol far below reach: every row runs all iterations, so iterate k is max_iter=k's result
    est = CGInfluence(prob.model, prob.task, damping=prob.damping, curvature="ggn",
                      tol=1e-12, max_iter=MAX_ITER, progress=False).fit(train_loader)
    G = est._transform(torch.cat(list(iter_grads(prob.model, prob.task, query_loader,
                                                 est.space, query=True))))
    # the CG recurrence (no preconditioner) alongside the solver's own, to keep its iterates
    damped = est._damped()
    X, R, kept = torch.zeros_like(G), G.clone(), {}

    def recording(D: torch.Tensor) -> torch.Tensor:
        AD = damped(D)
        assert D.shape[0] == G.shape[0], "a row stopped early"
        alpha = ((R * R).sum(dim=1) / (D * AD).sum(dim=1)).unsqueeze(1)
        X.add_(alpha * D)
        R.sub_(alpha * AD)
        kept[len(kept) + 1] = X.clone() if (len(kept) + 1) % STEP == 0 else None
        return AD

    est._damped = lambda: recording  # type: ignore[method-assign]
    final = est._precondition(G)
    iterates = {k: v for k, v in kept.items() if v is not None}
    err = float((iterates[MAX_ITER] - final).norm() / final.norm())
    assert err < 1e-4, f"recorded iterate differs from the solver's by {err:.2g}"
    Q = torch.cat(list(iterates.values()))
    blocks = [Q @ est._transform(g).T for g in est._train_grads(train_loader, "scoring")]
    S = (torch.cat(blocks, dim=1) * est._score_scale()).double()
    rows = []
    for i, k in enumerate(iterates):
        s = S[i * G.shape[0] : (i + 1) * G.shape[0]]
        lds = lds_from_losses(s.numpy(), prob.subsets, prob.losses[:, lo:hi])["lds"]
        rows.append({"max_iter": k, "val_lds": float(lds)})
        print(f"{k:4d} iterations: validation LDS {lds:.4f}", flush=True)
    ref = rows[-1]["val_lds"]
    chosen = min(r["max_iter"] for r in rows if r["val_lds"] >= ref - 0.01)
    print(f"chosen: {chosen} iterations", flush=True)
    out = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "queries": [lo, hi], "damping": prob.damping, "rule": "fewest iterations whose "
           "validation LDS is within 0.01 of the 100-iteration one", "rows": rows,
           "chosen": chosen, "recorded_vs_solver_rel_err": err}
    path = ROOT / "experiments" / "out" / "benchmark_cg_iterations.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
