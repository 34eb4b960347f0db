"""Linear datamodeling score: subsets, predictions, Spearman against scipy, LDS limits."""

import numpy as np
import pytest

from dataworth.evaluation.lds import (
    linear_datamodeling_score,
    pearson,
    predicted_subset_scores,
    sample_subsets,
    spearman,
)


def test_sample_subsets_sizes_and_determinism():
    masks = sample_subsets(101, 30, fraction=0.3, seed=4)
    assert masks.shape == (30, 101) and masks.dtype == bool
    assert (masks.sum(axis=1) == round(0.3 * 101)).all()
    assert np.array_equal(masks, sample_subsets(101, 30, fraction=0.3, seed=4))
    assert not np.array_equal(masks, sample_subsets(101, 30, fraction=0.3, seed=5))
    assert len({m.tobytes() for m in masks}) == 30  # distinct subsets
    # Every example is included about fraction of the time.
    freq = sample_subsets(50, 2000, seed=0).mean(axis=0)
    assert np.abs(freq - 0.5).max() < 0.06


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_examples=10, n_subsets=5, fraction=1.0), "fraction=1.0"),
        (dict(n_examples=10, n_subsets=5, fraction=0.01), "rounds to 0"),
        (dict(n_examples=10, n_subsets=0), "n_subsets=0"),
        (dict(n_examples=1, n_subsets=5), "n_examples=1"),
    ],
)
def test_sample_subsets_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample_subsets(**kwargs)


def test_predicted_subset_scores_is_a_masked_sum():
    scores = np.arange(12, dtype=float).reshape(3, 4)
    masks = np.array([[1, 0, 1, 0], [0, 0, 0, 1]], dtype=bool)
    assert np.array_equal(predicted_subset_scores(scores, masks), [[2, 3], [10, 7], [18, 11]])
    with pytest.raises(ValueError, match=r"\(3, 4\).*\(2, 5\)"):
        predicted_subset_scores(scores, np.zeros((2, 5), dtype=bool))
    with pytest.raises(ValueError, match="boolean"):
        predicted_subset_scores(scores, masks.astype(int))


def test_spearman_and_pearson_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for trial in range(20):
        n = int(rng.integers(3, 60))
        a = rng.normal(size=n)
        b = a + rng.normal(size=n)
        if trial % 2:  # heavy ties on both sides
            a, b = np.round(a), np.round(b * 2) / 2
        assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)
        assert pearson(a, b) == pytest.approx(stats.pearsonr(a, b).statistic, abs=1e-12)
    assert spearman([1, 2, 2, 3], [4, 3, 3, 1]) == pytest.approx(-1.0)
    assert np.isnan(spearman([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError, match=r"\(3,\) and \(4,\)"):
        spearman([1, 2, 3], [1, 2, 3, 4])


def _setup(n_queries=40, n_examples=300, n_subsets=120, seed=0):
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(n_queries, n_examples))
    masks = sample_subsets(n_examples, n_subsets, seed=seed)
    return rng, scores, masks


def test_perfect_datamodel_scores_one():
    rng, scores, masks = _setup()
    predicted = predicted_subset_scores(scores, masks)
    actual = 3.0 * predicted + 7.0 + 1e-3 * predicted.std() * rng.normal(size=predicted.shape)
    out = linear_datamodeling_score(scores, masks, actual)
    assert out["n_valid"] == 40 and out["per_query"].shape == (40,)
    assert out["lds"] > 0.999
    # Negating the outcome (loss instead of log-probability) flips the sign: the convention matters.
    assert linear_datamodeling_score(scores, masks, -actual)["lds"] < -0.999


def test_random_datamodel_scores_zero():
    # Independent outcomes: each per-query Spearman has sd ≈ 1/sqrt(119), the mean over 40
    # queries sd ≈ 0.0145; 0.07 is ~5 sd, and the seed is fixed.
    rng, scores, masks = _setup()
    actual = rng.normal(size=(40, 120))
    out = linear_datamodeling_score(scores, masks, actual)
    assert abs(out["lds"]) < 0.07


def test_constant_outcomes_are_excluded_and_constant_predictions_score_zero():
    rng, scores, masks = _setup(n_queries=3)
    actual = predicted_subset_scores(scores, masks)
    actual[1] = 5.0  # this query's outcome never changes
    scores[2] = 0.0  # this method predicts nothing for query 2
    out = linear_datamodeling_score(scores, masks, actual)
    assert out["n_valid"] == 2
    assert np.isnan(out["per_query"][1])
    assert out["per_query"][0] == pytest.approx(1.0) and out["per_query"][2] == 0.0
    assert out["lds"] == pytest.approx(0.5)
    actual[:] = 1.0
    with pytest.raises(ValueError, match="constant across subsets for every query"):
        linear_datamodeling_score(scores, masks, actual)


def test_shape_errors_name_both_shapes():
    _, scores, masks = _setup(n_queries=4, n_examples=20, n_subsets=10)
    with pytest.raises(ValueError, match=r"\(4, 9\).*\(4, 10\)"):
        linear_datamodeling_score(scores, masks, np.zeros((4, 9)))
    with pytest.raises(ValueError, match=r"\(4, 20\).*\(10, 21\)"):
        linear_datamodeling_score(scores, np.zeros((10, 21), dtype=bool), np.zeros((4, 10)))
    with pytest.raises(ValueError, match="NaN"):
        linear_datamodeling_score(scores, masks, np.full((4, 10), np.nan))
