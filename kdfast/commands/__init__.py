"""Subcommands of the `kdfast` command line."""
