"""Loading a causal LM and its tokenizer by hub name or local path, on the right device."""

from __future__ import annotations

import os

import torch

from dataworth.config import ModelConfig

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(cfg: ModelConfig) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("model.device is 'cuda' but CUDA is not available here; use device='auto' or 'cpu'")
    if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda")


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    name = cfg.tokenizer or cfg.name_or_path
    try:
        tok = AutoTokenizer.from_pretrained(name, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except OSError as err:
        raise ValueError(
            f"cannot load tokenizer {name!r}: {err}. Give a local directory or a reachable hub name"
        ) from err
    return tok


def load_model(cfg: ModelConfig):
    """(model in eval mode on its device, tokenizer). Dropout is off: gradients must be deterministic."""
    from transformers import AutoModelForCausalLM

    if os.path.sep in cfg.name_or_path and not os.path.exists(cfg.name_or_path):
        raise ValueError(f"model path {cfg.name_or_path!r} does not exist")
    device = resolve_device(cfg)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.allow_tf32
        torch.backends.cudnn.allow_tf32 = cfg.allow_tf32
    try:
        model = AutoModelForCausalLM.from_pretrained(
            cfg.name_or_path, revision=cfg.revision, dtype=_DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code
        )
    except OSError as err:
        raise ValueError(
            f"cannot load model {cfg.name_or_path!r}: {err}. "
            "Give a local save_pretrained directory or a reachable hub name"
        ) from err
    model.to(device).eval()
    return model, load_tokenizer(cfg)


def context_length(model, fallback: int) -> int:
    """Longest sequence the model accepts (from its config), else `fallback`."""
    cfg = getattr(model, "config", None)
    for attr in ("n_positions", "max_position_embeddings", "max_sequence_length", "seq_length"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return fallback
