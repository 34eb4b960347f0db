"""`dataworth index` on a mixture-of-experts model whose experts are fused 3-D tensors (transformers' Mixtral): the
index is built from the layers that can be tracked, and the command says how many weights are in no score and which."""

import contextlib
import io

import pytest
from tiny import TINY_CORPUS, make_tiny_mixtral, write_tiny_assets

from dataworth.attribution.projection import untracked_weights
from flows.cli import main

pytestmark = pytest.mark.slow


@pytest.mark.timeout(600)
def test_index_of_a_fused_moe_model_names_its_untracked_weights(harness, tmp_path):
    from transformers import AutoTokenizer

    assets = write_tiny_assets(tmp_path, TINY_CORPUS)
    tokenizer = AutoTokenizer.from_pretrained(assets / "model")
    model = make_tiny_mixtral(vocab=len(tokenizer))
    model.save_pretrained(tmp_path / "moe")
    tokenizer.save_pretrained(tmp_path / "moe")
    untracked = untracked_weights(model)
    args = ["index", "--model", str(tmp_path / "moe"), "--dataset", str(assets / "docs.jsonl"), "--id-column", "id"]
    args += [
        "--index",
        str(tmp_path / "index"),
        "--max-length",
        "16",
        "--proj-dim",
        "4",
        "--no-mlflow",
        "--no-progress",
    ]
    # Not capsys: the run's log handlers keep the stream they were given, which capsys closes after the test, and a
    # later flow test's logging then fails on it.
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(args) == 0
    out = printed.getvalue()
    line = next(s for s in out.splitlines() if s.strip().startswith("weights tracked"))
    assert f"{sum(untracked.values()):,} more" in line and "in no Linear/Conv1D layer" in line
    assert next(iter(untracked)) in line
