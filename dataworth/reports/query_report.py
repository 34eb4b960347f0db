"""Self-contained HTML report of query attributions: per query the prompt, the completion, the token heat map of
its top examples (when token-wise scores were computed) and each mode's ranked training examples, after the run
info, the metrics and the score histograms (shared parts in html.py).
"""

from __future__ import annotations

from typing import Any

from dataworth.reports.html import (
    CSS,
    escape,
    fmt_number,
    heat_color,
    histogram_svg,
    metrics_html,
    run_info_html,
)

# Training texts are shown cut to this many characters; the full text stays in the store.
TEXT_LIMIT = 300


def _id(value: Any) -> str:
    return "–" if value is None or value == "" else escape(value)


def _cut(text: Any, limit: int = TEXT_LIMIT) -> str:
    text = "" if text is None else str(text)
    if len(text) <= limit:
        return text
    head = text[:limit]
    # Prefer ending on a word boundary when one is near, so the cut does not split a word.
    space = head.rfind(" ", limit - 40)
    if space > 0:
        head = head[:space]
    return head.rstrip() + " …"


def _histogram_html(score_samples: dict[str, list[float]]) -> str:
    return (
        '<section class="card"><h2 style="margin-top:0">Score distributions</h2>'
        f"{histogram_svg(score_samples)}</section>"
    )


def _ranked_html(rows: list[dict] | None) -> str:
    if not rows:
        return '<p class="empty">No results for this query.</p>'
    body = []
    for row in rows:
        relevant = row.get("relevant") is True
        mark = '<span class="check" title="relevant">✓</span>' if relevant else ""
        tr = '<tr class="relevant">' if relevant else "<tr>"
        body.append(
            f"{tr}"
            f'<td class="rank">{mark}{escape(row.get("rank"))}</td>'
            f'<td class="score">{fmt_number(row.get("score"))}</td>'
            f'<td class="id">{_id(row.get("document_id"))}</td>'
            f'<td class="id">{_id(row.get("example_id"))}</td>'
            f'<td class="text"><div>{escape(_cut(row.get("text")))}</div></td></tr>'
        )
    return (
        '<table class="ranked"><colgroup><col class="rank"><col class="score"><col class="doc">'
        '<col class="ex"><col></colgroup><thead><tr><th class="rank">rank</th>'
        '<th class="score">score</th><th>document</th><th>example</th><th>text</th></tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>"
    )


def _mode_summary(rows: list[dict] | None) -> str:
    if not rows:
        return ""
    labelled = [r for r in rows if r.get("relevant") is not None]
    text = f"top {len(rows)}"
    if labelled:
        text += f" · {sum(r.get('relevant') is True for r in labelled)} relevant"
    return f'<span class="summary">{escape(text)}</span>'


def _token_spans(tokens: list[tuple[str, float]]) -> str:
    """Each token a span coloured by its score on a scale of the largest |score| of the row (the value in its
    title); the row's scores sum to the pair's score."""
    peak = max((abs(v) for _, v in tokens), default=0.0)
    spans = []
    for text, value in tokens:
        background, ink = heat_color(value / peak if peak > 0 else 0.0)
        spans.append(
            f'<span class="tok" style="background:{background};color:{ink}" '
            f'title="{escape(repr(text))} · {fmt_number(value)}">{escape(text)}</span>'
        )
    return f'<div class="tokens">{"".join(spans)}</div>'


TOKEN_LEGEND = (
    '<div class="legend"><span>opposes (−)</span><span class="scale"></span><span>supports (+)</span>'
    '<span class="note">colour: a token\'s share of the score, scaled to the largest |share| of its row; '
    "hover a token for its value. Each row sums to the score.</span></div>"
)


def _tokenwise_html(splits: list[dict] | None) -> str:
    """The token heat map of one query: per (mode, rank) its completion tokens and the example's tokens."""
    if not splits:
        return ""
    rows = []
    for sp in splits:
        head = (
            f'<div class="pair"><span class="mode-name">{escape(sp.get("mode"))}</span> rank {escape(sp.get("rank"))}'
            f' · document <span class="qid">{_id(sp.get("document_id"))}</span>'
            f' · example <span class="qid">{_id(sp.get("example_id"))}</span>'
            f" · score {fmt_number(sp.get('total'))}</div>"
        )
        rows.append(
            f'<div class="split">{head}<div class="label">Completion tokens</div>{_token_spans(sp.get("query", []))}'
            f'<div class="label">Example tokens</div>{_token_spans(sp.get("train", []))}</div>'
        )
    return f'<div class="tokenwise"><h3>Token attribution</h3>{TOKEN_LEGEND}{"".join(rows)}</div>'


