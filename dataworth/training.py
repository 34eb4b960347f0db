"""Training a causal LM on token ids: the loop of every model dataworth trains.

Retraining on a subset of the training data is the ground truth attribution scores are
judged against (LDS compares scores with what retraining on random subsets does), and the
demo and benchmark models are trained by the same loop.

Training takes token ids (the index's examples exactly), never text, so the retrained
model sees the very sequences that were attributed. `fit_sequences` is also the loop that
trained the demo model (tiny_model.py), so retraining the demo model on its full data with
the default config rebuilds it.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator
from tqdm.auto import tqdm

from dataworth.config import StageConfig
from dataworth.data import collate, pad_token_id
from dataworth.errors import DataError, ModelError
from dataworth.losses import mean_token_loss
from dataworth.model import DTYPES, context_length, resolve_device

# Everything save_pretrained of a tokenizer may write; copied so the retrained model loads as
# a drop-in replacement of the reference (same ids, same specials).
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
)


class RetrainConfig(StageConfig):
    init: Literal["scratch", "finetune"] = Field(
        "scratch",
        description="scratch: fresh random weights from the reference model's config (what LDS on a small model "
        "wants); finetune: start from the weights of base_model.",
    )
    base_model: str | None = Field(
        None, description="Model name or save_pretrained directory to fine-tune from; required for init='finetune'."
    )
    epochs: int = Field(40, ge=1, description="Passes over the shuffled sequences (ignored when max_steps is set).")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps to run instead of `epochs` passes.")
    batch_size: int = Field(16, ge=1, description="Sequences per optimizer step.")
    lr: float = Field(3e-3, gt=0, description="Peak AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup_fraction: float = Field(
        0.05, ge=0, lt=1, description="Fraction of the steps with linear warm-up; cosine decay to 10% of lr follows."
    )
    max_grad_norm: float | None = Field(
        1.0, gt=0, description="Clip the global gradient norm to this; None: no clipping."
    )
    seed: int = Field(0, description="Seed of the initialization (scratch), dropout and the data order.")
    dtype: Literal["float32", "float64"] = Field("float32", description="Dtype the model is trained in.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when available, else CPU.")

    @model_validator(mode="after")
    def _base_model_matches_init(self) -> "RetrainConfig":
        if self.init == "finetune" and not self.base_model:
            raise ValueError("init='finetune' needs base_model (a model name or directory); or use init='scratch'")
        if self.init == "scratch" and self.base_model:
            raise ValueError(
                f"base_model={self.base_model!r} is only used with init='finetune'; "
                "set init='finetune' or drop base_model"
            )
        return self


# What a transformers Trainer checkpoint calls the optimizer's state; the models dataworth trains save theirs
# under the same name (the optimizer-state correction and the optimizer-consistent tail-patch read it).
OPTIMIZER_FILE = "optimizer.pt"


def check_sequences(sequences: list[list[int]], vocab_size: int, context: int | None, what: str) -> None:
    """Refuse empty sequences, sequences longer than the context and token ids outside the vocabulary."""
    for i, seq in enumerate(sequences):
        if len(seq) == 0:
            raise DataError(f"{what} {i} is empty; drop it (every sequence needs at least one token)")
        if context is not None and len(seq) > context:
            raise DataError(f"{what} {i} has {len(seq)} tokens, more than the model's context of {context}; cut it")
        lo, hi = min(seq), max(seq)
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            raise DataError(
                f"{what} {i} holds token id {bad}, outside the model's vocabulary of {vocab_size}; "
                "use the tokenizer the reference model was trained with"
            )


def _build_model(reference_model_dir: str, cfg: RetrainConfig):
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = DTYPES[cfg.dtype]
    if cfg.init == "finetune":
        try:
            return AutoModelForCausalLM.from_pretrained(cfg.base_model, dtype=dtype)
        except OSError as err:
            raise ModelError(
                f"cannot load base_model {cfg.base_model!r}: {err}. "
                "Give a save_pretrained directory or a reachable hub name"
            ) from err
    try:
        config = AutoConfig.from_pretrained(reference_model_dir)
    except OSError as err:
        raise ModelError(
            f"cannot read the config of reference model {reference_model_dir!r}: {err}. "
            "Give the save_pretrained directory (or hub name) of the model being attributed"
        ) from err
    # Seeded right before construction so the initialization depends on the seed alone, as in tiny_model.
    torch.manual_seed(cfg.seed)
    return AutoModelForCausalLM.from_config(config, dtype=dtype)


def train_causal_lm(
    reference_model_dir: str,
    sequences: list[list[int]],
    cfg: RetrainConfig,
    out_dir: str | None = None,
    progress: bool = False,
):
    """Train a causal LM on token-id `sequences` (next-token loss, mean over the batch's tokens).

    The architecture comes from `reference_model_dir` (fresh weights for init='scratch', or
    `cfg.base_model`'s weights for 'finetune'). The same seed gives the same weights on the
    same machine. Returns the model in eval mode; with `out_dir`, it is also saved there
    (save_pretrained, the reference's tokenizer files and retrain_config.json).
    """
    if not sequences:
        raise DataError("sequences is empty: pass the token ids of the training examples to retrain on")
    device = resolve_device(cfg.device)
    model = _build_model(reference_model_dir, cfg)
    check_sequences(sequences, model.config.vocab_size, context_length(model.config), "sequence")
    model.to(device)
    # Seeded again after loading so finetune runs are reproducible too (dropout draws); for
    # scratch it continues the stream of the initialization, exactly as tiny_model does.
    if cfg.init == "finetune":
        torch.manual_seed(cfg.seed)
    fit_sequences(model, sequences, cfg, random.Random(cfg.seed), pad_token_id(model.config), progress=progress)
    model.eval()
    if out_dir is not None:
        _save(model, reference_model_dir, cfg, Path(out_dir))
    return model


def total_steps(cfg: RetrainConfig, n_sequences: int) -> int:
    """Optimizer steps `fit_sequences` takes over n_sequences: max_steps, else epochs × batches per epoch."""
    return cfg.max_steps if cfg.max_steps is not None else cfg.epochs * math.ceil(n_sequences / cfg.batch_size)


def lr_factor(step: int, total: int, warmup_fraction: float) -> float:
    """The learning rate of optimizer step `step` (0-based) as a share of the peak: linear warm-up over
    max(1, warmup_fraction · total) steps, then cosine decay to 10%."""
    warmup = max(1, int(warmup_fraction * total))
    if step < warmup:
        return (step + 1) / warmup
    done = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * done))


def fit_sequences(
    model,
    sequences: list[list[int]],
    cfg: RetrainConfig,
    order_rng: random.Random,
    pad_id: int,
    progress: bool = False,
    desc: str = "retrain",
    on_step: Callable[[int, int], None] | None = None,
    optimizer_state: dict | None = None,
) -> int:
    """The training loop of every model dataworth trains: the demo model and the retrained ones.

    AdamW (betas 0.9, 0.98), linear warm-up then cosine decay to 10% of lr, optional gradient
    clipping, a shuffle of `sequences` per epoch drawn from `order_rng`; mean token loss per batch.
    `on_step(step, total)` runs after every optimizer step. Returns the steps taken; with `optimizer_state` (a
    dict), it is filled with the optimizer's final `state_dict()`, whose groups name their parameters
    (`param_names`), for the optimizer-state correction and the optimizer-consistent tail-patch step.
    """
    device = next(model.parameters()).device
    total = total_steps(cfg, len(sequences))

    def schedule(step: int) -> float:
        return lr_factor(step, total, cfg.warmup_fraction)

    optimizer = torch.optim.AdamW(model.named_parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    bar = tqdm(total=total, desc=desc, unit="step", disable=not progress)
    model.train()
    step = 0
    while step < total:
        order = list(range(len(sequences)))
        order_rng.shuffle(order)
        for i in range(0, len(order), cfg.batch_size):
            if step >= total:
                break
            input_ids, attention, labels = collate([sequences[j] for j in order[i : i + cfg.batch_size]], pad_id)
            logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits
            loss = mean_token_loss(logits, labels.to(device))
            loss.backward()
            if cfg.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            if progress:
                bar.set_postfix(loss=f"{loss.item():.3f}")
            if on_step is not None:
                on_step(step, total)
    bar.close()
    if optimizer_state is not None:
        optimizer_state.update(optimizer.state_dict())
    return step


def save_staged(out: Path, write: Callable[[Path], None]) -> None:
    """Run `write(folder)` into a staging folder beside `out`, then move its files into `out`,
    so a crash mid-save never leaves a directory that loads half a model."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write(staging)
        if not out.exists():
            staging.rename(out)
            return
        for item in staging.iterdir():
            os.replace(item, out / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _save(model, reference_model_dir: str, cfg: RetrainConfig, out: Path) -> None:
    def write(folder: Path) -> None:
        model.save_pretrained(str(folder))
        ref = Path(reference_model_dir)
        if ref.is_dir():
            for name in _TOKENIZER_FILES:
                if (ref / name).is_file():
                    shutil.copy2(ref / name, folder / name)
        (folder / "retrain_config.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=2, sort_keys=True))

    save_staged(out, write)
