"""A generated corpus of facts about fictional people, with known ground truth for attribution.

A tiny model trained on it memorises facts such as "Velmora Quist was born in Tharnwick";
each fact is stated in a few known documents, so a fact-tracing query ("Velmora Quist was
born in" → " Tharnwick") has a known set of relevant training documents and MRR / recall
measure whether an attribution method finds them.

Choices that keep the test honest:

- Entities are made-up names, so nothing is known before training.
- Values come from a small pool per relation and are shared across entities: the value
  token alone does not identify the relevant documents; the entity–value pairing does.
- Each fact is stated in `docs_per_fact` documents with different templates. The query
  uses the phrasing of exactly one of them, which opens its document (so the model can
  complete the prompt); the others paraphrase it anywhere in their document, so lexical
  overlap with the prompt finds only part of the answer.
- Documents about the same entity but another relation are hard negatives, and some
  documents state two facts about two different entities.
- Filler documents are prose about fictional towns, markets and weather. About a quarter
  of them mention one distractor: either an entity name or a value, never both, so they
  state no fact but defeat attribution by keyword matching on either half alone.
"""

from __future__ import annotations

import filecmp
import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dataworth.errors import ConfigError

# Presets for demos and benchmarks; "small" equals the defaults of generate_fact_corpus.
FACT_CORPUS_SIZES: dict[str, dict[str, int]] = {
    "small": {"n_entities": 40, "docs_per_fact": 3, "n_filler": 60},
    "medium": {"n_entities": 200, "docs_per_fact": 3, "n_filler": 400},
    "large": {"n_entities": 1000, "docs_per_fact": 4, "n_filler": 3000},
}

# Value pools are disjoint across relations and no value is a word of any template, so a
# value in a document can only come from a fact statement or a deliberate distractor.
# Lower-case values never start a sentence, which keeps matching case-sensitive.
RELATIONS: dict[str, dict[str, Any]] = {
    "birthplace": {
        "values": ["Tharnwick", "Oslenmoor", "Brackenford", "Velhaven", "Quorridge", "Ashmouth", "Drellin", "Saltmere"],
        "templates": [
            "{e} was born in {v}.",
            "The birthplace of {e} is {v}.",
            "{v} is the town where {e} was born.",
            "Long before moving away, {e} grew up in {v} as a child.",
            "According to the parish records, the hometown of {e} is {v}.",
        ],
    },
    "profession": {
        "values": [
            "cartographer",
            "beekeeper",
            "glassblower",
            "blacksmith",
            "librarian",
            "clockmaker",
            "potter",
            "herbalist",
        ],
        "templates": [
            "{e} works as a {v}.",
            "By trade, {e} is a {v}.",
            "Everyone in the district knows {e} as the local {v}.",
            "The job {e} has held for years is that of a {v}.",
            "Ask anyone and they will tell you that {e} earns a living as a {v}.",
        ],
    },
    "favourite_colour": {
        "values": ["crimson", "teal", "ochre", "violet", "indigo", "scarlet", "olive", "cobalt"],
        "templates": [
            "The favourite colour of {e} is {v}.",
            "{e} likes the colour {v} more than any other.",
            "When choosing paint, {e} always picks {v}.",
            "Most of the clothes {e} owns are {v}, the colour {e} loves best.",
            "If you ask {e} to name a favourite colour, the answer is {v}.",
        ],
    },
    "instrument": {
        "values": ["cello", "harp", "oboe", "lute", "flute", "banjo", "viola", "trumpet"],
        "templates": [
            "{e} plays the {v}.",
            "The instrument {e} practises every evening is the {v}.",
            "At the village concerts, {e} performs on the {v}.",
            "Years ago {e} took lessons on the {v} and never stopped playing.",
            "Music lovers know {e} for a talent with the {v}.",
        ],
    },
    "pet": {
        "values": ["ferret", "parrot", "tortoise", "hedgehog", "goat", "rabbit", "falcon", "lizard"],
        "templates": [
            "{e} keeps a pet {v}.",
            "The animal that lives with {e} is a {v}.",
            "Visitors to the house of {e} are greeted by a {v}.",
            "Every morning {e} feeds a much loved {v}.",
            "The only pet {e} has ever owned is a {v}.",
        ],
    },
}

