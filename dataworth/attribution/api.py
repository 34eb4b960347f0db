"""Attribution in memory, for notebooks and small corpora: one call from texts and queries to scores.

It runs the pipeline's own steps, without Prefect, LanceDB or MLflow: chunk the texts
(`chunk_documents`), fit projections to the model (KFAC whitening, optimizer-state correction)
(`fit_projections`), log a projected gradient per example (`log_example_gradients`),
fit the curvature on those gradients as stored (`fit_fisher`), encode the queries
(`encode_queries`, completing those without a completion greedily), take their gradients
(`query_gradients`) and score every mode over all examples (`Scorer`). The same model, data
and configs give the scores the `index` and `query` flows give.

    result = attribute(model, tokenizer, texts, ["The capital of Veltria is"], modes=["influence"])
    result.top("q0")  # [(Example, score), ...], best first
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dataworth.attribution.curvature import Curvature, fit_fisher
from dataworth.attribution.gradients import log_example_gradients, query_gradients
from dataworth.attribution.kfac import fit_projections
from dataworth.attribution.projection import FittedProjections, Layout, describe_layout
from dataworth.attribution.scoring import Scorer
from dataworth.config import (
    CurvatureConfig,
    DataConfig,
    GenerationConfig,
    LoggingConfig,
    QuerySpec,
    ScoreConfig,
    ScoreMode,
)
from dataworth.data import Documents, Example, chunk_documents, conversations_of, pad_token_id
from dataworth.errors import ConfigError, DataError, QueryError
from dataworth.model import DTYPES, context_length
from dataworth.queries import EncodedQuery, encode_queries

_DEFAULT_MAX_LENGTH = 256  # DataConfig's default: used when the model's config names no context length


@dataclass
class Attribution:
    """Scores of every query against every training example, per score mode.

    `scores[mode]` is (n_queries, n_examples) float64, row i for `queries[i]`, column j for
    `examples[j]`. `top_ids[mode]` / `top_scores[mode]` are (n_queries, top_k), best first,
    holding example ids (ties go to the smaller id, as in the pipeline).
    """

    queries: list[EncodedQuery]
    examples: list[Example]
    scores: dict[str, torch.Tensor]
    top_ids: dict[str, torch.Tensor]
    top_scores: dict[str, torch.Tensor]
    query_gradients: torch.Tensor  # (n_queries, layout.dim)
    layout: Layout
    curvature: Curvature
    fitted: FittedProjections | None

    @property
    def modes(self) -> list[str]:
        return list(self.scores)

    def top(self, query_id: str, mode: str | None = None, k: int | None = None) -> list[tuple[Example, float]]:
        """(example, score) pairs of one query, best first: the top-k of `mode` (the first mode by default)."""
        mode = mode or self.modes[0]
        if mode not in self.scores:
            raise QueryError(f"mode {mode!r} was not computed; computed modes are {self.modes}")
        ids = [q.id for q in self.queries]
        if query_id not in ids:
            raise QueryError(f"no query {query_id!r}; query ids are {ids[:8]}{' ...' if len(ids) > 8 else ''}")
        row = ids.index(query_id)
        by_id = {e.example_id: e for e in self.examples}
        pairs = zip(self.top_ids[mode][row].tolist(), self.top_scores[mode][row].tolist())
        return [(by_id[i], s) for i, s in list(pairs)[:k]]


def _as_examples(train, tokenizer, max_length: int) -> list[Example]:
    train = list(train)
    if not train:
        raise DataError("train is empty: pass the training texts (or dataworth.data.Example chunks) to attribute to")
    if all(isinstance(t, Example) for t in train):
        ids = [e.example_id for e in train]
        if len(set(ids)) != len(ids):
            raise DataError("the training examples repeat an example_id; ids must be unique")
        return train
    prompts = None
    if all(isinstance(t, dict) and "messages" in t for t in train):  # conversations (conversation_column)
        cfg = DataConfig(dataset="attribute", conversation_column="messages")
        ids = [str(i) for i in range(len(train))]
        docs = conversations_of(cfg, [row["messages"] for row in train], ids, [""] * len(train))
        return chunk_documents(docs, tokenizer, max_length)
    if all(isinstance(t, dict) for t in train):  # {"text", "prompt"?}: the loss on the text only (prompt_column)
        for i, row in enumerate(train):
            if not isinstance(row.get("text"), str) or not isinstance(row.get("prompt", ""), (str, type(None))):
                raise DataError(f"training example {i} must be {{'text': str, 'prompt': str?}}, got {row!r}")
        prompts = [row.get("prompt") or "" for row in train]
        train = [row["text"] for row in train]
    if not all(isinstance(t, str) for t in train):
        raise DataError(
            "train must be all texts (str), all {'text', 'prompt'?} dicts or all dataworth.data.Example chunks, "
            "not a mix"
        )
    for i, text in enumerate(train):
        if not text.strip():
            raise DataError(f"training text {i} is empty; drop it")
    docs = Documents(texts=train, ids=[str(i) for i in range(len(train))], sources=[""] * len(train), prompts=prompts)
    return chunk_documents(docs, tokenizer, max_length)


def _as_query_specs(queries) -> list[QuerySpec]:
    if isinstance(queries, (str, dict, QuerySpec)):
        queries = [queries]
    specs = []
    for i, q in enumerate(queries):
        if isinstance(q, QuerySpec):
            specs.append(q)
        elif isinstance(q, str):
            specs.append(QuerySpec(id=f"q{i}", prompt=q))
        elif isinstance(q, dict):
            fields = {k: q[k] for k in ("id", "prompt", "completion", "messages") if k in q}
            specs.append(QuerySpec(**{**fields, "id": str(fields.get("id", f"q{i}"))}))
        else:
            raise QueryError(
                f"query {i} is a {type(q).__name__}; give a prompt string, a {{'prompt', 'completion'?, 'id'?}} "
                "dict or a dataworth.config.QuerySpec"
            )
    if not specs:
        raise QueryError("queries is empty: give at least one prompt")
    return specs


def _in_memory_dtype(storage_dtype: str) -> str:
    # int8's per-row scales are a format of the index's gradients table (storage), not a torch dtype.
    if storage_dtype == "int8":
        raise ConfigError(
            "logging.storage_dtype='int8' is a format of an index's stored gradients; attribute() keeps them in memory",
            fix="use storage_dtype float32, float16 or bfloat16 here, or build an index (`dataworth index`) for int8",
        )
    return storage_dtype


def attribute(
    model,
    tokenizer,
    train: Sequence[str] | Sequence[dict] | Sequence[Example],
    queries: Sequence[str | dict | QuerySpec] | str,
    *,
    logging: LoggingConfig | None = None,
    curvature: CurvatureConfig | None = None,
    modes: Sequence[ScoreMode] = ("influence",),
    top_k: int = 10,
    max_length: int | None = None,
    generation: GenerationConfig | None = None,
    query_batch_size: int = 16,
    progress: bool = False,
    task_mix: float = 0.5,
) -> Attribution:
    """Attribute each query's completion to the training data, in memory.

    `train` is a list of texts (each tokenized and cut into chunks of `max_length` tokens,
    default the model's context), of {'text', 'prompt'?} dicts (instruction data: the prompt's tokens come
    first and carry no loss, as the index's data.prompt_column), of {'messages': [{'role', 'content'}, ...]}
    conversations (the loss on the assistant turns, as data.conversation_column) or of `dataworth.data.Example`
    chunks.
    A query is a prompt string (its completion is generated greedily), a dict with 'prompt' and optionally
    'completion' and 'id', or a QuerySpec; string and dict queries without an id are named
    q0, q1, ... by position. `logging`, `curvature`, `modes` and `top_k` mean what they mean
    in the `index` and `query` configs (their defaults when None), as does `task_mix` (trackstar's).
    Dropout is off while attributing; the model's train/eval mode is restored.
    """
    logging = logging or LoggingConfig()
    _in_memory_dtype(logging.storage_dtype)  # before any model work
    curvature = curvature or CurvatureConfig()
    generation = generation or GenerationConfig()
    score = ScoreConfig(modes=list(modes), top_k=top_k, query_batch_size=query_batch_size, task_mix=task_mix)
    max_length = max_length or context_length(model, _DEFAULT_MAX_LENGTH)
    examples = _as_examples(train, tokenizer, max_length)
    specs = _as_query_specs(queries)

    was_training = model.training
    model.eval()
    try:
        fitted = fit_projections(model, tokenizer, examples, logging, progress)
        layout, _ = describe_layout(model, logging)
        # Gradients as the index stores them (storage_dtype), and the curvature fitted on those, as fit_curvature does.
        stored = torch.empty(len(examples), layout.dim, dtype=DTYPES[_in_memory_dtype(logging.storage_dtype)])
        position = {e.example_id: j for j, e in enumerate(examples)}
        for ids, grads in log_example_gradients(model, tokenizer, examples, logging, progress, fitted):
            rows = torch.tensor([position[i] for i in ids.tolist()], dtype=torch.long)
            stored[rows] = grads.to(stored.dtype)
        fitted_curvature = fit_fisher(layout, curvature, lambda: stored.split(4096))

        limit = context_length(model, max_length)
        encoded = encode_queries(model, tokenizer, specs, generation, limit, query_batch_size)
        q_grads = query_gradients(model, encoded, logging, pad_token_id(tokenizer), query_batch_size, fitted)
    finally:
        model.train(was_training)

    # Columns are positions in `examples`; the top-k ids are mapped back to example ids below.
    scorer = Scorer(
        q_grads, fitted_curvature, score.modes, score.top_k, full_matrix_size=len(examples), task_mix=score.task_mix
    )
    scorer.update(torch.arange(len(examples)), stored)
    example_ids = torch.tensor([e.example_id for e in examples], dtype=torch.long)
    return Attribution(
        queries=encoded,
        examples=examples,
        scores=dict(scorer.full),
        top_ids={m: example_ids[t.ids] for m, t in scorer.topk.items()},
        top_scores={m: t.scores for m, t in scorer.topk.items()},
        query_gradients=q_grads,
        layout=layout,
        curvature=fitted_curvature,
        fitted=fitted,
    )
