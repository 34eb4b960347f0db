"""Device, context length and pad id: each read one way for every part of dataworth."""

import pytest
import torch
from tiny import make_tiny_gpt2, make_tiny_llama

from dataworth.benchmarks.tiny_model import train_tokenizer
from dataworth.data import pad_token_id
from dataworth.errors import ConfigError, ModelError
from dataworth.model import DTYPES, context_length, load_model, resolve_device


def test_context_length_from_a_model_or_its_config():
    gpt2, llama = make_tiny_gpt2(), make_tiny_llama()
    assert context_length(gpt2) == context_length(gpt2.config) == 64
    assert context_length(llama) == context_length(llama.config) == 64
    assert context_length(object()) is None
    assert context_length(object(), 128) == 128


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="model.device is 'cuda'"):
            resolve_device("cuda", "model.device")


def test_dtypes_cover_the_config_choices():
    from typing import get_args

    from dataworth.config import ModelConfig

    assert set(get_args(ModelConfig.model_fields["dtype"].annotation)) <= set(DTYPES)


def test_missing_model_path_is_a_model_error(tmp_path):
    from dataworth.config import ModelConfig

    with pytest.raises(ModelError, match="does not exist"):
        load_model(ModelConfig(name_or_path=str(tmp_path / "nowhere")))


def test_pad_id_from_a_tokenizer():
    tok = train_tokenizer(["a b c d e f"] * 4, vocab_size=300)
    assert pad_token_id(tok) == tok.pad_token_id
    tok.pad_token = None
    assert pad_token_id(tok) == tok.eos_token_id


class _Config:
    def __init__(self, pad, eos, vocab_size=10):
        self.pad_token_id, self.eos_token_id, self.vocab_size = pad, eos, vocab_size


@pytest.mark.parametrize(
    "pad, eos, expected",
    [(3, 4, 3), (None, 4, 4), (12, 4, 4), (None, [4, 5], 0), (None, None, 0), (-1, 2, 2)],
)
def test_pad_id_from_a_config_stays_inside_the_vocabulary(pad, eos, expected):
    assert pad_token_id(_Config(pad, eos)) == expected


def test_pad_id_of_a_real_config():
    model = make_tiny_gpt2()  # GPT-2's default eos id (50256) lies outside this tiny vocabulary
    assert pad_token_id(model.config) == 0
