"""LanceDB storage of a dataworth index: schemas, the typed manifest, table builders, idempotent
writers, streaming readers."""

from storage.deferred import defer_package_init

# lancedb imports lance_namespace, whose request models live in the package of Lance's generated REST namespace
# client: that package's __init__ imports the client's API classes, hundreds of pydantic validate_call wrappers
# built at import (1.5–2.5 s of every command's start-up), for a REST service no index here talks to. The
# models import as usual; the __init__ runs the first time anything asks the package itself for a name.
defer_package_init("lance_namespace_urllib3_client")

from storage.errors import IndexStoreError  # noqa: E402
from storage.gradients import squared_norms  # noqa: E402
from storage.manifest import IndexBuildConfig, IndexManifest, IndexState  # noqa: E402
from storage.results import load_results, results_store  # noqa: E402
from storage.schemas import SCHEMA_VERSION  # noqa: E402
from storage.store import IndexStore  # noqa: E402
from storage.tables import examples_table, queries_table, scores_table, write_csv  # noqa: E402

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
    "squared_norms",
    "write_csv",
]
