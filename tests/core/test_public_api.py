"""The curated public API of `import dataworth`: every listed name resolves, and importing stays cheap."""

import subprocess
import sys

import dataworth


def test_every_public_name_resolves():
    missing = [name for name in dataworth.__all__ if not hasattr(dataworth, name)]
    assert missing == []
    assert set(dataworth.__all__) <= set(dir(dataworth))


def test_public_names_are_the_defining_objects():
    from dataworth.attribution.api import attribute
    from dataworth.attribution.scoring import Scorer
    from dataworth.errors import ConfigError

    assert dataworth.attribute is attribute and dataworth.Scorer is Scorer and dataworth.ConfigError is ConfigError


def test_import_loads_names_lazily():
    code = "import sys, dataworth; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_unknown_name_is_an_attribute_error():
    import pytest

    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        dataworth.nothing_here  # noqa: B018
