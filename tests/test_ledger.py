"""Tests of the deletion-request ledger: states, idempotency, the hash chain, schema and
corrupt-file errors, the model store, recovery from a dead applier, and the CLI commands.
(Killing a real processor with ``kill -9`` is in test_ledger_crash.py.)"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from unlearn.cli import main
from unlearn.data import UnknownIdError
from unlearn.ledger import (
    STATES,
    TRANSITIONS,
    IdempotencyConflictError,
    IllegalTransitionError,
    Ledger,
    LedgerBusyError,
    LedgerCorruptError,
    LedgerError,
    LedgerNotFoundError,
    LedgerSchemaError,
    LostClaimError,
    ModelStore,
    ModelVersionError,
    RequestFileError,
    RequestNotFoundError,
    load_request_file,
)
from unlearn.ledger.records import KIND_STATE, fold


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    led = Ledger(tmp_path / "ledger.db", models=tmp_path / "models")
    led.register_model({"w": torch.zeros(8, dtype=torch.float64)}, {"note": "trained"})
    yield led
    led.close()


def _raw(path: Path, sql: str, params: tuple = ()) -> None:
    con = sqlite3.connect(path)
    con.execute(sql, params)
    con.commit()
    con.close()


def _apply(led: Ledger, **kw) -> int | None:
    """Apply pending requests: subtract 1 from each new id's weight."""
    with led.applying(**kw) as batch:
        state = batch.load_base()
        for i in batch.new_ids:
            state["w"][i] -= 1
        return batch.commit(state, details={"n": len(batch.new_ids)})


# ------------------------------------------------------------------------- state machine


def test_fold_allows_exactly_the_transition_table() -> None:
    base = fold(None, "submitted", {"ids": [1], "requester": "a", "reason": "r", "key": None,
                                    "created_at": "t"}, "t", 1)
    data = {"attempt": "x", "model_version": 2, "reason": "why"}
    for state in STATES:
        for kind, target in KIND_STATE.items():
            if kind == "submitted":
                continue
            fields = dict(base, state=state)
            if target in TRANSITIONS[state]:
                assert fold(fields, kind, data, "t2", 1)["state"] == target
            else:
                with pytest.raises(IllegalTransitionError):
                    fold(fields, kind, data, "t2", 1)
    with pytest.raises(LedgerError, match="first event"):
        fold(None, "claimed", data, "t", 1)


def test_lifecycle_and_illegal_moves(ledger: Ledger) -> None:
    a = ledger.submit([3, 1], requester="alice", reason="GDPR art. 17")
    b = ledger.submit([5], requester="bob", reason="spam")
    assert a.state == "pending" and a.ids == (1, 3) and a.created_at.endswith("+00:00")
    assert ledger.reject(b.id, "not the data subject").state_reason == "not the data subject"
    with pytest.raises(IllegalTransitionError, match="'rejected'.*'rejected'"):
        ledger.reject(b.id, "again")
    with pytest.raises(IllegalTransitionError):
        ledger.certify([a.id])  # pending cannot be certified
    claim = ledger.claim_pending()
    assert claim.request_ids == [a.id] and ledger.get(a.id).state == "applying"
    ledger.mark_failed(claim, "out of memory")
    assert (ledger.get(a.id).state, ledger.get(a.id).state_reason) == ("failed", "out of memory")
    ledger.retry(a.id)
    version = _apply(ledger)
    got = ledger.get(a.id)
    assert (got.state, got.model_version) == ("applied", version)
    assert version == claim.version + 1  # the failed attempt's number is not reused
    ledger.certify([a.id], {"verdict": "pass"})
    with pytest.raises(IllegalTransitionError):
        ledger.certify([a.id])
    kinds = [e.kind for e in ledger.events(a.id)]
    assert kinds == ["submitted", "claimed", "failed", "retried", "claimed", "applied",
                     "certified"]
    assert ledger.verify().ok


