"""`dataworth` command line: demo, index, query, evaluate, benchmark. Each command runs the real Prefect flow
(ephemeral API unless PREFECT_API_URL points at a server)."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import textwrap
from collections.abc import Callable
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# LanceDB's Rust log prints warnings of its index builders to stderr by the thousand (an IVF build on 1M rows: 2,646
# lines of "visited_generator_queue is full"); errors still show. LANCEDB_LOG=warn (LANCE_LOG for pylance's own
# calls) brings them back.
os.environ.setdefault("LANCEDB_LOG", "error")
os.environ.setdefault("LANCE_LOG", "error")
# Prefect's default (20 s) is too short for a first start on a fresh PREFECT_HOME on a busy 2-core machine
# (database creation): measured 20–30 s there, and a timeout fails the command.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")

from dataworth.config import StageConfig, load_yaml  # noqa: E402
from flows.cli_options import (  # noqa: E402
    OVERRIDES,
    REQUIRED,
    Alias,
    add_config_options,
    apply_overrides,
    fill_section_defaults,
    walk,
)
from flows.failures import DEFAULT_LOG_DIR, LOG_DIR_ENV, RunLog, describe_failure, one_line  # noqa: E402
from flows.service import HOME_ENV, SERVED, SERVICE_ENV, route, submit  # noqa: E402


def _prompt_query(i: int, prompt: str) -> dict[str, Any]:
    return {"id": f"prompt-{i}", "prompt": prompt}


# The one table of short and legacy flags. Every config field also has its own flag, named after
# its dotted path (`--logging.proj-dim-in`); an alias applies to every command whose config has
# all its paths, unless `commands` says otherwise. Bool paths: `--no-...` sets False, else True.
ALIASES: tuple[Alias, ...] = (
    Alias("--model", ("model.name_or_path",)),
    Alias("--tokenizer", ("model.tokenizer",)),
    Alias("--dtype", ("model.dtype",)),
    Alias("--device", ("model.device",)),
    Alias("--dataset", ("data.dataset",)),
    Alias("--split", ("data.split",)),
    Alias("--text-column", ("data.text_column",)),
    Alias("--prompt-column", ("data.prompt_column",)),
    Alias("--conversation-column", ("data.conversation_column",)),
    Alias("--id-column", ("data.id_column",)),
    Alias("--max-length", ("data.max_length",)),
    Alias("--max-documents", ("data.max_documents",)),
    Alias("--skip-empty", ("data.skip_empty",)),
    Alias("--no-eos", ("data.add_eos",)),
    Alias("--index", ("index_uri",)),
    Alias("--modules", ("logging.modules",)),
    Alias("--exclude-modules", ("logging.exclude_modules",)),
    Alias("--projection", ("logging.projection",)),
    Alias(
        "--proj-dim", ("logging.proj_dim_in", "logging.proj_dim_out"), help="Projection size per side (k_in = k_out)."
    ),
    Alias("--precondition", ("logging.precondition",)),
    Alias("--optimizer-state", ("logging.optimizer_state",)),
    Alias("--batch-size", ("logging.batch_size",)),
    Alias("--shard-size", ("logging.shard_size",)),
    Alias("--curvature", ("curvature.kind",)),
    Alias("--damping", ("curvature.damping_factor",), commands=("demo", "index", "evaluate")),
    Alias("--damping", ("score.damping_factor",), commands=("query",)),
    Alias("--modes", ("score.modes",)),
    Alias("--top-k", ("score.top_k",)),
    Alias("--candidates", ("score.candidates",)),
    Alias("--rrf-k", ("score.rrf_k",)),
    Alias("--task-mix", ("score.task_mix",)),
    Alias("--tokenwise-top", ("score.tokenwise_top",)),
    Alias("--full-matrix", ("score.full_matrix",)),
    Alias("--size", ("corpus_size",)),
    Alias("--epochs", ("train_epochs",)),
    Alias("--show", ("show_queries",)),
    Alias("--subsets", ("lds.n_subsets",)),
    Alias("--no-lds", ("lds.enabled",)),
    Alias("--no-brittleness", ("brittleness.enabled",)),
    Alias("--no-tail-patch", ("tail_patch.enabled",)),
    Alias("--tail-patch-lr", ("tail_patch.lr",)),
    Alias("--tail-patch-optimizer", ("tail_patch.optimizer",)),
    Alias("--calibrate", ("calibrate.enabled",)),
    Alias("--calibrate-proxy", ("calibrate.proxy",)),
    Alias("--damping-factors", ("calibrate.damping_factors",)),
    Alias("--proj-dims", ("calibrate.proj_dims",)),
    Alias("--queries", ("queries_path",)),
    Alias("--results", ("results_uri",)),
    Alias("--max-new-tokens", ("generation.max_new_tokens",)),
    Alias(
        "--prompt",
        ("queries",),
        help="A query prompt, completed by the model (ids prompt-1, prompt-2, ... after the file's queries).",
        extend=_prompt_query,
    ),
    Alias("--json", ("json_path",)),
    Alias("--mlflow-uri", ("tracking.tracking_uri",)),
    Alias("--experiment", ("tracking.experiment",)),
    Alias("--no-mlflow", ("tracking.enabled",)),
)

# Fields with no flag of their own (a `--config` file sets them).
NO_FLAG = {
    "queries",  # a list of {id, prompt, completion} records: --prompt appends to it
    "tracking.parent_run_id",  # set by the demo flow for the runs it nests
}

COMMANDS: dict[str, tuple[str, str, str, str]] = {
    # command: (config class, module, help, description)
    "demo": (
        "DemoConfig",
        "dataworth.config",
        "run the whole pipeline on a generated fact corpus and a tiny GPT-2",
        "Generate a fact corpus, train a tiny GPT-2 on it, index it, attribute the model's completions, "
        "and report fact-tracing recall@10 / MRR per score mode.",
    ),
    "index": (
        "IndexConfig",
        "dataworth.config",
        "log gradients of a corpus and build an attribution index",
        "tokenize → log projected per-example gradients → fit curvature → publish",
    ),
    "query": (
        "QueryConfig",
        "dataworth.config",
        "attribute query completions to the training examples of an index",
        "Score queries (JSONL: {id, prompt, completion?}) against a published index. "
        "Queries without a completion are completed greedily by the model first.",
    ),
    "evaluate": (
        "EvaluateConfig",
        "dataworth.evaluation.config",
        "measure attribution quality on a generated benchmark (LDS, fact tracing, ...)",
        "Train the benchmark model, index it, and measure every score mode and baseline: fact tracing "
        "(MRR, recall@10), tail-patch, linear datamodeling score (retrains a model per random subset), "
        "brittleness, and leave-one-out on a convex problem.",
    ),
    "benchmark": (
        "BenchmarkConfig",
        "dataworth.config",
        "measure ingest, scoring, logging and start-up throughput against their bounds and peers",
        "Write synthetic gradient shards at each size (rows/s, last/first shard write time), score them in all "
        "four modes (÷ one in-memory matmul; peak RSS per size; LanceDB brute force side by side), time gradient "
        "logging of a random-init GPT-2-small against plain training, one pairwise job against kronfluence and "
        "bergson, and the start-up of `dataworth index` and `dataworth query`. Prints a table, logs every figure "
        "to MLflow, and writes --json PATH.",
    ),
}


def config_class(command: str) -> type[StageConfig]:
    name, module, _, _ = COMMANDS[command]
    return getattr(importlib.import_module(module), name)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=40)

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not action.option_strings or action.nargs == 0:
            return super()._format_action_invocation(action)
        metavar = self._format_args(action, self._get_default_metavar_for_optional(action))
        return f"{', '.join(action.option_strings)} {metavar}"  # the metavar once, not after every spelling

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)  # keep paths and flags whole


class CommandParser(argparse.ArgumentParser):
    """A parser whose config flags are generated on first use, so `dataworth index --help` does not
    import the evaluation configs (and torch with them)."""

    def __init__(self, *args, command: str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.command = command
        self.flags: dict[str, list[str]] | None = None  # dotted path → its flags, once generated

    def with_options(self) -> CommandParser:
        if self.command is not None and self.flags is None:
            self.flags = add_config_options(self, self.command, config_class(self.command), ALIASES, NO_FLAG)
        return self

    def parse_known_args(self, args=None, namespace=None):
        self.with_options()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self.with_options()
        return super().format_help()

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} — see `{self.prog} --help`\n")


def build_parser() -> CommandParser:
    parser = CommandParser(prog="dataworth", description=__doc__, formatter_class=_Formatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join([*COMMANDS, "serve"]) + "}")
    for command, (name, _, help_, description) in COMMANDS.items():
        p = sub.add_parser(
            command,
            help=help_,
            description=textwrap.fill(description, 100)
            + "\n\n"
            + textwrap.fill(
                f"Every field of {name} has a flag named after its path (--section.field); flags override "
                "--config FILE, which overrides the defaults.",
                100,
            ),
            usage=f"dataworth {command} [--config FILE] [OPTIONS]",
            formatter_class=_Formatter,
            command=command,
        )
        p.add_argument(
            "--config",
            metavar="FILE",
            help=f"YAML file with the {name} (a run saves its resolved one beside its outputs; "
            "give it here to replay the run); flags given here override it",
        )
        p.add_argument("--no-progress", action="store_true", help="hide progress bars")
        p.add_argument(
            "--debug",
            action="store_true",
            help="print tracebacks on the terminal (otherwise a failure is one line, its traceback in a log file; "
            f"the log folder is ${LOG_DIR_ENV}, default {DEFAULT_LOG_DIR})",
        )
        if command in SERVED:
            p.add_argument(
                "--no-service",
                action="store_true",
                help=f"run in this process even when a `dataworth serve` service is running (or set {SERVICE_ENV}=0)",
            )
    p = sub.add_parser(
        "serve",
        help="keep a process running that runs the other commands without their start-up",
        description=textwrap.fill(
            f"Run a service (a Prefect task worker) that runs `dataworth {' / '.join(SERVED)}` for every command "
            f"started on this machine with the same ${HOME_ENV} (default ~/.dataworth), so a command costs its "
            "submission and its work, not the imports and the Prefect server of a new process. It uses the Prefect "
            "server of PREFECT_API_URL, else starts its own. A command whose code differs from the service's, or "
            f"given --no-service, runs in its own process. Ctrl-C or SIGTERM stops the service.",
            100,
        ),
        formatter_class=_Formatter,
    )
    p.add_argument("--stop", action="store_true", help="stop the running service and exit")
    p.add_argument("--status", action="store_true", help="say whether a service runs, and where; exit 1 if none")
    parser.commands = sub.choices
    return parser


def command_parser(parser: CommandParser, command: str) -> CommandParser:
    """The parser of one command, with its generated flags."""
    return parser.commands[command].with_options()


def build_config(args: argparse.Namespace) -> StageConfig:
    """The command's config: the model's defaults, then the `--config` file, then the flags given."""
    cls = config_class(args.command)
    data = load_yaml(args.config) if args.config else {}
    apply_overrides(data, getattr(args, OVERRIDES, []))
    return cls.model_validate(fill_section_defaults(cls, data))


def describe_validation_error(err, command: str, flags: dict[str, list[str]]) -> str:
    """One line: each bad field by its dotted path, what is wrong, the value given, and its flag."""
    required = [leaf.path for leaf in walk(config_class(command), NO_FLAG) if leaf.default is REQUIRED]
    parts = []
    for e in err.errors():
        loc = ".".join(str(k) for k in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        value = e.get("input")
        if e["type"] != "missing" and loc and not isinstance(value, dict):
            msg += f", got {value!r}"
        field = ".".join(str(k) for k in e["loc"] if not isinstance(k, int))
        if field in flags:
            named = flags[field][:1]
        else:  # a missing section: the flags of its required fields
            named = [flags[p][0] for p in required if p.startswith(field + ".") and p in flags]
        hint = f" ({', '.join(named)})" if named and loc else ""
        parts.append(f"{loc}: {msg}{hint}" if loc else msg)
    fix = f"correct the value{'s' if len(parts) > 1 else ''} named; --help lists every flag"
    return "invalid configuration: " + "; ".join(one_line(p) for p in parts) + " — " + fix


# command -> (flow module, flow function, whether it takes `progress`, the closing summary's rows).
def _tracked(out: dict) -> str:
    """The index summary's line on which of the model's weights the gradients cover."""
    tracked, untracked = out["tracked_params"], out.get("untracked_params", 0)
    if not untracked:
        return f"{tracked:,} (every weight matrix but the embeddings and the layers --modules, --exclude-modules omit)"
    names = out.get("untracked_tensors", [])
    shown = ", ".join(names[:2]) + (" …" if len(names) > 2 else "")
    return (
        f"{tracked:,}; {untracked:,} more ({100 * untracked / (tracked + untracked):.0f}%) are in no Linear/Conv1D "
        f"layer and in no score: {shown}"
    )


_RUNS: dict[str, tuple[str, str, bool, list[tuple[str, Callable[[dict], Any]]]]] = {
    "index": (
        "flows.index",
        "index_flow",
        True,
        [
            ("index", lambda o: o["index_uri"]),
            ("index version", lambda o: o["index_version"]),
            ("examples", lambda o: f"{o['examples']} ({o['examples_computed']} logged, {o['examples_reused']} kept)"),
            ("gradient dim", lambda o: o["dim"]),
            ("compression", lambda o: f"{o['compression_ratio']:.0f}×"),
            ("bytes stored", lambda o: o["bytes_stored"]),
            ("weights tracked", _tracked),
        ],
    ),
    "query": (
        "flows.query",
        "query_flow",
        False,
        [
            ("queries", lambda o: o["queries"]),
            ("index version", lambda o: o["index_version"]),
            ("report", lambda o: o["report"]),
            ("top-k table", lambda o: o["topk_csv"]),
            ("scores table", lambda o: f"{o['results_uri']} (scores, run_id={o['score_run_id']})"),
        ],
    ),
    "evaluate": (
        "flows.evaluate",
        "evaluate_flow",
        True,
        [("report", lambda o: o["report"]), ("index", lambda o: o["index_uri"])],
    ),
    "benchmark": ("flows.benchmark", "benchmark_flow", False, [("json", lambda o: o["json"])]),
    "demo": (
        "flows.demo",
        "demo_flow",
        True,
        [
            ("workspace", lambda o: o["workspace"]),
            ("index", lambda o: o["index_uri"]),
            ("report", lambda o: o["report"]),
        ],
    ),
}
_TRACKING_ROWS = [("mlflow run", lambda o: o["mlflow_run_id"]), ("mlflow store", lambda o: o["tracking_uri"])]


def run_command_flow(command: str, config, progress: bool) -> Any:
    """Run the flow of `command` (its module already imported or imported now); returns the flow's output."""
    from flows.runner import run_flow  # the task runner of config.runner (threads by default)

    module, name, takes_progress, _ = _RUNS[command]
    flow_fn = getattr(importlib.import_module(module), name)
    return run_flow(flow_fn, config, progress=progress) if takes_progress else run_flow(flow_fn, config)


