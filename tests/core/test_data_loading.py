"""Corpus loading from every supported source, input errors, and chunking into examples."""

import json

import pytest

from dataworth.config import DataConfig
from dataworth.data import Documents, chunk_documents, collate, load_documents

ROWS = [{"id": f"d{i}", "text": f"document number {i} talks about {w}", "src": "web"}
        for i, w in enumerate(["rivers", "bread", "lanterns", "bells"])]


@pytest.fixture(scope="module")
def tokenizer():
    from dataworth.tiny_model import train_tokenizer

    return train_tokenizer([r["text"] for r in ROWS] * 5, vocab_size=300)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "csv", "glob", "dir", "saved", "saved_dict"])
def test_sources(tmp_path, fmt):
    import datasets

    ds = datasets.Dataset.from_list(ROWS)
    if fmt == "jsonl":
        path = write_jsonl(tmp_path / "c.jsonl", ROWS)
    elif fmt == "parquet":
        path = str(tmp_path / "c.parquet")
        ds.to_parquet(path)
    elif fmt == "csv":
        path = str(tmp_path / "c.csv")
        ds.to_csv(path)
    elif fmt == "glob":
        write_jsonl(tmp_path / "a.jsonl", ROWS[:2])
        write_jsonl(tmp_path / "b.jsonl", ROWS[2:])
        path = str(tmp_path / "*.jsonl")
    elif fmt == "dir":
        (tmp_path / "parts").mkdir()
        write_jsonl(tmp_path / "parts" / "a.jsonl", ROWS[:2])
        write_jsonl(tmp_path / "parts" / "b.jsonl", ROWS[2:])
        path = str(tmp_path / "parts")
    elif fmt == "saved":
        path = str(tmp_path / "saved")
        ds.save_to_disk(path)
    else:
        path = str(tmp_path / "saved_dict")
        datasets.DatasetDict({"train": ds}).save_to_disk(path)
    docs = load_documents(DataConfig(dataset=path, id_column="id", source_column="src"))
    assert sorted(docs.ids) == [r["id"] for r in ROWS]
    assert {t for t in docs.texts} == {r["text"] for r in ROWS} and set(docs.sources) == {"web"}


def test_text_files_and_limits(tmp_path):
    (tmp_path / "a.txt").write_text("first line\nsecond line\n")
    docs = load_documents(DataConfig(dataset=str(tmp_path / "a.txt")))
    assert docs.texts == ["first line", "second line"] and docs.ids == ["0", "1"]
    assert len(load_documents(DataConfig(dataset=write_jsonl(tmp_path / "c.jsonl", ROWS), max_documents=2)).texts) == 2


def test_input_errors(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", ROWS)
    with pytest.raises(ValueError, match=r"no column 'body'.*text_column"):
        load_documents(DataConfig(dataset=path, text_column="body"))
    with pytest.raises(ValueError, match="id_column"):
        load_documents(DataConfig(dataset=path, id_column="uid"))
    dup = write_jsonl(tmp_path / "dup.jsonl", [ROWS[0], ROWS[0]])
    with pytest.raises(ValueError, match="repeats the id 'd0'"):
        load_documents(DataConfig(dataset=dup, id_column="id"))
    empty = write_jsonl(tmp_path / "empty.jsonl", [ROWS[0], {"id": "blank", "text": "   "}])
    with pytest.raises(ValueError, match=r"'blank'.*skip_empty"):
        load_documents(DataConfig(dataset=empty, id_column="id"))
    assert load_documents(DataConfig(dataset=empty, id_column="id", skip_empty=True)).ids == ["d0"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_documents(DataConfig(dataset=str(tmp_path / "missing.jsonl")))
    allempty = write_jsonl(tmp_path / "allempty.jsonl", [{"text": ""}])
    with pytest.raises(ValueError, match="every document"):
        load_documents(DataConfig(dataset=allempty, skip_empty=True))


def test_chunks_tile_each_document(tokenizer):
    long = " ".join(r["text"] for r in ROWS) * 3
    docs = Documents([ROWS[0]["text"], long], ["short", "long"], ["", ""])
    examples = chunk_documents(docs, tokenizer, max_length=8)
    assert [e.example_id for e in examples] == list(range(len(examples)))
    for doc_id, text in zip(docs.ids, docs.texts):
        chunks = [e for e in examples if e.document_id == doc_id]
        full = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
        assert [t for e in chunks for t in e.input_ids] == full
        assert all(1 <= e.num_tokens <= 8 for e in chunks)
        assert [e.chunk_index for e in chunks] == list(range(len(chunks)))
        assert chunks[0].token_start == 0 and chunks[-1].token_end == len(full)
        assert all(a.token_end == b.token_start for a, b in zip(chunks, chunks[1:]))
    no_eos = chunk_documents(docs, tokenizer, max_length=8, add_eos=False)
    assert sum(e.num_tokens for e in no_eos) == sum(e.num_tokens for e in examples) - 2


def test_collate_pads_and_masks_labels():
    ids, att, labels = collate([[5, 6, 7], [8]], pad_id=0, label_masks=[[False, True, True], [True]])
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert att.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert labels.tolist() == [[-100, 6, 7], [8, -100, -100]]
