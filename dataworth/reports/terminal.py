"""Terminal renderings: the evaluation table as Markdown, the demo's top results and fact-tracing table.

Each returns the text; the flows print it.
"""

from __future__ import annotations

import math


def format_table(table: dict[str, dict[str, float]]) -> str:
    """A Markdown table, methods as rows (for the terminal and the README)."""
    metrics: list[str] = []
    for row in table.values():
        metrics.extend(m for m in row if m not in metrics)
    lines = ["| method | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for method, row in table.items():
        cells = []
        for m in metrics:
            v = row.get(m)
            if v is None or (isinstance(v, float) and math.isnan(v)):
                cells.append("–")
            else:
                cells.append(str(int(v)) if float(v).is_integer() and abs(v) >= 1 else f"{v:.3f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_evaluation(table: dict[str, dict[str, float]], notes: list[str]) -> str:
    """The evaluation table with its notes as a bulleted list after it."""
    return f"\n{format_table(table)}\n\n" + "\n".join(f"- {note}" for note in notes)


def format_top_results(
    queries: list[dict],
    results: dict[str, dict[str, list[dict]]],
    relevant: dict[str, list[str]],
    mode: str,
    show: int,
    top: int = 5,
) -> str:
    """The first `show` queries, each with its top training documents in one mode; ✓ marks a relevant one.

    queries: {"query_id", "prompt", "completion", "generated"}; results: mode -> query id -> ranked rows
    {"rank", "score", "document_id", "text"}.
    """
    lines = [f"\nTop-{top} training documents per query (mode {mode}; ✓ = states the queried fact):"]
    rows = results.get(mode, {})
    for q in queries[:show]:
        generated = "  (generated)" if q["generated"] else ""
        lines += ["", f"{q['query_id']}: {q['prompt']!r} → {q['completion']!r}{generated}"]
        for r in rows.get(q["query_id"], [])[:top]:
            mark = "✓" if r["document_id"] in relevant.get(q["query_id"], ()) else " "
            text = r["text"].replace("\n", " ")
            lines.append(f"  {mark} {r['rank']:>2}. {r['score']:>10.4g}  {r['document_id']:<10} {text[:70]}")
    if len(queries) > show:
        lines += ["", f"… {len(queries) - show} more queries in the report"]
    return "\n".join(lines)


def format_metrics(metrics: dict[str, dict[str, float]]) -> str:
    """Modes × metrics as fixed-width columns, metrics in name order."""
    names = sorted({n for m in metrics.values() for n in m})
    lines = ["\n" + "mode".ljust(12) + "".join(n.rjust(12) for n in names)]
    lines += [mode.ljust(12) + "".join(f"{m[n]:12.3f}" for n in names) for mode, m in metrics.items()]
    return "\n".join(lines)


def format_fact_tracing(metrics: dict[str, dict[str, float]], correct: int, total: int, fact_accuracy: float) -> str:
    """The demo's closing table: fact-tracing metrics per mode over the queries the model got right."""
    return (
        f"\nFact tracing over {correct} queries the model completes with the fact "
        f"(of {total}; model fact accuracy {fact_accuracy:.2f}):\n" + format_metrics(metrics)
    )


def format_store_precision(table: dict[str, dict[str, float]]) -> str:
    """The store-precision table (storage dtype -> bytes_ratio, <mode>.<metric>) as one row per dtype and mode."""
    rows: dict[str, dict[str, float]] = {}
    for dtype, row in table.items():
        for name, value in row.items():
            if "." in name:
                mode, metric = name.split(".", 1)
                rows.setdefault(f"{dtype} {mode}", {"bytes ÷ float32": row["bytes_ratio"]})[metric] = value
    return "Stored gradients in smaller dtypes against float32:\n" + format_table(rows)
