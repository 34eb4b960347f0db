"""Reading corpora from every supported source, chunking documents into examples, batching."""

import csv
import json
import re

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dataworth.benchmarks.tiny_model import train_tokenizer
from dataworth.config import DataConfig
from dataworth.data import Documents, chunk_documents, collate, encode_chat, load_documents
from dataworth.errors import DataError

ROWS = [
    {"id": "a", "text": "the cat sat on the mat.", "source": "web"},
    {"id": "b", "text": "the dog ran after the cat, twice.", "source": "books"},
    {"id": "c", "text": 'a bird sang "hello" in the tree.', "source": "web"},
]


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    # Keep the Arrow cache that `datasets` builds from local files inside the test's folder.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets-cache")


@pytest.fixture(scope="module")
def tokenizer():
    texts = [r["text"] for r in ROWS] * 10 + ["one two three four five six seven eight nine ten"] * 10
    return train_tokenizer(texts, vocab_size=300)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def load(path, **kw):
    return load_documents(DataConfig(dataset=str(path), **kw))


def assert_rows(docs: Documents, rows, ids=None, sources=None):
    assert docs.texts == [r["text"] for r in rows]
    assert docs.ids == (ids if ids is not None else [r["id"] for r in rows])
    assert docs.sources == (sources if sources is not None else [""] * len(rows))


# --- formats -------------------------------------------------------------------------------


def test_jsonl_with_id_and_source_columns(tmp_path):
    path = write_jsonl(tmp_path / "corpus.jsonl", ROWS)
    docs = load(path, id_column="id", source_column="source")
    assert_rows(docs, ROWS, sources=["web", "books", "web"])


def test_jsonl_without_id_column_numbers_rows(tmp_path):
    path = write_jsonl(tmp_path / "corpus.jsonl", ROWS)
    assert_rows(load(path), ROWS, ids=["0", "1", "2"])


def test_parquet(tmp_path):
    path = tmp_path / "corpus.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    assert_rows(load(path, id_column="id"), ROWS)


def test_csv_keeps_commas_and_quotes(tmp_path):
    path = tmp_path / "corpus.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "text"])
        writer.writeheader()
        writer.writerows({"id": r["id"], "text": r["text"]} for r in ROWS)
    assert_rows(load(path, id_column="id"), ROWS)


def test_csv_numeric_ids_become_strings(tmp_path):
    path = tmp_path / "corpus.csv"
    path.write_text("doc,text\n10,first text\n20,second text\n")
    docs = load(path, id_column="doc")
    assert docs.ids == ["10", "20"]
    assert docs.texts == ["first text", "second text"]


def test_txt_one_document_per_line(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("".join(r["text"] + "\n" for r in ROWS))
    assert_rows(load(path), ROWS, ids=["0", "1", "2"])


def test_glob_of_jsonl_files_in_sorted_order(tmp_path):
    for i, r in enumerate(ROWS):
        write_jsonl(tmp_path / f"part-{i}.jsonl", [r])
    (tmp_path / "notes.md").write_text("not data")  # outside the glob
    assert_rows(load(tmp_path / "part-*.jsonl", id_column="id"), ROWS)


def test_directory_of_jsonl_files(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "01.jsonl", ROWS[:2])
    write_jsonl(data / "02.jsonl", ROWS[2:])
    assert_rows(load(data, id_column="id"), ROWS)


def test_saved_dataset(tmp_path):
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    assert_rows(load(tmp_path / "saved", id_column="id", source_column="source"), ROWS, sources=["web", "books", "web"])


def test_saved_dataset_dict_reads_the_split(tmp_path):
    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS[:1]), "validation": datasets.Dataset.from_list(ROWS[1:])}
    )
    dd.save_to_disk(str(tmp_path / "saved"))
    assert_rows(load(tmp_path / "saved", split="validation", id_column="id"), ROWS[1:])
    assert_rows(load(tmp_path / "saved", id_column="id"), ROWS[:1])  # split defaults to train
    with pytest.raises(ValueError, match=r"has splits \['train', 'validation'\], not 'test'; set split"):
        load(tmp_path / "saved", split="test")


