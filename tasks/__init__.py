"""Prefect tasks: each opens what it needs, calls the core, writes through storage,
logs to MLflow, and returns small values (URIs, counts, versions)."""