def test_applying_block_outcomes(ledger: Ledger) -> None:
    r = ledger.submit([1], requester="a", reason="r")
    with pytest.raises(RuntimeError, match="boom"), ledger.applying() as batch:
        assert [q.id for q in batch.requests] == [r.id]
        raise RuntimeError("boom")
    assert ledger.get(r.id).state == "failed"
    assert ledger.get(r.id).state_reason == "RuntimeError: boom"
    ledger.retry(r.id)
    with pytest.raises(KeyboardInterrupt), ledger.applying():
        raise KeyboardInterrupt
    assert ledger.get(r.id).state == "pending"  # an interrupt gives the claim back
    with ledger.applying():
        pass  # no commit
    assert ledger.get(r.id).state == "pending"
    with ledger.applying(request_ids=[r.id]) as batch:
        # three earlier claims reserved versions 2, 3 and 4: numbers are never reused
        assert len(batch) == 1 and batch.base_version == 1 and batch.version == 5
    with ledger.applying(limit=5) as batch:
        batch.commit(None)  # nothing to change in the weights: stays on the base version
    assert ledger.get(r.id).model_version == 1 and ledger.head() == 1
    with ledger.applying() as batch:
        assert not batch and len(batch) == 0
        with pytest.raises(ValueError, match="nothing to commit"):
            batch.commit(None)
    assert ledger.verify().ok


def test_new_ids_skip_samples_already_forgotten(ledger: Ledger) -> None:
    ledger.submit([1, 2], requester="a", reason="r")
    _apply(ledger)
    ledger.submit([2, 3], requester="b", reason="r")
    ledger.submit([3, 4], requester="c", reason="r")
    with ledger.applying() as batch:
        assert batch.ids == [2, 3, 4] and batch.new_ids == [3, 4]
        state = batch.load_base()
        for i in batch.new_ids:
            state["w"][i] -= 1
        batch.commit(state)
    w = ledger.load_model()["w"]
    assert w.tolist() == [0, -1, -1, -1, -1, 0, 0, 0]  # 2 and 3 removed once each
    assert ledger.forgotten_ids() == [1, 2, 3, 4]


def test_list_show_and_queries(ledger: Ledger) -> None:
    ledger.submit([1], requester="alice", reason="r1")
    ledger.submit([2], requester="bob", reason="r2")
    ledger.submit([3], requester="alice", reason="r3")
    _apply(ledger, request_ids=[2])
    assert [r.id for r in ledger.list(requester="alice")] == [1, 3]
    assert [r.id for r in ledger.list(state="applied")] == [2]
    assert [r.id for r in ledger.list(state="pending", requester="alice")] == [1, 3]
    with pytest.raises(ValueError, match="unknown state 'done'"):
        ledger.list(state="done")
    shown = ledger.show(2)
    assert shown["request"]["ids"] == [2] and shown["request"]["state"] == "applied"
    assert [e["kind"] for e in shown["events"]] == ["submitted", "claimed", "applied"]
    json.dumps(shown)
    with pytest.raises(RequestNotFoundError, match="no request 99"):
        ledger.get(99)
    assert ledger.forgotten_ids() == [2]


# ------------------------------------------------------------------------- idempotency


def test_same_request_twice_is_one_request(ledger: Ledger) -> None:
    a, created = ledger.submit_once([4, 2], requester="alice", reason="why")
    b, again = ledger.submit_once(np.array([2, 4]), requester="alice", reason="why")
    assert created and not again and a == b
    c = ledger.submit([2, 4], requester="alice", reason="another reason")
    assert c.id != a.id
    k1 = ledger.submit([7], requester="bob", reason="x", key="ticket-1")
    assert ledger.submit([7], requester="bob", reason="x", key="ticket-1") == k1
    n_events = len(ledger.events())
    with pytest.raises(IdempotencyConflictError, match="ticket-1"):
        ledger.submit([7, 8], requester="bob", reason="x", key="ticket-1")
    assert len(ledger.events()) == n_events and len(ledger.list()) == 3
    _apply(ledger)
    d = ledger.submit([2, 4], requester="alice", reason="why")  # after applying: still one
    assert d.id == a.id and d.state == "applied" and len(ledger.list()) == 3


