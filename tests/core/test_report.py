"""Reports: HTML escaping, relevance marking, optional sections, atomic writes; terminal tables."""

import os
import re
import stat
from html.parser import HTMLParser

import pytest

from dataworth.reports.html import write_report
from dataworth.reports.query_report import TEXT_LIMIT, render_query_report
from dataworth.reports.terminal import format_evaluation, format_fact_tracing, format_table, format_top_results

EVIL = '<script>alert("x")</script>'

QUERIES = [
    {"id": "q-cat", "prompt": "The cat sat on", "completion": " the mat.", "generated": True},
    {"id": "q-dog", "prompt": "Dogs like", "completion": " bones.", "generated": False},
]


def rows(prefix, relevant=(True, False, None)):
    return [
        {
            "rank": i + 1,
            "score": 1.0 / (i + 1) * 3.14159265,
            "example_id": f"{prefix}-ex{i}",
            "document_id": f"{prefix}-doc{i}",
            "text": f"{prefix} training text {i}",
            "relevant": r,
        }
        for i, r in enumerate(relevant)
    ]


RESULTS = {
    "influence": {"q-cat": rows("infcat"), "q-dog": rows("infdog")},
    "cosine": {"q-cat": rows("coscat", (False, True, None)), "q-dog": rows("cosdog")},
}


class _Collect(HTMLParser):
    """Collects tags and script contents, and checks non-void tags are balanced."""

    VOID = {"meta", "img", "col", "br", "hr", "link", "input"}

    def __init__(self):
        super().__init__()
        self.stack, self.tags, self.errors = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unexpected </{tag}>, open: {self.stack[-3:]}")
        else:
            self.stack.pop()


def parse(page):
    p = _Collect()
    p.feed(page)
    p.close()
    assert not p.errors and not p.stack, (p.errors, p.stack)
    return p.tags


def render(**kw):
    args = dict(title="Attribution report", queries=QUERIES, results=RESULTS)
    args.update(kw)
    return render_query_report(**args)


def test_everything_user_provided_is_escaped():
    q = [{"id": EVIL, "prompt": EVIL, "completion": EVIL, "generated": True}]
    res = {
        EVIL: {
            EVIL: [{"rank": 1, "score": 0.5, "example_id": EVIL, "document_id": EVIL, "text": EVIL, "relevant": True}]
        }
    }
    page = render_query_report(
        EVIL, q, res, metrics={EVIL: {EVIL: 1.0}}, run_info={EVIL: EVIL}, score_samples={EVIL: [1.0, 2.0]}
    )
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    tags = parse(page)
    assert not any(t == "script" for t, _ in tags)
    # Self-contained: no external resources, only inline data images.
    for _tag, attrs in tags:
        for key in ("src", "href"):
            if key in attrs:
                assert attrs[key].startswith(("data:image/png;base64,", "#")), attrs[key]


def test_relevant_rows_are_marked_and_others_plain():
    page = render()
    parse(page)
    marked = re.findall(r'<tr class="relevant">(.*?)</tr>', page)
    assert len(marked) == 4  # one relevant row per (mode, query)
    assert all("✓" in m for m in marked)
    assert {re.search(r"(\w+-ex\d)", m).group(1) for m in marked} == {
        "infcat-ex0",
        "infdog-ex0",
        "coscat-ex1",
        "cosdog-ex0",
    }
    # relevant=False and None rows carry no mark
    plain = re.findall(r"<tr>(<td class=\"rank\">.*?)</tr>", page)
    assert len(plain) == 8
    assert not any("✓" in p for p in plain)
    assert "1 relevant" in page


def test_ranked_rows_show_rank_score_ids_and_cut_text():
    long_text = "word " * 200
    res = {
        "dot": {
            "q-cat": [
                {
                    "rank": 7,
                    "score": 0.000123456789,
                    "example_id": 42,
                    "document_id": "doc-9",
                    "text": long_text,
                    "relevant": None,
                }
            ]
        }
    }
    page = render(results=res, queries=QUERIES[:1])
    assert "0.0001235" in page  # 4 significant digits
    assert '<td class="rank">7</td>' in page
    assert "doc-9" in page and ">42<" in page
    cell = re.search(r'<td class="text"><div>(.*?)</div>', page).group(1)
    assert cell.endswith("…") and len(cell) <= TEXT_LIMIT + 2
    assert long_text not in page


