"""The peer benchmark refuses to run its MLP part with a CG iteration count other than the one
benchmark_cg_iterations.py chose."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import benchmark_peers as bp  # noqa: E402


def test_a_disagreeing_cg_choice_stops_the_mlp_part(tmp_path, monkeypatch):
    monkeypatch.setattr(bp, "ROOT", tmp_path)
    bp.check_cg_iterations()  # no choice recorded: nothing to check
    out = tmp_path / "experiments" / "out"
    out.mkdir(parents=True)
    (out / "benchmark_cg_iterations.json").write_text(json.dumps({"chosen": bp.MLP_CG_ITER}))
    bp.check_cg_iterations()
    (out / "benchmark_cg_iterations.json").write_text(
        json.dumps({"chosen": bp.MLP_CG_ITER + 10}))
    with pytest.raises(SystemExit, match="MLP_CG_ITER"):
        bp.check_cg_iterations()
