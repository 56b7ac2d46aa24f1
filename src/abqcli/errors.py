"""Errors that the CLI turns into one line and an exit code.

Exit codes (documented in the README and `abq --help`):
0 ok, 1 failure while running, 2 bad input (recipe, paths, options).
"""

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_BAD_INPUT = 2


class AbqError(Exception):
    """Base class: a message meant for the user, and the exit code it maps to."""

    exit_code = EXIT_RUNTIME


class InputError(AbqError):
    """The user gave something abq cannot use (bad recipe, missing file, bad option)."""

    exit_code = EXIT_BAD_INPUT


class RunError(AbqError):
    """Something failed while running (non-finite loss, verification mismatch)."""

    exit_code = EXIT_RUNTIME


def name_list(names: list[str], shown: int = 5) -> str:
    """`a, b, c` or `a, b, c, d, e and 7 more`: a bounded list of names for a one-line message."""
    text = ", ".join(names[:shown])
    return text + (f" and {len(names) - shown} more" if len(names) > shown else "")
