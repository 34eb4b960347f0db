"""The one error type of the storage layer."""

from __future__ import annotations


class IndexStoreError(ValueError):
    """Bad input to the index store, or an index it cannot read.

    A ValueError so that tasks never retry it: rewriting the same bad data fails the same way.
    """


REBUILD_HINT = "rebuild the index with overwrite=True"
