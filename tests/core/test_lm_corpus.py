import inspect
import json
import re
from collections import Counter

import pytest

from dataworth.benchmarks.stories import LM_CORPUS_SIZES, TOPICS, generate_lm_corpus, write_lm_corpus


@pytest.fixture(scope="module")
def corpus():
    return generate_lm_corpus()


def _character(text, topic):
    # Longest first: "Sir Aldous" must not be read as a shorter name.
    return next(c for c in sorted(TOPICS[topic]["characters"], key=len, reverse=True) if text.startswith(c + " "))


def test_small_preset_is_the_default():
    defaults = {k: p.default for k, p in inspect.signature(generate_lm_corpus).parameters.items() if k != "seed"}
    assert LM_CORPUS_SIZES["small"] == defaults


def test_same_seed_same_corpus_and_other_seed_differs():
    a, b = generate_lm_corpus(seed=3), generate_lm_corpus(seed=3)
    assert a == b
    c = generate_lm_corpus(seed=4)
    assert [d["text"] for d in a.documents] != [d["text"] for d in c.documents]
    assert [q["prompt"] for q in a.queries] != [q["prompt"] for q in c.queries]


def test_does_not_touch_global_random_state():
    import random

    random.seed(123)
    expected = random.random()
    random.seed(123)
    generate_lm_corpus(n_queries=5)
    assert random.random() == expected


def test_shapes_and_schema(corpus):
    assert len(corpus.documents) == 300 and len(corpus.queries) == 40
    assert corpus.params == {"n_documents": 300, "n_queries": 40, "n_topics": 6, "seed": 0}
    topics = list(TOPICS)[:6]
    assert Counter(d["source"] for d in corpus.documents) == {t: 50 for t in topics}
    assert set(Counter(q["topic"] for q in corpus.queries).values()) <= {6, 7}
    for rows in (corpus.documents, corpus.queries):
        ids = [r["id"] for r in rows]
        assert len(set(ids)) == len(ids)
    texts = [d["text"] for d in corpus.documents]
    assert len(set(texts)) == len(texts)
    for d in corpus.documents:
        assert set(d) == {"id", "text", "source"}
        assert 1 <= len(re.findall(r"\.(?:\s|$)", d["text"])) <= 3, d["text"]
        assert len(d["text"].split()) <= 40
    for q in corpus.queries:
        assert set(q) == {"id", "prompt", "completion", "topic"}
        assert q["topic"] in topics


def test_topics_do_not_share_vocabulary():
    function_words = {"the", "at", "before", "after", "when", "in", "on", "by", "during", "under"}
    vocab = {
        t: set(
            " ".join(
                spec["characters"]
                + spec["roles"]
                + spec["places"]
                + spec["times"]
                + [" ".join([o, v, *a]) for o, v, a in spec["objects"]]
            ).split()
        )
        - function_words
        for t, spec in TOPICS.items()
    }
    for t, words in vocab.items():
        for other, other_words in vocab.items():
            if t < other:
                assert not words & other_words, (t, other, words & other_words)


def test_query_stories_are_not_in_the_corpus(corpus):
    texts = {d["text"] for d in corpus.documents}
    stories = [q["prompt"] + q["completion"] for q in corpus.queries]
    assert not texts & set(stories)
    assert len(set(stories)) == len(stories)


def test_prompt_and_completion(corpus):
    for q in corpus.queries:
        assert q["completion"].startswith(" ") and not q["prompt"].endswith(" ")
        assert len(q["completion"].split()) == 3 and q["completion"].endswith(".")
        assert q["prompt"] and q["prompt"][0].isupper()
        # Recalled from training stories, never copied from the prompt.
        assert q["completion"].strip().rstrip(".") not in q["prompt"]


def test_every_query_has_related_training_documents(corpus):
    by_topic = Counter(d["source"] for d in corpus.documents)
    for q in corpus.queries:
        assert by_topic[q["topic"]] >= 40
        character = _character(q["prompt"], q["topic"])
        phrase = re.compile(rf"(?<!\w){re.escape(q['completion'].strip().rstrip('.'))}(?!\w)")
        stating = [
            d for d in corpus.documents if _character(d["text"], d["source"]) == character and phrase.search(d["text"])
        ]
        assert len(stating) >= 3, q


def test_too_few_documents_for_the_queries_is_a_clear_error():
    with pytest.raises(ValueError, match="n_documents=12 is too few"):
        generate_lm_corpus(n_documents=12, n_queries=6)


def test_documents_fit_in_64_tokens(corpus):
    from dataworth.benchmarks.tiny_model import train_tokenizer

    tok = train_tokenizer([d["text"] for d in corpus.documents])
    assert max(len(tok(d["text"])["input_ids"]) for d in corpus.documents) < 64
    for q in corpus.queries[:10]:  # the prompt splits where the completion starts, as in training text
        prompt = tok(q["prompt"])["input_ids"]
        assert tok(q["prompt"] + q["completion"])["input_ids"][: len(prompt)] == prompt


def test_write_round_trip(corpus, tmp_path):
    paths = write_lm_corpus(corpus, tmp_path / "lm")
    assert set(paths) == {"documents", "queries"}
    for name, rows in (("documents", corpus.documents), ("queries", corpus.queries)):
        assert paths[name] == tmp_path / "lm" / f"{name}.jsonl"
        assert [json.loads(line) for line in paths[name].read_text().splitlines()] == rows
    assert not list((tmp_path / "lm").glob("*.tmp"))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_topics": 0}, "n_topics=0"),
        ({"n_topics": len(TOPICS) + 1}, "n_topics="),
        ({"n_documents": 3}, "n_documents=3"),
        ({"n_queries": -1}, "n_queries=-1"),
    ],
)
def test_bad_arguments_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate_lm_corpus(**kwargs)
