"""unlearn.audit.certificate: retraining passes, the original fails, caching, JSON, HTML,
LiRA against brute force, the (ε, δ) section and clear errors.

Set-up: scikit-learn digits, 1,200 training / 597 test examples, a 64-32-10 MLP trained with a
quick SGD recipe; the forget set is every training example of class 3 (124 examples).
"""

from __future__ import annotations

import base64
import copy
import json
import re

import numpy as np
import pytest
import torch
from scipy.stats import norm
from torch import nn
from torch.utils.data import DataLoader

import baselines.retrain as retrain_mod
from baselines.retrain import Recipe, Retrain, fit, seeded
from unlearn.audit import kl_divergence, prediction_agreement
from unlearn.audit.certificate import SCHEMA, Certificate, certify, retrain_references
from unlearn.audit.lira import OfflineLiRA, logit_confidence
from unlearn.data import load_digits
from unlearn.removal.base import RemovalResult
from unlearn.tasks import ClassificationTask, RegressionTask

TASK = ClassificationTask()
RECIPE = Recipe(epochs=25, lr=0.05, batch_size=64)
FORGET_CLASS = 3


def _factory() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def _loader(ds) -> DataLoader:
    return DataLoader(ds, batch_size=256)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    ds = load_digits()
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))
    train, test = ds.subset(perm[:1200]), ds.subset(perm[1200:])
    y = train.tensors()[1]
    forget_ids = train.ids[y == FORGET_CLASS].tolist()
    forget, retain = train.subset(forget_ids), train.without(forget_ids)
    with seeded(0) as gen:
        original = _factory()
        fit(original, TASK, _loader(train), RECIPE, gen)
    original.eval()
    loaders = {"forget": _loader(forget), "retain": _loader(retain), "test": _loader(test)}
    method = Retrain(TASK, _factory, recipe=RECIPE)
    cache = tmp_path_factory.mktemp("refs")
    # the model under audit: a retraining of its own (another seed), with its cost
    unlearned = Retrain(TASK, _factory, recipe=RECIPE, seed=10).unlearn(
        original, forget=loaders["forget"], retain=loaders["retain"])
    cert_ok = certify(unlearned.model, method, **loaders, original=original, removal=unlearned,
                      cache_dir=cache)
    cert_orig = certify(original, method, **loaders, cache_dir=cache)
    return {"loaders": loaders, "method": method, "cache": cache, "original": original,
            "unlearned": unlearned, "ok": cert_ok, "orig": cert_orig, "forget_ids": forget_ids}


def test_model_retrained_on_retain_passes(setup):
    cert = setup["ok"]
    assert cert.passed, cert.summary()
    assert cert.failed == []
    assert len(cert.checks) == 11
    lines = cert.summary().splitlines()
    assert lines[0] == "certificate: PASS (11/11 checks)" and len(lines) == 12
    assert all(line.startswith("  ok   ") for line in lines[1:])
    fail_lines = setup["orig"].summary().splitlines()
    assert fail_lines[0].startswith("certificate: FAIL")
    assert sum(line.startswith("  FAIL ") for line in fail_lines) == len(setup["orig"].failed)
    assert cert.metrics["forget_acc"] < 0.05  # never saw class 3
    assert cert.metrics["retain_acc"] > 0.95
    assert cert.config["n_forget"] == len(setup["forget_ids"]) == 124
    assert cert.config["seeds"] == [0, 1, 2]
    assert all(len(v) == 3 for v in cert.references.values())
    # the unlearned model is itself a retraining: its gaps are within the references' spread
    assert abs(cert.gaps["test_acc"]) < 0.03
    assert cert.average_gap < 3.0


def test_original_model_fails(setup):
    cert = setup["orig"]
    assert not cert.passed
    failed = set(cert.failed)
    assert {"forget_acc", "mia_efficacy", "lira_mean_t", "kl_forget",
            "agreement_forget"} <= failed, cert.summary()
    assert "retain_acc" not in failed  # it still fits the retained data like retraining does
    assert cert.metrics["forget_acc"] > 0.95
    assert cert.metrics["lira_mean_t"] > 5 * max(cert.references["lira_mean_t"])
    # the first certificate measured the same original model the same way
    for name, value in setup["ok"].original.items():
        assert cert.metrics[name] == pytest.approx(value, abs=1e-9), name


