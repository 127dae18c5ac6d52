"""Crash test of the request processor: ``kill -9`` at random moments, many times.

A worker process applies pending requests in a loop, exactly as a user's processor would:
``with ledger.applying() as batch``: load the recorded head model, remove the batch's new ids
(subtract a known amount per sample id), count each request once, ``batch.commit``. The test
kills it with SIGKILL after a random 0-100 ms, 25 times, submitting new requests (and
resubmitting old ones) between kills, then lets a last worker finish. The model is two exact
float64 vectors, so the final weights prove that every sample was removed exactly once and
every request counted exactly once; the ledger's own record (which version applied which
request, and the difference between consecutive versions) must agree, and the hash chain must
verify. Workers are forked from a forkserver that has imported torch, so each restart costs
milliseconds rather than a torch import.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import random
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from unlearn.ledger import Ledger, ModelStore

N_IDS = 64  # sample ids 0..63
MAX_REQUESTS = 400
KILLS = 25
W0 = torch.arange(N_IDS, dtype=torch.float64) + 1000.0


def weight(sample_id: int) -> float:
    """What removing one sample subtracts from its weight (exact in float64)."""
    return float(sample_id % 7 + 1)


class _SlowStore(ModelStore):
    """Marks and widens the window between a version's file and its ledger commit."""

    def __init__(self, directory: Path, mark: Any, rng: random.Random) -> None:
        super().__init__(directory)
        self._mark, self._rng = mark, rng

    def save(self, state_dict: Any, meta: Any = None, *, version: int | None = None) -> int:
        v = super().save(state_dict, meta, version=version)
        self._mark("saved")
        time.sleep(self._rng.uniform(0.005, 0.02))
        return v


def _worker(root: str, seed: int, ready: Any) -> None:
    """The request processor (runs in a child process until nothing is pending)."""
    ready.set()
    rng = random.Random(seed)
    log = os.open(os.path.join(root, "phases.log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT)

    def mark(phase: str) -> None:
        os.write(log, f"{os.getpid()} {phase}\n".encode())

    mark("opening")
    store = _SlowStore(Path(root) / "models", mark, rng)
    ledger = Ledger(os.path.join(root, "ledger.db"), models=store)
    while True:
        mark("claiming")
        with ledger.applying(limit=rng.randint(1, 3), wait=10.0) as batch:
            if not batch:
                mark("idle")
                return
            mark("claimed")
            time.sleep(rng.uniform(0, 0.01))
            state = batch.load_base()
            w, count = state["w"].clone(), state["count"].clone()
            for i in batch.new_ids:
                w[i] -= weight(i)
            for r in batch.requests:
                count[r.id] += 1
            mark("computed")
            time.sleep(rng.uniform(0, 0.01))
            batch.commit({"w": w, "count": count}, details={"new_ids": batch.new_ids})
        mark("committed")
        time.sleep(rng.uniform(0, 0.005))


def _submit_some(ledger: Ledger, rng: random.Random, n: int, sent: list[dict]) -> None:
    for _ in range(n):
        ids = rng.sample(range(N_IDS), rng.randint(1, 4))
        spec = {"ids": ids, "requester": f"user{rng.randint(0, 9)}",
                "reason": f"erasure #{len(sent)}", "key": f"k{len(sent)}"}
        ledger.submit(**spec)
        sent.append(spec)
    for spec in rng.sample(sent, min(2, len(sent))):  # resubmissions: must change nothing
        ledger.submit(**spec)


def _last_phase(root: Path, pid: int) -> str:
    lines = (root / "phases.log").read_text().splitlines()
    mine = [line.split()[1] for line in lines if line.split()[0] == str(pid)]
    return mine[-1] if mine else "started"


def _run_with_kills(root: Path, ledger: Ledger, rng: random.Random, sent: list[dict]
                    ) -> Counter:
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "safetensors.torch", "unlearn.ledger", __name__])
    phases: Counter = Counter()
    for k in range(KILLS):
        _submit_some(ledger, rng, 3, sent)
        ready = ctx.Event()
        p = ctx.Process(target=_worker, args=(str(root), k, ready), daemon=True)
        p.start()
        assert ready.wait(60), "the worker did not start"
        time.sleep(rng.uniform(0, 0.1))
        # the worker may have drained the queue and exited before the kill
        with contextlib.suppress(ProcessLookupError):
            os.kill(p.pid, signal.SIGKILL)
        p.join(10)
        phases[_last_phase(root, p.pid) if p.exitcode == -signal.SIGKILL else "finished"] += 1
    ready = ctx.Event()
    p = ctx.Process(target=_worker, args=(str(root), 10_000, ready), daemon=True)
    p.start()
    p.join(60)
    assert p.exitcode == 0, f"the final worker exited with {p.exitcode}"
    return phases


