"""The ``unlearn`` command.

Each subcommand is one ``_add_<name>(subparsers)`` function that declares its arguments and
sets ``func`` (a callable taking the parsed namespace and returning an exit status); later
subcommands (``request``, ``process``, ``audit``, ``ledger``) are added to ``COMMANDS``.
User errors (bad values, missing files) are printed as ``unlearn: error: ...`` with exit
status 2 and no traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from unlearn.ledger import Ledger

__all__ = ["main", "build_parser", "UserError"]

PROG = "unlearn"


class UserError(Exception):
    """A problem with what the user asked for; shown without a traceback."""


def _version() -> str:
    try:
        return version("unlearn")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown"


# ---------------------------------------------------------------------------- arg types


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


# ---------------------------------------------------------------------------- demo


#: estimators the demo cannot run (the reasons are in ``unlearn.demo``; a test keeps the two
#: lists equal). Kept here so that building the parser does not import torch.
DEMO_SKIPS = ("lissa", "tracin")


def _estimator_names() -> list[str]:
    """Short names of the estimators the demo can run (``ekfac`` for ``EKFACInfluence``),
    without importing torch."""
    from unlearn import influence

    names = [n.removesuffix("Influence").lower() for n in influence.__all__
             if n.endswith("Influence")]
    return [n for n in names if n not in DEMO_SKIPS]


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="influence demo on scikit-learn digits (helpful/harmful images, mislabel search)",
        description="Train a logistic regression on scikit-learn's 8x8 digits, show the most "
        "helpful and harmful training images for a few test images, and find flipped labels "
        "by self-influence. Writes influence_grid.png, influence_table.txt, "
        "mislabel_curve.png and summary.json into --out.",
    )
    p.add_argument("--out", type=Path, default=Path("demo-output"),
                   help="output directory (default: demo-output)")
    p.add_argument("--estimator", metavar="NAME", default="ekfac",
                   help=f"influence estimator: {', '.join(_estimator_names())} "
                   "(default: %(default)s)")
    p.add_argument("--queries", type=positive_int, default=4,
                   help="number of test images to explain (default: 4)")
    p.add_argument("--top", type=positive_int, default=5,
                   help="helpful / harmful training images shown per test image (default: 5)")
    p.add_argument("--l2", type=positive_float, default=1e-3,
                   help="L2 strength of the model, also the estimator's damping (default: 1e-3)")
    p.add_argument("--flip", type=positive_float, default=0.1,
                   help="fraction of training labels to flip (default: 0.1)")
    p.add_argument("--seed", type=int, default=0, help="seed of split and flips (default: 0)")
    p.add_argument("--fast", action="store_true",
                   help="small version for tests: 600 train / 200 test images, no retraining "
                   "check")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from unlearn.demo import FAST, DemoConfig, DemoError, run_demo

    cfg = DemoConfig(
        out=args.out, estimator=args.estimator,
        n_queries=args.queries, n_top=args.top, l2=args.l2, flip_fraction=args.flip, seed=args.seed,
        progress=not args.no_progress and sys.stderr.isatty(),
    )
    if args.fast:
        cfg = dataclasses.replace(cfg, **FAST)
    try:
        run_demo(cfg)
    except DemoError as err:
        raise UserError(str(err)) from err
    return 0


# ---------------------------------------------------------------------------- request, ledger


def id_list(text: str) -> list[int]:
    """``"1,2,3"`` -> ``[1, 2, 3]``."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integer ids such as 1,2,3, got {text!r}") from None


def _add_request(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "request", help="record a deletion request in a ledger",
        description="Record a request to forget some training samples. Submitting the same "
        "request twice (same --key, or without a key the same requester, ids and reason) "
        "records it once. The ledger file is created if missing.")
    p.add_argument("--ledger", required=True, metavar="PATH",
                   help="ledger file (or sqlite:///PATH; other database URLs need SQLAlchemy)")
    ids = p.add_mutually_exclusive_group(required=True)
    ids.add_argument("--ids", type=id_list, metavar="1,2,3", help="sample ids to forget")
    ids.add_argument("--ids-file", type=Path, metavar="FILE.json",
                     help="JSON list of ids, or an object with 'ids' and optionally "
                     "'requester', 'reason', 'key' (flags take precedence)")
    p.add_argument("--requester", metavar="NAME", help="who asked")
    p.add_argument("--reason", metavar="TEXT", help="why")
    p.add_argument("--key", metavar="KEY", help="idempotency key")
    p.add_argument("--known-ids", type=Path, metavar="FILE.json",
                   help="JSON list of every training id; unknown ids are refused")
    p.add_argument("--json", action="store_true", help="print the request as JSON")
    p.set_defaults(func=_run_request)


def _request_fields(args: argparse.Namespace) -> dict:
    from unlearn.ledger import RequestFileError, load_request_file

    fields: dict = {"ids": args.ids}
    if args.ids_file is not None:
        try:
            fields = load_request_file(args.ids_file)
        except RequestFileError as err:
            raise UserError(str(err)) from err
    for name in ("requester", "reason", "key"):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    for name in ("requester", "reason"):
        if name not in fields:
            raise UserError(f"--{name} is required (or a {name!r} field in the request file)")
    return fields