def test_band_is_mean_plus_k_std_with_floor(setup):
    cert = setup["ok"]
    k, floors = cert.config["k"], cert.config["floors"]
    for c in cert.checks:
        refs = np.array(cert.references[c.name])
        assert c.ref_mean == pytest.approx(refs.mean())
        assert c.ref_std == pytest.approx(refs.std(ddof=1))
        floor = floors[c.name] * abs(refs.mean()) if c.name == "param_distance" \
            else floors[c.name]
        half = max(k * refs.std(ddof=1), floor)
        fraction = c.name not in ("lira_mean_t", "kl_forget", "kl_test", "param_distance")
        if c.high is not None:
            want = refs.mean() + half
            assert c.high == pytest.approx(min(want, 1.0) if fraction else want)
        if c.low is not None:
            want = refs.mean() - half
            assert c.low == pytest.approx(max(want, 0.0) if fraction else want)
        assert (c.low is None, c.high is None) == {"both": (False, False),
                                                   "upper": (True, False),
                                                   "lower": (False, True)}[c.direction]
        assert c.passed == ((c.low is None or c.value >= c.low)
                            and (c.high is None or c.value <= c.high))
    # a narrower band (k tiny, no floors) fails a retraining with another seed somewhere
    strict = certify(setup["unlearned"].model, setup["method"], **setup["loaders"],
                     cache_dir=setup["cache"], k=1e-3, floors={n: 0.0 for n in floors})
    assert not strict.passed


def test_pairwise_metrics_match_audit_functions(setup):
    cert = setup["ok"]
    refs = retrain_references(setup["method"], setup["original"], forget=setup["loaders"][
        "forget"], retain=setup["loaders"]["retain"], seeds=[0, 1, 2], cache_dir=setup["cache"])
    assert all(r.cached for r in refs)
    model, ld = setup["unlearned"].model, setup["loaders"]
    kl = np.mean([kl_divergence(r.model, model, ld["forget"]) for r in refs])
    agree = np.mean([prediction_agreement(r.model, model, ld["test"]) for r in refs])
    assert cert.metrics["kl_forget"] == pytest.approx(kl, rel=1e-9)
    assert cert.metrics["agreement_test"] == pytest.approx(agree, rel=1e-12)
    # reference 0 is measured against references 1 and 2
    kl0 = np.mean([kl_divergence(r.model, refs[0].model, ld["test"]) for r in refs[1:]])
    assert cert.references["kl_test"][0] == pytest.approx(kl0, rel=1e-9)


def test_cache_hit_does_not_retrain(setup, monkeypatch):
    calls = []
    real_fit = retrain_mod.fit

    def counting_fit(*args, **kwargs):
        calls.append(1)
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(retrain_mod, "fit", counting_fit)
    again = certify(setup["unlearned"].model, setup["method"], **setup["loaders"],
                    cache_dir=setup["cache"])
    assert calls == []
    assert again.config["cached"] == [True, True, True]
    assert setup["orig"].config["cached"] == [True, True, True]  # second audit in the fixture
    assert again.cost["retrain_seconds"] == setup["ok"].cost["retrain_seconds"]
    assert again.metrics == pytest.approx(setup["ok"].metrics)
    assert len(list(setup["cache"].glob("retrain-*.pt"))) == 3
    # another recipe is another key: retrained, not served from the cache
    quick = Retrain(TASK, _factory, recipe=Recipe(epochs=1, lr=0.05, batch_size=64))
    refs = retrain_references(quick, setup["original"], forget=setup["loaders"]["forget"],
                              retain=setup["loaders"]["retain"], seeds=[0, 1, 2],
                              cache_dir=setup["cache"])
    assert len(calls) == 3 and not any(r.cached for r in refs)
    assert len(list(setup["cache"].glob("retrain-*.pt"))) == 6


