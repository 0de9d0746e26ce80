"""The one exception type users see as a one-line message instead of a traceback."""


class KdrunError(Exception):
    """A problem with the user's input or environment, reported as one line (exit code 2)."""

    exit_code = 2
