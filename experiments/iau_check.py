"""IAU against retraining on MNIST: 10% random forgetting with an MLP trained by SGD.

    .venv/bin/python experiments/iau_check.py --tune     # grid on a validation split
    .venv/bin/python experiments/iau_check.py --seeds 5 --repeats 5 --ekfac-damping 3e-4
    .venv/bin/python experiments/iau_check.py --hidden 256 128 ...   # a deeper MLP

The final run compares IAU's default (scaled) mode, the faithful mode at the reference's
Adam step (1e-3) and at 3e-3, and optionally IAU preconditioned by EK-FAC (its fit time is
reported apart, ``prep_s``), plus "no-op" (the original model) as the floor to beat.

Data: the 10,000 t10k digits from ``../shared/data/mnist-t10k``, split per seed into 8,000
train / 2,000 test. ``--tune`` never reads the test digits: it splits the 8,000 into 6,000
train / 2,000 validation and scores against the validation digits instead. Columns:
accuracy on the forget set, the retained set and the held-out set, their average absolute
gap to the model retrained without the forget set (same recipe, same seed), the removal's
seconds (``RemovalResult.seconds``) and the speed-up over retraining. One torch thread.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from unlearn.data import IndexedDataset, load_mnist
from unlearn.removal.iau import IAU
from unlearn.tasks import ClassificationTask
from unlearn.training import train_sgd

TASK = ClassificationTask()
ROOT = Path(__file__).resolve().parents[1]


def splits(seed: int, tune: bool, root: str) -> tuple[IndexedDataset, IndexedDataset]:
    full = load_mnist(root, train=False, flatten=True)
    perm = torch.randperm(len(full), generator=torch.Generator().manual_seed(seed)).tolist()
    train, test = perm[:8000], perm[8000:]
    if tune:
        train, test = train[:6000], train[6000:]
    return full.subset(sorted(train)), full.subset(sorted(test))


def mlp(seed: int, hidden: tuple[int, ...]) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    d = 784
    for h in hidden:
        layers += [nn.Linear(d, h), nn.ReLU()]
        d = h
    return nn.Sequential(*layers, nn.Linear(d, 10))


def fit(data: IndexedDataset, seed: int, args: argparse.Namespace) -> tuple[nn.Module, float]:
    model = mlp(seed, args.hidden)
    loader = DataLoader(data, batch_size=64, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    start = time.perf_counter()
    train_sgd(model, TASK, loader, epochs=args.epochs, lr=args.lr, seed=seed)
    return model, time.perf_counter() - start


def accuracy(model: nn.Module, data: IndexedDataset) -> float:
    x, y = data.tensors()
    with torch.no_grad():
        return 100.0 * float((model(x).argmax(1) == y).float().mean())


def metrics(model: nn.Module, parts: dict[str, IndexedDataset]) -> dict[str, float]:
    return {k: accuracy(model, v) for k, v in parts.items()}


def gap(m: dict[str, float], ref: dict[str, float]) -> float:
    return sum(abs(m[k] - ref[k]) for k in ref) / len(ref)


def setup(seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Original and retrained models for one seed, the loaders and the reference metrics."""
    train, held = splits(seed, args.tune, args.mnist_root)
    g = torch.Generator().manual_seed(1000 + seed)
    n_forget = int(round(args.forget * len(train)))
    forget_ids = train.ids[torch.randperm(len(train), generator=g)[:n_forget]]
    forget, retain = train.subset(forget_ids.sort().values), train.without(forget_ids)
    original, t_orig = fit(train, seed, args)
    retrained, t_re = fit(retain, seed, args)
    parts = {"forget": forget, "retain": retain, "held": held}
    ref = metrics(retrained, parts)
    return {"seed": seed, "original": original, "parts": parts, "ref": ref, "retrain_s": t_re,
            "forget_loader": DataLoader(forget, batch_size=len(forget)),
            "retain_loader": DataLoader(retain, batch_size=args.retain_batch, shuffle=True,
                                        generator=torch.Generator().manual_seed(seed)),
            "no_op": metrics(original, parts)}


