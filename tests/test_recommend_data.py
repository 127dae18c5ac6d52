"""Interaction graphs, the MovieLens-100K loader, LightGCN training and ranking metrics."""

from __future__ import annotations

import io
import math

import pytest
import torch
from rec_fixtures import ML100K, community_graph

from unlearn.recommend import (
    InteractionGraph,
    LightGCNModule,
    auc,
    deleted_pair_scores,
    interaction_loader,
    load_movielens_100k,
    make_lightgcn,
    membership_auc,
    never_seen_pairs,
    propagate,
    ranking_metrics,
    read_movielens_ratings,
    sample_negatives,
    score_matrix,
    train_lightgcn,
)
from unlearn.recommend import data as rec_data

needs_ml100k = pytest.mark.skipif(not (ML100K / "ml-100k.inter").is_file(),
                                  reason="shared MovieLens-100K not available")



# ------------------------------------------------------------------------------- loader

@needs_ml100k
def test_loader_parses_shared_file_against_a_plain_count():
    lines = (ML100K / "ml-100k.inter").read_text().splitlines()[1:]
    rows = [tuple(int(float(v)) for v in line.split("\t")) for line in lines]
    implicit = [r for r in rows if r[2] >= 4]
    g = load_movielens_100k(ML100K, download=False)
    assert len(g.interactions) == len(implicit)
    assert g.n_users == len({r[0] for r in implicit})
    assert g.n_items == len({r[1] for r in implicit})
    assert g.n_train + len(g.test_ids) == len(implicit)
    # every local pair maps back to a raw (user, item) with rating >= 4
    raw = {(r[0], r[1]) for r in implicit}
    p = g.interactions[:50]
    for u, i in p.tolist():
        assert (int(g.user_labels[u]), int(g.item_labels[i])) in raw
    full = load_movielens_100k(ML100K, download=False, min_rating=None)
    assert (len(full.interactions), full.n_users, full.n_items) == (100_000, 943, 1682)


@needs_ml100k
def test_loader_slice_keeps_first_users_only():
    g = load_movielens_100k(ML100K, download=False, max_users=20)
    assert g.n_users == 20 and len(g.user_labels) == 20
    assert int(g.interactions[:, 0].max()) == 19


