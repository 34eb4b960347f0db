"""Configs of the `evaluate` flow: which benchmark, which metrics, how to retrain."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from dataworth.benchmarks.presets import BENCHMARKS
from dataworth.config import (
    ALL_SCORE_MODES,
    ANN_MODES,
    HYBRID_MODES,
    CurvatureConfig,
    LoggingConfig,
    ScoreConfig,
    StageConfig,
    TrackingConfig,
)
from dataworth.training import RetrainConfig

Baseline = Literal["bm25", "kronfluence"]


class LDSConfig(StageConfig):
    enabled: bool = Field(True, description="Compute the linear datamodeling score (retrains one model per subset).")
    n_subsets: int = Field(50, ge=3, description="Random training subsets, one retrained model each (3 at least).")
    fraction: float = Field(0.5, gt=0, lt=1, description="Share of the training examples in each subset.")
    seed: int = Field(0, description="Seed of the subset draw (retraining seeds follow from it).")


class BrittlenessConfig(StageConfig):
    enabled: bool = Field(True, description="Remove each query's top-k examples, retrain, measure the query's loss.")
    ks: list[int] = Field(default_factory=lambda: [1, 3, 10], description="Numbers of removed examples.")
    n_queries: int = Field(4, ge=1, description="Queries tested (each costs len(ks) × (methods + 1) retrains).")
    methods: list[str] = Field(
        default_factory=lambda: ["relatif", "bm25"], description="Score modes or baselines whose top-k is removed."
    )

    @model_validator(mode="after")
    def _ks(self) -> "BrittlenessConfig":
        if not self.ks or any(k < 1 for k in self.ks):
            raise ValueError(f"brittleness.ks={self.ks} must be a non-empty list of positive counts")
        return self


class TailPatchConfig(StageConfig):
    enabled: bool = Field(True, description="TrackStar tail-patch: one step on a retrieved example, Δ log p(target).")
    top_k: int = Field(5, ge=1, description="Retrieved examples patched per query and method.")
    # 0.1 overshoots on lm-small: every method and random examples alike lose 1.6-2.9 nats. At 0.01 the
    # step is small enough that its effect ranks the examples (random -0.015, whitened dot +0.029).
    lr: float = Field(0.01, gt=0, description="Learning rate of the single step.")
    # SGD keeps the step first-order interpretable (Δ log p ≈ lr · ∇loss_q · ∇loss_z); Adam's first
    # step is lr · sign(g) on every weight and mostly measures damage.
    optimizer: Literal["sgd", "adam", "normalized", "state"] = Field(
        "sgd",
        description="Optimizer of the single step; normalized: SGD whose step length is lr × ‖θ‖; state: the "
        "training optimizer's own step from its saved state (the model directory's optimizer.pt, or the index's "
        "logging.optimizer_state), -lr · g / (√v̂ + ε) without momentum (give lr the final learning rate of "
        "training).",
    )
    max_queries: int = Field(40, ge=1, description="Queries evaluated (first ones in order).")


class CalibrateConfig(StageConfig):
    enabled: bool = Field(False, description="Sweep the damping factor (and projection size) on a held-out proxy.")
    damping_factors: list[float] = Field(
        default_factory=lambda: [0.001, 0.01, 0.1, 1.0, 10.0], description="Damping factors tried."
    )
    proj_dims: list[int] = Field(
        default_factory=list,
        description="Also sweep the projection size per side (one index each, k_in = k_out); empty: keep logging's.",
    )
    task_mixes: list[float] = Field(
        default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 0.9],
        description="trackstar's score.task_mix values tried (at the chosen damping), when trackstar is scored.",
        exclude_if=lambda v: v == [0.0, 0.25, 0.5, 0.75, 0.9],
    )
    proxy: Literal["fact_mrr", "lds"] = Field("fact_mrr", description="Held-out proxy maximized.")
    holdout_fraction: float = Field(0.5, gt=0, lt=1, description="Share of queries used to choose (rest reports).")

    @field_validator("task_mixes")
    @classmethod
    def _mixes(cls, v: list[float]) -> list[float]:
        if any(not 0 <= w < 1 for w in v):
            raise ValueError(f"calibrate.task_mixes={v} must hold shares in [0, 1)")
        return sorted(set(v))

    @field_validator("proj_dims")
    @classmethod
    def _dims(cls, v: list[int]) -> list[int]:
        if any(k < 1 for k in v):
            raise ValueError(f"calibrate.proj_dims={v} must hold positive projection sizes")
        return sorted(set(v))


class EvaluateConfig(StageConfig):
    benchmark: Literal[tuple(BENCHMARKS)] = Field(
        "facts-small",
        description="Benchmark (dataworth.benchmarks.presets): generated fact corpora at three sizes and one "
        "partially trained, a generated LM corpus, and real text (docstrings-small).",
    )
    workspace: str = Field("dataworth-runs/evaluate", description="Folder for corpora, models, indexes and reports.")
    seed: int = Field(
        0, description="Seed of corpus, model and projections (the projections' own when --logging.seed is not 0)."
    )
    train_epochs: int | None = Field(
        None, ge=1, description="Epochs of the benchmark model (preset default when unset)."
    )
    logging: LoggingConfig = Field(
        default_factory=lambda: LoggingConfig(proj_dim_in=32, proj_dim_out=32, batch_size=16, shard_size=256)
    )
    curvature: CurvatureConfig = Field(default_factory=CurvatureConfig)
    score: ScoreConfig = Field(
        default_factory=lambda: ScoreConfig(
            top_k=10, modes=[*ALL_SCORE_MODES, *(m for m in HYBRID_MODES if m not in ANN_MODES)]
        ),
        description="Scoring of the evaluated modes: every gradient and hybrid mode by default (BM25 comes with "
        "baselines; the hybrid-ann-* modes need an index built with a vector index).",
    )
    baselines: list[Baseline] = Field(default_factory=lambda: ["bm25"], description="Baselines in the same table.")
    fact_tracing: bool = Field(True, description="MRR / recall@10 of fact-stating documents (fact benchmarks).")
    tail_patch: TailPatchConfig = Field(default_factory=TailPatchConfig)
    lds: LDSConfig = Field(default_factory=LDSConfig)
    brittleness: BrittlenessConfig = Field(default_factory=BrittlenessConfig)
    retrain: RetrainConfig | None = Field(
        None, description="How LDS/brittleness retrain a model; default: the benchmark model's own recipe."
    )
    loo: bool = Field(True, description="Leave-one-out agreement on a convex problem (softmax regression).")
    optimizer_correction: bool = Field(
        False,
        description="Index the benchmark with TrackStar's optimizer-state correction: logging.optimizer_state is "
        "set to the optimizer state the benchmark model saved with its weights.",
        exclude_if=lambda v: v is False,
    )
    store_dtypes: list[Literal["float16", "bfloat16", "int8"]] = Field(
        default_factory=lambda: ["bfloat16", "int8"],
        description="Smaller storage dtypes (logging.storage_dtype) measured against the index's float32 store: "
        "the gradients written again in each, bytes and rank agreement (Spearman, top-10 overlap) of every "
        "gradient mode. Empty: not measured.",
        exclude_if=lambda v: v == ["bfloat16", "int8"],
    )
    checkpoints: int = Field(
        0,
        ge=0,
        description="TracIn over checkpoints: the benchmark model also saves this many intermediate checkpoints "
        "(evenly spaced steps), each is indexed with the run's logging and curvature config, and every gradient "
        "mode is scored again summed over them and the final model, Σ_c η_c score_c with η_c the learning rate "
        "at checkpoint c (methods tracin-<mode>). 0: none. Each checkpoint costs one index: with "
        "--precondition none (one pass over the corpus instead of KFAC whitening's two) and the ekfac curvature, "
        "about half.",
        exclude_if=lambda v: v == 0,
    )
    calibrate: CalibrateConfig = Field(default_factory=CalibrateConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _calibration_proxy(self) -> "EvaluateConfig":
        cal = self.calibrate
        if cal.enabled and cal.proxy == "fact_mrr" and BENCHMARKS[self.benchmark]["kind"] != "facts":
            raise ValueError(
                f"calibrate.proxy='fact_mrr' needs known relevant documents, and benchmark {self.benchmark!r} has none "
                "(a language-modeling corpus): use calibrate.proxy='lds' (--calibrate-proxy lds)"
            )
        return self

    @model_validator(mode="after")
    def _brittleness_methods(self) -> "EvaluateConfig":
        if self.brittleness.enabled:
            available = [*self.score.modes, *self.baselines]
            if "methods" not in self.brittleness.model_fields_set:  # the default adapts; a user's choice is checked
                kept = [m for m in self.brittleness.methods if m in available] or available[:1]
                self.brittleness.methods = kept
                return self
            unknown = [m for m in self.brittleness.methods if m not in available]
            if unknown:
                raise ValueError(
                    f"brittleness.methods {unknown} are neither score modes nor baselines of this run ({available}); "
                    "add them to score.modes / baselines, or remove them from brittleness.methods"
                )
        return self

    @property
    def projection_seed(self) -> int:
        """The seed the index's projections are drawn with: the run's, unless logging.seed gives them their own (a
        value other than its default 0), so projection draws can be compared on one corpus, model and retraining."""
        return self.logging.seed or self.seed
