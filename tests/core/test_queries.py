"""Reading query files, and turning queries into prompt/completion token ids (greedy completion)."""

import json

import pytest
import torch
from tiny import make_tiny_gpt2

from dataworth.benchmarks.tiny_model import train_tokenizer
from dataworth.config import GenerationConfig, QuerySpec
from dataworth.data import pad_token_id
from dataworth.errors import QueryError
from dataworth.queries import encode_queries, greedy_generate, load_queries

CONTEXT = 64  # n_positions of the tiny GPT-2


def write(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


# --- load_queries --------------------------------------------------------------------------


def test_jsonl_with_and_without_ids_and_completions(tmp_path):
    path = write(
        tmp_path / "q.jsonl",
        [
            {"id": "capital", "prompt": "The capital of France is", "completion": " Paris"},
            {"prompt": "Two plus two is"},
            {"id": 7, "prompt": "Hi", "completion": None},
        ],
    )
    queries = load_queries(path)
    assert [(q.id, q.prompt, q.completion) for q in queries] == [
        ("capital", "The capital of France is", " Paris"),
        ("q2", "Two plus two is", None),  # id from the line number
        ("7", "Hi", None),
    ]


def test_extra_keys_ignored_and_blank_lines_skipped(tmp_path):
    path = write(
        tmp_path / "q.jsonl",
        [
            "",
            {"prompt": "first", "meta": {"source": "x"}, "score": 3},
            "   ",
            {"id": "b", "prompt": "second", "completion": " yes", "note": "ignored"},
            "",
        ],
    )
    queries = load_queries(path)
    assert [(q.id, q.prompt, q.completion) for q in queries] == [("q2", "first", None), ("b", "second", " yes")]


def test_invalid_json_names_file_and_line(tmp_path):
    path = write(tmp_path / "q.jsonl", [{"prompt": "ok"}, "", '{"prompt": "broken"'])
    with pytest.raises(ValueError, match=rf"^{path}:3 is not valid JSON"):
        load_queries(path)


@pytest.mark.parametrize("line", ['["a list"]', '"a string"', "42"])
def test_line_that_is_not_an_object(tmp_path, line):
    path = write(tmp_path / "q.jsonl", [{"prompt": "ok"}, line])
    with pytest.raises(ValueError, match=rf"^{path}:2 must be a JSON object with 'prompt'"):
        load_queries(path)


@pytest.mark.parametrize(
    "row, message",
    [
        ({"id": "e", "prompt": "  "}, "prompt is empty"),
        ({"id": "m", "completion": "x"}, "prompt is empty"),
    ],
)
def test_empty_or_missing_prompt(tmp_path, row, message):
    path = write(tmp_path / "q.jsonl", [row])
    with pytest.raises(ValueError, match=rf"^{path}:1 is not a valid query: .*{message}.*prompt"):
        load_queries(path)


def test_duplicate_ids(tmp_path):
    path = write(
        tmp_path / "q.jsonl", [{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "y"}, {"id": "a", "prompt": "z"}]
    )
    with pytest.raises(ValueError, match=r"query ids \['a'\] appear more than once"):
        load_queries(path)


def test_duplicate_id_between_inline_and_file(tmp_path):
    path = write(tmp_path / "q.jsonl", [{"prompt": "from the file"}])  # id q1
    with pytest.raises(ValueError, match=r"query ids \['q1'\] appear more than once"):
        load_queries(path, [QuerySpec(id="q1", prompt="inline")])


def test_inline_and_file_combined(tmp_path):
    path = write(tmp_path / "q.jsonl", [{"id": "f1", "prompt": "from the file"}])
    inline = [QuerySpec(id="i1", prompt="inline one", completion=" done"), QuerySpec(id="i2", prompt="inline two")]
    assert [q.id for q in load_queries(path, inline)] == ["i1", "i2", "f1"]
    assert [q.id for q in load_queries(None, inline)] == ["i1", "i2"]


def test_no_queries(tmp_path):
    with pytest.raises(ValueError, match="no queries"):
        load_queries(None)
    with pytest.raises(ValueError, match="no queries"):
        load_queries(None, [])
    with pytest.raises(ValueError, match="no queries"):
        load_queries(write(tmp_path / "q.jsonl", ["", "  "]))


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="queries file .* does not exist"):
        load_queries(str(tmp_path / "nope.jsonl"))


