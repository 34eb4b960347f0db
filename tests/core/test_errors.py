"""Named error types: ValueErrors (never retried), raised where the core refuses bad input, and the retry rule."""

import errno

import pytest
import torch

from dataworth.errors import (
    ConfigError,
    DataError,
    DataworthError,
    IndexMismatchError,
    ModelError,
    QueryError,
    is_retryable,
)

NAMED = [ConfigError, DataError, QueryError, ModelError, IndexMismatchError]


@pytest.mark.parametrize("error", NAMED)
def test_named_errors_are_value_errors(error):
    assert issubclass(error, DataworthError) and issubclass(error, ValueError)
    assert not is_retryable(error("bad input"))


@pytest.mark.parametrize(
    "exc, retry",
    [
        (OSError("disk busy"), True),
        (ConnectionError("reset by peer"), True),
        (TimeoutError("read timed out"), True),
        (FileNotFoundError("no such file"), False),
        (PermissionError("denied"), False),
        (IsADirectoryError("a directory"), False),
        (NotADirectoryError("not a directory"), False),
        (FileExistsError("a file is in the way"), False),
        (OSError(errno.EROFS, "Read-only file system"), False),
        (OSError(errno.ENOSPC, "No space left on device"), False),
        (OSError(errno.EIO, "Input/output error"), True),
        (ValueError("bad value"), False),
        (RuntimeError("a bug"), False),
        (KeyboardInterrupt(), False),
    ],
)
def test_only_transient_io_failures_are_retried(exc, retry):
    assert is_retryable(exc) is retry


def test_an_io_error_that_is_also_bad_input_is_not_retried():
    class StoreError(OSError, ValueError):
        pass

    assert not is_retryable(StoreError("unreadable index"))


def test_queries_and_data_raise_their_named_errors(tmp_path):
    from dataworth.config import DataConfig
    from dataworth.data import load_documents
    from dataworth.queries import load_queries

    with pytest.raises(QueryError, match="no queries"):
        load_queries(None, [])
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "a"}\n')
    with pytest.raises(DataError, match="has no column 'body'"):
        load_documents(DataConfig(dataset=str(path), text_column="body"))
    with pytest.raises(DataError, match="does not exist"):  # bad input: named, never retried
        load_documents(DataConfig(dataset=str(tmp_path / "missing.jsonl")))


def test_attribution_core_raises_named_errors():
    from tiny import make_tiny_gpt2

    from dataworth.attribution.curvature import Curvature, FisherAccumulator
    from dataworth.attribution.projection import FittedProjections, Projector, select_modules
    from dataworth.attribution.scoring import prepare_queries
    from dataworth.config import CurvatureConfig, LoggingConfig

    model = make_tiny_gpt2()
    with pytest.raises(ConfigError, match="matches no Linear/Conv1D layer"):
        select_modules(model, ["transformer.h.*.mpl.*"], [])
    with pytest.raises(ModelError, match="no Linear or Conv1D layers"):
        select_modules(torch.nn.Sequential(torch.nn.ReLU()), ["*"], [])
    cfg = LoggingConfig(precondition="kfac", proj_dim_in=2, proj_dim_out=2)
    modules = select_modules(model, cfg.modules, cfg.exclude_modules)
    wrong = FittedProjections({n: (torch.zeros(3, 3), torch.zeros(3, 3)) for n in modules})
    with pytest.raises(IndexMismatchError, match="refit them"):
        Projector(modules, cfg, wrong)
    with pytest.raises(ConfigError, match="needs projections fitted to the model"):
        Projector(modules, cfg)
    layout = Projector(modules, cfg.model_copy(update={"precondition": "none"})).layout
    with pytest.raises(IndexMismatchError, match="columns"):
        FisherAccumulator(layout, CurvatureConfig()).update(torch.zeros(2, layout.dim + 1))
    with pytest.raises(DataError, match="zero examples"):
        FisherAccumulator(layout, CurvatureConfig()).finalize()
    with pytest.raises(ConfigError, match="unknown score mode"):
        prepare_queries(torch.zeros(1, layout.dim), Curvature.identity(layout), ["nope"])


def test_training_and_benchmarks_raise_named_errors():
    from dataworth.benchmarks.facts import generate_fact_corpus
    from dataworth.training import check_sequences

    with pytest.raises(DataError, match="sequence 1 is empty"):
        check_sequences([[1, 2], []], 10, None, "sequence")
    with pytest.raises(DataError, match="more than the model's context of 2"):
        check_sequences([[1, 2, 3]], 10, 2, "sequence")
    with pytest.raises(DataError, match="outside the model's vocabulary of 10"):
        check_sequences([[1, 12]], 10, None, "sequence")
    with pytest.raises(ConfigError, match="n_entities=0"):
        generate_fact_corpus(n_entities=0)


@pytest.mark.parametrize("error", NAMED)
def test_every_named_error_says_what_to_do(error):
    assert error("bad input").fix and error("bad input", fix="do this").fix == "do this"
    assert error("bad input").fix == error.fix  # the class default when none is given
