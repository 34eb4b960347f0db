import inspect
import json
import platform
import random
import re
import textwrap
from collections import Counter

import pytest

from dataworth.benchmarks.docstrings import (
    DEFAULT_TOPICS,
    DOCSTRING_CORPUS_SIZES,
    generate_docstring_corpus,
    stdlib_docstrings,
    write_docstring_corpus,
)
from dataworth.benchmarks.presets import BENCHMARKS
from dataworth.errors import ConfigError, DataError

SENTENCE_END = re.compile(r"[.!?]\s+[A-Z\"'`(*]")


@pytest.fixture(scope="module")
def corpus():
    return generate_docstring_corpus()


def _key(text):
    return " ".join(text.casefold().split())


def _write(root, relative, source):
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source))


def _fake_stdlib(root, topics=("alpha", "beta"), n_single=14, n_multi=5):
    """A library of `topics` packages, each with single-sentence and two-sentence function docstrings, and
    directories the corpus must skip."""
    for t in topics:
        funcs = [
            f'def f{i}():\n    """Return the {t} value number {i} of the given widget registry."""\n'
            for i in range(n_single)
        ]
        funcs += [
            f'def g{i}():\n    """Open the {t} channel number {i} for reading.\n\n'
            f'    The channel stays open until the caller closes it again."""\n'
            for i in range(n_multi)
        ]
        _write(root, f"{t}/__init__.py", "\n".join(funcs))
    for skipped in ("test/test_alpha.py", "site-packages/thing/mod.py", "idlelib/editor.py", "alpha/tests/t.py"):
        _write(root, skipped, '"""A skipped module whose docstring must never be in the corpus."""\n')
    return root


def test_small_preset_is_the_default_and_registered():
    defaults = {k: p.default for k, p in inspect.signature(generate_docstring_corpus).parameters.items()}
    assert all(defaults[k] == v for k, v in DOCSTRING_CORPUS_SIZES["small"].items())
    assert BENCHMARKS["docstrings-small"]["kind"] == "docstrings"
    # lm-small's recipe: the retrainings of LDS stay seconds each
    assert BENCHMARKS["docstrings-small"]["train"] == BENCHMARKS["lm-small"]["train"]


def test_same_interpreter_same_corpus_and_other_seed_differs(corpus):
    assert generate_docstring_corpus() == corpus
    other = generate_docstring_corpus(seed=1)
    assert [d["text"] for d in other.documents] != [d["text"] for d in corpus.documents]
    assert [q["prompt"] for q in other.queries] != [q["prompt"] for q in corpus.queries]


def test_does_not_touch_global_random_state(tmp_path):
    lib = _fake_stdlib(tmp_path)
    random.seed(123)
    expected = random.random()
    random.seed(123)
    generate_docstring_corpus(n_documents=20, n_queries=4, topics=("alpha", "beta"), stdlib=lib)
    assert random.random() == expected


def test_shapes_and_schema(corpus):
    python = platform.python_version()
    assert len(corpus.documents) == 300 and len(corpus.queries) == 40
    assert corpus.params["python"] == python and corpus.params["topics"] == list(DEFAULT_TOPICS)
    assert Counter(d["source"] for d in corpus.documents) == {t: 50 for t in DEFAULT_TOPICS}
    assert sorted(Counter(q["topic"] for q in corpus.queries).values()) == [6, 6, 7, 7, 7, 7]
    for rows in (corpus.documents, corpus.queries):
        ids = [r["id"] for r in rows]
        assert len(set(ids)) == len(ids)
        assert {r["python"] for r in rows} == {python}  # a corpus file names the interpreter it came from
    for d in corpus.documents:
        assert set(d) == {"id", "text", "source", "origin", "python"}
        assert d["origin"].split("/")[0].removesuffix(".py").split(":")[0] == d["source"]
    for q in corpus.queries:
        assert set(q) == {"id", "prompt", "completion", "topic", "origin", "python"}


def test_documents_are_distinct_prose_within_the_limits(corpus):
    keys = [_key(d["text"]) for d in corpus.documents]
    assert len(set(keys)) == len(keys)
    for d in corpus.documents:
        text = d["text"]
        assert 8 <= len(text.split()) <= 30 and len(text) <= 200, text
        assert ">>>" not in text and not text.endswith(":") and text == text.strip()
        assert all(p == " ".join(p.split()) for p in text.split("\n\n")), text  # reflowed paragraphs
        assert not re.search(r"(^|/)(test|tests|idlelib|site-packages)/", d["origin"])


