"""The command line's error boundary: every failure ends as one line `dataworth <command>: <what is wrong> — <the
fix>`, and the tracebacks (Prefect's task and flow logs included) go to a log file whose path that line names,
not to the terminal, unless `--debug`.

Errors are translated where they arise (dataworth.data names the file and line of a corpus it cannot parse,
storage names the table it cannot read); this module only words the fix for each kind of failure that reaches
the command line.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import tempfile
import time
from pathlib import Path

LOG_DIR_ENV = "DATAWORTH_LOG_DIR"
DEFAULT_LOG_DIR = os.path.join("dataworth-runs", "logs")

# OS errors by errno: what to do about each (the message already names the file).
_OS_FIXES = {
    errno.ENOENT: "check the path",
    errno.EACCES: "check the permissions, or choose a location this user can write",
    errno.EPERM: "check the permissions, or choose a location this user can write",
    errno.EROFS: "the location is on a read-only file system: choose a writable one",
    errno.ENOSPC: "the disk is full: free space or choose another location",
    errno.EEXIST: "a file is in the way: remove it or choose another path",
    errno.ENOTDIR: "a file stands where a directory is expected: remove it or choose another path",
    errno.EISDIR: "a directory stands where a file is expected: give the file's path",
}


class _NoTraceback(logging.Formatter):
    """Formats a record as `inner` does, minus its traceback and stack: the terminal gets one line per record,
    the log file the whole record."""

    def __init__(self, inner: logging.Formatter | None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None
        try:
            text = self.inner.format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved
        return text.split("\nTraceback (most recent call last):", 1)[0]

    def __getattr__(self, name: str):  # PrefectConsoleHandler reads styles and formats from its formatter
        if name == "inner" or name.startswith("__"):  # not set yet (a copy being made): no delegation
            raise AttributeError(name)
        return getattr(self.inner, name)


class RunLog:
    """A log file for one command: every log record with its traceback, from the moment `install` runs.

    The terminal's handlers stop printing tracebacks (unless debug); the file keeps them. Kept when the command
    fails (its path is printed), deleted when it succeeds (the run's logs are also in Prefect and MLflow)."""

    def __init__(self, command: str, debug: bool) -> None:
        self.command, self.debug = command, debug
        self.path: Path | None = None
        self._handler: logging.Handler | None = None
        self._wrapped: list[tuple[logging.Handler, logging.Formatter | None]] = []

    def install(self) -> None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for folder in (os.environ.get(LOG_DIR_ENV) or DEFAULT_LOG_DIR, tempfile.gettempdir()):
            try:
                Path(folder).mkdir(parents=True, exist_ok=True)
                path = Path(folder, f"{self.command}-{stamp}-{os.getpid()}.log").absolute()
                handler = logging.FileHandler(path, encoding="utf-8", delay=False)
                break
            except OSError:
                continue
        else:
            return
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-7s %(processName)s/%(threadName)s %(name)s - %(message)s")
        )
        root = logging.getLogger()
        root.addHandler(handler)
        self.path, self._handler = path, handler
        if self.debug:
            return
        for h in root.handlers:
            if h is not handler and isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                self._wrapped.append((h, h.formatter))
                h.setFormatter(_NoTraceback(h.formatter))

    def log_failure(self, err: BaseException) -> None:
        if self._handler is not None:
            record = logging.LogRecord("dataworth", logging.ERROR, __file__, 0, "command failed", None, None)
            record.exc_info = (type(err), err, err.__traceback__)
            self._handler.handle(record)

    def close(self, keep: bool) -> None:
        for h, formatter in self._wrapped:
            h.setFormatter(formatter)
        self._wrapped.clear()
        if self._handler is not None:
            logging.getLogger().removeHandler(self._handler)
            self._handler.close()
            self._handler = None
            if not keep and self.path is not None:
                self.path.unlink(missing_ok=True)


def one_line(text: object) -> str:
    """The message on one line (newlines and runs of spaces folded)."""
    return re.sub(r"\s+", " ", str(text)).strip()


def describe_failure(err: BaseException) -> tuple[str, str]:
    """(what is wrong, the fix) for an exception that ended a command."""
    from dataworth.errors import DataworthError
    from storage.errors import IndexStoreError

    message = one_line(err) or type(err).__name__
    if isinstance(err, ValueError):
        if "fix" in vars(err):  # a fix given where the error was raised
            return message, err.fix
        what, sep, fix = message.rpartition("; ")  # the house style: "<what is wrong>; <the fix>"
        if sep and what and fix:
            return what, fix
        if isinstance(err, (DataworthError, IndexStoreError)):
            return message, err.fix
    if isinstance(err, (RuntimeError, OSError)) and "LanceError" in message:  # a table's files damaged or gone
        return (
            f"the index's data cannot be read: {message[:300]}",
            "the index is damaged: rebuild it with `dataworth index --overwrite` (or restore it from a copy)",
        )
    if isinstance(err, OSError) and err.errno in _OS_FIXES:
        where = f": {err.filename}" if err.filename and str(err.filename) not in message else ""
        return f"{message}{where}", _OS_FIXES[err.errno]
    if isinstance(err, (ConnectionError, TimeoutError)):
        return f"{type(err).__name__}: {message}", "a network or storage service did not answer; run again"
    if isinstance(err, MemoryError):
        return "out of memory", "lower --batch-size (or the query batch), or use a machine with more memory"
    if isinstance(err, ValueError):
        return message, "correct the value named above and run again"
    return (
        f"unexpected {type(err).__name__}: {message}",
        "this is a bug or an environment problem; the log has the traceback (--debug prints it)",
    )
