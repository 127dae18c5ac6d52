"""SGD-influence against true SGD leave-one-out on real MNIST digits.

    .venv/bin/python experiments/sgd_influence_check.py                  # the reported run
    .venv/bin/python experiments/sgd_influence_check.py --seeds 0 --loo 50   # a quick look

For each model and seed: train with minibatch SGD on ``--n-train`` digits (recording the
trajectory at every step), estimate with :class:`unlearn.influence.SGDInfluence` the effect of
removing each training digit on the mean cross-entropy of ``--n-query`` validation digits, and
compare with the truth for ``--loo`` randomly chosen training digits: the same SGD run
replayed without that digit (same batches, order and learning rates; the batch keeps its
normaliser, the counterfactual of Hara et al. 2019). Metrics: Pearson r, Kendall τ, and the
Jaccard index of the top-5% (most helpful) and bottom-5% (most harmful) sets, all over the
``--loo`` digits; seconds of the estimate (fit + one backward pass, all training digits) and
of brute force (measured over the ``--loo`` digits, and scaled to all training digits).

Data: the 10,000 t10k digits in ``../shared/data/mnist-t10k`` (``unlearn.data.mnist_split``,
a random split per seed). Models in float64 so that the truth is not blurred by rounding.
Writes ``experiments/out/sgd_influence_check.json`` and ``docs/results/sgd_influence.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import kendalltau, pearsonr
from torch import nn
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from unlearn.data import from_tensors, mnist_split  # noqa: E402
from unlearn.influence.sgd import SGDInfluence, loo_loss_changes, train_sgd_recorded  # noqa: E402
from unlearn.tasks import ClassificationTask  # noqa: E402

TASK = ClassificationTask()

#: model name -> (architecture, training recipe); lr_decay "sqrt" is η_t = η_0 / sqrt(t + 1)
MODELS: dict[str, dict[str, Any]] = {
    "lr": {"hidden": [], "lr": 0.1, "lr_decay": "sqrt", "momentum": 0.0,
           "weight_decay": 1e-3},
    "mlp": {"hidden": [32], "lr": 0.1, "lr_decay": "none", "momentum": 0.0,
            "weight_decay": 1e-3},
    "mlp-momentum": {"hidden": [32], "lr": 0.02, "lr_decay": "none", "momentum": 0.9,
                     "weight_decay": 1e-3},
}


def build(hidden: list[int], seed: int) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    d = 784
    for h in hidden:
        layers += [nn.Linear(d, h), nn.ReLU()]
        d = h
    return nn.Sequential(*layers, nn.Linear(d, 10)).double()


def jaccard(a: np.ndarray, b: np.ndarray, frac: float, top: bool) -> float:
    k = max(1, int(round(frac * len(a))))
    order_a, order_b = np.argsort(-a if top else a), np.argsort(-b if top else b)
    sa, sb = set(order_a[:k].tolist()), set(order_b[:k].tolist())
    return len(sa & sb) / len(sa | sb)


def run_one(name: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    cfg = MODELS[name]
    train, query, _ = mnist_split(args.mnist_root, n_train=args.n_train, n_query=args.n_query,
                                  seed=seed)
    x, y = train.tensors()
    train = from_tensors(x.double(), y, ids=train.ids)
    qx, qy = query.tensors()
    query = from_tensors(qx.double(), qy, ids=query.ids)
    model = build(cfg["hidden"], seed)
    lr0 = cfg["lr"]
    schedule = (lambda t: lr0 / math.sqrt(t + 1)) if cfg["lr_decay"] == "sqrt" else None
    t0 = time.perf_counter()
    traj = train_sgd_recorded(model, TASK, train, epochs=args.epochs, lr=lr0,
                              batch_size=args.batch, seed=seed, momentum=cfg["momentum"],
                              weight_decay=cfg["weight_decay"], lr_schedule=schedule,
                              checkpoint_every=args.checkpoint_every)
    train_s = time.perf_counter() - t0
    qloader = DataLoader(query, batch_size=500)
    with torch.no_grad():
        acc = float((model(qx.double()).argmax(1) == qy).double().mean())

    t0 = time.perf_counter()
    est = SGDInfluence(model, TASK, traj, train, progress=False).fit()
    estimate = est.influence(qloader)
    est_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    first_order = SGDInfluence(model, TASK, traj, train, hessian=False,
                               progress=False).fit().influence(qloader)
    first_order_s = time.perf_counter() - t0

    g = torch.Generator().manual_seed(1000 + seed)
    pick = torch.randperm(len(train), generator=g)[: args.loo]
    ids = train.ids[pick]
    t0 = time.perf_counter()
    truth = loo_loss_changes(model, TASK, train, traj, qloader, ids, progress=args.progress)
    loo_s = time.perf_counter() - t0

    e, tr = estimate[pick].numpy(), truth.numpy()
    f = first_order[pick].numpy()
    return {
        "model": name, "seed": seed, "config": cfg, "steps": traj.num_steps,
        "query_accuracy": acc, "train_s": train_s, "replay_gap": est.replay_gap,
        "pearson": float(pearsonr(e, tr)[0]), "kendall": float(kendalltau(e, tr)[0]),
        "jaccard_top5": jaccard(e, tr, 0.05, top=True),
        "jaccard_bottom5": jaccard(e, tr, 0.05, top=False),
        "slope": float(e @ tr / (tr @ tr)), "mean_abs_truth": float(np.abs(tr).mean()),
        "first_order_pearson": float(pearsonr(f, tr)[0]),
        "first_order_kendall": float(kendalltau(f, tr)[0]), "first_order_s": first_order_s,
        "estimate_s": est_s, "loo_s": loo_s, "loo_n": len(ids),
        "loo_all_s": loo_s / len(ids) * len(train),
        "ids": ids.tolist(), "estimate": e.tolist(), "truth": tr.tolist(),
    }


def summary_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | seed | steps | query acc | Pearson r | Kendall τ | Jaccard top 5% | "
             "Jaccard bottom 5% | slope est/truth | estimate s (all n) | brute force s "
             "(LOO subset) | brute force s (all n, scaled) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['seed']} | {r['steps']} | {r['query_accuracy']:.3f} | "
            f"{r['pearson']:.3f} | {r['kendall']:.3f} | {r['jaccard_top5']:.2f} | "
            f"{r['jaccard_bottom5']:.2f} | {r['slope']:.2f} | {r['estimate_s']:.1f} | "
            f"{r['loo_s']:.1f} ({r['loo_n']}) | {r['loo_all_s']:.0f} |")
    return "\n".join(lines)


def mean_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | seeds | Pearson r | Kendall τ | Jaccard top 5% | Jaccard bottom 5% | "
             "Kendall τ, no Hessian | estimate s | brute force s (all n) | speed-up |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name in dict.fromkeys(r["model"] for r in rows):
        rs = [r for r in rows if r["model"] == name]

        def m(k: str, rs: list[dict[str, Any]] = rs) -> str:
            v = np.array([r[k] for r in rs])
            return f"{v.mean():.3f} ± {v.std():.3f}" if len(v) > 1 else f"{v.mean():.3f}"

        est = np.mean([r["estimate_s"] for r in rs])
        loo = np.mean([r["loo_all_s"] for r in rs])
        lines.append(f"| {name} | {len(rs)} | {m('pearson')} | {m('kendall')} | "
                     f"{m('jaccard_top5')} | {m('jaccard_bottom5')} | "
                     f"{m('first_order_kendall')} | {est:.1f} | {loo:.0f} | "
                     f"{loo / est:.0f}× |")
    return "\n".join(lines)


def reading(rows: list[dict[str, Any]]) -> str:
    """The comparison with the paper, from the measured numbers."""
    def avg(name: str, key: str) -> float:
        return float(np.mean([r[key] for r in rows if r["model"] == name]))

    names = list(dict.fromkeys(r["model"] for r in rows))
    lines = [f"- `{n}`: mean Kendall τ {avg(n, 'kendall'):.2f}, Pearson r "
             f"{avg(n, 'pearson'):.2f}, top/bottom-5% Jaccard {avg(n, 'jaccard_top5'):.2f} / "
             f"{avg(n, 'jaccard_bottom5'):.2f}; without the Hessian term τ "
             f"{avg(n, 'first_order_kendall'):.2f}; estimate "
             f"{avg(n, 'loo_all_s') / avg(n, 'estimate_s'):.0f}× faster than brute force "
             "over all training digits." for n in names]
    text = "\n".join(lines)
    text += (
        "\n\nHara, Nitanda & Maehara (NeurIPS 2019, Section 7.1) report Kendall τ of about 0.9 "
        "and above between SGD-influence and the true counterfactual for linear logistic "
        "regression (binary tasks, 200 training points) and lower values for their small "
        "DNNs.")
    if "lr" in names:
        tau = avg("lr", "kendall")
        text += (f" Here logistic regression reaches τ = {tau:.2f}, "
                 + ("in line with that." if tau >= 0.9 else "below that."))
    mlps = [n for n in names if n != "lr"]
    if mlps:
        text += (" The MLP rows are lower (" + ", ".join(
            f"`{n}` {avg(n, 'kendall'):.2f}" for n in mlps) + "), as the paper found for "
            "networks. The tests show the estimate is the exact derivative of the "
            "counterfactual run (finite differences agree to 1e-5), so the remaining gap is "
            "the non-linearity of removing a whole example from a non-convex run, which grows "
            "with the effective step size (momentum multiplies it by about 1/(1 − μ)).")
    return text


def _minutes(result: dict[str, Any]) -> str:
    if "total_s" in result:
        return f"{result['total_s'] / 60:.1f} minutes"
    return "not recorded (about 12 minutes, under a load average of about 9 on the 2 cores)"


def write_markdown(result: dict[str, Any], path: Path) -> None:
    a = result["args"]
    rows = result["rows"]
    recipes = "\n".join(
        f"- `{k}`: hidden {v['hidden'] or 'none (logistic regression)'}, lr {v['lr']}"
        f"{' / sqrt(t+1)' if v['lr_decay'] == 'sqrt' else ''}, momentum {v['momentum']}, "
        f"weight decay {v['weight_decay']}" for k, v in MODELS.items() if k in a["models"])
    text = f"""# SGD-influence vs true SGD leave-one-out (MNIST)

