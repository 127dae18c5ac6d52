"""Recommendation deletion requests through the ledger: submit (by user, pairs or ids),
apply with UnlearnRec, certify against retrained LightGCNs."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from rec_fixtures import CONFIG, community_graph

from baselines.recommend import RetrainRec
from unlearn.audit.recommend import RecCertificate, certify_recommendation, paired_auc_se
from unlearn.ledger import Ledger
from unlearn.recommend import InteractionGraph, embeddings, score_pairs, train_lightgcn
from unlearn.recommend.protocol import forget_request
from unlearn.recommend.requests import (
    apply_requests,
    certify_requests,
    remaining_graph,
    submit_interactions,
    submit_pairs,
    submit_user,
)
from unlearn.removal.recommend import UnlearnRec, UnlearnRecConfig

ENCODER = UnlearnRecConfig(pretrain_steps=30, finetune_steps=30, batch_size=256, hidden=16,
                           lambda_unlearn=3.0, lr=0.02, finetune_lr=0.02, contrast_nodes=32,
                           unlearn_margin=0.5)



@pytest.fixture(scope="module")
def graph() -> InteractionGraph:
    return community_graph()


@pytest.fixture(scope="module")
def model(graph):
    return train_lightgcn(graph, CONFIG)


@pytest.fixture
def ledger(tmp_path):
    with Ledger(tmp_path / "ledger.db", models=tmp_path / "models") as led:
        yield led


def test_submit_validates_against_the_graph(ledger, graph):
    with pytest.raises(ValueError, match="unknown user"):
        submit_user(ledger, graph, graph.n_users, requester="x", reason="r")
    with pytest.raises(TypeError, match="int"):
        submit_user(ledger, graph, 1.5, requester="x", reason="r")
    with pytest.raises(ValueError, match="unknown item"):
        submit_pairs(ledger, graph, [(0, graph.n_items)], requester="x", reason="r")
    u, i = (int(v) for v in graph.test_pairs()[0])
    with pytest.raises(KeyError, match="not training interactions"):
        submit_pairs(ledger, graph, [(u, i)], requester="x", reason="r")
    with pytest.raises(ValueError, match="empty"):
        submit_pairs(ledger, graph, [], requester="x", reason="r")
    with pytest.raises(ValueError, match="empty"):
        submit_interactions(ledger, graph, [], requester="x", reason="r")
    with pytest.raises(KeyError, match="unknown interaction"):
        submit_interactions(ledger, graph, [10**6], requester="x", reason="r")
    assert ledger.list() == []  # nothing was recorded
    req = submit_user(ledger, graph, 3, requester="user-3", reason="erase me")
    assert list(req.ids) == graph.user_interaction_ids(3).tolist()
    pair = graph.train_pairs()[0].tolist()
    req2 = submit_pairs(ledger, graph, [pair], requester="u", reason="one rating")
    assert list(req2.ids) == graph.ids_of_pairs([pair[0]], [pair[1]]).tolist()
    # the same request twice is one request
    again = submit_user(ledger, graph, 3, requester="user-3", reason="erase me")
    assert again.id == req.id and len(ledger.list()) == 2


def test_apply_then_certify(ledger, graph, model, tmp_path):
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    submit_user(ledger, graph, 5, requester="user-5", reason="erase me")
    pair_ids = graph.train_ids[graph.interactions[graph.train_ids, 0] == 20][:2]
    submit_interactions(ledger, graph, pair_ids, requester="user-20", reason="two ratings")
    method = UnlearnRec(ENCODER)
    report = apply_requests(ledger, graph, model, method)
    assert report.request_ids == [1, 2] and report.model_version == 2
    assert report.pretrain_seconds > 0 and report.seconds > 0
    forgotten = forget_request(graph, users=[5], interactions=pair_ids)
    assert sorted(ledger.forgotten_ids()) == forgotten.tolist()
    assert [r.state for r in ledger.list()] == ["applied", "applied"]
    for k, v in model.state_dict().items():  # the caller's model is untouched
        assert torch.equal(v, weights[k])
    # the committed weights are the unlearned model: deleted pairs now score low
    remaining = remaining_graph(ledger, graph)
    assert remaining.n_train == graph.n_train - len(forgotten)
    new = type(model)(model.num_nodes, model.embedding_dim, model.num_layers)
    new.load_state_dict(ledger.load_model(report.model_version))
    deleted = graph.pairs(forgotten)
    assert float(score_pairs(new, remaining, deleted).mean()) < float(
        score_pairs(model, graph, deleted).mean()) - 1.0
    events = [e for e in ledger.events(1) if e.kind == "applied"]
    assert events[0].data["details"]["method"] == "unlearnrec"

    out = tmp_path / "certificate.json"
    cert = certify_requests(ledger, graph, model, RetrainRec(CONFIG), seeds=(0, 1, 2), out=out,
                            certify_failed=True, cache_dir=tmp_path / "refs")
    data = json.loads(out.read_text())
    assert data["schema"] == "unlearn.rec-certificate/1"
    assert {c["name"] for c in data["checks"]} == {"recall@20", "ndcg@20", "deleted_gap",
                                                   "membership_auc"}
    assert len(data["references"]["recall@20"]) == 3
    assert data["cost"]["removal_seconds"] == pytest.approx(report.seconds)
    assert data["cost"]["speedup"] > 0 and data["cost"]["pretrain_seconds"] > 0
    assert [t["state"] for t in data["timeline"]] == ["certified", "certified"]
    assert [r.state for r in ledger.list()] == ["certified", "certified"]
    assert RecCertificate.from_json(out).passed == cert.passed
    lines = cert.summary().splitlines()
    assert lines[0].startswith("recommendation certificate: " + ("PASS" if cert.passed else "FAIL"))
    assert [ln.split()[1] for ln in lines[1:5]] == [c.name for c in cert.checks]
    assert "x" in lines[5] and "retraining" in lines[5]  # the cost line
    # the references were cached: certifying again retrains nothing
    again = certify_recommendation(new, graph, forgotten, references=RetrainRec(CONFIG),
                                   seeds=(0, 1, 2), cache_dir=tmp_path / "refs")
    assert again.config["cached"] == [True, True, True]
    assert again.metrics == cert.metrics
    assert ledger.verify().ok


def test_second_batch_removes_only_new_ids(ledger, graph, model):
    method = UnlearnRec(ENCODER, pretrain_steps=2, finetune_steps=2)
    submit_user(ledger, graph, 8, requester="user-8", reason="erase me")
    first = apply_requests(ledger, graph, model, method)
    ids = graph.user_interaction_ids(8)
    # a request overlapping the forgotten user plus one new interaction of user 9
    extra = graph.user_interaction_ids(9)[:1]
    submit_interactions(ledger, graph, torch.cat([ids[:2], extra]), requester="x", reason="r")
    second = apply_requests(ledger, graph, model, method)
    assert second.n_forget == 1 and second.model_version == first.model_version + 1
    assert second.result.details["n_forget"] == 1
    # nothing pending: an empty batch changes nothing
    assert apply_requests(ledger, graph, model, method).request_ids == []
    with pytest.raises(KeyError, match="no request 99"):
        certify_requests(ledger, graph, model, RetrainRec(CONFIG), request_ids=[99])
    submit_user(ledger, graph, 11, requester="u", reason="r")  # pending, not applied
    with pytest.raises(ValueError, match="only applied requests"):
        certify_requests(ledger, graph, model, RetrainRec(CONFIG), request_ids=[3])


def test_failing_method_marks_the_requests_failed(ledger, graph, model):
    class Broken:
        name = "broken"

        def unlearn(self, model, graph, ids):
            raise RuntimeError("boom")

    submit_user(ledger, graph, 2, requester="u", reason="r")
    with pytest.raises(RuntimeError, match="boom"):
        apply_requests(ledger, graph, model, Broken())
    assert ledger.get(1).state == "failed" and "boom" in ledger.get(1).state_reason


def test_certificate_needs_three_references(graph, model):
    forget = graph.user_interaction_ids(4)
    with pytest.raises(ValueError, match="at least 3"):
        certify_recommendation(model, graph, forget, references=[model, model])
    with pytest.raises(ValueError, match="at least 3"):
        certify_recommendation(model, graph, forget, references=RetrainRec(CONFIG), seeds=[0])
    with pytest.raises(KeyError):
        certify_recommendation(model, graph, [10**6], references=[model] * 3)


def _delong_brute(d, n, refs):
    """The paired DeLong variance from explicit pairwise comparisons (small inputs)."""
    def comps(dd, nn):
        m = (dd[:, None] > nn[None, :]).double() + 0.5 * (dd[:, None] == nn[None, :]).double()
        return m.mean(1), m.mean(0)
    v10, v01 = comps(d, n)
    r = [comps(rd, rn) for rd, rn in refs]
    v10 = v10 - sum(x[0] for x in r) / len(r)
    v01 = v01 - sum(x[1] for x in r) / len(r)
    return float((v10.var() / len(d) + v01.var() / len(n)).sqrt())


def test_paired_auc_se_matches_delong_and_shrinks_with_more_pairs():
    g = torch.Generator().manual_seed(0)
    d, n = torch.randn(15, generator=g) + 1.0, torch.randn(40, generator=g).round()
    refs = [(d + 0.5 * torch.randn(15, generator=g), n + torch.randn(40, generator=g).round())
            for _ in range(3)]
    assert paired_auc_se(d, n, *zip(*refs)) == pytest.approx(_delong_brute(d, n, refs))
    # the same model as every reference: no difference, no error
    assert paired_auc_se(d, n, [d] * 3, [n] * 3) == pytest.approx(0.0, abs=1e-7)

    def noisy(k):  # references = the model's scores plus independent noise, k deleted pairs
        gen = torch.Generator().manual_seed(k)
        dd, nn = torch.randn(k, generator=gen) + 1.0, torch.randn(2000, generator=gen)
        return paired_auc_se(dd, nn, [dd + torch.randn(k, generator=gen) for _ in range(3)],
                             [nn + torch.randn(2000, generator=gen) for _ in range(3)])
    assert noisy(20) > 2 * noisy(500)
    with pytest.raises(ValueError, match="at least 2"):
        paired_auc_se(d[:1], n, [d[:1]], [n])


def test_membership_band_catches_over_forgetting_of_a_small_request(graph, model):
    # one whole user and four single interactions of others, like the ledger demo
    forget = forget_request(graph, users=[5], interactions=graph.train_ids[
        graph.interactions[graph.train_ids, 0] == 20][:4])
    retrain = RetrainRec(CONFIG)
    refs = [retrain.unlearn(model, graph, forget).model] + [
        type(retrain)(CONFIG.__class__(**{**CONFIG.to_dict(), "seed": s})).unlearn(
            model, graph, forget).model for s in (1, 2)]
    other = type(retrain)(CONFIG.__class__(**{**CONFIG.to_dict(), "seed": 7})).unlearn(
        model, graph, forget).model
    cert = certify_recommendation(other, graph, forget, references=refs)
    mia = next(c for c in cert.checks if c.name == "membership_auc")
    assert mia.passed and cert.config["membership_auc_se"] > 0  # another retrained model
    # over-forgetting: the deleted user's embedding points away from its deleted items, so
    # their pairs score far below random ones (what the ledger demo's previous default did)
    flipped = copy.deepcopy(other)
    _, items = embeddings(other, graph.without(forget))
    liked = items[graph.pairs(graph.user_interaction_ids(5))[:, 1]].mean(0)
    with torch.no_grad():
        flipped.embedding.weight[5] = -10.0 * liked / liked.norm()
    cert = certify_recommendation(flipped, graph, forget, references=refs)
    mia = next(c for c in cert.checks if c.name == "membership_auc")
    assert not mia.passed and mia.value < mia.low
    # the sampling-error term only ever widens the band
    narrow = certify_recommendation(flipped, graph, forget, references=refs, auc_z=0.0)
    nm = next(c for c in narrow.checks if c.name == "membership_auc")
    assert nm.low >= mia.low
    # where auc_z standard errors exceed k reference spreads and the floor, they set the band
    wide = certify_recommendation(other, graph, forget, references=refs, auc_z=10.0)
    wm = next(c for c in wide.checks if c.name == "membership_auc")
    se = wide.config["membership_auc_se"]
    assert 10.0 * se > max(3.0 * wm.ref_std, 0.05)
    assert wm.high - wm.ref_mean == pytest.approx(10.0 * se)
    assert wm.ref_mean - wm.low == pytest.approx(10.0 * se)
    with pytest.raises(ValueError, match="auc_z"):
        certify_recommendation(flipped, graph, forget, references=refs, auc_z=-1.0)
