"""A tiny GPT-2 and its byte-level BPE tokenizer, trained in-process on a small corpus.

Tests and the demo need a real causal LM that has memorised known facts, without a model
hub. Training uses a plain torch loop rather than `Trainer`: it is faster to start, has no
hidden data shuffling or dataloader workers, and with a seed gives the same model on the
same machine. Dropout is off: the model should memorise, and attribution assumes the
gradient of a training example is a function of the example alone.
"""

from __future__ import annotations

import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from dataworth.data import collate, pad_token_id
from dataworth.errors import ConfigError, DataError, ModelError
from dataworth.losses import IGNORE_INDEX, mean_token_loss
from dataworth.queries import greedy_generate
from dataworth.training import OPTIMIZER_FILE, RetrainConfig, fit_sequences, lr_factor, save_staged, total_steps

EOS_TOKEN = "<|endoftext|>"
# A dedicated pad token, so masking by id never hides a real end-of-text.
PAD_TOKEN = "<|pad|>"


@dataclass
class TrainResult:
    """Where the model and tokenizer were saved, and how training went."""

    path: Path
    final_loss: float  # mean token loss over the whole corpus after training
    initial_loss: float  # the same before training
    steps: int
    seconds: float
    evals: list[tuple[int, Any]] = field(default_factory=list)  # (step, eval_fn result)
    # Intermediate checkpoints (`checkpoints`): (optimizer steps taken, folder, learning rate of the next step).
    checkpoints: list[tuple[int, Path, float]] = field(default_factory=list)
    final_lr: float = 0.0  # learning rate of the last step: the final model's TracIn weight


def train_tokenizer(
    texts: Sequence[str],
    vocab_size: int = 1024,
    out_dir: str | Path | None = None,
    model_max_length: int = 128,
) -> PreTrainedTokenizerFast:
    """Train a GPT-2 style byte-level BPE tokenizer; saved with save_pretrained when out_dir is given."""
    if not texts:
        raise DataError("texts is empty: the tokenizer needs at least one document to train on")
    specials = [EOS_TOKEN, PAD_TOKEN]
    if vocab_size < 256 + len(specials):
        raise ConfigError(f"vocab_size={vocab_size} is below the 256 byte tokens plus specials; use at least 258")
    tok = Tokenizer(models.BPE())
    # No prefix space: a prompt ending before " value" then splits exactly where training text does.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=model_max_length,
    )
    if out_dir is not None:
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def checkpoints_dir(out_dir: str | Path) -> Path:
    """Where `train_tiny_gpt2` saves the intermediate checkpoints of a model saved to out_dir: <out_dir>-checkpoints."""
    out = Path(out_dir)
    return out.parent / f"{out.name}-checkpoints"


def train_tiny_gpt2(
    texts: Sequence[str],
    out_dir: str | Path,
    *,
    tokenizer: PreTrainedTokenizerFast | None = None,
    vocab_size: int = 1024,
    n_layer: int = 2,
    n_embd: int = 128,
    n_head: int = 4,
    max_length: int = 128,
    epochs: int = 40,
    max_steps: int | None = None,
    batch_size: int = 16,
    lr: float = 3e-3,
    weight_decay: float = 0.0,
    warmup_fraction: float = 0.05,
    seed: int = 0,
    num_threads: int | None = None,
    progress: bool = True,
    eval_fn: Callable[[GPT2LMHeadModel, PreTrainedTokenizerFast], Any] | None = None,
    eval_every: int | None = None,
    checkpoints: int = 0,
) -> TrainResult:
    """Train a randomly initialised GPT-2 on `texts` (each + EOS) and save model and tokenizer to out_dir.

    Runs `max_steps` steps when given, else `epochs` passes over the shuffled documents.
    `eval_fn(model, tokenizer)` runs every `eval_every` steps (when set) and after the last
    step; its results land in `TrainResult.evals`. `num_threads` calls torch.set_num_threads,
    which holds for the whole process; 1 is steadier than the default on a busy machine.
    `checkpoints` > 0 also saves that many intermediate models (with the tokenizer) at evenly spaced steps,
    total · j / (checkpoints + 1), under `checkpoints_dir(out_dir)`/step-<s> (TracIn over checkpoints); saving
    changes neither the training nor the final model.
    """
    if not texts:
        raise DataError("texts is empty: pass the training documents")
    if n_embd % n_head:
        raise ConfigError(f"n_embd={n_embd} is not divisible by n_head={n_head}; pick n_head dividing n_embd")
    if max_steps is not None and max_steps < 1:
        raise ConfigError(f"max_steps={max_steps} must be at least 1 (or None to train for `epochs`)")
    if max_steps is None and epochs < 1:
        raise ConfigError(f"epochs={epochs} must be at least 1")
    if checkpoints < 0:
        raise ConfigError(f"checkpoints={checkpoints} must be 0 (none) or more")
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    out = Path(out_dir)
    start = time.perf_counter()
    torch.manual_seed(seed)
    order_rng = random.Random(seed)

    if tokenizer is None:
        tokenizer = train_tokenizer(texts, vocab_size=vocab_size, model_max_length=max_length)
    elif tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
        raise ModelError(
            "the tokenizer has no pad or eos token: set both (e.g. tokenizer.pad_token = tokenizer.eos_token)"
        )
    examples = _encode(texts, tokenizer, max_length)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=max_length,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = GPT2LMHeadModel(config)

    recipe = RetrainConfig(
        epochs=max(epochs, 1),
        max_steps=max_steps,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        warmup_fraction=warmup_fraction,
        seed=seed,
    )
    initial_loss = _corpus_loss(model, examples, tokenizer.pad_token_id)
    evals: list[tuple[int, Any]] = []

    total = total_steps(recipe, len(examples))
    if checkpoints >= total:
        raise ConfigError(
            f"checkpoints={checkpoints} needs more than {checkpoints} optimizer steps, but training takes {total}; "
            "ask for fewer checkpoints or train longer"
        )
    save_at = {round(total * j / (checkpoints + 1)) for j in range(1, checkpoints + 1)}
    # Beside the model's folder, not in it: the model's fingerprint (its folder's files) stays that of its weights.
    checkpoint_root = checkpoints_dir(out)
    shutil.rmtree(checkpoint_root, ignore_errors=True)  # an earlier training's are not this one's
    saved: list[tuple[int, Path, float]] = []

    def after_step(step: int, total: int) -> None:
        if eval_fn is not None and eval_every and step % eval_every == 0 and step < total:
            evals.append((step, _run_eval(eval_fn, model, tokenizer)))
        if step in save_at:
            folder = checkpoint_root / f"step-{step}"
            _save(model, tokenizer, folder)
            saved.append((step, folder, lr * lr_factor(step, total, warmup_fraction)))

    optimizer_state: dict = {}
    step = fit_sequences(
        model,
        examples,
        recipe,
        order_rng,
        tokenizer.pad_token_id,
        progress=progress,
        desc="train tiny gpt2",
        on_step=after_step,
        optimizer_state=optimizer_state,
    )
    if eval_fn is not None:
        evals.append((step, _run_eval(eval_fn, model, tokenizer)))
    final_loss = _corpus_loss(model, examples, tokenizer.pad_token_id)

    model.eval()
    _save(model, tokenizer, out, optimizer_state)
    return TrainResult(
        path=out,
        final_loss=final_loss,
        initial_loss=initial_loss,
        steps=step,
        seconds=time.perf_counter() - start,
        evals=evals,
        checkpoints=saved,
        final_lr=lr * lr_factor(step - 1, total, warmup_fraction),
    )


