"""How much the MIA efficacy of one model moves between attack fits: hard vs soft.

    .venv/bin/python experiments/mia_noise.py          # about a minute on 2 cores

For each model of ``experiments/unlearning_mnist.py`` (same data split, recipe and seed 0, 10%
random forgetting), the original model and the model retrained without the forget set are
attacked ``--fits`` times; the fits differ only in the seed of the balanced subsample the
attack is fitted on. Writes ``experiments/out/mia_noise.json``, which
``docs/results/unlearning.md`` quotes (rebuild it with ``unlearning_mnist.py --report``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import unlearning_mnist as um  # noqa: E402

from unlearn.audit import mia_efficacy  # noqa: E402

OUT = um.ROOT / "experiments/out/mia_noise.json"


def measure(kind: str, fits: int, args: argparse.Namespace) -> dict:
    train, test = um.load_split(args.mnist_root, 8000, 2000)
    original, _ = um.train_model(kind, train, 0)
    ld = um.loaders(train, test, um.forget_ids(train, "random10", 0, 3))
    retrained = um.Retrain(um.TASK, um.FACTORIES[kind], recipe=um.RECIPES[kind], seed=0).unlearn(
        original, forget=ld["forget"], retain=ld["retain"]).model
    out = {}
    for name, model in (("original", original), ("retrained", retrained)):
        res = [mia_efficacy(model, forget=ld["forget"], retain=ld["retain"], test=ld["test"],
                            seed=s) for s in range(fits)]
        out[name] = {"hard": [r.efficacy for r in res], "soft": [r.soft_efficacy for r in res],
                     "attack_train_acc": [r.attack_train_accuracy for r in res]}
    return out


def sentence(data: dict) -> str:
    """The report's sentence: per model, the range of hard and soft efficacies over the fits."""
    parts = []
    for kind, per in data["models"].items():
        for name, r in per.items():
            parts.append(f"{kind.upper()} {name}: hard {min(r['hard']):.2f}–{max(r['hard']):.2f}"
                         f", soft {min(r['soft']):.3f}–{max(r['soft']):.3f} (attack training "
                         f"accuracy {min(r['attack_train_acc']):.3f}–"
                         f"{max(r['attack_train_acc']):.3f})")
    return (f"Measured by `{data['command']}` on {data['date']} ({data['machine']}): "
            f"{data['fits']} attack fits per model that differ only in their balanced subsample "
            "(seed 0, 10% random) give " + "; ".join(parts) + ".")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fits", type=int, default=5)
    p.add_argument("--models", default="mlp,cnn")
    p.add_argument("--mnist-root", default=str(um.ROOT.parent / "shared/data/mnist-t10k"))
    args = p.parse_args()
    torch.set_num_threads(1)
    mach = um.machine()
    data = {"command": " ".join(["python experiments/mia_noise.py", *sys.argv[1:]]),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{mach['nproc']} CPU cores, {mach['cpu']}, torch {mach['torch']}, "
                       "1 thread",
            "fits": args.fits,
            "models": {k: measure(k, args.fits, args) for k in args.models.split(",") if k}}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(data, indent=1))
    print(sentence(data))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
