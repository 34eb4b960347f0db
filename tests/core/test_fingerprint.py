"""A model's fingerprint covers the files it is loaded from, not what training or evaluation writes beside them: a
Trainer's output directory keeps its fingerprint while checkpoints, logs and results come and go, and changes
when its weights, config or tokenizer do. Indexes that recorded the older kind (every file under the directory)
are still checked, and keep that kind while their model matches it."""

import os

import pytest

from dataworth import fingerprint as fp
from dataworth.config import ModelConfig
from dataworth.errors import IndexMismatchError


def _write(path, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


@pytest.fixture
def out(tmp_path):
    """A Trainer's output directory: the final model and tokenizer at its top, a checkpoint and logs below."""
    root = tmp_path / "out"
    for name, data in {
        "config.json": b'{"model_type": "gpt2"}',
        "model.safetensors": os.urandom(3 << 20),  # past 2 MiB: its head and tail are hashed, not all of it
        "tokenizer.json": b'{"version": "1.0"}',
        "tokenizer_config.json": b"{}",
        "training_args.bin": b"args",
        "checkpoint-5/model.safetensors": b"early weights",
        "checkpoint-5/optimizer.pt": b"adam state",
        "runs/Dec07/events.out.tfevents.1.host": b"loss",
    }.items():
        _write(root / name, data)
    return root


def test_what_training_writes_beside_the_model_leaves_its_fingerprint(out):
    cfg = ModelConfig(name_or_path=str(out))
    before, legacy = fp.model_fingerprint(cfg), fp.model_fingerprint(cfg, fp._LEGACY_KIND)
    assert before.startswith(fp.MODEL_FINGERPRINT_KIND)
    for name, data in {
        "checkpoint-10/model.safetensors": b"later weights",  # training went on: a new checkpoint folder
        "checkpoint-5/trainer_state.json": b"{}",
        "runs/Dec07/events.out.tfevents.2.host": b"more loss",
        "trainer_state.json": b'{"global_step": 10}',
        "optimizer.pt": b"final adam state",
        "scheduler.pt": b"sched",
        "rng_state.pth": b"rng",
        "eval_results.json": b'{"loss": 1}',  # an evaluation script wrote its results there
        "all_results.json": b"{}",
        "README.md": b"# model card",
        "train.log": b"...",
        ".gitattributes": b"*.safetensors filter=lfs",
    }.items():
        _write(out / name, data)
    assert fp.model_fingerprint(cfg) == before
    assert fp.model_fingerprint(cfg, fp._LEGACY_KIND) != legacy  # the older kind hashed them all: it moved


@pytest.mark.parametrize(
    "name, data",
    [
        ("model.safetensors", os.urandom(3 << 20)),  # retrained weights
        ("config.json", b'{"model_type": "gpt2", "n_layer": 3}'),
        ("tokenizer.json", b'{"version": "1.1"}'),
        ("model-00002-of-00002.safetensors", b"another shard"),  # a file the load reads, new
        ("modeling_custom.py", b"class M: pass"),  # remote code beside the weights is read too
    ],
)
def test_what_a_load_reads_changes_the_fingerprint(out, name, data):
    cfg = ModelConfig(name_or_path=str(out))
    before = fp.model_fingerprint(cfg)
    _write(out / name, data)
    assert fp.model_fingerprint(cfg) != before


def test_an_index_of_the_older_kind_is_still_checked_and_keeps_its_kind_while_the_model_matches(out):
    cfg = ModelConfig(name_or_path=str(out))
    legacy = fp.model_fingerprint(cfg, fp._LEGACY_KIND)
    assert legacy.startswith(fp._LEGACY_KIND) and legacy != fp.model_fingerprint(cfg)
    assert fp.check_model_fingerprint(cfg, legacy, "idx") == legacy
    # An incremental run of that index records the kind it was built with (its projections and stored gradients
    # stay usable); a new index, or one whose model changed, the current kind.
    assert fp.index_model_fingerprint(cfg, legacy) == legacy
    assert fp.index_model_fingerprint(cfg, None) == fp.model_fingerprint(cfg)
    _write(out / "model.safetensors", os.urandom(3 << 20))
    with pytest.raises(IndexMismatchError, match="is not the one index 'idx' was built with"):
        fp.check_model_fingerprint(cfg, legacy, "idx")
    assert fp.index_model_fingerprint(cfg, legacy) == fp.model_fingerprint(cfg)
    current = fp.model_fingerprint(cfg)
    assert fp.check_model_fingerprint(cfg, current, "idx") == current
    assert fp.check_model_fingerprint(cfg, "0123abcd", "idx") == "0123abcd"  # a kind before m2: not checked


def test_a_single_file_or_a_hub_name_is_fingerprinted_as_before(tmp_path):
    weights = tmp_path / "model.bin"
    _write(weights, b"w")
    assert fp._loaded_files(str(weights)) == [str(weights)]
    hub = ModelConfig(name_or_path="org/not-local", revision="abc")
    assert fp.model_fingerprint(hub) != fp.model_fingerprint(hub.model_copy(update={"revision": "def"}))