def flow_summary(command: str, out: dict) -> dict[str, Any]:
    """The command's closing summary, label → value, from its flow's output."""
    rows = _RUNS[command][3]
    summary = {label: value(out) for label, value in [*rows, *_TRACKING_ROWS]}
    if command == "demo":
        summary["see runs"] = f"mlflow ui --backend-store-uri {out['tracking_uri']}"
    return summary


def print_summary(command: str, summary: dict[str, Any]) -> None:
    print(f"\n== {command} ==")
    for k, v in summary.items():
        if v is not None:
            print(f"  {k:<18} {v}")


def _run(command: str, config, progress: bool, log: RunLog | None = None) -> None:
    module = _RUNS[command][0]
    from flows.runner import EarlyAPI
    from flows.warmup import freeze_before_exit, imports_frozen, warm_behind, warm_steps, warm_while

    api = EarlyAPI()  # the ephemeral Prefect API boots in its own process while the flow's modules import
    with imports_frozen():
        importlib.import_module(module)
        if log is not None:
            log.install()  # after the import, which configures Prefect's logging (and would drop an earlier handler)
        steps = warm_steps(command, config)
        done = warm_while(api.booting, steps)  # the flow's own first work, while the API boots
    api.wait()
    warm_behind(steps[done:])  # the rest while the flow's first requests wait on the API
    with api.settings():
        try:
            out = run_command_flow(command, config, progress)
        finally:
            _send_prefect_events()
            freeze_before_exit()  # the command ends after its flow
    print_summary(command, flow_summary(command, out))


