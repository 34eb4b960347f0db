"""The `demo` flow: generated fact corpus → tiny GPT-2 → index → query → fact-tracing metrics."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from dataworth.config import DemoConfig, GenerationConfig, QueryConfig
from tasks.benchmark import prepare_benchmark
from tasks.demo import evaluate_fact_tracing, summarize_demo, write_prompts
from tasks.query import render_report
from tasks.tracking import tracked_run

from .index import index_flow
from .query import query_flow


@flow(name="demo")
def demo_flow(config: DemoConfig = DemoConfig(), progress: bool = True) -> dict:
    """The whole pipeline on an embedded, generated corpus whose ground truth is known."""
    ws = Path(config.workspace).absolute()
    with tracked_run(config.tracking, "demo", config, config_path=ws / "demo_config.yaml") as run:
        sub_tracking = run.child_config(config.tracking)
        fresh = not (ws / "model" / "config.json").exists()
        demo = run.log_result(
            "prepare_benchmark",
            prepare_benchmark.with_options(refresh_cache=fresh)(
                str(ws), f"facts-{config.corpus_size}", config.seed, config.train_epochs, progress, return_state=True
            ),
        )
        index_uri = str(ws / "index")
        logging_cfg = config.logging.model_copy(update={"seed": config.seed})
        index = index_flow(demo.index_config(logging_cfg, config.curvature, index_uri, sub_tracking), progress=progress)
        query = query_flow(
            QueryConfig(
                index_uri=index_uri,
                # The usual case: attribute what the model generates, so the demo queries carry no completion.
                queries_path=write_prompts(demo.queries, str(ws / "corpus" / "prompts.jsonl")),
                score=config.score.model_copy(update={"top_k": max(config.score.top_k, 10)}),
                # Facts end their sentence: attribute the stated value, not the model's next sentence.
                generation=GenerationConfig(max_new_tokens=8, stop=["."]),
                report_dir=str(ws / "reports"),
                tracking=sub_tracking,
            ),
            relevant=demo.relevant,
            title="dataworth demo: which documents taught each fact?",
        )
        srid = query["score_run_id"]
        tracing = run.log_result(
            "evaluate_fact_tracing",
            evaluate_fact_tracing(index_uri, srid, demo.relevant, demo.expected, return_state=True),
        )
        run.artifact_text("fact_tracing.json", tracing.as_json)
        report = render_report(
            index_uri,
            srid,
            str(ws / "reports"),
            "dataworth demo: fact tracing",
            {
                "index": index_uri,
                "model": demo.model_dir,
                "fact accuracy": f"{demo.fact_accuracy:.2f}",
                "queries traced": f"{tracing.correct} of {tracing.total} (completion = the fact)",
                "mlflow run": str(run.run_id),
            },
            demo.relevant,
            tracing.table,
        )
        for path in report.files:
            run.artifact(path)
        print(summarize_demo(index_uri, srid, demo.relevant, config.show_queries, tracing, demo.fact_accuracy))
    return {
        "workspace": str(ws),
        "index_uri": index_uri,
        "report": report.report,
        "metrics": tracing.table,
        "fact_accuracy": demo.fact_accuracy,
        "mlflow_run_id": run.run_id,
        "tracking_uri": run.uri,
        "index": index,
        "query": query,
    }
