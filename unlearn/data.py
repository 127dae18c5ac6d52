"""Sample ids, the unit of deletion, and small real data sets.

Every sample carries a stable integer id. An :class:`IndexedDataset` wraps any map-style
dataset and yields ``(id, x, y)``; a ``DataLoader`` over it yields ``(ids, x, y)`` batches with
``ids`` a ``LongTensor``. Forget requests are expressed in ids, never in positions.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import tempfile
import urllib.request
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torch.utils.data._utils.collate import default_collate

__all__ = [
    "IndexedDataset",
    "UnknownIdError",
    "split_by_ids",
    "from_tensors",
    "load_digits",
    "load_breast_cancer",
    "load_mnist",
    "mnist_split",
    "flip_labels",
    "iter_batches",
    "default_cache_dir",
    "MNIST_MIRRORS",
    "MNIST_MD5",
]

IdsLike = Any  # int, sequence of ints, LongTensor or integer numpy array

_MAX_SHOWN = 10


class UnknownIdError(KeyError):
    """Some requested ids are not in the data set."""

    def __init__(self, unknown: Sequence[int]):
        self.unknown = list(unknown)
        shown = ", ".join(str(i) for i in self.unknown[:_MAX_SHOWN])
        more = "" if len(self.unknown) <= _MAX_SHOWN else ", ..."
        self.message = f"{len(self.unknown)} unknown id(s): [{shown}{more}]"
        super().__init__(self.message)

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.message


def _show(values: Sequence[int]) -> str:
    head = ", ".join(str(v) for v in values[:_MAX_SHOWN])
    return f"[{head}{', ...' if len(values) > _MAX_SHOWN else ''}]"


def _to_id_list(ids: IdsLike, what: str = "ids") -> list[int]:
    """Convert ints, sequences, tensors or numpy arrays of integers to a list of Python ints."""
    if isinstance(ids, torch.Tensor):
        arr = ids.detach().cpu().numpy()
    elif isinstance(ids, (range, list, tuple, np.ndarray)) or np.isscalar(ids):
        arr = np.asarray(ids)
    else:
        arr = np.asarray(list(ids))
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be 1-D, got shape {tuple(arr.shape)}")
    if arr.size == 0:
        return []
    if arr.dtype == np.bool_:
        raise ValueError(f"{what} must be integers, got a boolean mask")
    if np.issubdtype(arr.dtype, np.integer):
        return [int(v) for v in arr.tolist()]
    if np.issubdtype(arr.dtype, np.floating):
        bad = ~np.isfinite(arr)
        if bad.any():
            raise ValueError(f"{what} must be integers, got {arr[bad][0]} (NaN or infinite)")
        frac = arr != np.round(arr)
        if frac.any():
            raise ValueError(f"{what} must be integers, got the non-integer value {arr[frac][0]}")
        if np.abs(arr).max() >= 2**63:
            raise ValueError(f"{what} out of the int64 range")
        return [int(v) for v in arr.astype(np.int64).tolist()]
    raise ValueError(f"{what} must be integers, got dtype {arr.dtype}")


def _duplicates(values: Iterable[int]) -> list[int]:
    seen: set[int] = set()
    dups: list[int] = []
    for v in values:
        if v in seen and v not in dups:
            dups.append(v)
        seen.add(v)
    return dups


class IndexedDataset(Dataset):
    """A map-style data set whose items are ``(id, *item)`` with a stable integer id.

    ``dataset[k]`` must return a tuple such as ``(x, y)``; the default ids are ``0..n-1``.
    """

    def __init__(self, dataset: Dataset, ids: IdsLike | None = None):
        n = len(dataset)  # type: ignore[arg-type]
        self.dataset = dataset
        self._rows: list[int] = list(range(n))
        if ids is None:
            id_list = list(range(n))
        else:
            id_list = _to_id_list(ids)
            if len(id_list) != n:
                raise ValueError(f"got {len(id_list)} ids for a data set of {n} samples")
            dups = _duplicates(id_list)
            if dups:
                raise ValueError(f"ids must be unique; first duplicate id: {dups[0]}")
        self._set_ids(id_list)

    @classmethod
    def _view(cls, dataset: Dataset, rows: list[int], ids: list[int]) -> IndexedDataset:
        obj = cls.__new__(cls)
        obj.dataset = dataset
        obj._rows = rows
        obj._set_ids(ids)
        return obj

    def _set_ids(self, ids: list[int]) -> None:
        self.ids = torch.tensor(ids, dtype=torch.long)
        self._pos = {i: p for p, i in enumerate(ids)}

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, k: int) -> tuple:
        k = int(k)
        if k < 0:
            k += len(self)
        if not 0 <= k < len(self):
            raise IndexError(f"position {k} out of range for {len(self)} samples")
        item = self.dataset[self._rows[k]]
        item = tuple(item) if isinstance(item, (tuple, list)) else (item,)
        return (int(self.ids[k]), *item)

    def __contains__(self, sample_id: object) -> bool:
        return isinstance(sample_id, (int, np.integer)) and int(sample_id) in self._pos

    def __repr__(self) -> str:
        return f"IndexedDataset(n={len(self)}, dataset={type(self.dataset).__name__})"

    def index_of(self, ids: IdsLike) -> list[int]:
        """Positions of ``ids`` (in request order); raises :class:`UnknownIdError`."""
        id_list = _to_id_list(ids)
        unknown = [i for i in id_list if i not in self._pos]
        if unknown:
            raise UnknownIdError(unknown)
        return [self._pos[i] for i in id_list]

    def subset(self, ids: IdsLike) -> IndexedDataset:
        """The samples with ``ids``, in request order, keeping their ids."""
        id_list = _to_id_list(ids)
        dups = _duplicates(id_list)
        if dups:
            raise ValueError(f"duplicate ids requested: {_show(dups)}")
        pos = self.index_of(id_list)
        return IndexedDataset._view(self.dataset, [self._rows[p] for p in pos], id_list)

    def without(self, ids: IdsLike) -> IndexedDataset:
        """All samples except ``ids``, in the original order, keeping their ids."""
        drop = set(self.index_of(ids))
        keep = [p for p in range(len(self)) if p not in drop]
        return IndexedDataset._view(
            self.dataset, [self._rows[p] for p in keep], [int(self.ids[p]) for p in keep]
        )

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """Stack every field (without ids) into tensors, e.g. ``(x, y)``."""
        base = self.dataset
        if isinstance(base, TensorDataset):
            idx = torch.tensor(self._rows, dtype=torch.long)
            return tuple(t[idx] for t in base.tensors)
        items = [self[k][1:] for k in range(len(self))]
        if not items:
            raise ValueError("cannot stack an empty data set")
        return tuple(
            torch.stack([torch.as_tensor(f) for f in col]) for col in zip(*items, strict=True)
        )


def iter_batches(loader: DataLoader) -> Iterable[Any]:
    """The batches ``loader`` yields, fetched in bulk where that gives the same batches.

    A loader over an :class:`IndexedDataset` of tensors (``from_tensors``, MNIST, digits) with
    the default collate and no worker processes yields ``(ids, x, y)`` built by indexing the
    tensors with each batch's positions (the loader's own batch sampler, so the same order and
    the same random draws) instead of fetching and stacking samples one by one (that fetch
    was about a quarter of an IAU removal's time on the MNIST MLP of
    ``experiments/unlearning_mnist.py``, by cProfile).
    Any other loader is iterated as it is.
    """
    data = loader.dataset
    if not (isinstance(data, IndexedDataset) and isinstance(data.dataset, TensorDataset)
            and loader.collate_fn is default_collate and loader.batch_sampler is not None
            and loader.num_workers == 0):
        yield from loader
        return
    rows = torch.tensor(data._rows, dtype=torch.long)
    fields = data.dataset.tensors
    # a DataLoader iterator draws a base seed for its workers from the loader's generator
    # before its sampler draws anything: draw it too, so the sampler sees the same state
    torch.empty((), dtype=torch.int64).random_(generator=loader.generator)
    for positions in loader.batch_sampler:
        pos = torch.as_tensor(positions, dtype=torch.long)
        base = rows[pos]
        yield (data.ids[pos], *(t[base] for t in fields))


def split_by_ids(
    dataset: IndexedDataset, forget_ids: IdsLike
) -> tuple[IndexedDataset, IndexedDataset]:
    """Split into ``(forget, retain)``, both in the data set's order and keeping ids."""
    id_list = _to_id_list(forget_ids, "forget_ids")
    if not id_list:
        raise ValueError("forget_ids is empty: nothing to forget")
    dups = _duplicates(id_list)
    if dups:
        raise ValueError(f"forget_ids contains duplicate ids: {_show(dups)}")
    pos = sorted(dataset.index_of(id_list))
    forget = dataset.subset([int(dataset.ids[p]) for p in pos])
    return forget, dataset.without(id_list)


