"""Bergson scores on dataworth's models and token sequences, for side-by-side comparison.

Bergson (https://github.com/EleutherAI/bergson) is an optional dependency, imported only inside
these functions. Install it without its torchvision requirement, which would replace a CPU torch:

    pip install --no-deps bergson jaxtyping ml_dtypes natsort simple-parsing petname torchopt peft

It runs what bergson's two commands `bergson build` and `bergson score` run (`build` and
`score_dataset`, in this process; the command classes also import bergson's optimizer tooling,
whose dependencies the install above leaves out): build an index of the query gradients, then
score every training sequence against it, its gradients computed on the fly. Bergson loads its model and data from
disk, so the model is saved (with a stand-in tokenizer: the sequences are already token ids)
and the sequences written as a dataset before the timing starts; reading them back is part of
bergson's commands and so of its time.

Conventions (checked against bergson 2.5.1):

- Losses: summed next-token cross-entropy over the labelled tokens (`loss_reduction="sum"`);
  a query's labels are its completion tokens only, like dataworth's query loss.
- Modules: every linear layer of the base model (GPT-2's `Conv1D` included), never the head:
  the same layers as dataworth's default selection.
- Score: with no preconditioner and no unit normalization, the inner product of the two
  projected gradients, per-module `projection_dim × projection_dim` random projections (LoGra's
  shape), so scores estimate dataworth's `dot` mode with other random projections.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import time
from pathlib import Path

import numpy as np
from torch import nn

from dataworth.errors import ConfigError, DataError, QueryError
from dataworth.queries import EncodedQuery

INSTALL_COMMAND = "pip install --no-deps bergson jaxtyping ml_dtypes natsort simple-parsing petname torchopt peft"


def _require_bergson():
    try:
        from bergson.build import build
        from bergson.config.config import DataConfig, IndexConfig, PreprocessConfig, ScoreConfig
        from bergson.data import load_scores
        from bergson.score.score import score_dataset
    except ImportError as exc:
        raise ImportError(
            f"comparing with bergson needs the bergson package ({exc}); install it with `{INSTALL_COMMAND}` "
            "(--no-deps keeps pip from swapping your torch for a CUDA build via torchvision)"
        ) from exc
    return build, score_dataset, DataConfig, IndexConfig, PreprocessConfig, ScoreConfig, load_scores


def _save_model(model: nn.Module, path: Path) -> None:
    """The model with a one-token stand-in tokenizer: bergson loads one, but pre-tokenized data never uses it."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    model.save_pretrained(path)
    stand_in = Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=stand_in, unk_token="<unk>").save_pretrained(path)


def _save_dataset(rows: dict[str, list], path: Path) -> None:
    from datasets import Dataset

    rows = {**rows, "length": [len(ids) for ids in rows["input_ids"]]}  # bergson batches by length
    Dataset.from_dict(rows).save_to_disk(str(path))


def bergson_scores(
    model: nn.Module,
    train_sequences: list[list[int]],
    queries: list[EncodedQuery],
    *,
    output_dir: str,
    projection_dim: int = 16,
    batch_size: int = 8,
) -> dict:
    """Bergson's pairwise scores of every query against every training sequence.

    Returns {"scores": (n_queries, n_train) float64 array, "seconds_build" (the query index),
    "seconds_score" (training gradients and scores)}. Runs on the device bergson picks (CPU
    without CUDA) in float32; each batch holds up to `batch_size` sequences. Everything is
    written under `output_dir`, rebuilt on every call. `projection_dim=0` projects nothing: exact gradients.
    """
    build, score_dataset, DataConfig, IndexConfig, PreprocessConfig, ScoreConfig, load_scores = _require_bergson()
    if not train_sequences or any(len(s) < 2 for s in train_sequences):
        raise DataError("train_sequences must be non-empty lists of at least 2 tokens (one next-token prediction)")
    if not queries or any(not q.prompt_ids or not q.completion_ids for q in queries):
        raise QueryError("give at least one query, each with prompt and completion tokens (the loss is on the latter)")
    if projection_dim < 0 or batch_size < 1:
        raise ConfigError(f"projection_dim must be ≥ 0 and batch_size ≥ 1, got {projection_dim} and {batch_size}")
    longest = max(len(s) for s in [*train_sequences, *(q.input_ids for q in queries)])
    context = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    tokens = batch_size * longest
    if context is not None and tokens > context:
        # bergson refuses a token budget per batch above the model's context length
        raise ConfigError(
            f"bergson batches at most the model's context ({context} tokens), but {batch_size} sequences of "
            f"{longest} tokens are {tokens}; lower batch_size to {max(1, context // longest)}"
        )

    root = Path(output_dir)
    for old in ("queries_index", "train_scores"):  # what bergson's --overwrite removes
        for path in (root / old, root / f"{old}.part"):
            shutil.rmtree(path, ignore_errors=True)
    labels = [[-100] * len(q.prompt_ids) + q.completion_ids for q in queries]  # -100: no loss on the prompt

    def index_config(run: str, dataset: str) -> IndexConfig:
        return IndexConfig(
            run_path=str(root / run),
            overwrite=True,
            model=str(root / "model"),
            precision="fp32",
            data=DataConfig(dataset=str(root / dataset)),
            projection_dim=projection_dim,
            projection_type="normal",  # Gaussian, as dataworth's random projections
            token_batch_size=tokens,
            max_batch_size=batch_size,
        )

    log = io.StringIO()  # bergson's prints and progress bars; shown only if it fails
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            _save_model(model, root / "model")
            _save_dataset({"input_ids": [list(s) for s in train_sequences]}, root / "train")
            _save_dataset({"input_ids": [q.input_ids for q in queries], "labels": labels}, root / "queries")
            start = time.perf_counter()
            build(index_config("queries_index", "queries"), PreprocessConfig())
            seconds_build = time.perf_counter() - start
            start = time.perf_counter()
            query_index = ScoreConfig(query_path=str(root / "queries_index"))
            score_dataset(index_config("train_scores", "train"), query_index, PreprocessConfig())
            seconds_score = time.perf_counter() - start
    except Exception as exc:
        raise RuntimeError(f"bergson failed: {exc}; its output ended with:\n{log.getvalue()[-2000:]}") from exc
    stored = load_scores(root / "train_scores")
    if not stored.is_written():
        raise RuntimeError(f"bergson left scores unwritten in {root / 'train_scores'}")
    scores = np.asarray(stored[:], dtype=np.float64).T  # [n_train, n_queries] → [n_queries, n_train]
    expected = (len(queries), len(train_sequences))
    if scores.shape != expected:
        raise RuntimeError(f"bergson returned scores of shape {scores.shape}, expected {expected}")
    return {"scores": scores, "seconds_build": seconds_build, "seconds_score": seconds_score}
