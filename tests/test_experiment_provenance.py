"""Result files of the MNIST unlearning experiment say how they were made."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import unlearning_mnist as um  # noqa: E402


def test_a_recorded_provenance_is_reported_with_command_date_and_machine():
    prov = um.provenance()
    assert set(prov) == {"command", "date", "commit", "machine"}
    text = um.provenance_text({"provenance": prov}, um.TUNING)
    assert prov["command"] in text and prov["date"] in text
    assert prov["machine"]["cpu"] in text and "CPU cores" in text


def test_a_file_without_provenance_says_so():
    text = um.provenance_text({}, Path("no/such/file.json"))
    assert "does not record" in text