def test_query_docstrings_are_not_in_the_corpus(corpus):
    documents = [_key(d["text"]) for d in corpus.documents]
    origins = {d["origin"] for d in corpus.documents}
    texts = [_key(q["prompt"] + q["completion"]) for q in corpus.queries]
    assert len(set(texts)) == len(texts)
    for q, text in zip(corpus.queries, texts):
        assert q["origin"] not in origins
        assert not any(text in doc for doc in documents), q


def test_completion_is_the_last_sentence(corpus):
    for q in corpus.queries:
        prompt, completion = q["prompt"], q["completion"]
        assert completion in (" " + completion.lstrip(), "\n\n" + completion.lstrip()), q  # the space before it
        assert prompt == prompt.strip() and len(prompt.split()) >= 3
        assert 4 <= len(completion.split()) <= 20
        assert not SENTENCE_END.search(completion.strip()), q  # one sentence
        assert SENTENCE_END.search(prompt + completion), q  # after at least one other


def test_documents_and_queries_fit_the_context(corpus):
    """With the tokenizer prepare_benchmark trains on the documents, every document (+ EOS) and query fits the
    128-token context, and a prompt's tokens are the start of its docstring's (the completion splits as in
    training text)."""
    from dataworth.benchmarks.tiny_model import train_tokenizer

    tok = train_tokenizer([d["text"] for d in corpus.documents])
    lengths = [len(tok(d["text"])["input_ids"]) + 1 for d in corpus.documents]
    assert max(lengths) <= 100, max(lengths)  # 128 with room to spare
    for q in corpus.queries:
        prompt = tok(q["prompt"])["input_ids"]
        full = tok(q["prompt"] + q["completion"])["input_ids"]
        assert len(full) + 1 <= 128
        assert full[: len(prompt)] == prompt and len(full) > len(prompt), q


def test_write_round_trip(corpus, tmp_path):
    paths = write_docstring_corpus(corpus, tmp_path / "docs")
    assert set(paths) == {"documents", "queries"}
    for name, rows in (("documents", corpus.documents), ("queries", corpus.queries)):
        assert [json.loads(line) for line in paths[name].read_text().splitlines()] == rows
    assert not list((tmp_path / "docs").glob("*.tmp"))


def test_skips_tests_applications_and_installed_packages(tmp_path):
    lib = _fake_stdlib(tmp_path)
    pool = stdlib_docstrings(lib)
    assert {d.topic for d in pool} == {"alpha", "beta"}
    assert not any("skipped" in d.text for d in pool)
    assert stdlib_docstrings(lib, topics=["beta"]) == [d for d in pool if d.topic == "beta"]


def test_prose_rules(tmp_path):
    _write(
        tmp_path,
        "mod.py",
        '''
        """Module docstring: one short sentence about this little module."""

        def doctest():
            """Add two numbers and give back their sum to the caller.

            >>> add(1, 2)
            3
            """

        def block():
            """Parse the options given on the command line for the program.

            Options are read in this order, and later ones win over earlier ones:

                --verbose   say more
            """

        def signature():
            """getpass(prompt[, stream]) -> string

            Prompt for a password with echo turned off on the terminal."""

        def long_paragraph():
            """The first sentence here is short enough to keep in full. The second sentence is far too long to fit
            the thirty words that one document may hold, and so it is cut off at the end of the first sentence."""

        def long_first_sentence():
            """One single sentence that goes on and on with many words and never stops at any point before it has
            gone past the thirty words that a document may hold in this corpus."""

        def reflowed():
            """Return a copy of the list, with
            its items   sorted in place.

            The original list stays as it was before."""

        def too_short():
            """Do it now."""

        def duplicate():
            """return a COPY of the list,   with its items sorted in place.

            The original list stays as it was before."""

        def email_marker():
            """+
            Headers are folded using the folding algorithm of the policy."""

        class Dangling:
            """Get a child logger whose name is the dotted suffix, such that

            logging.getLogger('abc').getChild('def.ghi')

            is the same as logging.getLogger('abc.def.ghi')."""
        ''',
    )
    old = '"""This module is written for an old Python and cannot be parsed."""\nprint "2"\n'
    _write(tmp_path, "broken.py", old)  # a syntax error is skipped, not raised
    pool = stdlib_docstrings(tmp_path)
    by_name = {d.origin.split(":")[1]: d.text for d in pool}
    assert by_name == {
        "": "Module docstring: one short sentence about this little module.",
        "doctest": "Add two numbers and give back their sum to the caller.",
        "block": "Parse the options given on the command line for the program.",
        "signature": "Prompt for a password with echo turned off on the terminal.",
        "long_paragraph": "The first sentence here is short enough to keep in full.",
        "reflowed": "Return a copy of the list, with its items sorted in place.\n\n"
        "The original list stays as it was before.",
        "email_marker": "Headers are folded using the folding algorithm of the policy.",
    }
    assert list(by_name) == ["", "doctest", "block", "signature", "long_paragraph", "reflowed", "email_marker"]


