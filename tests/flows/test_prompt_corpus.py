"""An instruction corpus (data.prompt_column): `dataworth index` logs each example's gradient of the loss on its
response tokens only, as fine-tuning on responses takes it (checked against autograd on the stored tokens), and a
token-wise query splits those scores over the example's tokens, the prompt's included."""

import json

import pytest
import torch
from gradcheck import reference_gradients
from tiny import TINY_CORPUS, tiny_index_config, write_tiny_assets

from flows.cli import main
from storage import IndexStore

pytestmark = pytest.mark.slow

PROMPTS = ["Where does the river run?", "Who keeps cats?", "", "What is sold at the market?"]


@pytest.mark.timeout(600)
def test_prompt_corpus_logs_the_response_loss(harness, tmp_path):
    from transformers import AutoModelForCausalLM

    from flows.index import index_flow

    assets = write_tiny_assets(tmp_path / "assets", TINY_CORPUS + [p for p in PROMPTS if p])
    rows = [{"id": f"d{i}", "prompt": PROMPTS[i % len(PROMPTS)], "text": t} for i, t in enumerate(TINY_CORPUS)]
    (assets / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tiny_index_config(assets, tmp_path, precondition="none")
    cfg = cfg.model_copy(
        update={
            "data": cfg.data.model_copy(
                update={"dataset": str(assets / "chat.jsonl"), "prompt_column": "prompt", "max_length": 24}
            )
        }
    )
    index_flow(cfg, progress=False)

    store = IndexStore(cfg.index_uri)
    ex = store.read_examples(["example_id", "document_id", "input_ids", "label_mask"]).to_pydict()
    ex["label_start"] = [0 if m is None else m.index(True) for m in ex["label_mask"]]  # the prompt: a prefix
    starts = dict(zip(ex["example_id"], ex["label_start"]))
    # every document with a prompt masks it in its first chunk; the empty prompt masks only the start token
    first = {
        d: s
        for d, s, eid in zip(ex["document_id"], ex["label_start"], ex["example_id"])
        if eid == min(e for e, dd in zip(ex["example_id"], ex["document_id"]) if dd == d)
    }
    assert all(first[f"d{i}"] > 1 for i in range(len(rows)) if PROMPTS[i % len(PROMPTS)])
    assert sum(1 for s in starts.values() if s == 0) >= 1  # the long document's later chunks: no prompt there

    model = AutoModelForCausalLM.from_pretrained(assets / "model").to(torch.float64).eval()
    check_stored_gradients(store, model, cfg)

    # The next night one document's prompt ends a word earlier: the same tokens, another loss. An incremental run
    # logs it again instead of copying its gradient, and copies the others.
    before = store.read_examples(["document_id", "input_ids", "label_mask"]).to_pylist()
    rows[1] = {"id": "d1", "prompt": "Who keeps", "text": " cats?" + rows[1]["text"]}
    (assets / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = index_flow(cfg, progress=False)
    after = store.read_examples(["document_id", "input_ids", "label_mask"]).to_pylist()
    old_d1, new_d1 = ([r for r in t if r["document_id"] == "d1"] for t in (before, after))
    assert [r["input_ids"] for r in new_d1] == [r["input_ids"] for r in old_d1]
    assert new_d1[0]["label_mask"].index(True) < old_d1[0]["label_mask"].index(True)
    assert out["examples_computed"] == 1 and out["examples_reused"] == len(after) - 1  # its first chunk only
    check_stored_gradients(store, model, cfg)

    # token-wise, every example: the train side of each, prompt-masked ones included, sums to its stored score
    queries = tmp_path / "q.jsonl"
    queries.write_text(json.dumps({"id": "q", "prompt": "Who keeps", "completion": " three grey cats"}) + "\n")
    results = tmp_path / "results"
    args = ["query", "--index", cfg.index_uri, "--queries", str(queries), "--results", str(results)]
    assert main([*args, "--modes", "dot", "--top-k", "12", "--tokenwise-top", "12", "--no-mlflow"]) == 0
    out = IndexStore(str(results))
    parts = [r for r in out.read_token_scores().to_pylist() if r["side"] == "train"]
    assert {r["example_id"] for r in parts} and any(starts[r["example_id"]] > 0 for r in parts)
    for eid in {r["example_id"] for r in parts}:
        mine = [r for r in parts if r["example_id"] == eid]
        total = mine[0]["total"]
        assert abs(sum(r["score"] for r in mine) - total) <= 1e-4 * max(1.0, abs(total))


def check_stored_gradients(store: IndexStore, model, cfg) -> dict:
    """The published gradients equal autograd's of the loss where each example's label_mask is True."""
    manifest = store.read_manifest()
    ex = store.read_examples(
        ["example_id", "document_id", "input_ids", "label_mask"], version=manifest.examples_version
    ).to_pydict()
    seqs = ex["input_ids"]
    masks = ex["label_mask"]
    expected = reference_gradients(model, cfg.logging, seqs, masks)
    vectors, _ = store.read_gradients_by_id(torch.tensor(ex["example_id"]).numpy(), manifest.gradients_version)
    got = torch.from_numpy(vectors).double()
    scale = expected.norm(dim=1, keepdim=True).clamp(min=1e-6)
    assert ((got - expected).norm(dim=1, keepdim=True) / scale).max() < 1e-4
    unmasked = reference_gradients(model, cfg.logging, seqs)
    assert ((got - unmasked).norm(dim=1, keepdim=True) / scale).max() > 1e-2  # the prompts' loss is left out
    return ex


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.mark.timeout(600)
def test_conversation_corpus_logs_the_assistant_turns_loss(harness, tmp_path):
    """`dataworth index --conversation-column messages` with a chat model's tokenizer: the stored gradients are
    autograd's of the loss on the assistant turns' tokens, as the chat template renders them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dataworth.data import encode_chat

    texts = TINY_CORPUS[:6]
    assets = write_tiny_assets(tmp_path / "assets", texts + [p for p in PROMPTS if p] + [CHATML])
    tokenizer = AutoTokenizer.from_pretrained(assets / "model")
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(assets / "model")
    chats = [
        [{"role": "user", "content": PROMPTS[i % 2]}, {"role": "assistant", "content": t}]
        + ([{"role": "user", "content": "And then?"}, {"role": "assistant", "content": texts[0]}] if i % 3 == 0 else [])
        for i, t in enumerate(texts)
    ]
    rows = [{"id": f"c{i}", "messages": chat} for i, chat in enumerate(chats)]
    (assets / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    index = tmp_path / "index"
    args = ["index", "--model", str(assets / "model"), "--dataset", str(assets / "chats.jsonl"), "--id-column", "id"]
    args += ["--conversation-column", "messages", "--index", str(index), "--max-length", "64"]
    args += ["--precondition", "none", "--projection", "gaussian", "--proj-dim", "4", "--curvature", "raw"]
    assert main([*args, "--no-mlflow", "--no-progress"]) == 0

    store = IndexStore(str(index))
    cfg = store.read_manifest().config
    assert cfg.data.conversation_column == "messages"
    ex = store.read_examples(["document_id", "input_ids", "label_mask"]).to_pylist()
    assert len(ex) > len(chats)  # the longer conversations are chunked
    for i, chat in enumerate(chats):  # a conversation's chunks: its rendering, the mask its assistant turns'
        mine = [e for e in ex if e["document_id"] == f"c{i}"]
        ids = sum((e["input_ids"] for e in mine), [])
        mask = sum((e["label_mask"] or [True] * len(e["input_ids"]) for e in mine), [])
        assert (ids, mask) == tuple(map(list, encode_chat(tokenizer, chat)))
    model = AutoModelForCausalLM.from_pretrained(assets / "model").to(torch.float64).eval()
    check_stored_gradients(store, model, cfg)

    # a chat query against it: rendered by the same template, its reply attributed; token-wise, the query side sums
    # to the stored score (the stored prompt text encodes to the same tokens again)
    queries = tmp_path / "chat-queries.jsonl"
    chat = [{"role": "user", "content": PROMPTS[1]}, {"role": "assistant", "content": "Tova keeps"}]
    queries.write_text(json.dumps({"id": "q", "messages": chat}) + "\n")
    results = tmp_path / "results"
    args = ["query", "--index", str(index), "--queries", str(queries), "--results", str(results), "--modes", "dot"]
    assert main([*args, "--top-k", "3", "--tokenwise-top", "3", "--no-mlflow", "--no-progress"]) == 0
    out = IndexStore(str(results))
    (stored,) = out.read_queries().to_pylist()
    assert stored["prompt"] == tokenizer.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True)
    assert stored["prompt"] + stored["completion"] == tokenizer.apply_chat_template(chat, tokenize=False)
    scores = {r["rank"]: r["score"] for r in out.read_scores().to_pylist()}
    rows = [r for r in out.read_token_scores().to_pylist() if r["side"] == "query"]
    assert {r["rank"] for r in rows} == {1, 2, 3}
    for rank, score in scores.items():
        total = sum(r["score"] for r in rows if r["rank"] == rank)
        assert abs(total - score) <= 1e-4 * max(1.0, abs(score))
