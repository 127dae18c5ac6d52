"""Removal modules: one protocol, ``method.unlearn(model, forget=..., retain=...)``."""

from unlearn.removal.base import RemovalMethod, RemovalResult, split_loaders

__all__ = ["RemovalMethod", "RemovalResult", "split_loaders"]
