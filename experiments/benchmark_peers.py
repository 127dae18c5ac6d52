"""Side-by-side benchmark: our influence estimators against kronfluence 1.0.1 and dattri 0.3.0
on MNIST (5,000 train / 500 query; logistic regression and MLP 784-128-10), with the same
trained weights and damping for everyone.

Each (method, repetition) runs in a fresh subprocess so peak resident memory
(``ru_maxrss``) is its own; ours and the peers are interleaved within each repetition. LDS
uses the retraining losses cached by ``experiments/influence_truth.py`` (read only).

    .venv/bin/python experiments/benchmark_peers.py --all            # everything
    .venv/bin/python experiments/benchmark_peers.py --lr --reps 1    # reduced
    .venv/bin/python experiments/benchmark_peers.py --flops --scaling --report

Results: ``experiments/out/benchmark_<part>.json``; ``docs/results/benchmark.md`` is rebuilt
from whatever JSON files exist.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))
if os.environ.get("UNLEARN_CODE_ROOT"):  # --speedup: import another revision's unlearn
    # bound now, before mnist_setup puts this checkout first on sys.path again
    sys.path.insert(0, os.environ["UNLEARN_CODE_ROOT"])
    import unlearn

    if not Path(unlearn.__file__).resolve().is_relative_to(
            Path(os.environ["UNLEARN_CODE_ROOT"]).resolve()):
        raise ImportError(f"unlearn imported from {unlearn.__file__}, not from "
                          f"{os.environ['UNLEARN_CODE_ROOT']}")

OUT = ROOT / "experiments" / "out"
DOC = ROOT / "docs" / "results" / "benchmark.md"
PARTS = ("speedup", "lr", "mlp", "flops", "scaling", "profile")


@dataclass
class Method:
    label: str
    lib: str  # ours | kronfluence | dattri
    name: str  # our class name, kronfluence strategy or dattri method
    kwargs: dict[str, Any] = field(default_factory=dict)
    queries: int | None = None  # score only the first queries (matrix-free solvers)
    note: str = ""


#: CG iterations of the MLP's extra CG row: the fewest whose LDS on validation queries
#: (50-99, not the benchmark's 0-49) is within 0.01 of 100 iterations'
#: (``experiments/benchmark_cg_iterations.py``)
MLP_CG_ITER = 50


def check_cg_iterations() -> None:
    """Refuse to run the MLP part when benchmark_cg_iterations.py chose another count than
    :data:`MLP_CG_ITER` (its JSON, where present)."""
    path = ROOT / "experiments" / "out" / "benchmark_cg_iterations.json"
    if path.is_file():
        chosen = json.loads(path.read_text())["chosen"]
        if chosen != MLP_CG_ITER:
            raise SystemExit(f"{path} chose {chosen} CG iterations but MLP_CG_ITER is "
                             f"{MLP_CG_ITER}: update the constant")
#: methods that take minutes per run: repeated only ``--slow-reps`` times
SLOW = {"dattri explicit", "dattri CG 100 it", "dattri LiSSA", "dattri TracIn",
        "ours TracIn", "ours CG (GGN) 100 it", "ours CG (GGN) 100 it, EK-FAC preconditioned",
        f"ours CG (GGN) {MLP_CG_ITER} it"}


def methods(model: str, damping: float, iq: int, skip_slow: bool) -> list[Method]:
    """Every method for one model, ours and peers interleaved by family."""
    d, ggn = damping, {"damping": damping, "curvature": "ggn"}
    it_note = f"first {iq} queries"
    m = [
        Method("ours EK-FAC", "ours", "EKFACInfluence", {"damping": d}),
        Method("kronfluence EK-FAC", "kronfluence", "ekfac"),
        Method("ours K-FAC", "ours", "KFACInfluence", {"damping": d}),
        Method("kronfluence K-FAC", "kronfluence", "kfac"),
        Method("kronfluence diagonal", "kronfluence", "diagonal"),
        Method("kronfluence identity", "kronfluence", "identity"),
        Method("ours GradientDot", "ours", "GradientDotInfluence", {}),
        Method("ours Arnoldi r=100", "ours", "ArnoldiInfluence", {**ggn, "rank": 100}),
        Method("dattri Arnoldi r=100", "dattri", "arnoldi", {"arnoldi_rank": 100}),
        Method("ours CG (GGN) 100 it", "ours", "CGInfluence",
               {**ggn, "tol": 1e-4, "max_iter": 100}, iq, it_note + "; stops at tol 1e-4"),
        Method("ours CG (GGN) 100 it, EK-FAC preconditioned", "ours", "CGInfluence",
               {**ggn, "tol": 1e-4, "max_iter": 100, "preconditioner": "ekfac"}, iq,
               it_note + "; stops at tol 1e-4; EK-FAC (exact Fisher, same λ) fitted in 'fit'"),
        Method("dattri CG 100 it", "dattri", "cg", {"max_iter": 100}, iq,
               it_note + "; 100 iterations, no tolerance stop, under no_grad"),
        Method("ours LiSSA (GGN)", "ours", "LiSSAInfluence",
               {**ggn, "depth": 100, "batch_size": 500}, iq, it_note + "; depth 100, batch 500"),
        Method("dattri LiSSA", "dattri", "lissa", {"lissa_depth": 100, "lissa_batch": 500}, iq,
               it_note + "; depth 100, batch 500, scaling 50, under no_grad"),
        Method("dattri TRAK", "dattri", "trak", {"proj_dim": 512}, None,
               "1 checkpoint, projection 512"),
    ]
    if model == "lr":  # dattri's Arnoldi and LiSSA fail on float64 models
        for x in m:
            if x.lib == "dattri" and x.name in ("arnoldi", "lissa"):
                x.kwargs["float32"] = True
                x.note = "float32 copy of the model and data (float64 fails inside dattri)" + \
                    ("; " + x.note if x.note else "")
        m[0:0] = [Method("ours Exact (GGN)", "ours", "ExactInfluence", ggn),
                  Method("ours Exact (GGN, float32 build)", "ours", "ExactInfluence",
                         {**ggn, "build_dtype": "float32"}, None,
                         "curvature products in float32, sums and Cholesky solve in float64"),
                  Method("dattri explicit", "dattri", "explicit")]
        m.append(Method("dattri TracIn (1 ckpt = grad dot)", "dattri", "tracin",
                        {"proj_dim": 512}, None, "final model only, projection 512"))
    else:
        at = next(i for i, x in enumerate(m) if x.label == "dattri CG 100 it")
        m.insert(at, Method(f"ours CG (GGN) {MLP_CG_ITER} it", "ours", "CGInfluence",
                            {**ggn, "tol": 1e-4, "max_iter": MLP_CG_ITER}, iq,
                            it_note + f"; {MLP_CG_ITER} iterations: the fewest within 0.01 of "
                            "100 iterations' LDS on queries 50-99 (benchmark_cg_iterations.py)"))
        m.append(Method("ours TracIn", "ours", "TracInInfluence", {}, None, "5 checkpoints"))
        m.append(Method("dattri TracIn", "dattri", "tracin", {"proj_dim": 512}, None,
                        "5 checkpoints, projection 512"))
    if skip_slow:
        m = [x for x in m if not (x.lib == "dattri" and x.name in ("cg", "lissa"))]
    return m


# ============================================================================ worker


def rss_mb() -> float:
    """Peak resident set of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(spec: dict[str, Any]) -> None:
    """Run one method once and write fit/score seconds, peak RSS and the scores."""
    torch.set_num_threads(spec["threads"])
    import mnist_setup as ms

    if spec["problem"].startswith("synthetic"):
        prob = ms.synthetic_problem(spec["n_train"], spec.get("n_query", 100))
    else:
        prob = ms.load_problem(spec["problem"], spec["n_train"])
    query = prob.query
    if spec.get("queries"):
        query = query.subset(query.ids[: spec["queries"]])
    base_rss = current_rss_mb()
    m = Method(**spec["method"])
    if m.lib == "ours" and spec.get("profile"):
        import cProfile
        import io
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        fit_s, score_s, scores = run_ours(m, prob, query)
        prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(25)
        text = "\n".join(line[:150] for line in buf.getvalue().splitlines()
                         if line.strip() and not line.startswith("   Ordered"))
        Path(spec["out"] + ".prof.txt").write_text(text)
    elif m.lib == "ours":
        fit_s, score_s, scores = run_ours(m, prob, query)
    elif m.lib == "kronfluence":
        from baselines.peers.kronfluence_adapter import kronfluence_scores

        r = kronfluence_scores(prob.model, prob.task, prob.train, query, prob.damping, m.name,
                               train_batch=prob.train_batch, query_batch=100, **m.kwargs)
        fit_s, score_s, scores = r.fit_s, r.score_s, r.scores
    else:
        from baselines.peers.dattri_adapter import dattri_scores

        kw = dict(m.kwargs)
        if m.name == "tracin" and prob.name == "mlp":
            ck = ms.tracin_checkpoints()
            kw.update(checkpoints=ck["checkpoints"], learning_rates=ck["learning_rates"])
        r = dattri_scores(prob.model, prob.task, prob.train, query, prob.damping, m.name, **kw)
        fit_s, score_s, scores = r.fit_s, r.score_s, r.scores
    np.savez(spec["out"], scores=scores.double().numpy(), fit_s=fit_s, score_s=score_s,
             peak_rss_mb=rss_mb(), base_rss_mb=base_rss)


