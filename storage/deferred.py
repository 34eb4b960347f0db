"""A dependency's package __init__ run when first needed instead of at import: for a package whose __init__ is
slow and unused here, while the submodules this project's dependencies import from it are cheap."""

from __future__ import annotations

import importlib.util
import sys
import threading
from types import ModuleType

_lock = threading.RLock()


def defer_package_init(name: str) -> bool:
    """Put package `name` in sys.modules with its __init__ not yet run. Its submodules import as usual (each
    from its own file: Python needs only the package's __path__), and the first lookup of a name the package
    itself would define (`pkg.X`, `from pkg import X`) runs the __init__ then, in place, as its import would.

    Does nothing (False) when the package is imported already, not installed, or not a plain package of files;
    an import of it then runs as usual."""
    if name in sys.modules:
        return False
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return False
    if spec is None or spec.submodule_search_locations is None or not hasattr(spec.loader, "exec_module"):
        return False
    module = importlib.util.module_from_spec(spec)

    def __getattr__(attr: str):
        _run_init(module)
        try:
            return module.__dict__[attr]
        except KeyError:
            raise AttributeError(f"module {name!r} has no attribute {attr!r}") from None

    module.__getattr__ = __getattr__  # PEP 562: consulted only for names the module does not hold
    module.__dict__["_deferred_init"] = __getattr__
    sys.modules[name] = module
    return True


def init_deferred(module: ModuleType) -> bool:
    """Run a deferred package's __init__ now (True), if it has not run yet."""
    return _run_init(module)


def _run_init(module: ModuleType) -> bool:
    with _lock:
        hook = module.__dict__.pop("_deferred_init", None)
        if hook is None:
            return False
        if module.__dict__.get("__getattr__") is hook:
            del module.__dict__["__getattr__"]  # the package's own names, or its own __getattr__, from now on
        module.__spec__.loader.exec_module(module)
        return True
