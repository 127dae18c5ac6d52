"""The recommendation stack on a CUDA device: LightGCN training, the symmetric sparse product,
UnlearnRec and the forgetting metrics give what they give on the CPU. Skipped without a GPU
(CI has none; run on a GPU machine with ``pytest tests/test_recommend_cuda.py``)."""

from __future__ import annotations

import copy

import pytest
import torch
from rec_fixtures import CONFIG, community_graph

from unlearn.recommend import fit_bpr, forgetting_report, make_lightgcn, train_lightgcn
from unlearn.recommend.protocol import forget_request
from unlearn.recommend.sparse import symmetric_matmul
from unlearn.removal.recommend import UnlearnRec, UnlearnRecConfig, normalized_adjacency

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SMALL = UnlearnRecConfig(pretrain_steps=20, finetune_steps=3, batch_size=256, hidden=16,
                         contrast_nodes=32)


@pytest.fixture(scope="module")
def graph():
    return community_graph()


def test_symmetric_product_gradients_on_cuda():
    users = torch.tensor([0, 0, 1, 2, 2, 3])
    items = torch.tensor([0, 1, 1, 0, 2, 2])
    adj = normalized_adjacency(users, items, 4, 7, torch.float64).to("cuda")
    x = torch.randn(7, 3, dtype=torch.float64, device="cuda", requires_grad=True)
    g_mine, = torch.autograd.grad(symmetric_matmul(adj, x).pow(2).sum(), x)
    g_dense, = torch.autograd.grad((adj.to_dense() @ x).pow(2).sum(), x)
    assert torch.allclose(g_mine, g_dense)


def test_training_on_cuda_matches_the_cpu(graph):
    cpu = make_lightgcn(graph, CONFIG.dim, CONFIG.num_layers, CONFIG.seed)
    gpu = copy.deepcopy(cpu).to("cuda")
    kw = {"epochs": 5, "lr": CONFIG.lr, "batch_size": CONFIG.batch_size, "seed": 1}
    loss_cpu, loss_gpu = fit_bpr(cpu, graph, **kw), fit_bpr(gpu, graph, **kw)
    assert gpu.embedding.weight.is_cuda
    assert loss_gpu == pytest.approx(loss_cpu, rel=1e-3)
    assert torch.allclose(gpu.embedding.weight.cpu(), cpu.embedding.weight, atol=1e-4)


def test_train_lightgcn_on_cuda_matches_the_cpu(graph):
    cpu = train_lightgcn(graph, CONFIG, epochs=5)
    gpu = train_lightgcn(graph, CONFIG, epochs=5, device="cuda")
    assert gpu.embedding.weight.is_cuda
    assert torch.allclose(gpu.embedding.weight.cpu(), cpu.embedding.weight, atol=1e-4)


def test_unlearnrec_on_cuda_matches_the_cpu(graph):
    model = train_lightgcn(graph, CONFIG)
    forget = torch.cat([forget_request(graph, users=[4]), graph.train_ids[::17]]).unique()
    results = {}
    for device in ("cpu", "cuda"):
        m = copy.deepcopy(model).to(device)
        res = UnlearnRec(SMALL).unlearn(m, graph, forget)
        assert res.model.embedding.weight.device.type == device
        assert res.details["reset_users"] >= 1
        results[device] = res
    a = results["cpu"].model.embedding.weight
    b = results["cuda"].model.embedding.weight.cpu()
    assert torch.allclose(a, b, atol=1e-3), float((a - b).abs().max())
    remaining = graph.without(forget)
    rep_cpu = forgetting_report(results["cpu"].model, remaining, forget)
    rep_gpu = forgetting_report(results["cuda"].model, remaining, forget)
    for key in ("recall@20", "deleted_mean", "never_seen_mean", "auc_vs_never_seen"):
        assert rep_gpu[key] == pytest.approx(rep_cpu[key], abs=1e-3), key


def test_an_encoder_pretrained_on_the_cpu_serves_a_cuda_model(graph):
    model = train_lightgcn(graph, CONFIG)
    method = UnlearnRec(SMALL)
    method.pretrain(model, graph)
    res = method.unlearn(copy.deepcopy(model).to("cuda"), graph, graph.train_ids[:5])
    assert res.details["pretrain_seconds"] == 0.0
    assert bool(torch.isfinite(res.model.embedding.weight).all())
