"""Stage configs. They are the flow parameters, so the Prefect UI renders them as forms.

Every model forbids unknown keys so a typo in a YAML file is an error, not a silent default.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

GradientMode = Literal["dot", "influence", "relatif", "cosine", "trackstar"]
# The gradient modes: one streaming pass over the stored gradients computes all of them (the Scorer).
ALL_SCORE_MODES: tuple[GradientMode, ...] = ("dot", "influence", "relatif", "cosine", "trackstar")
# Those a query computes unless told: trackstar's curvature is fitted on each query set, so it is asked for by name.
DEFAULT_SCORE_MODES: tuple[GradientMode, ...] = ("dot", "influence", "relatif", "cosine")
# BM25 through the full-text index of the examples table (storage), and the two fusions of BM25 with a gradient
# mode: reciprocal-rank fusion of both rankings, and BM25's candidates reranked by their exact gradient scores.
# hybrid-ann-<mode>: the candidates of LanceDB's vector index on the stored gradients (IndexConfig.ann), reranked.
LEXICAL_MODES = ("bm25",)
HYBRID_KINDS = ("rrf", "rerank", "linear", "ann")
HYBRID_MODES = tuple(f"hybrid-{kind}-{mode}" for kind in HYBRID_KINDS for mode in ALL_SCORE_MODES)
# The hybrid modes that need a vector index (built by `dataworth index --ann.build`), not the full-text one.
ANN_MODES = tuple(m for m in HYBRID_MODES if m.startswith("hybrid-ann-"))
# Searched IVF partitions per query unless told (ScoreConfig.ann_nprobes).
ANN_NPROBES = 8
# LanceDB's vector indexes the hybrid-ann-* modes can search (metric dot), the first the default. Measured at 1M rows
# x 1024 dims of clustered synthetic vectors (README, "ANN candidates"): IVF_RQ at 4 bits reaches recall@10 0.98
# after the exact rerank of 100 candidates; IVF_SQ as much, at 3x its search time; IVF_PQ with dot found 0.02-0.04.
VECTOR_INDEX_TYPES = ("IVF_RQ", "IVF_SQ", "IVF_PQ", "IVF_HNSW_SQ")
VectorIndexType = Literal[VECTOR_INDEX_TYPES]
# Bits per dimension of an IVF_RQ index's RaBitQ codes unless told (AnnConfig.rq_bits).
RQ_BITS = 4
# Storage dtypes LanceDB's vector index reads (bfloat16's uint16 bits and int8 codes with their scales are not).
ANN_DTYPES = ("float32", "float16")
ALL_MODES = (*ALL_SCORE_MODES, *LEXICAL_MODES, *HYBRID_MODES)
ScoreMode = Literal[ALL_MODES]


class StageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    def fingerprint(self) -> str:
        """Stable short hash of the resolved config (used to refuse silent config changes)."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