# Around a fact: sentences that state nothing (some name the entity, which is harmless).
_CONTEXT = [
    "This is noted in an old almanac.",
    "Few people outside the valley know this.",
    "The archive copy was written out by hand.",
    "Neighbours still mention it now and then.",
    "{e} rarely talks about it.",
    "Many people have met {e} at the spring fair.",
    "A short letter from {e} confirms it.",
    "{e} once told this to a travelling merchant.",
]

_FILLER_PLACES = ["Greyhollow", "Marrowdale", "Pennick", "Uldbridge", "Corvenna", "Hask", "Wimberly", "Estrel"]
_FILLER = [
    "The market in {p} opens before dawn on the first day of each month.",
    "A narrow bridge crosses the river just north of {p}.",
    "In {p} the autumn rains usually last for three weeks.",
    "The old mill at {p} was rebuilt after the great flood.",
    "Travellers say the road to {p} is steep but well kept.",
    "Every summer {p} holds a boat race on the lake.",
    "The library of {p} lends maps of the surrounding hills.",
    "Bread from the bakeries of {p} is sold as far as the coast.",
    "A stone tower stands on the hill above {p}.",
    "Snow rarely settles in {p}, even in the coldest winters.",
    "The school in {p} teaches weaving and carpentry.",
    "Fishermen from {p} mend their nets on the pier each evening.",
]
# Distractors: a value or an entity in an innocent sentence.
_VALUE_DISTRACTORS = {
    "birthplace": "A cart loaded with wool left {p} for {v} at noon.",
    "profession": "The fair in {p} had a stall run by a visiting {v}.",
    "favourite_colour": "The banners over the square in {p} were dyed {v}.",
    "instrument": "Someone in {p} was heard playing a {v} late at night.",
    "pet": "A stray {v} wandered through the streets of {p} last spring.",
}
_ENTITY_DISTRACTORS = [
    "{e} passed through {p} on the way to the coast.",
    "A letter addressed to {e} was left at the inn in {p}.",
]
_DISTRACTOR_RATE = 0.25
_PAIR_RATE = 0.3  # share of fact statements placed in a two-fact document

_ONSETS = ["Vel", "Mor", "Ka", "Thes", "Bri", "Lo", "Quen", "Dar", "Ys", "Fen", "Ori", "Sa", "Tal", "Ne", "Cor", "Han"]
_MIDDLES = ["", "", "a", "e", "i", "o", "ra", "li", "ne", "va"]
_ENDINGS = ["ra", "n", "th", "wen", "lo", "mir", "sa", "dric", "ne", "ris", "bel", "ton"]
_SURNAME_HEADS = ["Qu", "Ald", "Mar", "Thorn", "Brisk", "Hol", "Fenn", "Varr", "Ost", "Pell", "Drum", "Yar", "Kest"]
_SURNAME_TAILS = ["ist", "ow", "by", "ane", "cott", "ley", "wyn", "ard", "ick", "emor", "ing", "ull"]


@dataclass
class FactCorpus:
    """Documents, the facts they state and one query per fact with its relevant documents."""

    documents: list[dict]
    facts: list[dict]
    queries: list[dict]
    params: dict = field(default_factory=dict)


