"""argparse types shared by the project's command-line tools (the sweep report, the benchmarks)."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def output_directory(text: str) -> Path:
    """A directory to write into, made now if missing: a bad one is refused before any work, not
    after it."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path: must name a directory (made if missing)")
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file: must be a directory (made if missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot make directory {text}: {exc.strerror}") from None
    try:
        tempfile.TemporaryFile(dir=path).close()
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot write into directory {text}: {exc.strerror}") from None
    return path
