"""Command-line argument types the benchmarks share. Standard library only: vs_flower.py parses its
arguments before it imports anything heavy (its whole-run times start at process start)."""

from __future__ import annotations

import argparse

from asyncflower_jax import cli

output_directory = cli.output_directory  # (standard library only too)


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1 (a count, a size), refused with the option's name otherwise."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is invalid: must be >= 1")
    return value
