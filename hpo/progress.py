"""A terminal progress bar for a running study: trials finished of the budget, how many are
running, pruned and failed, and the best value so far."""

from __future__ import annotations

from optuna.trial import FrozenTrial
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from hpo.running.study import Counts


def format_values(values: list[float] | None) -> str:
    return "-" if not values else ", ".join(f"{v:.4g}" for v in values)


class StudyProgress:
    """A context manager whose instances are :data:`hpo.running.executor.ProgressCallback` s. The bar
    appears when :meth:`begin` names the study, once it exists."""

    def __init__(self, console: Console | None = None) -> None:
        self.budget = 0
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        self._task: TaskID | None = None

    def begin(self, study_name: str, budget: int) -> None:
        self.budget = budget
        self._task = self._progress.add_task(study_name, total=budget, detail="")
        self._progress.start()

    def __enter__(self) -> StudyProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._progress.stop()

    def __call__(self, counts: Counts, best: FrozenTrial | None) -> None:
        if self._task is None:
            return
        detail = (
            f"running {counts.running} · complete {counts.complete} · pruned {counts.pruned} · "
            f"failed {counts.failed} · best {format_values(best.values if best else None)}"
        )
        self._progress.update(self._task, completed=counts.finished, total=self.budget, detail=detail)
