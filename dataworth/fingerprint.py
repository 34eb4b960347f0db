"""Cheap fingerprints of a model and a dataset, so caches notice a changed checkpoint or corpus.

A local model is fingerprinted by its content: each file's path relative to the model directory, its size,
and a hash of its first and last MiB (a retrained or replaced checkpoint differs there; hashing gigabytes of
weights in full every night would cost more than it saves). It does not depend on where the directory lies or
on modification times, so a copied model keeps its fingerprint and an index built with it stays usable.
Only the files a model is loaded from count: those at the top of its directory (`from_pretrained` reads no
subfolder), less what a Trainer or a training script writes beside the weights (its checkpoint-* folders, logs,
optimizer and scheduler state, trainer_state.json, *results.json, the model card), so training on into the
same output directory, or evaluating it there, does not make an index's model look replaced.
Datasets are fingerprinted by path, size and modification time; hub references by name and revision.
"""

from __future__ import annotations

import fnmatch
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


# Prefix of content fingerprints. m2 hashed every file under the model's directory (still computed to check an
# index that recorded one); m3 only the files it is loaded from. An index of a kind before m2 is not checked.
MODEL_FINGERPRINT_KIND = "m3:"
_LEGACY_KIND = "m2:"
_SAMPLE = 1 << 20
# Files a Trainer (or a training or evaluation script) writes beside a model's weights, which no model load reads.
_NOT_LOADED = (
    "optimizer.*",
    "scheduler.*",
    "scaler.*",
    "rng_state*",
    "trainer_state.json",
    "training_args.bin",
    "*results.json",
    "README.md",
    "*.log",
    "events.out.tfevents.*",
    ".*",
)


def _loaded_files(path: str) -> list[str]:
    """The files a model (or tokenizer) at `path` is loaded from: a directory's top-level files less _NOT_LOADED;
    a file or glob as _local_files."""
    if not os.path.isdir(path):
        return _local_files(path)
    names = [e.name for e in os.scandir(path) if e.is_file()]
    return [os.path.join(path, n) for n in names if not any(fnmatch.fnmatchcase(n, pat) for pat in _NOT_LOADED)]


def _content_fingerprint(path: str, files: list[str]) -> str:
    """Relative path (to `path`, a directory, or the file's folder), size, and the hash of the first and last MiB
    of every file of `files`."""
    root = path if os.path.isdir(path) else os.path.dirname(path)
    h = hashlib.sha256()
    for f in sorted(files):
        size = os.path.getsize(f)
        with open(f, "rb") as fh:
            head = fh.read(_SAMPLE)
            if size > 2 * _SAMPLE:
                fh.seek(size - _SAMPLE)
            tail = fh.read(_SAMPLE)
        h.update(f"{os.path.relpath(f, root)}|{size}|".encode())
        h.update(hashlib.sha256(head + tail).digest())
    return h.hexdigest()


def _source_fingerprint(name: str, revision: str | None, legacy: bool = False) -> str:
    files = _local_files(name) if legacy else _loaded_files(name)
    # A local directory whose files all lie in subfolders (or are all written by training) is still local: only a
    # name with no local file is a hub reference. The whole tree is listed only then.
    if not files and not _local_files(name):
        return f"hub:{name}@{revision or 'main'}"
    return _content_fingerprint(name, files)


def model_fingerprint(cfg: ModelConfig, kind: str = MODEL_FINGERPRINT_KIND) -> str:
    """Fingerprint of the weights and the tokenizer a ModelConfig loads (and the dtype it loads them in); `kind`
    _LEGACY_KIND computes the older kind (every file under the directories)."""
    legacy = kind == _LEGACY_KIND
    weights = _source_fingerprint(cfg.name_or_path, cfg.revision, legacy)
    tokenizer = _source_fingerprint(cfg.tokenizer, cfg.revision, legacy) if cfg.tokenizer else "same"
    digest = hashlib.sha256(f"{weights}|{tokenizer}|{cfg.dtype}".encode()).hexdigest()[:16]
    return kind + digest


def index_model_fingerprint(cfg: ModelConfig, recorded: str | None) -> str:
    """The fingerprint an index run records for its model: the current kind, or the older kind its published
    manifest `recorded` while the model still matches it, so that an index built before the current kind keeps
    its fitted projections and copies its unchanged documents' gradients instead of logging every one again."""
    if recorded and recorded.startswith(_LEGACY_KIND) and model_fingerprint(cfg, _LEGACY_KIND) == recorded:
        return recorded
    return model_fingerprint(cfg)


def check_model_fingerprint(model: ModelConfig, recorded: str, index_uri: str) -> str:
    """The fingerprint of `model` as it is on disk now; an IndexMismatchError if it is not `recorded`, the one
    the index at `index_uri` was built with (its gradients would be scored against another model's), computed as
    the kind `recorded` is (m3, or m2 for an index built before m3). A recorded fingerprint of a kind before m2
    cannot be compared: it is returned as it is."""
    kind = next((k for k in (MODEL_FINGERPRINT_KIND, _LEGACY_KIND) if recorded.startswith(k)), None)
    if kind is None:
        return recorded
    current = model_fingerprint(model, kind)
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
    files = _local_files(path)
    return _content_fingerprint(path, files)[:16] if files else None


def data_fingerprint(cfg: DataConfig) -> str:
    files = _local_files(cfg.dataset)
    base = _files_fingerprint(files) if files else f"hub:{cfg.dataset}/{cfg.subset}/{cfg.split}"
    return hashlib.sha256(f"{base}|{cfg.fingerprint()}".encode()).hexdigest()[:16]
