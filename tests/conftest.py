"""Shared fixtures: tiny randomly initialized models, offline and isolated settings."""

import os
import tempfile

# Set before anything imports prefect/transformers: no hub lookups, no shared Prefect home.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# The ephemeral API server gets 20 s to start by default; on 2 busy cores that is sometimes too little.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="dataworth-prefect-home-")
# No test reaches a `dataworth serve` service the developer may have running (tests that need one start their own).
os.environ["DATAWORTH_HOME"] = tempfile.mkdtemp(prefix="dataworth-home-")

import pytest  # noqa: E402
import torch  # noqa: E402
from tiny import make_tiny_gpt2, make_tiny_llama  # noqa: E402


@pytest.fixture(params=["gpt2", "llama"])
def tiny_model(request):
    return make_tiny_gpt2() if request.param == "gpt2" else make_tiny_llama()


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
