"""The benchmarks the `evaluate` flow (and the demo) run: corpus kind and generator kwargs."""

from __future__ import annotations

from dataworth.benchmarks.facts import FACT_CORPUS_SIZES

# name -> corpus kind and generator kwargs (the fact presets are the demo corpus sizes)
BENCHMARKS: dict[str, dict] = {
    **{f"facts-{size}": {"kind": "facts", "corpus": kwargs} for size, kwargs in FACT_CORPUS_SIZES.items()},
    # 20 epochs at lr 1e-3: at the demo recipe the model memorizes and seed noise swamps which half
    # it saw (variance across halves / across seeds 5.8 → 12.7 with this recipe).
    "lm-small": {"kind": "lm", "corpus": {}, "train": {"epochs": 20, "lr": 1e-3}},
    # facts-small's corpus, trained 10 epochs instead of 40: the model completes about two thirds of the facts
    # (fact accuracy 0.675 at seed 0; 0.375 after 8 epochs, 0.825 after 12), so a tail-patch step on a fact's
    # source can still raise its log-probability, which a model at log p ≈ 0 for every fact cannot show.
    "facts-partial": {"kind": "facts", "corpus": FACT_CORPUS_SIZES["small"], "train": {"epochs": 10}},
    # Real text: docstrings of the running interpreter's standard library (dataworth.benchmarks.docstrings),
    # trained with lm-small's recipe.
    "docstrings-small": {"kind": "docstrings", "corpus": {}, "train": {"epochs": 20, "lr": 1e-3}},
}
