"""`dataworth query --tokenwise-top 2` end to end: a real index flow, then the command, writing the token_scores
table (each side summing to the stored score), the token heat map in the report and the tokens CSV; and the runs
it refuses before any work."""

import csv
import shutil

import pytest
from tiny import TINY_CORPUS, tiny_index_config, write_tiny_assets, write_tiny_queries

from flows.cli import main
from storage import IndexStore
from storage.schemas import token_scores_schema

pytestmark = pytest.mark.slow
MODES = ["dot", "relatif", "trackstar", "bm25"]


@pytest.fixture(scope="module")
def index(harness, tmp_path_factory):
    from flows.index import index_flow

    root = tmp_path_factory.mktemp("tokenwise")
    cfg = tiny_index_config(write_tiny_assets(root / "assets", TINY_CORPUS), root)
    index_flow(cfg, progress=False)
    return root, cfg


@pytest.mark.timeout(600)
def test_query_tokenwise_top_writes_token_scores_and_heat_map(index):
    root, cfg = index
    reports, results = root / "reports", root / "results"
    args = ["query", "--index", cfg.index_uri, "--queries", str(write_tiny_queries(root / "queries.jsonl"))]
    args += ["--report-dir", str(reports), "--results", str(results), "--modes", *MODES, "--top-k", "3"]
    assert main([*args, "--tokenwise-top", "2", "--no-mlflow"]) == 0

    store = IndexStore(str(results))
    rows = store.read_token_scores().to_pylist()
    assert store.read_token_scores().schema == token_scores_schema()
    (run_id,) = {r["run_id"] for r in rows}
    scores = {(r["mode"], r["query_id"], r["rank"]): r for r in store.read_scores(run_id).to_pylist()}
    queries = {q["query_id"]: q for q in store.read_queries(run_id).to_pylist()}
    pairs = {(r["mode"], r["query_id"], r["rank"]) for r in rows}
    # every gradient mode's first two of each query, bm25 skipped
    assert pairs == {(m, q, k) for m in MODES[:3] for q in ("cats", "gen") for k in (1, 2)}
    examples = {
        e["example_id"]: e for e in IndexStore(cfg.index_uri).read_examples(["example_id", "input_ids"]).to_pylist()
    }
    for key in pairs:
        stored = scores[key]
        for side in ("query", "train"):
            part = sorted(
                (r for r in rows if (r["mode"], r["query_id"], r["rank"]) == key and r["side"] == side),
                key=lambda r: r["position"],
            )
            assert part and {r["example_id"] for r in part} == {stored["example_id"]}
            total = part[0]["total"]
            # the split sums to the pair's score, which is the stored one: to float32 rounding (model, storage)
            assert abs(sum(r["score"] for r in part) - total) <= 1e-4 * max(1.0, abs(total))
            assert abs(total - stored["score"]) <= 1e-4 * max(1.0, abs(stored["score"]))
            assert [r["position"] for r in part] == list(range(len(part)))
            if side == "query":  # the completion's tokens, a generated one's too
                assert len(part) == queries[key[1]]["num_completion_tokens"]
                if not queries[key[1]]["generated"]:
                    assert "".join(r["token"] for r in part) == queries[key[1]]["completion"]
            else:
                assert [r["token_id"] for r in part] == examples[stored["example_id"]]["input_ids"]

    (report,) = reports.glob("report-*.html")
    html = report.read_text()
    assert html.count("Token attribution") == 2 and html.count('class="split"') == 2 * 3 * 2
    (tokens_csv,) = reports.glob("tokens-*.csv")
    with open(tokens_csv) as f:
        assert sum(1 for _ in csv.DictReader(f)) == len(rows)
    (topk,) = reports.glob("topk-*.csv")  # render_report's CSV is untouched
    with open(topk) as f:
        assert "side" not in next(csv.DictReader(f))
    # the same scoring without the split keeps its run id: tokenwise_top changes no score
    assert main([*args, "--no-mlflow"]) == 0
    assert {r["run_id"] for r in store.read_scores().to_pylist()} == {run_id}


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--modes", "bm25", "hybrid-rrf-dot"], "token-wise attribution (tokenwise_top) splits gradient modes"),
        (["--checkpoint-indexes", "INDEX"], "leave out --checkpoint-indexes or --tokenwise-top"),
    ],
)
def test_what_cannot_be_split_is_refused_before_any_work(index, extra, message, capsys):
    root, cfg = index
    if "INDEX" in extra:  # another checkpoint's index of the same corpus: a copy does
        shutil.copytree(cfg.index_uri, root / "copy", dirs_exist_ok=True)
    extra = [str(root / "copy") if e == "INDEX" else e for e in extra]
    args = ["query", "--index", cfg.index_uri, "--prompt", "Tova keeps", "--tokenwise-top", "1", "--no-mlflow"]
    assert main([*args, "--results", str(root / "refused"), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not IndexStore(str(root / "refused")).read_token_scores().num_rows
