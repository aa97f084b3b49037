"""Errors the CLI reports as one line with a non-zero exit code."""


class UserError(Exception):
    """Bad input or an unmet precondition: reported as one line, exit code 2."""

    exit_code = 2


class CheckFailed(UserError):
    """An exported artifact failed its self-check: exit code 1."""

    exit_code = 1
