"""`dataworth` command line: demo, index, query, evaluate. Each command runs the real Prefect flow
(ephemeral API unless PREFECT_API_URL points at a server)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from dataworth.config import ALL_SCORE_MODES, load_yaml  # noqa: E402


def _set(d: dict, dotted: str, value: Any) -> None:
    if value is None:
        return
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d.setdefault(k, {})
    d[keys[-1]] = value


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file with the stage config; flags given here override it")
    p.add_argument("--mlflow-uri", help="MLflow tracking URI (default sqlite:///dataworth-runs/mlflow.db)")
    p.add_argument("--experiment", help="MLflow experiment name (default dataworth)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log this run to MLflow")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _scoring(p: argparse.ArgumentParser, prefix: str) -> None:
    p.add_argument("--modes", nargs="+", choices=ALL_SCORE_MODES, help="score modes (default: all four)")
    p.add_argument("--top-k", type=int, help="training examples kept per query and mode (default 10)")
    p.add_argument("--damping", type=float, help=f"damping factor override (λ = factor × mean eigenvalue){prefix}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dataworth", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo",
        help="run the whole pipeline on a generated fact corpus and a tiny GPT-2",
        description="Generate a fact corpus, train a tiny GPT-2 on it, index it, attribute the "
        "model's completions, and report fact-tracing recall@10 / MRR per score mode.",
    )
    demo.add_argument("--workspace", help="folder for corpus, model, index, reports (default dataworth-runs/demo)")
    demo.add_argument("--size", choices=["small", "medium", "large"], help="corpus preset (default small)")
    demo.add_argument("--seed", type=int)
    demo.add_argument("--epochs", type=int, help="training epochs of the tiny model")
    demo.add_argument("--show", type=int, help="queries printed with their top-5 (default 8)")
    _scoring(demo, "")
    _common(demo)

    index = sub.add_parser(
        "index",
        help="log gradients of a corpus and build an attribution index",
        description="tokenize → log projected per-example gradients → fit curvature → publish",
    )
    index.add_argument("--model", help="Hugging Face model name or local save_pretrained directory")
    index.add_argument("--tokenizer", help="tokenizer name or path (default: the model's)")
    index.add_argument("--dataset", help="HF dataset name, saved dataset dir, or jsonl/json/parquet/csv/txt file(s)")
    index.add_argument("--split", help="dataset split (default train)")
    index.add_argument("--text-column", help="column with the text (default text)")
    index.add_argument("--id-column", help="column with document ids (default: row numbers)")
    index.add_argument("--max-length", type=int, help="tokens per example; longer documents are chunked (default 256)")
    index.add_argument("--max-documents", type=int, help="read at most this many documents")
    index.add_argument(
        "--skip-empty", action="store_true", default=None, help="drop empty documents instead of failing"
    )
    index.add_argument("--index", dest="index_uri", help="LanceDB URI of the index (directory or object store)")
    index.add_argument("--modules", nargs="+", help="fnmatch patterns of layers to track (default: all but lm_head)")
    index.add_argument("--projection", choices=["gaussian", "rademacher", "identity"])
    index.add_argument("--proj-dim", type=int, help="projection size per side (k_in = k_out)")
    index.add_argument(
        "--precondition",
        choices=["kfac", "none"],
        help="whiten with KFAC factors before projecting (default kfac) or project only",
    )
    index.add_argument("--curvature", choices=["identity", "raw"])
    index.add_argument("--damping", type=float, help="damping factor (λ = factor × mean eigenvalue per block)")
    index.add_argument("--batch-size", type=int)
    index.add_argument("--shard-size", type=int, help="examples per gradient-logging task")
    index.add_argument("--dtype", choices=["float32", "float64", "bfloat16", "float16"], help="model dtype")
    index.add_argument("--device", choices=["auto", "cpu", "cuda"])
    index.add_argument(
        "--overwrite", action="store_true", default=None, help="rebuild an index made with another config"
    )
    _common(index)

    ev = sub.add_parser(
        "evaluate",
        help="measure attribution quality on a generated benchmark (LDS, fact tracing, ...)",
        description="Train the benchmark model, index it, and measure every score mode and baseline: "
        "fact tracing (MRR, recall@10), tail-patch, linear datamodeling score (retrains a "
        "model per random subset), brittleness, and leave-one-out on a convex problem.",
    )
    ev.add_argument(
        "--benchmark",
        choices=["facts-small", "facts-medium", "facts-large", "lm-small"],
        help="generated benchmark preset (default facts-small)",
    )
    ev.add_argument(
        "--workspace", help="folder for benchmark corpora, models, indexes, reports (default dataworth-runs/evaluate)"
    )
    ev.add_argument("--seed", type=int)
    ev.add_argument("--epochs", type=int, help="training epochs of the benchmark model")
    ev.add_argument("--proj-dim", type=int, help="projection size per side (default 32)")
    ev.add_argument(
        "--precondition",
        choices=["kfac", "none"],
        help="whiten with KFAC factors before projecting (default kfac) or project only",
    )
    ev.add_argument("--curvature", choices=["identity", "raw"])
    ev.add_argument("--baselines", nargs="*", choices=["bm25", "kronfluence"], help="baselines (default bm25)")
    ev.add_argument("--subsets", type=int, help="LDS: retrained subsets (default 50)")
    ev.add_argument("--no-lds", action="store_true", help="skip the linear datamodeling score")
    ev.add_argument("--no-brittleness", action="store_true", help="skip brittleness retraining")
    ev.add_argument("--no-tail-patch", action="store_true", help="skip tail-patch")
    ev.add_argument("--tail-patch-lr", type=float, help="learning rate of the single tail-patch step (default 0.01)")
    ev.add_argument(
        "--tail-patch-optimizer",
        choices=["sgd", "adam", "normalized"],
        help="optimizer of the tail-patch step (default sgd)",
    )
    ev.add_argument("--no-loo", action="store_true", help="skip leave-one-out on the convex problem")
    ev.add_argument(
        "--calibrate",
        action="store_true",
        default=None,
        help="sweep the damping factor on a held-out proxy and record the choice in the index",
    )
    ev.add_argument("--calibrate-proxy", choices=["fact_mrr", "lds"], help="proxy maximized by --calibrate")
    ev.add_argument("--damping-factors", nargs="+", type=float, help="damping factors swept by --calibrate")
    ev.add_argument(
        "--proj-dims",
        nargs="+",
        type=int,
        help="projection sizes also swept by --calibrate (one index each); the best is recorded in its index",
    )
    _scoring(ev, "")
    _common(ev)

    query = sub.add_parser(
        "query",
        help="attribute query completions to the training examples of an index",
        description="Score queries (JSONL: {id, prompt, completion?}) against a published index. "
        "Queries without a completion are completed greedily by the model first.",
    )
    query.add_argument("--index", dest="index_uri", help="LanceDB URI of a published index")
    query.add_argument("--queries", dest="queries_path", help="JSONL file of queries")
    query.add_argument("--prompt", action="append", help="a query prompt (repeatable); completed by the model")
    query.add_argument("--max-new-tokens", type=int, help="tokens generated for queries without a completion")
    query.add_argument("--report-dir", help="where the HTML report goes (default <index>/reports)")
    query.add_argument("--full-matrix", action="store_true", default=None, help="also save the full score matrix")
    _scoring(query, " for this run only")
    _common(query)
    return parser


def _tracking(args, cfg: dict) -> None:
    _set(cfg, "tracking.tracking_uri", args.mlflow_uri)
    _set(cfg, "tracking.experiment", args.experiment)
    if args.no_mlflow:
        _set(cfg, "tracking.enabled", False)


def _index_config(args) -> dict:
    cfg = load_yaml(args.config) if args.config else {}
    for flag, key in [
        ("model", "model.name_or_path"),
        ("tokenizer", "model.tokenizer"),
        ("dtype", "model.dtype"),
        ("device", "model.device"),
        ("dataset", "data.dataset"),
        ("split", "data.split"),
        ("text_column", "data.text_column"),
        ("id_column", "data.id_column"),
        ("max_length", "data.max_length"),
        ("max_documents", "data.max_documents"),
        ("skip_empty", "data.skip_empty"),
        ("index_uri", "index_uri"),
        ("modules", "logging.modules"),
        ("projection", "logging.projection"),
        ("batch_size", "logging.batch_size"),
        ("precondition", "logging.precondition"),
        ("shard_size", "logging.shard_size"),
        ("curvature", "curvature.kind"),
        ("damping", "curvature.damping_factor"),
        ("overwrite", "overwrite"),
    ]:
        _set(cfg, key, getattr(args, flag))
    if args.proj_dim:
        _set(cfg, "logging.proj_dim_in", args.proj_dim)
        _set(cfg, "logging.proj_dim_out", args.proj_dim)
    _tracking(args, cfg)
    return cfg


def _query_config(args) -> dict:
    cfg = load_yaml(args.config) if args.config else {}
    for flag, key in [
        ("index_uri", "index_uri"),
        ("queries_path", "queries_path"),
        ("max_new_tokens", "generation.max_new_tokens"),
        ("report_dir", "report_dir"),
        ("full_matrix", "score.full_matrix"),
        ("modes", "score.modes"),
        ("top_k", "score.top_k"),
        ("damping", "score.damping_factor"),
    ]:
        _set(cfg, key, getattr(args, flag))
    if args.prompt:
        cfg.setdefault("queries", []).extend({"id": f"prompt-{i}", "prompt": p} for i, p in enumerate(args.prompt, 1))
    _tracking(args, cfg)
    return cfg


def _demo_config(args) -> dict:
    cfg = load_yaml(args.config) if args.config else {}
    for flag, key in [
        ("workspace", "workspace"),
        ("size", "corpus_size"),
        ("seed", "seed"),
        ("epochs", "train_epochs"),
        ("show", "show_queries"),
        ("modes", "score.modes"),
        ("top_k", "score.top_k"),
        ("damping", "curvature.damping_factor"),
    ]:
        _set(cfg, key, getattr(args, flag))
    _tracking(args, cfg)
    return cfg


def _evaluate_config(args) -> dict:
    cfg = load_yaml(args.config) if args.config else {}
    for flag, key in [
        ("benchmark", "benchmark"),
        ("workspace", "workspace"),
        ("seed", "seed"),
        ("epochs", "train_epochs"),
        ("curvature", "curvature.kind"),
        ("precondition", "logging.precondition"),
        ("baselines", "baselines"),
        ("subsets", "lds.n_subsets"),
        ("calibrate", "calibrate.enabled"),
        ("calibrate_proxy", "calibrate.proxy"),
        ("damping_factors", "calibrate.damping_factors"),
        ("proj_dims", "calibrate.proj_dims"),
        ("modes", "score.modes"),
        ("top_k", "score.top_k"),
        ("damping", "curvature.damping_factor"),
        ("tail_patch_lr", "tail_patch.lr"),
        ("tail_patch_optimizer", "tail_patch.optimizer"),
    ]:
        _set(cfg, key, getattr(args, flag))
    if args.proj_dim:
        _set(cfg, "logging.proj_dim_in", args.proj_dim)
        _set(cfg, "logging.proj_dim_out", args.proj_dim)
    for flag, key in [
        ("no_lds", "lds.enabled"),
        ("no_brittleness", "brittleness.enabled"),
        ("no_tail_patch", "tail_patch.enabled"),
    ]:
        if getattr(args, flag):
            _set(cfg, key, False)
    if args.no_loo:
        _set(cfg, "loo", False)
    _tracking(args, cfg)
    return cfg


def _summary(title: str, rows: dict) -> None:
    print(f"\n== {title} ==")
    for k, v in rows.items():
        if v is not None:
            print(f"  {k:<18} {v}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import yaml
    from pydantic import ValidationError

    from dataworth.config import DemoConfig, IndexConfig, QueryConfig

    try:
        if args.command == "index":
            config = IndexConfig(**_index_config(args))
        elif args.command == "query":
            config = QueryConfig(**_query_config(args))
        elif args.command == "evaluate":
            from dataworth.evaluation.config import EvaluateConfig

            config = EvaluateConfig(**_evaluate_config(args))
        else:
            config = DemoConfig(**_demo_config(args))
    except ValidationError as err:
        lines = [f"  {'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()]
        print(f"dataworth {args.command}: invalid configuration\n" + "\n".join(lines), file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, yaml.YAMLError) as err:  # --config missing, not a mapping, or not YAML
        print(f"dataworth {args.command}: {err}", file=sys.stderr)
        return 2
    progress = not args.no_progress
    try:
        if args.command == "index":
            from flows.index import index_flow

            out = index_flow(config, progress=progress)
            _summary(
                "index",
                {
                    "index": out["index_uri"],
                    "examples": out["examples"],
                    "gradient dim": out["dim"],
                    "compression": f"{out['compression_ratio']:.0f}×",
                    "bytes stored": out["bytes_stored"],
                    "mlflow run": out["mlflow_run_id"],
                    "mlflow store": out["tracking_uri"],
                },
            )
        elif args.command == "query":
            from flows.query import query_flow

            out = query_flow(config)
            _summary(
                "query",
                {
                    "queries": out["queries"],
                    "report": out["report"],
                    "top-k table": out["topk_csv"],
                    "scores table": f"{out['index_uri']} (scores, run_id={out['score_run_id']})",
                    "mlflow run": out["mlflow_run_id"],
                    "mlflow store": out["tracking_uri"],
                },
            )
        elif args.command == "evaluate":
            from flows.evaluate import evaluate_flow

            out = evaluate_flow(config, progress=progress)
            _summary(
                "evaluate",
                {
                    "report": out["report"],
                    "index": out["index_uri"],
                    "mlflow run": out["mlflow_run_id"],
                    "mlflow store": out["tracking_uri"],
                },
            )
        else:
            from flows.demo import demo_flow

            out = demo_flow(config, progress=progress)
            _summary(
                "demo",
                {
                    "workspace": out["workspace"],
                    "index": out["index_uri"],
                    "report": out["report"],
                    "mlflow run": out["mlflow_run_id"],
                    "mlflow store": out["tracking_uri"],
                    "see runs": f"mlflow ui --backend-store-uri {out['tracking_uri']}",
                },
            )
    except (ValueError, FileNotFoundError) as err:
        print(f"dataworth {args.command}: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