class ModelConfig(StageConfig):
    name_or_path: str = Field(description="Hugging Face model name or local directory (save_pretrained).")
    tokenizer: str | None = Field(None, description="Tokenizer name or path; defaults to the model's.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    dtype: Literal["float32", "float64", "bfloat16", "float16"] = Field(
        "float32",
        description="Dtype the model is loaded in; gradients are projected in float32 (float64 if the model is).",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when available, else CPU.")
    allow_tf32: bool = Field(False, description="Allow TF32 matmuls on Ampere+ GPUs (faster, ~1e-3 relative error).")
    trust_remote_code: bool = Field(False, description="Passed to from_pretrained for custom architectures.")


class DataConfig(StageConfig):
    dataset: str = Field(
        description="Hugging Face dataset name, a saved dataset directory, "
        "or jsonl/json/parquet/csv/txt files (glob allowed)."
    )
    split: str = Field("train", description="Split to read.")
    subset: str | None = Field(None, description="Dataset configuration name on the hub.")
    text_column: str = Field("text", description="Column holding the document text.")
    id_column: str | None = Field(None, description="Column with a document id; row numbers when unset.")
    source_column: str | None = Field(None, description="Optional column copied into the examples table as `source`.")
    prompt_column: str | None = Field(
        None,
        description="Column holding a prompt that comes before each document's text (instruction data: prompt, "
        "response): the example is the prompt's tokens then the text's, and the loss, so the logged gradient, falls "
        "on the text's tokens only, as in fine-tuning on responses. Unset: the loss covers every token.",
        exclude_if=lambda v: v is None,
    )
    conversation_column: str | None = Field(
        None,
        description="Column holding each row as a conversation, a list of {role, content} messages (chat format), "
        "instead of text_column: rendered with the tokenizer's chat template, the loss (so the logged gradient) on "
        "the assistant's turns only, as supervised fine-tuning takes it. Needs a tokenizer with a chat template.",
        exclude_if=lambda v: v is None,
    )
    max_length: int = Field(256, ge=2, description="Tokens per example; longer documents are split into chunks.")
    max_documents: int | None = Field(None, ge=1, description="Read at most this many documents (for trials).")
    skip_empty: bool = Field(False, description="Drop empty documents instead of raising an error.")
    add_eos: bool = Field(True, description="Append the tokenizer's EOS token to every document before chunking.")

    @model_validator(mode="after")
    def _one_kind_of_row(self):
        if self.prompt_column is not None and self.conversation_column is not None:
            raise ValueError(
                "prompt_column and conversation_column are two ways of giving a row's prompt; set one of them "
                "(a conversation's user turns are its prompts)"
            )
        return self


class LoggingConfig(StageConfig):
    modules: list[str] = Field(
        default_factory=lambda: ["*"],
        description="fnmatch patterns over module names (model.named_modules()) "
        "selecting the Linear/Conv1D layers to track.",
    )
    exclude_modules: list[str] = Field(
        default_factory=lambda: ["lm_head", "*.lm_head", "embed_out"],
        description="fnmatch patterns removed from the selection (the vocabulary head by default).",
    )
    # orthogonal by default: at LoGra's sizes (k a sizable share of d: 64 of 128-512 on the benchmarks' models) its
    # inner products spread less than a Gaussian's (README, "Orthogonal projections"); at k << d the two agree.
    projection: Literal["gaussian", "orthogonal", "rademacher", "identity", "rapidgrad"] = Field(
        "orthogonal",
        description="Kronecker projection: random (seeded from the module name: gaussian, orthogonal — Haar-random "
        "orthonormal rows scaled by sqrt(d/k), which keep inner products with less spread than gaussian and exactly "
        "when k = d — or rademacher) or identity (exact gradients); rapidgrad: RapidIn's compression of each "
        "layer's whole gradient instead (see rapidgrad_dim).",
    )
    # Left out of dumps at its default, so existing configs' fingerprints hold.
    basis: Literal["random", "pca"] = Field(
        "random",
        description="Rows of each side's projection after the KFAC whitening (precondition='kfac'): random (drawn "
        "from `projection`'s kind) or pca: the top proj_dim eigenvectors of the side's KFAC factor (LoGra's PCA "
        "initialization), so a side keeps the directions its inputs (or output gradients) span most, each "
        "whitened by its eigenvalue.",
        exclude_if=lambda v: v == "random",
    )
    # 64 x 64 (LogIX's LoGra rank): on facts-partial, KFAC-whitened with ekfac curvature, it keeps 0.99 of the exact
    # gradients' SGD tail-patch and 0.95 of exact KFAC influence's recall@10, where 16 x 16 kept 0.90 and 0.74
    # (README, "Which mode answers which question").
    proj_dim_in: int = Field(64, ge=1, description="Rows of P_in (projected input-activation size) per module.")
    proj_dim_out: int = Field(64, ge=1, description="Rows of P_out (projected output-gradient size) per module.")
    # The two rapidgrad fields are left out of dumps at their defaults, so existing configs' fingerprints hold.
    rapidgrad_dim: int | None = Field(
        None,
        ge=1,
        description="projection='rapidgrad': K, the size each layer's per-example gradient G (d_out × d_in) is "
        "folded to after its fixed random permutation and signs (dataworth.attribution.rapidgrad); compression "
        "d_out·d_in / K per layer, K capped at d_out·d_in. None: LoGra's block size of the layer, "
        "min(proj_dim_out, d_out) × min(proj_dim_in, d_in), so both store the same bytes. Needs precondition='none'.",
        exclude_if=lambda v: v is None,
    )
    rapidgrad_normalize: bool = Field(
        True,
        description="projection='rapidgrad': divide each layer's G by its norm before folding (RapidIn's layer-wise "
        "normalization), so a dot product of stored gradients is about a sum of per-layer cosines: loss scale and "
        "gradient norm drop out of every score. False: fold G as it is (inner products approximate the raw ones).",
        exclude_if=lambda v: v is True,
    )
    seed: int = Field(0, description="Seed mixed with each module name to draw its projections.")
    precondition: Literal["none", "kfac"] = Field(
        "kfac",
        description="kfac: whiten each side with its KFAC factor, (E[x xᵀ] + λ)^-1/2 and (E[dy dyᵀ] + λ)^-1/2, "
        "before the random projection, so inner products of stored gradients approximate KFAC influence "
        "(fitted once per index on a sample of the corpus and stored with it); none: random projection only.",
    )
    precondition_damping: float = Field(
        1e-3, gt=0, description="λ of each KFAC factor, relative to the factor's mean eigenvalue."
    )
    precondition_examples: int = Field(
        1024, ge=1, description="Examples (spread evenly over the corpus) whose tokens fit the KFAC factors."
    )
    cholesky_from_dim: int = Field(
        2048,
        ge=1,
        description="KFAC factors at least this wide are whitened by the inverse of their damped Cholesky factor, "
        "L⁻¹ with L Lᵀ = M + λI, instead of the symmetric (M + λI)^-½: the same inner products (both W have "
        "WᵀW = (M + λI)⁻¹, and random rows R W are alike for either), from a factorization about ten times faster "
        "than the eigendecomposition at 4096 wide. Narrower factors keep the eigendecomposition.",
        exclude_if=lambda v: v == 2048,
    )
    max_factor_dim: int = Field(
        8192,
        ge=1,
        description="Widest layer side (input or output) whose KFAC factor is fitted exactly, a d×d float64 "
        "matrix; wider sides follow wide_layers.",
    )
    # The two fields below are left out of dumps at their defaults: the configs of indexes published before
    # them (their manifests, fingerprints, cache keys, score run ids) read back unchanged, and those indexes
    # had no wider side, where the defaults do exactly what was done then.
    wide_layers: Literal["project_then_whiten", "refuse"] = Field(
        "project_then_whiten",
        description="precondition='kfac' on a layer side of width d > max_factor_dim. project_then_whiten: a "
        "random projection R0 (seeded from the module name and side) first maps the side to m = wide_layer_dim "
        "dims, the KFAC factor A is fitted on R0 x (or R0 dy), an m×m matrix (the d×d one is never formed), and "
        "the side is projected by R (R0 A R0ᵀ + λ)^-1/2 R0: KFAC whitening within a random m-dim subspace, still "
        "one k×d matrix in the hooks. The fitted projections record which sides were pre-projected. refuse: "
        "stop with an error before any forward pass.",
        exclude_if=lambda v: v == "project_then_whiten",
    )
    wide_layer_dim: int = Field(
        1024,
        ge=1,
        description="m, the size of the first random projection of a side wider than max_factor_dim "
        "(wide_layers='project_then_whiten'); capped at max_factor_dim, raised to the side's projection size.",
        exclude_if=lambda v: v == 1024,
    )
    optimizer_state: str | None = Field(
        None,
        description="TrackStar's optimizer-state correction: the saved state of the Adam/AdamW optimizer that trained "
        "the model (torch.save(optimizer.state_dict()), or a Trainer checkpoint directory with its optimizer.pt). "
        "Every per-example gradient G is divided by the square root of the optimizer's bias-corrected second moment "
        "in Adafactor's factored row × column form, diag(1/a) G diag(1/b), folded into the projections (fitted and "
        "stored with the index, so queries are corrected the same way). KFAC whitening (precondition='kfac') undoes "
        "any such per-coordinate rescaling up to its damping: the correction matters with precondition='none', as "
        "in TrackStar. None: no correction.",
        exclude_if=lambda v: v is None,
    )
    loss_reduction: Literal["sum", "mean"] = Field(
        "sum", description="Per-example loss: sum or mean over the example's label tokens."
    )
    projection_dtype: Literal["float32", "model"] = Field(
        "float32",
        description="Dtype the hooks project in. float32: a layer's input activations and output gradients are "
        "cast to float32 (float64 for a float64 model) and projected there. model: on a bfloat16/float16 model "
        "they are projected in the model's dtype (the matmul accumulates in float32) and only the k-dim results "
        "are cast to float32: the hooks then read each activation once instead of writing and reading a float32 "
        "copy, for one rounding of the projected values to the model's precision. Identical to float32 on a "
        "float32 or float64 model.",
        exclude_if=lambda v: v == "float32",
    )
    batch_size: int = Field(8, ge=1, description="Sequences per forward/backward pass.")
    shard_size: int = Field(512, ge=1, description="Examples per gradient-logging task (the unit of retry and cache).")
    storage_dtype: Literal["float32", "float16", "bfloat16", "int8"] = Field(
        "float32",
        description="Dtype of stored gradient vectors: float32 (4 bytes a value), float16 or bfloat16 (2; bfloat16 "
        "keeps float32's range, float16 more mantissa), int8 (1, plus one float32 scale per row: round(g / scale) "
        "with scale = max|g| / 127). Scoring reads them back as float32. `dataworth evaluate` measures the rank "
        "agreement of each with float32.",
    )

    @model_validator(mode="after")
    def _identity_dims(self) -> "LoggingConfig":
        if not self.modules:
            raise ValueError("modules is empty: give at least one pattern, e.g. ['*'] for every linear layer")
        if self.projection == "rapidgrad" and self.precondition != "none":
            raise ValueError(
                f"projection='rapidgrad' with precondition={self.precondition!r}: RapidGrad folds a layer's whole "
                "gradient, so there is no input or output side left to whiten; give --precondition none, or a "
                "Kronecker projection (gaussian) for KFAC-whitened gradients"
            )
        if self.basis == "pca" and (self.precondition != "kfac" or self.projection in ("identity", "rapidgrad")):
            raise ValueError(
                f"basis='pca' with precondition={self.precondition!r} and projection={self.projection!r}: the PCA "
                "basis is the top eigenvectors of each side's KFAC factor, so it needs precondition='kfac' and a "
                "Kronecker projection (gaussian, orthogonal or rademacher; its kind still draws the first projection "
                "of sides wider than max_factor_dim); give --precondition kfac, or --logging.basis random"
            )
        return self

    @property
    def fitted(self) -> bool:
        """Whether the projections depend on the model and data (KFAC whitening, optimizer-state correction), so
        they are fitted once per index and stored with it rather than redrawn from the seed."""
        return self.precondition != "none" or self.optimizer_state is not None


class CurvatureConfig(StageConfig):
    kind: Literal["identity", "raw", "ekfac"] = Field(
        "ekfac",
        description="identity: no curvature; raw: block-diagonal empirical Fisher of the projected gradients; "
        "ekfac (default): that Fisher in a Kronecker eigenbasis Q_S ⊗ Q_A (of E[G Gᵀ] and E[Gᵀ G] of each layer's "
        "k_out × k_in projected gradient) with eigenvalues corrected to diag(Qᵀ F Q), as kronfluence's EKFAC, kept "
        "factored (k_out² + k_in² numbers a block instead of raw's (k_out·k_in)²).",
    )
    damping_factor: float = Field(0.1, gt=0, description="λ = damping_factor × mean eigenvalue, per module block.")
    max_block_dim: int = Field(
        16384,
        ge=1,
        description="raw: the largest Fisher block (proj_dim_in × proj_dim_out per module), a dense matrix, fitted; "
        "larger ones are refused. ekfac never forms a block (its Kronecker factors, then its eigenvalues, in two "
        "passes over the gradients): the largest factor side (proj_dim_in or proj_dim_out).",
    )


class ScoreConfig(StageConfig):
    modes: list[ScoreMode] = Field(
        default_factory=lambda: list(DEFAULT_SCORE_MODES),
        description="Score modes to compute. Gradient modes (one pass over the stored gradients): dot, influence, "
        "relatif, cosine, and trackstar (cosine under a curvature mixed with the query set's own Fisher, "
        "task_mix; with an index logged under logging.optimizer_state, TrackStar's score). bm25: Okapi BM25 of "
        "the query's prompt + completion against each example's text, from the full-text index of the index's "
        "examples table. hybrid-rrf-<mode>: reciprocal-rank fusion of the BM25 ranking and that gradient mode's, "
        "each cut at `candidates`: Σ 1/(rrf_k + rank). "
        "hybrid-rerank-<mode>: BM25's top `candidates` examples reranked by their exact scores in that gradient "
        "mode (only those rows are read). hybrid-linear-<mode>: the same candidates scored (1 - linear_weight) × BM25 "
        "+ linear_weight × that exact score, each min-max normalized over the candidates. "
        "hybrid-ann-<mode>: the `candidates` nearest stored gradients by dot "
        "product with the mode's query vector (g_q for dot, (F+λI)^-1 g_q for influence, relatif and cosine, "
        "(T+λI)^-1 g_q for trackstar), found by the index's vector index (build it with --ann.build), reranked by "
        "their exact scores in that mode.",
    )
    top_k: int = Field(10, ge=1, description="Training examples kept per query and mode.")
    report_rows: int = Field(
        50, ge=1, description="Rows per query and mode in the HTML report (the top-k CSV has all top_k of them)."
    )
    train_batch_size: int = Field(4096, ge=1, description="Stored gradients read per batch while scoring.")
    query_batch_size: int = Field(16, ge=1, description="Queries per forward/backward pass.")
    full_matrix: bool = Field(False, description="Also save the full query × train score matrix (small corpora only).")
    damping_factor: float | None = Field(
        None, gt=0, description="Override the index's damping factor for this run (refits nothing: same eigenbasis)."
    )
    shards_per_task: int | None = Field(
        None,
        ge=1,
        description="Score the index in tasks of this many gradient shards each, run side by side by the flow's task "
        "runner, and merge their top-k exactly (same result); None: one task streams the whole index.",
    )
    # The two hybrid fields are left out of dumps at their defaults, so the score run ids (and cache keys) of
    # configs written before they existed read back unchanged.
    candidates: int = Field(
        100,
        ge=1,
        description="M of the hybrid modes: hybrid-rerank-* rescores BM25's top M examples per query, hybrid-rrf-* "
        "fuses the BM25 and gradient rankings cut at rank M, hybrid-ann-* reranks the vector index's M nearest. "
        "At least top_k.",
        exclude_if=lambda v: v == 100,
    )
    rrf_k: float = Field(
        60.0,
        ge=0,
        description="k of reciprocal-rank fusion (hybrid-rrf-*): an example scores Σ 1/(k + rank) over the rankings "
        "it is in (rank 1 = first); a larger k flattens the weight of the first ranks.",
        exclude_if=lambda v: v == 60.0,
    )
    linear_weight: float = Field(
        0.5,
        ge=0,
        le=1,
        description="w of hybrid-linear-*: a candidate scores (1 - w) × its BM25 score + w × its exact gradient score, "
        "each min-max normalized over the query's candidates (0 at their lowest, 1 at their highest); 0 is BM25's "
        "ranking, 1 the rerank's.",
        exclude_if=lambda v: v == 0.5,
    )

    task_mix: float = Field(
        0.5,
        ge=0,
        lt=1,
        description="trackstar's task-specific curvature: the share of the query set's Fisher (its per-block "
        "(1/Q) Σ g_q g_qᵀ, scaled to the train Fisher's trace) in the curvature, (1 - w) F_train + w F_queries. "
        "Directions every query shares then count less. `dataworth evaluate --calibrate` chooses it.",
        exclude_if=lambda v: v == 0.5,
    )
    tokenwise_top: int = Field(
        0,
        ge=0,
        description="Token-wise attribution of each query's top this-many examples per gradient mode (0: off): "
        "each score split over the query's completion tokens and over the example's tokens (each split sums to "
        "the score), stored in the results' token_scores table and drawn as a heat map in the report. bm25 and "
        "the hybrid modes are not split.",
        exclude_if=lambda v: v == 0,
    )
    # The ANN and filter fields below are left out of dumps at their defaults: older score run ids hold.
    ann_nprobes: int = Field(
        ANN_NPROBES,
        ge=1,
        description="hybrid-ann-*: IVF partitions the vector index searches per query (more: higher recall, slower).",
        exclude_if=lambda v: v == ANN_NPROBES,
    )
    ann_refine_factor: int | None = Field(
        None,
        ge=1,
        description="hybrid-ann-*: LanceDB re-scores refine_factor × candidates of the PQ-nearest rows with their "
        "stored vectors before cutting at `candidates`; None: the PQ ranking is cut as it is (the rerank is exact "
        "either way).",
        exclude_if=lambda v: v is None,
    )
    ann_prewarm: bool = Field(
        True,
        description="hybrid-ann-*: load the whole vector index into memory in the background while the query "
        "gradients are taken (about its codes' size: 0.33 GB for IVF_RQ 4 bits at 1M × 1024), so the search reads "
        "no partition from disk; off for an index larger than memory. Changes the speed, never the scores.",
        exclude_if=lambda v: v is True,
    )
    where_source: list[str] | None = Field(
        None,
        description="Score only the examples whose `source` (data.source_column) is one of these, in every mode: the "
        "filter is resolved on the examples table and pushed into the gradients scan, the full-text and the vector "
        "searches. With where_document, both must match. None: every example.",
        exclude_if=lambda v: v is None,
    )
    where_document: list[str] | None = Field(
        None,
        description="Score only the examples cut from these document ids (data.id_column, or row numbers), in every "
        "mode, as where_source. None: every document.",
        exclude_if=lambda v: v is None,
    )

    @field_validator("where_source", "where_document")
    @classmethod
    def _some_values(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and not v:
            raise ValueError("an empty filter matches nothing: give at least one value, or leave the filter out")
        return None if v is None else list(dict.fromkeys(v))

    @property
    def filtered(self) -> bool:
        """Whether a metadata filter restricts the examples scored."""
        return self.where_source is not None or self.where_document is not None

    @field_validator("modes")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError(f"modes is empty: choose from {list(ALL_MODES)}")
        return list(dict.fromkeys(v))

    @model_validator(mode="after")
    def _candidates_cover_top_k(self) -> "ScoreConfig":
        hybrid = [m for m in self.modes if m in HYBRID_MODES]
        if hybrid and self.candidates < self.top_k:
            raise ValueError(
                f"candidates={self.candidates} is below top_k={self.top_k}: {hybrid[0]} ranks at most `candidates` "
                f"BM25 candidates per query; give --score.candidates {self.top_k} or more, or a smaller --top-k"
            )
        if self.filtered and self.full_matrix:
            raise ValueError(
                "full_matrix with where_source/where_document: the full matrix has a column for every example; drop "
                "the filter, or --score.full-matrix"
            )
        return self


def hybrid_parts(mode: str) -> tuple[str, GradientMode] | None:
    """("rrf", "rerank", "linear" or "ann", the gradient mode) of a hybrid mode's name; None for any other mode."""
    if mode not in HYBRID_MODES:
        return None
    _, kind, gradient = mode.split("-", 2)
    return kind, gradient


def gradient_modes(modes: list[str], kinds: tuple[str, ...] = ("rrf",)) -> list[GradientMode]:
    """The gradient modes these modes need, in order: those named, and those of their hybrid modes of `kinds`
    (by default the RRF ones, which fuse a gradient ranking over the whole index; a rerank scores only its
    candidates)."""
    out = []
    for mode in modes:
        parts = hybrid_parts(mode)
        if mode in ALL_SCORE_MODES:
            out.append(mode)
        elif parts is not None and parts[0] in kinds:
            out.append(parts[1])
    return list(dict.fromkeys(out))


class GenerationConfig(StageConfig):
    max_new_tokens: int = Field(8, ge=1, description="Tokens generated (greedy) for a query without a completion.")
    stop_at_newline: bool = Field(True, description="Cut a generated completion at its first newline.")
    stop: list[str] = Field(
        default_factory=list,
        description="Also cut a generated completion before the first token containing one of these strings.",
    )


class QuerySpec(StageConfig):
    id: str = Field(description="Query id.")
    prompt: str = Field("", description="Prompt text (no loss on it).")
    completion: str | None = Field(None, description="Completion to attribute; generated by the model when missing.")
    messages: list[dict[str, str]] | None = Field(
        None,
        description="A chat instead of prompt (and completion): {role, content} messages rendered by the tokenizer's "
        "chat template. A last assistant message is the completion attributed (its turn as the template writes it); "
        "otherwise the model's reply is generated and attributed.",
        exclude_if=lambda v: v is None,
    )

    @model_validator(mode="after")
    def _prompt_or_messages(self):
        if self.messages is None:
            if not self.prompt.strip():
                raise ValueError("prompt is empty: every query needs prompt text (or chat messages)")
            return self
        if self.prompt or self.completion is not None:
            raise ValueError("give a chat query its messages alone: its prompt and completion come from them")
        if not self.messages or any(set(m) != {"role", "content"} for m in self.messages):
            raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
        if all(m["role"] == "assistant" for m in self.messages):
            raise ValueError("a chat query needs a message before the assistant's reply it attributes")
        return self


class TrackingConfig(StageConfig):
    tracking_uri: str | None = Field(None, description="MLflow tracking URI; default sqlite:///<workspace>/mlflow.db.")
    experiment: str = Field("dataworth", description="MLflow experiment name.")
    enabled: bool = Field(True, description="Log this run to MLflow.")
    parent_run_id: str | None = Field(None, description="MLflow run this run nests under (set by the demo flow).")


class RunnerConfig(StageConfig):
    kind: Literal["threads", "dask", "pool"] = Field(
        "threads",
        description="threads: the flow's tasks run in threads of this process; dask: on a Dask cluster through "
        "prefect-dask's DaskTaskRunner (a local cluster of n_workers processes, or the one at dask_address); pool "
        "(index flow; other flows run as threads): its gradient shards run as flow runs of shards_deployment on that "
        "deployment's work pool, spread over the pool's workers (needs a Prefect server, PREFECT_API_URL).",
    )
    dask_address: str | None = Field(
        None,
        description="Scheduler address of an existing Dask cluster (tcp://host:8786) for kind=dask; its workers need "
        "dataworth installed, the same Prefect API (PREFECT_API_URL) and the index's storage.",
    )
    n_workers: int = Field(2, ge=1, description="Worker processes of the local Dask cluster (kind=dask, no address).")
    threads_per_worker: int = Field(
        2,
        ge=1,
        description="Threads per worker process of the local Dask cluster: model work in a process is serial (one "
        "lock), so a second thread writes one shard while the next is computed.",
    )
    shards_deployment: str = Field(
        "log-shards/log-shards",
        description="kind=pool: the deployment (flow-name/deployment-name) of flows/shards.py:log_shards that logs "
        "a range of shards; `prefect deploy --prefect-file deployments/prefect.yaml --name log-shards` creates it.",
    )
    shards_per_run: int = Field(
        4,
        ge=1,
        description="kind=pool: shards logged by one flow run of shards_deployment (each run loads the model once).",
    )
    runs_in_flight: int = Field(
        2,
        ge=1,
        description="kind=pool: flow runs of shards_deployment submitted at once; at least the pool's workers, so "
        "each is busy (run workers with --limit 1: one run per GPU). Memory of the index run does not grow with it.",
    )
    resubmits: int = Field(
        2,
        ge=0,
        description="kind=pool: times a range of shards is submitted again when its flow run crashed (its worker "
        "died and the zombie-flow automation of deployments/setup_worker.sh marked it Crashed); a failed run is "
        "never resubmitted.",
    )


def _check_index_uri(uri: str) -> str:
    """An index is a directory (or an object-store prefix): a regular file at a local path is a mistake."""
    if not uri.strip():
        raise ValueError("the index URI is empty; give a directory (or s3://, gs://, az:// prefix) for the index")
    if "://" not in uri and Path(uri).expanduser().is_file():
        raise ValueError(f"{uri!r} is a file, not an index directory; give a directory path (or remove the file)")
    return uri


IndexUri = Annotated[str, AfterValidator(_check_index_uri)]


class AnnConfig(StageConfig):
    build: bool = Field(
        False,
        description="Build LanceDB's vector index on the stored gradients (metric dot) when the index is published, "
        "after compaction; the hybrid-ann-* score modes search it. Run `dataworth index` again with it on an "
        "existing index: stored gradients are reused.",
    )
    index_type: VectorIndexType = Field(
        VECTOR_INDEX_TYPES[0],
        description="IVF_RQ: inverted file of k-means partitions, rows RaBitQ-quantized (rq_bits bits per value); "
        "IVF_SQ: the same partitions, rows scalar-quantized (8 bits per value); IVF_PQ: rows product-quantized (8 bits "
        "per sub-vector; its dot-product ranking was near random on the benchmark's vectors); IVF_HNSW_SQ: an HNSW "
        "graph per partition over scalar-quantized rows.",
    )
    rq_bits: int = Field(
        RQ_BITS,
        ge=1,
        le=8,
        description="IVF_RQ: bits per value of the RaBitQ codes (1: dim / 8 bytes a row, the fastest and coarsest).",
        exclude_if=lambda v: v == RQ_BITS,
    )
    partitions: int | None = Field(
        None, ge=1, description="IVF partitions; None: about √rows (at least 1, at most rows / 256)."
    )
    sub_vectors: int | None = Field(
        None,
        ge=1,
        description="IVF_PQ sub-vectors (a divisor of the gradient dim); None: dim / 16 when 16 divides it, else the "
        "largest divisor of dim up to dim / 8.",
    )


class IndexConfig(StageConfig):
    model: ModelConfig
    data: DataConfig
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    curvature: CurvatureConfig = Field(default_factory=CurvatureConfig)
    index_uri: IndexUri = Field(description="LanceDB URI of the index (local directory or object-store URI).")
    overwrite: bool = Field(
        False,
        description="Replace an existing index (one built with another config, or damaged). A published index is "
        "rebuilt beside the old version, which queries read until the new one is published.",
    )
    keep_versions_days: float = Field(
        7.0,
        ge=0,
        description="After publishing, remove table versions older than this (earlier builds): a query started "
        "before a rebuild published reads the old version, so keep it longer than a query runs.",
    )
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    runner: RunnerConfig = Field(
        default_factory=RunnerConfig, description="Where the flow's tasks run: threads here, or a Dask cluster."
    )
    ann: AnnConfig = Field(
        default_factory=AnnConfig,
        description="LanceDB's vector index on the stored gradients, for the hybrid-ann-* score modes.",
        exclude_if=lambda v: v == AnnConfig(),
    )

    @model_validator(mode="after")
    def _ann_dtype(self) -> "IndexConfig":
        if self.ann.build and self.logging.storage_dtype not in ANN_DTYPES:
            raise ValueError(
                f"ann.build with logging.storage_dtype={self.logging.storage_dtype!r}: LanceDB's vector index reads "
                f"{' or '.join(ANN_DTYPES)} vectors; give --logging.storage-dtype float16 (or float32), or leave "
                "--ann.build off"
            )
        return self


class QueryConfig(StageConfig):
    index_uri: IndexUri = Field(description="LanceDB URI of a published index.")
    queries: list[QuerySpec] = Field(default_factory=list, description="Queries inline.")
    queries_path: str | None = Field(
        None,
        description="JSONL file of queries: {id, prompt, completion?} per line, or {id, messages} (a chat, rendered by "
        "the tokenizer's chat template).",
    )
    index_version: int | None = Field(
        None,
        ge=0,
        description="Score against this published version of the index (the index_version that score rows and "
        "`dataworth index` report) instead of the current one, while the retention window keeps it.",
    )
    score: ScoreConfig = Field(default_factory=ScoreConfig)
    checkpoint_indexes: list[str] = Field(
        default_factory=list,
        description="Indexes of the same corpus built from other checkpoints of the model (one `dataworth index` "
        "per checkpoint, each with its own projections and curvature): every gradient mode is then summed over "
        "the checkpoints, Σ_c w_c score_c (TracIn over checkpoints). They must hold the same examples in the same "
        "shards as index_uri (same data and shard_size); each index's model takes its own query gradients.",
        exclude_if=lambda v: not v,
    )
    checkpoint_weights: list[float] | None = Field(
        None,
        description="w_c of the checkpoint sum, index_uri's first, then checkpoint_indexes' in order (TracIn weighs "
        "each checkpoint by its learning rate); None: all 1.",
        exclude_if=lambda v: v is None,
    )
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    results_uri: str | None = Field(
        None,
        description="LanceDB URI where the query's results go (scores, queries, query-side artifacts); default "
        "<index_uri>/results. Give another location to query an index on read-only or shared storage.",
    )
    report_dir: str | None = Field(
        None, description="Where the HTML report goes; default <results_uri>/reports (a local results store)."
    )
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    runner: RunnerConfig = Field(
        default_factory=RunnerConfig, description="Where the flow's tasks run: threads here, or a Dask cluster."
    )

    @field_validator("checkpoint_indexes")
    @classmethod
    def _checkpoint_uris(cls, v: list[str]) -> list[str]:
        return [_check_index_uri(u) for u in v]

    @model_validator(mode="after")
    def _checkpoints(self) -> "QueryConfig":
        if self.checkpoint_weights is not None and len(self.checkpoint_weights) != 1 + len(self.checkpoint_indexes):
            raise ValueError(
                f"checkpoint_weights has {len(self.checkpoint_weights)} weights for {1 + len(self.checkpoint_indexes)} "
                "indexes (index_uri, then checkpoint_indexes): give one weight per index, or none for all 1"
            )
        if self.checkpoint_indexes:
            if self.score.shards_per_task is not None:
                raise ValueError(
                    "score.shards_per_task with checkpoint_indexes is not supported: a checkpoint sum is scored in "
                    "one task; leave shards_per_task unset"
                )
            reranks = [m for m in self.score.modes if (hybrid_parts(m) or ("",))[0] in ("rerank", "linear", "ann")]
            if reranks:
                raise ValueError(
                    f"{reranks[0]} with checkpoint_indexes is not supported (a rerank reads one index's rows); use "
                    "the hybrid-rrf-* modes or drop the checkpoint indexes"
                )
            if self.score.filtered:
                raise ValueError(
                    "score.where_source/where_document with checkpoint_indexes is not supported (a checkpoint sum "
                    "reads every example of each index); drop the filter or the checkpoint indexes"
                )
            if self.index_uri in self.checkpoint_indexes or len(set(self.checkpoint_indexes)) < len(
                self.checkpoint_indexes
            ):
                raise ValueError("checkpoint_indexes repeats an index: give each checkpoint's index once")
        return self

    @property
    def checkpoint_weight_list(self) -> list[float]:
        """w_c of index_uri and each checkpoint index (all 1 unless given)."""
        return list(self.checkpoint_weights or [1.0] * (1 + len(self.checkpoint_indexes)))

    @property
    def results_location(self) -> str:
        """results_uri, or its default beside the index."""
        return self.results_uri or default_results_uri(self.index_uri)


def default_results_uri(index_uri: str) -> str:
    """Where a query's results go unless told otherwise: a LanceDB database of its own in the index's `results/`
    folder, so the published tables are never written by a query (give another location for an index on
    read-only or shared storage)."""
    return index_uri.rstrip("/") + "/results"


def save_yaml(config: StageConfig, path: str | Path) -> Path:
    """Write a resolved config as YAML that `--config <path>` (and `load_yaml`) reads back to the same model."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_text(text)
    tmp.replace(p)
    return p


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a dict (validated later by the stage's model)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file {str(p)!r} does not exist")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(p)!r} must hold a mapping at the top level, got {type(data).__name__}")
    return data


class DemoConfig(StageConfig):
    workspace: str = Field("dataworth-runs/demo", description="Folder for the corpus, model, index and reports.")
    corpus_size: Literal["small", "medium", "large"] = Field("small", description="Generated fact-corpus preset.")
    seed: int = Field(0, description="Seed of the corpus, the model initialization and the projections.")
    train_epochs: int | None = Field(
        None, ge=1, description="Training epochs of the tiny model (preset default when unset)."
    )
    # A small corpus affords 32×32 projections per layer (8192 dims for the tiny model).
    logging: LoggingConfig = Field(
        default_factory=lambda: LoggingConfig(proj_dim_in=32, proj_dim_out=32, batch_size=16, shard_size=128)
    )
    curvature: CurvatureConfig = Field(default_factory=CurvatureConfig)
    score: ScoreConfig = Field(default_factory=ScoreConfig)
    show_queries: int = Field(8, ge=0, description="Queries printed with their top-5 (all are in the report).")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)


BenchmarkPeer = Literal["lancedb", "kronfluence", "bergson"]
GpuModelShape = Literal["gpt2-small", "llama-1b"]


class BenchmarkModelConfig(StageConfig):
    """A randomly initialized GPT-2 shape whose gradient logging is timed against plain training."""

    layers: int = Field(12, ge=1, description="Transformer blocks (GPT-2-small: 12).")
    width: int = Field(768, ge=1, description="Hidden size (GPT-2-small: 768).")
    heads: int = Field(12, ge=1, description="Attention heads; must divide width (GPT-2-small: 12).")
    vocab: int = Field(50257, ge=2, description="Vocabulary size (GPT-2: 50257).")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> "BenchmarkModelConfig":
        if self.width % self.heads:
            raise ValueError(f"heads={self.heads} does not divide width={self.width}; choose a divisor")
        return self


class BenchmarkConfig(StageConfig):
    preset: Literal["cpu", "gpu"] = Field(
        "cpu",
        description="cpu: everything on the CPU in float32; gpu: scoring and logging on CUDA, plus the bfloat16 "
        "gpu_models (refused without CUDA).",
    )
    workspace: str = Field("dataworth-runs/benchmark", description="Folder for the synthetic indexes and outputs.")
    sizes: list[int] = Field(
        default_factory=lambda: [10_000, 100_000, 1_000_000],
        description="Rows of synthetic gradient vectors, one fresh index per size, smallest first.",
    )
    dim: int = Field(1024, ge=1, description="Dimension of the synthetic gradient vectors.")
    shard_size: int = Field(512, ge=1, description="Rows per write_gradient_shard call while ingesting.")
    num_queries: int = Field(64, ge=1, description="Query vectors scored against every size (all four modes).")
    train_batch_size: int = Field(4096, ge=1, description="Stored gradients read per batch while scoring.")
    top_k: int = Field(10, ge=1, description="Training examples kept per query and mode.")
    block_dim: int = Field(256, ge=1, description="Size of a block of the synthetic block-diagonal Fisher.")
    peer_queries: int = Field(
        8, ge=1, description="Queries LanceDB's brute-force search answers on the stored vectors; pairs/s per query."
    )
    peers: list[BenchmarkPeer] = Field(
        default_factory=lambda: ["lancedb", "kronfluence", "bergson"],
        description="Systems timed side by side: LanceDB brute force on the same stored vectors; kronfluence and "
        "bergson on one pairwise job (same model, sequences and projection size, model to score matrix). One not "
        "installed is skipped with its install command.",
    )
    rss_max_size: int | None = Field(
        None, ge=1, description="Score sizes above this in-process instead of a fresh subprocess (no peak RSS)."
    )
    model: BenchmarkModelConfig = Field(default_factory=BenchmarkModelConfig)
    gpu_models: list[GpuModelShape] = Field(
        default_factory=lambda: ["gpt2-small", "llama-1b"],
        description="Shapes also timed in bfloat16 with --preset gpu (llama-1b: 16 layers, 2048 wide, MLP 8192).",
    )
    seq_length: int = Field(
        128, ge=2, description="Tokens per sequence of the logging measurement (gpu preset default: 512)."
    )
    batch_size: int = Field(
        4, ge=1, description="Sequences per forward/backward pass of the logging measurement (gpu preset default: 8)."
    )
    steps: int = Field(
        2,
        ge=1,
        description="Timed batches per logging and per training measurement, after one warm-up (gpu preset "
        "default: 10).",
    )
    proj_dim: int = Field(16, ge=1, description="Projection size per side (k_in = k_out) of the logged gradients.")
    startup: bool = Field(
        True, description="Time a `dataworth index` and a `dataworth query` of a tiny corpus as subprocesses."
    )
    keep_indexes: bool = Field(False, description="Keep each size's synthetic index (deleted after measuring).")
    # The ann fields are left out of dumps at their defaults: earlier benchmark configs keep their fingerprints.
    ann: bool = Field(
        True,
        description="At the largest size, build LanceDB's vector index on the stored vectors and time ANN + exact "
        "rerank (hybrid-ann-influence's query side) against the exact streaming pass: build time, recall@top_k, "
        "speedup.",
        exclude_if=lambda v: v is True,
    )
    ann_index_type: VectorIndexType = Field(
        VECTOR_INDEX_TYPES[0],
        description="The vector index the ann part builds (IVF_RQ with AnnConfig's default bits).",
        exclude_if=lambda v: v == VECTOR_INDEX_TYPES[0],
    )
    ann_candidates: int = Field(
        100, ge=1, description="M of the ann part: candidates per query reranked.", exclude_if=lambda v: v == 100
    )
    ann_nprobes: int = Field(
        ANN_NPROBES,
        ge=1,
        description="IVF partitions the ann part searches per query.",
        exclude_if=lambda v: v == ANN_NPROBES,
    )
    ann_refine_factor: int | None = Field(
        None,
        ge=1,
        description="LanceDB's refine of the ann part's quantized candidates (None: none).",
        exclude_if=lambda v: v is None,
    )
    seed: int = Field(0, description="Seed of the synthetic vectors, the queries and the model initialization.")
    json_path: str | None = Field(None, description="Also write the summary ratios and every metric to this JSON file.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @field_validator("sizes")
    @classmethod
    def _sizes(cls, v: list[int]) -> list[int]:
        if not v or any(n < 1 for n in v):
            raise ValueError("sizes must be a non-empty list of positive row counts, e.g. [10000, 100000]")
        return sorted(dict.fromkeys(v))

    @field_validator("peers")
    @classmethod
    def _unique_peers(cls, v: list[str]) -> list[str]:
        return list(dict.fromkeys(v))

    @model_validator(mode="after")
    def _gpu_preset_defaults(self) -> "BenchmarkConfig":
        """A GPU runs a 4 × 128-token batch in a few kernel launches each: the gpu preset times batches of
        8 × 512 tokens, 10 of them, unless the fields were given."""
        if self.preset == "gpu":
            for name, value in (("seq_length", 512), ("batch_size", 8), ("steps", 10)):
                if name not in self.model_fields_set:
                    setattr(self, name, value)
        return self