def from_tensors(x: torch.Tensor, y: torch.Tensor, ids: IdsLike | None = None) -> IndexedDataset:
    """An :class:`IndexedDataset` over ``(x[i], y[i])`` pairs."""
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} rows but y has {len(y)}")
    return IndexedDataset(TensorDataset(x, y), ids)


# ---------------------------------------------------------------------------- sklearn sets


def load_digits(flatten: bool = True, normalize: bool = True) -> IndexedDataset:
    """scikit-learn's 1,797 8x8 digits: x ``[64]`` (or ``[1, 8, 8]``), pixels /16 to [0, 1]."""
    from sklearn.datasets import load_digits as _load

    bunch = _load()
    x = torch.tensor(bunch.data, dtype=torch.float32)
    if normalize:
        x = x / 16.0
    if not flatten:
        x = x.reshape(-1, 1, 8, 8)
    return from_tensors(x, torch.tensor(bunch.target, dtype=torch.long))


def load_breast_cancer(standardize: bool = True) -> IndexedDataset:
    """scikit-learn's 569 x 30 breast-cancer set; features z-scored, labels 0/1."""
    from sklearn.datasets import load_breast_cancer as _load

    bunch = _load()
    x = np.asarray(bunch.data, dtype=np.float64)
    if standardize:
        std = x.std(axis=0)
        x = (x - x.mean(axis=0)) / np.where(std > 0, std, 1.0)
    return from_tensors(
        torch.tensor(x, dtype=torch.float32), torch.tensor(bunch.target, dtype=torch.long)
    )


