"""Tests for unlearn.data: ids, splits, loaders."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from unlearn.data import (
    IndexedDataset,
    UnknownIdError,
    flip_labels,
    from_tensors,
    load_breast_cancer,
    load_digits,
    load_mnist,
    mnist_split,
    split_by_ids,
)

MNIST_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist-t10k"
needs_mnist = pytest.mark.skipif(
    not (MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
    reason=f"MNIST t10k files not found in {MNIST_DIR}",
)


def toy(n: int = 10, ids=None) -> IndexedDataset:
    x = torch.arange(n, dtype=torch.float32).unsqueeze(1)
    return from_tensors(x, torch.arange(n) % 3, ids=ids)


class PlainDataset(Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int):
        return torch.full((2,), float(i)), i % 2


def test_default_ids_stable_and_unique():
    ds = toy(10)
    assert ds.ids.tolist() == list(range(10))
    assert [ds[k][0] for k in range(10)] == list(range(10))
    assert all(isinstance(ds[k][0], int) for k in range(10))
    idx, x, y = ds[3]
    assert idx == 3 and x.item() == 3.0 and y.item() == 0
    assert ds[-1][0] == 9
    with pytest.raises(IndexError):
        ds[10]


def test_custom_ids_and_validation():
    ds = toy(4, ids=[40, 10, 30, 20])
    assert ds[1][0] == 10 and ds.index_of([20, 40]) == [3, 0]
    wrapped = IndexedDataset(PlainDataset(), ids=np.array([7, 8, 9, 6]))
    assert wrapped[0][0] == 7 and wrapped[3][2] == 1
    with pytest.raises(ValueError, match="3 ids"):
        toy(4, ids=[1, 2, 3])
    with pytest.raises(ValueError, match="duplicate id: 5"):
        toy(4, ids=[1, 5, 2, 5])
    with pytest.raises(ValueError, match="integer"):
        toy(2, ids=[0.5, 1.0])


def test_index_of_unknown():
    ds = toy(5)
    with pytest.raises(UnknownIdError) as exc:
        ds.index_of(list(range(3, 20)))
    assert isinstance(exc.value, KeyError)
    assert exc.value.unknown == list(range(5, 20))
    msg = str(exc.value)
    assert "15 unknown" in msg and "5, 6" in msg and "15" in msg and "..." in msg


def test_subset_and_without_keep_ids():
    ds = toy(10, ids=list(range(100, 110)))
    sub = ds.subset([105, 101])
    assert sub.ids.tolist() == [105, 101]
    assert [sub[k][1].item() for k in range(2)] == [5.0, 1.0]
    rest = ds.without(torch.tensor([100, 109, 104]))
    assert rest.ids.tolist() == [101, 102, 103, 105, 106, 107, 108]
    assert rest[2][0] == 103 and rest[2][1].item() == 3.0
    nested = rest.subset([106]).without([])
    assert nested[0][0] == 106 and nested[0][1].item() == 6.0
    with pytest.raises(UnknownIdError):
        rest.subset([100])
    with pytest.raises(ValueError, match="duplicate"):
        ds.subset([101, 101])


def test_split_by_ids_inputs():
    ds = toy(10)
    for req in ([7, 2], torch.tensor([7, 2]), np.array([7, 2], dtype=np.int32), (2.0, 7.0)):
        forget, retain = split_by_ids(ds, req)
        assert forget.ids.tolist() == [2, 7]
        assert retain.ids.tolist() == [0, 1, 3, 4, 5, 6, 8, 9]
        assert set(forget.ids.tolist()).isdisjoint(retain.ids.tolist())


def test_split_by_ids_errors():
    ds = toy(10)
    with pytest.raises(ValueError, match="empty"):
        split_by_ids(ds, [])
    with pytest.raises(ValueError, match="empty"):
        split_by_ids(ds, torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError, match=r"duplicate ids: \[3\]"):
        split_by_ids(ds, [3, 1, 3])
    with pytest.raises(UnknownIdError, match="2 unknown"):
        split_by_ids(ds, [1, 11, 12])
    with pytest.raises(ValueError, match="NaN"):
        split_by_ids(ds, [1.0, float("nan")])
    with pytest.raises(ValueError, match="non-integer value 1.5"):
        split_by_ids(ds, np.array([1.5, 2.0]))
    with pytest.raises(ValueError, match="integers"):
        split_by_ids(ds, ["a"])


def test_loader_batches_are_ids_x_y():
    ds = toy(10, ids=list(range(50, 60)))
    ids, x, y = next(iter(DataLoader(ds, batch_size=4)))
    assert ids.dtype == torch.long and ids.tolist() == [50, 51, 52, 53]
    assert x.shape == (4, 1) and y.shape == (4,)
    ids, x, y = next(iter(DataLoader(IndexedDataset(PlainDataset()), batch_size=4)))
    assert ids.dtype == torch.long and x.shape == (4, 2) and y.tolist() == [0, 1, 0, 1]


def test_digits_and_breast_cancer():
    d = load_digits()
    assert len(d) == 1797
    x, y = d.tensors()
    assert x.shape == (1797, 64) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min() >= 0 and x.max() <= 1 and x.max() == 1
    assert sorted(y.unique().tolist()) == list(range(10))
    assert load_digits(flatten=False)[0][1].shape == (1, 8, 8)
    assert load_digits(normalize=False).tensors()[0].max() == 16

    b = load_breast_cancer()
    x, y = b.tensors()
    assert x.shape == (569, 30) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert set(y.tolist()) == {0, 1}
    assert torch.allclose(x.mean(0), torch.zeros(30), atol=1e-4)
    assert torch.allclose(x.std(0, unbiased=False), torch.ones(30), atol=1e-3)


@needs_mnist
def test_mnist_real_file():
    ds = load_mnist(MNIST_DIR, train=False)
    assert len(ds) == 10000
    x, y = ds.tensors()
    assert x.shape == (10000, 1, 28, 28) and x.dtype == torch.float32
    assert x.min() == 0 and x.max() == 1
    counts = torch.bincount(y, minlength=10)
    assert counts.sum() == 10000 and counts.min() > 850 and counts.max() < 1200
    assert y[:5].tolist() == [7, 2, 1, 0, 4]  # the well-known first t10k labels
    assert ds.ids.tolist() == list(range(10000))
    assert load_mnist(MNIST_DIR, train=False, flatten=True)[0][1].shape == (784,)
    raw = gzip.decompress((MNIST_DIR / "t10k-labels-idx1-ubyte.gz").read_bytes())
    assert len(raw) == 10008 and hashlib.md5(raw).hexdigest()


@needs_mnist
def test_mnist_uncompressed_and_corrupt(tmp_path: Path):
    images = gzip.decompress((MNIST_DIR / "t10k-images-idx3-ubyte.gz").read_bytes())
    labels = gzip.decompress((MNIST_DIR / "t10k-labels-idx1-ubyte.gz").read_bytes())
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(labels)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(images[:-100])
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte"):
        load_mnist(tmp_path, train=False)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x01" + images[4:])
    with pytest.raises(ValueError, match="magic"):
        load_mnist(tmp_path, train=False)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(images)
    assert len(load_mnist(tmp_path, train=False)) == 10000

    gz_dir = tmp_path / "gz"
    gz_dir.mkdir()
    gz = (MNIST_DIR / "t10k-images-idx3-ubyte.gz").read_bytes()
    (gz_dir / "t10k-images-idx3-ubyte.gz").write_bytes(gz[: len(gz) // 2])
    (gz_dir / "t10k-labels-idx1-ubyte.gz").write_bytes(
        (MNIST_DIR / "t10k-labels-idx1-ubyte.gz").read_bytes()
    )
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz"):
        load_mnist(gz_dir, train=False)


def test_mnist_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    with pytest.raises(FileNotFoundError) as exc:
        load_mnist(tmp_path / "nowhere", train=True)
    msg = str(exc.value)
    assert "nowhere" in msg and "train-images-idx3-ubyte" in msg and "download=True" in msg
    monkeypatch.setenv("UNLEARN_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "cache" / "mnist")):
        load_mnist(train=False)


@needs_mnist
def test_mnist_split():
    train, query, held = mnist_split(MNIST_DIR)
    assert (len(train), len(query), len(held)) == (5000, 500, 4500)
    sets = [set(s.ids.tolist()) for s in (train, query, held)]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    assert set.union(*sets) == set(range(10000))
    assert train[0][1].shape == (784,)
    again = mnist_split(MNIST_DIR, n_train=100, n_query=10)
    assert again[0].ids.tolist() == mnist_split(MNIST_DIR, n_train=100, n_query=10)[0].ids.tolist()
    other = mnist_split(MNIST_DIR, n_train=100, n_query=10, seed=1)
    assert other[0].ids.tolist() != again[0].ids.tolist()
    full = load_mnist(MNIST_DIR, train=False, flatten=True)
    k = train.ids[7].item()
    assert torch.equal(train[7][1], full[k][1]) and train[7][2] == full[k][2]


def test_flip_labels():
    ds = from_tensors(torch.randn(200, 3), torch.arange(200) % 4, ids=list(range(1000, 1200)))
    noisy, flipped = flip_labels(ds, fraction=0.1, num_classes=4, seed=0)
    assert flipped.dtype == torch.long and len(flipped) == 20
    assert noisy.ids.tolist() == ds.ids.tolist()
    x0, y0 = ds.tensors()
    x1, y1 = noisy.tensors()
    assert torch.equal(x0, x1)
    changed = ds.ids[y0 != y1]
    assert sorted(changed.tolist()) == flipped.tolist()
    assert (y1 >= 0).all() and (y1 < 4).all()
    assert torch.equal(y0, ds.tensors()[1])  # the original is untouched
    again = flip_labels(ds, fraction=0.1, num_classes=4, seed=0)[1]
    assert torch.equal(again, flipped)
    everything = flip_labels(ds, fraction=1.0, num_classes=2 + 2, seed=3)[0]
    assert (everything.tensors()[1] != y0).all()
    with pytest.raises(ValueError):
        flip_labels(ds, fraction=1.5, num_classes=4, seed=0)
    with pytest.raises(ValueError):
        flip_labels(ds, fraction=0.1, num_classes=3, seed=0)  # label 3 out of range


@needs_mnist
def test_mnist_download_mocked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """download=True fetches the .gz files (served locally here), checks md5, leaves no temp."""
    import io
    import urllib.request

    calls: list[str] = []

    def fake_urlopen(url: str, timeout: float = 0):
        calls.append(url)
        if url.startswith("https://ossci"):
            raise OSError("mirror down")
        return io.BytesIO((MNIST_DIR / url.rsplit("/", 1)[1]).read_bytes())

    # The shared copies were re-compressed, so their .gz md5 differs from the originals'.
    import unlearn.data as data_mod

    local_md5 = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in MNIST_DIR.glob("*.gz")}
    monkeypatch.setattr(data_mod, "MNIST_MD5", {**data_mod.MNIST_MD5, **local_md5})
    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    ds = load_mnist(tmp_path, train=False, download=True)
    assert len(ds) == 10000 and len(calls) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ]

    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=0: io.BytesIO(b"junk"))
    with pytest.raises(RuntimeError, match="md5"):
        load_mnist(tmp_path / "bad", train=False, download=True)
    assert list((tmp_path / "bad").iterdir()) == []


def test_iter_batches_equals_the_loader_batch_for_batch():
    from torch.utils.data import DataLoader, SubsetRandomSampler

    from unlearn.data import iter_batches

    data = from_tensors(torch.randn(50, 3), torch.randint(0, 4, (50,)),
                        ids=list(range(100, 150))).without([101, 120, 149]).subset(
        [130, 102, 140, 103, 104, 105, 106, 107, 108, 109, 110, 111])
    settings = [dict(batch_size=5), dict(batch_size=5, drop_last=True),
                dict(batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(3)),
                dict(batch_size=3, sampler=SubsetRandomSampler(
                    [0, 2, 5, 7], generator=torch.Generator().manual_seed(1)))]
    for kw in settings:
        gen = kw.get("generator")
        state = None if gen is None else gen.get_state()
        expected = list(DataLoader(data, **kw))
        if gen is not None:
            gen.set_state(state)
        sampler = kw.get("sampler")
        if sampler is not None:
            sampler.generator.manual_seed(1)
        got = list(iter_batches(DataLoader(data, **kw)))
        assert len(got) == len(expected) > 0
        for a, b in zip(got, expected, strict=True):
            for ta, tb in zip(a, b, strict=True):
                assert ta.dtype == tb.dtype and torch.equal(ta, tb)


def test_iter_batches_passes_other_loaders_through():
    from torch.utils.data import DataLoader

    from unlearn.data import iter_batches

    pairs = [(torch.tensor([float(i)]), i % 2) for i in range(7)]
    assert [b[1].tolist() for b in iter_batches(DataLoader(pairs, batch_size=3))] == \
        [[0, 1, 0], [1, 0, 1], [0]]
