"""LanceDB storage of a dataworth index: schemas, idempotent writers, streaming readers."""

from storage.errors import IndexStoreError
from storage.schemas import SCHEMA_VERSION
from storage.store import IndexStore

__all__ = ["IndexStore", "IndexStoreError", "SCHEMA_VERSION"]
