"""Sharded fitting and scoring (2 gloo processes on CPU) equal a single process."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader

from unlearn.data import load_digits
from unlearn.influence import CGInfluence, EKFACInfluence, ExactInfluence
from unlearn.influence.distributed import fit_distributed, scores_distributed, shard_bounds
from unlearn.tasks import ClassificationTask

N_TRAIN = 301  # odd: the two shards differ in size (150 and 151)
N_QUERY = 23
BATCH = 64
TOP_K = 7


def _data():
    data = load_digits()
    return data.subset(range(N_TRAIN)), data.subset(range(N_TRAIN, N_TRAIN + N_QUERY))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 12), nn.Tanh(), nn.Linear(12, 10)).double()


def _run_all(train, query) -> dict[str, torch.Tensor]:
    """Fit and score with the distributed entry points (single process if no group)."""
    model, task = _model(), ClassificationTask()
    qloader = DataLoader(query, batch_size=BATCH)
    out: dict[str, torch.Tensor] = {}
    ekfac = EKFACInfluence(model, task, 1e-3, fisher="exact", progress=False)
    fit_distributed(ekfac, train, BATCH)
    out.update({f"ekfac.{k}": v for k, v in ekfac.factors.items()})
    out["ekfac.scores"] = scores_distributed(ekfac, qloader, train, BATCH)
    out["ekfac.top_values"], out["ekfac.top_index"] = scores_distributed(
        ekfac, qloader, train, BATCH, top_k=TOP_K)
    exact = ExactInfluence(model, task, 1e-3, curvature="ggn", progress=False)
    fit_distributed(exact, train, BATCH)
    out["exact.curvature"] = exact.factors["eigenvectors"] @ torch.diag(
        exact.factors["eigenvalues"]) @ exact.factors["eigenvectors"].T
    out["exact.scores"] = scores_distributed(exact, qloader, train, BATCH)
    out["n_train"] = torch.tensor([ekfac.n_train, exact.n_train])
    return out


def _worker(rank: int, world: int, port: int, outdir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        train, query = _data()
        torch.save(_run_all(train, query), Path(outdir) / f"rank{rank}.pt")
        cg = CGInfluence(_model(), ClassificationTask(), 1e-3, progress=False)
        try:
            fit_distributed(cg, train, BATCH)
        except NotImplementedError as err:
            (Path(outdir) / f"cg{rank}.txt").write_text(str(err))
    finally:
        dist.barrier()
        dist.destroy_process_group()
    # gloo's worker threads can abort the interpreter's teardown ("terminate called without
    # an active exception") after all work is done and saved; skip that teardown.
    os._exit(0)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> tuple[dict, list[dict], Path]:
    outdir = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(2, _free_port(), str(outdir)), nprocs=2, join=True)
    single = _run_all(*_data())
    ranks = [torch.load(outdir / f"rank{r}.pt") for r in range(2)]
    return single, ranks, outdir


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def test_ekfac_factors_equal_single_process(results):
    single, ranks, _ = results
    for r, got in enumerate(ranks):
        for key in [k for k in single if k.startswith("ekfac.") and "scores" not in k
                    and "top" not in k]:
            a, b = got[key], single[key]
            if key.endswith((".qa", ".qg")):  # eigenvectors: equal up to each column's sign
                a = a * torch.sign((a * b).sum(0, keepdim=True))
            assert _rel(a, b) < 1e-6, (r, key, _rel(a, b))


def test_scores_equal_single_process_in_column_order(results):
    single, ranks, _ = results
    assert single["ekfac.scores"].shape == (N_QUERY, N_TRAIN)
    for got in ranks:
        assert got["n_train"].tolist() == [N_TRAIN, N_TRAIN]
        assert _rel(got["ekfac.scores"], single["ekfac.scores"]) < 1e-6
        assert _rel(got["exact.curvature"], single["exact.curvature"]) < 1e-6
        assert _rel(got["exact.scores"], single["exact.scores"]) < 1e-6


def test_top_k_merge_equals_single_process(results):
    single, ranks, _ = results
    full = single["ekfac.scores"]
    want_values, want_index = full.topk(TOP_K, dim=1)
    for got in ranks:
        assert torch.equal(got["ekfac.top_index"], want_index)
        assert _rel(got["ekfac.top_values"], want_values) < 1e-6
        # both shards contribute to the merged lists
        assert (got["ekfac.top_index"] < 150).any() and (got["ekfac.top_index"] >= 150).any()


def test_unsupported_estimator_raises_clearly(results):
    _, _, outdir = results
    for r in range(2):
        assert "fit(full_train_loader)" in (outdir / f"cg{r}.txt").read_text()


def test_shard_bounds_cover_everything_once():
    for n, w in [(301, 2), (10, 3), (7, 7), (1000, 8)]:
        bounds = [shard_bounds(n, w, r) for r in range(w)]
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        sizes = [b - a for a, b in bounds]
        assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="rank 2"):
        shard_bounds(10, 2, 2)


def test_bad_loader_options_are_rejected():
    train, _ = _data()
    est = EKFACInfluence(_model(), ClassificationTask(), progress=False)
    with pytest.raises(ValueError, match="shuffle"):
        fit_distributed(est, train, BATCH, shuffle=True)
    with pytest.raises(ValueError, match="batch_size"):
        fit_distributed(est, train, 0)