def _known_ids(path: Path | None) -> set[int] | None:
    if path is None:
        return None
    from unlearn.ledger import RequestFileError, load_request_file

    try:
        return set(load_request_file(path)["ids"])
    except RequestFileError as err:
        raise UserError(f"--known-ids: {err}") from err


def _run_request(args: argparse.Namespace) -> int:
    import json

    from unlearn.ledger import Ledger, LedgerError

    fields = _request_fields(args)
    known = _known_ids(args.known_ids)
    try:
        with Ledger(args.ledger) as ledger:
            req, created = ledger.submit_once(
                fields["ids"], requester=fields["requester"], reason=fields["reason"],
                key=fields.get("key"), known_ids=known)
    except (LedgerError, ValueError, KeyError) as err:  # KeyError: unlearn.data.UnknownIdError
        raise UserError(str(err)) from err
    if args.json:
        print(json.dumps({**req.to_dict(), "created": created}, indent=2))
    elif created:
        print(f"request {req.id}: {req.state}, {len(req.ids)} ids from {req.requester!r}")
    else:
        print(f"request {req.id} was already recorded ({req.state}); nothing added")
    return 0


def _add_ledger(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ledger", help="list, show or verify the requests of a ledger",
                       description="Read a deletion-request ledger (never changes it).")
    actions = p.add_subparsers(dest="ledger_command", metavar="ACTION", required=True)
    where = {"metavar": "PATH", "help": "ledger file (or database URL)"}
    as_json = {"action": "store_true", "help": "print JSON"}
    ls = actions.add_parser("list", help="one line per request")
    ls.add_argument("path", **where)
    ls.add_argument("--state", choices=("pending", "applying", "applied", "certified",
                                        "rejected", "failed"), help="only requests in this state")
    ls.add_argument("--requester", metavar="NAME", help="only this requester's requests")
    ls.add_argument("--json", **as_json)
    ls.set_defaults(func=_run_ledger_list)
    show = actions.add_parser("show", help="a request and its events")
    show.add_argument("path", **where)
    show.add_argument("request_id", type=positive_int, metavar="REQUEST_ID")
    show.add_argument("--json", **as_json)
    show.set_defaults(func=_run_ledger_show)
    ver = actions.add_parser("verify", help="check the hash chain and the tables (exit 1 if "
                             "tampered)")
    ver.add_argument("path", **where)
    ver.add_argument("--models", type=Path, metavar="DIR",
                     help="model store folder: also check each recorded version's file hash")
    ver.add_argument("--anchor", metavar="HASH",
                     help="a head hash printed by an earlier verify; it must still be there")
    ver.add_argument("--json", **as_json)
    ver.set_defaults(func=_run_ledger_verify)


def _open_ledger(args: argparse.Namespace, models: Path | None = None) -> Ledger:
    from unlearn.ledger import Ledger, LedgerError

    if models is not None and not models.is_dir():
        raise UserError(f"--models: no folder {str(models)!r}")
    try:
        return Ledger(args.path, readonly=True, create=False, models=models)
    except LedgerError as err:
        raise UserError(str(err)) from err


def _run_ledger_list(args: argparse.Namespace) -> int:
    import json

    from unlearn.ledger.text import format_requests

    with _open_ledger(args) as ledger:
        reqs = ledger.list(state=args.state, requester=args.requester)
    print(json.dumps([r.to_dict() for r in reqs], indent=2) if args.json
          else format_requests(reqs))
    return 0


def _run_ledger_show(args: argparse.Namespace) -> int:
    import json

    from unlearn.ledger import RequestNotFoundError
    from unlearn.ledger.text import format_request

    with _open_ledger(args) as ledger:
        try:
            req, events = ledger.get(args.request_id), ledger.events(args.request_id)
        except RequestNotFoundError as err:
            raise UserError(str(err)) from err
    if args.json:
        print(json.dumps({"request": req.to_dict(), "events": [e.to_dict() for e in events]},
                         indent=2))
    else:
        print(format_request(req, events))
    return 0


def _run_ledger_verify(args: argparse.Namespace) -> int:
    import json

    with _open_ledger(args, args.models) as ledger:
        report = ledger.verify(check_models=args.models is not None, anchor=args.anchor)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    elif report.ok:
        print(report)
    else:
        print(f"{PROG}: ledger verification failed at {report.problems[0]}", file=sys.stderr)
        for problem in report.problems[1:10]:
            print(f"  also: {problem}", file=sys.stderr)
        if len(report.problems) > 10:
            print(f"  ... {len(report.problems) - 10} more", file=sys.stderr)
    return 0 if report.ok else 1


# ---------------------------------------------------------------------------- main

COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_demo, _add_request,
                                                                 _add_ledger]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Make trained PyTorch models forget data, and find the training data "
        "that harms them.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``unlearn`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args))
    except UserError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