def test_metrics_table_present_with_best_in_bold_and_absent_without():
    metrics = {"influence": {"mrr": 0.5, "recall@10": 0.9}, "cosine": {"mrr": 0.75, "recall@10": 0.8}}
    page = render(metrics=metrics)
    parse(page)
    assert '<table class="metrics">' in page
    best = re.findall(r'<td class="num best">([^<]*)</td>', page)
    assert sorted(best) == ["0.7500", "0.9000"]
    assert "Evaluation" in page
    assert '<table class="metrics">' not in render()
    assert '<table class="metrics">' not in render(metrics={})


def test_histograms_only_with_score_samples():
    samples = {"influence": [0.1, 0.2, 0.2, 0.5, 0.5, 0.5], "cosine": [], "dot": [float("nan"), 1.0], "<b>": [3.0]}
    page = render(score_samples=samples)
    parse(page)
    svgs = re.findall(r"<svg class=\"hist\".*?</svg>", page)
    assert len(svgs) == 4  # one panel per mode, in order
    assert [re.search(r'class="t">(.*?)  \(n=(\d+)\)', s).groups() for s in svgs] == [
        ("influence", "6"),
        ("cosine", "0"),
        ("dot", "1"),  # the NaN dropped
        ("&lt;b&gt;", "1"),
    ]
    # influence: 5 bins over [0.1, 0.5]; bar heights proportional to the counts 1, 2, 0, 0, 3 (tallest 3)
    bars = re.findall(r'<rect x="[^"]+" y="[^"]+" width="[^"]+" height="([^"]+)"[^>]*><title>([^<]*)</title>', svgs[0])
    assert [t.rsplit(": ", 1)[1] for _, t in bars] == ["1", "2", "3"]
    heights = [float(h) for h, _ in bars]
    assert heights[2] == max(heights)
    assert abs(heights[0] * 3 - heights[2]) < 0.05 and abs(heights[1] * 1.5 - heights[2]) < 0.05
    assert bars[0][1].startswith("0.1 – 0.18") and ">0.5</text>" in svgs[0]
    assert "no scores" in svgs[1] and "<rect" not in svgs[1]
    assert len(re.findall("<rect", svgs[2])) == 1  # a single value: one bar
    assert "<svg" not in render() and "data:image/png" not in page


def test_all_queries_and_modes_appear():
    page = render()
    for q in QUERIES:
        assert q["prompt"] in page and q["completion"] in page
    for mode, per_query in RESULTS.items():
        assert f"<h3>{mode}" in page
        for qrows in per_query.values():
            for r in qrows:
                assert r["example_id"] in page
    assert page.count('class="textbox completion"') == 2
    assert page.count('<span class="badge">generated</span>') == 1
    # a mode without results for a query says so instead of failing
    partial = render(results={"dot": {"q-cat": rows("dotcat")}})
    assert "No results for this query." in partial


def test_empty_report_renders():
    page = render_query_report("empty", [], {})
    parse(page)
    assert "No queries." in page


def test_write_report_is_atomic_and_creates_parents(tmp_path):
    target = tmp_path / "a" / "b" / "report.html"
    page = render()
    out = write_report(page, target)
    assert out == target and target.read_text(encoding="utf-8") == page
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o644
    write_report("<p>new</p>", str(target))  # overwrite replaces in place
    assert target.read_text(encoding="utf-8") == "<p>new</p>"
    assert sorted(p.name for p in target.parent.iterdir()) == ["report.html"]  # no temp leftovers


