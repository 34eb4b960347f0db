"""Cheap fingerprints of a model and a dataset, so caches notice a changed checkpoint or corpus.

A local model is fingerprinted by its content: each file's path relative to the model directory, its size,
and a hash of its first and last MiB (a retrained or replaced checkpoint differs there; hashing gigabytes of
weights in full every night would cost more than it saves). It does not depend on where the directory lies or
on modification times, so a copied model keeps its fingerprint and an index built with it stays usable.
Datasets are fingerprinted by path, size and modification time; hub references by name and revision.
"""

from __future__ import annotations

import glob
import hashlib
import os

from dataworth.config import DataConfig, LoggingConfig, ModelConfig
from dataworth.errors import IndexMismatchError


def _files_fingerprint(paths: list[str]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        st = os.stat(p)
        h.update(f"{os.path.abspath(p)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _local_files(path: str) -> list[str]:
    if os.path.isdir(path):
        return [f for f in glob.glob(os.path.join(path, "**", "*"), recursive=True) if os.path.isfile(f)]
    if any(c in path for c in "*?["):
        return [f for f in glob.glob(path) if os.path.isfile(f)]
    return [path] if os.path.isfile(path) else []


# Prefix of content fingerprints: an index whose manifest has an older kind cannot be checked against its model.
MODEL_FINGERPRINT_KIND = "m2:"
_SAMPLE = 1 << 20


def _content_fingerprint(path: str) -> str:
    """Relative path, size, and the hash of the first and last MiB of every file under `path` (or of the file)."""
    root = path if os.path.isdir(path) else os.path.dirname(path)
    h = hashlib.sha256()
    for f in sorted(_local_files(path)):
        size = os.path.getsize(f)
        with open(f, "rb") as fh:
            head = fh.read(_SAMPLE)
            if size > 2 * _SAMPLE:
                fh.seek(size - _SAMPLE)
            tail = fh.read(_SAMPLE)
        h.update(f"{os.path.relpath(f, root)}|{size}|".encode())
        h.update(hashlib.sha256(head + tail).digest())
    return h.hexdigest()


def _source_fingerprint(name: str, revision: str | None) -> str:
    return _content_fingerprint(name) if _local_files(name) else f"hub:{name}@{revision or 'main'}"


def model_fingerprint(cfg: ModelConfig) -> str:
    """Fingerprint of the weights and the tokenizer a ModelConfig loads (and the dtype it loads them in)."""
    weights = _source_fingerprint(cfg.name_or_path, cfg.revision)
    tokenizer = _source_fingerprint(cfg.tokenizer, cfg.revision) if cfg.tokenizer else "same"
    digest = hashlib.sha256(f"{weights}|{tokenizer}|{cfg.dtype}".encode()).hexdigest()[:16]
    return MODEL_FINGERPRINT_KIND + digest


def check_model_fingerprint(model: ModelConfig, recorded: str, index_uri: str) -> str:
    """The fingerprint of `model` as it is on disk now; an IndexMismatchError if it is not `recorded`, the one
    the index at `index_uri` was built with (its gradients would be scored against another model's). A recorded
    fingerprint of an older kind cannot be compared: it is returned as it is."""
    if not recorded.startswith(MODEL_FINGERPRINT_KIND):
        return recorded
    current = model_fingerprint(model)
    if current != recorded:
        raise IndexMismatchError(
            f"the model {model.name_or_path!r} is not the one index {index_uri!r} was built with "
            f"(fingerprint {current}, built with {recorded}): its weights or tokenizer changed",
            fix="restore the model the index was built with, or rebuild the index (`dataworth index --overwrite`)",
        )
    return current


def optimizer_fingerprint(logging: LoggingConfig) -> str | None:
    """Content fingerprint of the optimizer state an index's gradients are corrected by (None: no correction),
    so projections fitted with one state are not reused for another saved at the same path."""
    if logging.optimizer_state is None:
        return None
    path = os.path.expanduser(logging.optimizer_state)
    return _content_fingerprint(path)[:16] if _local_files(path) else None


def data_fingerprint(cfg: DataConfig) -> str:
    files = _local_files(cfg.dataset)
    base = _files_fingerprint(files) if files else f"hub:{cfg.dataset}/{cfg.subset}/{cfg.split}"
    return hashlib.sha256(f"{base}|{cfg.fingerprint()}".encode()).hexdigest()[:16]
