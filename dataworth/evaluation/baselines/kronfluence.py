"""Kronfluence scores on dataworth's data and losses, for side-by-side comparison.

Kronfluence (https://github.com/pomonam/kronfluence) is an optional dependency, imported
only inside these functions. Install it without its torchvision requirement (it is never
imported, and pulling it in would replace a CPU torch build):

    pip install --no-deps "kronfluence==1.0.1" einops einconv opt-einsum

Conventions (checked against kronfluence 1.0.1):

- Losses are dataworth's: the training loss of a sequence is the sum of next-token NLL
  over its tokens, the query measurement the sum of NLL over the completion tokens only.
- Sign: kronfluence backpropagates the measurement as it is (score/pairwise.py) and scores
  the preconditioned query gradient against each per-example training gradient with a
  plain inner product (module/linear.py, `compute_pairwise_score`):
  score = ∇f_q^T (G + λI)^{-1} ∇L_i, no minus sign and no 1/N. With f_q = the query loss
  that is exactly dataworth's `influence` convention (positive = training on the example
  lowers the query loss), so scores are returned as kronfluence computes them.
- Scale: with strategy="identity" the score is the plain gradient dot product g_q^T g_i,
  equal to dataworth's `dot` mode with an identity projection. For kfac/ekfac the curvature
  is kronfluence's (its activation covariance is averaged over tokens, its EKFAC
  eigenvalues over examples; by default the *true* Fisher, with labels sampled from the
  model), so values differ from dataworth's raw-Fisher `influence` by more than a constant:
  compare rankings, not magnitudes.
- Damping: `damping_factor=None` is kronfluence's heuristic, 0.1 × the mean eigenvalue per
  module (the same rule as dataworth's default); a number is kronfluence's *absolute* λ,
  not dataworth's relative factor.

Only `nn.Linear` layers can be tracked: kronfluence supports nn.Linear and nn.Conv2d, not
the transposed-weight `Conv1D` of GPT-2: scores are computed on a same-function copy whose
tracked layers are bias-free nn.Linear.
"""

from __future__ import annotations

import logging
import time
import warnings
from functools import partial

import torch
from torch import nn

from dataworth.attribution.projection import select_modules
from dataworth.config import LoggingConfig
from dataworth.data import collate
from dataworth.errors import ConfigError, DataError, ModelError, QueryError
from dataworth.losses import per_example_loss
from dataworth.queries import EncodedQuery

INSTALL_COMMAND = 'pip install --no-deps "kronfluence==1.0.1" einops einconv opt-einsum'
STRATEGIES = ("identity", "diagonal", "kfac", "ekfac")


def _require_kronfluence():
    try:
        import kronfluence  # noqa: F401
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments, ScoreArguments
        from kronfluence.task import Task
        from kronfluence.utils.dataset import DataLoaderKwargs
    except ImportError as exc:
        raise ImportError(
            f"comparing with kronfluence needs the kronfluence package ({exc}); install it with "
            f"`{INSTALL_COMMAND}` (--no-deps keeps pip from swapping your torch for a CUDA build via torchvision)"
        ) from exc
    return Analyzer, prepare_model, FactorArguments, ScoreArguments, Task, DataLoaderKwargs


class _Sequences(torch.utils.data.Dataset):
    """Token sequences with a per-token label mask (True = the token's NLL counts)."""

    def __init__(self, sequences: list[list[int]], label_masks: list[list[bool]] | None = None):
        self.sequences = sequences
        self.label_masks = label_masks

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, i: int) -> dict:
        mask = self.label_masks[i] if self.label_masks is not None else [True] * len(self.sequences[i])
        return {"input_ids": self.sequences[i], "label_mask": mask}


