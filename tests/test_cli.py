"""Tests for the ``unlearn`` command: ``unlearn influence-demo``, --version, bad arguments."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from unlearn.cli import main
from unlearn.demo import DemoConfig, DemoError, available_estimators, resolve_estimator

FILES = ("influence_grid.png", "influence_table.txt", "mislabel_curve.png", "summary.json")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path]:
    out = tmp_path_factory.mktemp("demo")
    code = main(["influence-demo", "--out", str(out), "--fast", "--estimator", "exact",
                 "--no-progress"])
    return code, out


def test_demo_writes_every_file(demo_run: tuple[int, Path]) -> None:
    code, out = demo_run
    assert code == 0
    for name in FILES:
        path = out / name
        assert path.is_file() and path.stat().st_size > 0, name
    assert (out / "influence_grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_summary_numbers_are_sane(demo_run: tuple[int, Path]) -> None:
    summary = json.loads((demo_run[1] / "summary.json").read_text())
    assert summary["estimator"] == "ExactInfluence"
    assert summary["test_accuracy"] > 0.9  # logistic regression on digits: ~95%
    found = summary["mislabel"]["found_at"]
    # Flipped labels are 10% of the data: a perfect ranking finds all of them at 10%, a random
    # one 10% / 20%. Self-influence must be far better than random.
    assert found["self-influence"]["10%"] > 0.6
    assert found["self-influence"]["20%"] > 0.8
    assert found["random"]["20%"] == pytest.approx(0.2, abs=0.01)
    assert summary["mislabel"]["n_flipped"] == round(0.1 * summary["config"]["n_train"])
    for row in summary["queries"]:
        helpful = [r["score"] for r in row["helpful"]]
        harmful = [r["score"] for r in row["harmful"]]
        assert helpful == sorted(helpful, reverse=True) and harmful == sorted(harmful)
        assert helpful[0] > 0 > harmful[0]
        assert len(helpful) == len(harmful) == 5


def test_demo_table_names_ids_labels_and_scores(demo_run: tuple[int, Path]) -> None:
    summary = json.loads((demo_run[1] / "summary.json").read_text())
    table = (demo_run[1] / "influence_table.txt").read_text()
    first = summary["queries"][0]
    assert f"test id {first['id']}: label {first['label']}" in table
    top = first["helpful"][0]
    assert f"id {top['id']:>4}  y={top['label']}  {top['score']:+.2e}" in table


def test_retrain_check_matches_prediction(tmp_path: Path) -> None:
    """With damping = L2 strength, removing the most helpful image and retraining raises the
    query's loss, as predicted (the demo's own honesty check)."""
    from unlearn.demo import run_demo

    cfg = DemoConfig(out=tmp_path, estimator="exact", n_train=300, n_test=100, n_queries=2,
                     l2=1e-2, progress=False)
    summary = run_demo(cfg, log=lambda _msg: None)
    singles = [c for c in summary["retrain_check"] if len(c["removed_ids"]) == 1]
    assert len(singles) == 4
    for c in singles:
        assert c["predicted_change"] * c["actual_change"] > 0  # same sign
    assert summary["retrain_check_pearson"] > 0.9


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip().startswith("unlearn 0.")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["influence-demo", "--queries", "0"], "expected a positive integer, got '0'"),
        (["influence-demo", "--l2", "abc"], "expected a positive number, got 'abc'"),
        (["influence-demo", "--nope"], "unrecognized arguments: --nope"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_bad_arguments_exit_nonzero(argv: list[str], message: str,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_values_are_user_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    afile = tmp_path / "file.txt"
    afile.write_text("x")
    cases = [
        (["influence-demo", "--out", str(afile)], "is not a directory"),
        (["influence-demo", "--out", str(tmp_path), "--estimator", "magic"],
         "unknown estimator 'magic'"),
        (["influence-demo", "--out", str(tmp_path), "--flip", "0.7"],
         "flip fraction must be in"),
        (["influence-demo", "--out", str(tmp_path), "--queries", "500"],
         "queries must be between"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("unlearn: error:") and message in err, (argv, err)
        assert "Traceback" not in err


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "demo" in capsys.readouterr().err


def test_estimator_names_resolve() -> None:
    assert "exact" in available_estimators()
    assert resolve_estimator("exact").__name__ == "ExactInfluence"
    assert resolve_estimator("ExactInfluence").__name__ == "ExactInfluence"
    with pytest.raises(DemoError, match="unknown estimator 'bogus'"):
        resolve_estimator("bogus")


def test_cli_help_lists_only_estimators_the_demo_runs() -> None:
    from unlearn import cli, demo

    assert set(cli.DEMO_SKIPS) == set(demo._NOT_IN_DEMO)
    assert set(cli._estimator_names()) | set(cli.DEMO_SKIPS) == set(demo.estimator_names())
    for name in cli.DEMO_SKIPS:
        with pytest.raises(DemoError, match="cannot run in the demo"):
            resolve_estimator(name)


def test_console_script_reports_errors_without_traceback() -> None:
    proc = subprocess.run([sys.executable, "-m", "unlearn.cli", "influence-demo", "--top",
                           "-3"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "expected a positive integer, got '-3'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_gan_cleanse_is_a_subcommand_of_unlearn(tmp_path, capsys):
    import json

    from unlearn.cli import main

    out = tmp_path / "gan"
    assert main(["gan-cleanse", "--dataset", "2d", "--n-train", "60", "--epochs", "2",
                 "--batch-size", "20", "--fraction", "0.1", "--out", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["n_removed"] == 6
    # a bad request is a clear error and exit status 2, not a traceback
    assert main(["gan-cleanse", "--dataset", "mnist", "--mnist-root", str(tmp_path / "none"),
                 "--out", str(tmp_path / "o")]) == 2
    assert "MNIST" in capsys.readouterr().err
