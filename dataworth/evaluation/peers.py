"""dataworth and its peers (kronfluence, bergson) timed on the same pairwise job: one randomly initialized
causal LM, N training sequences, Q queries, every query scored against every training sequence with a
gradient dot product. The `benchmark` flow runs them in one fresh CPU process with one torch thread
count, taking turns over a few rounds (time_pairwise_rounds). Each system first runs untimed on one batch
of training sequences and one query, so no one-time cost (lazy imports, first-call set-up) is timed.

What each system's time covers, from the model in memory to the Q × N score matrix:

- dataworth: `log_example_gradients` of the N training sequences, `query_gradients` of the Q queries
  (random Kronecker projections, no preconditioning), then the `Scorer` in `dot` mode (identity
  curvature) over the stored gradients.
- kronfluence: `fit_all_factors` (a no-op for strategy "identity": it fits nothing) and
  `compute_pairwise_scores` with all queries in one batch, so the training set is read once; its exact
  (unprojected) per-example gradients. Wrapping the model for kronfluence is not timed.
- bergson: `bergson build` of the query index, then `bergson score` of the training set against it
  (the same random projections per module, no preconditioner), including its loading of the saved
  model and data. Saving them is not timed.
"""

from __future__ import annotations

import importlib.util
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dataworth.attribution.curvature import FisherAccumulator
from dataworth.attribution.gradients import log_example_gradients, query_gradients
from dataworth.attribution.projection import describe_layout
from dataworth.attribution.scoring import Scorer
from dataworth.benchmarks.throughput import random_causal_lm, random_examples
from dataworth.config import CurvatureConfig, LoggingConfig
from dataworth.data import Example, pad_token_id
from dataworth.errors import ConfigError
from dataworth.evaluation.baselines import bergson, kronfluence
from dataworth.queries import EncodedQuery

PEERS = ("kronfluence", "bergson")
INSTALL_COMMANDS = {"kronfluence": kronfluence.INSTALL_COMMAND, "bergson": bergson.INSTALL_COMMAND}
KRONFLUENCE_STRATEGY = "identity"  # the plain gradient dot product, the score the other two compute


def missing_peer(peer: str) -> str | None:
    """Why `peer` cannot run here (not installed, with the command that installs it), or None."""
    if peer not in INSTALL_COMMANDS:
        raise ConfigError(f"unknown peer {peer!r}; choose one of {list(INSTALL_COMMANDS)}")
    if importlib.util.find_spec(peer) is None:
        return f"not installed ({INSTALL_COMMANDS[peer]})"
    return None


@dataclass(frozen=True)
class PairwiseJob:
    """The job every system runs: a random-init model of `shape` and random token sequences."""

    shape: dict  # random_causal_lm's family, layers, width, heads, vocab (kv_heads, mlp_width)
    seq_length: int
    train: int
    queries: int
    batch_size: int
    proj_dim: int
    seed: int = 0

    def __post_init__(self):
        if self.seq_length < 2 or min(self.train, self.queries, self.batch_size, self.proj_dim) < 1:
            raise ConfigError(f"a pairwise job needs seq_length ≥ 2 and positive counts, got {asdict(self)}")

    def model(self) -> torch.nn.Module:
        """The same weights in every process: initialized from `seed` on the CPU in float32."""
        return random_causal_lm(**self.shape, seq_length=self.seq_length, seed=self.seed)

    def data(self) -> tuple[list[Example], list[EncodedQuery]]:
        """N training sequences; Q queries whose loss is on their second half (prompt, then completion)."""
        examples = random_examples(self.shape["vocab"], self.train + self.queries, self.seq_length, self.seed)
        half = self.seq_length // 2
        queries = [
            EncodedQuery(f"q{i}", "", e.input_ids[:half], e.input_ids[half:], "", False)
            for i, e in enumerate(examples[self.train :])
        ]
        return examples[: self.train], queries


def _dataworth(job: PairwiseJob, model, train: list[Example], queries: list[EncodedQuery], out: str):
    cfg = LoggingConfig(
        projection="gaussian",
        proj_dim_in=job.proj_dim,
        proj_dim_out=job.proj_dim,
        precondition="none",
        batch_size=job.batch_size,
    )
    pad = pad_token_id(model.config)  # the model's config stands in for a tokenizer: only its pad id is read
    start = time.perf_counter()
    layout, _ = describe_layout(model, cfg)
    stored = torch.empty(len(train), layout.dim)
    for ids, grads in log_example_gradients(model, model.config, train, cfg):
        stored[ids] = grads  # example ids are 0..N-1
    logged = time.perf_counter()
    prepared = query_gradients(model, queries, cfg, pad, job.batch_size)
    curvature = FisherAccumulator(layout, CurvatureConfig(kind="identity")).finalize()
    scorer = Scorer(prepared, curvature, ["dot"], top_k=min(10, len(train)), full_matrix_size=len(train))
    scorer.update(torch.arange(len(train)), stored)
    scores = scorer.full["dot"]
    end = time.perf_counter()
    return {"log_train_seconds": logged - start, "queries_and_scores_seconds": end - logged}, tuple(scores.shape)