def evaluate(make: Any, runs: list[dict[str, Any]], repeats: int) -> dict[str, Any]:
    """``make(run) -> (IAU, seconds spent preparing it)``; the removal is timed ``repeats``
    times and the median kept."""
    rows = []
    for r in runs:
        method, prep_s = make(r)
        results = [method.unlearn(r["original"], forget=r["forget_loader"],
                                  retain=r["retain_loader"]) for _ in range(repeats)]
        seconds = sorted(x.seconds for x in results)[len(results) // 2]
        m = metrics(results[0].model, r["parts"])
        rows.append({**m, "gap": gap(m, r["ref"]), "seconds": seconds, "prep_s": prep_s,
                     "speedup": r["retrain_s"] / seconds,
                     "update_norm": results[0].details["update_norm"]})
    return {k: sum(row[k] for row in rows) / len(rows) for k in rows[0]} | {"per_seed": rows}


def plain(cfg: dict[str, Any]) -> Any:
    return lambda run: (IAU(TASK, **cfg), 0.0)


def with_ekfac(cfg: dict[str, Any], damping: float) -> Any:
    from unlearn.influence import EKFACInfluence

    def make(run: dict[str, Any]) -> tuple[IAU, float]:
        train = DataLoader(torch.utils.data.ConcatDataset(
            [run["parts"]["forget"], run["parts"]["retain"]]), batch_size=256)
        start = time.perf_counter()
        est = EKFACInfluence(run["original"], TASK, damping=damping, progress=False).fit(train)
        return IAU(TASK, estimator=est, **cfg), time.perf_counter() - start
    return make


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def avg(key: str) -> dict[str, float]:
        return {k: sum(r[key][k] for r in runs) / len(runs) for k in runs[0][key]}
    return {"retrain": avg("ref"), "no_op": avg("no_op"),
            "no_op_gap": sum(gap(r["no_op"], r["ref"]) for r in runs) / len(runs),
            "retrain_s": sum(r["retrain_s"] for r in runs) / len(runs)}


def grid(args: argparse.Namespace) -> list[tuple[dict[str, Any], Any]]:
    out = [({"mode": "faithful", "lr": lr}, plain({"mode": "faithful", "lr": lr}))
           for lr in args.grid_faithful_lr]
    for lr, steps, rlr in itertools.product(args.grid_lr, args.grid_steps, args.grid_rlr):
        cfg = {"mode": "scaled", "lr": lr, "retain_steps": steps, "retain_lr": rlr}
        out.append((cfg, plain(cfg)))
    for scale, steps, rlr in itertools.product(args.grid_scale, args.grid_steps, args.grid_rlr):
        cfg = {"mode": "scaled", "step_scale": scale, "retain_steps": steps, "retain_lr": rlr}
        out.append((cfg, plain(cfg)))
    for damping, steps, rlr in itertools.product(args.grid_damping, args.grid_steps,
                                                 args.grid_rlr):
        cfg = {"retain_steps": steps, "retain_lr": rlr}
        out.append(({**cfg, "estimator": f"EKFAC(damping={damping:g})"},
                    with_ekfac(cfg, damping)))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tune", action="store_true", help="grid on the validation split")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--forget", type=float, default=0.1)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--lr", type=float, default=0.05, help="training SGD step size")
    p.add_argument("--hidden", type=int, nargs="+", default=[128])
    p.add_argument("--retain-batch", type=int, default=128, help="retain loader batch size")
    p.add_argument("--repeats", type=int, default=3, help="timed removals per seed (median)")
    p.add_argument("--grid-lr", type=float, nargs="*", default=[],
                   help="fixed scaled-mode lr values to try")
    p.add_argument("--grid-scale", type=float, nargs="*", default=[30.0, 50.0, 100.0, 200.0],
                   help="scaled-mode step_scale values to try")
    p.add_argument("--grid-faithful-lr", type=float, nargs="*", default=[1e-3, 3e-3])
    p.add_argument("--grid-steps", type=int, nargs="*", default=[3, 5, 10])
    p.add_argument("--grid-rlr", type=float, nargs="*", default=[0.05, 0.1, 0.2])
    p.add_argument("--grid-damping", type=float, nargs="*", default=[],
                   help="also tune IAU with an EK-FAC preconditioner at these dampings")
    p.add_argument("--faithful-lr", type=float, nargs="*", default=[1e-3, 3e-3],
                   help="final run: faithful-mode Adam step sizes (1e-3: the reference's)")
    p.add_argument("--ekfac-damping", type=float, default=None,
                   help="final run: add IAU with EK-FAC at this damping")
    p.add_argument("--mnist-root", default=str(ROOT.parent / "shared/data/mnist-t10k"))
    p.add_argument("--out", default=str(ROOT / "experiments/out/iau_check.json"))
    args = p.parse_args()
    args.hidden = tuple(args.hidden)
    torch.set_num_threads(1)
    runs = [setup(s, args) for s in range(args.seeds)]
    report: dict[str, Any] = {"args": vars(args), **summary(runs), "methods": []}
    print(json.dumps({k: v for k, v in report.items() if k != "methods"}, indent=1))
    if args.tune:
        configs = grid(args)
    else:
        configs = [({"mode": "scaled"}, plain({"mode": "scaled"}))]
        configs += [({"mode": "faithful", "lr": lr}, plain({"mode": "faithful", "lr": lr}))
                    for lr in args.faithful_lr]
        if args.ekfac_damping is not None:
            configs.append(({"estimator": f"EKFAC(damping={args.ekfac_damping:g})"},
                            with_ekfac({}, args.ekfac_damping)))
    for cfg, make in configs:
        res = evaluate(make, runs, args.repeats)
        report["methods"].append({"config": cfg, **res})
        print(cfg, {k: round(v, 3) for k, v in res.items() if k != "per_seed"}, flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