def test_missing_stdlib_source_is_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "os.pyc").write_bytes(b"")  # compiled modules only, as some distributions ship
    with pytest.raises(DataError, match=r"no Python source files under .*lib.*without its \.py sources") as err:
        generate_docstring_corpus(stdlib=tmp_path / "lib")
    assert "stdlib=" in err.value.fix
    import sysconfig

    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"stdlib": str(tmp_path / "missing")})
    with pytest.raises(DataError, match="no Python source files under .*missing"):
        generate_docstring_corpus()


def test_too_small_topic_is_a_clear_error(tmp_path):
    lib = _fake_stdlib(tmp_path, n_single=3, n_multi=2)
    with pytest.raises(ConfigError, match=r"topic 'alpha' has 5 usable docstrings .* fewer than the 10 documents"):
        generate_docstring_corpus(n_documents=20, n_queries=2, topics=("alpha", "beta"), stdlib=lib)
    with pytest.raises(ConfigError, match=r"topic 'gamma' has 0 usable docstrings"):
        generate_docstring_corpus(n_documents=4, n_queries=0, topics=("alpha", "gamma"), stdlib=lib)
    with pytest.raises(ConfigError, match=r"topic 'alpha' has 2 docstrings of two or more sentences"):
        generate_docstring_corpus(n_documents=2, n_queries=6, topics=("alpha", "beta"), stdlib=lib)


def test_a_docstring_inside_a_longer_one_is_never_a_query(tmp_path):
    inner = "Find the first element that matches the path.\n\nReturn None when no element was found there."
    _write(tmp_path, "alpha/__init__.py", f'def find():\n    """{inner}"""\n')
    _write(tmp_path, "alpha/tree.py", f'def find():\n    """{inner} Same as the root\'s find."""\n')
    for seed in range(4):
        corpus = generate_docstring_corpus(n_documents=1, n_queries=1, topics=("alpha",), stdlib=tmp_path, seed=seed)
        assert corpus.queries[0]["origin"] == "alpha/tree.py:find"
        assert corpus.documents[0]["text"] == inner  # the longer query holds it, not the other way round
    # A completion of 6+ words leaves only the inner one, which a longer docstring holds: no query at all.
    with pytest.raises(ConfigError, match="has 0 docstrings of two or more sentences, inside no other"):
        generate_docstring_corpus(
            n_documents=1, n_queries=1, topics=("alpha",), stdlib=tmp_path, min_completion_words=6
        )


def test_queries_are_held_out_on_a_small_library(tmp_path):
    lib = _fake_stdlib(tmp_path)
    small = generate_docstring_corpus(n_documents=20, n_queries=6, topics=("alpha", "beta"), stdlib=lib, seed=3)
    assert Counter(d["source"] for d in small.documents) == {"alpha": 10, "beta": 10}
    assert Counter(q["topic"] for q in small.queries) == {"alpha": 3, "beta": 3}
    held_out = {q["prompt"] + q["completion"] for q in small.queries}
    assert not held_out & {d["text"] for d in small.documents}
    assert all(q["completion"] == "\n\nThe channel stays open until the caller closes it again." for q in small.queries)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"topics": ()}, "topics="),
        ({"topics": ("email", "email")}, "topics="),
        ({"n_documents": 3}, "n_documents=3"),
        ({"n_queries": -1}, "n_queries=-1"),
        ({"min_words": 40}, "min_words=40"),
        ({"max_chars": 0}, "max_chars=0"),
        ({"min_completion_words": 0}, "min_completion_words=0"),
    ],
)
def test_bad_arguments_name_the_value(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        generate_docstring_corpus(**kwargs)
