"""Deletion requests for a recommender, through the ledger, with a recommendation certificate.

>>> ledger = Ledger("ledger.db", models="models/")
>>> submit_user(ledger, graph, user=12, requester="user-12", reason="GDPR art. 17")
>>> submit_pairs(ledger, graph, [(3, 50)], requester="user-3", reason="remove one rating")
>>> applied = apply_requests(ledger, graph, model, UnlearnRec())     # one claimed batch
>>> cert = certify_requests(ledger, graph, model, RetrainRec(), seeds=(0, 1, 2))

The ledger holds interaction ids of ``graph``, the *original* training graph: every request
is validated against it (unknown users or items, pairs that were never interactions, held-out
test interactions and empty requests raise before anything is recorded), and a whole-user
request is recorded as that user's training interaction ids. Applying loads the ledger's head
model, removes the batch's new ids from the graph that remains after every earlier request,
and commits the new weights (the ledger's commit point) with the method, its seconds and any
pre-training seconds. Certifying audits the model version of the applied requests against
LightGCNs retrained without *every* forgotten interaction and moves the requests to
``certified`` when the certificate passes.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from unlearn.audit.recommend import RecCertificate, certify_recommendation
from unlearn.ledger import Ledger, Request
from unlearn.recommend.data import InteractionGraph
from unlearn.recommend.protocol import forget_request
from unlearn.removal.base import RemovalResult

__all__ = ["submit_interactions", "submit_user", "submit_pairs", "apply_requests",
           "certify_requests", "remaining_graph", "ApplyReport"]


# ---------------------------------------------------------------------------- submitting


def submit_interactions(ledger: Ledger, graph: InteractionGraph, ids: Any, *, requester: str,
                        reason: str, key: str | None = None) -> Request:
    """Record a request naming training interaction ids of ``graph`` (validated first)."""
    checked = graph.check_train_ids(ids)
    return ledger.submit(checked.tolist(), requester=requester, reason=reason, key=key)


def submit_user(ledger: Ledger, graph: InteractionGraph, user: int, *, requester: str,
                reason: str, key: str | None = None) -> Request:
    """Record "forget user ``user``": every training interaction of the user in ``graph``."""
    ids = forget_request(graph, users=[_index(user, "user")])
    return ledger.submit(ids.tolist(), requester=requester, reason=reason, key=key)


def submit_pairs(ledger: Ledger, graph: InteractionGraph, pairs: Iterable[Sequence[int]], *,
                 requester: str, reason: str, key: str | None = None) -> Request:
    """Record a request naming ``(user, item)`` pairs; a pair that is not a training
    interaction of ``graph`` raises ``KeyError`` naming it."""
    rows = [tuple(p) for p in pairs]
    if not rows:
        raise ValueError("empty deletion request: no (user, item) pair given")
    bad = [p for p in rows if len(p) != 2]
    if bad:
        raise ValueError(f"pairs must be (user, item), got {bad[0]!r}")
    t = torch.tensor(rows, dtype=torch.long)
    ids = graph.ids_of_pairs(t[:, 0], t[:, 1])
    return submit_interactions(ledger, graph, ids, requester=requester, reason=reason, key=key)


def _index(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, Tensor) and value.numel() == 1 \
                and not value.dtype.is_floating_point:
            return int(value)
        raise TypeError(f"{what} must be an int, got {value!r}")
    return value


# ---------------------------------------------------------------------------- applying


def remaining_graph(ledger: Ledger, graph: InteractionGraph) -> InteractionGraph:
    """``graph`` minus every interaction the ledger records as forgotten."""
    forgotten = _forgotten(ledger, graph)
    return graph.without(forgotten) if len(forgotten) else graph


def _forgotten(ledger: Ledger, graph: InteractionGraph) -> Tensor:
    ids = torch.tensor(ledger.forgotten_ids(), dtype=torch.long)
    if len(ids) == 0:
        return ids
    unknown = ids[~torch.isin(ids, graph.train_ids)]
    if len(unknown):
        raise ValueError(f"the ledger has forgotten ids that are not training interactions of "
                         f"this graph, e.g. {unknown[:10].tolist()}: is it the graph the "
                         "ledger's requests were made against?")
    return ids


@dataclass
class ApplyReport:
    """One applied batch: its requests, the committed model version, the ids removed now."""

    request_ids: list[int]
    model_version: int | None
    n_forget: int
    seconds: float  # the removal method's own time (not the ledger's file writes)
    pretrain_seconds: float
    result: RemovalResult | None = field(default=None, repr=False)


def apply_requests(ledger: Ledger, graph: InteractionGraph, model: nn.Module, method: Any, *,
                   request_ids: Iterable[int] | None = None, limit: int | None = None
                   ) -> ApplyReport:
    """Claim the pending requests (all, ``request_ids`` or the oldest ``limit``), remove their
    new interactions with ``method`` (``method.unlearn(model, graph, ids)``) and commit.

    ``model`` gives the architecture and, when the ledger has no model yet, the trained
    weights (registered as the first version); otherwise the ledger's head is loaded into a
    copy of it. ``model`` itself is never changed. A failing method marks the requests
    ``failed`` with its error (ledger semantics)."""
    if ledger.head() is None:
        ledger.register_model(_cpu_state(model), meta={"what": "trained recommender"})
    with ledger.applying(request_ids=request_ids, limit=limit) as batch:
        if not batch:
            return ApplyReport([], ledger.head(), 0, 0.0, 0.0)
        current = copy.deepcopy(model)
        current.load_state_dict(batch.load_base())
        before = remaining_graph(ledger, graph)
        new_ids = batch.new_ids
        if not new_ids:
            version = batch.commit(None, details={"method": getattr(method, "name", None),
                                                  "seconds": 0.0, "n_forget": 0,
                                                  "note": "every id was already forgotten"})
            return ApplyReport(list(batch.claim.request_ids), version, 0, 0.0, 0.0)
        start = time.perf_counter()
        result = method.unlearn(current, before, new_ids)
        pretrain = float(result.details.get("pretrain_seconds") or 0.0)
        details = {"method": result.details.get("method", type(method).__name__),
                   "seconds": float(result.seconds), "pretrain_seconds": pretrain,
                   "n_forget": len(new_ids), "n_retain": before.n_train - len(new_ids),
                   "wall_seconds": time.perf_counter() - start}
        version = batch.commit(_cpu_state(result.model), details=details,
                               meta={"source": "unlearn.recommend.requests"})
        return ApplyReport(list(batch.claim.request_ids), version, len(new_ids),
                           float(result.seconds), pretrain, result)


def _cpu_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------- certifying


def certify_requests(ledger: Ledger, graph: InteractionGraph, model: nn.Module,
                     references: Any, *, request_ids: Iterable[int] | None = None,
                     seeds: Sequence[int] | None = None, out: str | Path | None = None,
                     certify_failed: bool = False, **certify_kw: Any) -> RecCertificate:
    """Certify the applied requests (default: every ``applied`` one): the model version they
    point to, against ``references`` (a ``RetrainRec``, retrained per seed without every
    forgotten interaction, or a list of retrained models). Writes the certificate to ``out``
    (JSON) when given; moves the requests to ``certified`` if it passed (or always, with
    ``certify_failed``). ``model`` gives the architecture; the original weights are the
    ledger's first version."""
    ids = _applied(ledger, request_ids)
    versions = [ledger.get(i).model_version for i in ids]
    known = [v for v in versions if v is not None]
    version = max(known) if known else ledger.head()
    if version is None:
        raise ValueError("the ledger holds no model version to certify")
    unlearned = copy.deepcopy(model)
    unlearned.load_state_dict(ledger.load_model(version))
    forgotten = _forgotten(ledger, graph)
    if len(forgotten) == 0:
        raise ValueError("the ledger records no forgotten interaction: nothing to certify")
    original = copy.deepcopy(model)
    first = min(v["version"] for v in ledger.versions())
    original.load_state_dict(ledger.load_model(first))
    removal = _removal_from_ledger(ledger, ids, unlearned)
    cert = certify_recommendation(unlearned.eval(), graph, forgotten, references=references,
                                  seeds=seeds, original=original.eval(), removal=removal,
                                  ledger=ledger, request_ids=ids, **certify_kw)
    cert.config["model_version"] = version
    if out is not None:
        cert.to_json(out)
    todo = [i for i in ids if ledger.get(i).state == "applied"]
    if todo and (cert.passed or certify_failed):
        ledger.certify(todo, {"passed": cert.passed, "failed_checks": cert.failed,
                              "certificate": None if out is None else str(out),
                              "schema": cert.schema, "model_version": version,
                              "n_references": cert.config["n_references"]})
        cert.timeline = [dict(t, state=ledger.get(t["request_id"]).state)
                         for t in cert.timeline]
        if out is not None:
            cert.to_json(out)
    return cert


