"""User–item interaction data for recommendation unlearning, with stable interaction ids.

Conventions (every recommendation module relies on them):

* users are ``0..n_users-1`` and items ``0..n_items-1``: contiguous local indices;
* the interaction table ``interactions`` is ``[N, 2]`` (user, item) and an interaction's id is
  its row: ids never change, whatever is removed later;
* the homogeneous graph fed to :class:`torch_geometric.nn.models.LightGCN` has the users as
  nodes ``0..U-1`` and the items as nodes ``U..U+I-1``; every training interaction appears in
  both directions in :meth:`InteractionGraph.edge_index`;
* a deletion request is a set of training interaction ids; "forget user u" expands to
  :meth:`InteractionGraph.user_interaction_ids`.

Implicit feedback from MovieLens-100K: a rating ``>= min_rating`` (default 4) is an
interaction; ``min_rating=None`` keeps every rating.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from unlearn.data import _show, _to_id_list, default_cache_dir

__all__ = [
    "InteractionGraph",
    "in_sorted",
    "load_movielens_100k",
    "read_movielens_ratings",
    "ML100K_URL",
    "ML100K_MD5",
]

ML100K_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
ML100K_MD5 = "0e33842e24a9c977be4e0107933c0723"  # GroupLens' published md5 of the zip


def in_sorted(keys: Tensor, sorted_keys: Tensor) -> Tensor:
    """``torch.isin(keys, sorted_keys)`` for an ascending ``sorted_keys``, by binary search
    (several times faster than ``isin`` for a few thousand keys against a whole graph's)."""
    if sorted_keys.numel() == 0:
        return torch.zeros_like(keys, dtype=torch.bool)
    pos = torch.searchsorted(sorted_keys, keys).clamp(max=sorted_keys.numel() - 1)
    return sorted_keys[pos] == keys


def _as_long(values: Any, what: str) -> Tensor:
    t = torch.as_tensor(values)
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.dtype.is_complex:
        raise ValueError(f"{what} must be integers, got dtype {t.dtype}")
    return t.to(torch.long)


@dataclass(frozen=True, eq=False)
class InteractionGraph:
    """A bipartite user–item graph with a train/test split of its interactions.

    ``interactions[k] = (user, item)`` is interaction ``k``; ``train_ids`` (sorted) are the
    interactions of the training graph, ``test_ids`` the held-out ones. :meth:`without` returns
    the graph minus some training interactions, sharing the same table, so ids stay valid.
    ``user_labels`` / ``item_labels`` map local indices back to the data set's raw ids.
    """

    n_users: int
    n_items: int
    interactions: Tensor
    train_ids: Tensor
    test_ids: Tensor
    user_labels: np.ndarray | None = None
    item_labels: np.ndarray | None = None
    _cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not (isinstance(self.n_users, int) and self.n_users > 0):
            raise ValueError(f"n_users must be a positive int, got {self.n_users!r}")
        if not (isinstance(self.n_items, int) and self.n_items > 0):
            raise ValueError(f"n_items must be a positive int, got {self.n_items!r}")
        inter = _as_long(self.interactions, "interactions")
        if inter.dim() != 2 or inter.shape[1] != 2:
            raise ValueError(f"interactions must have shape [N, 2], got {tuple(inter.shape)}")
        if len(inter) and (inter[:, 0].min() < 0 or inter[:, 0].max() >= self.n_users):
            bad = inter[(inter[:, 0] < 0) | (inter[:, 0] >= self.n_users), 0]
            raise ValueError(f"user index {int(bad[0])} outside 0..{self.n_users - 1}")
        if len(inter) and (inter[:, 1].min() < 0 or inter[:, 1].max() >= self.n_items):
            bad = inter[(inter[:, 1] < 0) | (inter[:, 1] >= self.n_items), 1]
            raise ValueError(f"item index {int(bad[0])} outside 0..{self.n_items - 1}")
        keys = inter[:, 0] * self.n_items + inter[:, 1]
        if len(torch.unique(keys)) != len(keys):
            raise ValueError("interactions holds the same (user, item) pair twice")
        train = torch.unique(_as_long(self.train_ids, "train_ids").reshape(-1))
        test = torch.unique(_as_long(self.test_ids, "test_ids").reshape(-1))
        for name, ids in (("train_ids", train), ("test_ids", test)):
            if len(ids) and (ids[0] < 0 or ids[-1] >= len(inter)):
                raise ValueError(f"{name} holds ids outside 0..{len(inter) - 1}")
        if len(train) != len(_as_long(self.train_ids, "train_ids").reshape(-1)):
            raise ValueError("train_ids holds duplicates")
        if len(np.intersect1d(train.numpy(), test.numpy())):
            raise ValueError("an interaction is both in train_ids and test_ids")
        object.__setattr__(self, "interactions", inter)
        object.__setattr__(self, "train_ids", train)
        object.__setattr__(self, "test_ids", test)

    # ----------------------------------------------------------------------------- building

    @classmethod
    def from_pairs(cls, users: Any, items: Any, *, n_users: int | None = None,
                   n_items: int | None = None, test_fraction: float = 0.2, seed: int = 0,
                   user_labels: np.ndarray | None = None,
                   item_labels: np.ndarray | None = None) -> InteractionGraph:
        """A graph from parallel arrays of local user and item indices, split per user.

        Each user with ``n >= 2`` interactions holds out ``round(test_fraction * n)`` of them
        (at least one stays in training), chosen by a generator seeded with ``seed``: the same
        inputs and seed always give the same split.
        """
        u = _as_long(users, "users").reshape(-1)
        i = _as_long(items, "items").reshape(-1)
        if len(u) != len(i):
            raise ValueError(f"got {len(u)} users but {len(i)} items")
        if len(u) == 0:
            raise ValueError("no interactions")
        if not 0.0 <= test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction!r}")
        n_users = int(u.max()) + 1 if n_users is None else n_users
        n_items = int(i.max()) + 1 if n_items is None else n_items
        inter = torch.stack([u, i], dim=1)
        test = _split_per_user(u.numpy(), test_fraction, seed)
        train = np.setdiff1d(np.arange(len(u)), test)
        return cls(n_users, n_items, inter, torch.from_numpy(train), torch.from_numpy(test),
                   user_labels, item_labels)

    # ----------------------------------------------------------------------------- views

    @property
    def num_nodes(self) -> int:
        """Nodes of the homogeneous graph: users, then items."""
        return self.n_users + self.n_items

    @property
    def n_train(self) -> int:
        return len(self.train_ids)

    def pairs(self, ids: Any) -> Tensor:
        """``[len(ids), 2]`` (user, item) rows of the given interaction ids (any ids)."""
        ids = self._known(ids)
        return self.interactions[ids]

    def train_pairs(self) -> Tensor:
        return self.interactions[self.train_ids]

    def test_pairs(self) -> Tensor:
        return self.interactions[self.test_ids]

    def edge_index(self) -> Tensor:
        """``[2, 2E]`` edges of the training graph, users ``0..U-1``, items offset by U, both
        directions (user→item block first, then item→user)."""
        if "edge_index" not in self._cache:
            p = self.train_pairs()
            u, i = p[:, 0], p[:, 1] + self.n_users
            self._cache["edge_index"] = torch.stack([torch.cat([u, i]), torch.cat([i, u])])
        return self._cache["edge_index"]

    def train_keys(self) -> Tensor:
        """Sorted ``user * n_items + item`` keys of the training pairs (fast membership)."""
        if "train_keys" not in self._cache:
            p = self.train_pairs()
            self._cache["train_keys"] = torch.sort(p[:, 0] * self.n_items + p[:, 1]).values
        return self._cache["train_keys"]

    def all_keys(self) -> Tensor:
        """Sorted keys of every pair in the table (train, test and removed)."""
        if "all_keys" not in self._cache:
            p = self.interactions
            self._cache["all_keys"] = torch.sort(p[:, 0] * self.n_items + p[:, 1]).values
        return self._cache["all_keys"]

    def train_matrix(self) -> Tensor:
        """Dense ``[U, I]`` bool matrix of the training interactions."""
        m = torch.zeros(self.n_users, self.n_items, dtype=torch.bool)
        p = self.train_pairs()
        m[p[:, 0], p[:, 1]] = True
        return m

    def user_interaction_ids(self, user: int) -> Tensor:
        """The training interaction ids of ``user`` (sorted); "forget this user" removes them."""
        if isinstance(user, bool) or not isinstance(user, (int, np.integer)):
            if isinstance(user, Tensor) and user.numel() == 1 and not user.dtype.is_floating_point:
                user = int(user)
            else:
                raise TypeError(f"user must be an int, got {user!r}")
        if not 0 <= user < self.n_users:
            raise ValueError(f"unknown user {user}: users are 0..{self.n_users - 1}")
        return self.train_ids[self.interactions[self.train_ids, 0] == int(user)]

    def item_interaction_ids(self, item: int) -> Tensor:
        """The training interaction ids of ``item`` (sorted)."""
        if isinstance(item, bool) or not isinstance(item, (int, np.integer)):
            raise TypeError(f"item must be an int, got {item!r}")
        if not 0 <= item < self.n_items:
            raise ValueError(f"unknown item {item}: items are 0..{self.n_items - 1}")
        return self.train_ids[self.interactions[self.train_ids, 1] == int(item)]

    def ids_of_pairs(self, users: Any, items: Any) -> Tensor:
        """Training interaction ids of (user, item) pairs; a pair that is not a training
        interaction raises ``KeyError`` naming it."""
        u = _as_long(users, "users").reshape(-1)
        i = _as_long(items, "items").reshape(-1)
        if len(u) != len(i):
            raise ValueError(f"got {len(u)} users but {len(i)} items")
        if len(u) and (u.min() < 0 or u.max() >= self.n_users):
            raise ValueError(f"unknown user in {_show(u.tolist())}: users are "
                             f"0..{self.n_users - 1}")
        if len(i) and (i.min() < 0 or i.max() >= self.n_items):
            raise ValueError(f"unknown item in {_show(i.tolist())}: items are "
                             f"0..{self.n_items - 1}")
        p = self.train_pairs()
        keys = p[:, 0] * self.n_items + p[:, 1]
        order = torch.argsort(keys)
        sorted_keys = keys[order]
        want = u * self.n_items + i
        pos = torch.searchsorted(sorted_keys, want).clamp(max=max(len(keys) - 1, 0))
        found = (sorted_keys[pos] == want) if len(keys) else torch.zeros_like(want, dtype=bool)
        if not bool(found.all()):
            miss = [(int(a), int(b)) for a, b in zip(u[~found], i[~found])]
            raise KeyError(f"{len(miss)} (user, item) pair(s) are not training interactions: "
                           f"{_show(miss)}")
        return self.train_ids[order[pos]]

    # ----------------------------------------------------------------------------- removal

    def _known(self, ids: Any) -> Tensor:
        idx = torch.tensor(_to_id_list(ids, "interaction ids"), dtype=torch.long)
        bad = idx[(idx < 0) | (idx >= len(self.interactions))]
        if len(bad):
            raise KeyError(f"{len(bad)} unknown interaction id(s) {_show(bad.tolist())}: ids "
                           f"are 0..{len(self.interactions) - 1}")
        return idx

    def check_train_ids(self, ids: Any) -> Tensor:
        """Validate a deletion request: a non-empty set of distinct ids of interactions that
        are in this training graph. Returns them as a sorted ``LongTensor``."""
        idx = self._known(ids)
        if len(idx) == 0:
            raise ValueError("empty deletion request: no interaction ids given")
        uniq = torch.unique(idx)
        if len(uniq) != len(idx):
            dup = sorted({int(v) for v in idx.tolist() if (idx == v).sum() > 1})
            raise ValueError(f"duplicate interaction id(s) in the request: {_show(dup)}")
        member = torch.isin(uniq, self.train_ids)
        if not bool(member.all()):
            absent = uniq[~member]
            in_test = torch.isin(absent, self.test_ids)
            what = []
            if bool(in_test.any()):
                what.append(f"held-out test interaction(s) {_show(absent[in_test].tolist())}")
            if bool((~in_test).any()):
                what.append("interaction(s) not in this training graph (never there or already "
                            f"removed) {_show(absent[~in_test].tolist())}")
            raise KeyError("cannot remove " + "; ".join(what))
        return uniq

    def without(self, ids: Any) -> InteractionGraph:
        """This graph minus the training interactions ``ids`` (validated; ids stay stable)."""
        idx = self.check_train_ids(ids)
        keep = self.train_ids[~torch.isin(self.train_ids, idx)]
        if len(keep) == 0:
            raise ValueError("the request removes every training interaction: nothing is left "
                             "to train on")
        return InteractionGraph(self.n_users, self.n_items, self.interactions, keep,
                                self.test_ids, self.user_labels, self.item_labels)

    def validation_split(self, fraction: float = 0.1, seed: int = 0) -> InteractionGraph:
        """A graph for choosing settings without touching the test split: ``fraction`` of
        each user's training interactions (``round(fraction * n)``, at least one kept for
        training; seeded) become its held-out ``test_ids``; the rest are its training graph.
        The real test interactions are in neither (they stay in the table, so never-seen
        pairs still avoid them, and they rank as ordinary unknown items)."""
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"fraction must be in (0, 1), got {fraction!r}")
        users = self.interactions[self.train_ids, 0].numpy()
        held = self.train_ids[torch.from_numpy(_split_per_user(users, fraction, seed))]
        if len(held) == 0:
            raise ValueError("no user has enough training interactions to hold any out")
        keep = self.train_ids[~torch.isin(self.train_ids, held)]
        return InteractionGraph(self.n_users, self.n_items, self.interactions, keep, held,
                                self.user_labels, self.item_labels)

    def restricted_to(self, train_ids: Any) -> InteractionGraph:
        """The same table and test set with training graph ``train_ids`` (a subset of this
        graph's training ids), e.g. one shard's interactions."""
        idx = torch.unique(self._known(train_ids))
        if not bool(torch.isin(idx, self.train_ids).all()):
            raise KeyError("restricted_to: some ids are not training interactions of this graph")
        return InteractionGraph(self.n_users, self.n_items, self.interactions, idx,
                                self.test_ids, self.user_labels, self.item_labels)

    def __repr__(self) -> str:
        return (f"InteractionGraph(users={self.n_users}, items={self.n_items}, "
                f"train={self.n_train}, test={len(self.test_ids)}, "
                f"table={len(self.interactions)})")


