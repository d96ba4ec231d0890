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
