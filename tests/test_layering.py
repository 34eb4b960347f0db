"""The layering rule of docs/design.md: the core imports no orchestration, storage or tracking,
and each concern of the core imports only the concerns below it."""

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import dataworth

ROOT = Path(dataworth.__file__).parent
CORE = sorted(["dataworth"] + [m.name for m in pkgutil.walk_packages([str(ROOT)], prefix="dataworth.")])
# Which concern of the core may import which (shared modules sit at the top of the package).
ALLOWED = {
    "shared": {"shared"},
    "attribution": {"shared", "attribution"},
    "benchmarks": {"shared", "benchmarks"},
    "reports": {"shared", "reports"},
    "evaluation": {"shared", "attribution", "benchmarks", "evaluation"},
}


def _concern(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in ALLOWED) else "shared"


def _loaded_after(imports: list[str], banned: tuple[str, ...]) -> list[str]:
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in imports)
        + f"print(','.join(sorted({{m.split('.')[0] for m in sys.modules}} & set({banned!r}))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return [m for m in out.stdout.strip().split(",") if m]


def test_walk_finds_every_concern():
    assert {_concern(m) for m in CORE} == set(ALLOWED)
    assert len(CORE) > 20


def test_core_imports_no_prefect_lancedb_mlflow():
    assert _loaded_after(CORE, ("prefect", "lancedb", "mlflow")) == []


@pytest.mark.parametrize("module", [m for m in CORE if m != "dataworth"])
def test_concerns_import_only_what_is_below_them(module):
    path = ROOT.joinpath(*module.split(".")[1:])
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    tree = ast.parse(path.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imported.add(node.module)
        elif isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level:
            pytest.fail(f"{module} uses a relative import; import dataworth.… absolutely")
    own = _concern(module)
    for name in sorted(imported):
        if name.split(".")[0] in ("flows", "tasks", "storage"):
            pytest.fail(f"{module} imports {name}: the core never imports the pipeline or storage")
        if name.startswith("dataworth.") and _concern(name) not in ALLOWED[own]:
            pytest.fail(f"{module} ({own}) imports {name} ({_concern(name)}); allowed: {sorted(ALLOWED[own])}")


STORAGE = ["storage"] + [m.name for m in pkgutil.walk_packages([str(ROOT.parent / "storage")], prefix="storage.")]


def test_storage_imports_no_prefect_mlflow_or_torch():
    assert len(STORAGE) > 3
    assert _loaded_after(STORAGE, ("prefect", "mlflow", "torch")) == []


@pytest.mark.parametrize("module", STORAGE)
def test_storage_imports_at_most_the_core_config(module):
    path = ROOT.parent.joinpath(*module.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    for node in ast.walk(ast.parse(path.read_text())):
        names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
        names += [a.name for a in node.names] if isinstance(node, ast.Import) else []
        for name in names:
            assert name.split(".")[0] not in ("tasks", "flows"), f"{module} imports {name}"
            assert not name.startswith("dataworth") or name == "dataworth.config", (
                f"{module} imports {name}: storage may import dataworth.config only"
            )
