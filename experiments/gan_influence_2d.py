"""GAN influence against brute-force replay on the 2-D Gaussian GAN (Terashita et al., 2021).

The data are the paper's: a 2-D Gaussian N((1, 1), [[1, 0.8], [0.8, 1]]); the models its fully
connected pair (latent 10, G hidden 32, D hidden 64, float64). Scaled to a 2-core CPU: fewer
samples and steps than the paper (see the flags). For each seed and update schedule the script
trains with ``train_gan``, estimates every instance's influence with ``GANInfluence`` on three
targets, and replays the run without each of ``--n-check`` random instances (same batches and
latents) to measure the true change of each target:

* ``ALL``: average log-likelihood of 1,000 validation samples under a Gaussian KDE of 1,000
  generated samples (bandwidth 1, as the reference implementation; and Scott's rule);
* ``true LL``: mean log-density of the generated samples under the true Gaussian;
* ``D loss``: the discriminator loss on validation and generated samples.

It reports Pearson, Spearman and Kendall correlations between estimate and truth, and the
Jaccard index of the top 10% (largest predicted vs largest true change), as the paper does.
``--last-epoch`` adds the paper's cheaper variant that traces only the last epoch back.

    .venv/bin/python experiments/gan_influence_2d.py                 # full run, then report
    .venv/bin/python experiments/gan_influence_2d.py --report        # rebuild the markdown
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import kendalltau, pearsonr, spearmanr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from unlearn.data import from_tensors  # noqa: E402
from unlearn.generative.metrics import AverageLogLikelihood, GaussianLogLikelihood  # noqa: E402
from unlearn.generative.models import gan_2d  # noqa: E402
from unlearn.generative.training import replay, train_gan  # noqa: E402
from unlearn.influence import GANInfluence  # noqa: E402

MEAN = torch.tensor([1.0, 1.0], dtype=torch.float64)
COV = torch.tensor([[1.0, 0.8], [0.8, 1.0]], dtype=torch.float64)


def sample_gaussian(n: int, gen: torch.Generator) -> torch.Tensor:
    chol = torch.linalg.cholesky(COV)
    return torch.randn(n, 2, generator=gen, dtype=torch.float64) @ chol.T + MEAN


def jaccard_top(pred: np.ndarray, truth: np.ndarray, frac: float = 0.1) -> float:
    k = max(1, int(round(frac * len(pred))))
    a, b = set(np.argsort(-pred)[:k]), set(np.argsort(-truth)[:k])
    return len(a & b) / len(a | b)


def replay_truths(traj, estimators: dict, base: dict, check_ids) -> dict[str, np.ndarray]:
    """The true change of every estimator's target (from its value ``base``) when each
    checked id is left out: one replay per id, shared by all the targets."""
    truth = {name: np.zeros(len(check_ids)) for name in estimators}
    for k, i in enumerate(check_ids):
        theta = replay(traj, [i]).final_params()
        for name, est in estimators.items():
            truth[name][k] = est.value(theta) - base[name]
    return truth


def stats(pred: np.ndarray, truth: np.ndarray) -> dict:
    return {
        "pearson": float(pearsonr(pred, truth)[0]),
        "spearman": float(spearmanr(pred, truth)[0]),
        "kendall": float(kendalltau(pred, truth)[0]),
        "jaccard_top10": jaccard_top(pred, truth),
        "rel_err": float(np.linalg.norm(pred - truth) / np.linalg.norm(truth)),
        "mean_abs_truth": float(np.abs(truth).mean()),
    }


def run_one(args: argparse.Namespace, seed: int, schedule: str) -> dict:
    gen = torch.Generator().manual_seed(seed)
    x_train = sample_gaussian(args.n_train, gen)
    x_val = sample_gaussian(1000, gen)
    dataset = from_tensors(x_train, torch.zeros(args.n_train, dtype=torch.long))
    g, d = gan_2d(latent_dim=10, hidden_g=32, hidden_d=64, seed=seed)
    t0 = time.perf_counter()
    traj = train_gan(
        g, d, dataset, epochs=args.epochs, batch_size=args.batch_size, lr_d=args.lr,
        lr_g=args.lr, schedule=schedule, seed=seed,
    )  # fmt: skip
    train_s = time.perf_counter() - t0
    steps_per_epoch = len(traj) // args.epochs
    eval_z = torch.randn(1000, 10, generator=gen, dtype=torch.float64)
    targets = {
        "ALL (h=1)": dict(metric=AverageLogLikelihood(x_val, bandwidth=1.0)),
        "ALL (Scott)": dict(metric=AverageLogLikelihood(x_val, bandwidth="scott")),
        "true LL": dict(metric=GaussianLogLikelihood(MEAN, COV)),
        "D loss": dict(target="discriminator_loss", validation=x_val),
    }
    check = torch.randperm(args.n_train, generator=gen)[: args.n_check]
    check_ids = dataset.ids[check].tolist()
    estimators, estimates, seconds = {}, {}, {}
    for name, kw in targets.items():
        variants = [("full", None)] + ([("last epoch", steps_per_epoch)] if args.last_epoch else [])
        for variant, last in variants:
            est = GANInfluence(traj, eval_latents=eval_z, last_steps=last, **kw)
            t0 = time.perf_counter()
            s = est.scores()
            seconds[f"{name}|{variant}"] = time.perf_counter() - t0
            estimates[f"{name}|{variant}"] = s[check].numpy()
            estimators[name] = est if variant == "full" else estimators[name]
    base = {name: est.value() for name, est in estimators.items()}
    t0 = time.perf_counter()
    truth = replay_truths(traj, estimators, base, check_ids)
    replay_s = time.perf_counter() - t0
    rows = []
    for key, pred in estimates.items():
        name, variant = key.split("|")
        rows.append(
            {"target": name, "trace": variant, "seconds": seconds[key], **stats(pred, truth[name])}
        )
    return {
        "seed": seed,
        "schedule": schedule,
        "steps": len(traj),
        "train_seconds": train_s,
        "replay_seconds_per_instance": replay_s / len(check_ids),
        "target_values": base,
        "rows": rows,
    }


def report(out: Path, md: Path) -> None:
    data = json.loads(out.read_text())
    a = data["args"]
    lines = [
        "# GAN influence vs brute-force replay (2-D Gaussian GAN)",
        "",
        f"Command: `{data['command']}`  ",
        f"Machine: {data['machine']}; date {data['date']}; seeds {a['seeds']}.",
        "",
        f"Setup: {a['n_train']} training samples from N((1,1), [[1,.8],[.8,1]]), batch "
        f"{a['batch_size']}, {a['epochs']} epochs, plain SGD, lr {a['lr']} for both players, "
        "non-saturating loss; G 10→32→2, D 2→64→1 (ReLU, float64). For each run "
        f"{a['n_check']} random training instances are left out one at a time and the run is "
        "replayed with the same batches and latents (the truth); `GANInfluence` estimates "
        "the same changes from one backward pass over the recorded trajectory. Targets are "
        "evaluated on 1,000 fixed latents. Correlations are over the checked instances; "
        "Jaccard: overlap of the top-10% by predicted vs by true change. Mean ± std over seeds.",
        "",
        "| schedule | target | trace | Pearson | Spearman | Kendall τ | Jaccard@10% | rel. error "
        "| mean \\|true Δ\\| | estimate s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    groups: dict[tuple, list] = {}
    for run in data["runs"]:
        for row in run["rows"]:
            groups.setdefault((run["schedule"], row["target"], row["trace"]), []).append(row)

    def ms(rows: list, key: str, fmt: str = ".3f") -> str:
        v = np.array([r[key] for r in rows])
        return f"{v.mean():{fmt}} ± {v.std():{fmt}}" if len(v) > 1 else f"{v[0]:{fmt}}"

    for (schedule, target, trace), rows in groups.items():
        lines.append(
            f"| {schedule} | {target} | {trace} | {ms(rows, 'pearson')} | "
            f"{ms(rows, 'spearman')} | {ms(rows, 'kendall')} | {ms(rows, 'jaccard_top10')} | "
            f"{ms(rows, 'rel_err')} | {ms(rows, 'mean_abs_truth', '.2e')} | "
            f"{ms(rows, 'seconds', '.1f')} |"
        )
    lines += [
        "",
        "| schedule | seed | steps | train s | replay s / instance |",
        "| --- | --- | --- | --- | --- |",
    ]
    for run in data["runs"]:
        lines.append(
            f"| {run['schedule']} | {run['seed']} | {run['steps']} | {run['train_seconds']:.1f} "
            f"| {run['replay_seconds_per_instance']:.2f} |"
        )
    lines += [
        "",
        "Reading the table: *full* traces the whole run back (the method as built); *last "
        "epoch* only its last epoch (the paper's cheaper variant), shown to measure what the "
        "earlier steps contribute. rel. error = ‖estimate − truth‖ / ‖truth‖: where Pearson is "
        "close to 1 but the relative error is not small, the estimate orders and spaces the "
        "instances well while its magnitudes are off (the first-order approximation drifts "
        "over hundreds of nonlinear steps); rankings (Kendall τ, Jaccard) are what cleansing uses. "
        '"estimate s" is one backward pass for all training instances; brute force costs '
        "one replay (last table) per instance.",
    ]
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text("\n".join(lines) + "\n")
    print(f"wrote {md}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n-train", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--n-check", type=int, default=100)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--schedules", nargs="+", default=["simultaneous", "alternating"])
    p.add_argument("--last-epoch", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "experiments/out/gan_influence_2d.json")
    p.add_argument("--md", type=Path, default=ROOT / "docs/results/gan_influence.md")
    p.add_argument("--report", action="store_true", help="only rebuild the markdown")
    args = p.parse_args()
    if not args.report:
        torch.set_num_threads(args.threads)
        runs = []
        for seed in args.seeds:
            for schedule in args.schedules:
                print(f"seed {seed}, {schedule} ...", flush=True)
                runs.append(run_one(args, seed, schedule))
                for row in runs[-1]["rows"]:
                    print(f"  {row['target']:12s} {row['trace']:10s} pearson {row['pearson']:.3f}"
                          f" kendall {row['kendall']:.3f} jaccard {row['jaccard_top10']:.2f}",
                          flush=True)  # fmt: skip
        args.out.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "command": " ".join(shlex.quote(a) for a in [".venv/bin/python", *sys.argv]),
            "machine": f"{platform.machine()} CPU, 2 cores shared, {args.threads} torch thread(s)",
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "runs": runs,
        }
        args.out.write_text(json.dumps(record, indent=1))
    report(args.out, args.md)


if __name__ == "__main__":
    main()
