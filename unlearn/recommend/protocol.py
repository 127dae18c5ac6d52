"""The removal protocol for recommenders: one call for every method, ours and the baselines.

>>> result = method.unlearn(model, graph, forget_ids)     # forget_ids: training interaction ids
>>> result.model, result.seconds, result.details          # a new model; the input is untouched

``graph`` is the training graph the model was trained on; the unlearned model is meant to be
used on ``graph.without(forget_ids)`` (``details["remaining_graph"]``). The checks every method
shares: the request is non-empty, its ids are distinct training interactions of ``graph``
(unknown ids, held-out ids and ids removed earlier are named in the error), it does not remove
the whole training graph, and the model has one node per user and item of the graph.
"""

from __future__ import annotations

import copy
import time
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from unlearn.recommend.data import InteractionGraph
from unlearn.removal.base import RemovalResult

__all__ = ["RecRemovalMethod", "forget_request", "RemovalResult"]


def forget_request(graph: InteractionGraph, *, interactions: Any = None,
                   users: Any = None) -> Tensor:
    """The training interaction ids of a request: explicit ``interactions`` ids, plus every
    training interaction of each user in ``users`` ("forget me"). Validated, sorted, unique."""
    parts: list[Tensor] = []
    if interactions is not None:
        parts.append(torch.as_tensor(graph._known(interactions)))
    if users is not None:
        user_list = [int(u) for u in torch.as_tensor(users).reshape(-1).tolist()]
        for u in user_list:
            ids = graph.user_interaction_ids(u)
            if len(ids) == 0:
                raise ValueError(f"user {u} has no training interactions left to forget")
            parts.append(ids)
    if not parts:
        raise ValueError("empty deletion request: give interactions=... and/or users=...")
    return graph.check_train_ids(torch.unique(torch.cat(parts)))


class RecRemovalMethod:
    """Base class. Subclasses implement ``_unlearn(model, graph, forget_ids, remaining) ->
    (new_model, details)``; ``model`` is a private deep copy they may change in place and
    return."""

    name: ClassVar[str] = "rec-removal"

    def _unlearn(self, model: nn.Module, graph: InteractionGraph, forget_ids: Tensor,
                 remaining: InteractionGraph) -> tuple[nn.Module, dict[str, Any]]:
        raise NotImplementedError

    def _check_model(self, model: nn.Module, graph: InteractionGraph) -> None:
        """Method-specific model checks (the default: a node count that matches the graph)."""
        n = getattr(model, "num_nodes", None)
        if n is not None and n != graph.num_nodes:
            raise ValueError(f"the model has {n} nodes but the graph has {graph.n_users} users "
                             f"+ {graph.n_items} items = {graph.num_nodes}")

    def unlearn(self, model: nn.Module, graph: InteractionGraph,
                forget_ids: Any) -> RemovalResult:
        """Forget the training interactions ``forget_ids`` of ``graph`` from ``model``."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(graph, InteractionGraph):
            raise TypeError(f"graph must be an InteractionGraph, got {type(graph).__name__}")
        self._check_model(model, graph)
        forget = graph.check_train_ids(forget_ids)
        if len(forget) == graph.n_train:
            raise ValueError(f"the request removes all {graph.n_train} training interactions: "
                             "nothing is left; start from a fresh model instead")
        remaining = graph.without(forget)
        new = copy.deepcopy(model)
        start = time.perf_counter()
        new, details = self._unlearn(new, graph, forget, remaining)
        seconds = time.perf_counter() - start
        new.eval()
        for pname, p in new.named_parameters():
            if not bool(torch.isfinite(p).all()):
                raise FloatingPointError(f"{type(self).__name__} produced NaN/inf in parameter "
                                         f"{pname!r}; lower the step size or raise the damping")
        return RemovalResult(new, seconds, {"method": self.name, "n_forget": len(forget),
                                            "remaining_graph": remaining, **details})
