"""Versioned model weights, each version written atomically.

``model-000007.safetensors`` holds version 7. A save writes a temporary file in the same
folder, fsyncs it, renames it over the final name (``os.replace``, atomic on POSIX and
Windows) and fsyncs the folder, so a reader sees either no version 7 or all of it. Used with a
:class:`~unlearn.ledger.Ledger`, a version counts only once the ledger records it; files of
versions a crashed process wrote but never recorded are deleted when the ledger recovers.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from unlearn.ledger.errors import ModelVersionError

__all__ = ["ModelStore"]

_NAME = re.compile(r"^model-(\d{6,})\.safetensors$")
_TMP = re.compile(r"^\.model-(\d{6,})\.safetensors\.[0-9a-f]+\.tmp$")
_META_KEY = "unlearn.meta"


class ModelStore:
    """A folder of model versions (state dicts of tensors, stored as safetensors)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        if self.directory.exists() and not self.directory.is_dir():
            raise NotADirectoryError(f"model store {str(self.directory)!r} is a file")
        self.directory.mkdir(parents=True, exist_ok=True)
        self._sha: dict[int, tuple[tuple[int, int], str]] = {}

    def __repr__(self) -> str:
        return f"ModelStore({str(self.directory)!r})"

    def path(self, version: int) -> Path:
        return self.directory / f"model-{_check_version(version):06d}.safetensors"

    def versions(self) -> list[int]:
        """The versions on disk, oldest first."""
        found = (_NAME.match(p.name) for p in self.directory.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def latest(self) -> int | None:
        """The newest version on disk (with a ledger, prefer ``ledger.head()``: the newest
        version it recorded)."""
        v = self.versions()
        return v[-1] if v else None

    def save(self, state_dict: Mapping[str, Any], meta: Mapping[str, Any] | None = None, *,
             version: int | None = None) -> int:
        """Write a new version atomically and return its number (``latest() + 1`` unless
        given). An existing version is never overwritten."""
        tensors = _tensors(state_dict)
        version = (self.latest() or 0) + 1 if version is None else _check_version(version)
        final = self.path(version)
        if final.exists():
            raise ModelVersionError(f"model version {version} already exists at {final}")
        metadata = {_META_KEY: json.dumps(dict(meta or {}), sort_keys=True),
                    "unlearn.version": str(version)}
        tmp = self.directory / f".{final.name}.{uuid.uuid4().hex}.tmp"
        try:
            from safetensors.torch import save_file

            save_file(tensors, str(tmp), metadata=metadata)
            digest = _fsync_and_hash(tmp)
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(self.directory)
        self._sha[version] = (_stamp(final), digest)
        return version

    def sha256(self, version: int) -> str:
        """sha256 of the version's file."""
        path = self._existing(version)
        cached = self._sha.get(version)
        if cached and cached[0] == _stamp(path):
            return cached[1]
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        self._sha[version] = (_stamp(path), digest)
        return digest

    def load(self, version: int | None = None, *, expected_sha256: str | None = None,
             device: str = "cpu") -> dict[str, Any]:
        """The state dict of ``version`` (default: the latest); with ``expected_sha256`` the
        file is checked first and a mismatch raises :class:`ModelVersionError`."""
        if version is None:
            version = self.latest()
            if version is None:
                raise ModelVersionError(f"the model store {self.directory} is empty")
        data = self._existing(version).read_bytes()
        if expected_sha256 is not None:
            got = hashlib.sha256(data).hexdigest()
            if got != expected_sha256:
                raise ModelVersionError(
                    f"model version {version} at {self.path(version)} has sha256 {got[:12]}..., "
                    f"the ledger recorded {expected_sha256[:12]}...: the file was changed")
        from safetensors.torch import load

        state = load(data)
        return {k: v.to(device) for k, v in state.items()} if device != "cpu" else state

    def meta(self, version: int) -> dict[str, Any]:
        """The ``meta`` saved with ``version``."""
        from safetensors import safe_open

        with safe_open(str(self._existing(version)), framework="pt") as f:
            raw = (f.metadata() or {}).get(_META_KEY, "{}")
        return json.loads(raw)

    def discard(self, version: int) -> bool:
        """Delete ``version`` (an uncommitted one); True if a file was removed."""
        path = self.path(version)
        self._sha.pop(version, None)
        if not path.exists():
            return False
        path.unlink()
        _fsync_dir(self.directory)
        return True

    def temp_files(self) -> list[tuple[int, Path]]:
        """``(version, path)`` of temporary files left by interrupted saves."""
        out = []
        for p in self.directory.iterdir():
            m = _TMP.match(p.name)
            if m:
                out.append((int(m.group(1)), p))
        return out

    def _existing(self, version: int) -> Path:
        path = self.path(version)
        if not path.is_file():
            raise ModelVersionError(f"model version {version} is missing: no file {path}")
        return path


def _check_version(version: Any) -> int:
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"a model version is a positive integer, got {version!r}")
    return version


def _tensors(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """CPU, contiguous tensors; tensors sharing storage are copied (safetensors refuses
    shared storage)."""
    import torch

    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of names to tensors, got "
                        f"{type(state_dict).__name__}")
    out: dict[str, Any] = {}
    seen: set[int] = set()
    for name, t in state_dict.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"state_dict[{name!r}] is a {type(t).__name__}, not a tensor; only "
                            "tensors can be stored")
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and ptr in seen:
            t = t.clone()
        elif ptr is not None:
            seen.add(ptr)
        out[str(name)] = t
    return out


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def _fsync_and_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb+") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
        os.fsync(f.fileno())
    return h.hexdigest()


def _fsync_dir(directory: Path) -> None:
    if os.name == "nt":  # pragma: no cover - Windows cannot open a folder for fsync
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
