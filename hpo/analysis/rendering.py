"""A report as text: Markdown or a standalone HTML page, each table followed by its figure."""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

from hpo.analysis.tables import Report


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.4g}"
    return str(value)


_FIGURE_AFTER = {
    "compare": "compare",
    "rate_input": "rate_input",
    "rate_hidden": "rate_hidden",
    "rate_conv": "rate_conv",
    "rate_recurrent": "rate_recurrent",
    "gap": "gap",
    "importance": "importance",
    "best": "history",
}


def _figure(report: Report, key: str) -> Path | None:
    """The figure shown after table ``key``: its own (a rate or schedule table's scatter), or the history
    after the best configuration."""
    return report.figures.get(_FIGURE_AFTER.get(key, key if key.startswith(("rate_", "schedule")) else ""))


def to_markdown(report: Report, command: str = "") -> str:
    lines = [f"# {report.heading}: {report.study}", ""]
    if command:
        lines += [f"Made with `{command}`.", ""]
    for table in report.tables:
        lines += [f"## {table.title}", "", "| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
        lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in table.rows]
        if table.note:
            lines += ["", table.note]
        figure = _figure(report, table.key)
        if figure is not None:
            lines += ["", f"![{figure.stem}]({figure.name})"]
        lines.append("")
    return "\n".join(lines)


def to_html(report: Report, command: str = "") -> str:
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(report.study)}</title>"
        "<style>body{font-family:sans-serif;max-width:60em;margin:auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}</style></head><body>",
        f"<h1>{html.escape(report.heading)}: {html.escape(report.study)}</h1>",
    ]
    if command:
        parts.append(f"<p>Made with <code>{html.escape(command)}</code>.</p>")
    for table in report.tables:
        parts.append(
            f"<h2>{html.escape(table.title)}</h2><table><tr>"
            + "".join(f"<th>{html.escape(c)}</th>" for c in table.columns)
            + "</tr>"
        )
        parts += ["<tr>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in row) + "</tr>" for row in table.rows]
        parts.append("</table>")
        if table.note:
            parts.append(f"<p>{html.escape(table.note)}</p>")
        figure = _figure(report, table.key)
        if figure is not None:
            parts.append(f"<img src='{html.escape(figure.name)}' alt='{html.escape(figure.stem)}'>")
    parts.append("</body></html>")
    return "\n".join(parts)


def render(report: Report, fmt: str = "md", command: str = "") -> str:
    """The report as Markdown (``md``) or, for any other ``fmt``, HTML."""
    return to_markdown(report, command) if fmt == "md" else to_html(report, command)
