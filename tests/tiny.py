"""Tiny randomly initialized causal LMs (fp64 by default) for exactness tests, and a tiny corpus
with its model on disk for the task and flow tests."""

import json
from pathlib import Path

import torch


def make_tiny_gpt2(dtype=torch.float64, vocab=61, seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=vocab,
        n_positions=64,
        n_embd=16,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(cfg).to(dtype).eval()


def make_tiny_llama(dtype=torch.float64, vocab=61, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).to(dtype).eval()


def make_tiny_mixtral(dtype=torch.float32, vocab=61, seed=0):
    """A tiny Mixtral, whose experts are fused 3-D tensors and whose router is a bare weight (transformers 5):
    weights no Linear layer holds."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(
        "mixtral",
        vocab_size=vocab,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=24,
        num_local_experts=3,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    return AutoModelForCausalLM.from_config(cfg).to(dtype).eval()


# A small corpus of the task and flow tests; the last document is longer than 16 tokens, so it is chunked.
TINY_CORPUS = [
    "The river Ambel runs past the old mill.",
    "Tova keeps three grey cats and a lantern.",
    "Bread is baked before dawn in Harrow.",
    "The lantern maker sells lanterns at the market.",
    "Cats sleep near the mill when it rains.",
    "Harrow has a bell tower and a quiet square.",
    "Mill workers eat bread with honey.",
    "The square fills with music every spring " * 6,  # longer than max_length: chunked
]


# Two queries of TINY_CORPUS: one with its completion, one the model completes.
TINY_QUERIES = [
    {"id": "cats", "prompt": "Tova keeps three", "completion": " grey cats"},
    {"id": "gen", "prompt": "Bread is baked"},
]


def write_tiny_queries(path: Path) -> Path:
    """TINY_QUERIES as a queries JSONL file at `path`."""
    path.write_text("".join(json.dumps(q) + "\n" for q in TINY_QUERIES))
    return path


def write_tiny_assets(root: Path, texts: list[str]) -> Path:
    """A BPE tokenizer and a float32 tiny GPT-2 saved under root/model, the texts as root/docs.jsonl."""
    from dataworth.benchmarks.tiny_model import train_tokenizer

    tok = train_tokenizer(texts * 4, vocab_size=300)
    make_tiny_gpt2(dtype=torch.float32, vocab=len(tok)).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    (root / "docs.jsonl").write_text(
        "".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(texts))
    )
    return root


def tiny_index_config(assets: Path, out: Path, **logging):
    """An IndexConfig over write_tiny_assets' model and corpus: 16-token examples, 4×4 projections, shards of 4."""
    from dataworth.config import CurvatureConfig, DataConfig, IndexConfig, LoggingConfig, ModelConfig, TrackingConfig

    return IndexConfig(
        model=ModelConfig(name_or_path=str(assets / "model")),
        data=DataConfig(dataset=str(assets / "docs.jsonl"), id_column="id", max_length=16),
        logging=LoggingConfig(
            projection="gaussian", proj_dim_in=4, proj_dim_out=4, batch_size=3, shard_size=4, **logging
        ),
        curvature=CurvatureConfig(kind="raw"),
        index_uri=str(out / "index"),
        tracking=TrackingConfig(tracking_uri=f"sqlite:///{out / 'mlflow.db'}", experiment="test"),
    )
