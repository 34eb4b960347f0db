import dataclasses
import json
import os
import re

import pytest

from dataworth.benchmarks.facts import (
    FACT_CORPUS_SIZES,
    RELATIONS,
    facts_stated,
    generate_fact_corpus,
    relevant_documents,
    write_fact_corpus,
)


@pytest.fixture(scope="module")
def corpus():
    return generate_fact_corpus()


def _word(text, word):
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text) is not None


def test_same_seed_same_corpus_and_other_seed_differs():
    a, b = generate_fact_corpus(seed=3), generate_fact_corpus(seed=3)
    assert a == b
    c = generate_fact_corpus(seed=4)
    assert [d["text"] for d in a.documents] != [d["text"] for d in c.documents]
    assert [f["entity"] for f in a.facts] != [f["entity"] for f in c.facts]


def test_does_not_touch_global_random_state():
    import random

    random.seed(123)
    expected = random.random()
    random.seed(123)
    generate_fact_corpus(n_entities=5, n_filler=5)
    assert random.random() == expected


def test_shapes_and_schema(corpus):
    assert len(corpus.facts) == 40 * 2
    assert len(corpus.queries) == len(corpus.facts)
    assert sum(d["source"] == "filler" for d in corpus.documents) == 60
    ids = [d["id"] for d in corpus.documents]
    assert len(set(ids)) == len(ids)
    for d in corpus.documents:
        assert set(d) == {"id", "text", "source", "fact_ids"}
        assert d["source"] in {"fact", "filler"}
        assert 1 <= len(re.findall(r"[.!?](?:\s|$)", d["text"])) <= 4, d["text"]
    for q in corpus.queries:
        assert set(q) == {"id", "prompt", "completion", "fact_id", "relevant_document_ids"}
        assert q["completion"].startswith(" ") and not q["prompt"].endswith(" ")
    for f in corpus.facts:
        assert f["value"] in RELATIONS[f["relation"]]["values"]


def test_each_fact_stated_docs_per_fact_times_and_some_docs_state_two(corpus):
    for q in corpus.queries:
        assert len(q["relevant_document_ids"]) == 3
    assert any(len(d["fact_ids"]) == 2 for d in corpus.documents)
    for d in corpus.documents:
        if len(d["fact_ids"]) == 2:
            a, b = (next(f for f in corpus.facts if f["id"] == fid) for fid in d["fact_ids"])
            assert a["entity"] != b["entity"]


def test_relevant_documents_contain_entity_and_value(corpus):
    docs = {d["id"]: d for d in corpus.documents}
    facts = {f["id"]: f for f in corpus.facts}
    for q in corpus.queries:
        fact = facts[q["fact_id"]]
        assert q["prompt"].find(fact["entity"]) >= 0
        assert q["completion"] == " " + fact["value"]
        for doc_id in q["relevant_document_ids"]:
            assert _word(docs[doc_id]["text"], fact["entity"]) and _word(docs[doc_id]["text"], fact["value"])
            assert q["fact_id"] in docs[doc_id]["fact_ids"]


def test_labels_match_what_documents_state(corpus):
    # Includes filler: a filler document never holds an entity together with one of its values.
    for d in corpus.documents:
        assert sorted(f["id"] for f in facts_stated(d["text"], corpus.facts)) == d["fact_ids"], d
    for d in corpus.documents:
        if d["source"] == "filler":
            for f in corpus.facts:
                assert not (_word(d["text"], f["entity"]) and _word(d["text"], f["value"]))


def test_filler_has_distractors_but_states_nothing(corpus):
    filler = [d["text"] for d in corpus.documents if d["source"] == "filler"]
    entities = {f["entity"] for f in corpus.facts}
    values = {v for r in RELATIONS.values() for v in r["values"]}
    assert any(any(_word(t, e) for e in entities) for t in filler)
    assert any(any(_word(t, v) for v in values) for t in filler)


def test_query_phrasing_is_trained_but_paraphrased_elsewhere(corpus):
    docs = {d["id"]: d["text"] for d in corpus.documents}
    for q in corpus.queries:
        texts = [docs[i] for i in q["relevant_document_ids"]]
        stated = q["prompt"] + q["completion"]
        assert sum(stated in t for t in texts) == 1, q
        assert not all(q["prompt"] in t for t in texts)


def test_values_shared_across_entities(corpus):
    by_value = {}
    for f in corpus.facts:
        by_value.setdefault(f["value"], set()).add(f["entity"])
    assert sum(len(e) > 1 for e in by_value.values()) >= len(by_value) // 2


def test_entities_are_distinct_generated_names(corpus):
    entities = list(dict.fromkeys(f["entity"] for f in corpus.facts))
    assert len(entities) == 40
    assert all(len(e.split()) == 2 and e.istitle() for e in entities)


def test_small_preset_is_the_default():
    assert generate_fact_corpus(**FACT_CORPUS_SIZES["small"]) == generate_fact_corpus()
    assert set(FACT_CORPUS_SIZES) == {"small", "medium", "large"}


def test_write_fact_corpus_round_trips(tmp_path, corpus):
    paths = write_fact_corpus(corpus, tmp_path / "data")
    assert {p.name for p in paths.values()} == {"documents.jsonl", "queries.jsonl", "facts.jsonl"}
    docs = [json.loads(line) for line in paths["documents"].read_text().splitlines()]
    queries = [json.loads(line) for line in paths["queries"].read_text().splitlines()]
    assert docs == corpus.documents and queries == corpus.queries
    assert not list((tmp_path / "data").glob("*.tmp"))
    assert relevant_documents(queries)[queries[0]["id"]] == set(queries[0]["relevant_document_ids"])


def test_rewriting_the_same_corpus_keeps_the_files(tmp_path, corpus):
    """The same rows written again leave each file (and its mtime, part of an index's data fingerprint) as it
    was; changed rows replace it."""
    from dataworth.config import DataConfig
    from dataworth.fingerprint import data_fingerprint

    paths = write_fact_corpus(corpus, tmp_path / "data")
    cfg = DataConfig(dataset=str(paths["documents"]), id_column="id")
    before = {n: p.stat().st_mtime_ns for n, p in paths.items()}
    fingerprint = data_fingerprint(cfg)
    for p in paths.values():  # an older time, so that a rewrite would show whatever the clock's resolution
        os.utime(p, ns=(before["documents"] - 10**9, before["documents"] - 10**9))
    kept = {n: p.stat().st_mtime_ns for n, p in paths.items()}
    write_fact_corpus(corpus, tmp_path / "data")
    assert {n: p.stat().st_mtime_ns for n, p in paths.items()} == kept
    assert data_fingerprint(cfg) != fingerprint  # (the utime above moved it; the rewrite did not)
    fingerprint = data_fingerprint(cfg)
    write_fact_corpus(corpus, tmp_path / "data")
    assert data_fingerprint(cfg) == fingerprint
    changed = dataclasses.replace(corpus, documents=corpus.documents[:-1])
    write_fact_corpus(changed, tmp_path / "data")
    assert paths["documents"].stat().st_mtime_ns != kept["documents"]
    assert paths["queries"].stat().st_mtime_ns == kept["queries"]
    assert not list((tmp_path / "data").glob("*.tmp"))


@pytest.mark.parametrize(
    "bad", [{"n_entities": 0}, {"docs_per_fact": 0}, {"n_filler": -1}, {"relations_per_entity": 9}]
)
def test_bad_arguments_name_the_value(bad):
    ((name, value),) = bad.items()
    with pytest.raises(ValueError, match=f"{name}={value}"):
        generate_fact_corpus(**bad)