# --- encode_queries ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["the cat sat on the mat.\nthe dog ran to the park.", "a quick brown fox jumps over the lazy dog"] * 20
    return train_tokenizer(texts, vocab_size=300)


@pytest.fixture(scope="module")
def model(tokenizer):
    return make_tiny_gpt2(torch.float32, vocab=len(tokenizer), seed=3)


@torch.no_grad()
def greedy_by_hand(model, prompt_ids, steps):
    """Argmax continuation with a plain forward pass over the whole sequence at every step (no cache, no padding)."""
    ids = list(prompt_ids)
    for _ in range(steps):
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        ids.append(int(logits.argmax()))
    return ids[len(prompt_ids) :]


def until_eos(ids, eos):
    return ids[: ids.index(eos)] if eos in ids else ids


def test_given_completion_is_tokenized_apart_from_the_prompt(model, tokenizer):
    q = QuerySpec(id="cat", prompt="the c", completion="at sat")
    (enc,) = encode_queries(model, tokenizer, [q], GenerationConfig(), CONTEXT)
    assert enc.prompt_ids == tokenizer("the c", add_special_tokens=True)["input_ids"]
    assert enc.completion_ids == tokenizer("at sat", add_special_tokens=False)["input_ids"]
    assert enc.completion == "at sat" and not enc.generated
    # Tokenized together the text merges across the boundary ("cat"); the boundary must survive.
    assert enc.prompt_ids + enc.completion_ids != tokenizer("the cat sat")["input_ids"]


def test_empty_given_completion_raises(model, tokenizer):
    with pytest.raises(ValueError, match="query 'e' has an empty completion"):
        encode_queries(model, tokenizer, [QuerySpec(id="e", prompt="the", completion="")], GenerationConfig(), CONTEXT)


def test_missing_completion_is_the_greedy_continuation(model, tokenizer):
    # Prompts of different lengths share one left-padded generate batch; each must match its own unpadded loop.
    prompts = ["the cat sat on", "a quick brown fox jumps over the", "the"]
    queries = [QuerySpec(id=f"p{i}", prompt=p) for i, p in enumerate(prompts)]
    queries.insert(1, QuerySpec(id="given", prompt="the dog", completion=" ran"))
    gen = GenerationConfig(max_new_tokens=6, stop_at_newline=False)
    encoded = encode_queries(model, tokenizer, queries, gen, CONTEXT, batch_size=8)
    assert [e.id for e in encoded] == ["p0", "given", "p1", "p2"]
    assert encoded[1].completion_ids == tokenizer(" ran", add_special_tokens=False)["input_ids"]
    for enc, prompt in zip([encoded[0], encoded[2], encoded[3]], prompts):
        assert enc.generated
        assert enc.prompt_ids == tokenizer(prompt)["input_ids"]
        expected = until_eos(greedy_by_hand(model, enc.prompt_ids, 6), tokenizer.eos_token_id)
        assert expected  # the check below means something
        assert enc.completion_ids == expected
        assert enc.completion == tokenizer.decode(expected)


def test_greedy_generate_matches_the_loop_by_hand_and_stops_at_the_context(model, tokenizer):
    eos = tokenizer.eos_token_id
    prompts = [tokenizer(p)["input_ids"] for p in ["the cat sat on", "a quick brown fox jumps over the", "the"]]
    model.train()
    try:
        out = greedy_generate(model, prompts, 5, pad_token_id(tokenizer), batch_size=2)
        assert model.training  # dropout is off while generating, the mode is restored after
    finally:
        model.eval()
    for prompt, new in zip(prompts, out):
        assert until_eos(new, eos) == until_eos(greedy_by_hand(model, prompt, 5), eos)
    context = model.config.n_positions
    near_end = (prompts[1] * context)[: context - 2]
    full = (prompts[1] * context)[:context]
    short, none = greedy_generate(model, [near_end, full], 5, pad_token_id(tokenizer), batch_size=1)
    assert len(short) == 2 and none == []