def test_cost_section(setup):
    cost = setup["ok"].cost
    assert cost["removal_seconds"] == pytest.approx(setup["unlearned"].seconds)
    assert cost["removal_method"] == "retrain"
    assert len(cost["retrain_seconds"]) == 3 and all(s > 0 for s in cost["retrain_seconds"])
    assert cost["speedup"] == pytest.approx(cost["retrain_seconds_mean"]
                                            / cost["removal_seconds"])


def test_given_reference_models_match_retrained(setup):
    refs = retrain_references(setup["method"], setup["original"], forget=setup["loaders"][
        "forget"], retain=setup["loaders"]["retain"], seeds=[0, 1, 2], cache_dir=setup["cache"])
    given = [RemovalResult(r.model, r.seconds, {"seed": r.seed}) for r in refs]
    cert = certify(setup["unlearned"].model, given, **setup["loaders"])
    assert cert.metrics == pytest.approx(setup["ok"].metrics)
    for name, values in setup["ok"].references.items():
        assert cert.references[name] == pytest.approx(values), name
    assert cert.config["reference"]["kind"] == "given" and cert.config["seeds"] == [0, 1, 2]


def test_json_round_trip_and_schema(setup, tmp_path):
    cert = setup["ok"]
    text = cert.to_json(tmp_path / "certificate.json")
    data = json.loads(text)
    assert data["schema"] == SCHEMA == "unlearn.certificate/1"
    assert data["passed"] is True and len(data["checks"]) == 11
    back = Certificate.from_json(text)
    assert back == cert
    assert Certificate.from_json(tmp_path / "certificate.json") == cert
    assert back.to_json() == text
    with pytest.raises(ValueError, match="newer"):
        Certificate.from_json(json.dumps({**data, "schema": "unlearn.certificate/2"}))
    with pytest.raises(ValueError, match="not an unlearn certificate"):
        Certificate.from_json(json.dumps({k: v for k, v in data.items() if k != "schema"}))
    with pytest.raises(ValueError, match="not valid JSON"):
        Certificate.from_json("{broken")
    with pytest.raises(FileNotFoundError):
        Certificate.from_json(tmp_path / "missing.json")


def _pngs(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"',
                                                    html)]


def test_html_report(setup, tmp_path):
    from unlearn.ledger import Ledger

    ledger = Ledger(tmp_path / "ledger.db", models=tmp_path / "models")
    ledger.register_model({k: v.detach() for k, v in setup["original"].state_dict().items()})
    ids = setup["forget_ids"]
    a = ledger.submit(ids[:60], requester="alice", reason="erasure")
    b = ledger.submit(ids[60:], requester="bob", reason="erasure")
    with ledger.applying() as batch:
        batch.commit(setup["unlearned"].model.state_dict())
    ledger.certify([a.id])
    cert = certify(setup["original"], setup["method"], **setup["loaders"],
                   original=setup["original"], cache_dir=setup["cache"], ledger=ledger)
    ledger.close()
    assert [r["request_id"] for r in cert.timeline] == [a.id, b.id]
    assert [e["kind"] for e in cert.timeline[0]["events"]] == ["submitted", "claimed",
                                                               "applied", "certified"]
    path = cert.render_html(tmp_path / "report.html")
    html = path.read_text()
    pngs = _pngs(html)
    assert len(pngs) == 4  # bands, losses, cost, timeline
    assert all(p.startswith(b"\x89PNG") and len(p) > 5000 for p in pngs)
    assert '<table class="summary">' in html
    for c in cert.checks:
        assert f"<code>{c.name}</code>" in html
    assert html.count('class="fail">FAIL') == len(cert.failed) > 0
    assert "verdict fail" in html
    assert re.findall(r"<td class='state'>([^<]+)</td>", html) == ["certified", "applied"]
    # without a ledger or timings: no timeline figure, and says so
    plain = setup["orig"].render_html(tmp_path / "plain.html").read_text()
    assert len(_pngs(plain)) == 3 and "No ledger" in plain


