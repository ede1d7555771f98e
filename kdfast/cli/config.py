"""`--config FILE`: any of a command's options from a file, as defaults that flags given on the
command line override.

Formats: TOML (.toml), YAML (.yaml/.yml, when PyYAML is installed), JSON (.json), and a
results.json that `kdfast distill` wrote (its "config" -> "args": the exact options of that run,
so `kdfast distill --config OUT/results.json --out OTHER` reruns the same experiment). Keys are the
options' long names with '-' or '_' ("teacher-dim" or teacher_dim); an option that repeats
(--option, --sweep) takes a list; an unknown key is an error that names it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .errors import UsageError


def _read(path: Path) -> dict:
    suffix = path.suffix.lower()
    text = path.read_text()
    if suffix == ".toml":
        import tomllib

        return tomllib.loads(text)
    if suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise UsageError(
                f"--config {path}: reading YAML needs PyYAML (pip install pyyaml); or use TOML"
            ) from None
        data = yaml.safe_load(text)
        return {} if data is None else data
    if suffix == ".json":
        data = json.loads(text)
        if isinstance(data, dict) and isinstance(data.get("config"), dict):
            args = data["config"].get("args")
            if not isinstance(args, dict):
                raise UsageError(
                    f"--config {path}: this results.json does not record its arguments (written "
                    "by an earlier kdfast)"
                )
            return args
        return data
    raise UsageError(f"--config {path}: use a .toml, .yaml/.yml or .json file")


def load_config(file, parser: argparse.ArgumentParser) -> dict:
    """{dest: value} for parser.set_defaults from a config file; UsageError for an unreadable
    file, a file that is not a table of options, or a key that is no option of the command."""
    path = Path(file)
    try:
        data = _read(path)
    except UsageError:
        raise
    except (OSError, ValueError) as exc:  # tomllib/json errors are ValueErrors
        raise UsageError(f"--config {path}: {exc}") from None
    if not isinstance(data, dict):
        raise UsageError(f"--config {path}: expected a table of options, got {type(data).__name__}")
    dests = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    out = {}
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        if dest not in dests:
            raise UsageError(
                f"--config {path}: {key!r} is not an option of this command; known: "
                f"{', '.join(sorted(dests))}"
            )
        action = dests[dest]
        if isinstance(action, argparse._AppendAction) and not isinstance(value, list):
            value = [value]
        out[dest] = value
    return out
