"""Recommendation deletion requests through the ledger: submit (by user, pairs or ids),
apply with UnlearnRec, certify against retrained LightGCNs."""

from __future__ import annotations

import json

import pytest
import torch
from rec_fixtures import CONFIG, community_graph

from baselines.recommend import RetrainRec
from unlearn.audit.recommend import RecCertificate, certify_recommendation
from unlearn.ledger import Ledger
from unlearn.recommend import InteractionGraph, score_pairs, train_lightgcn
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