@pytest.fixture(scope="module")
def crashed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("crash")
    rng = random.Random(1234)
    ledger = Ledger(root / "ledger.db", models=root / "models")
    ledger.register_model({"w": W0.clone(),
                           "count": torch.zeros(MAX_REQUESTS, dtype=torch.float64)})
    sent: list[dict] = []
    _submit_some(ledger, rng, 40, sent)
    start = time.perf_counter()
    phases = _run_with_kills(root, ledger, rng, sent)
    seconds = time.perf_counter() - start
    ledger.close()
    final = Ledger(root / "ledger.db", models=root / "models")
    return {"root": root, "ledger": final, "sent": sent, "phases": phases, "seconds": seconds}


def test_every_request_applied_exactly_once(crashed: dict[str, Any]) -> None:
    ledger: Ledger = crashed["ledger"]
    sent = crashed["sent"]
    reqs = ledger.list()
    assert len(reqs) == len(sent)  # resubmissions added nothing
    assert {r.state for r in reqs} == {"applied"}
    by_key = {r.key: r for r in reqs}
    for spec in sent:  # none lost, none altered
        r = by_key[spec["key"]]
        assert list(r.ids) == sorted(spec["ids"]) and r.requester == spec["requester"]
    state = ledger.load_model()
    count = state["count"]
    assert torch.equal(count[[r.id for r in reqs]], torch.ones(len(reqs), dtype=torch.float64))
    assert count.sum().item() == len(reqs)  # nothing counted for a request that isn't one
    forgotten = ledger.forgotten_ids()
    assert forgotten == sorted({i for s in sent for i in s["ids"]})
    expected = W0.clone()
    for i in forgotten:
        expected[i] -= weight(i)
    assert torch.equal(state["w"], expected)  # each sample removed once: no double removal


def test_each_version_holds_exactly_the_requests_it_records(crashed: dict[str, Any]) -> None:
    ledger: Ledger = crashed["ledger"]
    versions = ledger.versions()
    assert [v["parent"] for v in versions[1:]] == [v["version"] for v in versions[:-1]]
    events = [e for e in ledger.events() if e.kind == "model_committed"]
    assert len(events) == len(versions) - 1
    applied_in = [r for e in events for r in e.data["requests"]]
    assert sorted(applied_in) == [r.id for r in ledger.list()]  # each request in one version
    forgotten: set[int] = set()
    for e in events:
        v, parent = e.data["version"], e.data["parent"]
        new, old = ledger.load_model(v), ledger.load_model(parent)
        want_count = torch.zeros(MAX_REQUESTS, dtype=torch.float64)
        want_count[e.data["requests"]] = 1
        assert torch.equal(new["count"] - old["count"], want_count), f"version {v}"
        ids = {i for rid in e.data["requests"] for i in ledger.get(rid).ids} - forgotten
        want_w = torch.zeros(N_IDS, dtype=torch.float64)
        for i in ids:
            want_w[i] = -weight(i)
        assert torch.equal(new["w"] - old["w"], want_w), f"version {v}"
        forgotten |= ids
        assert all(ledger.get(rid).model_version == v for rid in e.data["requests"])


def test_chain_verifies_and_no_orphan_files(crashed: dict[str, Any]) -> None:
    ledger: Ledger = crashed["ledger"]
    report = ledger.verify()
    assert report.ok, str(report)
    store = ModelStore(crashed["root"] / "models")
    assert store.versions() == [v["version"] for v in ledger.versions()]
    assert store.temp_files() == []


def test_kills_hit_the_dangerous_moments(crashed: dict[str, Any]) -> None:
    """The kills must have interrupted real work: rolled-back claims, some of them after the
    new model file was written, and at several different phases."""
    ledger: Ledger = crashed["ledger"]
    phases: Counter = crashed["phases"]
    rolled = [e for e in ledger.events() if e.kind == "rolled_back"]
    claimed_versions = {e.data["version"] for e in ledger.events() if e.kind == "claimed"}
    recorded = {v["version"] for v in ledger.versions()}
    print(f"\nkill phases: {dict(phases)}; {len(rolled)} rollbacks; "
          f"{len(claimed_versions - recorded)} reserved versions discarded; "
          f"{crashed['seconds']:.1f} s")
    (crashed["root"] / "summary.json").write_text(json.dumps(dict(phases)))
    assert sum(phases.values()) == KILLS
    assert len(rolled) >= 3
    assert len(claimed_versions - recorded) >= 3
    assert len([p for p in phases if p not in ("finished", "idle")]) >= 3
    assert crashed["seconds"] < 60
