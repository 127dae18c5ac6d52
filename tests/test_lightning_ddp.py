"""The callbacks under ``Trainer(strategy="ddp")`` with 2 CPU processes (gloo).

Each deletion request must be applied once, identically on every rank, and recorded once in
the ledger. The training runs in a subprocess (see ``ddp_callbacks_script.py``) because the
``ddp`` strategy launches rank 1 by re-running the command line.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from unlearn.ledger import Ledger

SCRIPT = Path(__file__).with_name("ddp_callbacks_script.py")
N = 600


@pytest.mark.skipif(sys.platform == "win32", reason="gloo subprocess launch test is POSIX-only")
def test_callbacks_under_ddp_strategy_with_two_cpu_processes(tmp_path):
    db, models = tmp_path / "ledger.db", tmp_path / "models"
    ledger = Ledger(db, models=models)
    good = ledger.submit(list(range(200, 230)), requester="alice", reason="erase")
    bad = ledger.submit([1, 123_456], requester="bob", reason="typo")
    ledger.close()

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    for var in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]

    ledger = Ledger(db, models=models)
    assert ledger.get(good.id).state == "applied"
    assert ledger.get(bad.id).state == "rejected"
    # applied once: one claim, one application, one new model version (plus the original)
    assert [e.kind for e in ledger.events(good.id)] == ["submitted", "claimed", "applied"]
    assert len(ledger.versions()) == 2 and ledger.verify().ok
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    committed = ledger.load_model(2)
    for r in ranks:  # every rank ends with exactly the committed weights
        for k, v in committed.items():
            assert torch.equal(r["state"][k], v), k
    steps = ranks[0]["steps"]
    assert steps == ranks[1]["steps"]  # ids are gathered: both ranks log the global batch
    for epoch in (0, 1):
        ids = sorted(i for s in steps if s["epoch"] == epoch for i in s["ids"])
        assert ids == list(range(N))
