"""``unlearn demo`` (the unlearning demo) and ``unlearn process`` / ``unlearn audit`` on a
user's project configured by a small file."""

from __future__ import annotations

import contextlib
import io
import json
import sqlite3
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("pytorch_lightning")

from unlearn.cli import main  # noqa: E402
from unlearn.ledger import Ledger  # noqa: E402

# ---------------------------------------------------------------------------- the demo


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("demo")
    stdout = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(stdout):
        code = main(["demo", "--out", str(out), "--fast", "--no-progress"])
    return {"code": code, "out": out, "seconds": time.perf_counter() - start,
            "stdout": stdout.getvalue()}


def test_demo_runs_fast_and_writes_the_files(demo: dict) -> None:
    assert demo["code"] == 0
    assert demo["seconds"] < 60
    out = demo["out"]
    for name in ("certificate.json", "report.html", "ledger.db", "summary.json"):
        assert (out / name).is_file(), name
    cert = json.loads((out / "certificate.json").read_text())
    assert cert["schema"] == "unlearn.certificate/1"
    assert len(cert["references"]["test_acc"]) == 3
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 2


def test_demo_ledger_holds_every_request(demo: dict, capsys: pytest.CaptureFixture) -> None:
    out = demo["out"]
    assert main(["ledger", "verify", str(out / "ledger.db"), "--models", str(out / "models")]) == 0
    capsys.readouterr()
    with Ledger(out / "ledger.db", readonly=True, create=False) as ledger:
        reqs = ledger.list()
        versions = ledger.versions()
    summary = json.loads((out / "summary.json").read_text())
    done = "certified" if summary["passed"] else "applied"
    # 5 single examples + one requester's block, the duplicate recorded once, one unknown id
    assert [r.state for r in reqs] == [done] * 6 + ["rejected"]
    assert [len(r.ids) for r in reqs[:6]] == [1] * 5 + [20]
    assert "not in the training set" in reqs[6].state_reason
    assert [v["version"] for v in versions] == [1, 2]
    assert summary["duplicate_recorded_again"] is False


def test_demo_prints_the_summary(demo: dict) -> None:
    text = demo["stdout"]
    assert "certificate: PASS" in text or "certificate: FAIL" in text
    for needle in ("forget_acc", "mia_efficacy", "cost: removal", "rejected", "clinic-b",
                   "hash chain verified"):
        assert needle in text, needle


def test_demo_rejects_bad_settings(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    afile = tmp_path / "f"
    afile.write_text("x")
    assert main(["demo", "--out", str(afile), "--fast"]) == 2
    assert "is not a directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo", "--references", "0"])
    assert main(["demo", "--out", str(tmp_path / "o"), "--references", "2", "--fast"]) == 2
    assert "n_references >= 3" in capsys.readouterr().err


# ---------------------------------------------------------------------------- process, audit

FACTORY = '''
import torch
from torch import nn
from unlearn.data import load_digits
from unlearn.tasks import ClassificationTask

def build():
    torch.manual_seed(0)
    digits = load_digits()
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    return (model, digits.subset(list(range(400))), digits.subset(list(range(1500, 1700))),
            ClassificationTask())
'''

