"""Named error types of dataworth, and the rule for which failures are worth a retry.

Every error type is a ValueError: it reports bad input (a config, a corpus, a model, an
index that does not match), and running the same input again fails the same way, so it is
never retried. The message names the bad value and the fix.
"""

from __future__ import annotations

import errno


class DataworthError(ValueError):
    """Base of dataworth's errors: bad input that no retry can fix.

    `fix` says what to do about it (the command line prints `<message> — <fix>`); each class has a default,
    and `fix=` gives a specific one.
    """

    fix = "correct the value named above and run again"

    def __init__(self, *args: object, fix: str | None = None) -> None:
        super().__init__(*args)
        if fix:
            self.fix = fix


class ConfigError(DataworthError):
    """A setting is out of range, contradicts another, or asks for what this machine lacks."""

    fix = "change the setting named above"


class DataError(DataworthError):
    """The corpus, its examples or the token sequences handed to a function are unusable."""

    fix = "correct the corpus, or the column and split settings, named above"


class QueryError(DataError):
    """A query is missing, malformed, repeated, too long, or has no completion to attribute."""

    fix = "correct the query named above"


class ModelError(DataworthError):
    """The model or tokenizer cannot be loaded, or has no layers or parameters to work with."""

    fix = "give a local directory saved with save_pretrained, or a hub name, of a causal language model"


class IndexMismatchError(DataworthError):
    """Stored gradients, projections or curvature do not fit the configuration or model at hand."""

    fix = "query with the model and settings the index was built with, or rebuild it with --overwrite"


# OS errors that say the input is wrong, not that the system hiccuped: a retry sees the same.
_PERMANENT_OS_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)
# ...and by errno, whatever their class (libraries raise plain OSError): a read-only or full disk, a bad path.
_PERMANENT_ERRNOS = frozenset(
    {errno.ENOENT, errno.EEXIST, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EISDIR, errno.ENOTDIR}
)


def is_retryable(exc: BaseException) -> bool:
    """True for transient I/O failures (network, timeouts, a busy disk), False for everything else.

    Bad input (any ValueError, dataworth's named errors included), missing files and bugs
    fail again on a retry, so they are never retried.
    """
    if isinstance(exc, (ValueError, _PERMANENT_OS_ERRORS)):
        return False
    if isinstance(exc, OSError) and exc.errno in _PERMANENT_ERRNOS:
        return False
    return isinstance(exc, OSError)  # ConnectionError and TimeoutError are OSErrors too
