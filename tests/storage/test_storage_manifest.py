"""IndexManifest reads every manifest published so far, and builds what every layer reads."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from dataworth.config import DataConfig, IndexConfig, ModelConfig, TrackingConfig
from storage import SCHEMA_VERSION, IndexBuildConfig, IndexManifest, IndexStore
from storage.store import MANIFEST_KEY

# A manifest as the index flow published it before KFAC whitening: no precondition settings,
# no projections_artifact, no calibration.
BEFORE_KFAC = {
    "config": {
        "model": {
            "name_or_path": "/models/tiny",
            "tokenizer": None,
            "revision": None,
            "dtype": "float32",
            "device": "auto",
            "allow_tf32": False,
            "trust_remote_code": False,
        },
        "data": {
            "dataset": "/data/docs.jsonl",
            "split": "train",
            "subset": None,
            "text_column": "text",
            "id_column": "id",
            "source_column": None,
            "max_length": 16,
            "max_documents": None,
            "skip_empty": False,
            "add_eos": True,
        },
        "logging": {
            "modules": ["*"],
            "exclude_modules": ["lm_head", "*.lm_head", "embed_out"],
            "projection": "gaussian",
            "proj_dim_in": 4,
            "proj_dim_out": 4,
            "seed": 0,
            "loss_reduction": "sum",
            "batch_size": 3,
            "shard_size": 4,
            "storage_dtype": "float32",
        },
        "curvature": {"kind": "raw", "damping_factor": 0.1, "max_block_dim": 16384},
        "index_uri": "/indexes/tiny",
    },
    "model_fingerprint": "0123456789abcdef",
    "data_fingerprint": "fedcba9876543210",
    "layout": [{"name": "h.0.attn.c_attn", "k_in": 4, "k_out": 4}],
    "dim": 16,
    "full_gradient_params": 12288,
    "num_examples": 10,
    "num_documents": 8,
    "num_tokens": 120,
    "examples_version": 1,
    "gradients_version": 4,
    "curvature_artifact": "curvature-abc-v4",
    "mlflow_run_id": "run123",
    "schema_version": SCHEMA_VERSION,
    "published_at": 1700000000.5,
}
# As published with KFAC whitening and a recorded calibration.
WITH_KFAC = {
    **BEFORE_KFAC,
    "config": {
        **BEFORE_KFAC["config"],
        "logging": {
            **BEFORE_KFAC["config"]["logging"],
            "precondition": "kfac",
            "precondition_damping": 0.001,
            "precondition_examples": 1024,
            "max_factor_dim": 8192,
        },
    },
    "projections_artifact": "projections-abc-def",
    "calibration": {"damping_factor": 0.01, "proxy": "fact_mrr", "sweep": {"0.01": {"tune": 0.5, "test": 0.4}}},
}


@pytest.fixture
def store(tmp_path):
    return IndexStore(str(tmp_path / "index"))


def test_reads_manifests_published_before_kfac_whitening(store):
    store._put(MANIFEST_KEY, json.dumps(BEFORE_KFAC).encode())
    manifest = store.read_manifest()
    assert manifest.config.logging.precondition == "none"  # plain random projections
    assert manifest.projections_artifact is None and manifest.calibration is None
    assert manifest.config.data.max_length == 16 and manifest.config.model.name_or_path == "/models/tiny"


def test_reads_current_manifests_unchanged(store):
    store._put(MANIFEST_KEY, json.dumps(WITH_KFAC).encode())
    manifest = store.read_manifest()
    assert manifest.config.logging.precondition == "kfac"
    assert manifest.calibration["damping_factor"] == 0.01
    # The typed manifest dumps back to exactly what was stored (score run ids hash it).
    assert manifest.model_dump(mode="json") == WITH_KFAC
    store.publish_manifest(manifest)
    assert json.loads(store._get(MANIFEST_KEY)) == WITH_KFAC


def test_unknown_fields_are_refused():
    with pytest.raises(ValidationError, match="extra"):
        IndexManifest.model_validate({**WITH_KFAC, "dimension": 3})


def test_build_config_drops_what_does_not_shape_the_index():
    config = IndexConfig(
        model=ModelConfig(name_or_path="m"),
        data=DataConfig(dataset="d"),
        index_uri="idx",
        overwrite=True,
        keep_versions_days=0.5,
        tracking=TrackingConfig(enabled=False),
    )
    build = IndexBuildConfig.of(config)
    assert build.model_dump() == config.model_dump(exclude={"overwrite", "keep_versions_days", "tracking", "runner"})