def _collate(items: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    input_ids, attention, labels = collate(
        [it["input_ids"] for it in items], pad_id, [it["label_mask"] for it in items]
    )
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def _make_task(task_base, tracked: list[str], seed: int):
    class DataworthLMTask(task_base):
        """Summed next-token NLL over label tokens, for training loss and measurement alike."""

        # Its own generator, so sampled-label Fisher fits repeat exactly and leave the global RNG alone.
        generator = torch.Generator(device="cpu").manual_seed(seed)

        def _loss(self, batch, model, labels):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            return per_example_loss(logits, labels, "sum").sum()

        def compute_train_loss(self, batch, model, sample: bool = False) -> torch.Tensor:
            labels = batch["labels"]
            if not sample:
                return self._loss(batch, model, labels)
            # True Fisher: labels drawn from the model's own next-token distribution at the
            # positions that carry a label, so padding stays out of the curvature.
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            with torch.no_grad():
                probs = torch.softmax(logits[:, :-1].detach().float(), dim=-1)
                flat = probs.reshape(-1, probs.shape[-1]).cpu()
                drawn = torch.multinomial(flat, 1, generator=self.generator).reshape(probs.shape[:-1]).to(labels.device)
                sampled = labels.clone()
                sampled[:, 1:] = torch.where(labels[:, 1:] != -100, drawn, labels[:, 1:])
            return per_example_loss(logits, sampled, "sum").sum()

        def compute_measurement(self, batch, model) -> torch.Tensor:
            return self._loss(batch, model, batch["labels"])

        def get_influence_tracked_modules(self) -> list[str]:
            return list(tracked)

        def get_attention_mask(self, batch) -> torch.Tensor:
            return batch["attention_mask"]

    return DataworthLMTask()


class _AddBias(nn.Module):
    def __init__(self, bias: torch.Tensor):
        super().__init__()
        self.bias = nn.Parameter(bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bias


def weight_only_twin(model: nn.Module, names: list[str]) -> tuple[nn.Module, list[str]]:
    """A copy of the model computing the same function in which each tracked layer is a bias-free
    nn.Linear followed by its bias: kronfluence wraps only nn.Linear and would otherwise add the bias
    gradient to every score, while dataworth (like LoGra) attributes through the weights only.
    GPT-2's Conv1D (y = x W + b, W of shape (in, out)) becomes nn.Linear with weight W^T."""
    import copy

    from transformers.pytorch_utils import Conv1D

    twin = copy.deepcopy(model)
    tracked = []
    for name in names:
        module = twin.get_submodule(name)
        weight = module.weight.T if isinstance(module, Conv1D) else module.weight
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
        layer: nn.Module = linear
        if module.bias is not None:
            layer = nn.Sequential(linear, _AddBias(module.bias))
        parent, _, child = name.rpartition(".")
        setattr(twin.get_submodule(parent) if parent else twin, child, layer)
        tracked.append(name if module.bias is None else f"{name}.0")
    return twin, tracked


def _tracked_modules(model: nn.Module, module_patterns: list[str] | None) -> list[str]:
    defaults = LoggingConfig()
    selected = select_modules(model, module_patterns or defaults.modules, defaults.exclude_modules)
    return list(selected)


def kronfluence_scores(
    model: nn.Module,
    train_sequences: list[list[int]],
    queries: list[EncodedQuery],
    pad_id: int,
    *,
    strategy: str = "ekfac",
    damping_factor: float | None = None,
    module_patterns: list[str] | None = None,
    output_dir: str,
    batch_size: int = 8,
    query_batch_size: int | None = None,
    use_empirical_fisher: bool = False,
    seed: int = 0,
) -> dict:
    """Kronfluence pairwise influence of every training sequence on every query.

    Returns {"scores": (n_queries, n_train) float64 array in dataworth's sign convention
    (positive = training on the example lowers the query's completion loss),
    "seconds_factors", "seconds_scores", "strategy"}. Runs on CPU in float32; the model is
    wrapped by kronfluence for the call and given back unwrapped. Factors and scores are
    written under `output_dir` (recomputed on every call, never reused from an old run).
    `batch_size` sequences go through one pass; kronfluence reads the whole training set once per
    batch of `query_batch_size` queries (default `batch_size`), so all queries in one batch is one pass.
    `use_empirical_fisher` fits the curvature on the data's own labels (dataworth's raw
    Fisher is empirical) instead of kronfluence's default of labels sampled from the model;
    `seed` fixes those samples, so repeated calls give the same scores.
    """
    Analyzer, prepare_model, FactorArguments, ScoreArguments, Task, DataLoaderKwargs = _require_kronfluence()
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy {strategy!r} is not a kronfluence strategy; choose one of {list(STRATEGIES)}")
    if not train_sequences or any(len(s) < 2 for s in train_sequences):
        raise DataError("train_sequences must be non-empty lists of at least 2 tokens (one next-token prediction)")
    if not queries:
        raise QueryError("queries is empty; give at least one EncodedQuery")
    for q in queries:
        if not q.completion_ids or not q.prompt_ids:
            raise QueryError(
                f"query {q.id!r} needs prompt and completion tokens: its loss falls on the completion only"
            )
    if batch_size < 1 or (query_batch_size is not None and query_batch_size < 1):
        raise ConfigError(f"batch sizes must be at least 1, got {batch_size} and query_batch_size={query_batch_size}")
    if damping_factor is not None and damping_factor <= 0:
        raise ConfigError(
            f"damping_factor must be positive or None (kronfluence's 0.1 × mean eigenvalue), got {damping_factor}"
        )
    param = next(model.parameters())
    if param.device.type != "cpu" or param.dtype != torch.float32:
        raise ModelError(
            f"kronfluence_scores runs on CPU in float32, but the model is {param.dtype} on {param.device}; "
            "pass model.float().cpu()"
        )
    model, tracked = weight_only_twin(model, _tracked_modules(model, module_patterns))

    train_data = _Sequences([list(s) for s in train_sequences])
    query_data = _Sequences(
        [q.input_ids for q in queries],
        [q.label_mask for q in queries],
    )
    loader_kwargs = DataLoaderKwargs(collate_fn=partial(_collate, pad_id=pad_id))
    factor_args = FactorArguments(strategy=strategy, use_empirical_fisher=use_empirical_fisher)
    score_args = ScoreArguments(damping_factor=damping_factor)

    task = _make_task(Task, tracked, seed)
    from kronfluence.utils.state import State

    # kronfluence's process state is a singleton: one made earlier for a GPU would move the model there.
    if State(cpu=True).device.type != "cpu":
        raise RuntimeError(
            "kronfluence's process state was already set up for a GPU in this process; run on CPU in a fresh process"
        )
    # kronfluence wraps layers in place: it works on the twin, so the caller's model is never touched.
    # kronfluence 1.0.1 builds torch.cuda.amp.GradScaler, deprecated (FutureWarning) even when disabled.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"kronfluence\.")
        prepared = prepare_model(model=model, task=task)
        analyzer = Analyzer(
            analysis_name="dataworth",
            model=prepared,
            task=task,
            cpu=True,
            log_level=logging.WARNING,
            disable_tqdm=True,
            output_dir=output_dir,
        )
        analyzer.set_dataloader_kwargs(loader_kwargs)
        start = time.perf_counter()
        analyzer.fit_all_factors(
            factors_name=strategy,
            dataset=train_data,
            per_device_batch_size=batch_size,
            factor_args=factor_args,
            overwrite_output_dir=True,
        )
        seconds_factors = time.perf_counter() - start
        start = time.perf_counter()
        analyzer.compute_pairwise_scores(
            scores_name=f"{strategy}_pairwise",
            factors_name=strategy,
            query_dataset=query_data,
            train_dataset=train_data,
            per_device_query_batch_size=query_batch_size or batch_size,
            per_device_train_batch_size=batch_size,
            score_args=score_args,
            overwrite_output_dir=True,
        )
        seconds_scores = time.perf_counter() - start
        result = analyzer.load_pairwise_scores(scores_name=f"{strategy}_pairwise")
    scores = result["all_modules"].detach().to(torch.float64).cpu().numpy()
    if scores.shape != (len(queries), len(train_sequences)):
        raise RuntimeError(
            f"kronfluence returned scores of shape {scores.shape}, expected {(len(queries), len(train_sequences))}"
        )
    return {
        "scores": scores,
        "seconds_factors": seconds_factors,
        "seconds_scores": seconds_scores,
        "strategy": strategy,
    }
