"""Incremental runs: a rerun of `dataworth index` on a corpus that grew, lost a document and had one edited copies
the stored gradients of unchanged documents, computes only new and edited ones, drops deleted ones, and ends equal
to a fresh build; every published version stays queryable by its index_version while retention keeps it."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import TINY_CORPUS, make_tiny_gpt2, tiny_index_config, write_tiny_assets

from dataworth.config import DataConfig, IndexConfig, QueryConfig, QuerySpec, ScoreConfig
from storage import IndexStore, IndexStoreError, load_results

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

QUERY = QuerySpec(id="cats", prompt="Tova keeps three", completion=" grey cats")
NEW = ["The ferry to Osk leaves at nine.", "Tova sells grey cats at the market.", "Rain falls on Harrow."]


def write_docs(path, docs: dict[str, str]) -> None:
    path.write_text("".join(json.dumps({"id": k, "text": v}) + "\n" for k, v in docs.items()))


def stored(uri: str) -> dict[tuple[str, int], np.ndarray]:
    """(document id, chunk) → stored gradient of the published version."""
    store = IndexStore(uri)
    manifest = store.read_manifest()
    ex = store.read_examples(["example_id", "document_id", "chunk_index"], version=manifest.examples_version)
    key = {e: (d, c) for e, d, c in zip(*(ex.column(n).to_pylist() for n in ex.column_names))}
    out = {}
    for ids, vectors, _ in store.iter_gradients(64, version=manifest.gradients_version):
        out.update({key[int(i)]: v for i, v in zip(ids, vectors)})
    assert len(out) == manifest.num_examples
    return out


def top_documents(uri: str, tracking, version: int | None = None) -> tuple[int, list[str]]:
    from flows.query import query_flow

    cfg = QueryConfig(
        index_uri=uri, queries=[QUERY], score=ScoreConfig(top_k=4, modes=["dot"]), tracking=tracking
    ).model_copy(update={"index_version": version})
    out = query_flow(cfg)
    manifest = IndexStore(uri).read_manifest(out["index_version"])
    _, results = load_results(uri, out["score_run_id"], examples_version=manifest.examples_version)
    return out["index_version"], [r["document_id"] for r in results["dot"]["cats"]]


def test_nightly_rerun_copies_unchanged_documents_and_equals_a_fresh_build(harness, tmp_path):
    from flows.index import index_flow

    assets = write_tiny_assets(tmp_path, TINY_CORPUS + NEW)  # one tokenizer for every night's texts
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    night1 = {f"d{i}": t for i, t in enumerate(TINY_CORPUS)}
    write_docs(corpus / "a.jsonl", night1)
    # Random projections: a fresh build fits KFAC-whitened ones on its own corpus, while a growing index keeps
    # the projections it was created with, so only these make the two builds comparable.
    cfg = tiny_index_config(assets, tmp_path, precondition="none")
    cfg = cfg.model_copy(update={"data": DataConfig(dataset=str(corpus), id_column="id", max_length=16)})
    first = index_flow(cfg, progress=False)
    assert first["examples_reused"] == 0
    v1, before = top_documents(cfg.index_uri, cfg.tracking)
    assert v1 == first["index_version"] and "d1" in before
    vectors1 = stored(cfg.index_uri)

    # Night 2: d2 deleted (every later example moves to another id and shard), d4 edited, three documents added.
    night2 = {k: v for k, v in night1.items() if k != "d2"}
    night2["d4"] = "Cats sleep near the bell tower when it snows."
    write_docs(corpus / "a.jsonl", night2)
    write_docs(corpus / "b.jsonl", {f"n{i}": t for i, t in enumerate(NEW)})
    second = index_flow(cfg, progress=False)
    vectors2 = stored(cfg.index_uri)
    unchanged = {k for k in vectors1 if k[0] in night2 and k[0] != "d4"}
    assert second["examples_reused"] == len(unchanged) > 0
    changed = {k for k in vectors2 if k[0] == "d4" or k[0].startswith("n")}
    assert second["examples_computed"] == len(changed) and second["examples"] == len(unchanged) + len(changed)
    assert not any(d == "d2" for d, _ in vectors2)
    for k in unchanged:  # copied bit for bit, wherever the document moved
        np.testing.assert_array_equal(vectors2[k], vectors1[k])

    fresh_cfg = cfg.model_copy(update={"index_uri": str(tmp_path / "fresh")})
    index_flow(fresh_cfg, progress=False)
    fresh = stored(fresh_cfg.index_uri)
    assert fresh.keys() == vectors2.keys()
    for k, v in fresh.items():
        np.testing.assert_allclose(vectors2[k], v, rtol=1e-4, atol=1e-6)
    v2, after = top_documents(cfg.index_uri, cfg.tracking)
    assert v2 == second["index_version"] != v1
    assert after == top_documents(fresh_cfg.index_uri, fresh_cfg.tracking)[1]

    # The first version stays queryable by its index_version: the same answer as before the rerun.
    assert top_documents(cfg.index_uri, cfg.tracking, version=v1) == (v1, before)
    assert IndexStore(cfg.index_uri).published_versions() == [v1, v2]
    with pytest.raises(IndexStoreError, match=r"no published version 999.*versions are \[" + str(v1)):
        IndexStore(cfg.index_uri).read_manifest(999)

    # A night with nothing new logs nothing: every shard is served from the cache or copied.
    third = index_flow(cfg, progress=False)
    assert third["examples_computed"] == 0 and third["examples_reused"] == third["examples"] == second["examples"]
    assert stored(cfg.index_uri).keys() == vectors2.keys()


def test_a_changed_model_recomputes_everything(harness, tmp_path):
    """Gradients are only copied from a version logged by the same weights: a new checkpoint at the same path
    (another fingerprint) recomputes every example."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flows.index import index_flow

    assets = write_tiny_assets(tmp_path, TINY_CORPUS)
    cfg = tiny_index_config(assets, tmp_path)
    assert index_flow(cfg, progress=False)["examples_reused"] == 0
    vocab = len(AutoTokenizer.from_pretrained(assets / "model"))
    AutoModelForCausalLM.from_pretrained(assets / "model")  # the saved checkpoint loads; replace it by another
    make_tiny_gpt2(dtype=torch.float32, vocab=vocab, seed=1).save_pretrained(assets / "model")
    rerun = index_flow(cfg, progress=False)
    assert rerun["examples_reused"] == 0 and rerun["examples"] > 0


