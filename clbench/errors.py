"""User-facing errors.

Anything a researcher can fix (a missing file, a typo in a config key, an unknown codec)
raises :class:`ClbenchError` with ONE line that names the thing and says what to do.
The CLI prints it as ``clbench: error: <message>`` and exits with status 2; tracebacks are
kept for real bugs.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

# Also how a parent process recognises the user error in a child's stderr (executors).
ERROR_PREFIX = "clbench: error: "


class ClbenchError(Exception):
    """An error caused by the user's input, reported as one line without a traceback."""


class DataNotFoundError(ClbenchError):
    """Expected dataset files are missing."""


class ConfigError(ClbenchError):
    """A configuration value or key is invalid."""


class ClbenchWarning(UserWarning):
    """Something a researcher should know about a run that does not stop it (e.g. a
    compressed exemplar larger than the raw one). The runner prints each one and keeps it in
    the run record's ``warnings``."""


def exit_status(command: Callable[..., int | None], *args: Any) -> int:
    """Run a CLI command: its status (None is 0), or 2 after printing a :class:`ClbenchError`
    as the one ``clbench: error: ...`` line on stderr. Every entry point goes through here."""
    try:
        return int(command(*args) or 0)
    except ClbenchError as e:
        print(f"{ERROR_PREFIX}{e}", file=sys.stderr)
        return 2
