"""defer_package_init: a package's __init__ runs at the first lookup of one of its own names, its submodules
import without it; and storage defers Lance's REST namespace client that way without losing any of it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from storage.deferred import defer_package_init, init_deferred


@pytest.fixture
def package(tmp_path, monkeypatch):
    root = tmp_path / "deferpkg"
    (root / "models").mkdir(parents=True)
    (root / "__init__.py").write_text(
        "import sys\nsys.modules[__name__].runs = getattr(sys.modules[__name__], 'runs', 0) + 1\n"
        "from deferpkg.models.thing import Thing\nX = 1\n"
    )
    (root / "models" / "__init__.py").write_text("from deferpkg.models.thing import Thing\n")
    (root / "models" / "thing.py").write_text("class Thing:\n    pass\n")
    (root / "other.py").write_text("Y = 2\n")
    (tmp_path / "plainmod.py").write_text("Z = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "deferpkg"
    for name in [m for m in sys.modules if m.split(".")[0] in ("deferpkg", "plainmod")]:
        del sys.modules[name]


def test_submodules_import_without_the_init(package):
    assert defer_package_init(package)
    from deferpkg.models import Thing  # noqa: F401 - the import is the test

    pkg = sys.modules[package]
    assert "X" not in vars(pkg) and "runs" not in vars(pkg)
    assert pkg.X == 1 and pkg.runs == 1  # the first lookup ran the __init__, once
    assert pkg.X == 1 and pkg.runs == 1 and pkg.Thing is sys.modules["deferpkg.models.thing"].Thing
    with pytest.raises(AttributeError, match="no attribute 'missing'"):
        pkg.missing  # noqa: B018


def test_from_import_runs_the_init_and_finds_submodules(package):
    assert defer_package_init(package)
    from deferpkg import X, other

    assert X == 1 and other.Y == 2 and sys.modules[package].runs == 1
    assert not init_deferred(sys.modules[package])  # ran already


def test_init_deferred_runs_it_now(package):
    assert defer_package_init(package)
    assert init_deferred(sys.modules[package]) and sys.modules[package].runs == 1


def test_nothing_deferred_when_it_cannot_be(package):
    assert not defer_package_init("no_such_package_here")
    assert not defer_package_init("no_such_package_here.sub")
    assert not defer_package_init("plainmod")  # a module, not a package
    import deferpkg

    assert not defer_package_init(package)  # imported already
    assert deferpkg.X == 1


def test_storage_defers_the_rest_client_and_keeps_it_usable(tmp_path):
    """In a fresh interpreter: an index written and read never runs the REST client's __init__ (its API
    classes), and the client is whole when something asks for it."""
    code = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        from storage import IndexStore
        store = IndexStore({str(tmp_path / "index")!r})
        store.write_gradient_shard(0, np.arange(4), np.ones((4, 3), dtype=np.float32))
        assert sum(len(ids) for ids, _, _ in store.iter_gradients(2)) == 4
        assert store.state() is not None
        import lance_namespace
        assert lance_namespace.LanceNamespace is not None
        assert "lance_namespace_urllib3_client.api" not in sys.modules, "the REST client was imported"
        from lance_namespace_urllib3_client import ApiClient, Configuration
        import lance_namespace_urllib3_client as client
        assert client.TableApi.__module__ == "lance_namespace_urllib3_client.api.table_api"
        assert client.__version__ and ApiClient(Configuration(host="http://localhost:1"))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
