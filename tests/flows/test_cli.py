"""The `dataworth` command line: help, readable configuration errors, YAML configs overridden by flags."""

import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from dataworth.config import IndexConfig, QueryConfig
from flows.cli import _demo_config, _evaluate_config, _index_config, _query_config, build_parser, main

DATAWORTH = shutil.which("dataworth", path=os.path.dirname(sys.executable)) or shutil.which("dataworth")


def run_cli(*args, env=None, timeout=60, cwd=None):
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        **(env or {}),
    }
    return subprocess.run([DATAWORTH, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_console_script_installed():
    assert DATAWORTH is not None, "the `dataworth` console script is not installed (pip install -e .)"


@pytest.mark.parametrize(
    "args, flags",
    [
        ([], ["demo", "index", "query", "evaluate"]),
        (["demo"], ["--workspace", "--size", "--seed", "--epochs", "--modes", "--top-k", "--no-mlflow", "--config"]),
        (
            ["index"],
            [
                "--model",
                "--dataset",
                "--index",
                "--text-column",
                "--id-column",
                "--max-length",
                "--skip-empty",
                "--proj-dim",
                "--projection",
                "--curvature",
                "--damping",
                "--modules",
                "--overwrite",
                "--config",
            ],
        ),
        (
            ["query"],
            [
                "--index",
                "--queries",
                "--prompt",
                "--max-new-tokens",
                "--report-dir",
                "--modes",
                "--top-k",
                "--full-matrix",
                "--config",
            ],
        ),
        (
            ["evaluate"],
            [
                "--benchmark",
                "--subsets",
                "--baselines",
                "--calibrate",
                "--no-lds",
                "--proj-dim",
                "--config",
                "--tail-patch-lr",
                "--tail-patch-optimizer",
                "--proj-dims",
                "--calibrate-proxy",
            ],
        ),
    ],
)
def test_help(args, flags):
    out = run_cli(*args, "--help")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: dataworth")
    for flag in flags:
        assert flag in out.stdout, f"{flag} missing from `dataworth {' '.join(args)} --help`"


def test_missing_required_value_is_a_readable_error(tmp_path):
    out = run_cli("index", "--dataset", str(tmp_path / "corpus.jsonl"), "--index", str(tmp_path / "idx"), "--no-mlflow")
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "dataworth index: invalid configuration" in out.stderr
    assert "model: Field required" in out.stderr
    assert "index_uri" not in out.stderr and "data" not in out.stderr.split("configuration", 1)[1]


def test_missing_nested_value_names_the_dotted_field(capsys):
    assert main(["index", "--model", "gpt2", "--dataset", "corpus.jsonl"]) == 2
    err = capsys.readouterr().err
    assert "index_uri: Field required" in err


def test_unknown_yaml_key_is_a_readable_error(tmp_path, capsys):
    cfg = tmp_path / "index.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {"model": {"name_or_path": "gpt2", "dtpye": "float32"}, "data": {"dataset": "c.jsonl"}, "index_uri": "idx"}
        )
    )
    assert main(["index", "--config", str(cfg)]) == 2
    assert "model.dtpye: Extra inputs are not permitted" in capsys.readouterr().err


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "config file .* does not exist"),
        ("- just\n- a list\n", "must hold a mapping at the top level"),
        ("model: [unclosed\n", "expected"),
    ],
)
def test_bad_config_file_is_a_readable_error(tmp_path, capsys, content, message):
    cfg = tmp_path / "index.yaml"
    if content is not None:
        cfg.write_text(content)
    assert main(["index", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dataworth index: ")
    assert re.search(message, err), err


def test_index_config_yaml_then_flags(tmp_path):
    cfg = tmp_path / "index.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "model": {"name_or_path": "from-yaml", "dtype": "float64"},
                "data": {"dataset": "corpus.jsonl", "max_length": 64, "text_column": "body"},
                "logging": {"proj_dim_in": 4, "proj_dim_out": 4, "batch_size": 2},
                "curvature": {"kind": "identity"},
                "index_uri": "yaml-index",
            }
        )
    )
    args = build_parser().parse_args(
        [
            "index",
            "--config",
            str(cfg),
            "--model",
            "from-flag",
            "--max-length",
            "32",
            "--proj-dim",
            "8",
            "--skip-empty",
            "--damping",
            "0.5",
            "--no-mlflow",
            "--experiment",
            "exp",
        ]
    )
    config = IndexConfig(**_index_config(args))
    assert config.model.name_or_path == "from-flag"  # flag overrides
    assert config.model.dtype == "float64"  # YAML kept where no flag is given
    assert config.data.dataset == "corpus.jsonl" and config.data.text_column == "body"
    assert config.data.max_length == 32 and config.data.skip_empty is True
    assert (config.logging.proj_dim_in, config.logging.proj_dim_out, config.logging.batch_size) == (8, 8, 2)
    assert config.curvature.kind == "identity" and config.curvature.damping_factor == 0.5
    assert config.index_uri == "yaml-index"
    assert config.tracking.enabled is False and config.tracking.experiment == "exp"
    assert config.overwrite is False  # store_true flags left out do not override YAML or defaults


