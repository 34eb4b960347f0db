import math
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tiny import make_tiny_gpt2, make_tiny_llama  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from dataworth.attribution.optimizer_state import load_second_moments  # noqa: E402
from dataworth.benchmarks.facts import generate_fact_corpus  # noqa: E402
from dataworth.benchmarks.tiny_model import train_tiny_gpt2, train_tokenizer  # noqa: E402
from dataworth.data import Documents, chunk_documents  # noqa: E402
from dataworth.evaluation.tail_patch import completion_log_probs, tail_patch, tail_patch_scores  # noqa: E402
from dataworth.queries import EncodedQuery  # noqa: E402
from dataworth.training import RetrainConfig, train_causal_lm  # noqa: E402

MAKERS = {"gpt2": make_tiny_gpt2, "llama": make_tiny_llama}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models gain nothing from intra-op threads, and on a busy machine OpenMP's spinning
    # threads make each step ~50× slower; the setting is global, so it is put back.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus():
    return generate_fact_corpus(n_entities=6, n_filler=6, seed=1)


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return train_tokenizer([d["text"] for d in corpus.documents], vocab_size=300)


@pytest.fixture(scope="module")
def sequences(corpus, tokenizer):
    # The index's examples: documents + EOS cut into chunks, as chunk_documents makes them.
    texts = [d["text"] for d in corpus.documents]
    docs = Documents(texts, [str(i) for i in range(len(texts))], [""] * len(texts))
    return [e.input_ids for e in chunk_documents(docs, tokenizer, max_length=24)]


@pytest.fixture(scope="module")
def queries(corpus, tokenizer):
    return [
        EncodedQuery(
            q["id"],
            q["prompt"],
            tokenizer(q["prompt"])["input_ids"],
            tokenizer(q["completion"])["input_ids"],
            q["completion"],
            False,
        )
        for q in corpus.queries[:6]
    ]


def _tiny(arch, tokenizer, dtype=torch.float32, seed=0):
    model = MAKERS[arch](dtype=dtype, vocab=len(tokenizer), seed=seed)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.bos_token_id = model.config.eos_token_id = tokenizer.eos_token_id
    return model


@pytest.fixture(scope="module")
def reference_dirs(tmp_path_factory, tokenizer):
    dirs = {}
    for arch in MAKERS:
        path = tmp_path_factory.mktemp(f"ref-{arch}")
        _tiny(arch, tokenizer).save_pretrained(path)
        tokenizer.save_pretrained(path)
        dirs[arch] = str(path)
    return dirs


@torch.no_grad()
def _mean_loss(model, seqs):
    total, count = 0.0, 0
    for s in seqs:
        logits = model(input_ids=torch.tensor([s])).logits[0, :-1].double()
        total += torch.nn.functional.cross_entropy(logits, torch.tensor(s[1:]), reduction="sum").item()
        count += len(s) - 1
    return total / count


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("arch", list(MAKERS))
def test_training_lowers_loss_and_saves_a_loadable_model(arch, reference_dirs, sequences, tmp_path):
    cfg = RetrainConfig(max_steps=40, batch_size=8, lr=1e-2)
    torch.manual_seed(cfg.seed)
    initial = AutoModelForCausalLM.from_config(AutoModelForCausalLM.from_pretrained(reference_dirs[arch]).config)
    model = train_causal_lm(reference_dirs[arch], sequences, cfg, out_dir=str(tmp_path / "out"))
    assert not model.training
    before, after = _mean_loss(initial.eval(), sequences), _mean_loss(model, sequences)
    assert before > 0.9 * math.log(model.config.vocab_size)
    assert after < before - 1.0, (before, after)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert _same(_weights(loaded), _weights(model))
    assert type(loaded) is type(model)
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok.get_vocab() == AutoTokenizer.from_pretrained(reference_dirs[arch]).get_vocab()
    assert RetrainConfig.model_validate_json((tmp_path / "out" / "retrain_config.json").read_text()) == cfg


