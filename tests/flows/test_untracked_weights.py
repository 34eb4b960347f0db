"""`dataworth index` on a mixture-of-experts model whose experts are fused 3-D tensors (transformers' Mixtral): the
index is built from the layers that can be tracked, and the command says how many weights are in no score and which."""

import pytest
from tiny import TINY_CORPUS, write_tiny_assets

from dataworth.attribution.projection import untracked_weights
from flows.cli import main

pytestmark = pytest.mark.slow


@pytest.mark.timeout(600)
def test_index_of_a_fused_moe_model_names_its_untracked_weights(harness, tmp_path, capsys):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    assets = write_tiny_assets(tmp_path, TINY_CORPUS)
    tokenizer = AutoTokenizer.from_pretrained(assets / "model")
    config = AutoConfig.for_model(
        "mixtral",
        vocab_size=len(tokenizer),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=24,
        num_local_experts=3,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    model = AutoModelForCausalLM.from_config(config)
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
    assert main(args) == 0
    out = capsys.readouterr().out
    line = next(s for s in out.splitlines() if s.strip().startswith("weights tracked"))
    assert f"{sum(untracked.values()):,} more" in line and "in no Linear/Conv1D layer" in line
    assert next(iter(untracked)) in line
