"""Every CLI command answers --help, and bad configs fail with a readable message, not a traceback."""

import os
import subprocess
import sys

import pytest

from flows.cli import _index_config, _query_config, build_parser, main


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


@pytest.mark.parametrize("command, flags", [
    ([], ["demo", "index", "query", "evaluate"]),
    (["demo"], ["--workspace", "--size"]),
    (["index"], ["--model", "--dataset", "--index", "--projection", "--proj-dim", "--overwrite"]),
    (["query"], ["--index", "--queries", "--prompt", "--top-k", "--damping"]),
    (["evaluate"], ["--benchmark", "--subsets", "--baselines", "--calibrate"]),
])
def test_help(command, flags):
    out = run_cli(*command, "--help")
    assert out.returncode == 0, out.stderr
    for flag in flags:
        assert flag in out.stdout


def test_missing_model_is_a_readable_error(capsys):
    assert main(["index", "--dataset", "d.jsonl", "--index", "x", "--no-mlflow"]) == 2
    err = capsys.readouterr().err
    assert "model" in err and "invalid configuration" in err and "Traceback" not in err


def test_yaml_config_with_flag_overrides(tmp_path):
    cfg = tmp_path / "index.yaml"
    cfg.write_text("model: {name_or_path: m}\ndata: {dataset: d.jsonl, max_length: 64}\nindex_uri: idx\n"
                   "logging: {projection: rademacher}\n")
    args = build_parser().parse_args(["index", "--config", str(cfg), "--max-length", "32", "--proj-dim", "8"])
    resolved = _index_config(args)
    assert resolved["data"] == {"dataset": "d.jsonl", "max_length": 32}
    assert resolved["logging"] == {"projection": "rademacher", "proj_dim_in": 8, "proj_dim_out": 8}
    qargs = build_parser().parse_args(["query", "--index", "idx", "--prompt", "a", "--prompt", "b", "--top-k", "3"])
    q = _query_config(qargs)
    assert [p["prompt"] for p in q["queries"]] == ["a", "b"] and q["score"]["top_k"] == 3


def test_unknown_yaml_key_is_refused(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("model: {name_or_path: m}\ndata: {dataset: d.jsonl}\nindex_uri: idx\nlogging: {projektion: x}\n")
    assert main(["index", "--config", str(cfg)]) == 2
    assert "projektion" in capsys.readouterr().err


@pytest.mark.slow
def test_query_without_index_says_how_to_build_one(tmp_path):
    out = run_cli("query", "--index", str(tmp_path / "nothing"), "--prompt", "hi", "--no-mlflow",
                  env={"PREFECT_HOME": str(tmp_path / "ph"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                       "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 2
    assert "no published index" in out.stderr and "dataworth index" in out.stderr
