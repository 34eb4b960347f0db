"""Task bodies run with `.fn` against a temporary LanceDB directory (Prefect's advice): no engine, no server.

PREFECT_HOME is already a temporary directory (tests/conftest.py); the run logger is disabled
because `.fn` runs outside any flow or task run.
"""

from types import SimpleNamespace

import pytest
from prefect.logging import disable_run_logger
from tiny import tiny_index_config, write_tiny_assets

from dataworth.config import IndexConfig
from dataworth.fingerprint import data_fingerprint, model_fingerprint
from storage import IndexManifest, IndexStore
from tasks.index import (
    FittedCurvature,
    LoggedShard,
    Tokenized,
    assemble_manifest,
    fit_curvature,
    log_gradients,
    tokenize_corpus,
)

TEXTS = [
    "The river Ambel runs past the old mill.",
    "Tova keeps three grey cats and a lantern.",
    "Bread is baked before dawn in Harrow.",
    "The lantern maker sells lanterns at the market.",
    "Cats sleep near the mill when it rains.",
    "The square fills with music every spring " * 4,  # longer than max_length: chunked
]


@pytest.fixture
def texts() -> list[str]:
    return TEXTS


@pytest.fixture(autouse=True)
def _no_run_logger():
    with disable_run_logger():
        yield


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    return write_tiny_assets(tmp_path_factory.mktemp("tasks"), TEXTS)


@pytest.fixture
def index_config(assets, tmp_path):
    def make(**logging) -> IndexConfig:
        return tiny_index_config(assets, tmp_path, **logging)

    return make


def _tokenize(cfg) -> Tokenized:
    return tokenize_corpus.fn(cfg.index_uri, cfg.model, cfg.data, data_fingerprint(cfg.data), cfg.logging.shard_size)


def _log_all(cfg, tok: Tokenized, **projections) -> list[LoggedShard]:
    mfp = model_fingerprint(cfg.model)
    return [
        log_gradients.fn(
            cfg.index_uri, cfg.model, cfg.logging, mfp, tok.examples_version, s, h, progress=False, **projections
        )
        for s, h in enumerate(tok.shard_hashes)
    ]


def _build(cfg) -> tuple[Tokenized, list[LoggedShard], FittedCurvature, IndexManifest]:
    """Every index stage before publication, in order, as the index flow runs them (plain projections)."""
    tok = _tokenize(cfg)
    shards = _log_all(cfg, tok)
    version = IndexStore(cfg.index_uri).gradients_version()
    curv = fit_curvature.fn(cfg.index_uri, cfg.curvature, shards[0].layout, version)
    manifest = assemble_manifest.fn(cfg, tok, shards, version, curv, model_fingerprint(cfg.model))
    return tok, shards, curv, manifest


@pytest.fixture
def stages():
    """The index stages' bodies: tokenize(cfg), log_all(cfg, tok, **projections), build(cfg)."""
    return SimpleNamespace(tokenize=_tokenize, log_all=_log_all, build=_build)
