"""A user's project for ``unlearn process`` / ``unlearn audit``, described by a small file.

``unlearn.toml`` (or the same keys in JSON); relative paths are relative to the file::

    factory = "myproject.unlearning:build"   # module:function, see below
    checkpoint = "model.pt"                  # trained weights (a state_dict), registered as
                                             # the ledger's first version when it has none
    models = "models"                        # the ledger's model store (default: next to it)
    method = "iau"                           # "iau" or "newton"
    method_options = { step_scale = 10.0 }   # keyword arguments of the method
    out = "audit"                            # certificate.json and report.html go here
    n_references = 3
    batch_size = 256
    [recipe]                                 # how the references are retrained (same
    epochs = 15                              # hyper-parameters as the model was trained with)
    lr = 0.05

``build()`` (no arguments) returns ``(model, train, test, task)`` or a dict with those keys:
a freshly initialised ``nn.Module`` (a LightningModule is fine), the training set as an
:class:`unlearn.data.IndexedDataset` (its ids are what requests name), a test dataset of
``(id, x, y)`` items, and an :class:`unlearn.tasks.Task` (None: classification). Each
retrained reference calls ``build()`` again for a fresh model, so ``build`` must be cheap
enough to call a few times (or return ``"model_factory"`` too, a zero-argument callable).
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import Dataset

__all__ = ["ProjectConfig", "Project", "ProjectError", "load_config", "load_project", "METHODS"]

METHODS = ("iau", "newton")
_KEYS = {"factory", "checkpoint", "models", "method", "method_options", "out", "n_references",
         "batch_size", "recipe", "cache_dir", "k"}


class ProjectError(ValueError):
    """A bad project file or factory (shown to the user without a traceback)."""


@dataclass
class ProjectConfig:
    """The parsed project file (paths resolved)."""

    path: Path
    factory: str
    checkpoint: Path | None = None
    models: Path | None = None
    method: str = "iau"
    method_options: dict[str, Any] = field(default_factory=dict)
    out: Path | None = None
    cache_dir: Path | None = None
    n_references: int = 3
    batch_size: int = 256
    k: float = 3.0
    recipe: dict[str, Any] = field(default_factory=dict)


@dataclass
class Project:
    """What the factory built."""

    model: nn.Module
    train: Any  # IndexedDataset
    test: Dataset
    task: Any  # Task
    model_factory: Callable[[], nn.Module]


def load_config(path: str | Path) -> ProjectConfig:
    """Read and check a TOML / JSON project file."""
    path = Path(path)
    if not path.is_file():
        raise ProjectError(f"no project file {str(path)!r}")
    text = path.read_text()
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ProjectError(f"{path}: not valid JSON ({err})") from None
    else:
        try:
            import tomllib
        except ImportError:  # Python 3.10
            raise ProjectError(f"{path}: TOML project files need Python 3.11 or newer; write "
                               "the same keys as JSON in a .json file") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ProjectError(f"{path}: not valid TOML ({err})") from None
    if not isinstance(data, dict):
        raise ProjectError(f"{path}: expected a table of settings, got {type(data).__name__}")
    unknown = sorted(set(data) - _KEYS)
    if unknown:
        raise ProjectError(f"{path}: unknown setting(s) {unknown}; known: {sorted(_KEYS)}")
    if not isinstance(data.get("factory"), str) or ":" not in data["factory"]:
        raise ProjectError(f"{path}: 'factory' must name a function as 'module:function', got "
                           f"{data.get('factory')!r}")
    method = data.get("method", "iau")
    if method not in METHODS:
        raise ProjectError(f"{path}: unknown method {method!r}; methods: {', '.join(METHODS)}")
    for key in ("method_options", "recipe"):
        if not isinstance(data.get(key, {}), dict):
            raise ProjectError(f"{path}: {key!r} must be a table, got {data[key]!r}")
    for key in ("n_references", "batch_size"):
        if key in data and (not isinstance(data[key], int) or data[key] < 1):
            raise ProjectError(f"{path}: {key!r} must be a positive integer, got {data[key]!r}")
    base = path.resolve().parent

    def where(key: str) -> Path | None:
        return None if data.get(key) is None else base / str(data[key])

    return ProjectConfig(path=path, factory=data["factory"], checkpoint=where("checkpoint"),
                         models=where("models"), method=method,
                         method_options=dict(data.get("method_options", {})),
                         out=where("out"), cache_dir=where("cache_dir"),
                         n_references=int(data.get("n_references", 3)),
                         batch_size=int(data.get("batch_size", 256)),
                         k=float(data.get("k", 3.0)), recipe=dict(data.get("recipe", {})))


def _function(spec: str, where: Path) -> Callable[..., Any]:
    module_name, _, name = spec.partition(":")
    sys.path.insert(0, str(where.resolve().parent))  # the project file's folder
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ProjectError(f"{where}: cannot import {module_name!r} ({err})") from None
    finally:
        sys.path.pop(0)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ProjectError(f"{where}: {module_name!r} has no function {name!r}")
    return fn


def load_project(cfg: ProjectConfig) -> Project:
    """Call the factory and check what it returns."""
    from unlearn.data import IndexedDataset
    from unlearn.tasks import ClassificationTask, Task

    build = _function(cfg.factory, cfg.path)
    out = _unpack(build(), cfg)
    model, train, test, task = out["model"], out["train"], out["test"], out.get("task")
    task = ClassificationTask() if task is None else task
    if not isinstance(model, nn.Module):
        raise ProjectError(f"{cfg.factory} returned a model of type {type(model).__name__}, "
                           "not a torch.nn.Module")
    if not isinstance(train, IndexedDataset):
        raise ProjectError(f"{cfg.factory} returned a training set of type "
                           f"{type(train).__name__}; it must be an unlearn.data.IndexedDataset "
                           "(sample ids are how requests name examples)")
    if not isinstance(task, Task):
        raise ProjectError(f"{cfg.factory} returned a task of type {type(task).__name__}, not "
                           "an unlearn.tasks.Task")
    factory = out.get("model_factory") or (lambda: _unpack(build(), cfg)["model"])
    return Project(model, train, test, task, factory)


def _unpack(value: Any, cfg: ProjectConfig) -> dict[str, Any]:
    if isinstance(value, dict):
        missing = sorted({"model", "train", "test"} - set(value))
        if missing:
            raise ProjectError(f"{cfg.factory} returned a dict without {missing}")
        return value
    if isinstance(value, (tuple, list)) and len(value) == 4:
        return dict(zip(("model", "train", "test", "task"), value, strict=True))
    raise ProjectError(f"{cfg.factory} must return (model, train, test, task) or a dict with "
                       f"those keys, got {type(value).__name__}")


def make_method(cfg: ProjectConfig, task: Any) -> Any:
    """The removal method the project file names."""
    from unlearn.removal import IAU, NewtonRemoval

    cls = {"iau": IAU, "newton": NewtonRemoval}[cfg.method]
    options = dict(cfg.method_options)
    if cfg.method == "newton":
        # A project file cannot hold a fitted estimator: Newton fits one on the retained data
        # at each removal, of the class named by `estimator` (default EK-FAC).
        options = {"curvature": "retain", "damping": 1e-3, **options}
        options["estimator_factory"] = _estimator_factory(options.pop("estimator", "ekfac"))
    try:
        return cls(task, **options)
    except TypeError as err:
        raise ProjectError(f"{cfg.path}: method_options {cfg.method_options} do not fit "
                           f"{cls.__name__} ({err})") from None


def _estimator_factory(name: str) -> Any:
    import unlearn.influence as influence

    # the estimators whose inverse-HVP approximates (H + λI)⁻¹ (not TracIn, gradient
    # similarity or SGD-influence)
    classes = {n.removesuffix("Influence").lower(): n for n in influence.__all__
               if n.endswith("Influence")
               and getattr(getattr(influence, n), "inverts_curvature", False)}
    if not isinstance(name, str) or name.lower() not in classes:
        raise ProjectError(f"unknown estimator {name!r} for method 'newton'; choose one of "
                           f"{sorted(classes)}")
    cls = getattr(influence, classes[name.lower()])
    return lambda model, task, damping: cls(model, task, damping, progress=False)


def make_recipe(cfg: ProjectConfig) -> Any:
    from baselines.retrain import Recipe

    try:
        return Recipe(**cfg.recipe)
    except (TypeError, ValueError) as err:
        raise ProjectError(f"{cfg.path}: bad [recipe] {cfg.recipe}: {err}") from None
