"""TracIn over checkpoints: one index per checkpoint, a query that sums every mode over them (real Prefect engine,
LanceDB directories, MLflow store)."""

import json

import numpy as np
import pytest
import torch
from tiny import TINY_CORPUS, make_tiny_gpt2, tiny_index_config, write_tiny_assets

from dataworth.config import QueryConfig, ScoreConfig
from dataworth.errors import IndexMismatchError
from dataworth.evaluation.matrices import merge_matrices

pytestmark = pytest.mark.slow

MODES = ["dot", "influence", "relatif", "cosine", "trackstar"]
QUERIES = [
    {"id": "cats", "prompt": "Tova keeps three", "completion": " grey cats"},
    {"id": "bread", "prompt": "Bread is baked", "completion": " before dawn"},
    {"id": "mill", "prompt": "The river Ambel runs past", "completion": " the old mill."},
]


@pytest.fixture(scope="module")
def built(harness, tmp_path_factory):
    """Two checkpoints of one tiny model (other weights, same tokenizer), an index of the same corpus for each."""
    from transformers import AutoTokenizer

    from flows.index import index_flow

    root = write_tiny_assets(tmp_path_factory.mktemp("checkpoints"), TINY_CORPUS)
    tok = AutoTokenizer.from_pretrained(root / "model")
    make_tiny_gpt2(dtype=torch.float32, vocab=len(tok), seed=7).save_pretrained(root / "model2")
    tok.save_pretrained(root / "model2")
    (root / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUERIES))
    a = tiny_index_config(root, root / "a")
    b = tiny_index_config(root, root / "b")
    b = b.model_copy(update={"model": b.model.model_copy(update={"name_or_path": str(root / "model2")})})
    index_flow(a, progress=False)
    index_flow(b, progress=False)
    return root, a, b


def full_matrices(config: QueryConfig) -> dict[str, np.ndarray]:
    from flows.query import query_flow

    out = query_flow(config)
    methods, ids = merge_matrices([out["full_matrix"]])
    assert ids == [q["id"] for q in QUERIES]
    return methods


def query(root, a, index_uri, **kw) -> QueryConfig:
    return QueryConfig(
        index_uri=index_uri,
        queries_path=str(root / "queries.jsonl"),
        score=ScoreConfig(top_k=3, modes=MODES, full_matrix=True),
        tracking=a.tracking,
        **kw,
    )


def test_scores_are_the_weighted_sum_over_checkpoints(built):
    root, a, b = built
    alone_a = full_matrices(query(root, a, a.index_uri))
    alone_b = full_matrices(query(root, a, b.index_uri))
    summed = full_matrices(query(root, a, a.index_uri, checkpoint_indexes=[b.index_uri], checkpoint_weights=[1, 0.5]))
    for mode in MODES:
        expected = alone_a[mode] + 0.5 * alone_b[mode]
        assert np.allclose(summed[mode], expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max()), mode
        # a real sum: neither checkpoint alone
        assert not np.allclose(summed[mode], alone_a[mode], rtol=1e-3)


def test_the_checkpoint_sum_is_the_same_read_a_shard_at_a_time(built):
    """Batches of one shard: the indexes are read chunk by chunk, the next chunk while one is summed."""
    root, a, b = built
    kw = {"checkpoint_indexes": [b.index_uri], "checkpoint_weights": [1, 0.5]}
    whole = full_matrices(query(root, a, a.index_uri, **kw))
    config = query(root, a, a.index_uri, **kw)
    config = config.model_copy(update={"score": config.score.model_copy(update={"train_batch_size": 4})})
    assert a.logging.shard_size == 4  # one shard per chunk: as many chunks as shards
    by_shard = full_matrices(config)
    for mode in MODES:
        assert np.allclose(by_shard[mode], whole[mode], rtol=1e-5, atol=1e-6 * np.abs(whole[mode]).max()), mode


def test_checkpoint_indexes_of_another_corpus_are_refused_before_work(built, tmp_path):
    from flows.index import index_flow
    from flows.query import query_flow

    root, a, _b = built
    other = tiny_index_config(root, tmp_path)
    docs = tmp_path / "other.jsonl"
    docs.write_text("".join(json.dumps({"id": f"x{i}", "text": t}) + "\n" for i, t in enumerate(TINY_CORPUS[:5])))
    other = other.model_copy(update={"data": other.data.model_copy(update={"dataset": str(docs)})})
    index_flow(other, progress=False)
    with pytest.raises(IndexMismatchError, match="other data"):
        query_flow(query(root, a, a.index_uri, checkpoint_indexes=[other.index_uri]))


def test_config_errors_name_the_fix(built):
    root, a, b = built
    with pytest.raises(ValueError, match="one weight per index"):
        query(root, a, a.index_uri, checkpoint_indexes=[b.index_uri], checkpoint_weights=[1.0])
    with pytest.raises(ValueError, match="rerank"):
        QueryConfig(
            index_uri=a.index_uri,
            score=ScoreConfig(modes=["hybrid-rerank-dot"]),
            checkpoint_indexes=[b.index_uri],
        )
    with pytest.raises(ValueError, match="shards_per_task"):
        QueryConfig(index_uri=a.index_uri, score=ScoreConfig(shards_per_task=1), checkpoint_indexes=[b.index_uri])
    with pytest.raises(ValueError, match="repeats"):
        QueryConfig(index_uri=a.index_uri, checkpoint_indexes=[a.index_uri])
    assert "checkpoint_indexes" not in QueryConfig(index_uri=a.index_uri).model_dump()