def bigram_gpt2(tokenizer, chain: dict[str, str]):
    """A tiny GPT-2 rewired so its greedy next token depends only on the current token, as `chain` says.

    Blocks and position embeddings are zeroed, so the last hidden state is ln_f(wte[current token]); each
    chained token gets its own basis direction and the (untied) head maps that direction to the next token.
    """
    model = make_tiny_gpt2(torch.float32, vocab=len(tokenizer))
    tid = tokenizer.convert_tokens_to_ids
    with torch.no_grad():
        for block in model.transformer.h:
            for layer in (block.attn.c_proj, block.mlp.c_proj):
                layer.weight.zero_()
                layer.bias.zero_()
        model.transformer.wpe.weight.zero_()
        wte = model.transformer.wte.weight
        head = torch.zeros_like(wte)
        ln = torch.nn.LayerNorm(wte.shape[1], elementwise_affine=False)
        for k, (cur, nxt) in enumerate(chain.items()):
            wte[tid(cur)] = torch.nn.functional.one_hot(torch.tensor(k), wte.shape[1]).float()
            head[tid(nxt)] += 10 * ln(wte[tid(cur)])
        model.lm_head.weight = torch.nn.Parameter(head)
    return model


# The byte-level tokens "x" → "a" → "b" → newline ("Ċ") → "c" → EOS; "y" → EOS.
CHAIN = {"x": "a", "a": "b", "b": "Ċ", "Ċ": "c", "c": "<|endoftext|>", "y": "<|endoftext|>"}


@pytest.fixture(scope="module")
def bigram(tokenizer):
    return bigram_gpt2(tokenizer, CHAIN)


def test_bigram_model_generates_the_chain(bigram, tokenizer):
    prompt_ids = tokenizer("x")["input_ids"]
    assert tokenizer.decode(greedy_by_hand(bigram, prompt_ids, 5)) == "ab\nc<|endoftext|>"


@pytest.mark.parametrize(
    "gen, completion",
    [
        (GenerationConfig(), "ab"),  # cut at the newline
        (GenerationConfig(stop_at_newline=False), "ab\nc"),  # cut at EOS
        (GenerationConfig(stop_at_newline=False, max_new_tokens=3), "ab\n"),  # cut by max_new_tokens
        (GenerationConfig(stop_at_newline=False, stop=["b"]), "a"),  # cut before the stop string
        (GenerationConfig(stop_at_newline=False, stop=["\n"]), "ab"),
        (GenerationConfig(stop_at_newline=False, stop=["zzz", "c"]), "ab\n"),
    ],
)
def test_generated_completion_is_cut(bigram, tokenizer, gen, completion):
    (enc,) = encode_queries(bigram, tokenizer, [QuerySpec(id="q", prompt="x")], gen, CONTEXT)
    assert enc.generated
    assert enc.completion == completion
    assert enc.completion_ids == tokenizer(completion, add_special_tokens=False)["input_ids"]


def test_nothing_generated_raises(bigram, tokenizer):
    with pytest.raises(ValueError, match="generated nothing for query 'silent'"):
        encode_queries(bigram, tokenizer, [QuerySpec(id="silent", prompt="y")], GenerationConfig(), CONTEXT)


def test_over_long_query_names_it(model, tokenizer):
    long_prompt = "the cat sat on the mat. " * 6
    assert len(tokenizer(long_prompt)["input_ids"]) < CONTEXT < len(tokenizer(long_prompt * 2)["input_ids"])
    queries = [
        QuerySpec(id="short", prompt="the", completion=" cat"),
        QuerySpec(id="too-long", prompt=long_prompt, completion=long_prompt),
    ]
    with pytest.raises(
        ValueError, match=rf"query 'too-long' has \d+ tokens, more than the model's context of {CONTEXT}"
    ):
        encode_queries(model, tokenizer, queries, GenerationConfig(), CONTEXT)


