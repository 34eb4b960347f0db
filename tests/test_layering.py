"""The layering rule of DESIGN.md: the core imports no orchestration, storage or tracking."""

import subprocess
import sys

import pytest

CORE = ["dataworth", "dataworth.config", "dataworth.projection", "dataworth.collector", "dataworth.data",
        "dataworth.curvature", "dataworth.scoring", "dataworth.gradients", "dataworth.model", "dataworth.queries",
        "dataworth.fingerprint", "dataworth.report", "dataworth.eval_report", "dataworth.evaluation",
        "dataworth.demo_corpus", "dataworth.lm_corpus", "dataworth.tiny_model", "dataworth.retrain",
        "dataworth.benchmark", "dataworth.bm25", "dataworth.lds", "dataworth.convex", "dataworth.compare_kronfluence"]


def _loaded_after(imports: list[str], banned: tuple[str, ...]) -> list[str]:
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in imports)
        + f"print(','.join(sorted({{m.split('.')[0] for m in sys.modules}} & set({banned!r}))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return [m for m in out.stdout.strip().split(",") if m]


def test_core_imports_no_prefect_lancedb_mlflow():
    assert _loaded_after(CORE, ("prefect", "lancedb", "mlflow")) == []


@pytest.mark.parametrize("module", ["storage", "storage.store", "storage.schemas"])
def test_storage_imports_no_prefect_or_mlflow(module):
    assert _loaded_after([module], ("prefect", "mlflow", "torch")) == []
