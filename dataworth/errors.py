"""Named error types of dataworth, and the rule for which failures are worth a retry.

Every error type is a ValueError: it reports bad input (a config, a corpus, a model, an
index that does not match), and running the same input again fails the same way, so it is
never retried. The message names the bad value and the fix.
"""

from __future__ import annotations


class DataworthError(ValueError):
    """Base of dataworth's errors: bad input that no retry can fix."""


class ConfigError(DataworthError):
    """A setting is out of range, contradicts another, or asks for what this machine lacks."""


class DataError(DataworthError):
    """The corpus, its examples or the token sequences handed to a function are unusable."""


class QueryError(DataError):
    """A query is missing, malformed, repeated, too long, or has no completion to attribute."""


class ModelError(DataworthError):
    """The model or tokenizer cannot be loaded, or has no layers or parameters to work with."""


class IndexMismatchError(DataworthError):
    """Stored gradients, projections or curvature do not fit the configuration or model at hand."""


# OS errors that say the input is wrong, not that the system hiccuped: a retry sees the same.
_PERMANENT_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def is_retryable(exc: BaseException) -> bool:
    """True for transient I/O failures (network, timeouts, a busy disk), False for everything else.

    Bad input (any ValueError, dataworth's named errors included), missing files and bugs
    fail again on a retry, so they are never retried.
    """
    if isinstance(exc, (ValueError, _PERMANENT_OS_ERRORS)):
        return False
    return isinstance(exc, OSError)  # ConnectionError and TimeoutError are OSErrors too
