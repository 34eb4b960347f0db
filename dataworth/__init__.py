"""dataworth: training-data attribution and valuation for language models (pure core).

This package imports torch, numpy and transformers only; orchestration (prefect),
storage (lancedb) and tracking (mlflow) live in flows/, tasks/ and storage/.

The names below are the public API. They load on first use, so `import dataworth` stays
cheap (no torch, no transformers) until one of them is used:

    from dataworth import attribute, load_model, ModelConfig
    model, tokenizer = load_model(ModelConfig(name_or_path="gpt2"))
    result = attribute(model, tokenizer, texts, ["The capital of France is"])
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# The public API, by the module that defines each name.
_PUBLIC = {
    "dataworth.config": (
        "ModelConfig",
        "DataConfig",
        "LoggingConfig",
        "CurvatureConfig",
        "ScoreConfig",
        "GenerationConfig",
        "QuerySpec",
        "IndexConfig",
        "QueryConfig",
        "DemoConfig",
    ),
    "dataworth.evaluation.config": ("EvaluateConfig",),
    "dataworth.training": ("RetrainConfig",),
    "dataworth.model": ("load_model", "load_tokenizer"),
    "dataworth.data": ("Documents", "Example", "load_documents", "chunk_documents"),
    "dataworth.queries": ("EncodedQuery", "load_queries", "encode_queries"),
    "dataworth.attribution.hooks": ("GradientCollector",),
    "dataworth.attribution.gradients": ("log_example_gradients", "query_gradients"),
    "dataworth.attribution.kfac": ("fit_kfac_projections",),
    "dataworth.attribution.projection": ("FittedProjections",),
    "dataworth.attribution.curvature": ("FisherAccumulator", "fit_fisher", "Curvature"),
    "dataworth.attribution.scoring": ("Scorer",),
    "dataworth.attribution.api": ("attribute", "Attribution"),
    "dataworth.errors": (
        "DataworthError",
        "ConfigError",
        "DataError",
        "QueryError",
        "ModelError",
        "IndexMismatchError",
        "is_retryable",
    ),
}
_LAZY = {name: module for module, names in _PUBLIC.items() for name in names}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'dataworth' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
