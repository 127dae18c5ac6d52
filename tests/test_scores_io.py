import pytest
import torch

from unlearn.influence.io import load_scores, save_scores


def test_round_trip_with_ids(tmp_path):
    S = torch.randn(3, 5, dtype=torch.float64)
    path = tmp_path / "s.safetensors"
    save_scores(path, S, query_ids=[7, 8, 9], train_ids=range(10, 15), meta={"est": "ekfac"})
    got = load_scores(path)
    assert torch.equal(got["scores"], S)
    assert got["query_ids"].tolist() == [7, 8, 9]
    assert got["train_ids"].tolist() == [10, 11, 12, 13, 14]
    assert got["meta"] == {"est": "ekfac"}
    assert [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="2-D"):
        save_scores(tmp_path / "a", torch.zeros(3))
    with pytest.raises(ValueError, match="train_ids"):
        save_scores(tmp_path / "a", torch.zeros(2, 3), train_ids=[1, 2])
    with pytest.raises(FileNotFoundError):
        load_scores(tmp_path / "missing")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="not a readable score file"):
        load_scores(corrupt)