def _applied(ledger: Ledger, request_ids: Iterable[int] | None) -> list[int]:
    if request_ids is None:
        ids = [r.id for r in ledger.list(state="applied")]
        if not ids:
            raise ValueError("no applied request to certify (apply the pending ones first)")
        return ids
    ids = [int(i) for i in request_ids]
    bad = {i: ledger.get(i).state for i in ids
           if ledger.get(i).state not in ("applied", "certified")}
    if bad:
        raise ValueError(f"only applied requests can be certified; these are not: {bad}")
    return ids


def _removal_from_ledger(ledger: Ledger, request_ids: list[int], model: nn.Module
                         ) -> RemovalResult | None:
    """The removal cost from the 'applied' events: seconds summed over distinct batches
    (model versions), the method and the pre-training seconds."""
    per_version: dict[Any, dict[str, Any]] = {}
    for rid in request_ids:
        for ev in ledger.events(rid):
            if ev.kind == "applied":
                per_version[ev.data.get("model_version")] = ev.data.get("details", {})
    if not per_version:
        return None
    methods = {d.get("method") for d in per_version.values()}
    seconds = sum(float(d.get("seconds") or 0.0) for d in per_version.values())
    pretrain = sum(float(d.get("pretrain_seconds") or 0.0) for d in per_version.values())
    return RemovalResult(model, seconds, {"method": "+".join(sorted(str(m) for m in methods)),
                                          "pretrain_seconds_total": pretrain,
                                          "batches": len(per_version)})
