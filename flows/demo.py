"""The `demo` flow: generated fact corpus → tiny GPT-2 → index → query → fact-tracing metrics."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from dataworth.config import DemoConfig, GenerationConfig, QueryConfig
from tasks.benchmark import benchmark_index_config, prepare_benchmark
from tasks.demo import evaluate_fact_tracing
from tasks.query import load_results, render_report
from tasks.tracking import Tracker

from .index import index_flow
from .query import query_flow


def _print_results(queries, results, relevant, mode, show: int) -> None:
    rows = results.get(mode, {})
    for q in queries[:show]:
        print(f"\n{q['query_id']}: {q['prompt']!r} → {q['completion']!r}" + ("  (generated)" if q["generated"] else ""))
        for r in rows.get(q["query_id"], [])[:5]:
            mark = "✓" if r["document_id"] in relevant.get(q["query_id"], ()) else " "
            text = r["text"].replace("\n", " ")
            print(f"  {mark} {r['rank']:>2}. {r['score']:>10.4g}  {r['document_id']:<10} {text[:70]}")
    if len(queries) > show:
        print(f"\n… {len(queries) - show} more queries in the report")


def _print_metrics(metrics: dict) -> None:
    names = sorted({n for m in metrics.values() for n in m})
    print("\n" + "mode".ljust(12) + "".join(n.rjust(12) for n in names))
    for mode, m in metrics.items():
        print(mode.ljust(12) + "".join(f"{m[n]:12.3f}" for n in names))


@flow(name="demo")
def demo_flow(config: DemoConfig = DemoConfig(), progress: bool = True) -> dict:
    """The whole pipeline on an embedded, generated corpus whose ground truth is known."""
    ws = Path(config.workspace).absolute()
    tracker = Tracker(config.tracking)
    run_id = tracker.start("demo", config.model_dump(mode="json"), {"dataworth.flow": "demo"})
    common, sub_tracking = tracker.task_kwargs, tracker.child_config(config.tracking)
    ok = False
    try:
        fresh = not (ws / "model" / "config.json").exists()
        demo = prepare_benchmark.with_options(refresh_cache=fresh)(
            str(ws), f"facts-{config.corpus_size}", config.seed, config.train_epochs, progress=progress, **common
        )
        index_uri = str(ws / "index")
        logging_cfg = config.logging.model_copy(update={"seed": config.seed})
        index = index_flow(
            benchmark_index_config(demo, logging_cfg, config.curvature, index_uri, sub_tracking), progress=progress
        )
        query = query_flow(
            QueryConfig(
                index_uri=index_uri,
                queries_path=_prompts_only(demo["queries"], ws),
                score=config.score.model_copy(update={"top_k": max(config.score.top_k, 10)}),
                # Facts end their sentence: attribute the stated value, not the model's next sentence.
                generation=GenerationConfig(max_new_tokens=8, stop=["."]),
                report_dir=str(ws / "reports"),
                tracking=sub_tracking,
            ),
            relevant=demo["relevant"],
            title="dataworth demo: which documents taught each fact?",
        )
        evaluation = evaluate_fact_tracing(
            index_uri, query["score_run_id"], demo["relevant"], demo["expected"], **common
        )
        report = render_report(
            index_uri,
            query["score_run_id"],
            str(ws / "reports"),
            "dataworth demo: fact tracing",
            {
                "index": index_uri,
                "model": demo["model_dir"],
                "fact accuracy": f"{demo['fact_accuracy']:.2f}",
                "queries traced": f"{evaluation['correct']} of {evaluation['total']} (completion = the fact)",
                "mlflow run": str(run_id),
            },
            demo["relevant"],
            evaluation["metrics"],
            **common,
        )
        queries, results = load_results(index_uri, query["score_run_id"])
        mode = "relatif" if "relatif" in results else next(iter(results))
        print(f"\nTop-5 training documents per query (mode {mode}; ✓ = states the queried fact):")
        _print_results(queries, results, demo["relevant"], mode, config.show_queries)
        print(
            f"\nFact tracing over {evaluation['correct']} queries the model completes with the fact "
            f"(of {evaluation['total']}; model fact accuracy {demo['fact_accuracy']:.2f}):"
        )
        _print_metrics(evaluation["metrics"])
        ok = True
    finally:
        tracker.finish(ok)
    return {
        "workspace": str(ws),
        "index_uri": index_uri,
        "report": report["report"],
        "metrics": evaluation["metrics"],
        "fact_accuracy": demo["fact_accuracy"],
        "mlflow_run_id": run_id,
        "tracking_uri": tracker.uri,
        "index": index,
        "query": query,
    }


def _prompts_only(queries_path: str, ws: Path) -> str:
    """The usual case: attribute what the model generates, so the demo queries carry no completion."""
    import json

    out = ws / "corpus" / "prompts.jsonl"
    with open(queries_path) as src, open(out, "w") as dst:
        for line in src:
            if line.strip():
                q = json.loads(line)
                dst.write(json.dumps({"id": q["id"], "prompt": q["prompt"]}) + "\n")
    return str(out)
