"""Plain-text views of requests and events for the ``unlearn ledger`` command."""

from __future__ import annotations

from collections.abc import Sequence

from unlearn.ledger.records import Event, Request, canonical_json

__all__ = ["format_requests", "format_request", "format_ids"]


def format_ids(ids: Sequence[int], limit: int = 12) -> str:
    head = ",".join(str(i) for i in ids[:limit])
    return head + (f",... ({len(ids)} ids)" if len(ids) > limit else "")


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def format_requests(requests: Sequence[Request]) -> str:
    """One line per request, under a header."""
    if not requests:
        return "no requests"
    rows = [("ID", "STATE", "IDS", "REQUESTER", "CREATED (UTC)", "MODEL", "REASON")]
    for r in requests:
        rows.append((str(r.id), r.state, str(len(r.ids)), _clip(r.requester, 20),
                     r.created_at[:19].replace("T", " "),
                     "-" if r.model_version is None else str(r.model_version),
                     _clip(r.reason, 40)))
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1]
                     for row in rows)


def format_request(request: Request, events: Sequence[Event]) -> str:
    """A request's fields, then its events with their hashes."""
    r = request
    lines = [f"request {r.id}: {r.state}" + (f" ({r.state_reason})" if r.state_reason else ""),
             f"  ids:        {format_ids(list(r.ids), 50)}",
             f"  requester:  {r.requester}",
             f"  reason:     {r.reason}",
             f"  created:    {r.created_at}",
             f"  key:        {r.key if r.key is not None else '-'}",
             f"  model:      {r.model_version if r.model_version is not None else '-'}",
             "events:"]
    for e in events:
        data = {k: v for k, v in e.data.items() if k not in ("ids", "created_at")}
        lines.append(f"  #{e.seq:<5} {e.at[:23].replace('T', ' ')}  {e.kind:<11} "
                     f"-> {e.state or '-':<9} {_clip(canonical_json(data), 70)}")
        lines.append(f"         hash {e.hash[:16]}...  prev {e.prev_hash[:16]}...")
    return "\n".join(lines)