def test_max_documents(tmp_path):
    path = write_jsonl(tmp_path / "corpus.jsonl", ROWS)
    assert_rows(load(path, id_column="id", max_documents=2), ROWS[:2])
    assert_rows(load(path, id_column="id", max_documents=10), ROWS)


# --- errors --------------------------------------------------------------------------------


def test_missing_text_column_lists_columns(tmp_path):
    path = write_jsonl(tmp_path / "corpus.jsonl", [{"id": r["id"], "body": r["text"]} for r in ROWS])
    with pytest.raises(ValueError, match=re.escape("has no column 'text' (columns: ['id', 'body']); set text_column")):
        load(path)
    assert load(path, text_column="body").texts == [r["text"] for r in ROWS]


def test_missing_id_column(tmp_path):
    path = write_jsonl(tmp_path / "corpus.jsonl", ROWS)
    with pytest.raises(ValueError, match=r"has no column 'doc_id' \(columns: .*\); set id_column"):
        load(path, id_column="doc_id")


def test_duplicate_ids(tmp_path):
    path = write_jsonl(tmp_path / "corpus.jsonl", ROWS + [{**ROWS[0], "text": "another text"}])
    with pytest.raises(ValueError, match="repeats the id 'a'; document ids must be unique"):
        load(path, id_column="id")


@pytest.mark.parametrize("blank", ["", "   \n\t "])
def test_empty_text_names_document_and_skip_empty_drops_it(tmp_path, blank):
    rows = [ROWS[0], {"id": "b", "text": blank, "source": "web"}, ROWS[2]]
    path = write_jsonl(tmp_path / "corpus.jsonl", rows)
    with pytest.raises(ValueError, match=r"document 'b' \(row 1\) has empty text.*skip_empty"):
        load(path, id_column="id")
    docs = load(path, id_column="id", skip_empty=True)
    assert docs.ids == ["a", "c"]
    assert docs.texts == [ROWS[0]["text"], ROWS[2]["text"]]


def test_missing_text_value_counts_as_empty(tmp_path):
    # An empty CSV cell reads back as a missing value, not "": it is an empty document, so skip_empty applies.
    path = tmp_path / "corpus.csv"
    path.write_text("id,text\na,first text\nb,\nc,third text\n")
    with pytest.raises(ValueError, match=r"document 'b' \(row 1\) has empty text.*skip_empty"):
        load(path, id_column="id")
    assert load(path, id_column="id", skip_empty=True).ids == ["a", "c"]
    jsonl = write_jsonl(tmp_path / "corpus.jsonl", [ROWS[0], {"id": "b", "text": None}])
    assert load(jsonl, id_column="id", skip_empty=True).ids == ["a"]


def test_non_string_text(tmp_path):
    path = write_jsonl(tmp_path / "corpus.jsonl", [{"id": "a", "text": 5}, {"id": "b", "text": 7}])
    with pytest.raises(ValueError, match=r"document 'a' \(row 0\): 'text' holds int, not text"):
        load(path, id_column="id")


@pytest.mark.parametrize("name", ["missing.jsonl", "no/such/dir"])
def test_nonexistent_path(tmp_path, name):
    with pytest.raises(DataError, match="does not exist") as err:
        load(tmp_path / name)
    assert "hub name" in err.value.fix


def test_a_glob_that_matches_nothing_yet(tmp_path):
    """A corpus directory that grows (the nightly deployment's) may not have its first file yet."""
    with pytest.raises(DataError, match=r"no data files match '.*missing-\*\.jsonl'") as err:
        load(tmp_path / "missing-*.jsonl")
    assert err.value.fix.startswith("add .jsonl")


GOOD_LINES = [json.dumps({"id": f"d{i}", "text": f"document {i}"}) for i in range(5)]


