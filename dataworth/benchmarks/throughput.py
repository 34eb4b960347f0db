"""Throughput measurements that need no storage: synthetic gradient vectors, randomly initialized
causal LMs of real shapes, and the bounds the pipeline is compared with (one in-memory matmul,
plain training forward+backward). The `dataworth benchmark` flow times the real code paths
against these.
"""

from __future__ import annotations

import functools
import resource
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

from dataworth.data import Example
from dataworth.errors import ConfigError
from dataworth.losses import per_example_loss

# Shapes timed in bfloat16 by the gpu preset: GPT-2-small, and a ~1B Llama (TinyLlama-like, 1.2B parameters).
GPU_MODEL_SHAPES: dict[str, dict] = {
    "gpt2-small": {"family": "gpt2", "layers": 12, "width": 768, "heads": 12, "vocab": 50257},
    "llama-1b": {
        "family": "llama",
        "layers": 16,
        "width": 2048,
        "heads": 32,
        "kv_heads": 8,
        "mlp_width": 8192,
        "vocab": 32000,
    },
}

# The pairwise comparison with kronfluence and bergson (`dataworth benchmark`): the logging model's shape capped
# at this size, sequences of at most PAIRWISE_SEQ_LENGTH tokens, PAIRWISE_TRAIN training sequences, the systems
# taking turns for up to PAIRWISE_ROUNDS rounds, none started after PAIRWISE_BUDGET_S seconds once two are done.
# kronfluence forms every training sequence's full per-layer gradient, and the rounds must fit the CPU preset's
# time on two cores (a quiet round takes about 8 s, one on busy cores up to 90 s); a smaller vocabulary keeps
# the shared output layer from dominating every system.
PAIRWISE_MODEL_CAP = {"layers": 4, "width": 256, "vocab": 8192}
PAIRWISE_SEQ_LENGTH = 64
PAIRWISE_TRAIN = 64
PAIRWISE_ROUNDS = 6
PAIRWISE_BUDGET_S = 120.0


# The synthetic vectors' structure: SYNTHETIC_CLUSTERS centres in a SYNTHETIC_RANK-dim subspace of the gradient
# space, each row its centre plus a spread within the subspace plus isotropic noise. Pure Gaussian noise has no
# neighbourhoods (every row about as near any query as any other), which makes an ANN index's recall meaningless;
# real per-example gradients concentrate in a few directions (a decaying spectrum) and group by topic.
SYNTHETIC_RANK, SYNTHETIC_CLUSTERS, SYNTHETIC_SPREAD, SYNTHETIC_NOISE = 64, 256, 0.5, 0.25