def test_concurrent_identical_submissions_make_one_request(tmp_path: Path) -> None:
    Ledger(tmp_path / "l.db").close()
    results: list[int] = []

    def submit() -> None:
        with Ledger(tmp_path / "l.db") as led:
            for _ in range(5):
                results.append(led.submit([1, 2], requester="a", reason="r", key="k").id)

    threads = [threading.Thread(target=submit) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [1] * 20
    with Ledger(tmp_path / "l.db") as led:
        assert len(led.list()) == 1 and len(led.events()) == 1 and led.verify().ok


# ------------------------------------------------------------------------- validation


@pytest.mark.parametrize(("ids", "match"), [
    ([], "empty"),
    ([1, 2, 1], r"unique; repeated: \[1\]"),
    ([1, "2"], r"ids\[1\] = '2' is not an integer"),
    ([1, 2.5], "not an integer"),
    ([True], "boolean"),
    ("123", "string"),
    (5, "list of integers"),
])
def test_bad_ids_are_refused(ledger: Ledger, ids: object, match: str) -> None:
    n = len(ledger.events())
    with pytest.raises(ValueError, match=match):
        ledger.submit(ids, requester="a", reason="r")  # type: ignore[arg-type]
    assert len(ledger.events()) == n


def test_ids_types_and_text_fields(ledger: Ledger) -> None:
    assert ledger.submit(torch.tensor([3, 1]), requester="a", reason="r").ids == (1, 3)
    assert ledger.submit(np.array([9], dtype=np.int32), requester="a", reason="r").ids == (9,)
    for kw, match in [({"requester": " "}, "requester"), ({"reason": ""}, "reason"),
                      ({"key": ""}, "key")]:
        with pytest.raises(ValueError, match=match):
            ledger.submit([1], **{"requester": "a", "reason": "r", **kw})


def test_unknown_ids_against_the_universe(ledger: Ledger) -> None:
    with pytest.raises(UnknownIdError, match=r"2 unknown id\(s\): \[100, 200\]") as info:
        ledger.submit([1, 100, 200], requester="a", reason="r", known_ids=range(10))
    assert info.value.unknown == [100, 200]
    assert ledger.list() == []
    assert ledger.submit([1, 9], requester="a", reason="r", known_ids=range(10)).ids == (1, 9)


def test_request_files(tmp_path: Path) -> None:
    good = tmp_path / "req.json"
    good.write_text(json.dumps({"ids": [3, 1], "requester": "a", "reason": "r", "key": "k"}))
    assert load_request_file(good) == {"ids": [1, 3], "requester": "a", "reason": "r",
                                       "key": "k"}
    (tmp_path / "list.json").write_text("[5, 6]")
    assert load_request_file(tmp_path / "list.json") == {"ids": [5, 6]}
    cases = {
        '{"ids": [1, 2,}': r"not valid JSON \(line 1, column 15",
        '"just text"': "expected a JSON list of ids",
        '{"ids": [1], "extra": 1}': r"unknown field\(s\) \['extra'\]",
        '{"requester": "a"}': "no 'ids' field",
        '{"ids": [1, "x"]}': r"ids\[1\] = 'x' is not an integer",
        '{"ids": [1], "reason": 7}': "reason must be a non-empty string",
    }
    for text, match in cases.items():
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        with pytest.raises(RequestFileError, match=match):
            load_request_file(bad)
    with pytest.raises(RequestFileError, match="does not exist"):
        load_request_file(tmp_path / "missing.json")


# ------------------------------------------------------------------------- hash chain


def test_tampered_event_is_named(ledger: Ledger, tmp_path: Path) -> None:
    ledger.submit([1, 2], requester="alice", reason="r")
    ledger.submit([3], requester="bob", reason="r")
    _apply(ledger)
    assert ledger.verify().ok
    target = ledger.events(2)[0]  # request 2's 'submitted' event
    _raw(tmp_path / "ledger.db", "UPDATE events SET data = ? WHERE seq = ?",
         (json.dumps({**target.data, "requester": "mallory"}), target.seq))
    report = ledger.verify()
    assert not report.ok
    assert report.first_bad.seq == target.seq and report.first_bad.request_id == 2
    assert "altered" in str(report.first_bad)
    code = main(["ledger", "verify", str(tmp_path / "ledger.db")])
    assert code == 1


def test_tampered_table_row_is_named(ledger: Ledger, tmp_path: Path) -> None:
    ledger.submit([1, 2], requester="alice", reason="r")
    ledger.submit([3], requester="bob", reason="r")
    _raw(tmp_path / "ledger.db", "UPDATE requests SET sample_ids = '[3, 4]' WHERE id = 2")
    report = ledger.verify()
    assert report.first_bad.request_id == 2 and "sample_ids" in report.first_bad.message
    _raw(tmp_path / "ledger.db", "UPDATE requests SET sample_ids = '[3]' WHERE id = 2")
    _raw(tmp_path / "ledger.db", "UPDATE requests SET state = 'applied' WHERE id = 1")
    assert "column 'state'" in str(ledger.verify().first_bad)


def test_deleted_event_and_version_tampering_are_caught(ledger: Ledger,
                                                        tmp_path: Path) -> None:
    ledger.submit([1], requester="a", reason="r")
    ledger.submit([2], requester="b", reason="r")
    _apply(ledger)
    _raw(tmp_path / "ledger.db", "UPDATE versions SET sha256 = ? WHERE version = 2", ("0" * 64,))
    assert "model version 2" in str(ledger.verify().first_bad)
    _raw(tmp_path / "ledger.db", "DELETE FROM events WHERE seq = 3")
    first = ledger.verify().first_bad
    assert first.seq == 4 and "deleted or reordered" in first.message


def test_replaced_model_file_is_caught(ledger: Ledger, tmp_path: Path) -> None:
    ledger.submit([1], requester="a", reason="r")
    _apply(ledger)
    store = ModelStore(tmp_path / "models")
    path = store.path(2)
    from safetensors.torch import save_file

    save_file({"w": torch.ones(8, dtype=torch.float64)}, str(path))
    report = ledger.verify()
    assert not report.ok and "model version 2" in str(report.first_bad)
    assert ledger.verify(check_models=False).ok
    with pytest.raises(ModelVersionError, match="was changed"):
        ledger.load_model()
    code = main(["ledger", "verify", str(tmp_path / "ledger.db"), "--models",
                 str(tmp_path / "models")])
    assert code == 1


def test_anchor_detects_a_cut_log(ledger: Ledger, tmp_path: Path) -> None:
    r = ledger.submit([1], requester="a", reason="r")
    _apply(ledger)
    before = ledger.get(r.id)
    ledger.certify([r.id])
    head = ledger.verify().head
    # drop the last event and put the row back as it was: the chain alone cannot tell...
    _raw(tmp_path / "ledger.db", "DELETE FROM events WHERE seq = (SELECT MAX(seq) FROM events)")
    _raw(tmp_path / "ledger.db", "UPDATE requests SET state = 'applied', updated_at = ? "
         "WHERE id = ?", (before.updated_at, r.id))
    assert ledger.verify().ok
    # ...but a head hash recorded elsewhere can
    report = ledger.verify(anchor=head)
    assert not report.ok and "anchor" in str(report.first_bad)


# ------------------------------------------------------------------------- files, schema


def test_file_settings_and_sqlite_url(tmp_path: Path) -> None:
    Ledger(f"sqlite:///{tmp_path / 'u.db'}").submit([1], requester="a", reason="r")
    with Ledger(tmp_path / "u.db") as led:
        assert len(led.list()) == 1
    con = sqlite3.connect(tmp_path / "u.db")
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == "1"
    con.close()
    with pytest.raises(LedgerError, match="file on disk"):
        Ledger("sqlite:///:memory:")


def test_server_url_without_sqlalchemy_is_a_clear_error() -> None:
    try:
        import sqlalchemy  # noqa: F401
    except ImportError:
        with pytest.raises(LedgerError, match="needs SQLAlchemy"):
            Ledger("postgresql://user@localhost/unlearn")
    else:
        pytest.skip("SQLAlchemy is installed")


def test_url_messages_hide_the_password() -> None:
    try:
        import sqlalchemy  # noqa: F401
    except ImportError:
        with pytest.raises(LedgerError) as info:
            Ledger("postgresql://bob:hunter2@localhost/unlearn")
        assert "hunter2" not in str(info.value) and "bob:***@" in str(info.value)
    else:
        pytest.skip("SQLAlchemy is installed")


def test_sqlalchemy_url_backend(tmp_path: Path) -> None:
    """The server-database path, run on SQLite through SQLAlchemy (skipped without it):
    same behaviour, with a lease row instead of a file lock."""
    pytest.importorskip("sqlalchemy")
    url = f"sqlite+pysqlite:///{tmp_path / 'sa.db'}"
    a = Ledger(url, models=tmp_path / "m", lease_seconds=0.5)
    a.register_model({"w": torch.zeros(4, dtype=torch.float64)})
    r = a.submit([2, 1], requester="a", reason="r")
    assert a.submit([1, 2], requester="a", reason="r") == r
    assert _apply(a) == 2 and a.get(r.id).state == "applied"
    a.submit([3], requester="b", reason="r")
    claim = a.claim_pending()
    b = Ledger(url, models=tmp_path / "m", lease_seconds=0.5)
    assert b.last_recovery.skipped
    with pytest.raises(LedgerBusyError):
        b.claim_pending()
    import time

    time.sleep(0.6)  # the lease expires: the claim is taken back
    assert b.recover().rolled_back == [2]
    with pytest.raises(LostClaimError):
        a.mark_applied(claim, claim.base_version)
    assert _apply(b) == 4 and b.load_model()["w"].tolist() == [0, -1, -1, -1]
    assert b.verify().ok and b.forgotten_ids() == [1, 2, 3]
    a.close()
    b.close()


def test_newer_schema_is_refused_and_untouched(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    Ledger(path).submit([1], requester="a", reason="r")
    _raw(path, "UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    before = path.read_bytes()
    with pytest.raises(LedgerSchemaError, match="schema version 99, newer than version 1"):
        Ledger(path)
    assert path.read_bytes() == before
    assert main(["ledger", "list", str(path)]) == 2


def test_not_sqlite_file_is_refused_and_untouched(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "notes.db"
    content = b"these are my notes, not a database\n" * 100
    path.write_bytes(content)
    for make in (lambda: Ledger(path), lambda: Ledger(path, readonly=True)):
        with pytest.raises(LedgerCorruptError, match="not a SQLite database"):
            make()
    assert main(["ledger", "verify", str(path)]) == 2
    assert "not a SQLite database" in capsys.readouterr().err
    assert main(["request", "--ledger", str(path), "--ids", "1", "--requester", "a",
                 "--reason", "r"]) == 2
    assert path.read_bytes() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.db"]


def test_damaged_or_foreign_database_is_refused(tmp_path: Path) -> None:
    other = tmp_path / "other.db"
    _raw(other, "CREATE TABLE photos (id INTEGER)")
    before = other.read_bytes()
    with pytest.raises(LedgerCorruptError, match="not an unlearn ledger"):
        Ledger(other)
    assert other.read_bytes() == before
    path = tmp_path / "l.db"
    with Ledger(path) as led:
        for i in range(50):
            led.submit([i], requester="a", reason="r" * 200)
    data = bytearray(path.read_bytes())
    page = 4096
    data[page:] = np.random.default_rng(0).integers(0, 256, len(data) - page,
                                                    dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    with pytest.raises(LedgerCorruptError, match="damaged"):
        Ledger(path)
    assert path.read_bytes() == bytes(data)


def test_missing_ledger(tmp_path: Path) -> None:
    with pytest.raises(LedgerNotFoundError, match="no ledger"):
        Ledger(tmp_path / "nope.db", create=False)
    with pytest.raises(LedgerNotFoundError, match="does not exist"):
        Ledger(tmp_path / "no" / "dir" / "l.db")
    assert main(["ledger", "list", str(tmp_path / "nope.db")]) == 2
    assert not (tmp_path / "nope.db").exists()


# ------------------------------------------------------------------------- model store


def test_model_store_versions(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "m")
    assert store.latest() is None
    a = {"w": torch.randn(3, 2), "b": torch.arange(4)}
    tied = torch.randn(5)
    assert store.save(a, {"step": 1}) == 1
    assert store.save({"x": tied, "y": tied}, version=5) == 5
    assert store.versions() == [1, 5] and store.latest() == 5
    got = store.load(1)
    assert set(got) == {"w", "b"} and all(torch.equal(got[k], a[k]) for k in a)
    assert store.meta(1) == {"step": 1}
    assert torch.equal(store.load()["y"], tied)
    with pytest.raises(ModelVersionError, match="already exists"):
        store.save(a, version=1)
    with pytest.raises(ModelVersionError, match="missing"):
        store.load(3)
    with pytest.raises(ModelVersionError, match="was changed"):
        store.load(1, expected_sha256="0" * 64)
    with pytest.raises(TypeError, match=r"state_dict\['n'\] is a int"):
        store.save({"n": 3})
    with pytest.raises(ValueError, match="positive integer"):
        store.path(0)


def test_model_store_save_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = ModelStore(tmp_path / "m")
    store.save({"w": torch.zeros(3)})

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        store.save({"w": torch.ones(3)})
    monkeypatch.undo()
    assert sorted(p.name for p in store.directory.iterdir()) == ["model-000001.safetensors"]
    assert torch.equal(store.load()["w"], torch.zeros(3))


# ------------------------------------------------------------------------- recovery, locks


def test_recovery_rolls_back_a_dead_claim_and_deletes_its_file(tmp_path: Path) -> None:
    led = Ledger(tmp_path / "l.db", models=tmp_path / "m")
    led.register_model({"w": torch.zeros(4)})
    r = led.submit([1, 2], requester="a", reason="r")
    claim = led.claim_pending()
    led.models.save({"w": torch.ones(4)}, version=claim.version)  # written, never recorded
    led.close()  # the process "dies": the lock goes, the requests stay 'applying'
    raw = sqlite3.connect(tmp_path / "l.db")
    assert raw.execute("SELECT state FROM requests").fetchone()[0] == "applying"
    raw.close()
    led = Ledger(tmp_path / "l.db", models=tmp_path / "m")
    rec = led.last_recovery
    assert rec.rolled_back == [r.id] and rec.attempts == [claim.attempt]
    assert rec.pruned_versions == [claim.version]
    assert led.get(r.id).state == "pending" and led.models.versions() == [1]
    assert [e.kind for e in led.events(r.id)] == ["submitted", "claimed", "rolled_back"]
    new = _apply(led)
    assert new == claim.version + 1  # a version number is never reused
    assert led.verify().ok


def test_one_applier_at_a_time(tmp_path: Path) -> None:
    a = Ledger(tmp_path / "l.db", models=tmp_path / "m")
    a.register_model({"w": torch.zeros(4)})
    a.submit([1], requester="a", reason="r")
    claim = a.claim_pending()
    b = Ledger(tmp_path / "l.db", models=tmp_path / "m")
    assert b.last_recovery.skipped  # a live claim is not rolled back
    assert b.get(1).state == "applying"
    with pytest.raises(LedgerBusyError, match="another process"):
        b.claim_pending()
    with pytest.raises(LedgerBusyError):
        b.register_model({"w": torch.ones(4)})
    a.mark_applied(claim, claim.base_version)
    assert b.claim_pending().requests == ()  # free again, nothing pending
    a.close()
    b.close()


def test_a_claim_lost_to_recovery_cannot_commit(tmp_path: Path) -> None:
    a = Ledger(tmp_path / "l.db", models=tmp_path / "m")
    a.register_model({"w": torch.zeros(4)})
    a.submit([1], requester="a", reason="r")
    claim = a.claim_pending()
    a._lock.release()  # as if the lock had expired (a lease on a server database)
    b = Ledger(tmp_path / "l.db", models=tmp_path / "m")
    assert b.last_recovery.rolled_back == [1]
    v = a.models.save({"w": torch.ones(4)}, version=claim.version)
    with pytest.raises(LostClaimError, match="no longer held"):
        a.mark_applied(claim, v)
    assert b.get(1).state == "pending" and b.head() == 1
    assert b.verify(check_models=False).ok
    b.close()
    a.close()


def test_mark_applied_checks_the_version(ledger: Ledger) -> None:
    ledger.submit([1], requester="a", reason="r")
    claim = ledger.claim_pending()
    with pytest.raises(ModelVersionError, match="new version 2 or its base 1"):
        ledger.mark_applied(claim, 7)
    ledger.release(claim)
    assert ledger.get(1).state == "pending"


def test_readonly_refuses_writes(ledger: Ledger, tmp_path: Path) -> None:
    ro = Ledger(tmp_path / "ledger.db", readonly=True)
    with pytest.raises(LedgerError, match="read-only"):
        ro.submit([1], requester="a", reason="r")
    assert ro.head() == 1
    ro.close()


# ------------------------------------------------------------------------- CLI


def test_cli_request_list_show_verify(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    db = str(tmp_path / "l.db")
    args = ["request", "--ledger", db, "--ids", "3,1,2", "--requester", "alice",
            "--reason", "GDPR"]
    assert main(args) == 0
    assert "request 1: pending, 3 ids from 'alice'" in capsys.readouterr().out
    assert main(args) == 0
    assert "already recorded" in capsys.readouterr().out
    f = tmp_path / "req.json"
    f.write_text(json.dumps({"ids": [9], "requester": "bob", "reason": "spam", "key": "T-1"}))
    assert main(["request", "--ledger", db, "--ids-file", str(f), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["id"] == 2 and out["key"] == "T-1" and out["created"] is True
    assert main(["ledger", "list", db, "--state", "pending"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["ID", "STATE", "IDS"] and len(table) == 3
    assert table[2].split()[:4] == ["2", "pending", "1", "bob"]
    assert main(["ledger", "list", db, "--requester", "bob", "--json"]) == 0
    assert [r["id"] for r in json.loads(capsys.readouterr().out)] == [2]
    assert main(["ledger", "show", db, "1"]) == 0
    shown = capsys.readouterr().out
    assert "request 1: pending" in shown and "ids:        1,2,3" in shown
    assert "submitted" in shown
    assert main(["ledger", "verify", db]) == 0
    assert capsys.readouterr().out.startswith("ok: 2 events, 2 requests")
    _raw(tmp_path / "l.db", "UPDATE events SET at = 'yesterday' WHERE seq = 2")
    assert main(["ledger", "verify", db]) == 1
    err = capsys.readouterr().err
    assert "unlearn: ledger verification failed at event 2, request 2: its content does not " \
        "match its hash (the 'submitted' event was altered)" in err


def test_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    db = str(tmp_path / "l.db")
    base = ["request", "--ledger", db, "--requester", "a", "--reason", "r"]
    bad = tmp_path / "bad.json"
    bad.write_text("{ids: [1]}")
    assert main(base + ["--ids-file", str(bad)]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    known = tmp_path / "known.json"
    known.write_text(json.dumps(list(range(10))))
    assert main(base + ["--ids", "1,12,15", "--known-ids", str(known)]) == 2
    assert "2 unknown id(s): [12, 15]" in capsys.readouterr().err
    assert main(["request", "--ledger", db, "--ids", "1", "--reason", "r"]) == 2
    assert "--requester is required" in capsys.readouterr().err
    assert main(base + ["--ids", "1,1"]) == 2
    assert "repeated: [1]" in capsys.readouterr().err
    with Ledger(db) as led:  # none of these recorded anything
        assert led.list() == [] and led.events() == []
    assert main(["ledger", "show", db, "4"]) == 2
    assert "no request 4" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(base + ["--ids", "1,x"])
    assert info.value.code == 2
    with pytest.raises(SystemExit):
        main(["ledger"])