def test_grouplens_udata_and_recbole_inter_give_the_same_graph(tmp_path):
    rows = [(1, 10, 5, 100), (1, 11, 4, 101), (1, 12, 2, 102), (2, 10, 4, 103),
            (2, 13, 5, 104), (3, 11, 3, 105), (3, 12, 5, 106), (3, 13, 4, 107)]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "u.data").write_text("".join("\t".join(map(str, r)) + "\n" for r in rows))
    (tmp_path / "b" / "ml-100k.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        + "".join("\t".join(map(str, r)) + "\n" for r in rows))
    ga = load_movielens_100k(tmp_path / "a", download=False, test_fraction=0.0)
    gb = load_movielens_100k(tmp_path / "b", download=False, test_fraction=0.0)
    assert torch.equal(ga.interactions, gb.interactions)
    assert ga.n_train == 6  # ratings >= 4
    gall = load_movielens_100k(tmp_path / "a", download=False, min_rating=None,
                               test_fraction=0.0)
    assert gall.n_train == 8 and gall.n_items == 4


@pytest.mark.parametrize("content, match", [
    ("1\t2\tfive\t3\n", "not numeric"),
    ("1\t2\t7\t3\n", "outside"),
    ("", "no ratings"),
    ("1 2 3 4\n", "tab-separated"),
    ("user_id:token\tfoo:token\trating:float\n1\t2\t3\n", "unexpected header"),
])
def test_corrupt_ratings_files_raise_clear_errors(tmp_path, content, match):
    (tmp_path / "u.data").write_text(content)
    with pytest.raises(ValueError, match=match):
        read_movielens_ratings(tmp_path / "u.data")


def test_missing_files_without_download_raise(tmp_path):
    with pytest.raises(FileNotFoundError, match="no ml-100k.inter or u.data"):
        load_movielens_100k(tmp_path, download=False)


def test_bad_download_is_rejected_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(rec_data.urllib.request, "urlopen",
                        lambda url, timeout=0: io.BytesIO(b"not a zip"))
    with pytest.raises(ValueError, match="md5"):
        load_movielens_100k(tmp_path / "cache", download=True)
    assert list((tmp_path / "cache").iterdir()) == []


# ------------------------------------------------------------------------------- graph

def test_split_is_deterministic_per_user_and_keeps_a_training_interaction():
    a, b = community_graph(seed=3), community_graph(seed=3)
    assert torch.equal(a.train_ids, b.train_ids) and torch.equal(a.test_ids, b.test_ids)
    c = InteractionGraph.from_pairs(a.interactions[:, 0], a.interactions[:, 1], seed=4)
    assert not torch.equal(a.test_ids, c.test_ids)
    for u in range(a.n_users):
        n = int((a.interactions[:, 0] == u).sum())
        n_test = int((a.interactions[a.test_ids, 0] == u).sum())
        assert n_test == min(round(0.2 * n), n - 1)
        assert len(a.user_interaction_ids(u)) == n - n_test


def test_validation_split_holds_out_training_interactions_per_user():
    g = community_graph(per_user=12)
    val = g.validation_split(0.25, seed=1)
    assert torch.equal(val.validation_split(0.25, seed=1).test_ids,
                       val.validation_split(0.25, seed=1).test_ids)
    assert torch.equal(val.test_ids, g.validation_split(0.25, seed=1).test_ids)
    assert not torch.equal(val.test_ids, g.validation_split(0.25, seed=2).test_ids)
    # validation ids come from the training graph only; the test split is in neither part
    assert bool(torch.isin(val.test_ids, g.train_ids).all())
    assert not bool(torch.isin(val.test_ids, g.test_ids).any())
    assert not bool(torch.isin(val.train_ids, g.test_ids).any())
    assert torch.equal(torch.sort(torch.cat([val.train_ids, val.test_ids])).values, g.train_ids)
    for u in range(g.n_users):
        n = len(g.user_interaction_ids(u))
        held = int((g.interactions[val.test_ids, 0] == u).sum())
        assert held == min(round(0.25 * n), n - 1) and len(val.user_interaction_ids(u)) >= 1
    # never-seen pairs of the validation graph still avoid the real test interactions
    never = never_seen_pairs(val, 100, seed=0)
    keys = never[:, 0] * g.n_items + never[:, 1]
    test_keys = g.test_pairs()[:, 0] * g.n_items + g.test_pairs()[:, 1]
    assert not bool(torch.isin(keys, test_keys).any())
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="fraction"):
            g.validation_split(bad)


def test_edge_index_follows_the_conventions():
    g = community_graph()
    ei = g.edge_index()
    e = g.n_train
    assert ei.shape == (2, 2 * e)
    p = g.train_pairs()
    assert torch.equal(ei[0, :e], p[:, 0]) and torch.equal(ei[1, :e], p[:, 1] + g.n_users)
    assert torch.equal(ei[:, e:], ei[:, :e].flip(0))


def test_without_keeps_ids_stable_and_validates_requests():
    g = community_graph()
    forget = g.user_interaction_ids(2)
    rem = g.without(forget)
    assert rem.n_train == g.n_train - len(forget)
    assert torch.equal(rem.interactions, g.interactions)
    assert len(rem.user_interaction_ids(2)) == 0
    kept = g.train_ids[~torch.isin(g.train_ids, forget)]
    assert torch.equal(rem.train_ids, kept)
    with pytest.raises(ValueError, match="empty"):
        g.without([])
    with pytest.raises(KeyError, match="unknown interaction id"):
        g.without([len(g.interactions) + 5])
    with pytest.raises(KeyError, match="held-out test"):
        g.without(g.test_ids[:1])
    with pytest.raises(KeyError, match="already removed"):
        rem.without(forget[:1])
    with pytest.raises(ValueError, match="duplicate"):
        g.without([int(forget[0]), int(forget[0])])
    with pytest.raises(ValueError, match="every training interaction"):
        g.without(g.train_ids)
    with pytest.raises(ValueError, match="unknown user"):
        g.user_interaction_ids(g.n_users)
    with pytest.raises(ValueError, match="integers"):
        g.without([1.5])


