"""``hpo report`` and ``hpo compare``: the dropout questions a study answers, as tables
(:mod:`~hpo.analysis.tables`) and plots (:mod:`~hpo.analysis.plots`) from its stored trials,
rendered (:mod:`~hpo.analysis.rendering`) and written into a folder."""

from __future__ import annotations

from pathlib import Path

from hpo.analysis.plots import plot, plot_compare, plot_user
from hpo.analysis.rendering import render
from hpo.analysis.tables import Report, best_table, comparison_table, study_tables, user_tables
from hpo.running.study import StudyHandle

__all__ = ["Report", "best_table", "build", "build_user", "compare", "write"]


def build(handle: StudyHandle) -> Report:
    """Every table the study's trials support."""
    return Report(handle.name, handle.spec.objective[0].metric, study_tables(handle))


def build_user(handle: StudyHandle) -> Report:
    """The tables a study of the user's own model supports (:func:`~hpo.analysis.tables.user_tables`)."""
    return Report(handle.name, handle.spec.objective[0].metric, user_tables(handle))


def write(handle: StudyHandle, out: Path, fmt: str = "md", command: str = "") -> tuple[Report, Path]:
    """Build the report, write its figures and ``report.md`` (or ``report.html``) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    if handle.spec.user_model:
        report = build_user(handle)
        plot_user(report, handle, out)
    else:
        report = build(handle)
        plot(report, handle, out)
    path = out / f"report.{fmt}"
    path.write_text(render(report, fmt, command))
    return report, path


def compare(handles: list[StudyHandle], out: Path, fmt: str = "md", command: str = "") -> tuple[Report, Path]:
    """Write ``compare.md`` (or ``.html``) and ``compare.png`` (best test accuracy with and
    without dropout per study) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    report = Report(" vs ".join(h.name for h in handles), "", [comparison_table(handles)], heading="Dropout comparison")
    plot_compare(report, out)
    path = out / f"compare.{fmt}"
    path.write_text(render(report, fmt, command))
    return report, path
