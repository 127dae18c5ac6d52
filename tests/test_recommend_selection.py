"""The validation selection rules of experiments/recommend_unlearning.py, on synthetic rows."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import recommend_unlearning as ru  # noqa: E402


def test_backbone_rule_takes_the_fewest_epochs_near_the_best_mean():
    rows = []
    for seed, noise in ((0, 0.002), (1, -0.002)):
        for lr, ep, recall in ((0.01, 40, 0.342), (0.01, 60, 0.300), (0.005, 60, 0.343),
                               (0.005, 80, 0.345), (0.002, 160, 0.344)):
            rows.append({"seed": seed, "lr": lr, "epochs": ep, "recall@20": recall + noise})
    chosen = ru.choose_backbone(rows)
    # best mean 0.345 (lr 0.005, 80); within 1 %: 0.342 (40 ep) and 0.343 (60 ep) -> 40 ep
    assert (chosen["lr"], chosen["epochs"]) == (0.01, 40)
    assert chosen["best_recall@20"] == pytest.approx(0.345)
    rows = [r for r in rows if r["epochs"] != 40]
    assert (ru.choose_backbone(rows)["lr"], ru.choose_backbone(rows)["epochs"]) == (0.005, 60)


def _rows(grid, recall, auc, deleted):
    out = []
    for seed in (0, 1):
        for sc in ru.TUNE_SCENARIOS:
            base = {"seed": seed, "scenario": sc, "never_seen_mean": 0.5,
                    "below_user_never_seen": 0.0}
            if grid is None:
                out.append({**base, "method": "retrain", "recall@20": 0.30,
                            "auc_vs_never_seen": 0.70, "deleted_mean": 3.0})
            else:
                out.append({**base, "method": "unlearnrec", **grid, "recall@20": recall,
                            "auc_vs_never_seen": auc, "deleted_mean": deleted,
                            "seconds": 0.01 * (1 + grid["finetune_steps"])})
    return out


def test_unlearnrec_rule_keeps_recall_and_forbids_over_forgetting(monkeypatch):
    grids = [{"unlearn_reference": "global", "unlearn_floor": f, "lambda_unlearn": lam,
              "finetune_steps": 10} for f, lam in ((None, 1.0), (1.0, 1.0), (1.0, 4.0),
                                                   (1.0, 0.3))]
    monkeypatch.setattr(ru, "UNLEARN_GRID", tuple(grids))
    rows = _rows(None, 0, 0, 0)
    rows += _rows(grids[0], 0.30, 0.50, 0.0)   # lowest deleted score, but over-forgets
    rows += _rows(grids[1], 0.295, 0.69, 2.0)  # -1.7 % recall, AUC near retraining
    rows += _rows(grids[2], 0.25, 0.68, 1.0)   # lower deleted score, but -17 % recall
    rows += _rows(grids[3], 0.30, 0.72, 2.8)   # feasible, forgets less
    summary = {s["lambda_unlearn"]: s for s in ru.grid_summary(rows) if s["unlearn_floor"]}
    assert summary[4.0]["worst_recall_gap"] == pytest.approx(-1 / 6)
    assert not summary[4.0]["feasible"] and summary[1.0]["feasible"]
    assert ru.choose_unlearnrec(rows) == grids[1]
    # nothing feasible: no choice rather than a bad one
    assert ru.choose_unlearnrec(_rows(None, 0, 0, 0) + _rows(grids[2], 0.25, 0.5, 1.0)) is None


def test_unlearnrec_rule_takes_the_cheapest_that_forgets_as_much_as_retraining(monkeypatch):
    def grid(steps, lam=1.0, reset=True):
        return {"unlearn_reference": "global", "unlearn_floor": None, "lambda_unlearn": lam,
                "finetune_steps": steps, "reset_emptied_users": reset}

    grids = [grid(0), grid(3), grid(3, reset=False), grid(10), grid(1, 2.0)]
    monkeypatch.setattr(ru, "UNLEARN_GRID", tuple(grids))
    # retraining: deleted 3.0 - never-seen 0.5 = 2.5
    rows = _rows(None, 0, 0, 0)
    rows += _rows(grids[0], 0.30, 0.70, 3.1)  # cheapest, but forgets less than retraining
    rows += _rows(grids[1], 0.30, 0.68, 2.9)  # as much as retraining, AUC 0.02 off
    rows += _rows(grids[2], 0.30, 0.71, 2.5)  # same cost, closer to retraining's AUC
    rows += _rows(grids[3], 0.30, 0.70, 1.0)  # forgets most, but costs 10 steps
    rows += _rows(grids[4], 0.25, 0.70, 2.0)  # cheaper, but loses recall
    summary = {(s["finetune_steps"], s["reset_emptied_users"], s["lambda_unlearn"]): s
               for s in ru.grid_summary(rows)}
    assert summary[(0, True, 1.0)]["retrain_deleted_gap"] == pytest.approx(2.5)
    assert summary[(3, True, 1.0)]["worst_auc_gap"] == pytest.approx(0.02)
    assert summary[(3, True, 1.0)]["seconds"] == pytest.approx(0.04)
    assert ru.choose_unlearnrec(rows) == grids[2]
    # nothing forgets as much as retraining: the feasible one that forgets most
    rows = _rows(None, 0, 0, 0) + _rows(grids[0], 0.30, 0.70, 3.3) \
        + _rows(grids[3], 0.30, 0.70, 3.1)
    assert ru.choose_unlearnrec(rows) == grids[3]