CONFIG = '''
factory = "unlearn_test_project:build"
checkpoint = "model.pt"
method = "iau"
method_options = { step_scale = 10.0 }
out = "audit"
[recipe]
epochs = 8
lr = 0.05
batch_size = 64
'''


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project folder: factory module, trained checkpoint, config."""
    from torch.utils.data import DataLoader

    from baselines.retrain import Recipe, fit
    from unlearn.tasks import ClassificationTask

    root = tmp_path_factory.mktemp("project")
    (root / "unlearn_test_project.py").write_text(FACTORY)
    (root / "unlearn.toml").write_text(CONFIG)
    ns: dict = {}
    exec(FACTORY, ns)  # noqa: S102 - the test's own factory
    model, train, _, task = ns["build"]()
    fit(model, ClassificationTask(), DataLoader(train, batch_size=64),
        Recipe(epochs=8, lr=0.05, batch_size=64), torch.Generator().manual_seed(0))
    torch.save(model.state_dict(), root / "model.pt")
    return root


def _cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = main(argv)
    got = capsys.readouterr()
    return code, got.out, got.err


def test_process_then_audit(project: Path, tmp_path: Path,
                            capsys: pytest.CaptureFixture) -> None:
    db, cfg = str(tmp_path / "ledger.db"), str(project / "unlearn.toml")
    assert _cli(["request", "--ledger", db, "--ids", "5,6,7,8", "--requester", "ann",
                 "--reason", "gdpr"], capsys)[0] == 0
    assert _cli(["request", "--ledger", db, "--ids", "99999", "--requester", "bob",
                 "--reason", "typo"], capsys)[0] == 0
    code, out, err = _cli(["process", "--ledger", db, "--config", cfg], capsys)
    assert code == 0, err
    assert "request 2: rejected" in out and "requests [1]: applied with IAU" in out
    assert "model version 2" in out
    with Ledger(db, create=False, readonly=True) as ledger:
        assert [r.state for r in ledger.list()] == ["applied", "rejected"]
        assert ledger.versions()[0]["meta"]["source"] == "unlearn process"
    code, out, err = _cli(["process", "--ledger", db, "--config", cfg], capsys)
    assert code == 0 and "nothing to do" in out

    code, out, err = _cli(["audit", "--ledger", db, "--config", cfg, "--json",
                           "--no-progress"], capsys)
    assert code in (0, 1), err
    first = json.loads(out)
    assert first["retrained"] == 3 and (code == 0) == first["passed"]
    assert Path(first["certificate"]).parent == project / "audit"
    assert json.loads(Path(first["certificate"]).read_text())["schema"] == \
        "unlearn.certificate/1"
    with Ledger(db, create=False, readonly=True) as ledger:
        assert ledger.get(1).state == ("certified" if first["passed"] else "applied")
    code, out, _ = _cli(["audit", "--ledger", db, "--config", cfg, "--json", "--no-progress",
                         "--out", str(tmp_path / "again")], capsys)
    again = json.loads(out)
    assert again["retrained"] == 0 and again["passed"] == first["passed"]
    assert _cli(["ledger", "verify", db, "--models", str(tmp_path / "models")], capsys)[0] == 0


def _write_config(root: Path, text: str, name: str) -> str:
    path = root / name
    path.write_text(text)
    return str(path)


def test_process_and_audit_errors(project: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture) -> None:
    db = str(tmp_path / "ledger.db")
    cfg = str(project / "unlearn.toml")
    factory = 'factory = "unlearn_test_project:build"\n'
    cases = [
        (["process", "--ledger", str(tmp_path / "none.db"), "--config", cfg], "no ledger"),
        (["process", "--ledger", db, "--config", str(tmp_path / "nope.toml")],
         "no project file"),
        (["process", "--ledger", db, "--config", _write_config(tmp_path, "factory = [", "a.toml")],
         "not valid TOML"),
        (["process", "--ledger", db, "--config", _write_config(tmp_path, "x = 1\n", "b.toml")],
         "unknown setting(s) ['x']"),
        (["process", "--ledger", db, "--config",
          _write_config(tmp_path, 'factory = "no_such_module_xyz:build"\n', "c.toml")],
         "cannot import 'no_such_module_xyz'"),
        (["process", "--ledger", db, "--config",
          _write_config(tmp_path, factory + 'method = "magic"\n', "d.toml")],
         "unknown method 'magic'"),
        (["audit", "--ledger", db, "--config", cfg], "no model version"),
    ]
    Ledger(db).close()
    for argv, message in cases:
        code, _, err = _cli(argv, capsys)
        assert code == 2 and err.startswith("unlearn: error:") and message in err, (argv, err)
        assert "Traceback" not in err
    # a missing checkpoint (the config lives in tmp_path, next to no model.pt)
    missing = _write_config(tmp_path, factory + 'checkpoint = "model.pt"\n', "e.toml")
    (tmp_path / "unlearn_test_project.py").write_text(FACTORY)
    code, _, err = _cli(["process", "--ledger", db, "--config", missing], capsys)
    assert code == 2 and "missing checkpoint" in err, err
    # a malformed request file changes nothing
    bad = tmp_path / "req.json"
    bad.write_text('{"ids": [1, "x"], "requester": "a", "reason": "b"}')
    code, _, err = _cli(["request", "--ledger", db, "--ids-file", str(bad)], capsys)
    assert code == 2 and "unlearn: error:" in err
    with Ledger(db, create=False, readonly=True) as ledger:
        assert ledger.list() == []


def test_newer_ledger_schema_is_refused(project: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture) -> None:
    db = tmp_path / "ledger.db"
    Ledger(db).close()
    con = sqlite3.connect(db)
    con.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    con.commit()
    con.close()
    before = db.read_bytes()
    for cmd in ("process", "audit"):
        code, _, err = _cli([cmd, "--ledger", str(db), "--config",
                             str(project / "unlearn.toml")], capsys)
        assert code == 2 and "schema version 99" in err and "upgrade unlearn" in err, err
    assert db.read_bytes() == before


def test_process_with_newton(project: Path, tmp_path: Path,
                             capsys: pytest.CaptureFixture) -> None:
    """`method = "newton"` fits its estimator on the retained data (a file holds none)."""
    cfg = _write_config(project, CONFIG.replace('method = "iau"', 'method = "newton"')
                        .replace("method_options = { step_scale = 10.0 }",
                                 'method_options = { estimator = "ekfac", damping = 0.01 }'),
                        "newton.toml")
    db = str(tmp_path / "ledger.db")
    assert _cli(["request", "--ledger", db, "--ids", "5,6,7", "--requester", "ann",
                 "--reason", "gdpr"], capsys)[0] == 0
    code, out, err = _cli(["process", "--ledger", db, "--config", cfg], capsys)
    assert code == 0, err
    assert "applied with NewtonRemoval" in out
    bad = _write_config(project, CONFIG.replace('method = "iau"', 'method = "newton"')
                        .replace("method_options = { step_scale = 10.0 }",
                                 'method_options = { estimator = "nope" }'), "bad.toml")
    code, _, err = _cli(["process", "--ledger", db, "--config", bad], capsys)
    assert code == 2 and "unknown estimator 'nope'" in err
    # estimators without an inverse-HVP cannot drive a Newton step: named as unknown, with
    # the ones that can
    for name in ("tracin", "sgd"):
        cfg_bad = _write_config(project, CONFIG.replace('method = "iau"', 'method = "newton"')
                                .replace("method_options = { step_scale = 10.0 }",
                                         f'method_options = {{ estimator = "{name}" }}'),
                                f"bad_{name}.toml")
        code, _, err = _cli(["process", "--ledger", db, "--config", cfg_bad], capsys)
        assert code == 2 and f"unknown estimator '{name}'" in err and "'ekfac'" in err
