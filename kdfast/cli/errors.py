"""The error every subcommand raises for bad arguments or input files."""


class UsageError(Exception):
    """A problem with the arguments or the input files, found before the work: printed as
    `kdfast COMMAND: error: ...` without a traceback, exit code 2."""
