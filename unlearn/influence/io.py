"""Score matrices on disk (safetensors), with the sample ids of their rows and columns."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor


def save_scores(
    path: str | os.PathLike,
    scores: Tensor,
    *,
    query_ids: Tensor | None = None,
    train_ids: Tensor | None = None,
    meta: dict[str, str | int | float] | None = None,
) -> None:
    """Write ``scores[n_query, n_train]`` (and optional row / column ids) atomically."""
    scores = torch.as_tensor(scores)
    if scores.dim() != 2:
        raise ValueError(f"scores must be a 2-D [n_query, n_train] matrix, got {scores.shape}")
    tensors = {"scores": scores.detach().cpu().contiguous()}
    for name, ids, size in (("query_ids", query_ids, scores.shape[0]),
                            ("train_ids", train_ids, scores.shape[1])):
        if ids is None:
            continue
        ids = torch.as_tensor(ids, dtype=torch.long).cpu().contiguous()
        if ids.shape != (size,):
            raise ValueError(f"{name} has shape {tuple(ids.shape)}, expected ({size},)")
        tensors[name] = ids
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    save_file(tensors, str(tmp), metadata={"meta": json.dumps(meta or {})})
    os.replace(tmp, path)


def load_scores(path: str | os.PathLike) -> dict[str, Tensor | dict]:
    """Read what :func:`save_scores` wrote: ``scores``, optional ids, and ``meta``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no score file at {path}")
    try:
        out: dict[str, Tensor | dict] = dict(load_file(str(path)))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            out["meta"] = json.loads((f.metadata() or {}).get("meta", "{}"))
    except (SafetensorError, json.JSONDecodeError, OSError) as err:
        raise ValueError(f"{path} is not a readable score file: {err}") from err
    if "scores" not in out:
        raise ValueError(f"{path} holds no 'scores' tensor")
    return out
