"""CertificationCallback: certify an unlearning round against cached retrained references."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

pl = pytest.importorskip("pytorch_lightning")

from baselines.retrain import Recipe, Retrain  # noqa: E402
from unlearn.audit import SCHEMA, Certificate  # noqa: E402
from unlearn.data import IndexedDataset, load_digits  # noqa: E402
from unlearn.ledger import Ledger  # noqa: E402
from unlearn.lightning import CertificationCallback, UnlearningCallback  # noqa: E402
from unlearn.removal import IAU  # noqa: E402
from unlearn.tasks import ClassificationTask  # noqa: E402
from unlearn.unlearn_demo import DigitsMLP  # noqa: E402

EPOCHS, LR, BATCH = 8, 0.05, 64
RECIPE = Recipe(epochs=EPOCHS, lr=LR, batch_size=BATCH, momentum=0.9, weight_decay=5e-4)
REQUESTS = ([3, 50, 120, 333, 401], list(range(200, 215)))


def _data() -> tuple[IndexedDataset, IndexedDataset]:
    digits = load_digits()
    return digits.subset(list(range(500))), digits.subset(list(range(1500, 1700)))


def _ledger(path: Path) -> Ledger:
    ledger = Ledger(path / "ledger.db", models=path / "models")
    for n, ids in enumerate(REQUESTS):
        ledger.submit(ids, requester=f"user-{n}", reason="erasure")
    return ledger


def _fit(module: pl.LightningModule, train: IndexedDataset, callbacks: list) -> None:
    loader = DataLoader(train, batch_size=BATCH, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    trainer = pl.Trainer(max_epochs=EPOCHS, accelerator="cpu", devices=1, callbacks=callbacks,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, loader)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Train with UnlearningCallback + CertificationCallback attached as its listener."""
    tmp = tmp_path_factory.mktemp("cert")
    train, test = _data()
    torch.manual_seed(0)
    ledger = _ledger(tmp)
    unl = UnlearningCallback(ledger, IAU(ClassificationTask(), step_scale=10.0),
                             train_dataset=train)
    cert = CertificationCallback(ledger, RECIPE, train_dataset=train, test_dataset=test,
                                 out_dir=tmp / "audit", cache_dir=tmp / "refs").attach(unl)
    module = DigitsMLP(hidden=32, lr=LR, momentum=0.9, weight_decay=5e-4)
    _fit(module, train, [unl, cert])
    return {"tmp": tmp, "ledger": ledger, "cert": cert, "module": module, "train": train,
            "test": test}


def test_listener_certifies_the_applied_requests(run: dict) -> None:
    ledger, cb = run["ledger"], run["cert"]
    assert len(cb.history) == 1
    rec = cb.history[0]
    assert sorted(rec.request_ids) == [1, 2]
    assert rec.retrained == 3 and rec.n_forget == 20 and rec.model_version == 2
    cert = Certificate.from_json(rec.certificate)
    assert cert.schema == SCHEMA and len(cert.config["seeds"]) == 3
    assert cert.config["n_forget"] == 20 and cert.config["n_retain"] == 480
    assert cert.original is not None  # the pre-removal version, loaded from the model store
    assert cert.cost["removal_seconds"] > 0 and cert.cost["retrain_seconds_mean"] > 0
    assert cert.passed, cert.summary()  # IAU at this step matches retraining on this MLP
    for rid in (1, 2):
        req = ledger.get(rid)
        assert req.state == "certified"
        ev = ledger.events(rid)[-1]
        assert ev.kind == "certified"
        details = ev.data["details"]
        assert details["passed"] is True and details["failed_checks"] == []
        assert details["certificate"] == rec.certificate and details["model_version"] == 2
    assert ledger.verify().ok
    html = Path(rec.report).read_text()
    assert "data:image/png;base64," in html
    assert [t["request_id"] for t in cert.timeline] == [1, 2]
    # the files are written after the ledger update: their timeline ends in 'certified'
    for t in cert.timeline:
        assert t["state"] == "certified"
        assert [e["kind"] for e in t["events"]][-2:] == ["applied", "certified"]
    assert cb.last.timeline == cert.timeline
    states = re.findall(r"<td class='state'>([^<]+)</td>", html)
    assert states == ["certified", "certified"]
    assert "applied → certified" in html
    assert not list(Path(rec.report).parent.glob(".*.tmp"))  # no half-written file left


def test_second_audit_reuses_the_cached_references(run: dict) -> None:
    cb = run["cert"]
    first = Certificate.from_json(cb.history[0].certificate)
    again = cb.certify_now(None, run["module"], [1, 2])
    assert cb.history[-1].retrained == 0 and all(again.config["cached"])
    assert again.config["cache_keys"] == first.config["cache_keys"]
    for name, value in first.metrics.items():  # same model, same references: same numbers
        assert again.metrics[name] == pytest.approx(value, abs=1e-9), name
    assert cb.history[-1].certified == []  # already certified: nothing moves


