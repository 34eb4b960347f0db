"""`dataworth query --modes bm25 hybrid-…` end to end: a real index flow, then the `dataworth` script in a subprocess
against the test harness's Prefect server, writing the top-k CSV and the HTML report; and the bad inputs that stop
it before any work."""

import csv
import os
import shutil
import subprocess
import sys

import pytest
from prefect.settings import PREFECT_API_URL
from tiny import TINY_CORPUS, tiny_index_config, write_tiny_assets, write_tiny_queries

from flows.cli import main

DATAWORTH = shutil.which("dataworth", path=os.path.dirname(sys.executable)) or "dataworth"
MODES = ["bm25", "hybrid-rrf-influence", "hybrid-rerank-relatif", "dot"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_query_with_bm25_and_hybrid_modes_writes_them_to_the_csv_and_report(harness, tmp_path):
    from flows.index import index_flow

    assets = write_tiny_assets(tmp_path / "assets", TINY_CORPUS)
    cfg = tiny_index_config(assets, tmp_path)
    index_flow(cfg, progress=False)
    queries = write_tiny_queries(tmp_path / "queries.jsonl")
    reports = tmp_path / "reports"
    env = {
        **os.environ,
        "PREFECT_API_URL": PREFECT_API_URL.value(),
        "DATAWORTH_LOG_DIR": str(tmp_path / "logs"),
        "HF_HUB_OFFLINE": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    args = ["query", "--index", cfg.index_uri, "--queries", str(queries), "--report-dir", str(reports)]
    args += ["--modes", *MODES, "--top-k", "3", "--score.candidates", "5", "--score.rrf-k", "30", "--no-mlflow"]
    out = subprocess.run([DATAWORTH, *args], env=env, capture_output=True, text=True, timeout=500)
    assert out.returncode == 0, out.stderr[-3000:]

    (path,) = reports.glob("topk-*.csv")
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[:4] == ["mode", "query_id", "rank", "score"] and "document_id" in rows[0]
    assert {r["mode"] for r in rows} == set(MODES)
    assert len(rows) == len(MODES) * 2 * 3
    for mode in MODES:
        for q in ("cats", "gen"):
            ranked = [r for r in rows if r["mode"] == mode and r["query_id"] == q]
            assert [int(r["rank"]) for r in ranked] == [1, 2, 3]
            assert [float(r["score"]) for r in ranked] == sorted((float(r["score"]) for r in ranked), reverse=True)
    # "grey cats" and "Tova keeps three" are in one training document, which BM25 ranks first.
    top = next(r for r in rows if r["mode"] == "bm25" and r["query_id"] == "cats" and r["rank"] == "1")
    assert top["document_id"] == "d1"
    html = next(reports.glob("report-*.html")).read_text()
    assert all(mode in html for mode in MODES)


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["query", "--index", "idx", "--prompt", "p", "--modes", "bm25", "hybrid-rrf-nope"],
            "dataworth query: argument --modes/--score.modes: invalid choice: 'hybrid-rrf-nope' (choose from 'dot'",
        ),
        (
            ["query", "--index", "idx", "--prompt", "p", "--modes", "hybrid-rerank-dot", "--score.candidates", "5"],
            "dataworth query: invalid configuration: score: candidates=5 is below top_k=10: hybrid-rerank-dot ranks "
            "at most `candidates` BM25 candidates per query; give --score.candidates 10 or more, or a smaller --top-k",
        ),
        (
            ["evaluate", "--top-k", "20", "--score.candidates", "12"],
            "dataworth evaluate: invalid configuration: score: candidates=12 is below top_k=20",
        ),
    ],
)
def test_bad_modes_and_candidates_are_one_line_errors_before_any_work(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be created: no index, no results, no logs
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse refuses an unknown choice itself
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err
    assert not list(tmp_path.iterdir())
