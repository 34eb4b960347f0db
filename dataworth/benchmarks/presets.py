"""The generated benchmarks the `evaluate` flow (and the demo) run: corpus kind and generator kwargs."""

from __future__ import annotations

from dataworth.benchmarks.facts import FACT_CORPUS_SIZES

# name -> corpus kind and generator kwargs (the fact presets are the demo corpus sizes)
BENCHMARKS: dict[str, dict] = {
    **{f"facts-{size}": {"kind": "facts", "corpus": kwargs} for size, kwargs in FACT_CORPUS_SIZES.items()},
    # 20 epochs at lr 1e-3: at the demo recipe the model memorizes and seed noise swamps which half
    # it saw (variance across halves / across seeds 5.8 → 12.7 with this recipe).
    "lm-small": {"kind": "lm", "corpus": {}, "train": {"epochs": 20, "lr": 1e-3}},
}