@pytest.mark.parametrize(
    "content, message, fix",
    [
        (b"", r"corpus.jsonl' is empty", "remove it"),
        (
            ("\n".join(GOOD_LINES[:3]) + '\n{"id": "x", "text": "no end"\n').encode(),
            r"line 4: not valid JSON",
            "fix or",
        ),
        (("\n".join(GOOD_LINES[:2]) + "\n[1, 2]\n").encode(), r"line 3: holds a JSON list, not an object", "one"),
        (
            ("\n".join(GOOD_LINES) + "\n").encode() + b'{"id": "z", "text": "caf\xe9"}\n',
            r"line 6: bytes b'\\xe9' at byte 24 of the line are not UTF-8",
            "re-encode",
        ),
    ],
    ids=["empty", "malformed-line", "not-an-object", "not-utf8"],
)
def test_unreadable_file_names_file_and_line(tmp_path, content, message, fix):
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message) as err:
        load(path, id_column="id")
    assert str(path) in str(err.value) and fix in err.value.fix


def test_unreadable_csv_names_the_line(tmp_path):
    path = tmp_path / "corpus.csv"
    path.write_bytes(b"id,text\na,fine\nb,caf\xe9 au lait\n")
    with pytest.raises(DataError, match=r"corpus.csv', line 3: bytes b'\\xe9'"):
        load(path, id_column="id")


def test_directory_without_data(tmp_path):
    (tmp_path / "readme.md").write_text("nothing here")
    with pytest.raises(ValueError, match="holds no saved dataset and no"):
        load(tmp_path)


