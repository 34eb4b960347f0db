"""IndexStore: every table of one index, in one LanceDB database (a directory or object-store URI).

Writers are idempotent (a shard or a run written twice is stored once), so retried tasks are
safe. Every write makes a new table version; readers pass the versions recorded in the
published manifest, so an index being rebuilt stays invisible to them until it is republished.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import lancedb
import numpy as np
import pyarrow as pa
from lancedb.index import FTS, Bitmap, IvfHnswSq, IvfPq, IvfRq, IvfSq
from lancedb.query import MatchQuery
from pydantic import ValidationError

from dataworth.config import RQ_BITS, VECTOR_INDEX_TYPES
from storage.errors import REBUILD_HINT, IndexStoreError
from storage.gradients import batch_arrays, decode_vectors, gradient_table, show_ids
from storage.manifest import IndexManifest, IndexState
from storage.schemas import (
    LABEL_MASK,
    SCHEMA_VERSION,
    artifacts_schema,
    check_stored_schema,
    conform,
    examples_schema,
    gradient_columns,
    gradients_schema,
    legacy_examples_schema,
    queries_schema,
    scores_schema,
    token_scores_schema,
    vector_layout,
)

EXAMPLES, GRADIENTS, SCORES, QUERIES, ARTIFACTS = "examples", "gradients", "scores", "queries", "artifacts"
TOKEN_SCORES = "token_scores"
TABLES = (EXAMPLES, GRADIENTS, SCORES, QUERIES, ARTIFACTS, TOKEN_SCORES)
MANIFEST_KEY = "manifest.json"
# Every published manifest is also kept under its index version (its gradients table version), so a query can
# pin one: manifest-v<version>.json.
_HISTORY_PREFIX = "manifest-v"
# optimize() removes versions older than its cleanup window (7 days by default); a manifest may pin one.
_KEEP_VERSIONS = timedelta(days=365 * 100)
# A bitmap index on the gradients' shard column, rebuilt every _INDEX_EVERY shards written.
_SHARD_INDEX, _INDEX_EVERY = "shard_idx", 32
# A scan reads ahead of its consumer up to LANCE_DEFAULT_IO_BUFFER_SIZE bytes (2 GiB by default), so
# a scoring pass held more of a larger table in memory; 32 MiB still reads at about 1 GB/s here.
# Read once per process by Lance, at its first scan; a value set by the user wins.
os.environ.setdefault("LANCE_DEFAULT_IO_BUFFER_SIZE", str(32 << 20))
# Lance's standard I/O scheduler reads on a pool of threads, and glibc keeps the freed read buffers in each
# thread's own arena: a scan's resident memory grew with the table (+100 MB scoring 1M rows against 10k).
# The lite scheduler (a documented Lance setting) stays flat and scans as fast here. Set before any scan;
# a value set by the user wins.
_LITE = "LANCE_USE_LITE_SCHEDULER"
_LITE_BY_US = _LITE not in os.environ
os.environ.setdefault(_LITE, "1")
_scheduler_lock = threading.Lock()
_random_reads = 0


@contextlib.contextmanager
def _random_access() -> Iterator[None]:
    """Lance's standard I/O scheduler for the reads inside (a take of scattered rows), where the lite one is 2-4×
    slower: 6,000 rows of 1M × 1024 read by row id took 0.06 s against 0.15-0.19 s here. Lance reads the setting
    at the start of each operation, so it is switched for the duration (a scan that starts meanwhile in another
    thread reads with the standard scheduler too: more memory for a while, the same rows). Left alone when the
    user set it."""
    global _random_reads
    if not _LITE_BY_US:
        yield
        return
    with _scheduler_lock:
        _random_reads += 1
        os.environ[_LITE] = "0"
    try:
        yield
    finally:
        with _scheduler_lock:
            _random_reads -= 1
            if not _random_reads:
                os.environ[_LITE] = "1"


# A B-tree index on the examples' document_id, for the lookups of an incremental run.
_DOCUMENT_INDEX = "document_idx"
# The full-text index of the examples' text, searched by the bm25 and hybrid score modes. Lance's BM25 has k1 = 1.2
# and b = 0.75 built in, with Lucene's idf log(1 + (N - df + 0.5) / (df + 0.5)), and counts a repeated query word
# each time. Its "simple" tokenizer splits at every character that is not a letter or digit; lowercased, and with
# no stemming, stop words, ASCII folding or length cut, its words are those of dataworth.evaluation.baselines.bm25's
# tokenize_words and its scores that oracle's at k1 = 1.2 to float32 rounding, except that an example whose text
# holds no word is not indexed, so N and the mean length count only the others (tests/storage/test_text_search.py).
_TEXT_INDEX = "text_idx"
# Full-text searches run at once by search_text (at most the machine's cores).
_TEXT_SEARCH_THREADS = 4
TEXT_INDEX = FTS(
    base_tokenizer="simple",
    lower_case=True,
    stem=False,
    remove_stop_words=False,
    ascii_folding=False,
    max_token_length=None,
    with_position=False,
)
BM25_K1, BM25_B = 1.2, 0.75
# The vector index on the gradients' vector column (hybrid-ann-* modes).
_VECTOR_INDEX = "vector_idx"
# Runs of consecutive ids an example_id_filter writes as ranges; more are one IN list.
_FILTER_RANGES = 64
# Example ids per `IN (...)` filter of read_gradients_by_id.
_IDS_PER_FILTER = 4096
# Rows per batch Lance decodes: small decoded batches in flight, merged into the caller's batch_size.
_READ_ROWS = 1024
# New gradient shards of a local index are staged (Lance's distributed write): each writes its data files and a
# record of their fragment metadata here, <index>/_staged_gradients/shard-<n>.json, and one commit appends them all.
_STAGED = "_staged_gradients"

# Schema expected of each stored table, given what is stored (gradients carry their own dim/dtype).
_EXPECTED: dict[str, Callable[[pa.Schema], pa.Schema]] = {
    EXAMPLES: lambda stored: examples_schema() if LABEL_MASK in stored.names else legacy_examples_schema(),
    GRADIENTS: lambda stored: gradients_schema(*vector_layout(stored)),
    SCORES: lambda _: scores_schema(),
    QUERIES: lambda _: queries_schema(),
    ARTIFACTS: lambda _: artifacts_schema(),
    TOKEN_SCORES: lambda _: token_scores_schema(),
}


def _sql_str(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def example_id_filter(example_ids: np.ndarray) -> str:
    """A SQL filter on example_id matching exactly these (sorted, unique) ids: the runs of consecutive ids as
    ranges (a document's or a source's examples are mostly consecutive), or one IN list when there are too many
    runs."""
    ids = np.asarray(example_ids, dtype=np.int64)
    if not len(ids):
        raise IndexStoreError("example_id_filter of no ids: a filter must match something")
    cuts = np.flatnonzero(np.diff(ids) != 1) + 1
    starts, ends = ids[np.r_[0, cuts]], ids[np.r_[cuts, len(ids)] - 1]
    if len(starts) > _FILTER_RANGES:
        return f"example_id IN ({', '.join(str(int(i)) for i in ids)})"
    return " OR ".join(
        f"example_id = {int(a)}" if a == b else f"(example_id >= {int(a)} AND example_id <= {int(b)})"
        for a, b in zip(starts, ends)
    )


def _check_key(what: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise IndexStoreError(f"{what} must be a non-empty string, got {value!r}")
    return value


def batch_buffer(rows: int, dim: int) -> np.ndarray:
    """A writable float32 [rows, dim] array in Arrow's memory pool, to copy a batch of iter_gradient_pieces into.

    Arrow's pool (mimalloc or jemalloc) hands a freed batch back for the next one or to the system, where
    glibc would keep it in the arena of the thread that allocated it.
    """
    return np.frombuffer(pa.allocate_buffer(rows * dim * 4), dtype=np.float32).reshape(rows, dim)


class IndexStore:
    """The tables of one attribution index: examples, gradients, artifacts (curvature,
    manifest), and the scores and queries of scoring runs."""

    def __init__(self, uri: str | os.PathLike[str], storage_options: dict[str, str] | None = None):
        uri = os.fspath(uri) if isinstance(uri, os.PathLike) else uri
        self.uri = _check_key("index uri", uri)
        self.storage_options = storage_options
        self._local_path = self._local_dir(self.uri)
        self._conn: Any = None

    def __repr__(self) -> str:
        return f"IndexStore({self.uri!r})"

    # ---- connection and tables -------------------------------------------------------------

    @staticmethod
    def _local_dir(uri: str) -> str | None:
        if uri.startswith("file://"):
            return os.path.expanduser(uri[len("file://") :])
        return None if "://" in uri else os.path.expanduser(uri)

    @property
    def _db(self) -> Any:
        # Connected lazily: lancedb.connect creates a local directory, which a read must not do.
        if self._conn is None:
            self._conn = lancedb.connect(self.uri, storage_options=self.storage_options)
        return self._conn

    def _table_names(self) -> set[str]:
        if self._local_path is not None and not os.path.isdir(self._local_path):
            return set()
        names: set[str] = set()
        token = None
        while True:
            page = self._db.list_tables(page_token=token)
            names.update(page.tables)
            token = page.page_token
            if not token:
                return names

    def _open(self, name: str, version: int | None = None) -> Any | None:
        """The table checked against its schema, at `version` if given; None when absent."""
        if name not in self._table_names():
            return None
        try:
            # Opened afresh on every call so that writes by other workers are seen.
            table = self._db.open_table(name)
            stored = table.schema
        except ValueError as exc:
            if "was not found" in str(exc):
                return None  # a directory with no committed version yet: another worker is creating it
            raise IndexStoreError(f"table {name!r} in {self.uri} cannot be opened ({exc}); {REBUILD_HINT}") from exc
        except Exception as exc:  # lance raises assorted error types for damaged datasets
            raise IndexStoreError(f"table {name!r} in {self.uri} cannot be opened ({exc}); {REBUILD_HINT}") from exc
        check_stored_schema(stored, _EXPECTED[name], name)
        if version is not None:
            self._checkout(table, name, version)
        return table

    @staticmethod
    def _checkout(table: Any, name: str, version: int) -> None:
        if isinstance(version, bool) or not isinstance(version, (int, np.integer)):
            raise IndexStoreError(f"{name} version must be an int, got {version!r}")
        available = [v["version"] for v in table.list_versions()]
        if int(version) not in available:
            raise IndexStoreError(
                f"table {name!r} has no version {version} (available: {min(available)}..{max(available)}); "
                "the index was rebuilt or its old versions cleaned up: re-read the manifest and use its versions"
            )
        table.checkout(int(version))
        # An overwrite may have changed the schema between versions.
        check_stored_schema(table.schema, _EXPECTED[name], name)

    def _require(self, name: str, version: int | None = None) -> Any:
        if name == GRADIENTS and version is None:
            self.commit_staged()  # the latest version includes every shard written
        table = self._open(name, version)
        if table is None:
            raise IndexStoreError(f"no {name!r} table in {self.uri}; build the index first (the index flow)")
        return table

    @contextlib.contextmanager
    def _creation_lock(self, name: str) -> Iterator[None]:
        # Lance lets two concurrent creates both commit; the later one is an overwrite that can
        # erase rows written in between. A file lock serialises creation on a local directory;
        # on object stores, create tables before writers fan out (create_gradient_table).
        if self._local_path is None:
            yield
            return
        with self._file_lock(f".{name}.create.lock"):
            yield

    @contextlib.contextmanager
    def _file_lock(self, filename: str) -> Iterator[None]:
        """An exclusive lock on <index>/<filename>, across the threads and processes of one local index."""
        os.makedirs(self._local_path, exist_ok=True)
        with open(os.path.join(self._local_path, filename), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _open_or_create(self, name: str, schema: pa.Schema) -> Any:
        table = self._open(name)
        if table is not None:
            return table
        with self._creation_lock(name):
            table = self._open(name)
            if table is None:
                try:
                    table = self._db.create_table(name, schema=schema, exist_ok=True)
                except Exception:
                    # Lost a creation race, or the stored schema differs: reopen for the precise error.
                    table = self._open(name)
                    if table is None:
                        raise
        check_stored_schema(table.schema, _EXPECTED[name], name)
        return table

    # ---- examples --------------------------------------------------------------------------

    def write_examples(self, table: pa.Table) -> int:
        """Replace the examples table (one new version, atomically); returns that version. Without a label_mask
        column every example's loss covers all its tokens (label_mask null)."""
        if isinstance(table, pa.Table) and LABEL_MASK not in table.column_names:
            table = table.append_column(LABEL_MASK, pa.nulls(table.num_rows, pa.list_(pa.bool_())))
        data = conform(table, examples_schema(), EXAMPLES)
        if data.num_rows == 0:
            raise IndexStoreError("examples table is empty: the dataset produced no examples; check data.dataset")
        ids = data.column("example_id").to_numpy()
        unique, counts = np.unique(ids, return_counts=True)
        if len(unique) != len(ids):
            raise IndexStoreError(f"examples has duplicate example_id values {unique[counts > 1][:10].tolist()}")
        self._open(EXAMPLES)  # a foreign table of that name is an error, not silently replaced
        written = self._db.create_table(EXAMPLES, data=data, schema=examples_schema(), mode="overwrite")
        # An incremental run looks up a shard's documents in the version it replaces (previous_examples):
        # a B-tree on document_id keeps that lookup from scanning the whole table once per shard.
        written.create_scalar_index("document_id", index_type="BTREE", name=_DOCUMENT_INDEX)
        # Built here, with the rows it indexes, so the version returned (the one a manifest pins) carries its own
        # full-text index: a later version (a re-index) has its own, and a query never writes the index.
        written.create_index("text", config=TEXT_INDEX, name=_TEXT_INDEX)
        return int(written.version)

    def check_text_index(self, version: int | None = None) -> None:
        """Raise unless the examples table (at `version`) has the full-text index search_text reads."""
        self._text_table(version)

    def _text_table(self, version: int | None) -> Any:
        table = self._require(EXAMPLES, version)
        if not any(i.name == _TEXT_INDEX for i in table.list_indices()):
            at = f"version {version} of " if version is not None else ""
            raise IndexStoreError(
                f"{at}the examples table of {self.uri} has no full-text index, which the bm25 and hybrid score modes "
                "search (the index was built before they existed): run `dataworth index` on it again with the same "
                "options (the examples table is rewritten with one; stored gradients are reused)"
            )
        return table

    def search_text(
        self, texts: list[str], limit: int, version: int | None = None, where: str | None = None
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """BM25 of each text against the examples' text (at `version`), from the full-text index: per text, the
        (example_ids int64, scores float64) of at most `limit` examples that share a word with it, higher score
        first, equal scores by the smaller id. An example sharing no word with a text has score 0 and is not listed.
        `where` (a filter on the examples' columns) keeps only the matching examples, applied before the search
        (the scores are those of the whole corpus)."""
        if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1:
            raise IndexStoreError(f"limit must be a positive int, got {limit!r}")
        bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
        if bad:
            raise IndexStoreError(f"search_text takes strings, got {bad[0]}")
        table = self._text_table(version)

        def search(text: str) -> tuple[np.ndarray, np.ndarray]:
            query = table.search(MatchQuery(text, "text"), query_type="fts")
            if where:
                query = query.where(where, prefilter=True)
            hits = query.select(["example_id", "_score"]).limit(int(limit)).to_arrow()
            ids = hits.column("example_id").to_numpy().astype(np.int64)
            scores = hits.column("_score").to_numpy().astype(np.float64)
            order = np.lexsort((ids, -scores))  # score descending, then id ascending
            return ids[order], scores[order]

        # One search per text, several at a time: each runs in Lance's native code, outside the GIL for much of
        # it (200 searches: 0.76 s one at a time, 0.63 s on 2 threads, 0.59 s on 4, on 2 cores).
        workers = min(len(texts), os.cpu_count() or 1, _TEXT_SEARCH_THREADS)
        if workers <= 1:
            return [search(t) for t in texts]
        with ThreadPoolExecutor(workers, thread_name_prefix="text-search") as pool:
            return list(pool.map(search, texts))

    def read_examples(
        self, columns: list[str] | None = None, version: int | None = None, where: str | None = None
    ) -> pa.Table:
        """The examples table, or some columns of it; `where` is a SQL filter such as "example_id IN (1, 2)"."""
        table = self._require(EXAMPLES, version)
        query = table.search()
        if where is not None:
            query = query.where(_check_key("where filter", where))
        legacy = LABEL_MASK not in table.schema.names  # written before the column: a loss on every token
        if columns is not None:
            unknown = [c for c in columns if c not in examples_schema().names]
            if unknown:
                raise IndexStoreError(f"unknown examples columns {unknown}; choose from {examples_schema().names}")
            query = query.select([c for c in columns if not (legacy and c == LABEL_MASK)])
        out = query.to_arrow()
        if legacy and (columns is None or LABEL_MASK in columns):
            nulls = pa.nulls(out.num_rows, pa.list_(pa.bool_()))
            out = out.append_column(examples_schema().field(LABEL_MASK), nulls)
            if columns is not None:
                out = out.select(list(columns))
        return out

    def previous_examples(self, version: int, document_ids: list[str]) -> pa.Table:
        """(example_id, document_id, input_ids, label_mask) of these documents' examples in the examples table at
        `version` (the one the published index serves): what an incremental run compares a shard's examples with."""
        if not document_ids:
            return pa.table({"example_id": pa.array([], pa.int64())})
        where = f"document_id IN ({', '.join(_sql_str(str(d)) for d in sorted(set(document_ids)))})"
        return self.read_examples(["example_id", "document_id", "input_ids", LABEL_MASK], version=version, where=where)

    def examples_version(self) -> int:
        return int(self._require(EXAMPLES).version)

    def num_examples(self, version: int | None = None) -> int:
        return int(self._require(EXAMPLES, version).count_rows())

    # ---- gradients -------------------------------------------------------------------------

    def create_gradient_table(self, dim: int, dtype: str = "float32") -> int:
        """Create the empty gradients table (or check the existing one); returns its version.

        Call it once before shards are written in parallel: two workers that both create the
        table commit two overwrites, and the second can erase a shard the first already wrote.
        """
        return int(self._gradients_for(dim, dtype, "requested").version)

    def _gradients_for(self, dim: int, dtype: str, what: str) -> Any:
        schema = gradients_schema(dim, dtype)
        table = self._open_or_create(GRADIENTS, schema)
        stored_dim, stored_dtype = vector_layout(table.schema)
        if (stored_dim, stored_dtype) != (dim, dtype) and table.count_rows() == 0:
            # Emptied by reset_gradients for a rebuild with another layout: the new schema is one more version,
            # the old versions (which a published manifest may pin) keep theirs.
            with self._creation_lock(GRADIENTS):
                self.discard_staged()
                table = self._db.create_table(GRADIENTS, schema=schema, mode="overwrite")
            stored_dim, stored_dtype = dim, dtype
        if (stored_dim, stored_dtype) != (dim, dtype):
            raise IndexStoreError(
                f"{what} {dtype} vectors of dim {dim}, but the gradients table stores {stored_dtype} "
                f"of dim {stored_dim} (the logging config changed); {REBUILD_HINT}"
            )
        return table

    def write_gradient_shard(
        self,
        shard: int,
        example_ids: np.ndarray,
        vectors: np.ndarray,
        dtype: str = "float32",
        new: bool = False,
        sq_norms: np.ndarray | None = None,
    ) -> int:
        """Store one shard's gradients so that it holds exactly these rows; returns the table version.

        A new shard of a local index is staged (Lance's distributed write): its data files and a record of their
        fragments (<index>/_staged_gradients/shard-<n>.json, written atomically), no commit, so its cost does not
        grow with the table, whose manifest every commit rewrites; the next read of the latest version (or
        commit_staged) appends every staged shard in one commit. A shard staged again replaces its record: stored
        once. On an object store a new shard is one append: its own fragments, one commit (a merge on example_id
        would join every stored row). The table version returned is then the latest committed one. Finding a
        shard's old rows reads a bitmap index on shard, rebuilt every _INDEX_EVERY shards. A shard already stored
        (a retried task, a changed corpus; its staged copy dropped) is deleted first, then appended: between the
        two commits the shard is absent, never doubled or half-written, and a retry converges (shards_present
        shows it missing; publish checks one row per example). Creates the table on first use; with parallel
        writers, call create_gradient_table first. sq_norms, when given, are stored instead of the vectors' own
        (rows copied from an earlier version keep the norms of their unrounded values).

        new=True says the caller knows the shard has no rows (the index flow read the stored shards
        before logging it, and this is the first attempt): the append is then the whole write, with
        no lookup and no index upkeep, whose costs grow with the table. A wrong new=True stores the
        shard twice; check_gradient_ids (at publish) reports it, and a rewrite with new=False repairs it.
        """
        data = gradient_table(shard, example_ids, vectors, dtype, sq_norms)
        table = self._gradients_for(data.schema.field("vector").type.list_size, dtype, f"shard {shard} has")
        if new and self._staged_dir() is not None:
            self._stage_shard(table, int(shard), data)
            return int(table.version)
        if new:
            table.add(data)
            return int(table.version)
        self.discard_staged(int(shard))  # a staged copy would be appended beside the rows written now
        where = f"shard = {int(shard)}"
        if table.count_rows(where):
            table.delete(where)
        table.add(data)
        self._refresh_shard_index(table, data.num_rows)
        return int(table.version)

    @staticmethod
    def _refresh_shard_index(table: Any, shard_rows: int) -> None:
        # The lookup of a shard's old rows reads the index plus every fragment appended since it was
        # built; rebuilding it every _INDEX_EVERY shards keeps that lookup from growing with the table.
        stats = table.index_stats(_SHARD_INDEX)
        unindexed = table.count_rows() if stats is None else stats.num_unindexed_rows
        if unindexed < _INDEX_EVERY * shard_rows:
            return
        with contextlib.suppress(Exception):
            # Only a speed-up: a conflict with a concurrent writer's rebuild keeps the old index, still exact.
            table.create_index("shard", config=Bitmap(), replace=True, name=_SHARD_INDEX)

    # ---- staged shards (Lance's distributed write) ------------------------------------------------

    def _staged_dir(self) -> str | None:
        return None if self._local_path is None else os.path.join(self._local_path, _STAGED)

    def _staged_lock(self) -> contextlib.AbstractContextManager[None]:
        # Serialises the commit of staged shards (two commits of the same records would append them twice) and
        # the removal of records, across the processes writing one local index.
        return self._file_lock(f".{GRADIENTS}.staged.lock")

    def _staged_records(self) -> dict[int, tuple[str, str]]:
        """{shard: (record path, record text)} of the staged shards."""
        folder = self._staged_dir()
        if folder is None or not os.path.isdir(folder):
            return {}
        records = {}
        for name in os.listdir(folder):
            if name.startswith("shard-") and name.endswith(".json"):
                path = os.path.join(folder, name)
                with contextlib.suppress(FileNotFoundError):  # committed by another process meanwhile
                    with open(path, encoding="utf-8") as f:
                        records[int(name[len("shard-") : -len(".json")])] = (path, f.read())
        return records

    def _stage_shard(self, table: Any, shard: int, data: pa.Table) -> None:
        from lance.fragment import write_fragments

        fragments = write_fragments(
            data, os.path.join(self._local_path, f"{GRADIENTS}.lance"), schema=table.schema, max_rows_per_file=1 << 20
        )
        record = json.dumps({"shard": shard, "rows": data.num_rows, "fragments": [f.to_json() for f in fragments]})
        folder = self._staged_dir()
        os.makedirs(folder, exist_ok=True)
        # Written whole, then renamed over the shard's record: a reader sees the old record or the new one, and a
        # writer killed before the rename leaves only data files no manifest references (the shard is absent).
        tmp = os.path.join(folder, f".shard-{shard}.{os.getpid()}.{threading.get_ident()}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(record)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(folder, f"shard-{shard}.json"))

    def commit_staged(self) -> int | None:
        """Append every staged shard to the gradients table in one commit and remove their records; returns the
        table version after it (None when nothing was staged). Idempotent: fragments whose data files the table
        already references (a commit whose records a killed process did not remove) are not appended again."""
        folder = self._staged_dir()
        if folder is None or not os.path.isdir(folder) or not any(n.endswith(".json") for n in os.listdir(folder)):
            return None
        import lance
        from lance.fragment import FragmentMetadata

        with self._staged_lock():
            records = self._staged_records()
            if not records:
                return None
            table = self._open(GRADIENTS)
            if table is None:
                raise IndexStoreError(
                    f"shards {sorted(records)[:10]} are staged in {folder} but there is no gradients table; "
                    f"{REBUILD_HINT}"
                )
            dataset = table.to_lance()
            stored = {d.path for frag in dataset.get_fragments() for d in frag.metadata.data_files()}
            fragments = []
            for shard, (path, text) in sorted(records.items()):
                try:
                    listed = json.loads(text)["fragments"]
                    metas = [FragmentMetadata.from_json(json.dumps(f)) for f in listed]
                except (ValueError, KeyError, TypeError) as exc:
                    raise IndexStoreError(
                        f"staged shard record {path} is unreadable ({exc}); delete it and log shard {shard} again"
                    ) from exc
                fragments += [m for m in metas if not any(d.path in stored for d in m.data_files())]
            if fragments:
                lance.LanceDataset.commit(
                    dataset.uri, lance.LanceOperation.Append(fragments), read_version=dataset.version
                )
            for path, text in records.values():
                self._remove_record(path, text)
        return int(self._open(GRADIENTS).version)

    @staticmethod
    def _remove_record(path: str, text: str) -> None:
        # Only the record that was read: a shard staged again meanwhile keeps its new one.
        with contextlib.suppress(FileNotFoundError):
            with open(path, encoding="utf-8") as f:
                if f.read() != text:
                    return
            os.remove(path)

    def discard_staged(self, shard: int | None = None) -> None:
        """Forget the staged copy of `shard` (of every shard when None): a rewrite, an emptied or dropped table.
        Its data files stay until cleanup_versions (no manifest references them)."""
        folder = self._staged_dir()
        if folder is None or not os.path.isdir(folder):
            return
        with self._staged_lock():
            for staged, (path, text) in self._staged_records().items():
                if shard is None or staged == shard:
                    self._remove_record(path, text)

    def compact_gradients(self, min_fragments: int = 1, keep_old_versions: bool = True) -> int | None:
        """Merge the gradients table's fragments (one or more per shard) once there are min_fragments or more.

        Rows are unchanged; compacting commits a new table version, which the manifest must record.
        Returns the latest version (None when there is no gradients table); nothing to merge commits
        nothing. Older versions are kept, so readers pinned to them keep working, unless
        keep_old_versions is False: then their files are removed, which is safe only when no
        published manifest pins one (a first build) and no other process writes the table.
        """
        self.commit_staged()
        table = self._open(GRADIENTS)
        if table is None:
            return None
        if self.gradient_fragments() >= min_fragments:
            if keep_old_versions:
                table.optimize(cleanup_older_than=_KEEP_VERSIONS)
            else:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=r"optimize\(cleanup_older_than=0\)")
                    table.optimize(cleanup_older_than=timedelta(0))
        return int(self._require(GRADIENTS).version)

    def gradient_fragments(self) -> int:
        """Fragments (groups of data files) of the gradients table: one or more per shard until compacted."""
        return int(self._require(GRADIENTS).stats()["fragment_stats"]["num_fragments"])

    def check_gradient_ids(self, num_examples: int, version: int | None = None) -> None:
        """Raise unless the gradients hold exactly one row for each example id 0..num_examples-1.

        Streams the example_id column only (num_examples counters in memory).
        """
        counts = np.zeros(num_examples, dtype=np.int32)
        table = self._require(GRADIENTS, version)
        outside: list[int] = []
        for batch in table.search().select(["example_id"]).to_batches(batch_size=65536):
            ids = batch.column("example_id").to_numpy(zero_copy_only=False)
            inside = (ids >= 0) & (ids < num_examples)
            outside.extend(ids[~inside][:10].tolist())
            np.add.at(counts, ids[inside], 1)
        problems = [
            f"{what} {show_ids(ids)}"
            for what, ids in (
                ("missing example_ids", np.flatnonzero(counts == 0)),
                ("example_ids stored more than once", np.flatnonzero(counts > 1)),
                (f"example_ids outside 0..{num_examples - 1}", np.asarray(outside)),
            )
            if len(ids)
        ]
        if problems:
            raise IndexStoreError(f"the gradients table does not hold one row per example: {'; '.join(problems)}")

    def iter_gradients(
        self, batch_size: int, version: int | None = None, shards: list[int] | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Stream (example_ids int64, vectors float32 [n, dim], sq_norm float32), n <= batch_size.

        Rows come in scan order; use the ids. Only one batch is held in memory at a time.
        Arguments and the table are checked now, not at the first next().
        """
        pieces, dim = self._scan_gradients(batch_size, version, shards)
        return (batch_arrays(pa.concat_batches(p) if len(p) > 1 else p[0], dim) for p in pieces)

    def iter_gradient_pieces(
        self, batch_size: int, version: int | None = None, shards: list[int] | None = None, where: str | None = None
    ) -> Iterator[list[tuple[np.ndarray, np.ndarray, np.ndarray]]]:
        """The batches of iter_gradients, each as the scanned pieces it is made of, in order: read-only views
        of the scanner's buffers, for a caller that copies them into its own batch (see batch_buffer), which
        saves iter_gradients' merge copy. `where` (an example_id filter, see example_id_filter) is pushed into
        the scan: Lance reads the vectors of the matching rows only."""
        pieces, dim = self._scan_gradients(batch_size, version, shards, where)
        return ([batch_arrays(piece, dim) for piece in p] for p in pieces)

    def read_gradient_rows(
        self, example_ids: np.ndarray, version: int, shards: list[int]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(example_ids, vectors float32, sq_norm) of these example ids at table `version`, in the order asked;
        `shards` are the shards that hold them (a bitmap-indexed filter: the cost is that of those shards, not
        of the table). Raises if an id is not there."""
        want = np.asarray(example_ids, dtype=np.int64)
        unique, back = np.unique(want, return_inverse=True)  # an id may be asked for twice (repeated chunks)
        dim = vector_layout(self._require(GRADIENTS, version).schema)[0]
        vectors = np.zeros((len(unique), dim), dtype=np.float32)
        sq = np.zeros(len(unique), dtype=np.float32)
        found = np.zeros(len(unique), dtype=bool)
        if len(unique):
            for ids, vecs, norms in self.iter_gradients(_READ_ROWS, version, sorted(set(shards))):
                hit = np.flatnonzero(np.isin(ids, unique))
                rows = np.searchsorted(unique, ids[hit])
                vectors[rows], sq[rows], found[rows] = vecs[hit], norms[hit], True
        if not found.all():
            raise IndexStoreError(
                f"gradients version {version} has no rows for example_ids {show_ids(unique[~found])} in shards "
                f"{sorted(set(shards))[:10]}; {REBUILD_HINT}"
            )
        return want, vectors[back], sq[back]

    def read_gradients_by_id(self, example_ids: np.ndarray, version: int) -> tuple[np.ndarray, np.ndarray]:
        """(vectors float32 [n, dim], sq_norm [n]) of these example ids at table `version`, in the order asked.

        A filter on example_id: Lance reads the id column and then only the matching rows' vectors, so a few
        hundred rows cost a read of the ids, not a scan of the vectors. Raises if an id is not there."""
        want = np.asarray(example_ids, dtype=np.int64)
        unique, back = np.unique(want, return_inverse=True)
        table = self._require(GRADIENTS, version)
        dim, dtype = vector_layout(table.schema)
        vectors = np.zeros((len(unique), dim), dtype=np.float32)
        sq = np.zeros(len(unique), dtype=np.float32)
        found = np.zeros(len(unique), dtype=bool)
        for lo in range(0, len(unique), _IDS_PER_FILTER):
            part = unique[lo : lo + _IDS_PER_FILTER]
            where = f"example_id IN ({', '.join(str(int(i)) for i in part)})"
            with _random_access():
                rows = table.search().where(where).select(gradient_columns(dtype)).to_arrow()
            for batch in rows.to_batches():
                ids, vecs, norms = batch_arrays(batch, dim)
                at = np.searchsorted(unique, ids)
                vectors[at], sq[at], found[at] = vecs, norms, True
        if not found.all():
            raise IndexStoreError(
                f"gradients version {version} has no rows for example_ids {show_ids(unique[~found])}; {REBUILD_HINT}"
            )
        return vectors[back], sq[back]

    def _scan_gradients(
        self, batch_size: int, version: int | None, shards: list[int] | None, where: str | None = None
    ) -> tuple[Iterator[list[pa.RecordBatch]], int]:
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise IndexStoreError(f"batch_size must be a positive int, got {batch_size!r}")
        table = self._require(GRADIENTS, version)
        dim, dtype = vector_layout(table.schema)
        query = table.search().select(gradient_columns(dtype))
        if shards is not None:
            bad = [s for s in shards if isinstance(s, bool) or not isinstance(s, (int, np.integer))]
            if bad or not shards:
                raise IndexStoreError(f"shards must be a non-empty list of ints, got {shards!r}")
            where = f"shard IN ({', '.join(str(int(s)) for s in shards)})" + (f" AND ({where})" if where else "")
        if where:
            query = query.where(where)
        reader = query.to_batches(batch_size=min(int(batch_size), _READ_ROWS))
        return self._batch_pieces(reader, int(batch_size)), dim

    @staticmethod
    def _batch_pieces(reader: pa.RecordBatchReader, batch_size: int) -> Iterator[list[pa.RecordBatch]]:
        # Scanned batches (batch_size is only a hint to the scanner) cut, in scan order, into groups of
        # exactly batch_size rows but the last: slices, nothing copied.
        group: list[pa.RecordBatch] = []
        rows = 0
        for batch in reader:
            start = 0
            while start < batch.num_rows:
                take = min(batch_size - rows, batch.num_rows - start)
                group.append(batch.slice(start, take))
                rows, start = rows + take, start + take
                if rows == batch_size:
                    yield group
                    group, rows = [], 0
        if group:
            yield group

    def gradients_version(self) -> int:
        return int(self._require(GRADIENTS).version)

    def num_gradients(self, version: int | None = None) -> int:
        return int(self._require(GRADIENTS, version).count_rows())

    def gradient_dim(self) -> int:
        return vector_layout(self._require(GRADIENTS).schema)[0]

    def read_sq_norms(self, version: int | None = None) -> tuple[np.ndarray, np.ndarray, str]:
        """(example_ids int64, sq_norm float32, storage dtype) of every row of the gradients table at `version`: a
        scan of two scalar columns, no vector is read. sq_norm is ‖g‖² of the gradient as logged (float32), which
        is the stored vector's own only when the storage dtype is float32."""
        table = self._require(GRADIENTS, version)
        dtype = vector_layout(table.schema)[1]
        rows = table.search().select(["example_id", "sq_norm"]).to_arrow()
        ids = rows.column("example_id").to_numpy().astype(np.int64, copy=False)
        return ids, rows.column("sq_norm").to_numpy().astype(np.float32, copy=False), dtype

    def gradient_dtype(self) -> str:
        return vector_layout(self._require(GRADIENTS).schema)[1]

    # ---- metadata filters and the vector index (hybrid-ann-* modes) --------------------------------

    def example_ids_where(
        self, version: int, sources: list[str] | None = None, documents: list[str] | None = None
    ) -> np.ndarray:
        """Sorted example ids of the examples table (at `version`) whose source is one of `sources` and whose
        document_id is one of `documents` (a None list: any); a filter on the examples table (document_id has a
        B-tree), reading the id column of the matches only."""
        clauses = [
            f"{column} IN ({', '.join(_sql_str(str(v)) for v in values)})"
            for column, values in (("source", sources), ("document_id", documents))
            if values is not None
        ]
        if not clauses:
            raise IndexStoreError("example_ids_where needs sources or documents")
        found = self.read_examples(["example_id"], version=version, where=" AND ".join(clauses))
        return np.sort(found.column("example_id").to_numpy().astype(np.int64))

    def build_vector_index(
        self,
        index_type: str = VECTOR_INDEX_TYPES[0],
        partitions: int | None = None,
        sub_vectors: int | None = None,
        rq_bits: int = RQ_BITS,
    ) -> dict[str, Any]:
        """LanceDB's vector index on the gradients' `vector` column, metric dot (replacing any earlier one): one
        new table version, rows unchanged. Returns what was built, the version included. partitions: None, about
        √rows; sub_vectors (IVF_PQ): None, dim / 16 when 16 divides dim, else its largest divisor up to dim / 8;
        rq_bits: bits per value of IVF_RQ's RaBitQ codes."""
        table = self._require(GRADIENTS)
        dim, dtype = vector_layout(table.schema)
        if dtype not in ("float32", "float16"):
            raise IndexStoreError(
                f"the gradients of {self.uri} are stored as {dtype}, which LanceDB's vector index cannot read: rebuild "
                "the index with --logging.storage-dtype float16 (or float32) to build a vector index on it"
            )
        rows = table.count_rows()
        partitions = partitions or max(1, min(round(rows**0.5), rows // 256))
        bits = None
        if index_type == "IVF_PQ":
            if sub_vectors is None:
                divisors = [d for d in range(1, max(1, dim // 8) + 1) if dim % d == 0]
                sub_vectors = dim // 16 if dim % 16 == 0 else max(divisors)
            if dim % sub_vectors:
                raise IndexStoreError(
                    f"sub_vectors={sub_vectors} does not divide the gradient dim {dim}; give a divisor"
                )
            config = IvfPq(distance_type="dot", num_partitions=partitions, num_sub_vectors=sub_vectors)
        elif index_type == "IVF_RQ":
            config, sub_vectors, bits = (
                IvfRq(distance_type="dot", num_partitions=partitions, num_bits=rq_bits),
                None,
                rq_bits,
            )
        elif index_type == "IVF_SQ":
            config, sub_vectors = IvfSq(distance_type="dot", num_partitions=partitions), None
        elif index_type == "IVF_HNSW_SQ":
            config, sub_vectors = IvfHnswSq(distance_type="dot", num_partitions=partitions), None
        else:
            raise IndexStoreError(
                f"unknown vector index type {index_type!r}; choose IVF_RQ, IVF_SQ, IVF_PQ or IVF_HNSW_SQ"
            )
        start = time.perf_counter()
        table.create_index("vector", config=config, replace=True, name=_VECTOR_INDEX)
        return {
            "index_type": index_type,
            "metric": "dot",
            "partitions": partitions,
            "sub_vectors": sub_vectors,
            "bits": bits,
            "rows": rows,
            "build_seconds": time.perf_counter() - start,
            "version": int(table.version),
        }

    def check_vector_index(self, version: int) -> None:
        """Raise unless the gradients table at `version` has the vector index search_vectors reads."""
        self._vector_indexed(version)

    def _vector_indexed(self, version: int) -> Any:
        """The gradients table at `version`, opened once, after checking it has the vector index."""
        table = self._require(GRADIENTS, version)
        if not any(i.name == _VECTOR_INDEX for i in table.list_indices()):
            raise IndexStoreError(
                f"version {version} of the gradients table of {self.uri} has no vector index, which the hybrid-ann-* "
                "score modes search: run `dataworth index` on it again with the same options and --ann.build "
                "(stored gradients are reused)"
            )
        return table

    def search_vectors(
        self,
        queries: np.ndarray,
        limit: int,
        version: int,
        nprobes: int,
        refine_factor: int | None = None,
        where: str | None = None,
        exact: bool = False,
    ) -> list[np.ndarray]:
        """The example ids (int64) of the `limit` stored gradients nearest each query [Q, dim] by dot product, as
        the vector index finds them (approximate), nearest first; `where` (an example_id filter) is applied before
        the search, so every query gets `limit` matching rows when there are that many. One search for all the
        queries, ids only: at 1M rows × 1024 dims, 64 queries, fetching the hits' vectors with the search took
        2.6 s where the ids took 1.2 s and one read of those rows by id (read_gradients_by_id) 0.35 s. `exact`:
        a flat scan instead of the index (exact dot products, every matching row read)."""
        return self.search_vector_rows(queries, limit, version, nprobes, refine_factor, where, exact)[0]

    def search_vector_rows(
        self,
        queries: np.ndarray,
        limit: int,
        version: int,
        nprobes: int,
        refine_factor: int | None = None,
        where: str | None = None,
        exact: bool = False,
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """search_vectors' example ids and, beside them, the hits' Lance row ids (uint64) in the same order, which
        read_gradients_by_row_id reads at the same table `version` (row ids are per version)."""
        table = self._vector_indexed(version)
        dim = vector_layout(table.schema)[0]
        queries = np.asarray(queries, dtype=np.float32).reshape(-1, dim)
        search = table.search(list(queries), vector_column_name="vector").distance_type("dot").nprobes(int(nprobes))
        if refine_factor:
            search = search.refine_factor(int(refine_factor))
        if exact:  # a flat scan of the stored vectors (of the rows `where` keeps), the index left aside
            search = search.bypass_vector_index()
        if where:
            search = search.where(where, prefilter=True)
        hits = search.limit(int(limit)).select(["example_id", "_distance"]).with_row_id(True).to_arrow()
        ids = hits.column("example_id").to_numpy().astype(np.int64)
        rows = hits.column("_rowid").to_numpy().astype(np.uint64)
        which = hits.column("query_index").to_numpy() if "query_index" in hits.column_names else np.zeros(len(ids))
        order = np.lexsort((hits.column("_distance").to_numpy(), which))  # by query, then nearest first
        cuts = np.searchsorted(which[order], np.arange(len(queries) + 1))
        spans = list(zip(cuts, cuts[1:]))
        return [ids[order[a:b]] for a, b in spans], [rows[order[a:b]] for a, b in spans]

    def read_gradients_by_row_id(self, row_ids: np.ndarray, version: int) -> np.ndarray:
        """The float32 vectors [n, dim] of these Lance row ids (from search_vector_rows at the same `version`), in
        the order asked. A take of the vector column only, by row id, with Lance's standard I/O scheduler: the
        rerank read of hybrid-ann-* modes (6,000 rows of 1M × 1024: 0.06 s against 0.12 s by example-id filter,
        which also reads the id column). Raises if a row id is not in that version."""
        want = np.asarray(row_ids, dtype=np.uint64)
        unique, back = np.unique(want, return_inverse=True)
        table = self._require(GRADIENTS, version)
        dim, dtype = vector_layout(table.schema)
        columns = ["vector", *(["scale"] if dtype == "int8" else [])]
        with _random_access():
            got = table.take_row_ids([int(r) for r in unique]).select(columns).with_row_id().to_arrow()
        found = got.column("_rowid").to_numpy().astype(np.uint64)
        at = np.searchsorted(unique, found)
        if len(found) != len(unique) or not np.array_equal(unique[np.minimum(at, len(unique) - 1)], found):
            missing = np.setdiff1d(unique, found)
            raise IndexStoreError(
                f"gradients version {version} has no rows for row ids {show_ids(missing)} (row ids change with the "
                f"table version: search and read the same one); {REBUILD_HINT}"
            )
        vectors = np.zeros((len(unique), dim), dtype=np.float32)
        flat = got.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        scale = got.column("scale").to_numpy() if dtype == "int8" else None
        vectors[at] = decode_vectors(flat.reshape(-1, dim), dtype, scale)
        return vectors[back]

    def read_candidate_rows(
        self, ids: list[np.ndarray], row_ids: list[np.ndarray], version: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """(sorted unique example ids, their float32 vectors) of the candidates search_vector_rows gave several
        queries (each query's example ids and row ids, as it returned them): each row read once, by row id."""
        unique, first = np.unique(np.concatenate(ids), return_index=True)
        return unique, self.read_gradients_by_row_id(np.concatenate(row_ids)[first], version)

    def prewarm_vector_index(self, version: int) -> float:
        """Load the vector index of `version` into Lance's index cache (every partition: about the size of its
        codes, 0.33 GB for IVF_RQ 4 bits at 1M × 1024), so that a search's partitions are in memory, not read and
        decoded at the search (0.3 s of the first 64-query search at 1M rows here); returns the seconds taken."""
        table = self._vector_indexed(version)
        start = time.perf_counter()
        table.prewarm_index(_VECTOR_INDEX)
        return time.perf_counter() - start

    def delete_shards_from(self, first_shard: int) -> int | None:
        """Delete gradient shards numbered first_shard and above (left by a corpus that shrank).

        Returns the table version after the delete; None when there is no gradients table.
        """
        if isinstance(first_shard, bool) or not isinstance(first_shard, (int, np.integer)) or first_shard < 0:
            raise IndexStoreError(f"first_shard must be a non-negative int, got {first_shard!r}")
        self.commit_staged()
        table = self._open(GRADIENTS)
        if table is None:
            return None
        # A delete that matches nothing still commits a version, which would bust every cache keyed on it.
        if table.count_rows(f"shard >= {int(first_shard)}"):
            table.delete(f"shard >= {int(first_shard)}")
        return int(table.version)

    def shards_present(self) -> set[int]:
        """Shards with rows stored: committed, or staged (written, to be committed by the next read)."""
        table = self._open(GRADIENTS)
        if table is None:
            return set()
        present: set[int] = set(self._staged_records())
        for batch in table.search().select(["shard"]).to_batches(batch_size=65536):
            present.update(np.unique(batch.column("shard").to_numpy()).tolist())
        return present

    # ---- artifacts and manifest ------------------------------------------------------------

    def _put(self, key: str, data: bytes) -> None:
        table = self._open_or_create(ARTIFACTS, artifacts_schema())
        row = pa.Table.from_arrays([pa.array([key]), pa.array([data], pa.large_binary())], schema=artifacts_schema())
        table.merge_insert("key").when_matched_update_all().when_not_matched_insert_all().execute(row)

    def _get(self, key: str) -> bytes | None:
        table = self._open(ARTIFACTS)
        if table is None:
            return None
        rows = table.search().where(f"key = {_sql_str(key)}").select(["value"]).to_arrow()
        return rows.column("value")[0].as_py() if rows.num_rows else None

    def write_artifact(self, key: str, data: bytes) -> None:
        """Store a blob under `key`, replacing any previous one (e.g. the fitted curvature)."""
        _check_key("artifact key", key)
        if key == MANIFEST_KEY or key.startswith(_HISTORY_PREFIX):
            raise IndexStoreError(f"artifact key {key!r} is reserved; publish the manifest with publish_manifest()")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise IndexStoreError(f"artifact {key!r} must be bytes, got {type(data).__name__}")
        self._put(key, bytes(data))

    def read_artifact(self, key: str) -> bytes | None:
        return self._get(_check_key("artifact key", key))

    def publish_manifest(self, manifest: IndexManifest) -> None:
        """Write the manifest, which makes the index visible; call it after every other write.

        The first publication stamps published_at; republishing (e.g. with a calibration) keeps it.
        """
        if not isinstance(manifest, IndexManifest):
            raise IndexStoreError(f"manifest must be an IndexManifest, got {type(manifest).__name__}")
        if manifest.published_at is None:
            manifest = manifest.model_copy(update={"published_at": time.time()})
        blob = manifest.model_dump_json().encode()
        self._put(f"{_HISTORY_PREFIX}{manifest.gradients_version}.json", blob)
        self._put(MANIFEST_KEY, blob)

    def published_versions(self) -> list[int]:
        """The index versions (gradients table versions) ever published here, oldest first; a version whose
        tables the retention window removed is still listed, and read_manifest(version) says it is gone."""
        table = self._open(ARTIFACTS)
        if table is None:
            return []
        keys = table.search().where(f"key LIKE '{_HISTORY_PREFIX}%'").select(["key"]).to_arrow()
        return sorted(int(k[len(_HISTORY_PREFIX) : -len(".json")]) for k in keys.column("key").to_pylist())

    def read_manifest(self, version: int | None = None) -> IndexManifest | None:
        """The published manifest; with `version`, the one published as that index version (an error if there is
        none, or if the retention window removed its table versions)."""
        if version is None:
            return self._parse_manifest(self._get(MANIFEST_KEY))
        manifest = self._parse_manifest(self._get(f"{_HISTORY_PREFIX}{int(version)}.json"))
        if manifest is None:
            raise IndexStoreError(
                f"index {self.uri} has no published version {version}; its versions are "
                f"{self.published_versions() or 'none'} (the index_version of a score row, or of `dataworth index`)"
            )
        try:
            self._require(EXAMPLES, manifest.examples_version)
            self._require(GRADIENTS, manifest.gradients_version)
        except IndexStoreError as exc:
            raise IndexStoreError(
                f"index version {version} of {self.uri} can no longer be read: its table versions were removed by the "
                f"retention window (keep_versions_days) — query a newer version ({exc})"
            ) from None
        return manifest

    def _parse_manifest(self, blob: bytes | None) -> IndexManifest | None:
        if blob is None:
            return None
        try:
            manifest = json.loads(blob)
        except ValueError as exc:
            raise IndexStoreError(f"the manifest in {self.uri} is not valid JSON ({exc}); {REBUILD_HINT}") from None
        if not isinstance(manifest, dict):
            raise IndexStoreError(f"the manifest in {self.uri} is not a JSON object; {REBUILD_HINT}")
        version = manifest.get("schema_version")
        if version != SCHEMA_VERSION:
            raise IndexStoreError(
                f"the index at {self.uri} has schema version {version!r}, this dataworth reads version "
                f"{SCHEMA_VERSION}; {REBUILD_HINT}"
            )
        try:
            return IndexManifest.model_validate(manifest)
        except ValidationError as exc:
            raise IndexStoreError(f"the manifest in {self.uri} does not read as an index manifest: {exc}") from None

    def exists(self) -> bool:
        """True when a manifest has been published (the index is complete and visible)."""
        return self._get(MANIFEST_KEY) is not None

    # ---- scoring runs ----------------------------------------------------------------------

    def _replace_run(self, name: str, schema: pa.Schema, run_id: str, table: pa.Table) -> int:
        _check_key("run_id", run_id)
        data = conform(table, schema, name)
        others = sorted(set(data.column("run_id").to_pylist()) - {run_id})
        if others:
            raise IndexStoreError(f"{name} rows for run_id {run_id!r} also carry run_id values {others[:5]}")
        stored = self._open_or_create(name, schema)
        # Delete then add: two commits, but readers filter by a finished run_id.
        stored.delete(f"run_id = {_sql_str(run_id)}")
        if data.num_rows:
            stored.add(data)
        return int(stored.version)

    def write_scores(self, run_id: str, table: pa.Table) -> int:
        """Store the scores of one run, replacing any earlier rows of that run_id."""
        return self._replace_run(SCORES, scores_schema(), run_id, table)

    def write_queries(self, run_id: str, table: pa.Table) -> int:
        """Store the queries of one run, replacing any earlier rows of that run_id."""
        return self._replace_run(QUERIES, queries_schema(), run_id, table)

    def _read_run(self, name: str, schema: pa.Schema, run_id: str | None) -> pa.Table:
        table = self._open(name)
        if table is None:
            return schema.empty_table()
        query = table.search()
        if run_id is not None:
            query = query.where(f"run_id = {_sql_str(_check_key('run_id', run_id))}")
        return query.to_arrow()

    def read_scores(self, run_id: str | None = None) -> pa.Table:
        return self._read_run(SCORES, scores_schema(), run_id)

    def read_queries(self, run_id: str | None = None) -> pa.Table:
        return self._read_run(QUERIES, queries_schema(), run_id)

    def write_token_scores(self, run_id: str, table: pa.Table) -> int:
        """Store the token-wise scores of one run, replacing any earlier rows of that run_id."""
        return self._replace_run(TOKEN_SCORES, token_scores_schema(), run_id, table)

    def read_token_scores(self, run_id: str | None = None) -> pa.Table:
        return self._read_run(TOKEN_SCORES, token_scores_schema(), run_id)

    # ---- housekeeping ----------------------------------------------------------------------

    def state(self) -> IndexState:
        """What the index holds now (None for absent tables)."""
        self.commit_staged()
        examples = self._open(EXAMPLES)
        gradients = self._open(GRADIENTS)
        return IndexState(
            manifest=self.read_manifest(),
            has_examples=examples is not None,
            examples_version=None if examples is None else int(examples.version),
            num_examples=None if examples is None else int(examples.count_rows()),
            gradients_version=None if gradients is None else int(gradients.version),
            num_gradients=None if gradients is None else int(gradients.count_rows()),
            shards=sorted(self.shards_present()),
        )

    def drop(self) -> None:
        """Remove every table of the index (overwrite of an unpublished or damaged index); table versions start
        again at 1. A table Lance cannot drop (damaged) is removed as a directory when the index is local."""
        self.discard_staged()
        for name in sorted(self._table_names() & set(TABLES)):
            try:
                self._db.drop_table(name, ignore_missing=True)
            except Exception:
                if self._local_path is None:
                    raise
            if self._local_path is not None:
                shutil.rmtree(os.path.join(self._local_path, f"{name}.lance"), ignore_errors=True)

    def cleanup_versions(self, older_than: timedelta) -> int:
        """Remove the files of table versions older than `older_than` that the latest versions do not use (the
        published manifest pins the latest ones; a query started before a rebuild published reads an older one,
        so keep at least as long as a query runs). Returns the bytes removed."""
        removed = 0
        for name in sorted(self._table_names() & set(TABLES)):
            stats = self._db.open_table(name).cleanup_old_versions(older_than=older_than)
            removed += int(getattr(stats, "bytes_removed", 0) or 0)
        return removed

    def reset_gradients(self) -> int | None:
        """Empty the gradients table as one new version, for a rebuild beside the published index: the versions a
        published manifest pins stay readable until the new manifest replaces it. Returns the new version (None
        when there is no gradients table)."""
        table = self._open(GRADIENTS)
        if table is None:
            self.discard_staged()
            return None
        with self._creation_lock(GRADIENTS):
            self.discard_staged()
            table = self._db.create_table(GRADIENTS, schema=table.schema, mode="overwrite")
        return int(table.version)

    def bytes_stored(self) -> int:
        """Bytes the index's tables occupy: file sizes for a local directory, Lance's stats otherwise.

        Other files in the directory (the run's saved config, reports) are not counted.
        """
        names = self._table_names() & set(TABLES)
        if self._local_path is not None:
            total = 0
            for name in names:
                for root, _, files in os.walk(os.path.join(self._local_path, f"{name}.lance")):
                    total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
            return total
        return sum(int(self._db.open_table(name).stats().get("total_bytes", 0)) for name in names)

    @property
    def local_path(self) -> str | None:
        """The index's directory when it is on the local file system, else None."""
        return self._local_path
