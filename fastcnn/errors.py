"""Exceptions for a user's mistakes.

Anything derived from UserError is printed by the CLI as one line
``Error: <message>`` with exit code 2 and no traceback. Every other exception
is an internal error (exit 1).
"""


class UserError(Exception):
    """A mistake the user can fix: bad config, missing file, bad checkpoint."""


class ConfigError(UserError):
    """The config (file or --set override) is wrong; the message names the key path."""

    def __init__(self, path, message):
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


class DataError(UserError):
    """A dataset is missing, corrupt or cannot be downloaded."""


class CheckpointError(UserError):
    """A checkpoint file is missing, corrupt or does not match the model."""


class Terminated(KeyboardInterrupt):
    """SIGTERM outside the training loop's own handling (or a second one inside it): exit 143."""


def raise_terminated(signum, frame):
    """The CLI's SIGTERM handler outside training: raise Terminated (a KeyboardInterrupt), so that
    `finally` blocks run and the command exits 143 with one line."""
    raise Terminated


def interrupt_for(signum):
    """The exception a stop by signal raises where it is acted on: Terminated for SIGTERM, else
    KeyboardInterrupt (SIGINT)."""
    import signal

    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()
