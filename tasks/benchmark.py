"""Benchmark preparation: a generated corpus with known structure and a tiny model trained on it."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import CacheKeyFnPolicy
from pydantic import Field

from dataworth.benchmarks.presets import BENCHMARKS
from dataworth.benchmarks.tiny_model import fact_accuracy, train_tiny_gpt2
from dataworth.config import CurvatureConfig, DataConfig, IndexConfig, LoggingConfig, ModelConfig, TrackingConfig
from dataworth.training import RetrainConfig

from .common import CACHE, PERSIST, StageResult, on_compute_thread


def _generate(kind: str, corpus_kwargs: dict, seed: int):
    if kind == "facts":
        from dataworth.benchmarks.facts import generate_fact_corpus, write_fact_corpus

        return generate_fact_corpus(**corpus_kwargs, seed=seed), write_fact_corpus
    if kind == "docstrings":
        from dataworth.benchmarks.docstrings import (
            DOCSTRING_CORPUS_SIZES,
            generate_docstring_corpus,
            write_docstring_corpus,
        )

        corpus_kwargs = {**DOCSTRING_CORPUS_SIZES["small"], **corpus_kwargs}
        return generate_docstring_corpus(**corpus_kwargs, seed=seed), write_docstring_corpus
    from dataworth.benchmarks.stories import LM_CORPUS_SIZES, generate_lm_corpus, write_lm_corpus

    return generate_lm_corpus(**{**LM_CORPUS_SIZES["small"], **corpus_kwargs}, seed=seed), write_lm_corpus


class PreparedBenchmark(StageResult):
    """A generated corpus and queries written as JSONL, and the tiny GPT-2 trained on the documents."""

    kind: str = Field(
        description="Benchmark family: facts (known relevant documents), lm (generated stories) or docstrings "
        "(real text)."
    )
    model_dir: str = Field(description="Directory of the trained model and tokenizer.")
    documents: str = Field(description="JSONL of the training documents.")
    queries: str = Field(description="JSONL of the queries.")
    train_kwargs: dict[str, Any] = Field(description="The model's training recipe (seed, epochs, ...).")
    train_seconds: float = Field(description="Training wall time.")
    train_steps: int = Field(description="Optimizer steps of the training.")
    train_final_loss: float = Field(description="Training loss at the last step.")
    num_documents: int = Field(description="Documents in the corpus.")
    fact_accuracy: float | None = Field(None, description="Share of fact queries the model completes right.")
    relevant: dict[str, list[str]] | None = Field(None, description="Query id -> documents stating its fact.")
    expected: dict[str, str] | None = Field(None, description="Query id -> the fact's value (its completion).")
    checkpoints: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Intermediate checkpoints of the training (`checkpoints`): {step, path, lr}, lr the learning rate "
        "of the step after it (TracIn's weight).",
    )
    final_lr: float | None = Field(None, description="Learning rate of the last step: the final model's TracIn weight.")

    def metrics(self) -> dict[str, float]:
        out = {"train_seconds": self.train_seconds, "train_final_loss": self.train_final_loss}
        if self.fact_accuracy is not None:
            out["fact_accuracy"] = self.fact_accuracy
        return out

    def recipe(self) -> RetrainConfig:
        """The benchmark model's own training recipe, for retraining it on subsets."""
        return RetrainConfig(**{k: v for k, v in self.train_kwargs.items() if k in RetrainConfig.model_fields})

    def index_config(
        self,
        logging: LoggingConfig,
        curvature: CurvatureConfig,
        index_uri: str,
        tracking: TrackingConfig,
        model_dir: str | None = None,
    ) -> IndexConfig:
        """The index config of this benchmark (its documents fit the model's 128-token context), of the trained
        model or of `model_dir` (one of its checkpoints)."""
        return IndexConfig(
            model=ModelConfig(name_or_path=model_dir or self.model_dir),
            data=DataConfig(dataset=self.documents, id_column="id", source_column="source", max_length=128),
            logging=logging,
            curvature=curvature,
            index_uri=index_uri,
            overwrite=True,
            tracking=tracking,
        )


def _interpreter_key(_context, _parameters) -> str:
    """The running Python's version: docstrings-small's corpus is read from its standard library."""
    return f"python-{platform.python_version()}"


# A prepared benchmark is reused only by the same interpreter (another Python: another docstrings corpus).
INTERPRETER = CacheKeyFnPolicy(cache_key_fn=_interpreter_key)


@task(name="prepare_benchmark", cache_policy=CACHE - "progress" + INTERPRETER, **PERSIST)
@on_compute_thread
def prepare_benchmark(
    workspace: str, benchmark: str, seed: int, train_epochs: int | None, progress: bool = True, checkpoints: int = 0
) -> PreparedBenchmark:
    """Write the generated corpus and queries as JSONL and train a tiny GPT-2 on the documents (saving
    `checkpoints` intermediate models along the way, evenly spaced)."""
    log = get_run_logger()
    preset = BENCHMARKS[benchmark]
    ws = Path(workspace).absolute()
    corpus, write = _generate(preset["kind"], preset["corpus"], seed)
    paths = write(corpus, ws / "corpus")
    train_kwargs = {"seed": seed, **preset.get("train", {}), **({"epochs": train_epochs} if train_epochs else {})}
    start = time.perf_counter()
    result = train_tiny_gpt2(
        [d["text"] for d in corpus.documents], ws / "model", progress=progress, checkpoints=checkpoints, **train_kwargs
    )
    seconds = time.perf_counter() - start
    facts = {}
    if preset["kind"] == "facts":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(result.path).eval()
        tokenizer = AutoTokenizer.from_pretrained(result.path)
        facts = {
            "fact_accuracy": fact_accuracy(model, tokenizer, corpus.queries),
            "relevant": {q["id"]: q["relevant_document_ids"] for q in corpus.queries},
            "expected": {q["id"]: q["completion"] for q in corpus.queries},
        }
    Path(result.path, "dataworth_recipe.json").write_text(json.dumps(train_kwargs, indent=2))
    log.info("benchmark %s: %d documents, model trained in %.0f s", benchmark, len(corpus.documents), seconds)
    return PreparedBenchmark(
        kind=preset["kind"],
        model_dir=str(result.path),
        documents=str(paths["documents"]),
        queries=str(paths["queries"]),
        train_kwargs=train_kwargs,
        train_seconds=seconds,
        train_steps=result.steps,
        train_final_loss=result.final_loss,
        num_documents=len(corpus.documents),
        checkpoints=[{"step": step, "path": str(path), "lr": lr} for step, path, lr in result.checkpoints],
        final_lr=result.final_lr,
        **facts,
    )
