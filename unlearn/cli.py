"""The ``unlearn`` command.

Each subcommand is one ``_add_<name>(subparsers)`` function that declares its arguments and
sets ``func`` (a callable taking the parsed namespace and returning an exit status):
``demo`` (the unlearning demo), ``influence-demo``, ``request``, ``process``, ``audit`` and
``ledger``, listed in ``COMMANDS``.
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


def unit_fraction(text: str) -> float:
    """A number in [0, 1) (a removal fraction, a momentum)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
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
DEMO_SKIPS = ("lissa", "tracin", "sgd")


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
        help="unlearning demo on scikit-learn digits: ledger, callbacks, removal, certificate",
        description="Train a small MLP on scikit-learn's 8x8 digits with a Lightning Trainer "
        "and unlearn's callbacks (training log, gradient restriction, unlearning with IAU, "
        "certification), submit deletion requests to a ledger, apply them at the end of fit and "
        "certify the result against models retrained without the data. Writes "
        "certificate.json, report.html, ledger.db, models/ and summary.json into --out, "
        "replacing those of an earlier run (the retrained references are cached in "
        "--out/references and reused). The influence demo is 'unlearn influence-demo'.",
    )
    p.add_argument("--out", type=Path, default=Path("demo-output"),
                   help="output directory (default: demo-output)")
    p.add_argument("--epochs", type=positive_int, default=None,
                   help="training epochs (default: 15, 8 with --fast)")
    p.add_argument("--references", type=positive_int, default=3,
                   help="retrained reference models, at least 3 (default: 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of split, requests and training")
    p.add_argument("--fast", action="store_true",
                   help="small version for tests: 600 train / 200 test images, 8 epochs")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from unlearn.unlearn_demo import FAST, DemoError, UnlearnDemoConfig, run_unlearn_demo

    cfg = UnlearnDemoConfig(out=args.out, seed=args.seed, n_references=args.references,
                            progress=not args.no_progress and sys.stderr.isatty())
    if args.fast:
        cfg = dataclasses.replace(cfg, **FAST)
    if args.epochs is not None:
        cfg.epochs = args.epochs
    try:
        run_unlearn_demo(cfg)
    except DemoError as err:
        raise UserError(str(err)) from err
    return 0


def _add_influence_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "influence-demo",
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
    p.set_defaults(func=_run_influence_demo)


def _run_influence_demo(args: argparse.Namespace) -> int:
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


# ---------------------------------------------------------------------------- process, audit


def _add_project_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ledger", required=True, metavar="PATH",
                   help="ledger file (or database URL) holding the requests")
    p.add_argument("--config", required=True, type=Path, metavar="FILE",
                   help="project file (TOML, or JSON with a .json name) naming the factory "
                   "'module:function' that returns (model, train, test, task); see "
                   "unlearn.project")
    p.add_argument("--json", action="store_true", help="print JSON")


def _add_process(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "process", help="apply a ledger's pending deletion requests to your model",
        description="Load the ledger's newest model version (or, for a ledger without one, "
        "the project's checkpoint, registered as version 1), reject requests naming ids "
        "outside the training set, remove the others' data with the project's method and "
        "commit the new weights as a new version (crash-safe).")
    _add_project_args(p)
    p.set_defaults(func=_run_process)


def _add_audit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "audit", help="certify the newest model against retraining without the forgotten data",
        description="Retrain reference models (at least 3 seeds, cached) on the training set "
        "minus every forgotten id, compare the ledger's newest model with them, write "
        "certificate.json and report.html, and move applied requests to 'certified' when the "
        "certificate passes. Exit status 0: pass, 1: fail, 2: error.")
    _add_project_args(p)
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="where the certificate and report go (default: the project's 'out', "
                   "else 'audit' next to the ledger)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=_run_audit)


def _project(args: argparse.Namespace) -> tuple:
    from unlearn.project import ProjectError, load_config, load_project

    try:
        cfg = load_config(args.config)
        return cfg, load_project(cfg)
    except ProjectError as err:
        raise UserError(str(err)) from err


def _beside_ledger(args: argparse.Namespace, name: str) -> Path:
    """A folder next to the ledger file (a database URL: in the current directory)."""
    if "://" in args.ledger and not args.ledger.startswith("sqlite:///"):
        return Path(name)
    return Path(args.ledger.removeprefix("sqlite:///")).resolve().parent / name


def _project_ledger(args: argparse.Namespace, cfg: object) -> Ledger:
    from unlearn.ledger import Ledger, LedgerError

    models = cfg.models or _beside_ledger(args, "models")  # type: ignore[attr-defined]
    try:
        return Ledger(args.ledger, models=models, create=False)
    except LedgerError as err:
        raise UserError(str(err)) from err