def test_evaluate_config_yaml_then_flags(tmp_path):
    from dataworth.evaluation.config import EvaluateConfig

    cfg = tmp_path / "evaluate.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "benchmark": "lm-small",
                "tail_patch": {"lr": 0.5, "top_k": 3},
                "lds": {"n_subsets": 7},
                "calibrate": {"damping_factors": [1.0]},
            }
        )
    )
    args = build_parser().parse_args(
        [
            "evaluate",
            "--config",
            str(cfg),
            "--tail-patch-lr",
            "0.02",
            "--tail-patch-optimizer",
            "normalized",
            "--calibrate",
            "--calibrate-proxy",
            "lds",
            "--proj-dims",
            "16",
            "8",
            "--proj-dim",
            "12",
            "--no-brittleness",
        ]
    )
    config = EvaluateConfig(**_evaluate_config(args))
    assert config.benchmark == "lm-small" and config.lds.n_subsets == 7
    assert (config.tail_patch.lr, config.tail_patch.optimizer, config.tail_patch.top_k) == (0.02, "normalized", 3)
    assert config.calibrate.enabled and config.calibrate.proj_dims == [8, 16] and config.calibrate.proxy == "lds"
    assert config.calibrate.damping_factors == [1.0]
    assert (config.logging.proj_dim_in, config.logging.proj_dim_out) == (12, 12)
    assert config.brittleness.enabled is False and config.lds.enabled is True
    default = EvaluateConfig(**_evaluate_config(build_parser().parse_args(["evaluate"])))
    assert (default.tail_patch.lr, default.tail_patch.optimizer) == (0.01, "sgd")


@pytest.mark.parametrize(
    "command, builder, model",
    [
        (["demo"], _demo_config, "DemoConfig"),
        (["evaluate"], _evaluate_config, "EvaluateConfig"),
        (["index", "--model", "m", "--dataset", "d", "--index", "i"], _index_config, "IndexConfig"),
        (["query", "--index", "i", "--prompt", "p"], _query_config, "QueryConfig"),
    ],
)
def test_every_command_builds_its_config_from_bare_flags(command, builder, model):
    import dataworth.config
    import dataworth.evaluation.config

    cls = getattr(dataworth.config, model, None) or getattr(dataworth.evaluation.config, model)
    cls(**builder(build_parser().parse_args(command)))


def test_index_config_flags_alone():
    args = build_parser().parse_args(["index", "--model", "m", "--dataset", "d.jsonl", "--index", "i"])
    config = IndexConfig(**_index_config(args))
    assert (config.model.name_or_path, config.data.dataset, config.index_uri) == ("m", "d.jsonl", "i")
    assert config.data.skip_empty is False and config.tracking.enabled is True
    assert config.data.max_length == 256


def test_query_config_yaml_then_flags(tmp_path):
    cfg = tmp_path / "query.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "index_uri": "yaml-index",
                "queries": [{"id": "y1", "prompt": "from yaml", "completion": " yes"}],
                "score": {"top_k": 20, "modes": ["dot", "influence"]},
                "generation": {"max_new_tokens": 4, "stop": ["."]},
                "report_dir": "yaml-reports",
            }
        )
    )
    args = build_parser().parse_args(
        [
            "query",
            "--config",
            str(cfg),
            "--index",
            "flag-index",
            "--top-k",
            "3",
            "--prompt",
            "hi",
            "--prompt",
            "there",
            "--max-new-tokens",
            "12",
            "--damping",
            "0.2",
        ]
    )
    config = QueryConfig(**_query_config(args))
    assert config.index_uri == "flag-index"
    assert config.score.top_k == 3 and config.score.modes == ["dot", "influence"] and config.score.damping_factor == 0.2
    assert config.generation.max_new_tokens == 12 and config.generation.stop == ["."]
    assert config.report_dir == "yaml-reports"
    assert [(q.id, q.prompt, q.completion) for q in config.queries] == [
        ("y1", "from yaml", " yes"),
        ("prompt-1", "hi", None),
        ("prompt-2", "there", None),
    ]
    assert config.score.full_matrix is False


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_query_without_a_published_index(tmp_path):
    index = tmp_path / "empty-index"
    index.mkdir()
    out = run_cli(
        "query",
        "--index",
        str(index),
        "--prompt",
        "hi",
        "--no-mlflow",
        cwd=tmp_path,
        timeout=280,
        env={"PREFECT_HOME": str(tmp_path / "prefect-home")},
    )
    assert out.returncode == 2, out.stderr[-3000:]
    assert f"dataworth query: no published index at '{index}'; build one first with `dataworth index`" in out.stderr