def test_write_report_leaves_no_temp_file_on_failure(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        write_report("<p>x</p>", tmp_path / "r.html")
    assert list(tmp_path.iterdir()) == []


def test_evaluation_plots_are_pngs_and_the_report_embeds_them():
    from dataworth.reports.evaluation_report import PLOTS, evaluation_plots, render_evaluation_report

    scatter = {
        "query": "q1",
        "predicted": {"influence": [0.1, 0.5, 0.3], "bm25": [1.0, 2.0, 0.5]},
        "actual": [-1.0, -0.2, -0.6],
    }
    plots = evaluation_plots(
        scatter, {"relatif": {"1": 0.2, "3": 0.5}, "random": {"1": 0.0, "3": 0.01}}, {"influence": [0.1, -0.2, 0.3]}
    )
    assert set(plots) == set(PLOTS)
    assert all(png.startswith(b"\x89PNG\r\n\x1a\n") for png in plots.values())
    assert set(evaluation_plots(None, None, {"dot": [1.0]})) == {"score_histograms.png"}
    html = render_evaluation_report("t", {"influence": {"lds": 0.3}}, None, plots, ["a note"])
    assert html.count("data:image/png;base64,") == 3 and "Brittleness" in html and "a note" in html
    assert "data:image/png" not in render_evaluation_report("t", {"influence": {"lds": 0.3}})


def test_format_table_is_markdown_with_missing_and_integer_cells():
    table = {"influence": {"lds": 0.3, "seconds": 12.0}, "bm25": {"lds": float("nan")}, "random": {"brittle@1": -0.25}}
    assert format_table(table).splitlines() == [
        "| method | lds | seconds | brittle@1 |",
        "|---|---|---|---|",
        "| influence | 0.300 | 12 | – |",
        "| bm25 | – | – | – |",
        "| random | – | – | -0.250 |",
    ]
    assert format_evaluation(table, ["n1", "n2"]).endswith("|\n\n- n1\n- n2")


def test_top_results_mark_relevant_documents_and_count_the_rest():
    queries = [{"query_id": f"q{i}", "prompt": f"P{i}", "completion": " c", "generated": i == 0} for i in range(3)]
    ranked = [{"rank": r, "score": r / 10, "document_id": f"d{r}", "text": "line\nbreak " * 20} for r in range(1, 8)]
    text = format_top_results(queries, {"relatif": {"q0": ranked}}, {"q0": ["d2"]}, "relatif", show=2)
    lines = text.splitlines()
    assert lines[0] == "" and lines[1].startswith("Top-5 training documents per query (mode relatif;")
    assert lines[3] == "q0: 'P0' → ' c'  (generated)"
    assert lines[4].startswith("     1.        0.1  d1         line break")
    assert lines[5].startswith("  ✓  2.")
    assert sum(line.startswith("  ") for line in lines) == 5  # top-5 of q0; q1 has no results
    assert lines[-3:] == ["q1: 'P1' → ' c'", "", "… 1 more queries in the report"]


def test_fact_tracing_table_has_fixed_columns():
    text = format_fact_tracing({"dot": {"mrr": 0.5, "recall@10": 0.25}}, correct=7, total=8, fact_accuracy=0.875)
    assert text.splitlines() == [
        "",
        "Fact tracing over 7 queries the model completes with the fact (of 8; model fact accuracy 0.88):",
        "",
        "mode" + " " * 8 + "         mrr   recall@10",
        "dot" + " " * 9 + "       0.500       0.250",
    ]


def test_a_large_top_k_report_shows_the_first_rows_and_names_the_csv():
    rows = [
        {
            "rank": r,
            "score": 1.0 / (r + 1),
            "example_id": r,
            "document_id": f"doc-{r}",
            "text": f"t{r}",
            "relevant": None,
        }
        for r in range(1000)
    ]
    queries = [{"id": "q", "prompt": "p", "completion": "c", "generated": False}]
    full = render_query_report("t", queries, {"dot": {"q": rows}})
    capped = render_query_report("t", queries, {"dot": {"q": rows}}, max_rows=50, full_list="topk-x.csv")
    assert "doc-999" in full and "doc-49" in capped and "doc-50" not in capped
    assert "the first 50 of 1000 results per query and mode (all of them: topk-x.csv)" in capped
    assert len(capped) < len(full) / 10
