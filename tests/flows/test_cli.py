"""The `dataworth` command line: help, readable configuration errors, YAML configs overridden by flags."""

import os
import re
import shutil
import subprocess
import sys
from types import NoneType, UnionType
from typing import Literal, Union, get_args, get_origin

import pytest
import yaml
from pydantic import BaseModel

from dataworth.config import save_yaml
from flows.cli import ALIASES, COMMANDS, build_config, build_parser, command_parser, config_class, main

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
        ([], ["demo", "index", "query", "evaluate", "benchmark"]),
        (["benchmark"], ["--preset", "--sizes", "--dim", "--peers", "--model.layers", "--json", "--no-mlflow"]),
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
    config = build_config(args)
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
    config = build_config(args)
    assert config.benchmark == "lm-small" and config.lds.n_subsets == 7
    assert (config.tail_patch.lr, config.tail_patch.optimizer, config.tail_patch.top_k) == (0.02, "normalized", 3)
    assert config.calibrate.enabled and config.calibrate.proj_dims == [8, 16] and config.calibrate.proxy == "lds"
    assert config.calibrate.damping_factors == [1.0]
    assert (config.logging.proj_dim_in, config.logging.proj_dim_out) == (12, 12)
    assert config.brittleness.enabled is False and config.lds.enabled is True
    default = build_config(build_parser().parse_args(["evaluate"]))
    assert (default.tail_patch.lr, default.tail_patch.optimizer) == (0.01, "sgd")


@pytest.mark.parametrize(
    "command, given",
    [
        (["demo"], {}),
        (["evaluate"], {}),
        (["benchmark"], {}),
        (
            ["benchmark", "--preset", "gpu", "--json", "b.json", "--sizes", "64", "8"],
            {"preset": "gpu", "json_path": "b.json", "sizes": [8, 64]},
        ),
        (
            ["index", "--model", "m", "--dataset", "d", "--index", "i"],
            {"model": {"name_or_path": "m"}, "data": {"dataset": "d"}, "index_uri": "i"},
        ),
        (
            ["query", "--index", "i", "--prompt", "p"],
            {"index_uri": "i", "queries": [{"id": "prompt-1", "prompt": "p"}]},
        ),
    ],
)
def test_every_command_builds_its_config_from_bare_flags(command, given):
    config = build_config(build_parser().parse_args(command))
    assert config == config_class(command[0])(**given)  # flags left out change nothing


def test_index_config_flags_alone():
    args = build_parser().parse_args(["index", "--model", "m", "--dataset", "d.jsonl", "--index", "i"])
    config = build_config(args)
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
    config = build_config(args)
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
    assert f"dataworth query: no published index at '{index}' — build one first with `dataworth index`" in out.stderr


# Fields without a flag of their own, and why. Every other field of every command's config must have one.
NO_FLAG = {
    "queries": "a list of {id, prompt, completion} records: --prompt appends to it, a --config file sets it",
    "tracking.parent_run_id": "set by the demo flow for the runs it nests, never by a user",
}
REQUIRED = object()


def config_fields(cls, prefix="", defaults=None):
    """(path, annotation without Optional, effective default) of every leaf, nested models walked; a
    section's defaults come from the parent's default instance (DemoConfig.logging: 32×32 projections)."""
    for name, info in cls.model_fields.items():
        path = prefix + name
        if isinstance(defaults, BaseModel):
            default = getattr(defaults, name)
        else:
            default = REQUIRED if info.is_required() else info.get_default(call_default_factory=True)
        annotation = info.annotation
        if get_origin(annotation) in (Union, UnionType):
            (annotation,) = [a for a in get_args(annotation) if a is not NoneType]
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from config_fields(annotation, path + ".", default)
        else:
            yield path, annotation, default


