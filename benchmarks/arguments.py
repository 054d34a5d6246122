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


class DistinctValues(argparse.Action):
    """A list option's values, each at most once: a value given twice would be timed twice, as two
    rows of one point (`--concurrency 100 100`)."""

    def __call__(self, parser, namespace, values, option_string=None):
        repeated = list(dict.fromkeys(v for i, v in enumerate(values) if v in values[:i]))
        if repeated:
            parser.error(f"argument {option_string}: {' '.join(map(str, repeated))} given more than once")
        setattr(namespace, self.dest, values)