def test_failing_certificate_leaves_requests_applied(run: dict, tmp_path: Path) -> None:
    """A model that was never trained fails, and the ledger says applied, not certified."""
    train, test = run["train"], run["test"]
    ledger = _ledger(tmp_path)
    torch.manual_seed(1)
    untrained = DigitsMLP(hidden=32, lr=LR, momentum=0.9, weight_decay=5e-4)
    unl = UnlearningCallback(ledger, IAU(ClassificationTask(), step_scale=10.0),
                             train_dataset=train, when="manual")
    unl.process_now(None, untrained)
    assert [r.state for r in ledger.list()] == ["applied", "applied"]
    cb = CertificationCallback(ledger, RECIPE, train_dataset=train, test_dataset=test,
                               out_dir=tmp_path / "audit", cache_dir=run["tmp"] / "refs")
    cert = cb.certify_now(None, untrained)
    rec = cb.history[-1]
    assert not cert.passed and "test_acc" in cert.failed
    assert rec.retrained == 0  # the same forgotten ids and recipe: the first test's cache
    assert rec.certified == [] and not rec.passed and "test_acc" in rec.failed_checks
    assert [r.state for r in ledger.list()] == ["applied", "applied"]
    saved = json.loads(Path(rec.certificate).read_text())
    assert saved["passed"] is False
    assert ledger.verify().ok


def test_certify_failed_records_the_verdict(run: dict, tmp_path: Path) -> None:
    train, test = run["train"], run["test"]
    ledger = _ledger(tmp_path)
    untrained = DigitsMLP(hidden=32)
    UnlearningCallback(ledger, IAU(ClassificationTask()), train_dataset=train,
                       when="manual").process_now(None, untrained)
    cb = CertificationCallback(ledger, RECIPE, train_dataset=train, test_dataset=test,
                               out_dir=tmp_path / "audit", cache_dir=run["tmp"] / "refs",
                               certify_failed=True, html=False)
    cb.certify_now(None, untrained)
    assert [r.state for r in ledger.list()] == ["certified", "certified"]
    assert ledger.events(1)[-1].data["details"]["passed"] is False
    assert cb.history[-1].report is None


def test_state_dict_round_trip(run: dict, tmp_path: Path) -> None:
    cb = run["cert"]
    other = CertificationCallback(run["ledger"], RECIPE, train_dataset=run["train"],
                                  test_dataset=run["test"], out_dir=tmp_path)
    other.load_state_dict(json.loads(json.dumps(cb.state_dict())))
    assert other.history == cb.history
    with pytest.raises(ValueError, match="newer"):
        other.load_state_dict({"version": 2, "history": []})


def test_retrain_reference_and_bad_arguments(run: dict, tmp_path: Path) -> None:
    train, test = run["train"], run["test"]
    kw = {"train_dataset": train, "test_dataset": test, "out_dir": tmp_path}
    with pytest.raises(ValueError, match="n_references must be an integer >= 3"):
        CertificationCallback(run["ledger"], RECIPE, n_references=2, **kw)
    with pytest.raises(TypeError, match="baselines.Retrain or a baselines.Recipe"):
        CertificationCallback(run["ledger"], object(), **kw)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="IndexedDataset"):
        CertificationCallback(run["ledger"], RECIPE, train_dataset=[1, 2], test_dataset=test,
                              out_dir=tmp_path)
    ledger = Ledger(tmp_path / "l.db", models=tmp_path / "m")
    ledger.submit([1], requester="a", reason="b")
    retrain = Retrain(ClassificationTask(), lambda: DigitsMLP(hidden=32), recipe=RECIPE)
    cb = CertificationCallback(ledger, retrain, **kw)
    with pytest.raises(ValueError, match="only applied requests can be certified"):
        cb.certify_now(None, run["module"], [1])
    with pytest.raises(ValueError, match="nothing to certify"):
        cb.certify_now(None, run["module"])


class _NeedsArgs(pl.LightningModule):
    """A module that does not save its hyper-parameters: no factory can be derived."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.net = torch.nn.Linear(64, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_recipe_needs_saved_hyperparameters(run: dict, tmp_path: Path) -> None:
    train, test = run["train"], run["test"]
    ledger = _ledger(tmp_path)
    module = _NeedsArgs(10)
    UnlearningCallback(ledger, IAU(ClassificationTask()), train_dataset=train,
                       when="manual").process_now(None, module)
    cb = CertificationCallback(ledger, RECIPE, train_dataset=train, test_dataset=test,
                               out_dir=tmp_path / "audit", cache_dir=tmp_path / "refs")
    with pytest.raises(TypeError, match="save_hyperparameters"):
        cb.certify_now(None, module)