def _kronfluence(job: PairwiseJob, model, train: list[Example], queries: list[EncodedQuery], out: str):
    result = kronfluence.kronfluence_scores(
        model,
        [e.input_ids for e in train],
        queries,
        pad_token_id(model.config),
        strategy=KRONFLUENCE_STRATEGY,
        output_dir=out,
        batch_size=job.batch_size,
        query_batch_size=len(queries),
    )
    parts = {"fit_factors_seconds": result["seconds_factors"], "pairwise_scores_seconds": result["seconds_scores"]}
    return parts, result["scores"].shape


def _bergson(job: PairwiseJob, model, train: list[Example], queries: list[EncodedQuery], out: str):
    result = bergson.bergson_scores(
        model,
        [e.input_ids for e in train],
        queries,
        output_dir=out,
        projection_dim=job.proj_dim,
        batch_size=job.batch_size,
    )
    return {"build_queries_seconds": result["seconds_build"], "score_train_seconds": result["seconds_score"]}, (
        result["scores"].shape
    )


def time_pairwise(
    system: str, job: PairwiseJob, threads: int, output_dir: str | None = None, warm_up: bool = True
) -> dict:
    """Run `job` with `system` (dataworth, kronfluence or bergson) on the CPU with `threads` torch threads.

    Returns {"seconds": the timed part in all, "pairs_per_s": Q·N ÷ seconds, "parts": {its timed steps},
    "threads"}. Building the model and the data is never timed, nor (`warm_up`) a first run on one batch of
    training sequences and one query, which takes the system's one-time costs (lazy imports, first calls)."""
    runners = {"dataworth": _dataworth, "kronfluence": _kronfluence, "bergson": _bergson}
    if system not in runners:
        raise ConfigError(f"unknown system {system!r}; choose dataworth or one of {list(PEERS)}")
    torch.set_num_threads(threads)
    model = job.model()
    train, queries = job.data()
    with tempfile.TemporaryDirectory(dir=output_dir) as out:
        if warm_up:
            runners[system](job, model, train[: job.batch_size], queries[:1], str(Path(out, "warm-up")))
        parts, shape = runners[system](job, model, train, queries, str(Path(out, "job")))
    if tuple(shape) != (job.queries, job.train):
        raise RuntimeError(f"{system} scored a {tuple(shape)} matrix, expected {(job.queries, job.train)}")
    seconds = sum(parts.values())
    return {
        "seconds": seconds,
        "pairs_per_s": job.queries * job.train / seconds,
        "parts": parts,
        "threads": torch.get_num_threads(),
    }


def time_pairwise_rounds(
    systems: list[str],
    job: PairwiseJob,
    threads: int,
    rounds: int,
    output_dir: str | None = None,
    budget_s: float | None = None,
) -> dict[str, dict]:
    """Each system's best of up to `rounds` runs of `job`, the systems taking turns (each round another goes
    first); no round starts after `budget_s` seconds once two rounds are done.

    On shared cores the machine's speed drifts by several times within minutes: taking turns gives every
    system the same conditions, and the best round is the least disturbed one. Returns, per system,
    time_pairwise's figures for its best round plus "rounds_seconds" (every round), or {"error": ...} for a
    peer that failed (dataworth's failures are raised)."""
    if rounds < 1:
        raise ConfigError(f"rounds must be at least 1, got {rounds}")
    start = time.perf_counter()
    runs: dict[str, list[dict]] = {system: [] for system in systems}
    errors: dict[str, str] = {}
    for r in range(rounds):
        if r >= 2 and budget_s is not None and time.perf_counter() - start > budget_s:
            break
        turn = r % len(systems)  # a different system goes first each round: none always meets the same drift
        for system in systems[turn:] + systems[:turn]:
            if system in errors:
                continue
            try:
                runs[system].append(time_pairwise(system, job, threads, output_dir, warm_up=r == 0))
            except Exception as exc:  # noqa: BLE001 - a broken peer is reported, not fatal to the comparison
                if system == "dataworth":
                    raise
                errors[system] = f"{type(exc).__name__}: {str(exc)[:300]}"
    out = {}
    for system in systems:
        if system in errors:
            out[system] = {"error": errors[system]}
        else:
            best = min(runs[system], key=lambda run: run["seconds"])
            out[system] = {**best, "rounds_seconds": [run["seconds"] for run in runs[system]]}
    return out