def _load_weights(model: object, state: dict, where: str) -> None:
    try:
        model.load_state_dict(state)  # type: ignore[attr-defined]
    except (RuntimeError, KeyError, TypeError) as err:
        raise UserError(f"{where} does not fit the factory's model: {err}") from err


def _checkpoint_state(path: Path | None) -> dict:
    from unlearn.checkpoints import read_weights_file

    if path is None:
        raise UserError("the ledger has no model version yet and the project file names no "
                        "'checkpoint' (the trained weights to start from)")
    try:
        blob = read_weights_file(path)
    except FileNotFoundError as err:
        raise UserError(f"missing checkpoint: {err}") from err
    except ValueError as err:
        raise UserError(f"cannot read the checkpoint: {err}") from err
    if not isinstance(blob, dict):
        raise UserError(f"the checkpoint {str(path)!r} holds a {type(blob).__name__}, not a "
                        "state_dict")
    return blob


def _head_model(ledger: Ledger, project: object, cfg: object, register: bool) -> int:
    """Load the ledger's head version into the project's model (registering the checkpoint
    as the first version when ``register`` and there is none); returns the version."""
    from unlearn.ledger import LedgerError

    try:
        head = ledger.head()
        if head is None:
            if not register:
                raise UserError("the ledger records no model version: run 'unlearn process' "
                                "first")
            state = _checkpoint_state(cfg.checkpoint)  # type: ignore[attr-defined]
            _load_weights(project.model, state, "the checkpoint")  # type: ignore
            return ledger.register_model(project.model.state_dict(),  # type: ignore
                                         meta={"source": "unlearn process",
                                               "checkpoint": str(cfg.checkpoint)})  # type: ignore
        _load_weights(project.model, ledger.load_model(head), f"model version {head}")  # type: ignore
        return head
    except LedgerError as err:
        raise UserError(str(err)) from err


def _run_process(args: argparse.Namespace) -> int:
    import json

    from unlearn.ledger import LedgerError
    from unlearn.lightning import UnlearningCallback
    from unlearn.project import ProjectError, make_method

    cfg, project = _project(args)
    with _project_ledger(args, cfg) as ledger:
        _head_model(ledger, project, cfg, register=True)
        try:
            method = make_method(cfg, project.task)
            cb = UnlearningCallback(ledger, method, train_dataset=project.train, when="manual",
                                    batch_size=cfg.batch_size)
            report = cb.process_now(None, project.model)
        except (ProjectError, LedgerError) as err:
            raise UserError(str(err)) from err
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    if not report.applied and not report.rejected:
        print("no pending requests: nothing to do")
    for rid, reason in report.rejected.items():
        print(f"request {rid}: rejected ({reason})")
    if report.applied:
        print(f"requests {report.applied}: applied with {type(method).__name__}, "
              f"{report.n_forget} samples forgotten, model version {report.model_version} "
              f"({report.seconds:.2f} s)")
    return 0


def _run_audit(args: argparse.Namespace) -> int:
    import json

    from baselines.retrain import Retrain
    from unlearn.ledger import LedgerError
    from unlearn.lightning.certification import CertificationCallback
    from unlearn.project import ProjectError, make_recipe

    cfg, project = _project(args)
    out = args.out or cfg.out or _beside_ledger(args, "audit")
    with _project_ledger(args, cfg) as ledger:
        _head_model(ledger, project, cfg, register=False)
        try:
            reference = Retrain(project.task, project.model_factory, recipe=make_recipe(cfg))
            cb = CertificationCallback(
                ledger, reference, train_dataset=project.train, test_dataset=project.test,
                out_dir=out, cache_dir=cfg.cache_dir or _beside_ledger(args, "references"),
                n_references=cfg.n_references, k=cfg.k,
                task=project.task, batch_size=cfg.batch_size,
                progress=not args.no_progress and sys.stderr.isatty())
            cert = cb.certify_now(None, project.model)
        except (ProjectError, LedgerError, ValueError) as err:
            raise UserError(str(err)) from err
    record = cb.history[-1]
    if args.json:
        print(json.dumps({"passed": cert.passed, "failed_checks": cert.failed,
                          "certificate": record.certificate, "report": record.report,
                          "certified": record.certified, "retrained": record.retrained},
                         indent=2))
    else:
        print(cert.summary())
        state = (f"requests {record.certified} certified" if record.certified
                 else "no request moved to certified")
        print(f"{state}; wrote {record.certificate} and {record.report} "
              f"({record.retrained} references retrained, the others from the cache)")
    return 0 if cert.passed else 1


# ---------------------------------------------------------------------------- main

def _add_gan_cleanse(sub: argparse._SubParsersAction) -> None:
    from unlearn import cli_gan  # its parser imports no torch

    cli_gan.add_parser(sub)


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_demo, _add_influence_demo, _add_request, _add_process, _add_audit, _add_ledger,
    _add_gan_cleanse]


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