def test_same_seed_same_weights_other_seed_differs(reference_dirs, sequences):
    cfg = RetrainConfig(max_steps=4, batch_size=8)
    a = _weights(train_causal_lm(reference_dirs["gpt2"], sequences, cfg))
    b = _weights(train_causal_lm(reference_dirs["gpt2"], sequences, cfg))
    c = _weights(train_causal_lm(reference_dirs["gpt2"], sequences, cfg.model_copy(update={"seed": 1})))
    assert _same(a, b)
    assert not torch.allclose(a["transformer.wte.weight"], c["transformer.wte.weight"])


def test_finetune_starts_from_the_base_weights(reference_dirs, sequences):
    base = _weights(AutoModelForCausalLM.from_pretrained(reference_dirs["llama"]))
    cfg = RetrainConfig(init="finetune", base_model=reference_dirs["llama"], max_steps=1, lr=1e-6)
    tuned = _weights(train_causal_lm(reference_dirs["llama"], sequences, cfg))
    gaps = [float((tuned[k] - base[k]).abs().max()) for k in base]
    # One AdamW step moves each weight by about lr at most (its first step is ≈ lr · sign(g)).
    assert max(gaps) < 1e-5 and max(gaps) > 0
    scratch = _weights(train_causal_lm(reference_dirs["llama"], sequences, RetrainConfig(max_steps=1, lr=1e-6)))
    assert max(float((scratch[k] - base[k]).abs().max()) for k in base) > 1e-2


def test_retraining_on_the_full_data_rebuilds_the_tiny_model(corpus, tokenizer, tmp_path):
    texts = [d["text"] for d in corpus.documents][:12]
    result = train_tiny_gpt2(
        texts,
        tmp_path / "tiny",
        tokenizer=tokenizer,
        n_layer=1,
        n_embd=32,
        n_head=2,
        max_length=160,
        epochs=2,
        batch_size=4,
        progress=False,
    )
    docs = Documents(texts, [str(i) for i in range(len(texts))], [""] * len(texts))
    seqs = [e.input_ids for e in chunk_documents(docs, tokenizer, max_length=160)]
    rebuilt = train_causal_lm(str(result.path), seqs, RetrainConfig(epochs=2, batch_size=4))
    original = _weights(AutoModelForCausalLM.from_pretrained(result.path))
    rebuilt = _weights(rebuilt)
    # Bit-exact on one machine: same init stream, same data order, same loss and schedule.
    for k in original:
        assert torch.equal(rebuilt[k], original[k]), k


def test_bad_input_is_refused(reference_dirs, sequences):
    with pytest.raises(ValueError, match="sequences is empty"):
        train_causal_lm(reference_dirs["gpt2"], [], RetrainConfig(max_steps=1))
    with pytest.raises(ValueError, match="token id 300"):
        train_causal_lm(reference_dirs["gpt2"], [[1, 2, 300]], RetrainConfig(max_steps=1))
    with pytest.raises(ValueError, match="more than the model's context of 64"):
        train_causal_lm(reference_dirs["gpt2"], [[1] * 65], RetrainConfig(max_steps=1))
    with pytest.raises(ValueError, match="needs base_model"):
        RetrainConfig(init="finetune")
    with pytest.raises(ValueError, match="only used with init='finetune'"):
        RetrainConfig(base_model=reference_dirs["gpt2"])
    with pytest.raises(ValueError, match="extra"):
        RetrainConfig(learning_rate=1e-3)


@pytest.mark.parametrize("arch", list(MAKERS))
def test_log_probs_equal_a_plain_forward(arch, tokenizer, queries):
    model = _tiny(arch, tokenizer)
    got = completion_log_probs(model, queries, tokenizer.pad_token_id)
    assert got.dtype == torch.float64 and got.shape == (len(queries),)
    with torch.no_grad():
        for i, q in enumerate(queries):
            ids = q.prompt_ids + q.completion_ids
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), dim=-1)
            want = sum(float(logp[t - 1, ids[t]]) for t in range(len(q.prompt_ids), len(ids)))
            assert got[i].item() == pytest.approx(want, rel=1e-5, abs=1e-4)