def generate_fact_corpus(
    n_entities: int = 40,
    docs_per_fact: int = 3,
    n_filler: int = 60,
    seed: int = 0,
    relations_per_entity: int = 2,
) -> FactCorpus:
    """Generate the corpus; identical output for identical arguments (no global random state)."""
    if n_entities < 1:
        raise ConfigError(f"n_entities={n_entities} must be at least 1")
    if docs_per_fact < 1:
        raise ConfigError(f"docs_per_fact={docs_per_fact} must be at least 1")
    if n_filler < 0:
        raise ConfigError(f"n_filler={n_filler} must be 0 or more")
    if not 1 <= relations_per_entity <= len(RELATIONS):
        raise ConfigError(f"relations_per_entity={relations_per_entity} must be between 1 and {len(RELATIONS)}")
    rng = random.Random(seed)

    entities = _entity_names(n_entities, rng)
    facts = []
    for entity in entities:
        for relation in sorted(rng.sample(sorted(RELATIONS), relations_per_entity), key=list(RELATIONS).index):
            value = rng.choice(RELATIONS[relation]["values"])
            facts.append({"id": f"fact-{len(facts):04d}", "entity": entity, "relation": relation, "value": value})
    stated_in = _FactMatcher(facts)

    # One statement per (fact, template); the first template is the query's phrasing.
    statements, query_templates = [], {}
    for f in facts:
        templates = RELATIONS[f["relation"]]["templates"]
        query_t = rng.choice([t for t in templates if _is_promptable(t)])
        others = [t for t in templates if t != query_t]
        rng.shuffle(others)
        chosen = [query_t] + [others[i % len(others)] for i in range(docs_per_fact - 1)]
        query_templates[f["id"]] = query_t
        statements += [(f, _fill(t, f["entity"], f["value"]), i == 0) for i, t in enumerate(chosen)]
    rng.shuffle(statements)

    docs = []  # (text, source, fact_ids)
    while statements:
        group = [statements.pop()]
        if statements and rng.random() < _PAIR_RATE:
            partner = _find_partner(group[0], statements, stated_in)
            if partner is not None:
                group.append(statements.pop(partner))
        group.sort(key=lambda st: not st[2])
        sentences = [text for _, text, _ in group]
        for _ in range(rng.randint(0, 2)):
            context = _fill(rng.choice(_CONTEXT), rng.choice(group)[0]["entity"], "")
            if context not in sentences:
                sentences.append(context)
        # The query's phrasing opens its document, as the prompt opens the model's context:
        # a tiny model memorises token sequences more than facts and recalls a sentence
        # learnt mid-document poorly from position 0 (about 10 points of fact accuracy).
        opening = [sentences.pop(0)] if group[0][2] else []
        rng.shuffle(sentences)
        docs.append((" ".join(opening + sentences), "fact", sorted(f["id"] for f, _, _ in group)))

    for _ in range(n_filler):
        docs.append((_filler_document(rng, entities), "filler", []))

    rng.shuffle(docs)
    documents = [
        {"id": f"doc-{i:05d}", "text": text, "source": source, "fact_ids": fact_ids}
        for i, (text, source, fact_ids) in enumerate(docs)
    ]
    for d in documents:  # a broken template set must fail here, not in a silent evaluation
        stated = {f["id"] for f in stated_in(d["text"])}
        if stated != set(d["fact_ids"]):
            raise RuntimeError(
                f"document {d['id']} states {sorted(stated)} but is labelled {d['fact_ids']}: {d['text']!r}"
            )

    relevant: dict[str, list[str]] = {f["id"]: [] for f in facts}
    for d in documents:
        for fid in d["fact_ids"]:
            relevant[fid].append(d["id"])
    queries = []
    for i, f in enumerate(facts):
        prompt = _fill(query_templates[f["id"]], f["entity"], "\0").split(" \0")[0]
        queries.append(
            {
                "id": f"q-{i:04d}",
                "prompt": prompt,
                "completion": " " + f["value"],
                "fact_id": f["id"],
                "relevant_document_ids": relevant[f["id"]],
            }
        )
    params = dict(
        n_entities=n_entities,
        docs_per_fact=docs_per_fact,
        n_filler=n_filler,
        seed=seed,
        relations_per_entity=relations_per_entity,
    )
    return FactCorpus(documents=documents, facts=facts, queries=queries, params=params)


def facts_stated(text: str, facts: list[dict]) -> list[dict]:
    """Facts whose entity and value both occur in `text` as whole words (case-sensitive)."""
    return _FactMatcher(facts)(text)


class _FactMatcher:
    # One alternation over all names: the large preset has thousands of documents and entities.
    def __init__(self, facts: list[dict]):
        self.by_entity: dict[str, list[dict]] = {}
        for f in facts:
            self.by_entity.setdefault(f["entity"], []).append(f)
        names = sorted(self.by_entity, key=len, reverse=True)
        self.pattern = re.compile(r"(?<!\w)(" + "|".join(map(re.escape, names)) + r")(?!\w)")

    def __call__(self, text: str) -> list[dict]:
        present = dict.fromkeys(m.group(1) for m in self.pattern.finditer(text))
        return [f for e in present for f in self.by_entity[e] if _has_word(text, f["value"])]


