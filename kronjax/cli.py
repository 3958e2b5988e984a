"""Argument checks shared by the command line (``python -m kronjax``) and its demos.

Every check runs while the arguments are parsed, before any computation; a bad value stops
the program with one line on stderr, ``<prog>: error: argument --x: <why>``, and exit
status 2 (argparse's convention for usage errors).
"""

import argparse
import math
import os
from pathlib import Path


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` that shows defaults in ``--help`` and reports errors in one line."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        """Print ``<prog>: error: <message>`` (one line) to stderr and exit with status 2."""
        message = " ".join(str(message).split())
        self.exit(2, f"{self.prog}: error: {message} (--help for usage)\n")


def integer(low: int, high: int | None = None):
    """An argparse ``type``: an integer in ``[low, high]`` (``high`` None: no upper bound)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be at most {high}, got {value}")
        return value

    return parse


def positive_float(text: str) -> float:
    """An argparse ``type``: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def png_path(text: str) -> Path:
    """An argparse ``type``: a ``.png`` file name in an existing, writable directory."""
    path = Path(text)
    if path.suffix.lower() != ".png":
        raise argparse.ArgumentTypeError(f"must be a .png file name, got {text!r}")
    parent = path.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"directory {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"directory {str(parent)!r} is not writable")
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a directory")
    if path.exists() and not os.access(path, os.W_OK):
        raise argparse.ArgumentTypeError(f"{text!r} exists and is not writable")
    return path