def test_training_on_into_the_model_directory_or_an_older_fingerprint_kind_copies_as_before(harness, tmp_path):
    """A Trainer writing checkpoints and logs into the model's directory changes nothing an index checks; an index
    published with the older fingerprint kind (every file under the directory) is queried, grown and published
    again under that kind while its model matches it, copying its unchanged gradients."""
    from dataworth import fingerprint
    from flows.index import index_flow

    assets = write_tiny_assets(tmp_path, TINY_CORPUS + NEW)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_docs(corpus / "a.jsonl", {f"d{i}": t for i, t in enumerate(TINY_CORPUS)})
    cfg = tiny_index_config(assets, tmp_path, precondition="none")
    cfg = cfg.model_copy(update={"data": DataConfig(dataset=str(corpus), id_column="id", max_length=16)})
    first = index_flow(cfg, progress=False)
    store = IndexStore(cfg.index_uri)
    legacy = fingerprint.model_fingerprint(cfg.model, fingerprint._LEGACY_KIND)
    store.publish_manifest(store.read_manifest().model_copy(update={"model_fingerprint": legacy}))
    top_documents(cfg.index_uri, cfg.tracking)  # checked against the older kind: the same model, so it answers

    write_docs(corpus / "b.jsonl", {f"n{i}": t for i, t in enumerate(NEW)})
    grown = index_flow(cfg, progress=False)
    assert (
        grown["examples_reused"] == first["examples"]
        and grown["examples_computed"] == grown["examples"] - first["examples"] > 0
    )
    assert IndexStore(cfg.index_uri).read_manifest().model_fingerprint == legacy

    # Training goes on into the model's directory: a checkpoint folder, logs, results. The current kind ignores
    # them; the older kind, which hashed them, no longer matches: the query is refused, and the next run records
    # the current kind (its shards are those the first run logged under it, from Prefect's cache).
    (assets / "model" / "checkpoint-5").mkdir()
    (assets / "model" / "checkpoint-5" / "model.safetensors").write_bytes(b"early")
    (assets / "model" / "trainer_state.json").write_text("{}")
    (assets / "model" / "eval_results.json").write_text("{}")
    current = fingerprint.model_fingerprint(cfg.model)
    with pytest.raises(Exception, match="is not the one index"):
        top_documents(cfg.index_uri, cfg.tracking)
    rebuilt = index_flow(cfg, progress=False)
    assert rebuilt["examples"] == grown["examples"]
    assert IndexStore(cfg.index_uri).read_manifest().model_fingerprint == current
    (assets / "model" / "checkpoint-10").mkdir()  # from now on, training on into the folder changes nothing
    (assets / "model" / "checkpoint-10" / "model.safetensors").write_bytes(b"later")
    (assets / "model" / "trainer_state.json").write_text('{"global_step": 10}')
    top_documents(cfg.index_uri, cfg.tracking)
    again = index_flow(cfg, progress=False)
    assert again["examples_computed"] == 0 and again["examples_reused"] == again["examples"]


