"""The in-memory `attribute(...)` entry point: exact against autograd, and the pipeline's own steps."""

import pytest
import torch
from gradcheck import plain, reference_gradients, relative_error
from tiny import make_tiny_gpt2

from dataworth import Attribution, attribute
from dataworth.attribution.curvature import fit_fisher
from dataworth.attribution.gradients import log_example_gradients, query_gradients
from dataworth.attribution.kfac import fit_kfac_projections
from dataworth.attribution.projection import describe_layout
from dataworth.attribution.scoring import Scorer
from dataworth.benchmarks.tiny_model import train_tokenizer
from dataworth.config import CurvatureConfig, GenerationConfig, LoggingConfig, QuerySpec
from dataworth.data import Documents, chunk_documents, pad_token_id
from dataworth.errors import DataError, QueryError
from dataworth.queries import encode_queries

TEXTS = [
    "the cat sat on the mat and looked at the dog.",
    "a quick brown fox jumps over the lazy dog.",
    "the dog ran to the park with the cat.",
    "rain fell on the town all day long.",
    "the fox and the cat met in the park at noon.",
]
QUERIES = [
    {"id": "cat", "prompt": "the cat sat on", "completion": " the mat"},
    {"id": "fox", "prompt": "a quick brown", "completion": " fox"},
]
MAX_LENGTH = 12  # several chunks per text


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS * 4, vocab_size=300)


@pytest.fixture(scope="module")
def model(tokenizer):
    return make_tiny_gpt2(torch.float64, vocab=len(tokenizer), seed=1)


def test_dot_equals_explicit_autograd_gradient_products(model, tokenizer):
    logging = plain(projection="identity", batch_size=3)
    result = attribute(
        model,
        tokenizer,
        TEXTS,
        QUERIES,
        logging=logging,
        curvature=CurvatureConfig(kind="identity"),
        modes=["dot"],
        top_k=4,
        max_length=MAX_LENGTH,
    )
    assert isinstance(result, Attribution) and len(result.examples) > len(TEXTS)
    train = reference_gradients(model, logging, [e.input_ids for e in result.examples])
    masks = [[False] * len(q.prompt_ids) + [True] * len(q.completion_ids) for q in result.queries]
    queries = reference_gradients(model, logging, [q.prompt_ids + q.completion_ids for q in result.queries], masks)
    expected = queries @ train.T  # fp64 autograd per-example gradients
    got = result.scores["dot"]
    assert got.shape == (len(QUERIES), len(result.examples)) and got.dtype == torch.float64
    assert relative_error(got, expected) < 1e-5  # the gradients are kept as float32, as the index stores them
    # top-k: the k largest scores per query, best first, as example ids
    for row, q in enumerate(result.queries):
        best = torch.argsort(expected[row], descending=True)[:4]
        ids = [result.examples[j].example_id for j in best.tolist()]
        assert result.top_ids["dot"][row].tolist() == ids
        assert [e.example_id for e, _ in result.top(q.id)] == ids


@pytest.mark.parametrize(("precondition", "kind"), [("none", "raw"), ("kfac", "raw"), ("kfac", "ekfac")])
def test_scores_equal_the_pipeline_steps(model, tokenizer, precondition, kind):
    logging = LoggingConfig(proj_dim_in=4, proj_dim_out=3, precondition=precondition, batch_size=3)
    curvature = CurvatureConfig(kind=kind, damping_factor=0.1)
    modes = ["dot", "influence", "relatif", "cosine"]
    queries = [*QUERIES, "the dog ran"]  # the last one is completed greedily
    gen = GenerationConfig(max_new_tokens=4)
    result = attribute(
        model, tokenizer, TEXTS, queries, logging=logging, curvature=curvature, modes=modes, top_k=3,
        max_length=MAX_LENGTH, generation=gen,
    )  # fmt: skip

    docs = Documents(TEXTS, [str(i) for i in range(len(TEXTS))], [""] * len(TEXTS))
    examples = chunk_documents(docs, tokenizer, MAX_LENGTH)
    fitted = fit_kfac_projections(model, tokenizer, examples, logging) if precondition == "kfac" else None
    layout, _ = describe_layout(model, logging)
    grads = torch.zeros(len(examples), layout.dim)
    for ids, g in log_example_gradients(model, tokenizer, examples, logging, fitted=fitted):
        grads[ids] = g
    fisher = fit_fisher(layout, curvature, lambda: [grads])
    assert fisher.kind == kind
    specs = [QuerySpec(**q) for q in QUERIES] + [QuerySpec(id="q2", prompt="the dog ran")]
    encoded = encode_queries(model, tokenizer, specs, gen, 64)
    q_grads = query_gradients(model, encoded, logging, pad_token_id(tokenizer), 16, fitted)
    scorer = Scorer(q_grads, fisher, modes, 3, full_matrix_size=len(examples))
    scorer.update(torch.arange(len(examples)), grads)

    assert [e.input_ids for e in result.examples] == [e.input_ids for e in examples]
    assert [(q.id, q.completion_ids) for q in result.queries] == [(q.id, q.completion_ids) for q in encoded]
    assert result.queries[2].generated
    assert torch.equal(result.query_gradients, q_grads)
    for mode in modes:
        want = scorer.full[mode]
        assert torch.allclose(result.scores[mode], want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))
        assert torch.equal(result.top_ids[mode], scorer.topk[mode].ids)
    if precondition == "kfac":
        assert result.fitted is not None and result.fitted.digest() == fitted.digest()


