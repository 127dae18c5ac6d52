"""docs/api.md is generated from the code (``python -m unlearn._apidoc > docs/api.md``); this
keeps it from drifting: a new public name or a changed signature must be regenerated."""

from __future__ import annotations

from pathlib import Path

from unlearn._apidoc import render

API = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def test_api_reference_is_current():
    assert API.read_text() == render(), (
        "docs/api.md is out of date: run `python -m unlearn._apidoc > docs/api.md`")


def test_api_reference_covers_every_package():
    text = API.read_text()
    for section in ("`unlearn.influence`", "`unlearn.removal`", "`baselines`", "`unlearn.audit`",
                    "`unlearn.ledger`", "`unlearn.lightning`", "`unlearn.recommend`",
                    "`unlearn.generative`"):
        assert f"## {section}" in text, section
    for name in ("EKFACInfluence", "SGDInfluence", "GANInfluence", "IAU", "certify", "Ledger",
                 "TrainingLogCallback", "InteractionGraph"):
        assert name in text, name
