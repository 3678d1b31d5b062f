"""User-facing errors.

Anything a researcher can fix (a missing file, a typo in a config key, an unknown codec)
raises :class:`ClbenchError` with ONE line that names the thing and says what to do.
The CLI prints it as ``clbench: error: <message>`` and exits with status 2; tracebacks are
kept for real bugs.
"""

from __future__ import annotations


class ClbenchError(Exception):
    """An error caused by the user's input, reported as one line without a traceback."""


class DataNotFoundError(ClbenchError):
    """Expected dataset files are missing."""


class ConfigError(ClbenchError):
    """A configuration value or key is invalid."""
