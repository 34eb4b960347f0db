"""LanceDB storage of a dataworth index: schemas, the typed manifest, table builders, idempotent
writers, streaming readers."""

from storage.errors import IndexStoreError
from storage.manifest import IndexBuildConfig, IndexManifest, IndexState
from storage.results import load_results, results_store
from storage.schemas import SCHEMA_VERSION
from storage.store import IndexStore
from storage.tables import examples_table, queries_table, scores_table, write_csv

__all__ = [
    "SCHEMA_VERSION",
    "IndexBuildConfig",
    "IndexManifest",
    "IndexState",
    "IndexStore",
    "IndexStoreError",
    "examples_table",
    "load_results",
    "queries_table",
    "results_store",
    "scores_table",
    "write_csv",
]
