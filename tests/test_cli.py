"""``python -m kronjax``: help, unknown commands and every argument check, before any work.

Each error path must exit with status 2 and one line on stderr naming the argument, without
running anything: the demos' ``run`` functions are replaced by ones that fail if called.
"""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from kronjax import demo, synthetic_demo
from kronjax.__main__ import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_run(monkeypatch):
    """The demos' computations, replaced: calling either fails the test."""

    def forbidden(*args, **kwargs):
        raise AssertionError("the demo ran although its arguments are invalid")

    monkeypatch.setattr(demo, "run", forbidden)
    monkeypatch.setattr(synthetic_demo, "run", forbidden)


def exit_code(argv, entry=main) -> tuple[int, float]:
    """Run ``entry(argv)``; return its exit status and wall time."""
    start = time.perf_counter()
    with pytest.raises(SystemExit) as info:
        entry(argv)
    return info.value.code, time.perf_counter() - start


def assert_one_line_error(capsys, *needles) -> str:
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert captured.out == ""
    assert err and "\n" not in err, err
    assert "error:" in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.mark.core
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_top_level_help_lists_commands(flag, capsys):
    code, _ = exit_code([flag])
    assert code == 0
    out = capsys.readouterr().out
    assert "demo" in out and "synthetic" in out
    assert demo.SUMMARY.split()[0] in out and synthetic_demo.SUMMARY.split()[0] in out


@pytest.mark.core
def test_no_command_prints_usage(no_run, capsys):
    code, _ = exit_code([])
    assert code == 2
    err = capsys.readouterr().err
    assert "usage: python -m kronjax" in err and "demo" in err and "synthetic" in err


@pytest.mark.core
def test_unknown_command(no_run, capsys):
    code, seconds = exit_code(["frobnicate", "--steps", "3"])
    assert code == 2 and seconds < 5
    assert_one_line_error(capsys, "unknown command 'frobnicate'", "demo", "synthetic")


@pytest.mark.core
@pytest.mark.parametrize(
    "command, defaults",
    [
        ("demo", ["(default: elnino_forecast.png)", "(default: 300)", "(default: 0)"]),
        ("synthetic", ["(default: [48, 40, 32])", "(default: 100)", "(default: lbfgs)"]),
    ],
)
def test_command_help_shows_defaults(command, defaults, capsys):
    code, _ = exit_code([command, "--help"])
    assert code == 0
    out = " ".join(capsys.readouterr().out.split())  # undo the line wrapping
    for default in defaults:
        assert default in out


DEMO_ERRORS = [
    (["--out", "{tmp}/missing/dir/x.png"], ["--out", "does not exist"]),
    (["--out", "{tmp}/forecast.txt"], ["--out", ".png"]),
    (["--out", "{tmp}"], ["--out", ".png"]),
    (["--steps", "-5"], ["--steps", "at least 1", "-5"]),
    (["--steps", "0"], ["--steps", "at least 1"]),
    (["--steps", "2.5"], ["--steps", "integer"]),
    (["--num-samples", "0"], ["--num-samples", "at least 1"]),
    (["--num-warmup", "-1"], ["--num-warmup", "at least 1"]),
    (["--seed", "-1"], ["--seed", "at least 0"]),
    (["--seed", str(2**32)], ["--seed", "at most"]),
    (["--bogus"], ["unrecognized arguments: --bogus"]),
]


@pytest.mark.core
@pytest.mark.parametrize("argv, needles", DEMO_ERRORS, ids=[" ".join(a) for a, _ in DEMO_ERRORS])
def test_demo_rejects(argv, needles, tmp_path, no_run, capsys):
    argv = [a.format(tmp=tmp_path) for a in argv]
    code, seconds = exit_code(["demo", *argv])
    assert code == 2 and seconds < 5
    assert_one_line_error(capsys, "python -m kronjax", *needles)
    assert not (tmp_path / "missing").exists()


@pytest.mark.core
def test_demo_main_rejects_too(no_run, capsys):
    """``demo.main`` on its own (not through ``python -m kronjax``) checks the same way."""
    code, _ = exit_code(["--steps", "-5"], entry=demo.main)
    assert code == 2
    assert_one_line_error(capsys, "python -m kronjax demo", "--steps")


@pytest.mark.core
def test_demo_run_rejects_bad_counts():
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        demo.run(steps=-5)
    with pytest.raises(ValueError, match="seed must be an integer >= 0"):
        demo.run(seed=-1)


SYNTHETIC_ERRORS = [
    (["--shape", "0", "4"], ["--shape", "at least 2", "0"]),
    (["--shape", "1"], ["--shape", "at least 2"]),
    (["--shape", "5", "4", "3", "2"], ["--shape", "at most 3 axes"]),
    (["--shape", "4096", "4096", "2"], ["--shape", "cells"]),
    (["--shape"], ["--shape", "expected at least one argument"]),
    (["--steps", "0"], ["--steps", "at least 1"]),
    (["--learning-rate", "0"], ["--learning-rate", "> 0"]),
    (["--learning-rate", "nan"], ["--learning-rate", "> 0"]),
    (["--optimizer", "sgd"], ["--optimizer", "invalid choice"]),
    (["--seed", "-1"], ["--seed", "at least 0"]),
]


@pytest.mark.core
@pytest.mark.parametrize(
    "argv, needles", SYNTHETIC_ERRORS, ids=[" ".join(a) for a, _ in SYNTHETIC_ERRORS]
)
def test_synthetic_rejects(argv, needles, no_run, capsys):
    code, seconds = exit_code(["synthetic", *argv])
    assert code == 2 and seconds < 5
    assert_one_line_error(capsys, "python -m kronjax synthetic", *needles)


@pytest.mark.core
@pytest.mark.parametrize("shape", [["5"], ["6", "5"], ["6", "5", "4"]])
def test_synthetic_accepts_one_to_three_axes(shape, monkeypatch):
    calls = []
    monkeypatch.setattr(synthetic_demo, "run", lambda *args: calls.append(args))
    main(["synthetic", "--shape", *shape, "--steps", "7", "--seed", "3"])
    assert calls == [(tuple(map(int, shape)), 7, 3, "lbfgs", 0.05)]


def test_cli_error_in_a_fresh_process(tmp_path):
    """End to end: exit status 2, one line on stderr, no traceback, long before any fit."""
    missing = tmp_path / "missing" / "x.png"
    proc = subprocess.run(
        [sys.executable, "-m", "kronjax", "demo", "--out", str(missing)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    err = proc.stderr.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith("python -m kronjax demo: error: argument --out:"), err