@pytest.mark.parametrize("arch", list(MAKERS))
def test_log_probs_do_not_depend_on_batch_size(arch, tokenizer, queries):
    model = _tiny(arch, tokenizer)
    full = completion_log_probs(model, queries, tokenizer.pad_token_id, batch_size=16)
    for bs in (1, 4):
        torch.testing.assert_close(
            completion_log_probs(model, queries, tokenizer.pad_token_id, batch_size=bs), full, rtol=1e-5, atol=1e-4
        )


def _flat_grad(model, loss):
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))])


def _first_order_change(model, example, queries, lr, precondition=None) -> torch.Tensor:
    """Δ log p(completion) of each query predicted to first order for the step θ' = θ − lr · P ∇loss_z (P a
    diagonal preconditioner, the identity when None): −lr ∇log p_q · P ∇loss_z."""
    logits = model(input_ids=torch.tensor([example])).logits[0, :-1]
    g_example = _flat_grad(model, torch.nn.functional.cross_entropy(logits, torch.tensor(example[1:])))
    if precondition is not None:
        g_example = precondition * g_example
    predicted = []
    for q in queries:
        ids = q.prompt_ids + q.completion_ids
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0], dim=-1)
        logp_q = sum(logp[t - 1, ids[t]] for t in range(len(q.prompt_ids), len(ids)))
        predicted.append(-lr * float(_flat_grad(model, logp_q) @ g_example))
    return torch.tensor(predicted, dtype=torch.float64)


@pytest.mark.parametrize("arch", list(MAKERS))
def test_sgd_tail_patch_matches_the_first_order_prediction(arch, tokenizer, queries, sequences):
    model = _tiny(arch, tokenizer, dtype=torch.float64)
    example, lr = sequences[3], 1e-4
    # θ' = θ − lr·∇loss_z, so Δ log p_q ≈ −lr ∇log p_q · ∇loss_z = lr ∇loss_q · ∇loss_z.
    predicted = _first_order_change(model, example, queries, lr)
    got = tail_patch(model, example, queries, tokenizer.pad_token_id, lr=lr, optimizer="sgd")
    assert predicted.abs().max() > 1e-6
    torch.testing.assert_close(got, predicted, rtol=2e-2, atol=2e-2 * float(predicted.abs().max()))


def test_normalized_tail_patch_is_sgd_with_a_relative_step(tokenizer, queries, sequences):
    model = _tiny("gpt2", tokenizer, dtype=torch.float64)
    example, rel = sequences[3], 1e-3
    logits = model(input_ids=torch.tensor([example])).logits[0, :-1]
    g = _flat_grad(model, torch.nn.functional.cross_entropy(logits, torch.tensor(example[1:])))
    w = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    sgd_lr = rel * float(w.norm() / g.norm())  # the SGD step of length rel · ‖θ‖
    got = tail_patch(model, example, queries, tokenizer.pad_token_id, lr=rel, optimizer="normalized")
    expected = tail_patch(model, example, queries, tokenizer.pad_token_id, lr=sgd_lr, optimizer="sgd")
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    assert got.abs().max() > 0