Command: `{result['command']}`

Machine: {result['machine']}. Date: {result['date']}.
Seeds: {a['seeds']} (split, initialisation and batch order all follow the seed).
Whole run: {_minutes(result)}.

Setup: {a['n_train']} training and {a['n_query']} validation digits drawn from the 10,000
real MNIST t10k digits (`unlearn.data.mnist_split`, random split per seed), float64 models,
{a['epochs']} epochs of minibatch `torch.optim.SGD` with batch size {a['batch']} on the mean
cross-entropy, trajectory recorded at every step. Recipes:

{recipes}

Measurement: the change of the mean validation cross-entropy when one training digit is
removed. Truth: the same SGD run replayed without the digit (same batches, order and learning
rates; the digit's batch keeps its normaliser, the counterfactual of Hara et al. 2019), for
{a['loo']} random training digits per run. Estimate: `SGDInfluence(...).fit().influence(...)`
for all {a['n_train']} digits at once (one backward pass over the trajectory). Correlations
and Jaccard indices (top/bottom 5% = the {max(1, round(0.05 * a['loo']))} most helpful / most
harmful of the {a['loo']} digits by each ranking) are over those {a['loo']} digits. "slope" is
the least-squares slope of estimate on truth (1 = right scale). "no Hessian" is the ablation
`SGDInfluence(..., hessian=False)` (the Hessian-vector products dropped, as the paper's
first-order baseline). Brute-force time is measured over the {a['loo']} digits and scaled to
all {a['n_train']} (each replay already starts at the first step holding its digit, from the
stored per-step weights, rather than from scratch); the estimate's time covers `fit()` and
one backward pass for all {a['n_train']} digits. Times are wall-clock on a 2-core machine
shared with other jobs, so they are noisy (the same work varied up to 2× between runs).

## Mean over seeds (± std)

{mean_table(rows)}

## Per run

{summary_table(rows)}

## Reading

{reading(rows)}
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--n-train", type=int, default=500)
    p.add_argument("--n-query", type=int, default=200)
    p.add_argument("--loo", type=int, default=150, help="training digits checked by replay")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch", type=int, default=20)
    p.add_argument("--checkpoint-every", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--mnist-root", default=str(ROOT.parent / "shared" / "data" / "mnist-t10k"))
    p.add_argument("--out", type=Path, default=ROOT / "experiments" / "out")
    p.add_argument("--md", type=Path, default=ROOT / "docs" / "results" / "sgd_influence.md")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--report", action="store_true",
                   help="rebuild the markdown from the JSON of the last run, run nothing")
    args = p.parse_args()
    if args.report:
        write_markdown(json.loads((args.out / "sgd_influence_check.json").read_text()), args.md)
        return
    torch.set_num_threads(args.threads)

    rows, start = [], time.perf_counter()
    for name in args.models:
        for seed in args.seeds:
            r = run_one(name, seed, args)
            print(f"{name} seed {seed}: pearson {r['pearson']:.3f} kendall {r['kendall']:.3f} "
                  f"estimate {r['estimate_s']:.1f}s loo {r['loo_s']:.1f}s", flush=True)
            rows.append(r)
    result = {
        "command": " ".join(["python", "experiments/sgd_influence_check.py", *sys.argv[1:]]),
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} torch thread(s), "
                   f"shared 2-core machine ({platform.platform()})",
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "total_s": time.perf_counter() - start,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sgd_influence_check.json").write_text(json.dumps(result, indent=1))
    write_markdown(result, args.md)
    print(mean_table(rows))


if __name__ == "__main__":
    main()