@torch.no_grad()
def _corpus_loss(model: GPT2LMHeadModel, examples: list[list[int]], pad_id: int, batch_size: int = 64) -> float:
    # Mean over all label tokens of the corpus: comparable before and after training,
    # unlike the last batch's loss.
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        input_ids, attention_mask, labels = collate(examples[i : i + batch_size], pad_id)
        n = int((labels[:, 1:] != IGNORE_INDEX).sum())
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        total += mean_token_loss(logits, labels).item() * n
        count += n
    model.train(was_training)
    return total / max(count, 1)


def greedy_completions(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 8) -> list[str]:
    """Greedy continuation text of each prompt (decoded new tokens, stopped at EOS)."""
    prompt_ids = [tokenizer(prompt)["input_ids"] for prompt in prompts]
    # One prompt per batch: no padding, so a prompt's continuation never depends on its neighbours.
    generated = greedy_generate(model, prompt_ids, max_new_tokens, pad_token_id(tokenizer), batch_size=1)
    outputs = []
    for new in generated:
        if tokenizer.eos_token_id in new:
            new = new[: new.index(tokenizer.eos_token_id)]
        outputs.append(tokenizer.decode(new))
    return outputs


def fact_accuracy(model, tokenizer, queries: Sequence[dict]) -> float:
    """Fraction of queries whose greedy continuation of `prompt` begins with the `completion` as a whole word."""
    if not queries:
        raise DataError("queries is empty: pass the corpus queries ({'prompt', 'completion'} dicts)")
    correct = 0
    for q in queries:
        value = q["completion"].strip()
        n_tokens = len(tokenizer(q["completion"])["input_ids"])
        generated = greedy_completions(model, tokenizer, [q["prompt"]], max_new_tokens=n_tokens + 1)[0].lstrip()
        rest = generated[len(value) :]
        correct += generated.startswith(value) and not (rest[:1].isalnum())
    return correct / len(queries)


def _encode(texts: Sequence[str], tokenizer: PreTrainedTokenizerFast, max_length: int) -> list[list[int]]:
    examples = []
    for i, text in enumerate(texts):
        ids = tokenizer(text)["input_ids"][: max_length - 1] + [tokenizer.eos_token_id]
        if len(ids) < 2:
            raise DataError(f"document {i} is empty: drop empty texts before training")
        examples.append(ids)
    return examples


def _save(model, tokenizer, out: Path, optimizer_state: dict | None = None) -> None:
    def write(folder: Path) -> None:
        model.save_pretrained(str(folder))
        tokenizer.save_pretrained(str(folder))
        if optimizer_state:  # as a Trainer checkpoint keeps it: the optimizer-state correction reads it
            torch.save(optimizer_state, folder / OPTIMIZER_FILE)

    save_staged(out, write)


def _run_eval(eval_fn, model, tokenizer):
    was_training = model.training
    model.eval()
    try:
        return eval_fn(model, tokenizer)
    finally:
        model.train(was_training)
