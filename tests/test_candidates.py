"""Candidate filtering: exact top-k, TF-IDF, scores restricted to candidates, recall."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from unlearn.data import from_tensors, load_digits
from unlearn.influence import EKFACInfluence
from unlearn.influence.candidates import (
    TfidfIndex,
    knn_candidates,
    layer_inputs,
    scores_on_candidates,
    tfidf_candidates,
)
from unlearn.tasks import ClassificationTask


def _brute(q: torch.Tensor, t: torch.Tensor, k: int, metric: str) -> torch.Tensor:
    q, t = q.double(), t.double()
    if metric == "cosine":
        sims = (q / q.norm(dim=1, keepdim=True)) @ (t / t.norm(dim=1, keepdim=True)).T
    elif metric == "dot":
        sims = q @ t.T
    else:
        sims = -torch.cdist(q, t)
    return sims.topk(k, dim=1).indices


@pytest.mark.parametrize("metric", ["cosine", "dot", "euclidean"])
@pytest.mark.parametrize("chunk", [7, 64, None])
def test_knn_equals_brute_force(metric, chunk):
    g = torch.Generator().manual_seed(1)
    q, t = torch.randn(13, 9, generator=g), torch.randn(200, 9, generator=g)
    got = knn_candidates(q, t, 11, metric=metric, chunk_size=chunk)
    assert got.shape == (13, 11)
    assert torch.equal(got, _brute(q, t, 11, metric))


def test_knn_bad_input():
    with pytest.raises(ValueError, match="k must be"):
        knn_candidates(torch.randn(2, 3), torch.randn(5, 3), 6)
    with pytest.raises(ValueError, match="metric"):
        knn_candidates(torch.randn(2, 3), torch.randn(5, 3), 2, metric="manhattan")
    with pytest.raises(ValueError, match="features per row"):
        knn_candidates(torch.randn(2, 3), torch.randn(5, 4), 2)


def _tfidf_brute(query, train):
    """TF-IDF by its definition, dense, independent of the implementation's sparse path."""
    vocab = sorted({t for s in train for t in s})
    col = {t: j for j, t in enumerate(vocab)}

    def counts(seqs):
        m = np.zeros((len(seqs), len(vocab)))
        for i, s in enumerate(seqs):
            for t in s:
                if t in col:
                    m[i, col[t]] += 1
        return m

    T, Q = counts(train), counts(query)
    idf = np.log((1 + len(train)) / (1 + (T > 0).sum(0))) + 1
    def weigh(m):
        w = np.where(m > 0, 1 + np.log(np.where(m > 0, m, 1)), 0) * idf
        return w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-300)
    return weigh(Q) @ weigh(T).T


def test_tfidf_equals_definition_and_finds_the_source():
    rng = np.random.default_rng(0)
    train = [list(rng.integers(0, 50, size=rng.integers(5, 30))) for _ in range(120)]
    # queries: noisy copies of known training sequences
    sources = [3, 50, 99, 117]
    query = [train[i][: len(train[i]) // 2 + 2] + [int(rng.integers(0, 50))] for i in sources]
    got = tfidf_candidates(query, train, 10)
    sims = torch.from_numpy(_tfidf_brute(query, train))
    want = sims.topk(10, dim=1)
    assert torch.allclose(sims.gather(1, got), want.values, atol=1e-12)
    assert got[:, 0].tolist() == sources


def test_tfidf_index_is_built_once_and_answers_like_the_function():
    rng = np.random.default_rng(1)
    train = [list(rng.integers(0, 40, size=rng.integers(4, 25))) for _ in range(90)]
    queries = [list(rng.integers(0, 60, size=8)) for _ in range(7)]  # 40..59: unseen terms
    index = TfidfIndex(train, ngram=2)
    assert len(index) == 90
    matrix = index.matrix_t
    together = index.candidates(queries, 5)
    one_by_one = torch.cat([index.candidates([q], 5) for q in queries])
    assert torch.equal(together, one_by_one)
    assert torch.equal(together, tfidf_candidates(queries, train, 5, ngram=2))
    assert index.matrix_t is matrix  # queries never rebuild or grow the training side
    assert len(index.vocab) == matrix.shape[0]
    with pytest.raises(ValueError, match="k"):
        index.candidates(queries, 91)


def test_tfidf_padded_tensor_and_bigrams():
    train = torch.tensor([[1, 2, 3, 0, 0], [3, 2, 1, 0, 0], [4, 5, 6, 7, 0]])
    query = torch.tensor([[1, 2, 0, 0, 0]])
    # unigrams cannot tell 1 2 3 from 3 2 1 (ties go to the lower index); bigrams can
    assert tfidf_candidates(query, train, 2, pad_id=0).tolist() == [[0, 1]]
    query = torch.tensor([[2, 1, 0, 0, 0]])
    assert tfidf_candidates(query, train, 1, pad_id=0).tolist() == [[0]]
    assert tfidf_candidates(query, train, 1, pad_id=0, ngram=2).tolist() == [[1]]


def _fitted():
    data = load_digits()
    train, query = data.subset(range(300)), data.subset(range(300, 320))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10)).double()
    est = EKFACInfluence(model, ClassificationTask(), 1e-3, fisher="exact", progress=False)
    est.fit(DataLoader(train, batch_size=64))
    return est, train, query


