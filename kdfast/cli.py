"""The `kdfast` command. Each subcommand lives in kdfast/commands/<name>.py with
add_arguments(parser) and run(args) -> exit code; they are imported only when used."""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "topk": "top-K keys per query from embedding files (a teacher's ranking), written to .npz",
    "distill": "train a teacher, distill students with chosen KD methods, report and plot the metrics",
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="kdfast", description="Fast knowledge distillation for recommender systems.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    modules = {}
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        try:
            modules[name] = importlib.import_module(f"kdfast.commands.{name}")
        except ModuleNotFoundError:
            continue
        modules[name].add_arguments(p)
    args = parser.parse_args(argv)
    if args.command not in modules:
        parser.error(f"the {args.command} command is not available in this build")
    try:
        return int(modules[args.command].run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