def test_the_nightly_deployment_on_a_fresh_root_then_on_a_growing_corpus(harness, tmp_path, monkeypatch):
    """deployments/prefect.yaml's nightly-index, with its shipped parameters, run from a fresh root: it says what
    to run first, then indexes the corpus directory, and each later night copies what did not change."""
    import yaml

    from dataworth.errors import DataError, ModelError
    from flows.index import index_flow

    spec = yaml.safe_load((Path(__file__).resolve().parents[2] / "deployments" / "prefect.yaml").read_text())
    params = next(d for d in spec["deployments"] if d["name"] == "nightly-index")["parameters"]["config"]
    monkeypatch.chdir(tmp_path)
    cfg = IndexConfig.model_validate(params | {"tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'ml.db'}"}})
    with pytest.raises(ModelError, match="'dataworth-runs/demo/model' does not exist") as err:
        index_flow(cfg, progress=False)
    assert err.value.fix.startswith("run `dataworth demo` first")

    write_tiny_assets(tmp_path, TINY_CORPUS + NEW)  # what `dataworth demo` leaves: a model at the shipped path
    (tmp_path / "dataworth-runs" / "demo").mkdir(parents=True)
    (tmp_path / "model").rename(tmp_path / cfg.model.name_or_path)
    with pytest.raises(DataError, match=r"no data files match 'dataworth-runs/nightly/corpus/\*\.jsonl'") as err:
        index_flow(cfg, progress=False)
    assert err.value.fix.startswith("add .jsonl")

    corpus = tmp_path / "dataworth-runs" / "nightly" / "corpus"
    corpus.mkdir(parents=True)
    write_docs(corpus / "2026-11-24.jsonl", {f"d{i}": t for i, t in enumerate(TINY_CORPUS)})
    first = index_flow(cfg, progress=False)
    write_docs(corpus / "2026-11-25.jsonl", {f"n{i}": t for i, t in enumerate(NEW)})
    second = index_flow(cfg, progress=False)
    assert second["examples"] == first["examples"] + second["examples_computed"]
    assert second["examples_reused"] == first["examples"] and second["examples_computed"] > 0
    assert IndexStore(cfg.index_uri).published_versions() == [first["index_version"], second["index_version"]]