def test_prompted_training_texts_score_the_loss_on_their_text(model, tokenizer):
    """{'prompt', 'text'} training rows (instruction data): dot equals autograd's with each prompt's labels masked."""
    rows = [{"prompt": t[:12], "text": t[12:]} for t in TEXTS[:3]] + [{"text": TEXTS[3]}]
    logging = plain(projection="identity", batch_size=2)
    result = attribute(
        model, tokenizer, rows, QUERIES, logging=logging, curvature=CurvatureConfig(kind="identity"), modes=["dot"]
    )
    examples = result.examples
    assert len(examples) == 4 and all(e.label_mask is not None and not e.label_mask[0] for e in examples[:3])
    assert examples[3].label_mask is None  # no prompt (this tokenizer adds no special token to one)
    masks = [e.label_mask for e in examples]
    train = reference_gradients(model, logging, [e.input_ids for e in examples], masks)
    q_masks = [[False] * len(q.prompt_ids) + [True] * len(q.completion_ids) for q in result.queries]
    queries = reference_gradients(model, logging, [q.input_ids for q in result.queries], q_masks)
    assert relative_error(result.scores["dot"], queries @ train.T) < 1e-5
    with pytest.raises(DataError, match="training example 1 must be"):
        attribute(model, tokenizer, [{"text": "a"}, {"prompt": "b"}], "the cat")


def test_conversations_score_the_loss_on_assistant_turns(model, tokenizer):
    """{'messages': [...]} training rows: rendered by the chat template, dot equals autograd's with the user turns'
    labels masked."""
    from dataworth.data import encode_chat

    tokenizer.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    try:
        chats = [
            {"messages": [{"role": "user", "content": TEXTS[i][:10]}, {"role": "assistant", "content": TEXTS[i][10:]}]}
            for i in range(3)
        ]
        logging = plain(projection="identity", batch_size=2)
        result = attribute(
            model, tokenizer, chats, QUERIES, logging=logging, curvature=CurvatureConfig(kind="identity"), modes=["dot"]
        )
        encoded = [encode_chat(tokenizer, c["messages"]) for c in chats]
        assert [(e.input_ids, e.label_mask) for e in result.examples] == [(list(i), list(m)) for i, m in encoded]
        train = reference_gradients(model, logging, [i for i, _ in encoded], [m for _, m in encoded])
        q_masks = [[False] * len(q.prompt_ids) + [True] * len(q.completion_ids) for q in result.queries]
        queries = reference_gradients(model, logging, [q.input_ids for q in result.queries], q_masks)
        assert relative_error(result.scores["dot"], queries @ train.T) < 1e-5
        # a chat query: rendered by the template, its reply attributed
        chat = [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": " sat"}]
        (q,) = attribute(model, tokenizer, chats, {"id": "c", "messages": chat}, logging=logging, modes=["dot"]).queries
        assert q.prompt + q.completion == tokenizer.apply_chat_template(chat, tokenize=False) and not q.generated
        with pytest.raises(DataError, match="has no assistant turn"):
            attribute(model, tokenizer, [{"messages": [{"role": "user", "content": "hi"}]}], "the cat")
    finally:
        tokenizer.chat_template = None


def test_examples_as_input_and_model_mode_restored(model, tokenizer):
    docs = Documents(TEXTS[:3], ["a", "b", "c"], [""] * 3)
    examples = chunk_documents(docs, tokenizer, MAX_LENGTH)[2:]  # ids no longer start at 0
    model.train()
    try:
        result = attribute(
            model, tokenizer, examples, "the cat sat on", logging=plain(batch_size=2), modes=["dot", "cosine"], top_k=2
        )
        assert model.training
    finally:
        model.eval()
    assert result.examples == examples and [q.id for q in result.queries] == ["q0"]
    assert set(result.top_ids["cosine"][0].tolist()) <= {e.example_id for e in examples}
    (best, score), _ = result.top("q0", "cosine")
    assert score == pytest.approx(float(result.scores["cosine"][0].max()), rel=1e-6)
    assert best.example_id == examples[int(result.scores["cosine"][0].argmax())].example_id


def test_bad_input_raises_named_errors(model, tokenizer):
    with pytest.raises(DataError, match="train is empty"):
        attribute(model, tokenizer, [], "the cat")
    with pytest.raises(DataError, match="not a mix"):
        attribute(model, tokenizer, ["a text", 3], "the cat")
    with pytest.raises(QueryError, match="query 0 is a int"):
        attribute(model, tokenizer, TEXTS, [7])