def _send_prefect_events(timeout: float = 10) -> None:
    """Send the flow run's queued Prefect events now, before the command's closing lines: left to the exit, a run
    that failed at once still has some queued, and Prefect reports them after the one-line error."""
    from prefect.events.worker import EventsWorker

    with contextlib.suppress(Exception):  # only the order of the output is at stake; exit sends what remains
        EventsWorker.drain_all(timeout=timeout)


def main(argv: list[str] | None = None) -> int:
    """Parse, build the config, run the flow. A failure ends as one line `dataworth <command>: <what is wrong> —
    <the fix>` (exit 2 for bad input, 1 for any other failure); its traceback goes to a log file
    named on that line, or to the terminal with --debug (or DATAWORTH_DEBUG=1)."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if args.command == "serve":
        if unknown:
            parser.commands["serve"].error(f"unrecognized arguments: {' '.join(unknown)}")
        return _serve(args)
    commands = command_parser(parser, args.command)
    if unknown:
        commands.error(f"unrecognized arguments: {' '.join(unknown)}")
    import yaml
    from pydantic import ValidationError

    prefix = f"dataworth {args.command}:"
    debug = args.debug or bool(os.environ.get("DATAWORTH_DEBUG"))
    try:  # bad input the configuration shows: no run, no log file
        config = build_config(args)
    except ValidationError as err:
        print(prefix, describe_validation_error(err, args.command, commands.flags or {}), file=sys.stderr)
        return 2
    except (ValueError, OSError, yaml.YAMLError) as err:  # a named error, the --config file, its YAML
        what, fix = describe_failure(err)
        print(prefix, f"{what} — {fix}", file=sys.stderr)
        return 2
    service = route(args.command, getattr(args, "no_service", False))
    if service is not None:
        return submit(service, args.command, config, debug, prefix)
    log = RunLog(args.command, debug)
    try:
        _run(args.command, config, progress=not args.no_progress, log=log)
    except KeyboardInterrupt:
        log.close(keep=False)
        print(prefix, "interrupted — run the same command again: finished shards are kept", file=sys.stderr)
        return 130
    except Exception as err:
        log.log_failure(err)
        log.close(keep=True)
        if debug:
            import traceback

            traceback.print_exception(err)
        what, fix = describe_failure(err)
        where = f" (log: {log.path})" if log.path else ""
        print(prefix, f"{what} — {fix}{where}", file=sys.stderr)
        return 2 if isinstance(err, ValueError) else 1  # bad input (never retried) or a failed run
    log.close(keep=False)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from flows import service

    if args.stop:
        return service.stop()
    if args.status:
        return service.status()
    return service.serve()


if __name__ == "__main__":
    raise SystemExit(main())