def test_mixed_extensions(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", ROWS[:1])
    (tmp_path / "b.txt").write_text("text\n")
    with pytest.raises(ValueError, match="must share one extension"):
        load(tmp_path)


def test_every_document_empty(tmp_path):
    path = write_jsonl(tmp_path / "corpus.jsonl", [{"text": " "}, {"text": "\n"}])
    with pytest.raises(ValueError, match="every document of .* is empty"):
        load(path, skip_empty=True)


# --- chunking ------------------------------------------------------------------------------

LONG = " ".join(["one two three four five six seven eight nine ten"] * 6)


def docs_of(*texts, sources=None):
    return Documents(list(texts), [f"doc-{i}" for i in range(len(texts))], sources or [""] * len(texts))


def test_long_document_chunks_tile_the_tokenization(tokenizer):
    max_length = 7
    full = tokenizer(LONG)["input_ids"] + [tokenizer.eos_token_id]
    assert len(full) > 3 * max_length and len(full) % max_length != 0
    examples = chunk_documents(docs_of(LONG), tokenizer, max_length)
    assert len(examples) == -(-len(full) // max_length)
    assert [e.chunk_index for e in examples] == list(range(len(examples)))
    assert all(e.document_id == "doc-0" for e in examples)
    assert examples[0].token_start == 0 and examples[-1].token_end == len(full)
    for prev, nxt in zip(examples, examples[1:]):
        assert nxt.token_start == prev.token_end
        assert prev.num_tokens == max_length  # only the last chunk is short
    for e in examples:
        assert 0 < e.num_tokens <= max_length
        assert e.input_ids == full[e.token_start : e.token_end]
    assert sum((e.input_ids for e in examples), []) == full
    assert examples[-1].input_ids[-1] == tokenizer.eos_token_id


def test_document_of_exactly_max_length_is_one_chunk(tokenizer):
    n = len(tokenizer(LONG)["input_ids"]) + 1  # with EOS
    examples = chunk_documents(docs_of(LONG), tokenizer, n)
    assert len(examples) == 1 and (examples[0].token_start, examples[0].token_end) == (0, n)


def test_example_ids_and_document_ids_across_documents(tokenizer):
    texts = [LONG, ROWS[0]["text"], LONG[:40]]
    examples = chunk_documents(docs_of(*texts, sources=["s0", "s1", "s2"]), tokenizer, 8)
    assert [e.example_id for e in examples] == list(range(len(examples)))
    per_doc = {}
    for e in examples:
        per_doc.setdefault(e.document_id, []).append(e)
    assert list(per_doc) == ["doc-0", "doc-1", "doc-2"]  # documents stay in order, chunks contiguous
    for i, chunks in enumerate(per_doc.values()):
        full = tokenizer(texts[i])["input_ids"] + [tokenizer.eos_token_id]
        assert sum((e.input_ids for e in chunks), []) == full
        assert {e.source for e in chunks} == {f"s{i}"}


def test_add_eos_false(tokenizer):
    full = tokenizer(LONG)["input_ids"]
    examples = chunk_documents(docs_of(LONG), tokenizer, 7, add_eos=False)
    assert sum((e.input_ids for e in examples), []) == full
    assert examples[-1].token_end == len(full)
    assert tokenizer.eos_token_id not in full


# --- batching ------------------------------------------------------------------------------


def test_collate_right_pads():
    seqs = [[5, 6, 7], [8], [9, 10]]
    input_ids, attention, labels = collate(seqs, pad_id=1)
    assert input_ids.dtype == attention.dtype == labels.dtype == torch.long
    assert input_ids.tolist() == [[5, 6, 7], [8, 1, 1], [9, 10, 1]]
    assert attention.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert labels.tolist() == [[5, 6, 7], [8, -100, -100], [9, 10, -100]]


def test_collate_label_masks():
    seqs = [[5, 6, 7], [8], [9, 10]]
    masks = [[False, True, True], [True], [False, True]]
    input_ids, attention, labels = collate(seqs, pad_id=0, label_masks=masks)
    assert input_ids.tolist() == [[5, 6, 7], [8, 0, 0], [9, 10, 0]]
    assert attention.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert labels.tolist() == [[-100, 6, 7], [8, -100, -100], [-100, 10, -100]]


# --- prompt and response (data.prompt_column) --------------------------------------------------

PROMPTED = [
    {"id": "a", "prompt": "one two three", "text": "the cat sat on the mat."},
    {"id": "b", "prompt": "", "text": "the dog ran after the cat, twice."},
    {"id": "c", "prompt": None, "text": "a bird sang in the tree."},
]


def test_prompt_tokens_come_first_and_carry_no_loss(tmp_path, tokenizer):
    docs = load(write_jsonl(tmp_path / "c.jsonl", PROMPTED), id_column="id", prompt_column="prompt")
    assert docs.prompts == ["one two three", "", ""]  # a null prompt is no prompt
    n_a = len(tokenizer("one two three", add_special_tokens=True)["input_ids"])
    examples = chunk_documents(docs, tokenizer, max_length=n_a + 3)
    for doc, row in zip(("a", "b", "c"), PROMPTED):
        head = tokenizer(row["prompt"] or "", add_special_tokens=True)["input_ids"]
        tail = tokenizer(row["text"], add_special_tokens=False)["input_ids"]
        mine = [e for e in examples if e.document_id == doc]
        # the tokens are the prompt's then the text's (then EOS), chunked as any document
        assert sum((e.input_ids for e in mine), []) == head + tail + [tokenizer.eos_token_id]
        # the label mask: False on the prompt tokens of each chunk, so only chunks reaching into the prompt have one
        for e in mine:
            masked = min(max(len(head) - e.token_start, 0), e.num_tokens)
            assert e.label_mask == ([False] * masked + [True] * (e.num_tokens - masked) if masked else None)
    a = [e for e in examples if e.document_id == "a"]
    assert a[0].label_mask == [False] * n_a + [True] * 3 and a[1].label_mask is None
    # collated: the prompt's labels are -100, the rest are the tokens
    from dataworth.data import collate_examples

    ids, att, labels = collate_examples(a[:2], 0)
    assert labels[0].tolist() == [-100] * n_a + a[0].input_ids[n_a:]
    assert labels[1, : a[1].num_tokens].tolist() == a[1].input_ids
    # without a prompt column the same rows carry a loss on every token
    plain = chunk_documents(load(write_jsonl(tmp_path / "p.jsonl", ROWS), id_column="id"), tokenizer, 6)
    assert all(e.label_mask is None for e in plain)


def test_prompt_column_errors(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "c.jsonl", PROMPTED)
    with pytest.raises(DataError, match="no column 'question'.*set prompt_column"):
        load(path, prompt_column="question")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"id": "x", "prompt": 3, "text": "hi"}])
    with pytest.raises(DataError, match="document 'x' .*prompt_column 'prompt' holds int, not text"):
        load(bad, id_column="id", prompt_column="prompt")
    docs = load(path, id_column="id", prompt_column="prompt")
    n_a = len(tokenizer("one two three", add_special_tokens=True)["input_ids"])
    with pytest.raises(DataError, match=f"document 'a' has a prompt of {n_a} tokens, as long as an example") as err:
        chunk_documents(docs, tokenizer, max_length=n_a)
    assert chunk_documents(docs, tokenizer, max_length=n_a + 1)[0].label_mask == [False] * n_a + [True]  # fine
    assert "--max-length" in err.value.fix