def run_ours(m: Method, prob: Any, query: Any) -> tuple[float, float, torch.Tensor]:
    from unlearn import influence

    extra: dict[str, Any] = {}
    if m.name == "TracInInfluence":
        import mnist_setup as ms

        extra = ms.tracin_checkpoints()
    kwargs = dict(m.kwargs)
    if isinstance(kwargs.get("build_dtype"), str):  # JSON carries the dtype's name
        kwargs["build_dtype"] = getattr(torch, kwargs["build_dtype"])
    train_loader = DataLoader(prob.train, batch_size=prob.train_batch, shuffle=False)
    query_loader = DataLoader(query, batch_size=100, shuffle=False)
    t0 = time.perf_counter()
    if kwargs.get("preconditioner") == "ekfac":  # its fit counts as part of CG's fit
        kwargs["preconditioner"] = influence.EKFACInfluence(
            prob.model, prob.task, damping=kwargs["damping"], fisher="exact",
            progress=False).fit(train_loader)
    est = getattr(influence, m.name)(prob.model, prob.task, **kwargs, **extra, progress=False)
    est.fit(train_loader)
    t1 = time.perf_counter()
    scores = est.scores(query_loader, train_loader)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, scores.detach().double().cpu()


def spawn(spec: dict[str, Any], timeout: float, code_root: str | None = None) -> dict[str, Any]:
    """Run ``worker(spec)`` in a fresh interpreter; return its measurements or the error.
    ``code_root`` imports ``unlearn`` from that directory instead (an older revision)."""
    env = {k: v for k, v in os.environ.items() if k != "UNLEARN_CODE_ROOT"}
    if code_root:
        env["UNLEARN_CODE_ROOT"] = code_root
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        spec = {**spec, "out": str(Path(tmp) / "r.npz")}
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
        t0 = time.perf_counter()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                               env=env)
        except subprocess.TimeoutExpired:
            return {"status": "timeout", "error": f"over {timeout:.0f}s", "wall_s": timeout}
        wall = time.perf_counter() - t0
        if p.returncode != 0 or not Path(spec["out"]).exists():
            err = (p.stderr.strip().splitlines() or ["?"])[-1][:300]
            return {"status": "failed", "error": err, "wall_s": wall}
        with np.load(spec["out"]) as f:
            return {"status": "ok", "scores": f["scores"], "fit_s": float(f["fit_s"]),
                    "score_s": float(f["score_s"]), "peak_rss_mb": float(f["peak_rss_mb"]),
                    "base_rss_mb": float(f["base_rss_mb"]), "wall_s": wall}


