import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from dataworth.benchmarks.facts import generate_fact_corpus  # noqa: E402
from dataworth.benchmarks.tiny_model import fact_accuracy, greedy_completions, train_tiny_gpt2, train_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def corpus():
    return generate_fact_corpus()


@pytest.fixture(scope="module")
def tiny_corpus():
    return generate_fact_corpus(n_entities=6, n_filler=6, seed=1)


def test_tokenizer_round_trip_and_specials(corpus):
    texts = [d["text"] for d in corpus.documents]
    tok = train_tokenizer(texts, vocab_size=1024)
    assert len(tok) <= 1024
    for text in texts:
        assert tok.decode(tok(text)["input_ids"]) == text
    assert tok.eos_token == "<|endoftext|>" and tok.bos_token_id == tok.eos_token_id
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    # No special token is added: a document's ids are exactly its text's.
    assert tok.decode(tok("Hello")["input_ids"], skip_special_tokens=False) == "Hello"


def test_prompt_and_completion_tokenize_at_the_same_boundary(corpus):
    tok = train_tokenizer([d["text"] for d in corpus.documents])
    for q in corpus.queries:
        joined = tok(q["prompt"] + q["completion"])["input_ids"]
        assert joined == tok(q["prompt"])["input_ids"] + tok(q["completion"])["input_ids"], q


def test_tokenizer_is_deterministic_and_loads_offline(tmp_path, corpus):
    texts = [d["text"] for d in corpus.documents]
    tok = train_tokenizer(texts, vocab_size=512, out_dir=tmp_path / "tok")
    assert train_tokenizer(texts, vocab_size=512).get_vocab() == tok.get_vocab()
    loaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert loaded.get_vocab() == tok.get_vocab()
    assert (loaded.eos_token_id, loaded.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)
    assert loaded(texts[0])["input_ids"] == tok(texts[0])["input_ids"]


def test_tokenizer_rejects_bad_input():
    with pytest.raises(ValueError, match="texts is empty"):
        train_tokenizer([])
    with pytest.raises(ValueError, match="vocab_size=100"):
        train_tokenizer(["a b c"], vocab_size=100)


@pytest.mark.timeout(60)
def test_small_training_saves_reloads_and_lowers_loss(tmp_path, tiny_corpus):
    texts = [d["text"] for d in tiny_corpus.documents]
    kwargs = dict(n_layer=1, n_embd=32, n_head=2, vocab_size=400, max_steps=30, batch_size=8, progress=False)
    seen = []

    def eval_fn(model, tok):
        seen.append(model.training)
        return len(seen)

    result = train_tiny_gpt2(texts, tmp_path / "m", eval_fn=eval_fn, eval_every=10, **kwargs)
    assert result.steps == 30
    assert result.final_loss < result.initial_loss - 1.0
    assert result.seconds > 0
    assert [s for s, _ in result.evals] == [10, 20, 30] and seen == [False, False, False]

    model = AutoModelForCausalLM.from_pretrained(result.path)
    tok = AutoTokenizer.from_pretrained(result.path)
    assert model.config.n_layer == 1 and model.config.pad_token_id == tok.pad_token_id
    assert len(tok) <= model.config.vocab_size
    accuracy = fact_accuracy(model, tok, tiny_corpus.queries)
    assert 0.0 <= accuracy <= 1.0
    wrong = [dict(q, completion=" zzzz") for q in tiny_corpus.queries]
    assert fact_accuracy(model, tok, wrong) == 0.0
    assert len(greedy_completions(model, tok, ["Hello"], max_new_tokens=3)) == 1

    # Same seed, same model: the loop has no hidden randomness. Retraining into the same
    # directory replaces its files and leaves no staging directory behind.
    again = train_tiny_gpt2(texts, tmp_path / "m", **kwargs)
    assert again.final_loss == result.final_loss
    other = AutoModelForCausalLM.from_pretrained(again.path)
    for (name, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), name
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_checkpoints_are_saved_along_the_same_training(tmp_path, tiny_corpus):
    """checkpoints=2 saves the model after 10 and 20 of 30 steps, each loadable with its tokenizer, with the learning
    rate of the step that follows (the schedule's own, read from the optimizer); the final model is the one a
    training without checkpoints ends with, and an earlier training's checkpoints do not survive a new one."""
    from dataworth.training import RetrainConfig, lr_factor

    texts = [d["text"] for d in tiny_corpus.documents]
    kwargs = dict(n_layer=1, n_embd=32, n_head=2, vocab_size=400, max_steps=30, batch_size=8, progress=False)
    plain = train_tiny_gpt2(texts, tmp_path / "plain", **kwargs)
    result = train_tiny_gpt2(texts, tmp_path / "m", checkpoints=2, **kwargs)
    assert [(s, p.name) for s, p, _ in result.checkpoints] == [(10, "step-10"), (20, "step-20")]
    final = AutoModelForCausalLM.from_pretrained(result.path).state_dict()
    for (name, a), b in zip(AutoModelForCausalLM.from_pretrained(plain.path).state_dict().items(), final.values()):
        assert torch.equal(a, b), name
    # Same files, same fingerprint: an evaluate run with checkpoints reuses the retrainings of one without.
    from dataworth.config import ModelConfig
    from dataworth.fingerprint import model_fingerprint

    assert model_fingerprint(ModelConfig(name_or_path=str(plain.path))) == model_fingerprint(
        ModelConfig(name_or_path=str(result.path))
    )
    first = AutoModelForCausalLM.from_pretrained(result.checkpoints[0][1]).state_dict()
    assert any(not torch.equal(first[n], final[n]) for n in final)
    assert (
        AutoTokenizer.from_pretrained(result.checkpoints[0][1]).get_vocab()
        == AutoTokenizer.from_pretrained(result.path).get_vocab()
    )
    # The weights are the schedule's learning rates: a LambdaLR over the same factor, stepped explicitly.
    recipe = RetrainConfig(max_steps=30, batch_size=8, lr=3e-3, warmup_fraction=0.05)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=recipe.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, 30, recipe.warmup_fraction))
    lrs = []
    for _ in range(30):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert [w for *_, w in result.checkpoints] == pytest.approx([lrs[10], lrs[20]])
    assert result.final_lr == pytest.approx(lrs[29]) and lrs[29] < lrs[10]
    again = train_tiny_gpt2(texts, tmp_path / "m", checkpoints=1, **kwargs)
    assert sorted(p.name for p in (tmp_path / "m-checkpoints").iterdir()) == ["step-15"]
    assert not (tmp_path / "m" / "checkpoints").exists()  # the model's own folder holds the final model alone
    assert again.checkpoints[0][0] == 15
    with pytest.raises(ValueError, match="checkpoints=30"):
        train_tiny_gpt2(texts, tmp_path / "x", checkpoints=30, **kwargs)


def test_training_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="n_embd=30"):
        train_tiny_gpt2(["a b"], tmp_path, n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="texts is empty"):
        train_tiny_gpt2([], tmp_path)
    with pytest.raises(ValueError, match="max_steps=0"):
        train_tiny_gpt2(["a b"], tmp_path, max_steps=0)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_demo_model_learns_the_facts(tmp_path, corpus):
    result = train_tiny_gpt2([d["text"] for d in corpus.documents], tmp_path / "demo", progress=False)
    model = AutoModelForCausalLM.from_pretrained(result.path)
    tok = AutoTokenizer.from_pretrained(result.path)
    assert fact_accuracy(model, tok, corpus.queries) >= 0.85