def _split_per_user(users: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """Ids held out for testing: ``round(test_fraction * n)`` random interactions of each
    user with ``n >= 2`` (at least one kept for training)."""
    rng = np.random.default_rng(seed)
    order = np.argsort(users, kind="stable")
    starts = np.flatnonzero(np.r_[True, users[order][1:] != users[order][:-1]])
    ends = np.r_[starts[1:], len(order)]
    test: list[np.ndarray] = []
    for s, e in zip(starts, ends):
        n = e - s
        k = min(int(round(test_fraction * n)), n - 1)
        if k > 0:
            test.append(rng.permutation(order[s:e])[:k])
    return np.sort(np.concatenate(test)) if test else np.zeros(0, dtype=np.int64)


# --------------------------------------------------------------------------------- MovieLens

def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _download_ml100k(root: Path) -> Path:
    """Fetch GroupLens' zip, check its md5, extract ``u.data`` atomically into ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".ml-100k.", suffix=".zip", dir=root)
    try:
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(ML100K_URL, timeout=60) as r:
            while chunk := r.read(1 << 20):
                f.write(chunk)
        got = _md5(Path(tmp))
        if got != ML100K_MD5:
            raise ValueError(f"downloaded {ML100K_URL} has md5 {got}, expected {ML100K_MD5} "
                             "(corrupt or changed download)")
        with zipfile.ZipFile(tmp) as z:
            data = z.read("ml-100k/u.data")
        fd2, tmp2 = tempfile.mkstemp(prefix=".u.data.", dir=root)
        with os.fdopen(fd2, "wb") as f:
            f.write(data)
        os.replace(tmp2, root / "u.data")
    except OSError as err:
        raise RuntimeError(f"could not download MovieLens-100K from {ML100K_URL}: {err}") from err
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return root / "u.data"


def _find_ratings_file(root: Path) -> Path | None:
    for cand in (root / "ml-100k.inter", root / "u.data", root / "ml-100k" / "u.data",
                 root / "ml-100k" / "ml-100k.inter"):
        if cand.is_file():
            return cand
    return None


def read_movielens_ratings(path: str | os.PathLike) -> np.ndarray:
    """``[N, 4]`` int64 (user, item, rating, timestamp) raw rows from a RecBole ``.inter``
    file (tab separated, one header line) or GroupLens ``u.data`` (tab separated, no header).
    Malformed files raise ``ValueError`` naming the file and line."""
    path = Path(path)
    rows: list[tuple[int, int, int, int]] = []
    with open(path, encoding="utf-8", errors="strict") as f:
        first = True
        for lineno, line in enumerate(f, start=1):
            line = line.rstrip("\n\r")
            if first:
                first = False
                if line.startswith("user_id"):  # RecBole header: user_id:token  item_id:token ...
                    cols = [c.split(":")[0] for c in line.split("\t")]
                    if cols[:3] != ["user_id", "item_id", "rating"]:
                        raise ValueError(f"{path}:1: unexpected header {line!r}; expected "
                                         "user_id, item_id, rating, timestamp")
                    continue
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) < 3:
                raise ValueError(f"{path}:{lineno}: expected 4 tab-separated fields (user, item, "
                                 f"rating, timestamp), got {line!r}")
            try:
                ts = int(float(parts[3])) if len(parts) > 3 and parts[3] else 0
                rows.append((int(parts[0]), int(parts[1]), int(float(parts[2])), ts))
            except ValueError as err:
                raise ValueError(f"{path}:{lineno}: not numeric: {line!r}") from err
    if not rows:
        raise ValueError(f"{path} holds no ratings")
    arr = np.asarray(rows, dtype=np.int64)
    if (arr[:, 2] < 1).any() or (arr[:, 2] > 5).any():
        bad = arr[(arr[:, 2] < 1) | (arr[:, 2] > 5), 2][0]
        raise ValueError(f"{path}: rating {bad} outside MovieLens' 1..5 scale")
    return arr


def load_movielens_100k(root: str | os.PathLike | None = None, download: bool = True,
                        min_rating: int | None = 4, *, test_fraction: float = 0.2,
                        seed: int = 0, max_users: int | None = None) -> InteractionGraph:
    """MovieLens-100K as implicit feedback, split per user into train/test.

    ``root`` holds ``ml-100k.inter`` (RecBole) or ``u.data`` (GroupLens); default
    ``<cache>/ml-100k`` (``$UNLEARN_CACHE`` or ``~/.cache/unlearn``), where the GroupLens zip is
    downloaded (md5-checked) when no file is found and ``download`` is true. A rating
    ``>= min_rating`` becomes an interaction (``None``: every rating). Users and items that keep
    at least one interaction are numbered ``0..`` in the order of their raw ids;
    ``max_users`` keeps only the first users (a small slice for tests). Repeated (user, item)
    ratings keep the latest one.
    """
    root = Path(root).expanduser() if root is not None else default_cache_dir() / "ml-100k"
    path = _find_ratings_file(root)
    if path is None:
        if not download:
            raise FileNotFoundError(f"no ml-100k.inter or u.data under {root}; pass "
                                    "download=True or a folder that holds one")
        path = _download_ml100k(root)
    rows = read_movielens_ratings(path)
    if min_rating is not None:
        if not 1 <= min_rating <= 5:
            raise ValueError(f"min_rating must be in 1..5 or None, got {min_rating!r}")
        rows = rows[rows[:, 2] >= min_rating]
    # keep the latest rating of a repeated pair
    rows = rows[np.lexsort((rows[:, 3], rows[:, 1], rows[:, 0]))]
    last = np.r_[(rows[1:, 0] != rows[:-1, 0]) | (rows[1:, 1] != rows[:-1, 1]), True]
    rows = rows[last]
    user_labels, users = np.unique(rows[:, 0], return_inverse=True)
    if max_users is not None:
        if max_users < 1:
            raise ValueError(f"max_users must be positive, got {max_users!r}")
        keep = users < max_users
        rows, users = rows[keep], users[keep]
        user_labels = user_labels[:max_users]
    item_labels, items = np.unique(rows[:, 1], return_inverse=True)
    return InteractionGraph.from_pairs(users, items, n_users=len(user_labels),
                                       n_items=len(item_labels), test_fraction=test_fraction,
                                       seed=seed, user_labels=user_labels,
                                       item_labels=item_labels)
