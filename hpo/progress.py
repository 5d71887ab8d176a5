"""A terminal progress bar for a running study: trials finished of the budget, how many are
running, pruned and failed, and the best value so far."""

from __future__ import annotations

from optuna.trial import FrozenTrial
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from hpo.study import Counts


def format_values(values: list[float] | None) -> str:
    return "-" if not values else ", ".join(f"{v:.4g}" for v in values)


class StudyProgress:
    """Context manager whose instances are :data:`hpo.executor.ProgressCallback` s."""

    def __init__(self, study_name: str, budget: int, console: Console | None = None) -> None:
        self.budget = budget
        self._progress = Progress(
            TextColumn(f"[bold]{study_name}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        self._task = self._progress.add_task("trials", total=budget, detail="")

    def __enter__(self) -> StudyProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def __call__(self, counts: Counts, best: FrozenTrial | None) -> None:
        detail = (
            f"running {counts.running} · complete {counts.complete} · pruned {counts.pruned} · "
            f"failed {counts.failed} · best {format_values(best.values if best else None)}"
        )
        self._progress.update(self._task, completed=counts.finished, total=self.budget, detail=detail)
