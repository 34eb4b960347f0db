"""A real-text corpus for the linear datamodeling score: docstrings of the Python standard library.

The generated corpora (facts, stories) are built from templates, which flatters lexical
retrieval: a query shares its names and phrasing with exactly the documents that matter.
Real text is what users bring, and the docstrings of the standard library are real text
that nobody here wrote, by many authors on many topics, available offline on any machine
with Python: they are read with `ast` from the source files of the running interpreter.

Choices, and why:

- Sources: every `.py` file under `sysconfig.get_paths()["stdlib"]` in sorted path order, but
  not test suites, idlelib, turtledemo, bundled wheels (ensurepip), generated data
  (pydoc_data) or installed packages (site-packages): they are not library documentation.
  Module, class and function docstrings are taken in source order (`ast.get_docstring`
  cleans their indentation).
- Prose only: a document is a docstring's leading paragraphs up to the first one that is
  not prose (a doctest, an indented or bulleted block, a field list, a heading, a line
  ending in ':' that introduces one, a line that is mostly not words, such as a grammar or
  an expression); a paragraph that runs into such a block unfinished ("..., such that")
  goes with it. A leading signature line ("getpass(prompt[, stream]) -> string") and the
  email package's "+" marker are skipped. Whitespace inside a paragraph is collapsed to
  single spaces; paragraphs stay separated by a blank line.
- Length: at most `max_words` words and `max_chars` characters (30 and 200), so a document
  fits the tiny model's 128-token context with room to spare (with the 1,024-token BPE
  trained on the corpus, the longest of the small preset is 83 tokens on Python 3.11; the
  tests check every document with that tokenizer), and a model trains on 300 of them in
  1.5× lm-small's time. A longer docstring is cut after its last whole paragraph, or its
  first paragraph after its last whole sentence, that fits; one whose first sentence is
  too long is left out, and so is one of fewer than `min_words` words (8: "Initialize
  self." teaches nothing about a topic).
- Duplicates (the same text in two places, compared case- and whitespace-insensitively)
  are kept once, at their first place in path order.
- Topics: documents come from a few packages (by default six, from different corners of the
  library), `n_documents / len(topics)` each, so a held-out docstring of a package has
  dozens of training documents that share its vocabulary, and which of them a random half
  holds moves its loss (LDS measures nothing when every half teaches a query the same).
  Within a topic the documents are a seeded sample.
- Queries are held-out docstrings of the same topics, a seeded sample of those with two or
  more sentences whose last sentence has `min_completion_words` to `max_completion_words`
  words. The completion is that last sentence (with the space or blank line before it),
  the prompt everything before it, so prompt + completion is the docstring's text and
  the loss is taken on a whole sentence written about what the prompt introduces. A
  docstring that sits inside another (Element.find's inside ElementTree.find's) is no
  query, so a query's text is in no document, not even inside a longer one.
- The corpus depends on the interpreter's version (the library's docstrings change from one
  release to the next), so every document and query row records it (`python`), as does
  `params`: a corpus file, and every fingerprint taken of it, names the version it came
  from. The same interpreter and arguments always give the same corpus.
"""

from __future__ import annotations

import ast
import platform
import random
import re
import sysconfig
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dataworth.errors import ConfigError, DataError

# Presets for benchmarks; "small" equals the defaults of generate_docstring_corpus.
DOCSTRING_CORPUS_SIZES: dict[str, dict] = {
    "small": {"n_documents": 300, "n_queries": 40},
}
# Six packages far apart in the library: networking concurrency, mail, the import system, logging, XML,
# testing. Each has more than 100 usable docstrings on Python 3.11.
DEFAULT_TOPICS: tuple[str, ...] = ("asyncio", "email", "importlib", "logging", "xml", "unittest")

# Directory names that hold no library documentation: test suites, an application, demos, bundled
# wheels, generated data, installed third-party packages.
SKIPPED_DIRECTORIES = frozenset(
    {
        "test",
        "tests",
        "idle_test",
        "idlelib",
        "turtledemo",
        "ensurepip",
        "pydoc_data",
        "site-packages",
        "dist-packages",
        "__pycache__",
        "__phello__",
    }
)
_SKIPPED_FILES = frozenset({"__hello__.py"})  # a test module for frozen imports