# ============================================================================ parts


def log(msg: str) -> None:
    print(f"[{dt.datetime.now():%H:%M:%S}] {msg}", flush=True)


def spread(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def part_model(name: str, a: argparse.Namespace) -> dict[str, Any]:
    import mnist_setup as ms

    from unlearn.influence.evaluate import lds_from_losses

    prob = ms.load_problem(name)
    if name == "mlp":
        ms.tracin_checkpoints()  # cache them before the workers need them
    todo = methods(name, prob.damping, a.iterative_queries, a.skip_slow)
    if a.only:
        todo = [m for m in todo if any(o.lower() in m.label.lower() for o in a.only)]
    runs: dict[str, list[dict]] = {m.label: [] for m in todo}
    for rep in range(a.reps):
        for m in todo:
            if rep >= a.slow_reps and m.label in SLOW:
                continue
            spec = {"problem": name, "n_train": 5000, "threads": a.threads,
                    "queries": m.queries, "method": asdict(m)}
            r = spawn(spec, a.timeout)
            if r["status"] == "ok" and not np.isfinite(r["scores"]).all():
                r.update(status="failed", error="scores contain NaN or inf")
            if r["status"] == "ok" and prob.losses is not None:
                nq = r["scores"].shape[0]
                out = lds_from_losses(r["scores"], prob.subsets, prob.losses[:, :nq])
                r["lds"], r["n_queries"] = out["lds"], nq
            scores = r.pop("scores", None)
            if scores is not None and rep == 0:
                r["n_queries"] = scores.shape[0]
            runs[m.label].append(r)
            log(f"{name} rep {rep} {m.label}: {summary(r)}")
    rows = []
    for m in todo:
        rs = runs[m.label]
        ok = [r for r in rs if r["status"] == "ok"]
        rows.append({"label": m.label, "lib": m.lib, "name": m.name, "kwargs": m.kwargs,
                     "note": m.note, "queries": m.queries, "runs": len(rs), "ok": len(ok),
                     "errors": sorted({r.get("error", "") for r in rs if r["status"] != "ok"}),
                     "fit_s": spread([r["fit_s"] for r in ok]),
                     "score_s": spread([r["score_s"] for r in ok]),
                     "total_s": spread([r["fit_s"] + r["score_s"] for r in ok]),
                     "peak_rss_mb": spread([r["peak_rss_mb"] for r in ok]),
                     "base_rss_mb": spread([r["base_rss_mb"] for r in ok]),
                     "lds": ok[0].get("lds") if ok else None,
                     "n_queries": ok[0].get("n_queries") if ok else None})
    return {"setup": {"model": name, "damping": prob.damping, "reps": a.reps,
                      "slow_reps": min(a.slow_reps, a.reps),
                      "threads": a.threads, "lds": prob.lds_note,
                      "iterative_queries": a.iterative_queries}, "rows": rows}


def summary(r: dict) -> str:
    if r["status"] != "ok":
        return f"{r['status']}: {r.get('error')}"
    lds = f", LDS {r['lds']:.3f}" if r.get("lds") is not None else ""
    return (f"fit {r['fit_s']:.2f}s score {r['score_s']:.2f}s peak {r['peak_rss_mb']:.0f} MB"
            f"{lds}")


def speedup_methods(model: str, damping: float) -> list[Method]:
    ggn = {"damping": damping, "curvature": "ggn"}
    m = [Method("ours EK-FAC", "ours", "EKFACInfluence", {"damping": damping}),
         Method("ours K-FAC", "ours", "KFACInfluence", {"damping": damping})]
    if model == "lr":
        m.append(Method("ours Exact (GGN)", "ours", "ExactInfluence", ggn))
    return m


def part_speedup(a: argparse.Namespace) -> dict[str, Any]:
    """Before / after: each of our methods run with the ``unlearn`` package of git revision
    ``--before`` (extracted with ``git archive``) and with the working tree, interleaved."""
    import mnist_setup as ms

    from unlearn.influence.evaluate import lds_from_losses

    sha = subprocess.run(["git", "rev-parse", "--short", a.before], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout.strip()
    rows = []
    with tempfile.TemporaryDirectory(prefix="before-") as old_root:
        archive = subprocess.run(["git", "archive", a.before, "unlearn"], cwd=ROOT, check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", old_root], input=archive, check=True)
        for name in a.speedup_models:
            prob = ms.load_problem(name)
            for m in speedup_methods(name, prob.damping):
                for version, code_root in ((f"before ({sha})", old_root), ("after", None)):
                    spec = {"problem": name, "n_train": 5000, "threads": a.threads,
                            "queries": None, "method": asdict(m)}
                    r = spawn(spec, a.timeout, code_root)
                    scores = r.pop("scores", None)
                    if scores is not None and prob.losses is not None:
                        r["lds"] = lds_from_losses(scores, prob.subsets, prob.losses)["lds"]
                    rows.append({"model": name, "label": m.label, "version": version, **r})
                    log(f"speedup {name} {m.label} {version}: {summary(r)}")
    return {"setup": {"threads": a.threads, "before": a.before, "before_sha": sha},
            "rows": rows}


def part_flops(a: argparse.Namespace) -> dict[str, Any]:
    """Achieved rate of the scoring step vs a plain torch.matmul of the same shape."""
    torch.set_num_threads(a.threads)
    rows = []
    for dtype, p in ((torch.float64, 7850), (torch.float32, 101770)):
        q, n = 500, 5000
        x, y = torch.randn(q, p, dtype=dtype), torch.randn(p, n, dtype=dtype)
        torch.matmul(x, y)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            torch.matmul(x, y)
            times.append(time.perf_counter() - t0)
        t = min(times)
        rows.append({"shape": f"[{q},{p}]x[{p},{n}]", "dtype": str(dtype).split(".")[-1],
                     "seconds": t, "gflops": 2 * q * p * n / t / 1e9})
        del x, y
    return {"setup": {"threads": a.threads}, "matmul": rows}


def part_scaling(a: argparse.Namespace) -> dict[str, Any]:
    """Time and peak memory against n_train: real MNIST (LR) and synthetic inputs."""
    rows = []
    ek = Method("ours EK-FAC", "ours", "EKFACInfluence", {"damping": 1e-3})
    kr = Method("kronfluence EK-FAC", "kronfluence", "ekfac")
    plan = [("lr", n) for n in a.real_sizes] + [("synthetic", n) for n in a.synthetic_sizes]
    for problem, n in plan:
        for m in (ek, kr):
            spec = {"problem": problem, "n_train": n, "threads": a.threads, "queries": 100,
                    "method": asdict(m), "n_query": 100}
            r = spawn(spec, a.timeout)
            r.pop("scores", None)
            rows.append({"problem": problem, "n_train": n, "label": m.label, **r})
            log(f"scaling {problem} n={n} {m.label}: {summary(r)}")
    return {"setup": {"threads": a.threads, "queries": 100}, "rows": rows}


def part_profile(a: argparse.Namespace) -> dict[str, Any]:
    """cProfile of our methods (``--profile-methods model:label,...``) in a fresh process."""
    out = []
    for item in a.profile_methods:
        model, label = item.split(":", 1)
        import mnist_setup as ms

        prob = ms.load_problem(model)
        m = next(x for x in methods(model, prob.damping, a.iterative_queries, False)
                 if x.label == label)
        spec = {"problem": model, "n_train": 5000, "threads": a.threads, "queries": m.queries,
                "method": asdict(m), "profile": True}
        with tempfile.TemporaryDirectory(prefix="prof-") as tmp:
            spec["out"] = str(Path(tmp) / "r.npz")
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout, cwd=ROOT)
            text = Path(spec["out"] + ".prof.txt").read_text() if p.returncode == 0 else \
                p.stderr[-2000:]
        out.append({"model": model, "label": label, "text": text})
        log(f"profiled {model} {label}")
    return {"setup": {"threads": a.threads}, "profiles": out}


# ============================================================================ report


def machine() -> dict[str, Any]:
    import influence_truth as it

    return it.machine()


def fmt_s(s: dict | None, spec: str = ".2f") -> str:
    if not s:
        return "–"
    if s["min"] == s["max"]:
        return format(s["median"], spec)
    return f"{s['median']:{spec}} ({s['min']:{spec}}–{s['max']:{spec}})"


def header(res: dict) -> list[str]:
    m = res["machine"]
    load = m.get("load_avg_at_start")
    return [f"Command: `{res['command']}`  ", f"Date: {res['date']}  ",
            f"Machine: {m['nproc']} × {m['cpu']}, {m['ram']} RAM, torch {m['torch']}; load "
            f"average at start {tuple(round(v, 2) for v in load) if load else '?'} (a shared "
            "machine: other jobs ran, so times are inflated upper bounds)  ",
            f"Part wall time: {res['wall_s']:.0f}s", ""] + [
                f"Rows merged from an earlier run: `{e.get('command')}` on {e.get('date')}, "
                f"load average {_load(e)}  " for e in res.get("earlier", [])] + [""]


def _load(e: dict) -> str:
    load = e.get("machine", {}).get("load_avg_at_start")
    return str(tuple(round(v, 2) for v in load)) if load else "?"


def md_model(res: dict, title: str) -> list[str]:
    s = res["setup"]
    lines = [f"## {title}", ""] + header(res) + [
        f"Damping λ = {s['damping']} for every method (kronfluence `damping_factor` = λ; dattri "
        f"`regularization`/`damping` = λ on the mean loss). {s['reps']} repetition(s)"
        f"{_slow_note(s, {r['label'] for r in res['rows']})}, "
        f"{s['threads']} torch thread(s) per process; each method in a fresh process. Times: "
        "median (min–max). Peak RSS: the worker process's `ru_maxrss` (includes Python, torch "
        "and the data: the baseline before the method ran is in the last column). LDS target: "
        f"{s['lds']}.", "",
        "| method | fit s | score s | total s | peak RSS MB | LDS | queries | RSS before MB "
        "| notes |", "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        note = r["note"]
        if r.get("run_date") != res["date"]:
            tag = "*earlier run, older code*" if r["lib"] == "ours" else "*earlier run*"
            note = tag + ("; " + note if note else "")
        if r["ok"] < r["runs"]:
            note = f"**{r['runs'] - r['ok']} of {r['runs']} runs failed**: " \
                   f"{'; '.join(r['errors'])}; " + note
        lds = "–" if r["lds"] is None else f"{r['lds']:.3f}"
        lines.append(f"| {r['label']} | {fmt_s(r['fit_s'])} | {fmt_s(r['score_s'])} | "
                     f"{fmt_s(r['total_s'])} | {fmt_s(r['peak_rss_mb'], '.0f')} | {lds} | "
                     f"{r['n_queries'] or '–'} | {fmt_s(r['base_rss_mb'], '.0f')} | "
                     f"{note.replace('|', '/')} |")
    listed = {m.label for m in methods(s["model"], s["damping"], s["iterative_queries"], False)}
    absent = sorted(listed - {r["label"] for r in res["rows"]})
    if s["model"] == "mlp":
        absent.append("dattri explicit (a dense 101,770² Hessian: about 41 GB in float32)")
    if absent:
        skipped = any(x in ("dattri CG 100 it", "dattri LiSSA") for x in absent)
        lines += ["", "Not run in this table: " + "; ".join(absent) + (
            " (dattri CG / LiSSA are skipped by `--skip-slow`: a full run takes several "
            "minutes each)." if skipped else "."), ""]
    return lines + [""] + md_targets(res)


def _slow_note(setup: dict, labels: set[str]) -> str:
    slow = setup.get("slow_reps", setup["reps"])
    if slow >= setup["reps"]:
        return ""
    return (f" ({slow} for the slow methods: {', '.join(sorted(SLOW & labels))}; each row's "
            "runs are its own)")


def _row(res: dict, label: str) -> dict | None:
    r = next((r for r in res["rows"] if r["label"] == label), None)
    return r if r and r["ok"] else None


def _pair(res: dict, ours: str, peer: str) -> str:
    a, b = _row(res, ours), _row(res, peer)
    if a is None or b is None:
        return f"| {ours} vs {peer} | not measured | | | |"
    ta, tb = a["total_s"]["median"], b["total_s"]["median"]
    la, lb = a["lds"], b["lds"]
    ma, mb = a["peak_rss_mb"]["median"], b["peak_rss_mb"]["median"]
    t_ok = ta <= 0.5 * tb
    l_ok = la is not None and lb is not None and la >= lb - 0.01
    m_ok = ma <= mb
    lds = "–" if la is None or lb is None else f"{la:.3f} vs {lb:.3f} {'met' if l_ok else 'MISSED'}"
    return (f"| {ours} vs {peer} | {ta:.1f} vs {tb:.1f} s (ratio {ta / tb:.2f}) "
            f"{'met' if t_ok else 'MISSED'} | {lds} | {ma:.0f} vs {mb:.0f} MB "
            f"{'met' if m_ok else 'MISSED'} |")


def md_targets(res: dict) -> list[str]:
    """The issue's targets, checked on the medians of this run."""
    lines = ["Targets (medians of this run; time target: ours ≤ half the peer's fit + score; "
             "LDS ≥ peer − 0.01; peak RSS ≤ the peer's):", "",
             "| pair | time | LDS | peak RSS |", "|---|---|---|---|"]
    lines += [_pair(res, "ours EK-FAC", "kronfluence EK-FAC"),
              _pair(res, "ours K-FAC", "kronfluence K-FAC"),
              _pair(res, "ours CG (GGN) 100 it", "dattri CG 100 it"),
              _pair(res, "ours CG (GGN) 100 it, EK-FAC preconditioned", "dattri CG 100 it"),
              *[_pair(res, r["label"], "dattri CG 100 it") for r in res["rows"]
                if r["name"] == "CGInfluence" and "100 it" not in r["label"]],
              _pair(res, "ours LiSSA (GGN)", "dattri LiSSA"),
              _pair(res, "ours Arnoldi r=100", "dattri Arnoldi r=100")]
    kr = _row(res, "kronfluence EK-FAC")
    if res["setup"]["model"] == "lr" and kr is not None:
        full = [r for r in res["rows"] if r["ok"] and r["lib"] == "ours" and r["lds"]
                and r["lds"] >= 0.90]
        budget = kr["total_s"]["median"]
        fast = [r for r in full if r["total_s"]["median"] <= budget]
        best = ", ".join(f"{r['label']} LDS {r['lds']:.3f} in {r['total_s']['median']:.1f} s"
                         f" ({r['n_queries']} queries)" for r in full) or "none"
        lines += ["", f"LR exact quality (LDS ≥ 0.90) within kronfluence EK-FAC's "
                      f"{budget:.1f} s: {'met' if fast else 'MISSED'} (ours at ≥ 0.90: {best})."]
    peers = [r["peak_rss_mb"]["median"] for r in res["rows"] if r["ok"] and r["lib"] != "ours"]
    if peers:
        lines += ["", f"Best (lowest) peer peak RSS in this table: {min(peers):.0f} MB."]
    return lines + [""]


def md_profile(res: dict) -> list[str]:
    lines = ["## Profiles", ""] + header(res)
    for p in res["profiles"]:
        lines += [f"**{p['model']}: {p['label']}** (cProfile, top entries by cumulative "
                  "time, fit then scores)", "", "```", p["text"].strip(), "```", ""]
    return lines


PARAMS = {"lr": 7850, "mlp": 101770}


def md_flops(res: dict, models: dict[str, dict]) -> list[str]:
    lines = ["## Scoring matmul: practical limit", ""] + header(res) + [
        "A plain `torch.matmul` of the scoring shape (500 queries × P parameters × 5,000 "
        "training examples, one thread) against the whole scoring step of the EK-FAC rows "
        "above (per-sample gradients + preconditioning + the matmul), as 2·q·P·n / score "
        "seconds:", "", "| shape | dtype | seconds | GFLOP/s |", "|---|---|---|---|"]
    for r in res["matmul"]:
        lines.append(f"| {r['shape']} | {r['dtype']} | {r['seconds']:.3f} | {r['gflops']:.1f} |")
    lines += ["", "| model | method | score s | effective GFLOP/s of the scoring step |",
              "|---|---|---|---|"]
    for name, mres in models.items():
        for label in ("ours EK-FAC", "kronfluence EK-FAC", "ours K-FAC", "kronfluence K-FAC"):
            r = _row(mres, label)
            if r is None or r["n_queries"] is None:
                continue
            t = r["score_s"]["median"]
            flop = 2 * r["n_queries"] * PARAMS[name] * 5000
            lines.append(f"| {name} | {label} | {t:.2f} | {flop / t / 1e9:.1f} |")
    return lines + [""]


def md_scaling(res: dict) -> list[str]:
    lines = ["## How cost grows with n_train", ""] + header(res) + [
        "100 queries; LR 784→10 (real MNIST: trained per size; synthetic: uniform random "
        "inputs and labels on the 5,000-example weights).", "",
        "| data | n_train | method | fit s | score s | peak RSS MB | status |",
        "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        ok = r["status"] == "ok"
        lines.append(f"| {r['problem']} | {r['n_train']} | {r['label']} | "
                     f"{r['fit_s'] if not ok else round(r['fit_s'], 2)} | "
                     f"{'–' if not ok else round(r['score_s'], 2)} | "
                     f"{'–' if not ok else round(r['peak_rss_mb'])} | "
                     f"{r['status']} {r.get('error') or ''} |")
    return lines + [""]


def md_speedup(res: dict) -> list[str]:
    s = res["setup"]
    lines = [f"## Before / after (ours only): revision {s['before_sha']} against the tree of "
             f"{res['date'][:10]}", ""] + header(res) + [
        f"Each method run once with the `unlearn` package of revision `{s['before_sha']}` "
        "(extracted by `git archive`) and once with the working tree, one after the other in "
        f"fresh processes, {s['threads']} torch thread(s); MNIST 5,000 train / 500 query, "
        "damping 1e-3. Peak RSS is the worker's `ru_maxrss` (Python, torch and the data "
        "included).", "",
        "| model | method | version | fit s | score s | total s | peak RSS MB | LDS | status |",
        "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        ok = r["status"] == "ok"
        lds = f"{r['lds']:.3f}" if ok and r.get("lds") is not None else "–"
        if ok:
            nums = (f"{r['fit_s']:.2f} | {r['score_s']:.2f} | {r['fit_s'] + r['score_s']:.2f} "
                    f"| {r['peak_rss_mb']:.0f}")
        else:
            nums = "– | – | – | –"
        lines.append(f"| {r['model']} | {r['label']} | {r['version']} | {nums} | {lds} | "
                     f"{r['status']} {r.get('error') or ''} |")
    return lines + [""]


def md_summary(res: dict[str, dict]) -> list[str]:
    """Issue 5's targets, from the rows of each model's latest run only."""
    lines = ["## Targets of issue 5 at a glance", "",
             "Medians of the latest run of each model table below (ours and peers "
             "interleaved in that run; rows kept from earlier runs are not used here). The "
             "machine is shared with other jobs, so absolute times are inflated; the ratios "
             "within one interleaved run are what these targets compare.", "",
             "| target | model | measured | met |", "|---|---|---|---|"]
    for key, title in (("lr", "LR"), ("mlp", "MLP")):
        if key not in res:
            continue
        fresh = {r["label"]: r for r in res[key]["rows"]
                 if r.get("run_date") == res[key]["date"] and r["ok"]}
        peers = [r for r in fresh.values() if r["lib"] != "ours"]
        best = min(peers, key=lambda r: r["peak_rss_mb"]["median"]) if peers else None
        for ours, peer in (("ours EK-FAC", "kronfluence EK-FAC"),
                           ("ours K-FAC", "kronfluence K-FAC")):
            a, b = fresh.get(ours), fresh.get(peer)
            if a is None or b is None:
                lines.append(f"| {ours} vs {peer} | {title} | not measured | – |")
                continue
            ta, tb = a["total_s"]["median"], b["total_s"]["median"]
            lines.append(f"| {ours} fit + score ≤ ½ {peer} | {title} | {ta:.1f} vs {tb:.1f} s "
                         f"(ratio {ta / tb:.2f}) | {'yes' if ta <= 0.5 * tb else 'no'} |")
            if a["lds"] is not None and b["lds"] is not None:
                ok = a["lds"] >= b["lds"] - 0.01
                lines.append(f"| {ours} LDS ≥ {peer} − 0.01 | {title} | {a['lds']:.3f} vs "
                             f"{b['lds']:.3f} | {'yes' if ok else 'no'} |")
            if best is not None:
                ma, mb = a["peak_rss_mb"]["median"], best["peak_rss_mb"]["median"]
                lines.append(f"| {ours} peak RSS ≤ best peer's | {title} | {ma:.0f} vs {mb:.0f} "
                             f"MB ({best['label']}) | {'yes' if ma <= mb else 'no'} |")
        b = fresh.get("dattri CG 100 it")
        fastest = None if b is None or b["lds"] is None else min(
            (r for r in fresh.values() if r["name"] == "CGInfluence" and r["lds"] is not None
             and r["lds"] >= b["lds"] - 0.01), key=lambda r: r["total_s"]["median"],
            default=None)
        for ours, peer, what in (("ours CG (GGN) 100 it", "dattri CG 100 it", "CG"),
                                 (fastest["label"] if fastest else "ours CG (GGN) 100 it",
                                  "dattri CG 100 it", "CG (fastest of ours)"),
                                 ("ours LiSSA (GGN)", "dattri LiSSA", "LiSSA"),
                                 ("ours Arnoldi r=100", "dattri Arnoldi r=100", "Arnoldi")):
            name = what.split(" ")[0]
            a, b = fresh.get(ours), fresh.get(peer)
            target = {"CG": " (100 iterations each)", "Arnoldi": " (no target in the issue)",
                      "CG (fastest of ours)": ": fastest of our CG rows at that LDS"}.get(what, "")
            target = f"ours {name} ≤ ½ dattri {name} at LDS ≥ dattri's − 0.01{target}"
            if a is None or b is None:
                ran = peer in {r["label"] for r in res[key]["rows"]}
                lines.append(f"| {target} | {title} | not measured (dattri "
                             f"{'failed' if ran else 'not run'}) | – |")
                continue
            ta, tb = a["total_s"]["median"], b["total_s"]["median"]
            lds_ok = a["lds"] is not None and b["lds"] is not None and a["lds"] >= b["lds"] - 0.01
            label = f"{a['label']}: " if what == "CG (fastest of ours)" else ""
            lines.append(f"| {target} | {title} | {label}{ta:.1f} vs {tb:.1f} s (ratio "
                         f"{ta / tb:.2f}), LDS {a['lds']:.3f} vs {b['lds']:.3f} | "
                         f"{'yes' if ta <= 0.5 * tb and lds_ok else 'no'} |")
        kr = fresh.get("kronfluence EK-FAC")
        if key == "lr" and kr is not None:
            budget = kr["total_s"]["median"]
            good = [r for r in fresh.values() if r["lib"] == "ours" and r["lds"] is not None
                    and r["lds"] >= 0.90 and r["n_queries"] == 500]
            fast = [r for r in good if r["total_s"]["median"] <= budget]
            shown = ", ".join(f"{r['label']} {r['lds']:.3f} in {r['total_s']['median']:.1f} s"
                              for r in good) or "none"
            lines.append(f"| ours LDS ≥ 0.90 (500 queries) within kronfluence EK-FAC's "
                         f"{budget:.1f} s | LR | {shown} | {'yes' if fast else 'no'} |")
    return lines + [""]


def write_report(extra: str = "") -> None:
    res = {p: json.loads((OUT / f"benchmark_{p}.json").read_text())
           for p in PARTS if (OUT / f"benchmark_{p}.json").exists()}
    lines = ["# Benchmark: ours vs kronfluence 1.0.1 and dattri 0.3.0", "",
             "Generated by `experiments/benchmark_peers.py` from `experiments/out/benchmark_"
             "*.json` (each section names its command, machine and date). Same trained "
             "weights, data and damping for everyone; scores in our convention (peers "
             "converted by `baselines/peers/`). MNIST t10k split 5,000 train / 500 query.", ""]
    if "lr" in res or "mlp" in res:
        lines += md_summary(res)
    notes = ROOT / "experiments" / "benchmark_notes.md"
    if notes.exists():  # the analysis written after reading these tables
        lines += [notes.read_text().strip(), ""]
    if "speedup" in res:
        lines += md_speedup(res["speedup"])
    if "lr" in res:
        lines += md_model(res["lr"], "Logistic regression 784→10 (float64)")
    if "mlp" in res:
        lines += md_model(res["mlp"], "MLP 784-128-10 (float32)")
    if "flops" in res:
        lines += md_flops(res["flops"], {k: res[k] for k in ("lr", "mlp") if k in res})
    if "scaling" in res:
        lines += md_scaling(res["scaling"])
    if "profile" in res:
        lines += md_profile(res["profile"])
    missing = [p for p in PARTS if p not in res]
    if missing:
        lines += ["## Not run", "", "Parts without results: " + ", ".join(missing) + ".", ""]
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text("\n".join(lines) + extra)
    log(f"wrote {DOC.relative_to(ROOT)}")


# ============================================================================ main


def merge(old: dict, new: dict) -> dict:
    """Replace the rows of re-run methods in ``old`` (keeping its order); keep the others,
    and record every command and date that contributed."""
    fresh = {r["label"]: r for r in new["rows"]}
    rows = [fresh.pop(r["label"], r) for r in old["rows"]] + list(fresh.values())
    earlier = old.get("earlier", []) + [{k: old[k] for k in ("command", "date", "machine")
                                         if k in old}]
    return {**new, "rows": rows, "earlier": earlier}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--all", action="store_true", help="run every part")
    for part in PARTS:
        p.add_argument(f"--{part}", action="store_true")
    p.add_argument("--report", action="store_true", help="only rebuild the markdown")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--slow-reps", type=int, default=1,
                   help="repetitions of the slow methods (dattri explicit / CG / LiSSA, TracIn, "
                        "CG); at most --reps")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--timeout", type=float, default=1800, help="seconds per method run")
    p.add_argument("--iterative-queries", type=int, default=50,
                   help="queries scored by the CG / LiSSA solvers (ours and dattri's)")
    p.add_argument("--skip-slow", action="store_true", help="skip dattri CG and LiSSA")
    p.add_argument("--only", default="", help="comma-separated label substrings")
    p.add_argument("--profile-methods", default="lr:ours CG (GGN) 100 it,mlp:ours EK-FAC",
                   help="model:label pairs profiled by --profile")
    p.add_argument("--before", default="c6e1eba",
                   help="git revision whose unlearn package --speedup compares against")
    p.add_argument("--speedup-models", default="mlp,lr", help="models of --speedup")
    p.add_argument("--real-sizes", default="1000,2000,5000,9000")
    p.add_argument("--synthetic-sizes", default="10000,30000,100000")
    a = p.parse_args(argv)
    a.only = tuple(o for o in a.only.split(",") if o)
    # labels may hold commas ("ours Exact (GGN, float32 build)"): split before "model:"
    a.profile_methods = [v for v in re.split(r",(?=(?:lr|mlp):)", a.profile_methods) if v]
    a.real_sizes = [int(v) for v in a.real_sizes.split(",") if v]
    a.speedup_models = [v for v in a.speedup_models.split(",") if v]
    a.synthetic_sizes = [int(v) for v in a.synthetic_sizes.split(",") if v]
    if a.reps < 1 or a.threads < 1 or a.iterative_queries < 1 or a.slow_reps < 1:
        p.error("--reps, --slow-reps, --threads and --iterative-queries must be >= 1")
    return a


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    if a.worker:
        worker(json.loads(a.worker))
        return
    parts = list(PARTS) if a.all else [q for q in PARTS if getattr(a, q)]
    if not parts and not a.report:
        sys.exit("choose --all, one or more of --speedup --lr --mlp --flops --scaling "
                 "--profile, or --report")
    if "mlp" in parts:
        check_cg_iterations()
    command = ".venv/bin/python experiments/benchmark_peers.py " + " ".join(
        shlex.quote(x) for x in (sys.argv[1:] if argv is None else argv))
    OUT.mkdir(parents=True, exist_ok=True)
    for part in parts:
        info, t0 = machine(), time.perf_counter()
        log(f"=== {part}")
        try:
            res = {"speedup": lambda: part_speedup(a),
                   "lr": lambda: part_model("lr", a), "mlp": lambda: part_model("mlp", a),
                   "flops": lambda: part_flops(a), "scaling": lambda: part_scaling(a),
                   "profile": lambda: part_profile(a)}[part]()
        except Exception:
            traceback.print_exc()
            continue
        res.update(command=command, date=dt.datetime.now(dt.timezone.utc).isoformat(
            timespec="seconds"), machine=info, wall_s=time.perf_counter() - t0)
        for row in res.get("rows", []):
            row.setdefault("run_date", res["date"])
        path = OUT / f"benchmark_{part}.json"
        if a.only and path.exists() and "rows" in res:  # merge a partial rerun
            res = merge(json.loads(path.read_text()), res)
        path.write_text(json.dumps(res, indent=1, default=str))
        write_report()
    write_report()


if __name__ == "__main__":
    main()
