"""The pipeline's layering: no task module imports another task module, and flows import only
tasks (and the run tracking) from tasks/, never their helpers."""

import ast
import importlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TASK_MODULES = sorted(p.stem for p in (REPO / "tasks").glob("*.py") if p.stem != "__init__")
FLOW_MODULES = sorted(p.stem for p in (REPO / "flows").glob("*.py") if p.stem != "__init__")
# Glue every task shares; they define no task themselves.
SHARED = {"common", "tracking"}


def _imports(path: Path, package: str) -> list[tuple[str, list[str]]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                module = f"{package}.{module}" if module else package
            out.append((module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out.extend((a.name, []) for a in node.names)
    return out


def _defines_tasks(stem: str) -> bool:
    from prefect import Task

    module = importlib.import_module(f"tasks.{stem}")
    return any(isinstance(v, Task) for v in vars(module).values())


def test_shared_task_modules_define_no_task():
    assert not any(_defines_tasks(s) for s in SHARED & set(TASK_MODULES))


@pytest.mark.parametrize("stem", [s for s in TASK_MODULES if s not in SHARED])
def test_no_task_module_imports_another(stem):
    assert _defines_tasks(stem), f"tasks/{stem}.py defines no task: move it out of tasks/ or into tasks/common.py"
    for module, _ in _imports(REPO / "tasks" / f"{stem}.py", "tasks"):
        if module.startswith("tasks.") or module == "tasks":
            assert module.split(".")[1] in SHARED, f"tasks/{stem}.py imports {module}, another task module"
        assert not module.startswith("flows"), f"tasks/{stem}.py imports {module}: tasks never import flows"


@pytest.mark.parametrize("stem", FLOW_MODULES)
def test_flows_import_only_tasks_from_task_modules(stem):
    from prefect import Task

    for module, names in _imports(REPO / "flows" / f"{stem}.py", "flows"):
        if not module.startswith("tasks") or module == "tasks.tracking":
            continue
        assert module != "tasks.common", f"flows/{stem}.py imports task helpers from tasks.common"
        mod = importlib.import_module(module)
        helpers = [n for n in names if not isinstance(getattr(mod, n), Task)]
        assert not helpers, f"flows/{stem}.py imports helpers {helpers} from {module}: only tasks may cross"
