"""The index manifest as a typed model: what an index was built with and which table versions it serves.

Publishing the manifest makes an index visible (see IndexStore.publish_manifest). It is stored as
JSON; every manifest published since the first schema version reads back into this model.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from dataworth.config import CurvatureConfig, DataConfig, IndexConfig, LoggingConfig, ModelConfig, StageConfig
from storage.errors import IndexStoreError
from storage.schemas import SCHEMA_VERSION

# What the stored gradients depend on; the curvature may change without a rebuild.
GRADIENT_KEYS = ("model", "data", "logging")


class IndexBuildConfig(StageConfig):
    """The IndexConfig an index was built with, less what does not shape it (overwrite, retention, tracking, runner)."""

    model: ModelConfig = Field(description="The model whose gradients are stored.")
    data: DataConfig = Field(description="The corpus and how it was cut into examples.")
    logging: LoggingConfig = Field(description="How per-example gradients were projected and stored.")
    curvature: CurvatureConfig = Field(description="How the curvature (Fisher) was fitted.")
    index_uri: str = Field(description="LanceDB URI the index was built at.")

    @field_validator("logging", mode="before")
    @classmethod
    def _before_kfac_whitening(cls, value: Any) -> Any:
        # Indexes built before KFAC whitening existed used the random projection alone.
        if isinstance(value, dict) and "precondition" not in value:
            return {"precondition": "none", **value}
        return value

    @classmethod
    def of(cls, config: IndexConfig) -> IndexBuildConfig:
        # ann shapes no stored gradient: the vector index built is recorded as IndexManifest.ann_index.
        exclude = {"overwrite", "keep_versions_days", "tracking", "runner", "ann"}
        return cls.model_validate(config.model_dump(mode="json", exclude=exclude))


class IndexManifest(BaseModel):
    """Everything a reader of an index needs: its build config, sizes, table versions and artifacts."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    schema_version: int = Field(
        SCHEMA_VERSION, description="Storage schema version the index was written with (set by storage)."
    )
    config: IndexBuildConfig = Field(description="The resolved config the index was built with.")
    model_fingerprint: str = Field(description="Fingerprint of the model checkpoint (files or hub revision).")
    data_fingerprint: str = Field(description="Fingerprint of the corpus files or hub dataset.")
    layout: list[dict[str, Any]] = Field(
        description="Per-module blocks of the gradient vector (Layout.to_json of the attribution core)."
    )
    dim: int = Field(ge=1, description="Dimension of each stored gradient vector.")
    full_gradient_params: int = Field(ge=0, description="Parameters of the tracked layers (the unprojected size).")
    num_examples: int = Field(ge=0, description="Training examples (rows of the examples and gradients tables).")
    num_documents: int = Field(ge=0, description="Documents the examples were cut from.")
    num_tokens: int = Field(ge=0, description="Tokens over all examples.")
    examples_version: int = Field(description="Version of the examples table this index serves.")
    gradients_version: int = Field(description="Version of the gradients table this index serves.")
    curvature_artifact: str = Field(description="Artifact key of the fitted curvature.")
    projections_artifact: str | None = Field(
        None, description="Artifact key of the KFAC-whitened projections; None for plain random projections."
    )
    mlflow_run_id: str | None = Field(None, description="MLflow run that built the index; None without tracking.")
    calibration: dict[str, Any] | None = Field(
        None,
        description="Damping chosen by `dataworth evaluate --calibrate` (damping_factor, proxy, sweep, ...); "
        "queries use its damping_factor by default.",
    )
    published_at: float | None = Field(
        None, description="Unix time of the first publication (set by IndexStore.publish_manifest when unset)."
    )
    # Left out of dumps when None: the manifests (and score run ids) of indexes without one read back unchanged.
    ann_index: dict[str, Any] | None = Field(
        None,
        description="The vector index on the gradients table at gradients_version (index_type, metric, partitions, "
        "sub_vectors, rows, build_seconds), which the hybrid-ann-* modes search; None: none built.",
        exclude_if=lambda v: v is None,
    )

    def shard_ranges(self, shards_per_task: int) -> list[list[int]]:
        """The gradient shards (0 .. ⌈examples / shard_size⌉ - 1) in consecutive runs of shards_per_task."""
        if shards_per_task < 1:
            raise ValueError(f"shards_per_task={shards_per_task} must be at least 1")
        n_shards = math.ceil(self.num_examples / self.config.logging.shard_size)
        return [list(range(a, min(a + shards_per_task, n_shards))) for a in range(0, n_shards, shards_per_task)]

    def check_compatible(self, config: IndexConfig) -> None:
        """Refuse to add to this index with a config whose gradients would differ (model, data, logging)."""
        if config.overwrite:
            return
        old, new = self.config.model_dump(mode="json"), config.model_dump(mode="json")
        # Over both sides' fields: a field left at its default is not written (exclude_if), so one set before and
        # unset now shows only on the old side.
        diffs = "; ".join(
            f"{k}.{f}: {old[k].get(f)!r} → {new[k].get(f)!r}"
            for k in GRADIENT_KEYS
            for f in dict.fromkeys([*new[k], *old[k]])
            if old[k].get(f) != new[k].get(f)
        )
        if diffs:
            raise IndexStoreError(
                f"index {config.index_uri!r} was built with a different config ({diffs}). Pass overwrite=True "
                "(--overwrite) to rebuild it, or choose another index_uri"
            )

    def calibration_for(self, config: IndexConfig) -> dict[str, Any] | None:
        """The calibration to carry into a rebuild with `config`: kept while the curvature it was chosen for is."""
        if not self.calibration or config.overwrite:
            return None
        old, new = self.config.model_dump(mode="json"), config.model_dump(mode="json")
        same = all(old[k] == new[k] for k in (*GRADIENT_KEYS, "curvature"))
        return self.calibration if same else None

    @field_validator("schema_version")
    @classmethod
    def _our_version(cls, value: int) -> int:
        if value != SCHEMA_VERSION:
            raise ValueError(f"schema_version {value!r}: this dataworth reads and writes {SCHEMA_VERSION}")
        return value


class IndexState(BaseModel):
    """What an index holds now; None for tables that do not exist yet."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    manifest: IndexManifest | None = Field(description="The published manifest; None before the first publication.")
    has_examples: bool = Field(description="Whether the examples table exists.")
    examples_version: int | None = Field(description="Current version of the examples table.")
    num_examples: int | None = Field(description="Rows of the examples table now.")
    gradients_version: int | None = Field(description="Current version of the gradients table.")
    num_gradients: int | None = Field(description="Rows of the gradients table now.")
    shards: list[int] = Field(description="Gradient shards present, sorted.")
