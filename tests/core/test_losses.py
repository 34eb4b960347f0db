"""The next-token loss, defined once (dataworth.losses), against explicit log-softmax sums."""

import pytest
import torch
from gradcheck import SEQS

from dataworth.data import collate
from dataworth.errors import ConfigError
from dataworth.losses import mean_token_loss, per_example_loss, sequence_log_probs, token_losses


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    ids, _att, labels = collate(SEQS, 0, [[i % 3 != 0 for i in range(len(s))] for s in SEQS])
    logits = torch.randn(*ids.shape, 13, generator=g, dtype=torch.float64)
    return logits, labels.clamp(max=12)


def explicit_terms(logits, labels, b):
    """-log p(label[t+1]) for every counted position t of sequence b."""
    return [
        -torch.log_softmax(logits[b, t], dim=-1)[labels[b, t + 1]]
        for t in range(labels.shape[1] - 1)
        if labels[b, t + 1] != -100
    ]


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_per_example_loss_is_explicit_next_token_loss(batch, reduction):
    logits, labels = batch
    got = per_example_loss(logits, labels, reduction)
    for b in range(len(SEQS)):
        terms = explicit_terms(logits, labels, b)
        want = torch.stack(terms).sum() if terms else torch.tensor(0.0, dtype=torch.float64)
        if reduction == "mean":
            want = want / max(len(terms), 1)
        assert torch.allclose(got[b], want, atol=1e-12), b
    # bf16 logits are promoted before the softmax
    assert per_example_loss(logits.bfloat16(), labels, reduction).dtype == torch.float32


def test_token_losses_are_zero_where_nothing_is_predicted(batch):
    logits, labels = batch
    nll = token_losses(logits, labels)
    assert nll.shape == labels.shape
    assert torch.all(nll[:, -1] == 0)
    assert torch.all(nll[:, :-1][labels[:, 1:] == -100] == 0)
    assert torch.all(nll[:, :-1][labels[:, 1:] != -100] > 0)


def test_sequence_log_probs_are_float64_negative_losses(batch):
    logits, labels = batch
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        got = sequence_log_probs(logits.to(dtype), labels)
        assert got.dtype == torch.float64
        assert torch.allclose(got, -per_example_loss(logits.to(dtype).double(), labels, "sum"), atol=1e-12)


def test_mean_token_loss_averages_over_every_counted_token(batch):
    logits, labels = batch
    terms = [t for b in range(len(SEQS)) for t in explicit_terms(logits, labels, b)]
    assert torch.allclose(mean_token_loss(logits, labels), torch.stack(terms).mean(), atol=1e-12)
    assert mean_token_loss(logits.bfloat16(), labels).dtype == torch.float32


def test_mean_token_loss_of_nothing_to_predict_is_a_zero_with_a_graph():
    logits = torch.randn(2, 1, 5, requires_grad=True)
    labels = torch.tensor([[3], [4]])
    loss = mean_token_loss(logits, labels)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(logits.grad == 0)


def test_unknown_reduction_is_a_config_error(batch):
    with pytest.raises(ConfigError, match="'median'"):
        per_example_loss(*batch, "median")