def test_over_long_prompt_to_complete_names_it(model, tokenizer):
    prompt = "the cat sat on the mat. " * 10
    with pytest.raises(ValueError, match="query 'too-long' has .* context"):
        encode_queries(model, tokenizer, [QuerySpec(id="too-long", prompt=prompt)], GenerationConfig(), CONTEXT)


def test_duplicate_ids_raise(model, tokenizer):
    queries = [QuerySpec(id="a", prompt="the", completion=" cat"), QuerySpec(id="a", prompt="a", completion=" dog")]
    with pytest.raises(ValueError, match="query id 'a' appears twice"):
        encode_queries(model, tokenizer, queries, GenerationConfig(), CONTEXT)


# --- chat queries (messages) ------------------------------------------------------------------

CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


@pytest.fixture
def chat_tokenizer(tokenizer):
    tokenizer.chat_template = CHAT_TEMPLATE
    yield tokenizer
    tokenizer.chat_template = None


def test_chat_queries_render_with_the_template(tmp_path, model, chat_tokenizer):
    tok = chat_tokenizer
    rows = [
        {"id": "given", "messages": [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "sat"}]},
        {"id": "gen", "messages": [{"role": "user", "content": "the dog"}]},
    ]
    specs = load_queries(str(write(tmp_path / "q.jsonl", rows)))
    assert [q.messages for q in specs] == [r["messages"] for r in rows] and specs[0].prompt == ""
    given, gen = encode_queries(model, tok, specs, GenerationConfig(max_new_tokens=3), CONTEXT)
    # the reply is the attributed completion, its turn as the template writes it; the prompt ends in its header
    assert given.prompt == "<user>the cat</user>\n<assistant>" and given.completion == "sat</assistant>\n"
    assert not given.generated and given.completion_ids == tok(given.completion, add_special_tokens=False)["input_ids"]
    assert given.prompt_ids == tok(given.prompt, add_special_tokens=True)["input_ids"]
    # without a reply the model's is generated after the generation prompt
    assert gen.prompt == "<user>the dog</user>\n<assistant>" and gen.generated
    assert gen.completion_ids == greedy_by_hand(model, gen.prompt_ids, 3)
    # stored as text and encoded again (token-wise runs, tracked runs): the same tokens
    again = encode_queries(
        model, tok, [QuerySpec(id="g", prompt=given.prompt, completion=given.completion)], GenerationConfig(), CONTEXT
    )[0]
    assert (again.prompt_ids, again.completion_ids) == (given.prompt_ids, given.completion_ids)


def test_a_prompt_that_begins_with_bos_gets_no_second_one(chat_tokenizer):
    from dataworth.queries import encode_prompt

    tok = chat_tokenizer
    old = tok.bos_token
    try:
        tok.bos_token = "the"
        assert encode_prompt(tok, "the cat") == tok("the cat", add_special_tokens=False)["input_ids"]
    finally:
        tok.bos_token = old


def test_chat_query_errors(model, tokenizer, chat_tokenizer):
    with pytest.raises(ValueError, match="messages alone"):
        QuerySpec(id="x", prompt="p", messages=[{"role": "user", "content": "a"}])
    with pytest.raises(ValueError, match="role"):
        QuerySpec(id="x", messages=[{"text": "a"}])
    with pytest.raises(ValueError, match="needs a message before"):
        QuerySpec(id="x", messages=[{"role": "assistant", "content": "a"}])
    chat_tokenizer.chat_template = None
    q = QuerySpec(id="c", messages=[{"role": "user", "content": "a"}])
    with pytest.raises(QueryError, match="query 'c' is a chat .* no chat template"):
        encode_queries(model, tokenizer, [q], GenerationConfig(), CONTEXT)