# ---------------------------------------------------------------------------- MNIST

MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f9a7dbf",
}


def default_cache_dir() -> Path:
    """``$UNLEARN_CACHE`` or ``~/.cache/unlearn``."""
    return Path(os.environ.get("UNLEARN_CACHE") or "~/.cache/unlearn").expanduser()


def _find(root: Path, name: str) -> Path | None:
    for cand in (root / name, root / f"{name}.gz"):
        if cand.is_file():
            return cand
    return None


def _download(root: Path, gz_name: str) -> Path:
    """Fetch ``gz_name`` from the mirrors, check its md5, and write it atomically."""
    root.mkdir(parents=True, exist_ok=True)
    dest = root / gz_name
    errors = []
    for mirror in MNIST_MIRRORS:
        url = mirror + gz_name
        fd, tmp = tempfile.mkstemp(prefix=f".{gz_name}.", dir=root)
        try:
            md5 = hashlib.md5()
            with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=60) as r:
                while chunk := r.read(1 << 20):
                    md5.update(chunk)
                    f.write(chunk)
            if md5.hexdigest() != MNIST_MD5[gz_name]:
                raise ValueError(f"md5 {md5.hexdigest()} != expected {MNIST_MD5[gz_name]}")
            os.replace(tmp, dest)
            return dest
        except Exception as e:  # try the next mirror
            errors.append(f"{url}: {e}")
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    raise RuntimeError(f"could not download {gz_name}:\n  " + "\n  ".join(errors))


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse an unsigned-byte IDX file (gzipped or not) into a uint8 array."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise ValueError(f"{path}: corrupt or truncated gzip file ({e})") from e
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX file ({len(raw)} bytes)")
    if raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] != ndim:
        magic = int.from_bytes(raw[:4], "big")
        raise ValueError(
            f"{path}: bad IDX magic number {magic} (expected {0x0800 + ndim}: "
            f"unsigned bytes, {ndim} dimension(s))"
        )
    dims = [int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4)]
    size = int(np.prod(dims))
    if len(raw) - header != size:
        raise ValueError(
            f"{path}: IDX file is truncated or corrupt: header says {dims} "
            f"({size} bytes) but it holds {len(raw) - header} bytes of data"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def load_mnist(
    root: str | os.PathLike | None = None,
    train: bool = True,
    download: bool = False,
    flatten: bool = False,
) -> IndexedDataset:
    """MNIST from the original IDX files in ``root`` (default ``<cache>/mnist``).

    x: float32 in [0, 1], shape ``[1, 28, 28]`` (``[784]`` when ``flatten``); y: int64;
    ids are the positions in the file.
    """
    root = Path(root).expanduser() if root is not None else default_cache_dir() / "mnist"
    prefix = "train" if train else "t10k"
    names = [f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"]
    paths = [_find(root, n) for n in names]
    missing = [n for n, p in zip(names, paths, strict=True) if p is None]
    if missing:
        if not download:
            expected = ", ".join(f"{n}(.gz)" for n in missing)
            raise FileNotFoundError(
                f"MNIST files missing in {root}: expected {expected}; "
                "pass download=True to fetch them"
            )
        paths = [
            p if p is not None else _download(root, f"{n}.gz")
            for n, p in zip(names, paths, strict=True)
        ]
    images = _read_idx(paths[0], 3)
    labels = _read_idx(paths[1], 1)
    if len(images) != len(labels):
        raise ValueError(
            f"{paths[0]} has {len(images)} images but {paths[1]} has {len(labels)} labels"
        )
    if labels.size and labels.max() > 9:
        raise ValueError(f"{paths[1]}: label {int(labels.max())} out of range 0..9")
    x = torch.from_numpy(images.astype(np.float32) / 255.0)
    x = x.reshape(len(x), -1) if flatten else x.unsqueeze(1)
    return from_tensors(x, torch.from_numpy(labels.astype(np.int64)))


def mnist_split(
    root: str | os.PathLike | None,
    n_train: int = 5000,
    n_query: int = 500,
    seed: int | None = None,
    flatten: bool = True,
) -> tuple[IndexedDataset, IndexedDataset, IndexedDataset]:
    """``(train, query, heldout)`` from the 10,000 t10k digits, sized as dattri's MNIST
    benchmark (5,000 / 500 / rest).

    With ``seed=None`` (default) the parts are contiguous in file order: the first ``n_train``
    digits, the next ``n_query``, then the rest. An integer seed draws a random permutation
    instead. Each part is in file order and ids are file positions.
    """
    full = load_mnist(root, train=False, flatten=flatten)
    n = len(full)
    if n_train < 1 or n_query < 0 or n_train + n_query > n:
        raise ValueError(f"n_train={n_train} + n_query={n_query} must fit in {n} samples")
    if seed is None:
        perm = list(range(n))
    else:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    parts = (perm[:n_train], perm[n_train : n_train + n_query], perm[n_train + n_query :])
    return tuple(full.subset(sorted(p)) for p in parts)  # type: ignore[return-value]


def flip_labels(
    dataset: IndexedDataset, fraction: float, num_classes: int, seed: int = 0
) -> tuple[IndexedDataset, torch.Tensor]:
    """A copy with ``round(fraction * n)`` labels moved to a different random class.

    Returns the noisy data set (same ids) and the sorted ids whose labels were flipped.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    x, y = dataset.tensors()[:2]
    y = torch.as_tensor(y, dtype=torch.long).clone()
    if y.numel() and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got {y.min()}..{y.max()}")
    n = len(y)
    g = torch.Generator().manual_seed(seed)
    pos = torch.randperm(n, generator=g)[: int(round(fraction * n))]
    shift = torch.randint(1, num_classes, (len(pos),), generator=g)
    y[pos] = (y[pos] + shift) % num_classes
    flipped = dataset.ids[pos].sort().values
    return from_tensors(x, y, ids=dataset.ids.clone()), flipped