def test_state_tail_patch_is_the_training_optimizers_step(tokenizer, queries, sequences, tmp_path):
    """optimizer='state': Δθ = -lr · g / (√v̂ + ε) with the saved AdamW state, checked against the first-order
    prediction with that explicit preconditioner, and against weights moved by hand."""
    model = _tiny("gpt2", tokenizer, dtype=torch.float64)
    opt = torch.optim.AdamW(model.named_parameters(), lr=1e-3, betas=(0.9, 0.98))
    for seq in sequences[:3]:
        logits = model(input_ids=torch.tensor([seq])).logits[0, :-1]
        torch.nn.functional.cross_entropy(logits, torch.tensor(seq[1:])).backward()
        opt.step()
        opt.zero_grad()
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    moments = load_second_moments(str(tmp_path), model)
    scale = torch.cat(
        [(1 / ((opt.state[p]["exp_avg_sq"] / (1 - 0.98**3)).sqrt() + 1e-8)).reshape(-1) for p in model.parameters()]
    )
    example, lr = sequences[3], 1e-5
    predicted = _first_order_change(model, example, queries, lr, precondition=scale)
    got = tail_patch(model, example, queries, tokenizer.pad_token_id, lr=lr, optimizer="state", second_moments=moments)
    assert predicted.abs().max() > 1e-6
    torch.testing.assert_close(got, predicted, rtol=2e-2, atol=2e-2 * float(predicted.abs().max()))
    # it is not the SGD step: the preconditioner reweighs the coordinates
    sgd = tail_patch(model, example, queries, tokenizer.pad_token_id, lr=lr, optimizer="sgd")
    assert not torch.allclose(got, sgd, rtol=0.1)
    with pytest.raises(ValueError, match="second_moments"):
        tail_patch(model, example, queries, tokenizer.pad_token_id, lr=lr, optimizer="state")


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "normalized"])
def test_tail_patch_restores_weights_grads_and_mode(optimizer, tokenizer, queries, sequences):
    model = _tiny("llama", tokenizer)
    model.train()
    marker = torch.full_like(model.lm_head.weight, 7.0)
    model.lm_head.weight.grad = marker
    before = _weights(model)
    tail_patch(model, sequences[0], queries, tokenizer.pad_token_id, lr=1e-2, optimizer=optimizer)
    assert _same(_weights(model), before)
    assert model.lm_head.weight.grad is marker
    assert model.model.embed_tokens.weight.grad is None
    assert model.training


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_tail_patch_scores_stack_single_patches_and_self_patching_helps(optimizer, tokenizer, queries, sequences):
    model = _tiny("gpt2", tokenizer)
    own = [q.prompt_ids + q.completion_ids for q in queries[:3]]
    candidates = own + sequences[:2]
    lr = 1e-2 if optimizer == "sgd" else 1e-3
    scores = tail_patch_scores(model, candidates, queries, tokenizer.pad_token_id, lr=lr, optimizer=optimizer)
    assert scores.shape == (len(queries), len(candidates)) and scores.dtype == torch.float64
    for j in (0, 4):
        single = tail_patch(model, candidates[j], queries, tokenizer.pad_token_id, lr=lr, optimizer=optimizer)
        torch.testing.assert_close(scores[:, j], single, rtol=0, atol=1e-9)
    # A step on a query's own text raises its completion's probability.
    assert all(scores[i, i] > 0 for i in range(3))


def test_tail_patch_refuses_bad_input(tokenizer, queries, sequences):
    model = _tiny("gpt2", tokenizer)
    with pytest.raises(ValueError, match="candidate_sequences is empty"):
        tail_patch_scores(model, [], queries, tokenizer.pad_token_id)
    with pytest.raises(ValueError, match="lr=0"):
        tail_patch(model, sequences[0], queries, tokenizer.pad_token_id, lr=0)
    with pytest.raises(ValueError, match="use tail_patch_scores"):
        tail_patch(model, sequences[:2], queries, tokenizer.pad_token_id)
    with pytest.raises(ValueError, match="queries is empty"):
        completion_log_probs(model, [], tokenizer.pad_token_id)
    empty = EncodedQuery("q-empty", "p", queries[0].prompt_ids, [], "", False)
    with pytest.raises(ValueError, match="'q-empty' has no completion tokens"):
        completion_log_probs(model, [empty], tokenizer.pad_token_id)
