"""Reading model weights from a file: a plain ``state_dict`` or a Lightning checkpoint."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def read_weights_file(path: str | os.PathLike) -> Any:
    """``torch.load`` with ``weights_only=True``; a Lightning checkpoint's ``"state_dict"``
    entry is returned instead of the whole checkpoint.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for one that cannot be
    read as weights; callers add their own context to the message.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no file {str(path)!r}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"cannot read {str(path)!r} as weights: {err}") from err
    if isinstance(blob, dict) and isinstance(blob.get("state_dict"), dict):
        blob = blob["state_dict"]
    return blob
