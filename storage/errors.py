"""The one error type of the storage layer."""

from __future__ import annotations


class IndexStoreError(ValueError):
    """Bad input to the index store, or an index it cannot read.

    A ValueError so that tasks never retry it: rewriting the same bad data fails the same way. `fix` says what
    to do about it (the command line prints `<message> — <fix>`).
    """

    fix = "rebuild the index with --overwrite, or point --index at a dataworth index"

    def __init__(self, *args: object, fix: str | None = None) -> None:
        super().__init__(*args)
        if fix:
            self.fix = fix


REBUILD_HINT = "rebuild the index with overwrite=True"
