"""Cheap fingerprints of a model and a dataset, so caches notice a changed checkpoint or corpus.

Local files are fingerprinted by path, size and modification time (hashing gigabytes of
weights every night would cost more than it saves); hub references by name and revision.
"""

from __future__ import annotations

import glob
import hashlib
import os

from dataworth.config import DataConfig, ModelConfig


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


def model_fingerprint(cfg: ModelConfig) -> str:
    files = _local_files(cfg.name_or_path)
    base = _files_fingerprint(files) if files else f"hub:{cfg.name_or_path}@{cfg.revision or 'main'}"
    return hashlib.sha256(f"{base}|{cfg.tokenizer}|{cfg.dtype}".encode()).hexdigest()[:16]


def data_fingerprint(cfg: DataConfig) -> str:
    files = _local_files(cfg.dataset)
    base = _files_fingerprint(files) if files else f"hub:{cfg.dataset}/{cfg.subset}/{cfg.split}"
    return hashlib.sha256(f"{base}|{cfg.fingerprint()}".encode()).hexdigest()[:16]
