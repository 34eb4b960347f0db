"""Loading a causal LM and its tokenizer by hub name or local path, on the right device; and the
device, dtype and context length every part of dataworth reads the same way."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from dataworth.config import DemoConfig, ModelConfig
from dataworth.errors import ConfigError, ModelError

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Config attributes that hold the longest sequence a model accepts, by architecture family.
_CONTEXT_ATTRS = ("n_positions", "max_position_embeddings", "max_sequence_length", "seq_length")


def resolve_device(name: str, setting: str = "device") -> torch.device:
    """The torch device for a device setting: 'auto' (CUDA when available, else CPU), 'cpu' or 'cuda'.

    `setting` names the option in the error, e.g. 'model.device'.
    """
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{setting} is 'cuda' but CUDA is not available here; use device='auto' or 'cpu'")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda")


def context_length(model_or_config, fallback: int | None = None) -> int | None:
    """Longest sequence the model accepts, read from a model's config or a config itself; else `fallback`."""
    cfg = getattr(model_or_config, "config", model_or_config)
    for attr in _CONTEXT_ATTRS:
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return fallback


def looks_local(name: str) -> bool:
    """True for a model reference that can only be a local path (a hub name is `name` or `owner/name`)."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.path.sep != "/" and os.path.sep in name


def check_model_source(name: str, what: str = "model") -> None:
    """Fail before any work on a local model or tokenizer path that does not exist (the hub library would report
    it as a malformed repository id)."""
    if looks_local(name) and not os.path.exists(os.path.expanduser(name)):
        fix = "give the directory a model was saved to with save_pretrained, or a hub name such as 'gpt2'"
        demo = Path(DemoConfig.model_fields["workspace"].default)
        if Path(name).parts[: len(demo.parts)] == demo.parts:  # the shipped deployments' default paths
            fix = f"run `dataworth demo` first (it trains the model the shipped deployments use, in {demo}), or {fix}"
        raise ModelError(f"{what} path {name!r} does not exist", fix=fix)


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    name = cfg.tokenizer or cfg.name_or_path
    check_model_source(name, "tokenizer" if cfg.tokenizer else "model")
    try:
        tok = AutoTokenizer.from_pretrained(name, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as err:  # ValueError: the hub library's malformed repository id
        raise ModelError(
            f"cannot load tokenizer {name!r}: {err}. Give a local directory or a reachable hub name"
        ) from err
    return tok


def load_model(cfg: ModelConfig):
    """(model in eval mode on its device, tokenizer). Dropout is off: gradients must be deterministic."""
    from transformers import AutoModelForCausalLM

    check_model_source(cfg.name_or_path)
    device = resolve_device(cfg.device, "model.device")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.allow_tf32
        torch.backends.cudnn.allow_tf32 = cfg.allow_tf32
    try:
        model = AutoModelForCausalLM.from_pretrained(
            cfg.name_or_path, revision=cfg.revision, dtype=DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError) as err:  # ValueError: the hub library's malformed repository id
        raise ModelError(
            f"cannot load model {cfg.name_or_path!r}: {err}. "
            "Give a local save_pretrained directory or a reachable hub name"
        ) from err
    model.to(device).eval()
    return model, load_tokenizer(cfg)
