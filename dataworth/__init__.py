"""dataworth: training-data attribution and valuation for language models (pure core).

This package imports torch, numpy and transformers only; orchestration (prefect),
storage (lancedb) and tracking (mlflow) live in flows/, tasks/ and storage/.
"""

__version__ = "0.1.0"