def _overlap(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


@pytest.mark.parametrize("retrain", [[22.6, 4.6, 6.1], [0.3, 0.25, 0.28]])
def test_cost_figure_legend_covers_no_label(setup, retrain):
    """The legend sits outside the axes and no value label overlaps it or a dot."""
    from dataclasses import replace

    from unlearn.audit.report import cost_figure

    cert = replace(setup["orig"], cost={"removal_seconds": 0.181, "removal_method": "iau",
                                        "retrain_seconds": retrain, "speedup": 2.0})
    fig = cost_figure(cert)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    legend = ax.get_legend().get_window_extent(renderer)
    labels = [t for t in ax.texts if t.get_text().endswith(" s")]
    assert len(labels) == 2
    assert not _overlap(legend, ax.get_window_extent(renderer))
    dots = ax.collections[-1].get_offsets()
    dot_px = ax.transData.transform(np.asarray(dots, dtype=float))
    for t in labels:
        box = t.get_window_extent(renderer)
        assert not _overlap(box, legend), t.get_text()
        assert box.x1 <= ax.get_window_extent(renderer).x1, t.get_text()  # inside the axes
        assert all(not (box.x0 - 3 < x < box.x1 + 3 and box.y0 < y < box.y1)
                   for x, y in dot_px), t.get_text()


def test_lira_matches_brute_force(setup):
    ld = setup["loaders"]
    refs = retrain_references(setup["method"], setup["original"], forget=ld["forget"],
                              retain=ld["retain"], seeds=[0, 1, 2], cache_dir=setup["cache"])
    models = [r.model for r in refs]
    lira = OfflineLiRA(0.05, task=TASK).fit(models, ld["forget"], ld["test"])
    res = lira.audit(setup["original"])
    # brute force: φ via probabilities, per-set pooled σ, sqrt(1 + 1/m) inflation
    phi_f = np.stack([logit_confidence(m, ld["forget"]) for m in models])
    phi_t = np.stack([logit_confidence(m, ld["test"]) for m in models])
    logits, labels = torch.cat([setup["original"](x).detach() for _, x, _ in ld["forget"]]), \
        torch.cat([y for _, _, y in ld["forget"]])
    p = torch.softmax(logits.double(), 1).gather(1, labels[:, None])[:, 0].numpy()
    np.testing.assert_allclose(logit_confidence(setup["original"], ld["forget"]),
                               np.log(p) - np.log1p(-p), rtol=1e-4, atol=1e-4)
    sd_f = np.sqrt(((phi_f - phi_f.mean(0)) ** 2).sum() / (phi_f.shape[1] * 2))
    sd_t = np.sqrt(((phi_t - phi_t.mean(0)) ** 2).sum() / (phi_t.shape[1] * 2))
    z_f = (logit_confidence(setup["original"], ld["forget"]) - phi_f.mean(0)) / (
        sd_f * np.sqrt(4 / 3))
    z_t = (logit_confidence(setup["original"], ld["test"]) - phi_t.mean(0)) / (
        sd_t * np.sqrt(4 / 3))
    assert res.mean_t == pytest.approx(z_f.mean(), rel=1e-9)
    thr = np.quantile(-norm.logsf(z_t), 0.95)
    assert res.threshold == pytest.approx(thr, rel=1e-9)
    assert res.flagged == pytest.approx((-norm.logsf(z_f) > thr).mean())
    assert res.test_flagged == pytest.approx(0.05, abs=0.01)
    # an OUT model (a reference, scored against the others) looks like an OUT model
    loo = lira.reference_flagged()
    assert len(loo) == 3 and all(abs(r.mean_t) < 4 for r in loo)
    assert res.mean_t > 10


def test_certified_removal_section(setup):
    from unlearn.removal.certified import CertifiedRemoval, OneVsRestTask, train_certifiable

    ds = load_digits()
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))
    train, test = ds.subset(perm[:600]), ds.subset(perm[1200:1500])
    forget, retain = train.subset(train.ids[:5].tolist()), train.without(train.ids[:5].tolist())
    kw = dict(l2=1e-2, noise_std=1.0, num_classes=10)
    model = train_certifiable(_loader(train), seed=0, **kw)
    removal = CertifiedRemoval(None, epsilon=1.0, delta=1e-4).unlearn(
        model, forget=_loader(forget), retain=_loader(retain))
    refs = [train_certifiable(_loader(retain), seed=s, **kw) for s in (1, 2, 3)]
    cert = certify(removal.model, refs, forget=_loader(forget), retain=_loader(retain),
                   test=_loader(test), task=OneVsRestTask(), removal=removal, original=model)
    priv = cert.privacy
    assert priv is not None and priv["epsilon"] == 1.0 and priv["delta"] == 1e-4
    assert priv["residual_bound"] == pytest.approx(removal.details["residual_bound"])
    assert priv["certified"] is bool(removal.details["budget_remaining"] >= 0)
    budget = next(c for c in cert.checks if c.name == "certified_budget")
    assert budget.passed == (priv["residual_bound"] <= priv["budget"])
    assert budget.high == pytest.approx(removal.details["budget"])
    # an uncertified model has no (ε, δ) section
    assert setup["ok"].privacy is None