def test_ids_of_pairs_names_pairs_that_were_never_there():
    g = community_graph()
    p = g.train_pairs()[:3]
    assert torch.equal(g.ids_of_pairs(p[:, 0], p[:, 1]), g.train_ids[:3])
    never = never_seen_pairs(g, 1)
    with pytest.raises(KeyError, match="not training interactions"):
        g.ids_of_pairs(never[:, 0], never[:, 1])
    with pytest.raises(ValueError, match="unknown item"):
        g.ids_of_pairs([0], [g.n_items])
    with pytest.raises(ValueError, match="unknown user"):
        g.ids_of_pairs([-1], [0])
    with pytest.raises(ValueError, match="unknown item"):
        g.item_interaction_ids(g.n_items)


def test_invalid_graphs_are_rejected():
    with pytest.raises(ValueError, match="user index"):
        InteractionGraph(2, 2, torch.tensor([[0, 0], [2, 1]]), torch.tensor([0]),
                         torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError, match="twice"):
        InteractionGraph(2, 2, torch.tensor([[0, 0], [0, 0]]), torch.tensor([0, 1]),
                         torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError, match="both"):
        InteractionGraph(2, 2, torch.tensor([[0, 0], [1, 1]]), torch.tensor([0, 1]),
                         torch.tensor([1]))


def test_negatives_are_never_training_items():
    g = community_graph()
    users = torch.arange(g.n_users).repeat(20)
    neg = sample_negatives(g, users, torch.Generator().manual_seed(0))
    m = g.train_matrix()
    assert not bool(m[users, neg].any())


# ------------------------------------------------------------------------------- model

def test_cached_propagation_equals_torch_geometric_lightgcn():
    g = community_graph()
    model = make_lightgcn(g, dim=8, num_layers=3, seed=1)
    with torch.no_grad():
        ref = model.get_embedding(g.edge_index())
        ours = propagate(model, g)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_training_is_seeded_and_learns_the_communities():
    g = community_graph()
    kw = dict(dim=16, num_layers=2, epochs=40, lr=1e-2, batch_size=64)
    a, b = train_lightgcn(g, seed=0, **kw), train_lightgcn(g, seed=0, **kw)
    assert torch.equal(a.embedding.weight, b.embedding.weight)
    assert a.bpr_history[-1] < a.bpr_history[0]
    scores = score_matrix(a, g)
    half = g.n_items // 2
    own = torch.cat([scores[:15, :half], scores[15:, half:]]).mean()
    other = torch.cat([scores[:15, half:], scores[15:, :half]]).mean()
    assert own > other + 0.5
    untrained = ranking_metrics(make_lightgcn(g, 16, 2, seed=0), g, k=10)["recall@10"]
    assert ranking_metrics(a, g, k=10)["recall@10"] > untrained + 0.1


def test_lightning_module_trains_and_logs_interaction_ids():
    import pytorch_lightning as pl

    from unlearn.lightning import TrainingLogCallback

    g = community_graph()
    module = LightGCNModule(g, dim=8, num_layers=2, lr=1e-2)
    before = module.model.embedding.weight.detach().clone()
    log = TrainingLogCallback(every_n_steps=None)
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[log], accelerator="cpu")
    trainer.fit(module, interaction_loader(g, batch_size=64))
    assert not torch.equal(before, module.model.embedding.weight)
    seen = sorted(i for step in log.steps for i in step.ids)
    assert seen == sorted(g.train_ids.tolist() * 2)


# ------------------------------------------------------------------------------- metrics