# --- conversations (data.conversation_column) ---------------------------------------------------

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHATS = [
    {
        "id": "a",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "the cat?"},
            {"role": "assistant", "content": "sat on the mat."},
            {"role": "user", "content": "and the dog?"},
            {"role": "assistant", "content": "ran after the cat."},
        ],
    },
    {"id": "b", "messages": [{"role": "user", "content": "a bird?"}, {"role": "assistant", "content": "sang."}]},
]


@pytest.fixture
def chat_tokenizer(tokenizer):
    tokenizer.chat_template = CHATML
    yield tokenizer
    tokenizer.chat_template = None


def test_conversations_take_the_loss_on_assistant_turns(tmp_path, chat_tokenizer):
    tok = chat_tokenizer
    docs = load(write_jsonl(tmp_path / "c.jsonl", CHATS), id_column="id", conversation_column="messages")
    assert docs.conversations == [c["messages"] for c in CHATS] and docs.ids == ["a", "b"]
    for chat in docs.conversations:
        ids, mask = encode_chat(tok, chat)
        full = tok.apply_chat_template(chat, tokenize=False)
        assert ids == tok(full, add_special_tokens=False)["input_ids"]
        # the masked-in tokens decode to the assistant turns' text as the template ends them, in order
        kept = tok.decode([t for t, m in zip(ids, mask) if m])
        assert kept == "".join(m["content"] + "<|im_end|>\n" for m in chat if m["role"] == "assistant")
        assert not mask[0] and mask[-1]
    # chunked: each chunk keeps its slice of the mask (none where every label counts); no EOS is appended
    examples = chunk_documents(docs, tok, max_length=16)
    ids_a, mask_a = encode_chat(tok, docs.conversations[0])
    mine = [e for e in examples if e.document_id == "a"]
    assert sum((e.input_ids for e in mine), []) == ids_a
    assert sum((e.label_mask or [True] * e.num_tokens for e in mine), []) == mask_a


def test_conversation_errors(tmp_path, tokenizer, chat_tokenizer):
    path = write_jsonl(tmp_path / "c.jsonl", CHATS)
    # chat messages given as the text column: the fix names conversation_column
    as_text = write_jsonl(tmp_path / "as_text.jsonl", [{"id": "a", "text": CHATS[1]["messages"]}])
    with pytest.raises(DataError, match="'text' holds list, not text") as err:
        load(as_text, id_column="id")
    assert "conversation_column='text'" in err.value.fix
    with pytest.raises(ValueError, match="prompt_column and conversation_column"):
        DataConfig(dataset=str(path), prompt_column="p", conversation_column="messages")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"id": "x", "messages": "hello"}])
    with pytest.raises(DataError, match="document 'x' .*must be a list of .*messages"):
        load(bad, id_column="id", conversation_column="messages")
    silent = [{"id": "s", "messages": [{"role": "user", "content": "hi"}]}, CHATS[1]]
    path2 = write_jsonl(tmp_path / "silent.jsonl", silent)
    with pytest.raises(DataError, match="document 's' .*has no assistant turn"):
        load(path2, id_column="id", conversation_column="messages")
    assert load(path2, id_column="id", conversation_column="messages", skip_empty=True).ids == ["b"]
    docs = load(path, id_column="id", conversation_column="messages")
    chat_tokenizer.chat_template = None
    with pytest.raises(DataError, match="no chat template") as err:
        chunk_documents(docs, tokenizer, 16)
    assert "model.tokenizer" in err.value.fix
    # a template whose whole rendering does not start with its first turns' (here: a count up front)
    chat_tokenizer.chat_template = "{{ messages | length }}" + CHATML
    with pytest.raises(DataError, match="cannot be found"):
        chunk_documents(docs, tokenizer, 16)