def test_clear_errors(setup):
    ld, method, model = setup["loaders"], setup["method"], setup["unlearned"].model
    empty = DataLoader(setup["loaders"]["forget"].dataset.subset([]), batch_size=8)
    with pytest.raises(ValueError, match="forget set is empty"):
        certify(model, method, forget=empty, retain=ld["retain"], test=ld["test"])
    with pytest.raises(ValueError, match="RegressionTask"):
        certify(model, method, **ld, task=RegressionTask())
    three = [copy.deepcopy(model) for _ in range(3)]
    with pytest.raises(ValueError, match="cannot compute a loss"):
        certify(model, three, **ld, task=RegressionTask())
    with pytest.raises(ValueError, match="at least 3 reference models, got 1.*spread"):
        certify(model, [copy.deepcopy(model)], **ld)
    with pytest.raises(ValueError, match="at least 3 reference models, got 1"):
        certify(model, method, **ld, n_references=1)
    with pytest.raises(ValueError, match="distinct"):
        certify(model, method, **ld, seeds=[0, 0, 1])
    with pytest.raises(ValueError, match="n_references=4 but 3 seeds"):
        certify(model, method, **ld, seeds=[0, 1, 2], n_references=4)
    with pytest.raises(ValueError, match="k must be"):
        certify(model, three, **ld, k=0)
    with pytest.raises(ValueError, match="unknown metric"):
        certify(model, three, **ld, floors={"accuracy": 0.1})
    with pytest.raises(TypeError, match="DataLoader"):
        certify(model, three, forget=list(ld["forget"]), retain=ld["retain"], test=ld["test"])
    with pytest.raises(TypeError, match="reference"):
        certify(model, "retrain", **ld)
    with pytest.raises(ValueError, match="cannot compute a loss|C >= 2"):
        certify(nn.Linear(64, 1), [nn.Linear(64, 1) for _ in range(3)], **ld)


def test_lira_class_calibration_and_errors(setup):
    ld = setup["loaders"]
    refs = retrain_references(setup["method"], setup["original"], forget=ld["forget"],
                              retain=ld["retain"], seeds=[0, 1, 2], cache_dir=setup["cache"])
    models = [r.model for r in refs]
    pooled = [r.flagged for r in OfflineLiRA(task=TASK).fit(models, ld["forget"], ld["test"])
              .reference_flagged()]
    by_class = OfflineLiRA(calibrate="class", task=TASK).fit(models, ld["forget"], ld["test"])
    steady = [r.flagged for r in by_class.reference_flagged()]
    # the whole forgotten class shifts together from seed to seed: pooled calibration turns
    # that into "members" for one reference; per-class calibration cancels it
    assert max(pooled) > 0.3 and max(steady) < 0.2
    assert by_class.audit(models[0]).test_flagged == pytest.approx(0.05, abs=0.01)
    with pytest.raises(ValueError, match="fpr"):
        OfflineLiRA(1.5)
    with pytest.raises(ValueError, match="calibrate"):
        OfflineLiRA(calibrate="global")
    with pytest.raises(RuntimeError, match="fit"):
        OfflineLiRA().audit(models[0])
    with pytest.raises(ValueError, match="at least 2 reference"):
        OfflineLiRA().fit(models[:1], ld["forget"], ld["test"])
    with pytest.raises(ValueError, match="at least 3 references"):
        OfflineLiRA().fit(models[:2], ld["forget"], ld["test"]).reference_flagged()
