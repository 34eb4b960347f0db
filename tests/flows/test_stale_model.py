"""Nothing silently stale: a query checks the index's model against the fingerprint its manifest recorded, before
any cached task could hand back the old model's scores; a model copied elsewhere keeps its fingerprint."""

import shutil

import pytest
import torch
from tiny import TINY_CORPUS, make_tiny_gpt2, tiny_index_config, write_tiny_assets
from transformers import AutoConfig

from dataworth.config import ModelConfig, QueryConfig, QuerySpec, ScoreConfig
from dataworth.errors import IndexMismatchError
from dataworth.fingerprint import model_fingerprint
from storage import IndexStore

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_model_fingerprint_follows_content_not_place(tmp_path):
    root = write_tiny_assets(tmp_path / "a", TINY_CORPUS[:3])
    before = model_fingerprint(ModelConfig(name_or_path=str(root / "model")))
    shutil.copytree(root / "model", tmp_path / "elsewhere")  # new path, new modification times
    assert model_fingerprint(ModelConfig(name_or_path=str(tmp_path / "elsewhere"))) == before
    cfg = ModelConfig(name_or_path=str(tmp_path / "elsewhere"))
    # Same shapes, other weights: a retrained checkpoint.
    shape = AutoConfig.from_pretrained(tmp_path / "elsewhere")
    make_tiny_gpt2(dtype=torch.float32, vocab=shape.vocab_size, seed=1).save_pretrained(tmp_path / "elsewhere")
    assert model_fingerprint(cfg) != before
    # Another dtype loads other numbers from the same files.
    assert model_fingerprint(cfg.model_copy(update={"dtype": "float64"})) != model_fingerprint(cfg)


def test_a_replaced_model_fails_the_query_instead_of_returning_old_scores(harness, tmp_path):
    from flows.index import index_flow
    from flows.query import query_flow

    assets = write_tiny_assets(tmp_path, TINY_CORPUS)
    cfg = tiny_index_config(assets, tmp_path)
    index_flow(cfg, progress=False)
    query = QueryConfig(
        index_uri=cfg.index_uri,
        queries=[QuerySpec(id="cats", prompt="Tova keeps three", completion=" grey cats")],
        score=ScoreConfig(top_k=3),
        tracking=cfg.tracking,
    )
    first = query_flow(query)
    assert query_flow(query)["score_run_id"] == first["score_run_id"]  # unchanged model: served as before

    # The model directory is replaced by a same-shape model with other weights.
    model = IndexStore(cfg.index_uri).read_manifest().config.model
    shape = AutoConfig.from_pretrained(model.name_or_path)
    make_tiny_gpt2(dtype=torch.float32, vocab=shape.vocab_size, seed=7).save_pretrained(model.name_or_path)
    with pytest.raises(IndexMismatchError, match="is not the one index .* was built with") as err:
        query_flow(query)
    assert "--overwrite" in err.value.fix
    with pytest.raises(IndexMismatchError):  # sharded scoring checks too
        query_flow(query.model_copy(update={"score": ScoreConfig(top_k=3, shards_per_task=1)}))


def _snapshot(root) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def test_a_query_writes_nothing_into_the_index(harness, tmp_path):
    """Queries of a published index on read-only or shared storage: with --results elsewhere, not one file of the
    index directory is created or changed (root ignores file modes, so this is checked on the files themselves)."""
    from flows.index import index_flow
    from flows.query import query_flow

    assets = write_tiny_assets(tmp_path, TINY_CORPUS)
    cfg = tiny_index_config(assets, tmp_path)
    index_flow(cfg, progress=False)
    before = _snapshot(tmp_path / "index")
    query = QueryConfig(
        index_uri=cfg.index_uri,
        results_uri=str(tmp_path / "elsewhere"),
        queries=[QuerySpec(id="cats", prompt="Tova keeps three", completion=" grey cats")],
        score=ScoreConfig(top_k=3, damping_factor=0.5),  # another damping: its norms are stored with the results
        tracking=cfg.tracking,
    )
    out = query_flow(query)
    sharded = query_flow(query.model_copy(update={"score": query.score.model_copy(update={"shards_per_task": 1})}))
    assert _snapshot(tmp_path / "index") == before
    results = IndexStore(str(tmp_path / "elsewhere"))
    assert (
        results.read_scores(out["score_run_id"]).num_rows
        == 4 * 3
        == results.read_scores(sharded["score_run_id"]).num_rows
    )
    assert out["report"].startswith(str(tmp_path / "elsewhere" / "reports"))
