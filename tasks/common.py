"""What every task shares: the retry rule, the cache policy, and a per-process model cache."""

from __future__ import annotations

import threading

from prefect.cache_policies import INPUTS, TASK_SOURCE

from dataworth.config import ModelConfig
from dataworth.model import load_model

# Cached across runs on (inputs + task source); the MLflow run id only says where to log.
CACHE = (INPUTS - "run_id" - "tracking_uri") + TASK_SOURCE

_NOT_TRANSIENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def retry_on_io(task, task_run, state) -> bool:
    """Retry only transient I/O failures; a ValueError (bad input) is never retried."""
    try:
        state.result()
    except _NOT_TRANSIENT:
        return False
    except (OSError, ConnectionError, TimeoutError):
        return True
    except BaseException:  # noqa: BLE001 - anything else is a bug or bad input
        return False
    return False


IO_RETRIES = dict(retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=retry_on_io)

_models: dict[str, tuple] = {}
_lock = threading.Lock()
# Hooks live on the shared model object: two threads collecting on it at once would mix
# their activations, so model work in one process is serialized (scale out with processes).
MODEL_LOCK = threading.Lock()


def cached_model(cfg: ModelConfig):
    """(model, tokenizer), loaded once per worker process: shards of one run share it."""
    key = cfg.fingerprint()
    with _lock:
        if key not in _models:
            _models.clear()  # keep one model resident, never two
            _models[key] = load_model(cfg)
        return _models[key]
