"""UnlearnRec's influence encoder on a small synthetic bipartite graph, judged by scores
(deleted pairs against never-seen pairs, retained pairs against the original model) and by
the retrained model."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from rec_fixtures import CONFIG, community_graph

from baselines.recommend import RetrainRec
from unlearn.recommend import (
    InteractionGraph,
    forgetting_report,
    make_lightgcn,
    never_seen_pairs,
    score_pairs,
    train_lightgcn,
)
from unlearn.recommend.protocol import forget_request
from unlearn.removal.recommend import (
    UnlearnRec,
    UnlearnRecConfig,
    as_rec_edges,
    lightgcn_embeddings,
    normalized_adjacency,
    unlearn_hinge,
)

ENCODER = UnlearnRecConfig(pretrain_steps=40, finetune_steps=40, batch_size=256, hidden=16,
                           lambda_unlearn=3.0, lambda_preserve=1.0, lr=0.02, finetune_lr=0.02,
                           contrast_nodes=32, unlearn_margin=0.5)



@pytest.fixture(scope="module")
def graph() -> InteractionGraph:
    return community_graph()


@pytest.fixture(scope="module")
def model(graph):
    return train_lightgcn(graph, CONFIG)


@pytest.fixture(scope="module")
def method(model, graph):
    m = UnlearnRec(ENCODER)
    m.pretrain(model, graph)
    return m


def _scores(model, graph, pairs):
    return score_pairs(model, graph, pairs)


def _corr(a, b) -> float:
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def _auc(pos, neg) -> float:
    return float((pos[:, None] > neg[None, :]).double().mean())


def test_propagation_matches_torch_geometric(model, graph):
    e = as_rec_edges(graph)
    adj = normalized_adjacency(e.users, e.items, e.num_users, e.num_nodes)
    mine = lightgcn_embeddings(model, model.embedding.weight, adj)
    theirs = model.get_embedding(graph.edge_index())
    assert torch.allclose(mine, theirs, atol=1e-5)


def test_deleted_edges_fall_below_never_seen_pairs_while_the_rest_holds(model, graph, method):
    forget = graph.train_ids[torch.randperm(graph.n_train,
                                            generator=torch.Generator().manual_seed(3))[:12]]
    remaining = graph.without(forget)
    weights = copy.deepcopy(model.state_dict())
    result = method.unlearn(model, graph, forget)
    new = result.model
    deleted = graph.pairs(forget)
    never = never_seen_pairs(remaining, 300, seed=0)
    kept = remaining.train_pairs()
    before = float(_scores(model, graph, deleted).mean())
    after = float(_scores(new, remaining, deleted).mean())
    assert before > float(_scores(model, graph, never).mean()) + 1.0  # it was remembered
    assert after < float(_scores(new, remaining, never).mean())  # now below random non-edges
    # the rest holds, judged against retraining (the truth): the retained pairs keep their
    # scores about as well as a retrained model does, and still rank far above random pairs
    retrained = RetrainRec(CONFIG).unlearn(model, graph, forget).model
    old_kept = _scores(model, graph, kept)
    corr_new = _corr(old_kept, _scores(new, remaining, kept))
    corr_ret = _corr(old_kept, _scores(retrained, remaining, kept))
    assert corr_new > 0.6 and corr_new > corr_ret - 0.15
    kept_auc = _auc(_scores(new, remaining, kept), _scores(new, remaining, never))
    kept_auc_ret = _auc(_scores(retrained, remaining, kept), _scores(retrained, remaining, never))
    assert kept_auc > kept_auc_ret - 0.05
    for k, v in model.state_dict().items():  # the input model is untouched
        assert torch.equal(v, weights[k])
    assert result.details["n_forget"] == len(forget)
    assert result.details["pretrain_seconds"] == 0.0  # pre-trained by the fixture
    assert result.details["pretrained_on_this_model"] is True
    assert result.seconds > 0


def test_forget_a_whole_user(model, graph, method):
    user = 7
    forget = forget_request(graph, users=[user])
    remaining = graph.without(forget)
    # the encoder's own answer (without the reset of the emptied user, tested below)
    new = method.with_request_settings(reset_emptied_users=False).unlearn(
        model, graph, forget).model
    deleted = graph.pairs(forget)
    mine = torch.full((graph.n_items,), user)
    never = never_seen_pairs(remaining, 300, seed=1)
    assert float(_scores(new, remaining, deleted).mean()) < float(
        _scores(new, remaining, never).mean())
    # the user's recommendations no longer favour their deleted items over the other items
    all_items = torch.stack([mine, torch.arange(graph.n_items)], 1)
    s = _scores(new, remaining, all_items)
    assert float(s[deleted[:, 1]].mean()) < float(s.mean())
    # other users' scores stay close to the original model's: they move far less than the
    # deleted pairs did
    others = remaining.train_pairs()
    others = others[others[:, 0] != user]
    old, now = _scores(model, graph, others), _scores(new, remaining, others)
    assert _corr(old, now) > 0.75
    drop = float(_scores(model, graph, deleted).mean() - _scores(new, remaining, deleted).mean())
    assert float((now - old).abs().mean()) < 0.25 * drop


def test_first_request_pretrains_outside_the_timer(model, graph):
    m = UnlearnRec(ENCODER, pretrain_steps=3, finetune_steps=1)
    forget = graph.user_interaction_ids(2)
    result = m.unlearn(model, graph, forget)
    assert result.details["pretrain_seconds"] > 0
    assert result.details["pretrain_seconds_total"] == m.pretrain_report.seconds
    assert m.pretrain_report.steps == 3
    again = m.unlearn(model, graph, forget)
    assert again.details["pretrain_seconds"] == 0.0


def test_bad_requests_are_named(model, graph):
    m = UnlearnRec(ENCODER, pretrain_steps=1)
    with pytest.raises(ValueError, match="empty"):
        m.unlearn(model, graph, [])
    with pytest.raises(KeyError, match="unknown interaction"):
        m.unlearn(model, graph, [10**6])
    held_out = int(graph.test_ids[0])
    with pytest.raises(KeyError, match="held-out"):
        m.unlearn(model, graph, [held_out])
    gone = graph.without(graph.train_ids[:1])
    with pytest.raises(KeyError, match="never there or already removed"):
        m.unlearn(model, gone, graph.train_ids[:1])
    with pytest.raises(ValueError, match="unknown user"):
        forget_request(graph, users=[graph.n_users])
    with pytest.raises(ValueError, match="unknown item"):
        graph.ids_of_pairs([0], [graph.n_items + 3])
    with pytest.raises(KeyError, match="not training interactions"):
        never = never_seen_pairs(graph, 1, seed=0)
        graph.ids_of_pairs(never[:, 0], never[:, 1])
    with pytest.raises(ValueError, match="every|all"):
        m.unlearn(model, graph, graph.train_ids)
    assert m.encoder is None  # nothing was pre-trained for a bad request


def test_wrong_model_and_config(graph, model):
    small = community_graph(n_users=10, n_items=12)
    with pytest.raises(ValueError, match="nodes"):
        UnlearnRec(ENCODER).unlearn(model, small, small.train_ids[:2])
    with pytest.raises(TypeError, match="LightGCN"):
        UnlearnRec(ENCODER).unlearn(torch.nn.Linear(2, 2), graph, graph.train_ids[:2])
    with pytest.raises(ValueError, match="drop_rate"):
        UnlearnRecConfig(drop_rate=1.5)
    with pytest.raises(ValueError, match="finetune_steps"):
        UnlearnRecConfig(finetune_steps=-1)
    with pytest.raises(ValueError, match="unlearn_reference"):
        UnlearnRecConfig(unlearn_reference="item")
    with pytest.raises(ValueError, match="unlearn_floor"):
        UnlearnRecConfig(unlearn_floor=0.0)
    with pytest.raises(ValueError, match="unlearn_negatives"):
        UnlearnRecConfig(unlearn_negatives=0)
    with pytest.raises(ValueError, match="reset_emptied_users"):
        UnlearnRecConfig(reset_emptied_users="yes")
    with pytest.raises(ValueError, match="finetune_steps"):
        UnlearnRec(ENCODER).with_request_settings(finetune_steps=-2)


def test_unlearn_hinge_leaves_low_pairs_alone_and_pulls_up_the_far_below():
    scores = torch.tensor([3.0, 0.5, -5.0], requires_grad=True)
    loss = unlearn_hinge(scores, torch.tensor(1.0))
    loss.backward()
    assert float(loss) == pytest.approx(2.0 / 3.0)  # only the pair above its level counts
    assert scores.grad.tolist() == pytest.approx([1 / 3, 0.0, 0.0])
    scores.grad = None
    # margin 1: the pair at 0.5 is now too high; floor 2: the pair at -5 is too low
    loss = unlearn_hinge(scores, torch.tensor([1.0, 1.0, 1.0]), margin=1.0, floor=2.0)
    loss.backward()
    assert float(loss) == pytest.approx((3.0 + 0.5) / 3 + 4.0 / 3)
    assert scores.grad.tolist() == pytest.approx([1 / 3, 1 / 3, -1 / 3])


def test_the_floor_stops_a_deleted_user_from_sinking_below_random_pairs(model, graph):
    # margin 0 and a strong weight: without a floor the deleted user's pairs sink well below
    # random pairs (over-forgetting); with a floor of 0.1 they stop just below them
    forget = forget_request(graph, users=[7])
    remaining = graph.without(forget)
    never = never_seen_pairs(remaining, 300, seed=1)
    deleted = graph.pairs(forget)
    means = {}
    for floor in (None, 0.1):
        cfg = replace(ENCODER, unlearn_reference="global", unlearn_margin=0.0,
                      unlearn_floor=floor, lambda_unlearn=10.0, reset_emptied_users=False)
        new = UnlearnRec(cfg).unlearn(model, graph, forget).model
        level = float(_scores(new, remaining, never).mean())
        means[floor] = float(_scores(new, remaining, deleted).mean()) - level
    assert means[None] < -0.3
    assert -0.25 < means[0.1] < 0.05


def test_per_user_reference_puts_deleted_pairs_below_their_users_random_items(model, graph):
    forget = graph.train_ids[torch.randperm(graph.n_train,
                                            generator=torch.Generator().manual_seed(5))[:12]]
    remaining = graph.without(forget)
    cfg = replace(ENCODER, unlearn_reference="user", unlearn_floor=1.0)
    new = UnlearnRec(cfg).unlearn(model, graph, forget).model
    before = forgetting_report(model, graph, forget, n_random=300)
    after = forgetting_report(new, remaining, forget, n_random=300)
    assert before["below_user_never_seen"] == 0.0  # all were remembered
    assert after["below_user_never_seen"] >= 0.75
    assert after["recall@20"] > before["recall@20"] - 0.1


def test_the_unlearning_level_is_per_pair_with_the_user_reference(model, graph, monkeypatch):
    # "user": each deleted pair is compared with its own user's random items (one level per
    # pair, varying with the user); "global": one level, the random pairs' mean
    import unlearn.removal.recommend as rr

    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def spy(deleted, level, margin=0.0, floor=None):
        seen[reference] = (deleted.detach(), level.detach())
        return unlearn_hinge(deleted, level, margin, floor)

    monkeypatch.setattr(rr, "unlearn_hinge", spy)
    forget = forget_request(graph, users=[3, 17])
    for reference in ("user", "global"):
        cfg = replace(ENCODER, unlearn_reference=reference, pretrain_steps=2, finetune_steps=2)
        UnlearnRec(cfg).unlearn(model, graph, forget)
    deleted, level = seen["user"]
    assert level.shape == deleted.shape and float(level.std()) > 0
    assert seen["global"][1].ndim == 0


def test_float64_model(graph, model):
    double = copy.deepcopy(model).double()
    forget = graph.user_interaction_ids(3)
    result = UnlearnRec(ENCODER, pretrain_steps=2, finetune_steps=2).unlearn(double, graph,
                                                                            forget)
    assert result.model.embedding.weight.dtype == torch.float64
    assert result.details["changed_nodes"] > 0


def test_untouched_nodes_keep_their_embeddings(graph, model, method):
    forget = graph.user_interaction_ids(11)[:2]
    new = method.unlearn(model, graph, forget).model
    pairs = graph.pairs(forget)
    touched = torch.zeros(graph.num_nodes, dtype=torch.bool)
    touched[pairs[:, 0]] = True
    touched[pairs[:, 1] + graph.n_users] = True
    moved = (new.embedding.weight - model.embedding.weight).abs().sum(1) > 0
    assert bool(moved[touched].all()) and not bool(moved[~touched].any())


def test_request_settings_share_the_pretraining(model, graph, method):
    forget = graph.user_interaction_ids(3)
    before = {k: v.clone() for k, v in method.encoder.state_dict().items()}
    none = method.with_request_settings(finetune_steps=0)
    assert none.encoder is method.encoder and none.config.finetune_steps == 0
    assert none.config.lambda_unlearn == method.config.lambda_unlearn
    assert none.is_pretrained_for(model)
    r0 = none.unlearn(model, graph, forget)
    assert r0.details["pretrain_seconds"] == 0.0 and r0.details["finetune_steps"] == 0
    again = method.with_request_settings(finetune_steps=0).unlearn(model, graph, forget)
    assert torch.equal(r0.model.embedding.weight, again.model.embedding.weight)
    tuned = method.with_request_settings(finetune_steps=5).unlearn(model, graph, forget)
    assert not torch.equal(r0.model.embedding.weight, tuned.model.embedding.weight)
    # the shared encoder is never changed by a request's fine-tuning
    for k, v in method.encoder.state_dict().items():
        assert torch.equal(v, before[k])
    with pytest.raises(ValueError, match="lambda_unlearn"):
        method.with_request_settings(lambda_unlearn=2.0)


def _item_with_one_user(graph):
    """An item with exactly one training user, and that user."""
    pairs = graph.train_pairs()
    counts = torch.bincount(pairs[:, 1], minlength=graph.n_items)
    item = int(torch.nonzero(counts == 1)[0])
    return item, int(pairs[pairs[:, 1] == item, 0][0])


def test_a_user_left_without_edges_gets_a_fresh_initialisation(model, graph, method):
    item, user = _item_with_one_user(graph)
    forget = forget_request(graph, users=[user])
    result = method.unlearn(model, graph, forget)
    weight = result.model.embedding.weight
    n = weight.shape[0]
    row = weight[user]
    # a draw of LightGCN's own initialisation: within the range of a freshly made model's
    # rows, spread over it, and nothing like the trained row (nor the encoder's output)
    init = make_lightgcn(graph, CONFIG.dim, CONFIG.num_layers, seed=123).embedding.weight
    assert float(row.abs().max()) <= float(init.abs().max()) * 1.001
    assert float(row.std()) > 0.5 * float(init.std())
    assert result.details["reset_users"] == 1
    encoder_only = method.with_request_settings(reset_emptied_users=False).unlearn(
        model, graph, forget)
    assert encoder_only.details["reset_users"] == 0
    assert not torch.allclose(row, encoder_only.model.embedding.weight[user])
    assert not torch.allclose(row, model.embedding.weight[user])
    # every other row is the encoder's output, the item the user emptied included (as a
    # negative it keeps getting gradients in a retraining)
    others = torch.arange(n) != user
    assert graph.n_users + item in torch.nonzero(others).squeeze(1)
    assert torch.equal(weight[others], encoder_only.model.embedding.weight[others])
    # seeded: the same request gives the same draw; another user deleted by another request
    # gets another row
    again = method.unlearn(model, graph, forget).model.embedding.weight[user]
    assert torch.equal(row, again)
    other_user = (user + 1) % graph.n_users
    other = method.unlearn(model, graph, forget_request(graph, users=[other_user]))
    assert not torch.allclose(other.model.embedding.weight[other_user], row)


def test_retraining_leaves_a_user_without_edges_at_its_initialisation(graph):
    # the premise of the reset: such a user's row never gets a gradient, so the retrained
    # model holds exactly its initial draw; an item without edges still moves (it is sampled
    # as a negative), which is why items are not reset
    item, user = _item_with_one_user(graph)
    forget = forget_request(graph, users=[user])
    retrained = RetrainRec(CONFIG).unlearn(train_lightgcn(graph, CONFIG), graph, forget).model
    init = make_lightgcn(graph, CONFIG.dim, CONFIG.num_layers, CONFIG.seed)
    assert torch.equal(retrained.embedding.weight[user], init.embedding.weight[user])
    node = graph.n_users + item
    assert not torch.equal(retrained.embedding.weight[node], init.embedding.weight[node])


def test_the_one_pass_shortcut_is_the_encoder_pass_of_the_general_path(model, graph, method):
    from unlearn.removal.recommend import _context, _make_request

    forget = graph.train_ids[::9]
    one_pass = method.with_request_settings(finetune_steps=0, reset_emptied_users=False)
    new = one_pass.unlearn(model, graph, forget).model.embedding.weight
    edges = as_rec_edges(graph)
    ctx = _context(model, edges)
    req = _make_request(edges, torch.isin(edges.ids, forget), ctx.degrees)
    with torch.no_grad():
        expected = model.embedding.weight + method.encoder(req.deleted_adj, ctx.base,
                                                           req.lost_share)
    assert torch.equal(new, expected)


def test_a_reset_row_depends_only_on_the_seed_and_the_node():
    from unlearn.removal.recommend import _initial_rows

    shape = torch.Size([70, 16])
    alone = _initial_rows(torch.tensor([5]), shape, seed=3)
    together = _initial_rows(torch.tensor([2, 5, 9]), shape, seed=3)
    assert torch.equal(alone[0], together[1])
    assert not torch.equal(together[0], together[1])
    assert not torch.equal(alone, _initial_rows(torch.tensor([5]), shape, seed=4))