def shown(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return " ".join(map(shown, value)) or "empty"
    return str(value)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_field_has_a_flag_with_the_configs_default_and_choices(command):
    parser = command_parser(build_parser(), command)
    actions = parser._option_string_actions
    help_text = " ".join(parser.format_help().split())
    fields = list(config_fields(config_class(command)))
    assert len(fields) > 10
    for path, annotation, default in fields:
        flag = "--" + path.replace("_", "-")
        if path in NO_FLAG:  # (--queries is another field's flag: queries_path)
            setters = [a.option_strings for a in parser._actions if path in getattr(a, "paths", ())]
            assert setters in ([], [["--prompt"]]), f"{path} is in NO_FLAG but {setters} set it"
            continue
        assert flag in actions, f"`dataworth {command}`: no flag for {path}"
        action = actions[flag]
        assert action.paths == (path,)
        expected = "(required)" if default is REQUIRED else f"(default: {shown(default)})"
        assert action.help.endswith(expected), f"{flag}: {action.help!r} does not end with {expected!r}"
        assert " ".join(action.help.replace("%%", "%").split()) in help_text, f"{flag} missing from --help"
        is_list = get_origin(annotation) is list
        item = get_args(annotation)[0] if is_list else annotation
        assert action.nargs == ("*" if is_list else 0 if item is bool else None), flag
        if get_origin(item) is Literal:
            assert action.choices == list(get_args(item)), flag
            assert "{" + ",".join(get_args(item)) + "}" in help_text
        else:
            assert action.choices is None
        if item is bool:
            assert actions["--no-" + flag[2:]] is action  # both directions: a flag can undo the file


def test_help_shows_each_commands_own_defaults():
    def help_of(command, flag):
        return command_parser(build_parser(), command)._option_string_actions[flag].help

    assert help_of("index", "--proj-dim").endswith("(default: 64)")
    assert help_of("demo", "--proj-dim").endswith("(default: 32)")  # DemoConfig.logging's default_factory
    assert help_of("evaluate", "--batch-size").endswith("(default: 16)")
    assert help_of("demo", "--shard-size").endswith("(default: 128)")
    assert help_of("query", "--modes").endswith("(default: dot influence relatif cosine)")
    hybrid = " ".join(
        f"hybrid-{kind}-{m}"
        for kind in ("rrf", "rerank", "linear")
        for m in ("dot", "influence", "relatif", "cosine", "trackstar")
    )
    assert help_of("evaluate", "--modes").endswith(f"(default: dot influence relatif cosine trackstar {hybrid})")
    assert help_of("index", "--logging.exclude-modules").endswith("(default: lm_head *.lm_head embed_out)")
    assert help_of("evaluate", "--calibrate.proj-dims").endswith("(default: empty)")
    assert help_of("index", "--model").endswith("(required)")


def test_a_section_given_in_part_keeps_the_commands_defaults(tmp_path):
    parse = build_parser().parse_args
    config = build_config(parse(["demo", "--batch-size", "4"]))
    assert (config.logging.proj_dim_in, config.logging.batch_size, config.logging.shard_size) == (32, 4, 128)
    config = build_config(parse(["evaluate", "--proj-dim", "12"]))
    assert (config.logging.proj_dim_in, config.logging.batch_size, config.logging.shard_size) == (12, 16, 256)
    cfg = tmp_path / "demo.yaml"
    cfg.write_text(yaml.safe_dump({"logging": {"proj_dim_in": 8}}))
    config = build_config(parse(["demo", "--config", str(cfg)]))
    assert (config.logging.proj_dim_in, config.logging.proj_dim_out, config.logging.batch_size) == (8, 32, 16)


def test_every_alias_is_a_flag_of_some_command():
    parser = build_parser()
    flags = {f for c in COMMANDS for f in command_parser(parser, c)._option_string_actions}
    assert {a.flag for a in ALIASES} <= flags


def dotted(config, path):
    for key in path.split("."):
        config = getattr(config, key)
    return config


# Every flag the CLI had before it was generated from the configs, with the fields it sets.
LEGACY = {
    "index": (
        "--model m --tokenizer t --dataset d.jsonl --split s --text-column body --id-column doc --max-length 64 "
        "--max-documents 5 --skip-empty --index idx --modules h.* --projection rademacher --proj-dim 8 "
        "--precondition none --curvature identity --damping 0.5 --batch-size 2 --shard-size 3 --dtype float64 "
        "--device cpu --overwrite --mlflow-uri sqlite:///m.db --experiment e --no-mlflow",
        {
            "model.name_or_path": "m",
            "model.tokenizer": "t",
            "data.dataset": "d.jsonl",
            "data.split": "s",
            "data.text_column": "body",
            "data.id_column": "doc",
            "data.max_length": 64,
            "data.max_documents": 5,
            "data.skip_empty": True,
            "index_uri": "idx",
            "logging.modules": ["h.*"],
            "logging.projection": "rademacher",
            "logging.proj_dim_in": 8,
            "logging.proj_dim_out": 8,
            "logging.precondition": "none",
            "curvature.kind": "identity",
            "curvature.damping_factor": 0.5,
            "logging.batch_size": 2,
            "logging.shard_size": 3,
            "model.dtype": "float64",
            "model.device": "cpu",
            "overwrite": True,
            "tracking.tracking_uri": "sqlite:///m.db",
            "tracking.experiment": "e",
            "tracking.enabled": False,
        },
    ),
    "demo": (
        "--workspace w --size medium --seed 3 --epochs 2 --show 4 --modes dot cosine --top-k 5 --damping 0.3",
        {
            "workspace": "w",
            "corpus_size": "medium",
            "seed": 3,
            "train_epochs": 2,
            "show_queries": 4,
            "score.modes": ["dot", "cosine"],
            "score.top_k": 5,
            "curvature.damping_factor": 0.3,
            "score.damping_factor": None,
        },
    ),
    "evaluate": (
        "--benchmark facts-medium --workspace w --seed 1 --epochs 2 --proj-dim 8 --precondition none "
        "--curvature identity --baselines bm25 kronfluence --subsets 5 --no-lds --no-brittleness --no-tail-patch "
        "--tail-patch-lr 0.1 --tail-patch-optimizer adam --no-loo --calibrate --calibrate-proxy lds "
        "--damping-factors 0.1 1 --proj-dims 4 8 --modes dot --top-k 3 --damping 0.2",
        {
            "benchmark": "facts-medium",
            "workspace": "w",
            "seed": 1,
            "train_epochs": 2,
            "logging.proj_dim_in": 8,
            "logging.proj_dim_out": 8,
            "logging.precondition": "none",
            "curvature.kind": "identity",
            "baselines": ["bm25", "kronfluence"],
            "lds.n_subsets": 5,
            "lds.enabled": False,
            "brittleness.enabled": False,
            "tail_patch.enabled": False,
            "tail_patch.lr": 0.1,
            "tail_patch.optimizer": "adam",
            "loo": False,
            "calibrate.enabled": True,
            "calibrate.proxy": "lds",
            "calibrate.damping_factors": [0.1, 1.0],
            "calibrate.proj_dims": [4, 8],
            "score.modes": ["dot"],
            "score.top_k": 3,
            "curvature.damping_factor": 0.2,
        },
    ),
    "query": (
        "--index idx --queries q.jsonl --prompt hi --max-new-tokens 4 --report-dir r --full-matrix --modes dot "
        "--top-k 3 --damping 0.2",
        {
            "index_uri": "idx",
            "queries_path": "q.jsonl",
            "generation.max_new_tokens": 4,
            "report_dir": "r",
            "score.full_matrix": True,
            "score.modes": ["dot"],
            "score.top_k": 3,
            "score.damping_factor": 0.2,
            "curvature": None,  # no such section: --damping is the query's score override
        },
    ),
}


@pytest.mark.parametrize("command", list(LEGACY))
def test_the_flags_from_before_keep_their_meaning(command):
    argv, expected = LEGACY[command]
    args = build_parser().parse_args([command, *argv.split(), "--no-progress"])
    assert args.no_progress is True
    config = build_config(args)
    for path, value in expected.items():
        if path == "curvature":
            assert not hasattr(config, "curvature")
            continue
        assert dotted(config, path) == value, path


REPLAY = {
    "index": "--model m --dataset d.jsonl --index idx --proj-dim 8 --logging.exclude-modules --no-data.add-eos "
    "--model.revision main --damping 0.5 --no-mlflow",
    "query": "--index idx --prompt hi --prompt there --queries q.jsonl --damping 0.2 --generation.stop . ; "
    "--no-generation.stop-at-newline --score.query-batch-size 2",
    "demo": "--size medium --epochs 2 --batch-size 4 --modes dot relatif --tracking.experiment x",
    "evaluate": "--benchmark lm-small --calibrate --calibrate-proxy lds --proj-dims 16 8 --modes dot relatif "
    "--baselines --retrain.epochs 3 --retrain.max-grad-norm none --no-loo --brittleness.ks 2 --lds.fraction 0.25",
}


@pytest.mark.parametrize("command", list(REPLAY))
def test_a_saved_config_replays_with_config(command, tmp_path):
    parse = build_parser().parse_args
    config = build_config(parse([command, *REPLAY[command].split()]))
    saved = save_yaml(config, tmp_path / "config.yaml")
    replayed = build_config(parse([command, "--config", str(saved)]))
    assert replayed == config
    assert replayed.model_dump() == config.model_dump()


def test_flags_override_the_file_in_both_directions(tmp_path):
    cfg = tmp_path / "index.yaml"
    config = build_config(build_parser().parse_args(["index", "--model", "m", "--dataset", "d", "--index", "i"]))
    save_yaml(config.model_copy(update={"overwrite": True}), cfg)
    parse = build_parser().parse_args
    assert build_config(parse(["index", "--config", str(cfg)])).overwrite is True  # unset flags leave the file alone
    assert build_config(parse(["index", "--config", str(cfg), "--no-overwrite"])).overwrite is False
    assert build_config(parse(["index", "--config", str(cfg), "--max-documents", "none"])).data.max_documents is None


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["index", "--model", "m", "--dataset", "d", "--index", "i", "--proj-dim", "0"],
            "dataworth index: invalid configuration: logging.proj_dim_in: Input should be greater than or equal "
            "to 1, got 0 (--proj-dim); logging.proj_dim_out: Input should be greater than or equal to 1, got 0",
        ),
        (["demo", "--top-k", "0"], "dataworth demo: invalid configuration: score.top_k: Input should be greater"),
        (
            ["evaluate", "--benchmark", "lm-small", "--calibrate"],
            "dataworth evaluate: invalid configuration: calibrate.proxy='fact_mrr' needs known relevant documents",
        ),
        (["demo", "--modes"], "dataworth demo: invalid configuration: score.modes: Value error, modes is empty"),
    ],
)
def test_bad_values_are_one_line_validation_errors(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(message.split(":")[0]), err
    assert message.replace("Value error, ", "") in err, err


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["index", "--projection", "nope"],
            "dataworth index: argument --projection/--logging.projection: invalid choice",
        ),
        (["index", "--bogus"], "dataworth index: unrecognized arguments: --bogus"),
        (["query", "--top-k", "many"], "dataworth query: argument --top-k/--score.top-k: invalid int value: 'many'"),
    ],
)
def test_bad_flags_are_one_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err


def test_every_command_runs_a_flow_that_exists():
    import importlib

    from prefect import Flow

    from flows.cli import _RUNS, COMMANDS

    assert set(_RUNS) == set(COMMANDS)
    for module, name, _progress, _rows in _RUNS.values():
        assert isinstance(getattr(importlib.import_module(module), name), Flow)