# A sentence ends at . ! or ? followed by white space and a capital or an opening quote; "e.g. the" is no end.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'`(*])")
_SIGNATURE = re.compile(r"^[\w.]+\(.*\)(\s*->.*)?$")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
# A word of prose: letters (an apostrophe or hyphen inside), maybe quoted or bracketed, maybe punctuated.
_WORD = re.compile(r"^[\"'(`*]*[A-Za-z]+(?:['-][A-Za-z]+)*[\"')`*]*[.,;:!?]*[\"')`*]*$")
_MIN_WORD_SHARE = 0.6


@dataclass(frozen=True)
class Docstring:
    """One usable docstring: its top-level module or package, where it is (path:qualname) and its text."""

    topic: str
    origin: str
    text: str


@dataclass
class DocstringCorpus:
    """Training documents, held-out docstrings split into prompt and completion, and the arguments."""

    documents: list[dict]
    queries: list[dict]
    params: dict = field(default_factory=dict)


def stdlib_directory() -> Path:
    """The running interpreter's standard-library source directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_docstrings(
    stdlib: str | Path | None = None,
    topics: Sequence[str] | None = None,
    max_words: int = 30,
    max_chars: int = 200,
    min_words: int = 8,
) -> list[Docstring]:
    """Every usable docstring under `stdlib` (default: the running interpreter's), of the given topics (top-level
    modules or packages; default all), deduplicated, in path and source order; see the module docstring for what
    is usable and how a long one is cut."""
    root = Path(stdlib) if stdlib is not None else stdlib_directory()
    files = list(_source_files(root))
    if not files:
        raise DataError(
            f"no Python source files under {str(root)!r}: this interpreter's standard library ships without its "
            f".py sources (Python {platform.python_version()})",
            fix="install the standard library's sources (e.g. Debian's libpython3.X-stdlib, or a full python.org "
            "or pyenv build), or pass stdlib=<a directory of the library's .py files>",
        )
    seen: set[str] = set()
    found = []
    for path in files:
        relative = path.relative_to(root)
        topic = _topic(relative)
        if topics is not None and topic not in topics:
            continue
        for qualname, raw in _docstrings(path):
            text = _prose(raw, max_words, max_chars)
            if len(text.split()) < min_words:
                continue
            key = _normalized(text)
            if key in seen:
                continue
            seen.add(key)
            found.append(Docstring(topic=topic, origin=f"{relative.as_posix()}:{qualname}", text=text))
    return found


def generate_docstring_corpus(
    n_documents: int = 300,
    n_queries: int = 40,
    topics: Sequence[str] = DEFAULT_TOPICS,
    max_words: int = 30,
    max_chars: int = 200,
    min_words: int = 8,
    min_completion_words: int = 4,
    max_completion_words: int = 20,
    seed: int = 0,
    stdlib: str | Path | None = None,
) -> DocstringCorpus:
    """Draw the corpus; identical output for the same interpreter and arguments (no global random state).

    Documents are spread evenly over `topics` (top-level modules or packages of the standard library), and so
    are queries. Documents are {id, text, source (topic), origin (path:qualname), python}; queries are {id,
    prompt, completion (the last sentence, with the white space before it), topic, origin, python}.
    """
    topics = list(topics)
    if not topics or len(set(topics)) != len(topics):
        raise ConfigError(f"topics={topics} must name one or more distinct modules or packages of the stdlib")
    if n_documents < len(topics):
        raise ConfigError(f"n_documents={n_documents} must be at least one per topic ({len(topics)} topics)")
    if n_queries < 0:
        raise ConfigError(f"n_queries={n_queries} must be 0 or more")
    if not 1 <= min_completion_words <= max_completion_words:
        raise ConfigError(
            f"min_completion_words={min_completion_words} and max_completion_words={max_completion_words} must "
            "satisfy 1 <= min <= max"
        )
    if not 1 <= min_words <= max_words:
        raise ConfigError(f"min_words={min_words} and max_words={max_words} must satisfy 1 <= min <= max")
    if max_chars < 1:
        raise ConfigError(f"max_chars={max_chars} must be positive")
    pool = stdlib_docstrings(stdlib, topics, max_words=max_words, max_chars=max_chars, min_words=min_words)
    by_topic: dict[str, list[Docstring]] = {t: [] for t in topics}
    for doc in pool:
        if doc.topic in by_topic:
            by_topic[doc.topic].append(doc)
    rng = random.Random(seed)
    python = platform.python_version()
    pool_keys = [_normalized(d.text) for d in pool]

    def held_out(doc: Docstring) -> bool:
        # Distinct texts, but one may sit inside a longer one (Element.find's docstring inside ElementTree.find's):
        # such a query would be recalled verbatim from whichever holds it, so it is no query.
        key = _normalized(doc.text)
        return sum(key in other for other in pool_keys) == 1

    # Queries first, so the documents are drawn from what no query holds.
    wanted_docs = _spread(n_documents, len(topics))
    wanted_queries = _spread(n_queries, len(topics))
    chosen_queries: list[tuple[Docstring, int]] = []  # (docstring, where its completion starts)
    chosen_docs: list[Docstring] = []
    for topic, n_docs, n_q in zip(topics, wanted_docs, wanted_queries):
        candidates = by_topic[topic]
        if len(candidates) < n_docs + n_q:
            raise ConfigError(
                f"topic {topic!r} has {len(candidates)} usable docstrings in Python {python}'s standard library, "
                f"fewer than the {n_docs} documents and {n_q} queries asked of it",
                fix="ask for fewer documents, or name larger topics (top-level modules or packages of "
                f"{str(Path(stdlib) if stdlib is not None else stdlib_directory())!r}, such as {DEFAULT_TOPICS})",
            )
        order = list(range(len(candidates)))
        rng.shuffle(order)
        queries, rest = [], []
        for i in order:
            split = _completion_start(candidates[i].text, min_completion_words, max_completion_words)
            if len(queries) < n_q and split is not None and held_out(candidates[i]):
                queries.append((candidates[i], split))
            else:
                rest.append(candidates[i])
        if len(queries) < n_q:
            raise ConfigError(
                f"topic {topic!r} has {len(queries)} docstrings of two or more sentences, inside no other, whose "
                f"last sentence has {min_completion_words}-{max_completion_words} words, fewer than the {n_q} "
                "queries asked of it",
                fix="ask for fewer queries, or widen the completion's word range",
            )
        chosen_queries.extend(queries)
        chosen_docs.extend(rest[:n_docs])

    rng.shuffle(chosen_docs)
    documents = [
        {"id": f"doc-{i:05d}", "text": d.text, "source": d.topic, "origin": d.origin, "python": python}
        for i, d in enumerate(chosen_docs)
    ]
    queries = [
        {
            "id": f"q-{i:04d}",
            "prompt": d.text[:start].rstrip(),
            "completion": d.text[len(d.text[:start].rstrip()) :],
            "topic": d.topic,
            "origin": d.origin,
            "python": python,
        }
        for i, (d, start) in enumerate(chosen_queries)
    ]
    params = dict(
        n_documents=n_documents,
        n_queries=n_queries,
        topics=topics,
        max_words=max_words,
        max_chars=max_chars,
        min_words=min_words,
        min_completion_words=min_completion_words,
        max_completion_words=max_completion_words,
        seed=seed,
        python=python,
    )
    return DocstringCorpus(documents=documents, queries=queries, params=params)


def write_docstring_corpus(corpus: DocstringCorpus, out_dir: str | Path) -> dict[str, Path]:
    """Write documents.jsonl and queries.jsonl into out_dir; returns their paths."""
    from dataworth.benchmarks.facts import write_records

    return write_records({"documents": corpus.documents, "queries": corpus.queries}, out_dir)


def _source_files(root: Path) -> Iterator[Path]:
    if not root.is_dir():
        return
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if set(relative.parts[:-1]) & SKIPPED_DIRECTORIES or relative.name in _SKIPPED_FILES:
            continue
        if relative.parts[0].startswith("config-"):  # the build's Makefile helpers, not the library
            continue
        yield path


def _topic(relative: Path) -> str:
    return relative.parts[0].removesuffix(".py")


def _docstrings(path: Path) -> Iterator[tuple[str, str]]:
    """(qualified name, cleaned docstring) of the module and of every class and function in it, in source order."""
    with warnings.catch_warnings():  # newer interpreters warn about old escape sequences in old files
        warnings.simplefilter("ignore")
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError):  # a file for another Python, kept for reference: not documentation
            return

    def walk(node: ast.AST, qualname: str) -> Iterator[tuple[str, str]]:
        doc = ast.get_docstring(node, clean=True)
        if doc:
            yield qualname, doc
        for child in getattr(node, "body", []):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                yield from walk(child, f"{qualname}.{child.name}" if qualname else child.name)

    yield from walk(tree, "")


def _is_prose(paragraph: str) -> bool:
    lines = paragraph.splitlines()
    if ">>>" in paragraph or paragraph.rstrip().endswith(":"):  # a doctest, or what introduces a list or code
        return False
    for line in lines:
        stripped = line.strip()
        if stripped[:2] in ("- ", "* ", "+ ") or stripped.startswith((":", "..")):  # bullets, fields, directives
            return False
        if set(stripped) <= set("-=~^*#"):  # a heading's underline
            return False
        # After cleaning, an indented line is a block: code, a list, a field's text, a grammar.
        if line[:1] in (" ", "\t"):
            return False
    # Mostly words: a grammar or an expression written flush left is not prose either.
    tokens = paragraph.split()
    return sum(bool(_WORD.match(t)) for t in tokens) >= _MIN_WORD_SHARE * len(tokens)


def _fits(text: str, max_words: int, max_chars: int) -> bool:
    return len(text.split()) <= max_words and len(text) <= max_chars


def _prose(doc: str, max_words: int, max_chars: int) -> str:
    """The leading prose paragraphs of a docstring, within max_words and max_chars (see the module docstring)."""
    paragraphs = _PARAGRAPH_BREAK.split(doc.strip().removeprefix("+").strip())  # email's "+": extends the parent's
    if paragraphs and _SIGNATURE.match(" ".join(paragraphs[0].split())):
        paragraphs = paragraphs[1:]
    kept: list[str] = []
    for paragraph in paragraphs:
        if not _is_prose(paragraph):
            # "..., such that" before a code block says nothing without the block.
            if kept and not kept[-1].endswith((".", "!", "?", ")", '"', "'")):
                kept.pop()
            break
        text = " ".join(paragraph.split())
        if _fits("\n\n".join([*kept, text]), max_words, max_chars):
            kept.append(text)
            continue
        if not kept:  # a long first paragraph: its leading whole sentences
            sentences: list[str] = []
            for sentence in _SENTENCE_END.split(text):
                if not _fits(" ".join([*sentences, sentence]), max_words, max_chars):
                    break
                sentences.append(sentence)
            kept.append(" ".join(sentences))
        break
    return "\n\n".join(k for k in kept if k)


def _completion_start(text: str, min_words: int, max_words: int) -> int | None:
    """Where the last sentence of `text` starts, if it has two or more sentences and the last one has
    min_words to max_words words; else None."""
    starts = [m.end() for m in _SENTENCE_END.finditer(text)]
    if not starts:
        return None
    start = starts[-1]
    if not min_words <= len(text[start:].split()) <= max_words or len(text[:start].split()) < 3:
        return None
    return start


def _normalized(text: str) -> str:
    return " ".join(text.casefold().split())


def _spread(total: int, parts: int) -> list[int]:
    return [total // parts + (i < total % parts) for i in range(parts)]
