"""The `kdfast` command: `kdfast distill` (kdfast/cli/distill.py), `kdfast evaluate`
(kdfast/cli/evaluate.py) and `kdfast topk` (kdfast/cli/topk.py). Each subcommand module has
add_arguments(parser) and run(args) -> exit code, and raises kdfast.cli.errors.UsageError for bad
arguments or input files."""

from __future__ import annotations

import argparse
import sys

from . import distill, evaluate, topk
from .errors import UsageError

COMMANDS = {
    "topk": (
        topk,
        "top-K keys per query from embedding files (a teacher's ranking), written to .npz",
    ),
    "distill": (
        distill,
        "train a teacher, distill students with chosen KD methods, report and plot the metrics",
    ),
    "evaluate": (
        evaluate,
        "reload a saved student or teacher, evaluate it on its split, export its tables",
    ),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="kdfast", description="Fast knowledge distillation for recommender systems."
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"kdfast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    subparsers = {}
    for name, (module, help_text) in COMMANDS.items():
        subparsers[name] = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(subparsers[name])
    args = parser.parse_args(argv)
    try:
        if getattr(args, "config", None):  # the file's values become defaults; the flags win
            from .config import load_config

            subparsers[args.command].set_defaults(
                **load_config(args.config, subparsers[args.command])
            )
            args = parser.parse_args(argv)
        return int(COMMANDS[args.command][0].run(args) or 0)
    except UsageError as exc:
        print(f"kdfast {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