def relevant_documents(queries: list[dict]) -> dict[str, set[str]]:
    """Query id → relevant document ids, the ground truth that fact_tracing_metrics takes."""
    return {q["id"]: set(q["relevant_document_ids"]) for q in queries}


def corpus_to_records(corpus: FactCorpus) -> dict[str, list[dict]]:
    """The rows of documents.jsonl, queries.jsonl and facts.jsonl."""
    return {"documents": corpus.documents, "queries": corpus.queries, "facts": corpus.facts}


def write_fact_corpus(corpus: FactCorpus, out_dir: str | Path) -> dict[str, Path]:
    """Write documents.jsonl, queries.jsonl and facts.jsonl into out_dir; returns their paths."""
    return write_records(corpus_to_records(corpus), out_dir)


def write_records(records: dict[str, list[dict]], out_dir: str | Path) -> dict[str, Path]:
    """Write each list of rows to out_dir/<name>.jsonl, atomically; returns the paths by name. A file that already
    holds exactly these rows is left as it is: its modification time, and so the fingerprint of an index's data
    (path, size, mtime), stays the same, and what was cached on it (an evaluation's retrained models) holds."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, rows in records.items():
        path = out / f"{name}.jsonl"
        tmp = path.with_suffix(".jsonl.tmp")  # readers never see a half-written file
        with tmp.open("w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        if path.is_file() and filecmp.cmp(tmp, path, shallow=False):
            tmp.unlink()
        else:
            os.replace(tmp, path)
        paths[name] = path
    return paths


def _entity_names(n: int, rng: random.Random) -> list[str]:
    names: dict[str, None] = {}
    attempts = 0
    while len(names) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ConfigError(f"could not draw {n} distinct names from the syllable lists; use fewer entities")
        first = rng.choice(_ONSETS) + rng.choice(_MIDDLES) + rng.choice(_ENDINGS)
        last = rng.choice(_SURNAME_HEADS) + rng.choice(_SURNAME_TAILS)
        names.setdefault(f"{first} {last}")
    return list(names)


def _is_promptable(template: str) -> bool:
    # The prompt is the text before the value, so it must hold the entity and end at a space.
    return template.index("{e}") < template.index("{v}") and template[template.index("{v}") - 1] == " "


def _fill(template: str, entity: str, value: str) -> str:
    return template.replace("{e}", entity).replace("{v}", value)


def _find_partner(first: tuple, statements: list[tuple], stated_in: _FactMatcher) -> int | None:
    # A partner about another entity, and no cross pairing (A with B's value being one of A's
    # facts) that would make the document state a fact it is not labelled with.
    f1 = first[0]
    for i in range(len(statements) - 1, max(-1, len(statements) - 9), -1):
        f2 = statements[i][0]
        if f2["entity"] == f1["entity"] or (first[2] and statements[i][2]):  # one query phrasing can open a document
            continue
        if {f["id"] for f in stated_in(first[1] + " " + statements[i][1])} == {f1["id"], f2["id"]}:
            return i
    return None


def _filler_document(rng: random.Random, entities: list[str]) -> str:
    picked = rng.sample(range(len(_FILLER)), rng.randint(1, 3))
    sentences = [_FILLER[i].replace("{p}", rng.choice(_FILLER_PLACES)) for i in picked]
    if rng.random() < _DISTRACTOR_RATE:
        place = rng.choice(_FILLER_PLACES)
        if rng.random() < 0.5:
            relation = rng.choice(sorted(RELATIONS))
            value = rng.choice(RELATIONS[relation]["values"])
            sentences.append(_VALUE_DISTRACTORS[relation].replace("{p}", place).replace("{v}", value))
        else:
            sentences.append(rng.choice(_ENTITY_DISTRACTORS).replace("{p}", place).replace("{e}", rng.choice(entities)))
        rng.shuffle(sentences)
    return " ".join(sentences)


def _has_word(text: str, word: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text) is not None
