"""A generated language-modelling corpus of short topical stories, for the linear datamodeling score.

LDS retrains dozens of models on random halves of a corpus and asks whether attribution
scores predict how each held-out query's loss moves. That only measures something when
which documents a half holds changes the query losses more than the training seed does,
and when each retraining takes seconds. Hence a few hundred one-to-three-sentence stories
(< 64 tokens) from a seeded grammar, and held-out query stories from the same grammar.

Choices that make the data matter:

- Each topic (the harbour, the farm, ...) has its own characters, places, objects, verbs
  and times of day, so documents of one topic teach the vocabulary of the others nothing.
- The seed draws collocations that hold across the whole corpus: every character has a
  home place, a favourite object and a friend; each object has one verb ("hauled the
  nets") and, per character, one adjective (Orlo's lantern is green, Tesk's is brass).
  Most slots follow them, the rest take any word of the topic, so a collocation is learnt
  only from the stories that repeat it, and a contradicting story pulls the other way.
- A story is about one character, who opens it (about eight stories each in the small preset).
- A query is a held-out story whose completion (its last three words) fills a collocated
  slot: a place, a friend or an object. At least three training stories of the same
  character state that completion and the prompt never does, so the query's loss depends
  on how many of those stories a random half holds, not on copying from the prompt.
- Query stories never occur in the corpus, and corpus documents are distinct.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from dataworth.errors import ConfigError

# Presets for demos and benchmarks; "small" equals the defaults of generate_lm_corpus.
LM_CORPUS_SIZES: dict[str, dict[str, int]] = {
    "small": {"n_documents": 300, "n_queries": 40, "n_topics": 6},
}

# Per topic: characters, roles, places (three words each, so a place is one completion),
# objects as (noun, verb that goes with it, adjectives one of which the seed fixes) and
# times. No word of one topic's lists appears in another's.
TOPICS: dict[str, dict[str, list]] = {
    "harbour": {
        "characters": ["Orlo", "Brannagh", "Tesk", "Mirren", "Quell", "Dovan"],
        "roles": ["ferryman", "sailmaker", "lamplighter", "netmender"],
        "places": [
            "the north pier",
            "the salt sheds",
            "the lighthouse steps",
            "the fish market",
            "the outer breakwater",
        ],
        "objects": [
            ("nets", "hauled", ["tarred", "knotted", "heavy"]),
            ("lantern", "polished", ["brass", "dented", "green"]),
            ("anchor", "dragged", ["rusty", "barnacled", "iron"]),
            ("oars", "varnished", ["ashwood", "chipped", "spare"]),
            ("sail", "patched", ["torn", "canvas", "striped"]),
        ],
        "times": ["at low tide", "before the squall", "when the gulls returned", "after the catch"],
    },
    "farm": {
        "characters": ["Hobb", "Lettice", "Amsel", "Garrow", "Pim", "Wenna"],
        "roles": ["shepherd", "ploughman", "dairymaid", "beekeeper"],
        "places": ["the hay barn", "the lower paddock", "the apple orchard", "the duck pond", "the cider press"],
        "objects": [
            ("plough", "sharpened", ["wooden", "ox-drawn", "crooked"]),
            ("churn", "scrubbed", ["tin", "tall", "butter"]),
            ("hive", "smoked", ["straw", "humming", "wild"]),
            ("cart", "loaded", ["hay", "creaking", "painted"]),
            ("scythe", "honed", ["curved", "rusted", "notched"]),
        ],
        "times": ["at milking time", "after the harvest", "when the frost lifted", "before the rain"],
    },
    "forest": {
        "characters": ["Sorrel", "Fenwick", "Ilka", "Thorne", "Bramble", "Juniper"],
        "roles": ["woodcutter", "trapper", "charcoal burner", "forager"],
        "places": ["the mossy hollow", "the fallen oak", "the fern gully", "the badger sett", "the charcoal clearing"],
        "objects": [
            ("axe", "swung", ["keen", "twohanded", "borrowed"]),
            ("snare", "set", ["wire", "hidden", "tangled"]),
            ("basket", "heaped", ["birch", "lidded", "mossy"]),
            ("horn", "blew", ["hunting", "cracked", "antler"]),
            ("kindling", "gathered", ["dry", "pine", "resinous"]),
        ],
        "times": ["at first light", "under the full moon", "when the owls called", "after the snowfall"],
    },
    "castle": {
        "characters": ["Lady Ysolde", "Sir Aldous", "Margery", "Percival", "Roswitha", "Edric"],
        "roles": ["steward", "herald", "falconer", "chamberlain"],
        "places": ["the great hall", "the east tower", "the rose garden", "the royal chapel", "the castle kitchens"],
        "objects": [
            ("banner", "unfurled", ["silken", "embroidered", "faded"]),
            ("goblet", "filled", ["gemmed", "jewelled", "silver"]),
            ("falcon", "hooded", ["peregrine", "restless", "grey"]),
            ("key", "turned", ["gilded", "ornate", "secret"]),
            ("tapestry", "mended", ["woven", "ancient", "crimson"]),
        ],
        "times": ["during the feast", "before the tournament", "at vespers", "when the king rode out"],
    },
    "mine": {
        "characters": ["Grud", "Halvard", "Tamsin", "Ebb", "Korrin", "Nessa"],
        "roles": ["tunneller", "assayer", "pitman", "lampman"],
        "places": ["the deep shaft", "the copper seam", "the flooded gallery", "the ore chute", "the pithead winch"],
        "objects": [
            ("pickaxe", "wielded", ["blunt", "steel", "dwarven"]),
            ("lamp", "trimmed", ["miners", "smoky", "safety"]),
            ("ore", "sorted", ["copper", "glittering", "raw"]),
            ("rope", "coiled", ["hemp", "frayed", "greasy"]),
            ("wagon", "pushed", ["rattling", "ore", "laden"]),
        ],
        "times": ["at the shift bell", "after the blasting", "when the pumps failed", "before the inspection"],
    },
    "bakery": {
        "characters": ["Crumbe", "Odile", "Rufus", "Pernelle", "Barnaby", "Clemence"],
        "roles": ["baker", "pastry cook", "miller", "delivery boy"],
        "places": ["the stone oven", "the flour loft", "the front counter", "the cellar door", "the cooling racks"],
        "objects": [
            ("dough", "kneaded", ["sourdough", "sticky", "rye"]),
            ("loaves", "stacked", ["crusty", "warm", "braided"]),
            ("tray", "greased", ["enamel", "sooty", "wide"]),
            ("flour", "sifted", ["wholemeal", "fine", "spelt"]),
            ("tarts", "glazed", ["plum", "honey", "lemon"]),
        ],
        "times": ["before dawn", "at the noon rush", "on fair day", "after closing"],
    },
    "library": {
        "characters": ["Master Quillon", "Ottilie", "Benedek", "Solveig", "Ansel", "Marguerite"],
        "roles": ["archivist", "copyist", "bookbinder", "translator"],
        "places": [
            "the reading room",
            "the map cabinet",
            "the scriptorium desk",
            "the locked stacks",
            "the spiral stair",
        ],
        "objects": [
            ("ledger", "inked", ["leatherbound", "water-stained", "thick"]),
            ("scroll", "unrolled", ["brittle", "sealed", "vellum"]),
            ("quill", "dipped", ["goose", "splayed", "blackened"]),
            ("atlas", "consulted", ["foxed", "oversized", "annotated"]),
            ("candle", "lit", ["beeswax", "guttering", "tallow"]),
        ],
        "times": ["after compline", "by lamplight", "during the night vigil", "when the snow fell"],
    },
    "river": {
        "characters": ["Wat", "Elowen", "Stig", "Marisol", "Tobiah", "Runa"],
        "roles": ["boatman", "eel catcher", "lock keeper", "reed cutter"],
        "places": ["the weir pool", "the willow bank", "the old lock", "the ferry landing", "the reed beds"],
        "objects": [
            ("punt", "poled", ["flatbottomed", "leaky", "blue"]),
            ("eel trap", "emptied", ["wicker", "sunken", "baited"]),
            ("reeds", "bundled", ["rustling", "golden", "wet"]),
            ("sluice gate", "opened", ["stiff", "oaken", "dripping"]),
            ("rod", "cast", ["bamboo", "bent", "fishing"]),
        ],
        "times": ["at dusk", "when the current quickened", "after the flood", "in the morning mist"],
    },
}

# Sentence frames. {c} is the story's character; every slot but {time} is tied to {c} by the
# seed's collocations, and each frame ends in one (a place, a friend, an object): what queries complete.
_OPENINGS = [
    "{c} the {role} lived near {home}.",
    "{c} the {role} worked at {place}.",
    "{c} {verb} the {adj} {obj} at {place}.",
]
_FOLLOWERS = [
    "{c} {verb} the {adj} {obj} at {place}.",
    "Every day {c} walked down to {place}.",
    "{c} gave the {adj} {obj} to {friend}.",
    "{c} met {friend} {time} at {place}.",
    "{c} went out {time} with the {adj} {obj}.",
    "{friend} left the {adj} {obj} at {place}.",
    "Nobody but {c} ever {verb} the {adj} {obj}.",
]
_COLLOCATION_RATE = 0.8  # share of slots that follow the seed's collocation rather than any word of the topic
_COMPLETION_WORDS = 3  # a query's completion is its last words: " the north pier." and the like
_MAX_WORDS = 40  # well under 64 tokens for a tokenizer trained on the corpus
_MIN_SUPPORT = 3  # training stories of a query's character that state its completion (about half in a random half)
_MAX_TRIES = 1000


@dataclass
class LMCorpus:
    """Training documents, held-out query stories split into prompt and completion, and the arguments."""

    documents: list[dict]
    queries: list[dict]
    params: dict = field(default_factory=dict)


def generate_lm_corpus(n_documents: int = 300, n_queries: int = 40, n_topics: int = 6, seed: int = 0) -> LMCorpus:
    """Generate the corpus; identical output for identical arguments (no global random state).

    Documents are spread evenly over the first `n_topics` topics of `TOPICS`, and so are
    queries. Documents are {id, text, source (topic name)}; queries are {id, prompt,
    completion (its last words, with a leading space), topic}.
    """
    if not 1 <= n_topics <= len(TOPICS):
        raise ConfigError(f"n_topics={n_topics} must be between 1 and {len(TOPICS)} (the topics defined in TOPICS)")
    if n_documents < n_topics:
        raise ConfigError(f"n_documents={n_documents} must be at least n_topics={n_topics}: one document per topic")
    if n_queries < 0:
        raise ConfigError(f"n_queries={n_queries} must be 0 or more")
    rng = random.Random(seed)
    topics = list(TOPICS)[:n_topics]
    worlds = {t: _draw_collocations(TOPICS[t], rng) for t in topics}

    # Characters take turns within their topic, so each has about the same number of stories.
    seen: set[str] = set()
    stories: dict[str, list[str]] = {}  # character -> their training stories
    docs = []
    for i in range(n_documents):
        topic = topics[i % n_topics]
        characters = TOPICS[topic]["characters"]
        character = characters[(i // n_topics) % len(characters)]
        text = _new_story(topic, worlds[topic], character, rng, seen)
        stories.setdefault(character, []).append(text)
        docs.append((text, topic))
    rng.shuffle(docs)
    documents = [{"id": f"doc-{i:05d}", "text": text, "source": topic} for i, (text, topic) in enumerate(docs)]

    queries = []
    for i in range(n_queries):
        topic = topics[i % n_topics]
        for _ in range(_MAX_TRIES):
            character = rng.choice(TOPICS[topic]["characters"])
            words = _new_story(topic, worlds[topic], character, rng, seen, query=True).split(" ")
            prompt, completion = " ".join(words[:-_COMPLETION_WORDS]), " ".join(words[-_COMPLETION_WORDS:])
            # The completion must be recalled from training stories of the character, never
            # copied from the prompt, or its loss would not depend on the training data.
            recalled = completion.rstrip(".")
            support = sum(_has_phrase(text, recalled) for text in stories.get(character, []))
            if support >= _MIN_SUPPORT and not _has_phrase(prompt, recalled):
                break
            seen.discard(" ".join(words))
        else:
            raise ConfigError(
                f"could not draw a query in topic {topic!r} whose completion {_MIN_SUPPORT} training stories "
                f"state: n_documents={n_documents} is too few for n_topics={n_topics}; use about 50 per topic"
            )
        seen.add(" ".join(words))
        queries.append({"id": f"q-{i:04d}", "prompt": prompt, "completion": " " + completion, "topic": topic})
    params = dict(n_documents=n_documents, n_queries=n_queries, n_topics=n_topics, seed=seed)
    return LMCorpus(documents=documents, queries=queries, params=params)


def corpus_to_records(corpus: LMCorpus) -> dict[str, list[dict]]:
    """The rows of documents.jsonl and queries.jsonl."""
    return {"documents": corpus.documents, "queries": corpus.queries}


def write_lm_corpus(corpus: LMCorpus, out_dir: str | Path) -> dict[str, Path]:
    """Write documents.jsonl and queries.jsonl into out_dir; returns their paths."""
    from dataworth.benchmarks.facts import write_records

    return write_records(corpus_to_records(corpus), out_dir)


def _draw_collocations(topic: dict, rng: random.Random) -> dict:
    characters = topic["characters"]
    objects = [name for name, _, _ in topic["objects"]]
    world = {
        "role": {c: rng.choice(topic["roles"]) for c in characters},
        "home": {c: rng.choice(topic["places"]) for c in characters},
        "favourite": {c: rng.choice(objects) for c in characters},
        "friend": {},
        # Whose the object is picks its adjective (Orlo's lantern is green, Tesk's is brass),
        # so "the green lantern" is learnt from Orlo's stories, not from the whole topic.
        "adjective": {
            (c, name): rng.choice(adjectives) for c in characters for name, _, adjectives in topic["objects"]
        },
        "verb": {name: verb for name, verb, _ in topic["objects"]},
    }
    for c in characters:
        world["friend"][c] = rng.choice([o for o in characters if o != c])
    return world


def _new_story(topic: str, world: dict, character: str, rng: random.Random, seen: set[str], query: bool = False) -> str:
    for _ in range(_MAX_TRIES):
        text = _story(TOPICS[topic], world, character, rng, collocated_end=query)
        if text not in seen:
            seen.add(text)
            return text
    raise ConfigError(f"could not draw a new story for {character!r}; ask for fewer documents or queries")


def _has_phrase(text: str, phrase: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(phrase)}(?!\w)", text) is not None


def _story(topic: dict, world: dict, character: str, rng: random.Random, collocated_end: bool = False) -> str:
    frames = [rng.choice(_OPENINGS)] + rng.sample(_FOLLOWERS, rng.randint(0, 2))
    sentences: list[str] = []
    for i, frame in enumerate(frames):
        sentence = _fill(frame, topic, world, character, rng, collocated_end and i == len(frames) - 1)
        if sentence not in sentences:  # an opening and a follower can share a frame
            sentences.append(sentence)
    text = " ".join(sentences)
    if len(text.split(" ")) > _MAX_WORDS:  # the frames are short; this guards edits to them
        raise RuntimeError(f"story of {len(text.split(' '))} words exceeds {_MAX_WORDS}: {text!r}")
    return text


def _fill(frame: str, topic: dict, world: dict, character: str, rng: random.Random, collocated: bool = False) -> str:
    def pick(usual: str, pool: list[str]) -> str:
        return usual if collocated or rng.random() < _COLLOCATION_RATE else rng.choice(pool)

    obj = pick(world["favourite"][character], [name for name, _, _ in topic["objects"]])
    others = [c for c in topic["characters"] if c != character]
    values = {
        "c": character,
        "role": world["role"][character],
        "home": world["home"][character],
        "place": pick(world["home"][character], topic["places"]),
        "obj": obj,
        "adj": world["adjective"][character, obj],
        "verb": world["verb"][obj],
        "friend": pick(world["friend"][character], others),
        "time": rng.choice(topic["times"]),
    }
    return frame.format(**values)