@pytest.mark.parametrize("group_size", [None, 3])
def test_scores_on_candidates_equal_full_matrix_entries(group_size):
    est, train, query = _fitted()
    qloader = DataLoader(query, batch_size=8)
    full = est.scores(qloader, DataLoader(train, batch_size=64))
    xq, xt = query.tensors()[0], train.tensors()[0]
    cand = knn_candidates(xq, xt, 30)
    values, index = scores_on_candidates(est, qloader, train, cand, batch_size=50,
                                         group_size=group_size)
    assert values.shape == index.shape == (20, 30)
    assert torch.equal(index.sort(dim=1).values, cand.sort(dim=1).values)
    assert torch.allclose(values, full.gather(1, index), rtol=1e-10, atol=1e-14)
    assert (values[:, :-1] >= values[:, 1:]).all()  # sorted, most helpful first


def test_scores_on_candidates_bad_input():
    est, train, query = _fitted()
    qloader = DataLoader(query, batch_size=8)
    with pytest.raises(ValueError, match="out of range"):
        scores_on_candidates(est, qloader, train, torch.full((20, 3), 300))
    with pytest.raises(ValueError, match="rows"):
        scores_on_candidates(est, qloader, train, torch.zeros(5, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="fitted on 300"):
        scores_on_candidates(est, qloader, train.subset(range(100)),
                             torch.zeros(20, 3, dtype=torch.long))


def test_recall_on_constructed_case():
    """Bag-of-words sequences from 8 topics with disjoint vocabularies and a linear model
    without bias: the curvature is block-diagonal over topics, so a query's influential
    training examples are exactly those of its own topic. TF-IDF and cosine nearest
    neighbours with k = the topic size must recall all of the true top-10; random candidate
    sets of the same size recall about 1/8."""
    rng = np.random.default_rng(0)
    topics, per_topic, vocab, n_query = 8, 25, 10, 16

    def sequences(count):
        topic = np.arange(count) % topics
        # each sequence starts with its topic's marker token, then words of the topic
        words = [t * vocab + rng.integers(1, vocab, size=rng.integers(4, 14)) for t in topic]
        return ([[int(t * vocab), *map(int, w)] for t, w in zip(topic, words)],
                torch.from_numpy(topic))

    train_seq, train_topic = sequences(topics * per_topic)
    query_seq, query_topic = sequences(n_query)

    def counts(seqs):
        x = torch.zeros(len(seqs), topics * vocab, dtype=torch.float64)
        for i, s in enumerate(seqs):
            x[i] += torch.bincount(torch.tensor(s), minlength=topics * vocab).double()
        return x

    x, xq = counts(train_seq), counts(query_seq)
    y = torch.from_numpy(rng.integers(0, 3, size=len(x)))
    yq = torch.from_numpy(rng.integers(0, 3, size=n_query))
    torch.manual_seed(0)
    model = nn.Linear(topics * vocab, 3, bias=False).double()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(100):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    est = EKFACInfluence(model, ClassificationTask(), 1e-3, fisher="exact", progress=False)
    train = from_tensors(x, y)
    est.fit(DataLoader(train, batch_size=50))
    qloader = DataLoader(from_tensors(xq, yq), batch_size=8)
    S = est.scores(qloader, DataLoader(train, batch_size=50))
    top10 = S.abs().topk(10, dim=1).indices
    assert (train_topic[top10] == query_topic[:, None]).all()  # the construction holds
    for cand in (tfidf_candidates(query_seq, train_seq, per_topic),
                 knn_candidates(xq, x, per_topic)):
        assert _recall(top10, cand) == 1.0
    g = torch.Generator().manual_seed(0)
    rand = torch.stack([torch.randperm(len(x), generator=g)[:per_topic]
                        for _ in range(n_query)])
    assert _recall(top10, rand) < 0.3
    # scoring on the candidates finds the same top-10 as the full matrix
    values, index = scores_on_candidates(est, qloader, train,
                                         tfidf_candidates(query_seq, train_seq, per_topic))
    by_abs = values.abs().argsort(dim=1, descending=True)[:, :10]
    assert torch.equal(index.gather(1, by_abs).sort(1).values, top10.sort(1).values)


def _recall(top: torch.Tensor, cand: torch.Tensor) -> float:
    hits = [len(set(t.tolist()) & set(c.tolist())) for t, c in zip(top, cand)]
    return sum(hits) / top.numel()


def test_layer_inputs_are_penultimate_activations():
    est, train, _ = _fitted()
    model = est.model
    x = train.tensors()[0].double()
    want = torch.tanh(model[0](x)).detach()
    got = layer_inputs(model, DataLoader(train, batch_size=64), "2")
    assert torch.allclose(got, want, atol=1e-12)
    assert torch.allclose(layer_inputs(model, DataLoader(train, batch_size=7), model[2]), want,
                          atol=1e-12)
    with pytest.raises(ValueError, match="not part of the model"):
        layer_inputs(model, DataLoader(train, batch_size=64), "head")