def test_full_ranking_metrics_against_a_hand_computed_case():
    # 2 users, 5 items. user 0 trains on item 0, tests on items 2 and 4; user 1 trains on
    # item 1, tests on item 3.
    inter = torch.tensor([[0, 0], [0, 2], [0, 4], [1, 1], [1, 3]])
    g = InteractionGraph(2, 5, inter, torch.tensor([0, 3]), torch.tensor([1, 2, 4]))
    scores = torch.tensor([[9.0, 1.0, 5.0, 6.0, 2.0],    # ranking (item 0 excluded): 3, 2, 4, 1
                           [0.0, 9.0, 3.0, 1.0, 2.0]])   # ranking (item 1 excluded): 2, 4, 3, 0
    m = ranking_metrics(scores, g, k=2)
    # user 0: top-2 = [3, 2] -> 1 hit of 2; dcg = 1/log2(3); idcg = 1 + 1/log2(3)
    # user 1: top-2 = [2, 4] -> 0 hits
    assert m["recall@2"] == pytest.approx((0.5 + 0.0) / 2)
    ndcg0 = (1 / math.log2(3)) / (1 + 1 / math.log2(3))
    assert m["ndcg@2"] == pytest.approx(ndcg0 / 2)
    m3 = ranking_metrics(scores, g, k=3)
    # user 0: top-3 = [3, 2, 4] -> 2/2; user 1: top-3 = [2, 4, 3] -> 1/1, at rank 3
    assert m3["recall@3"] == pytest.approx(1.0)
    ndcg1 = (1 / math.log2(4)) / 1.0
    assert m3["ndcg@3"] == pytest.approx(((1 / math.log2(3) + 1 / math.log2(4))
                                          / (1 + 1 / math.log2(3)) + ndcg1) / 2)


def test_auc_matches_pairwise_count_with_ties():
    pos, neg = torch.tensor([3.0, 1.0, 2.0]), torch.tensor([1.0, 0.0])
    pairs = [(p > n) + 0.5 * (p == n) for p in pos.tolist() for n in neg.tolist()]
    assert auc(pos, neg) == pytest.approx(sum(pairs) / len(pairs))
    with pytest.raises(ValueError):
        auc(torch.tensor([]), neg)


def test_forgetting_metrics_on_a_known_score_matrix():
    g = community_graph()
    forget = g.user_interaction_ids(0)[:3]
    rem = g.without(forget)
    scores = torch.zeros(g.n_users, g.n_items)
    p_forget, p_rem = g.pairs(forget), rem.train_pairs()
    scores[p_rem[:, 0], p_rem[:, 1]] = 2.0
    scores[p_forget[:, 0], p_forget[:, 1]] = 1.0
    d = deleted_pair_scores(scores, rem, forget, n_random=100)
    assert d == {"deleted_mean": 1.0, "never_seen_mean": 0.0, "retained_mean": 2.0,
                 "user_never_seen_mean": 0.0, "below_user_never_seen": 0.0}
    # the same deleted pairs at their users' level, then one of them below it
    scores = scores.clone()
    a = membership_auc(scores, rem, forget, n_random=100)
    assert a == {"auc_vs_never_seen": 1.0, "auc_vs_retained": 1.0}
    scores[p_forget[:, 0], p_forget[:, 1]] = 0.0
    scores[p_forget[0, 0], p_forget[0, 1]] = -1.0
    d = deleted_pair_scores(scores, rem, forget, n_random=100)
    assert d["below_user_never_seen"] == 1.0 and d["deleted_mean"] == pytest.approx(-1 / 3)
    scores[p_forget[0, 0]] += 5.0  # user 0's every score rises: its level rises with them
    d = deleted_pair_scores(scores, rem, forget, n_random=100)
    assert d["user_never_seen_mean"] == pytest.approx(5.0)
    assert d["below_user_never_seen"] == 1.0 and d["never_seen_mean"] < 5.0
    never = never_seen_pairs(g, 200, seed=1)
    keys = set((never[:, 0] * g.n_items + never[:, 1]).tolist())
    assert len(keys) == 200 and not keys & set(g.all_keys().tolist())
    with pytest.raises(ValueError, match="NaN"):
        ranking_metrics(torch.full((g.n_users, g.n_items), float("nan")), g)
    with pytest.raises(ValueError, match="scores must be"):
        ranking_metrics(torch.zeros(2, 2), g)


def test_in_sorted_is_isin_for_sorted_keys():
    from unlearn.recommend.data import in_sorted

    g = torch.Generator().manual_seed(0)
    keys = torch.unique(torch.randint(0, 500, (120,), generator=g))
    query = torch.randint(-5, 510, (400,), generator=g)
    assert torch.equal(in_sorted(query, keys), torch.isin(query, keys))
    assert not in_sorted(query, keys[:0]).any()
