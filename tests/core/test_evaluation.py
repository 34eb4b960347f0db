import pytest

from dataworth.evaluation.fact_tracing import fact_tracing_metrics, recall_at_k, reciprocal_rank, unique_in_order


def test_reciprocal_rank_hand_computed():
    assert reciprocal_rank(["a", "b", "c"], {"a"}) == 1.0
    assert reciprocal_rank(["a", "b", "c"], {"c", "b"}) == 0.5
    assert reciprocal_rank(["a", "b", "c"], {"z"}) == 0.0
    assert reciprocal_rank([], {"a"}) == 0.0


def test_duplicates_count_once_at_first_position():
    # Chunks of "a" fill ranks 1-3; distinct documents are a, b, c, so c is rank 3, not 5.
    ranked = ["a", "a", "b", "a", "c"]
    assert unique_in_order(ranked) == ["a", "b", "c"]
    assert reciprocal_rank(ranked, {"c"}) == pytest.approx(1 / 3)
    assert recall_at_k(ranked, {"c", "d"}, k=3) == 0.5
    assert recall_at_k(ranked, {"a"}, k=1) == 1.0


def test_recall_at_k_hand_computed():
    ranked = ["d1", "d2", "d3", "d4", "d5"]
    assert recall_at_k(ranked, {"d2", "d5", "d9"}, k=2) == pytest.approx(1 / 3)
    assert recall_at_k(ranked, {"d2", "d5", "d9"}, k=5) == pytest.approx(2 / 3)
    assert recall_at_k(ranked, {"d1"}, k=10) == 1.0


def test_fact_tracing_metrics_hand_computed():
    rankings = {
        "q1": ["x", "r1", "y", "r2"],  # rr 1/2, recall@2 = 1/2
        "q2": ["r3", "r3", "z"],  # rr 1, recall@2 = 1/1
        "q3": ["z", "y", "x"],  # rr 0, recall@2 = 0
    }
    relevant = {"q1": {"r1", "r2"}, "q2": ["r3"], "q3": {"r4"}, "unranked": {"r5"}}
    out = fact_tracing_metrics(rankings, relevant, k=2)
    assert out == {"mrr": pytest.approx(1.5 / 3), "recall@2": pytest.approx(1.5 / 3), "n_queries": 3}
    assert set(fact_tracing_metrics(rankings, relevant)) == {"mrr", "recall@10", "n_queries"}
    assert fact_tracing_metrics(rankings, relevant)["recall@10"] == pytest.approx((1 + 1 + 0) / 3)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="k=0"):
        recall_at_k(["a"], {"a"}, k=0)
    with pytest.raises(ValueError, match="relevant is empty"):
        recall_at_k(["a"], set(), k=1)
    with pytest.raises(ValueError, match="rankings is empty"):
        fact_tracing_metrics({}, {"q": {"a"}})
    with pytest.raises(ValueError, match="q9"):
        fact_tracing_metrics({"q9": ["a"]}, {"q1": {"a"}})
