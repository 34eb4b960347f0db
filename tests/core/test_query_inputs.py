"""Reading queries and turning them into (prompt ids, completion ids), generating missing completions."""

import json

import pytest
import torch

from dataworth.config import GenerationConfig, QuerySpec
from dataworth.gradients import encode_queries
from dataworth.queries import load_queries
from tiny import make_tiny_gpt2

TEXTS = ["the cat sat on the mat.", "a dog ran to the park.\nthen it slept."] * 5


@pytest.fixture(scope="module")
def lm():
    from dataworth.tiny_model import train_tokenizer

    tok = train_tokenizer(TEXTS, vocab_size=300)
    return make_tiny_gpt2(dtype=torch.float32, vocab=len(tok)), tok


def test_load_queries(tmp_path):
    p = tmp_path / "q.jsonl"
    p.write_text(json.dumps({"id": 7, "prompt": "a", "completion": " b", "extra": 1}) + "\n\n"
                 + json.dumps({"prompt": "c"}) + "\n")
    qs = load_queries(str(p), [QuerySpec(id="inline", prompt="x")])
    assert [(q.id, q.prompt, q.completion) for q in qs] == [("inline", "x", None), ("7", "a", " b"), ("q3", "c", None)]
    for body, msg in [("{not json", r"q.jsonl:1 is not valid JSON"), ("[1]", "must be a JSON object"),
                      (json.dumps({"prompt": " "}), "prompt is empty"),
                      (json.dumps({"id": 1, "prompt": "a"}) + "\n" + json.dumps({"id": 1, "prompt": "b"}), "more than once")]:
        p.write_text(body + "\n")
        with pytest.raises(ValueError, match=msg):
            load_queries(str(p))
    with pytest.raises(ValueError, match="no queries"):
        load_queries(None, [])


def test_given_completion_is_tokenized_on_its_own(lm):
    model, tok = lm
    [q] = encode_queries(model, tok, [QuerySpec(id="q", prompt="the cat", completion=" sat on")], GenerationConfig(), 64)
    assert q.prompt_ids == tok("the cat")["input_ids"]
    assert q.completion_ids == tok(" sat on", add_special_tokens=False)["input_ids"] and not q.generated


def greedy(model, ids, n):
    out = []
    for _ in range(n):
        nxt = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
        out.append(nxt)
    return out


def test_missing_completion_is_generated_greedily(lm):
    model, tok = lm
    specs = [QuerySpec(id="a", prompt="the cat"), QuerySpec(id="b", prompt="a dog ran to the")]
    enc = encode_queries(model, tok, specs, GenerationConfig(max_new_tokens=5, stop_at_newline=False), 64)
    for q in enc:
        expected = greedy(model, q.prompt_ids, 5)
        if tok.eos_token_id in expected:
            expected = expected[: expected.index(tok.eos_token_id)]
        assert q.generated and q.completion_ids == expected and q.completion == tok.decode(expected)


def test_stop_strings_cut_generation(lm):
    model, tok = lm
    spec = [QuerySpec(id="a", prompt="the cat")]
    full = encode_queries(model, tok, spec, GenerationConfig(max_new_tokens=6, stop_at_newline=False), 64)[0]
    pieces = [tok.decode([t]) for t in full.completion_ids]
    if len(pieces) < 2:
        pytest.skip("the random model stopped at once")
    cut = encode_queries(model, tok, spec, GenerationConfig(max_new_tokens=6, stop_at_newline=False, stop=[pieces[1]]), 64)[0]
    assert cut.completion_ids == full.completion_ids[:1]


def test_query_errors(lm):
    model, tok = lm
    with pytest.raises(ValueError, match="'long'.*context"):
        encode_queries(model, tok, [QuerySpec(id="long", prompt="the cat sat " * 40, completion=" x")], GenerationConfig(), 16)
    with pytest.raises(ValueError, match="appears twice"):
        encode_queries(model, tok, [QuerySpec(id="a", prompt="x", completion=" y")] * 2, GenerationConfig(), 64)
