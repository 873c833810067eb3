"""Errors a user can fix: a file, a shape, a setting. Their message is one line that says what
is wrong and how to fix it; the stages print it and exit with status 2 instead of a traceback."""


class InputError(ValueError):
    """Bad input (data, statistics, checkpoint, settings) rather than a bug; the message is one line."""


class ConfigError(InputError):
    """A variant description (or params file) that cannot be built. The message is one line."""
