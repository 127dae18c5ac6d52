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


# ---------------------------------------------------------------------------- main

COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_demo]


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