@functools.lru_cache(maxsize=4)
def _synthetic_structure(seed: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(cluster centres [C, r], basis [r, dim]) shared by every shard and query of one seed."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 - 7_919)
    centres = torch.randn(SYNTHETIC_CLUSTERS, SYNTHETIC_RANK, generator=gen)
    basis = torch.randn(SYNTHETIC_RANK, dim, generator=gen) / SYNTHETIC_RANK**0.5
    return centres, basis


def synthetic_vectors(seed: int, shard: int, rows: int, dim: int) -> torch.Tensor:
    """[rows, dim] float32 gradient-like vectors of one shard, the same for the same (seed, shard): a cluster
    centre plus a spread in a low-rank subspace plus isotropic noise (see SYNTHETIC_RANK), times a decaying
    per-column scale (so a fitted Fisher is not a multiple of the identity)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + shard)
    centres, basis = _synthetic_structure(seed, dim)
    which = torch.randint(SYNTHETIC_CLUSTERS, (rows,), generator=gen)
    low = centres[which] + SYNTHETIC_SPREAD * torch.randn(rows, SYNTHETIC_RANK, generator=gen)  # [rows, r]
    noise = SYNTHETIC_NOISE * torch.randn(rows, dim, generator=gen)
    scale = (1.0 + torch.arange(dim, dtype=torch.float32) / 64).rsqrt()
    return (low @ basis + noise) * scale  # ([rows, r] @ [r, dim] + [rows, dim]) * [dim]


def synthetic_queries(seed: int, n: int, dim: int) -> torch.Tensor:
    """[n, dim] query vectors drawn like the stored ones, from a stream no shard uses."""
    return synthetic_vectors(seed, -1 - n, n, dim)


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def max_rss_mb() -> float:
    """Peak resident set of this process so far, in MiB.

    Linux's VmHWM belongs to the process image, while getrusage's ru_maxrss survives exec: a process
    spawned from a big parent would report the parent's size at the fork."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # macOS reports bytes, Linux KiB


def matmul_seconds(
    rows: int, dim: int, n: int, device: str = "cpu", chunk: int = 262_144, dtype: torch.dtype = torch.float32
) -> float:
    """Seconds of the in-memory product [rows, dim] × [dim, n]: the bound of scoring `rows` prepared
    query vectors against n stored ones. Past `chunk` columns the same [dim, chunk] operand is multiplied
    again (same FLOPs, bounded memory), so a 1M-row bound does not need 4 GB of random numbers."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(rows, dim, generator=gen, dtype=dtype).to(device)
    b = torch.randn(dim, min(n, chunk), generator=gen, dtype=dtype).to(device)
    (a @ b[:, : min(1024, b.shape[1])]).sum()  # warm-up: thread pool, kernels
    synchronize(device)

    def once() -> float:
        start = time.perf_counter()
        done = 0
        while done < n:
            width = min(chunk, n - done)
            out = a @ b[:, :width]  # [rows, dim] @ [dim, width] → [rows, width]
            done += width
        synchronize(device)
        del out
        return time.perf_counter() - start

    return best_of(once)


# A timed step shorter than this is repeated (up to BEST_OF_MAX times in all) and its best time kept: on shared
# cores a 50 ms pass varies by half from one run to the next. Scoring passes and the matmul bound are timed alike.
BEST_OF_SECONDS, BEST_OF_MAX = 1.0, 5


def best_of(step: Callable[[], float]) -> float:
    """The least of the times `step()` returns (each its own timing), run until they add up to BEST_OF_SECONDS or
    BEST_OF_MAX runs; a step of a second or more runs once."""
    times = [step()]
    while sum(times) < BEST_OF_SECONDS and len(times) < BEST_OF_MAX:
        times.append(step())
    return min(times)


def random_causal_lm(
    family: str,
    layers: int,
    width: int,
    heads: int,
    vocab: int,
    seq_length: int,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    seed: int = 0,
    kv_heads: int | None = None,
    mlp_width: int | None = None,
) -> nn.Module:
    """A randomly initialized GPT-2 or Llama of the given shape, dropout off, in eval mode."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if family == "gpt2":
        cfg = GPT2Config(
            vocab_size=vocab,
            n_positions=max(seq_length, 1024),  # GPT-2's context: bergson batches up to this many tokens
            bos_token_id=min(50256, vocab - 1),  # GPT-2's ids, kept inside a smaller vocabulary
            eos_token_id=min(50256, vocab - 1),
            n_embd=width,
            n_layer=layers,
            n_head=heads,
            n_inner=mlp_width,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        model = GPT2LMHeadModel(cfg)
    elif family == "llama":
        cfg = LlamaConfig(
            vocab_size=vocab,
            hidden_size=width,
            intermediate_size=mlp_width or 4 * width,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads or heads,
            max_position_embeddings=max(seq_length, 64),
        )
        model = LlamaForCausalLM(cfg)
    else:
        raise ConfigError(f"unknown model family {family!r}; choose gpt2 or llama")
    return model.to(device=device, dtype=dtype).eval()


def random_examples(vocab: int, n: int, seq_length: int, seed: int = 0) -> list[Example]:
    """n examples of seq_length random token ids (all the same length: no padding to account for)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, seq_length), generator=gen)
    return [Example(i, f"random-{i}", 0, 0, seq_length, ids[i].tolist()) for i in range(n)]


def training_step_seconds(
    model: nn.Module, examples: list[Example], batch_size: int, steps: int, device: str = "cpu"
) -> float:
    """Seconds per batch of plain training forward+backward (weight gradients, no hooks), the loss the
    logging uses (summed per-example next-token loss); one warm-up batch first, no optimizer step."""
    params = [p for p in model.parameters()]
    saved = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)

    def step(batch: list[Example]) -> None:
        input_ids = torch.tensor([e.input_ids for e in batch], device=device)  # [B, T]
        logits = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits  # [B, T, V]
        per_example_loss(logits, input_ids).sum().backward()
        model.zero_grad(set_to_none=True)

    try:
        return _per_batch_seconds(step, examples, batch_size, steps, device)
    finally:
        for p, flag in zip(params, saved, strict=True):
            p.requires_grad_(flag)


def _per_batch_seconds(
    step: Callable[[list[Example]], None], examples: list[Example], batch_size: int, steps: int, device: str
) -> float:
    batches = [examples[i : i + batch_size] for i in range(0, len(examples), batch_size)]
    if len(batches) < steps + 1:
        raise ConfigError(f"{len(examples)} examples make {len(batches)} batches; the timing needs {steps + 1}")
    step(batches[0])
    synchronize(device)
    start = time.perf_counter()
    for batch in batches[1 : steps + 1]:
        step(batch)
    synchronize(device)
    return (time.perf_counter() - start) / steps