def _query_html(
    index: int, query: dict, results: dict[str, dict[str, list[dict]]], splits: list[dict] | None = None
) -> str:
    qid = query.get("id")
    badge = '<span class="badge">generated</span>' if query.get("generated") else ""
    modes = []
    for mode, per_query in results.items():
        rows = per_query.get(str(qid), per_query.get(qid)) if per_query else None
        modes.append(f'<div class="mode"><h3>{escape(mode)}{_mode_summary(rows)}</h3>{_ranked_html(rows)}</div>')
    modes_html = f'<div class="modes">{"".join(modes)}</div>' if modes else '<p class="empty">No modes scored.</p>'
    return (
        f'<section class="card query" id="q{index}">'
        f'<h2 style="margin-top:0"><a class="top" href="#top">↑ top</a>'
        f'Query {index + 1} <span class="qid">{escape(qid)}</span></h2>'
        f'<div class="label">Prompt</div><div class="textbox prompt">{escape(query.get("prompt"))}</div>'
        f'<div class="label">Completion{badge}</div>'
        f'<div class="textbox completion">{escape(query.get("completion"))}</div>'
        f"{_tokenwise_html(splits)}{modes_html}</section>"
    )


def _toc_html(queries: list[dict]) -> str:
    if len(queries) < 2:
        return ""
    items = "".join(
        f'<li><a href="#q{i}"><span class="qid">{escape(q.get("id"))}</span> '
        f"{escape(_cut(q.get('prompt'), 90))}</a></li>"
        for i, q in enumerate(queries)
    )
    return f'<nav><div class="label">Queries</div><ol>{items}</ol></nav>'


def token_splits_by_query(rows: list[dict]) -> dict[str, list[dict]]:
    """token_scores rows → query id → one split per (mode, rank): {"mode", "rank", "example_id", "document_id",
    "total", "query": [(token, score)], "train": [(token, score)]}, as the query report draws them."""
    out: dict[str, dict[tuple, dict]] = {}
    for r in sorted(rows, key=lambda r: (r["query_id"], r["mode"], r["rank"], r["side"], r["position"])):
        key = (r["mode"], r["rank"])
        split = out.setdefault(r["query_id"], {}).setdefault(
            key,
            {
                "mode": r["mode"],
                "rank": r["rank"],
                "example_id": r["example_id"],
                "document_id": r["document_id"],
                "total": r["total"],
                "query": [],
                "train": [],
            },
        )
        split[r["side"]].append((r["token"], r["score"]))
    return {q: list(by_pair.values()) for q, by_pair in out.items()}


def render_query_report(
    title: str,
    queries: list[dict],
    results: dict[str, dict[str, list[dict]]],
    metrics: dict[str, dict[str, float]] | None = None,
    run_info: dict[str, str] | None = None,
    score_samples: dict[str, list[float]] | None = None,
    max_rows: int | None = None,
    full_list: str | None = None,
    token_scores: dict[str, list[dict]] | None = None,
) -> str:
    """One self-contained HTML page: run info, metrics, score histograms, then per query
    the prompt, the completion and each mode's ranked training examples (the first `max_rows` of them; the
    page then names `full_list`, the file that has them all).

    queries: {"id", "prompt", "completion", "generated"}; results: mode -> query id ->
    ranked rows {"rank", "score", "example_id", "document_id", "text", "relevant"};
    metrics: mode -> metric -> value; score_samples: mode -> scores for a histogram;
    token_scores: query id -> token splits {"mode", "rank", "example_id", "document_id", "total",
    "query": [(token, score)], "train": [(token, score)]}, drawn as a heat map under the query.
    """
    modes = list(results)
    subtitle = f"{len(queries)} quer{'y' if len(queries) == 1 else 'ies'} · modes: {', '.join(modes) or '–'}"
    longest = max((len(rows) for by_query in results.values() for rows in by_query.values()), default=0)
    if max_rows is not None and longest > max_rows:
        results = {m: {q: rows[:max_rows] for q, rows in bq.items()} for m, bq in results.items()}
        subtitle += f" · the first {max_rows} of {longest} results per query and mode" + (
            f" (all of them: {full_list})" if full_list else ""
        )
    header = (
        f'<header class="card" id="top"><h1>{escape(title)}</h1><p class="note">{escape(subtitle)}. '
        'Rows on green with <span class="check">✓</span> are labelled relevant.</p>'
        f"{run_info_html(run_info)}{_toc_html(queries)}</header>"
    )
    parts = [header]
    if metrics:
        parts.append(metrics_html(metrics))
    if score_samples:
        parts.append(_histogram_html(score_samples))
    if queries:
        token_scores = token_scores or {}
        parts.extend(_query_html(i, q, results, token_scores.get(str(q.get("id")))) for i, q in enumerate(queries))
    else:
        parts.append('<section class="card"><p class="empty">No queries.</p></section>')
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{CSS}</style></head>\n"
        f"<body><main>\n" + "\n".join(parts) + "\n</main></body></html>\n"
    )
