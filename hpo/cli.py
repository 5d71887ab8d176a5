"""The ``hpo`` command line: a thin layer over :mod:`hpo.api` (its read side,
:mod:`hpo.queries`, for the verbs that only read the store) and :mod:`hpo.running.study`; what it
prints is built in :mod:`hpo.printing`.

Bad input (an invalid search space, unreadable data, an unreachable store, an unknown study)
ends with one line on stderr and exit code 2. Verbs that only read the store never import torch,
so they answer at once.
"""

from __future__ import annotations

import functools
import inspect
import signal
import sys
import threading
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import optuna
import typer

from hpo import __version__, printing, queries
from hpo.analysis.export import to_csv, to_json, trial_rows
from hpo.errors import HpoError, StoreError
from hpo.output import VERBOSE_ENV
from hpo.output import configure as configure_output
from hpo.output import console as output_console
from hpo.progress import StudyProgress
from hpo.running.records import StoredTrial
from hpo.running.store import STORAGE_ENV, lock_kept, redact, storage_url
from hpo.running.study import BASELINE, DROPOUT_KEPT, StudyHandle, best_trial, load_study

if TYPE_CHECKING:
    from hpo.running.executor import RunSummary

app = typer.Typer(
    help="Bayesian optimisation of dropout configurations: submit a YAML search space, watch "
    "trials land in a SQL study store, read the best configuration.",
    no_args_is_help=True,
    add_completion=False,
)
console = output_console()
errors = output_console(stderr=True)

Storage = Annotated[
    str | None,
    typer.Option(
        "--storage",
        envvar=STORAGE_ENV,
        show_default=False,
        help="SQLAlchemy URL of the study store \\[default: sqlite:///hpo.db in this directory].",
    ),
]
StudyName = Annotated[str, typer.Argument(help="Study name (see `hpo list`).", show_default=False)]


class Accelerator(str, Enum):
    auto = "auto"
    cpu = "cpu"
    gpu = "gpu"


class PrecisionChoice(str, Enum):
    fp32 = "32"
    tf32 = "tf32"
    bf16 = "bf16"


class Executor(str, Enum):
    auto = "auto"
    local = "local"
    ray = "ray"


class Viewer(str, Enum):
    mlflow = "mlflow"
    optuna = "optuna"


class ExportFormat(str, Enum):
    csv = "csv"
    json = "json"


ExecutorOption = Annotated[
    Executor,
    typer.Option(
        "--executor",
        help=(
            "local: one trial at a time in this process; ray: Ray tasks; auto: Ray when --workers > 1, "
            "--gpus-per-trial or a Ray address is given."
        ),
    ),
]
Workers = Annotated[int, typer.Option(min=1, help="Trials running at once (Ray).")]
CpusPerTrial = Annotated[
    float | None,
    typer.Option(
        min=0.01,
        show_default=False,
        help=(
            "CPUs each Ray trial reserves \\[default: 1]; torch threads of in-process trials \\[default: one per "
            "200 MFLOP of a training step, at most the cores]."
        ),
    ),
]
GpusPerTrial = Annotated[
    str,
    typer.Option(
        help=(
            "GPUs each Ray trial reserves; 0.25 packs four trials per GPU; auto measures one trial on a GPU and "
            "packs as many as fit."
        )
    ),
]
GroupSize = Annotated[
    str,
    typer.Option(
        help=(
            "Trials trained together as one vectorised model (MLP spaces; 32-128 fill a GPU); auto: 5 for an MLP "
            "trained in-process on a CPU, else 1."
        )
    ),
]
MaxRetries = Annotated[int, typer.Option(min=0, help="Times a configuration whose worker died is queued again.")]
RayAddress = Annotated[
    str | None,
    typer.Option(
        envvar="RAY_ADDRESS",
        show_default=False,
        help="Ray cluster address \\[default: a local Ray instance when Ray is used].",
    ),
]
Timeout = Annotated[
    float | None, typer.Option(min=0, help="Stop starting trials after this many seconds.", show_default=False)
]
AcceleratorOption = Annotated[Accelerator, typer.Option(help="Where in-process trials train.")]
PrecisionOption = Annotated[
    PrecisionChoice,
    typer.Option(
        "--precision",
        help=(
            "Training arithmetic: 32 (float32), tf32 (TensorFloat-32 matrix products on a GPU) or bf16 (bf16 "
            "mixed precision)."
        ),
    ),
]
TrackingUri = Annotated[
    str | None,
    typer.Option(
        envvar="MLFLOW_TRACKING_URI",
        show_default=False,
        help=(
            "MLflow tracking URI: an http(s):// server or an SQL store \\[default: sqlite:///mlflow.db in this "
            "directory]."
        ),
    ),
]
Experiment = Annotated[
    str | None, typer.Option(show_default=False, help="MLflow experiment \\[default: the study name].")
]
TrackingSwitch = Annotated[
    bool, typer.Option(help="Mirror the study into MLflow (a parent run, a nested run per trial).")
]
CodeDir = Annotated[
    Path | None,
    typer.Option(
        help=(
            "Folder of your model's and data's code, put on sys.path and shipped to Ray workers \\[default: the "
            "spec's code_dir, else the spec file's folder]."
        ),
        show_default=False,
    ),
]

ClusterAddress = Annotated[
    str | None,
    typer.Option(
        "--cluster",
        envvar="HPO_CLUSTER",
        show_default=False,
        help=(
            "A Ray cluster's Jobs API, http://HEAD:8265: the study's driver runs there as a Ray job and this "
            "command returns at once (`hpo status`, `hpo logs`, `hpo stop`)."
        ),
    ),
]

#: The options ``submit`` and ``resume`` share (see :func:`_run_options`).
_RUN_OPTIONS = [
    ("executor", ExecutorOption, Executor.auto),
    ("workers", Workers, 1),
    ("cpus_per_trial", CpusPerTrial, None),
    ("gpus_per_trial", GpusPerTrial, "0"),
    ("group_size", GroupSize, "auto"),
    ("max_retries", MaxRetries, 1),
    ("ray_address", RayAddress, None),
    ("accelerator", AcceleratorOption, Accelerator.auto),
    ("precision", PrecisionOption, PrecisionChoice.fp32),
    ("tracking", TrackingSwitch, True),
    ("tracking_uri", TrackingUri, None),
    ("experiment", Experiment, None),
]

F = TypeVar("F", bound=Callable[..., Any])


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _user_errors(command: F) -> F:
    """Turn the errors a user can fix into one line on stderr and exit code 2, and SIGTERM (what
    schedulers and `kill` send) into the same clean stop as Ctrl-C."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            return command(*args, **kwargs)
        except Exception as exc:
            error = exc if isinstance(exc, HpoError) else lock_kept(exc)
            if error is None:
                raise
            errors.print(f"error: {error}", markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def _version(value: bool) -> None:
    if value:
        console.print(f"dropout-hpo {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
    verbose: Annotated[
        bool,
        typer.Option("--verbose", "-v", envvar=VERBOSE_ENV, help="Also show what MLflow, Ray and other libraries log."),
    ] = False,
) -> None:
    """dropout-hpo."""
    configure_output(verbose)


def _run_options(command: F) -> F:
    """Give ``command`` the execution and MLflow options that ``submit`` and ``resume`` share;
    it receives them as ``execution`` (:class:`hpo.api.Execution`) and ``tracking``
    (:class:`hpo.tracking.Tracking`)."""
    shared = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
        for name, annotation, default in _RUN_OPTIONS
    ]
    signature = inspect.signature(command, eval_str=True)
    own = [p for p in signature.parameters.values() if p.name not in ("execution", "tracking")]

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from hpo.api import Execution
        from hpo.tracking import Tracking

        options = {name: kwargs.pop(name) for name, _, _ in _RUN_OPTIONS}
        execution = Execution(
            options["executor"].value,
            options["workers"],
            options["cpus_per_trial"],
            gpus_per_trial=_auto_or(options["gpus_per_trial"], "--gpus-per-trial", float, "a number"),
            max_retries=options["max_retries"],
            ray_address=options["ray_address"],
            accelerator=options["accelerator"].value,
            group_size=_auto_or(options["group_size"], "--group-size", int, "a whole number >= 1"),
            precision=options["precision"].value,
        )
        tracking = Tracking(options["tracking"], options["tracking_uri"], options["experiment"])
        return command(*args, execution=execution, tracking=tracking, **kwargs)

    wrapper.__signature__ = signature.replace(parameters=own + shared)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in own + shared}
    return wrapper  # type: ignore[return-value]


@app.command()
@_user_errors
@_run_options
def submit(
    space: Annotated[Path, typer.Argument(help="Search-space YAML file (see search_spaces/).", show_default=False)],
    trials: Annotated[
        int | None,
        typer.Option(
            min=1, help="Budget of finished trials \\[default: the spec's budget.trials].", show_default=False
        ),
    ] = None,
    timeout: Timeout = None,
    study_name: Annotated[
        str | None, typer.Option(help="Study name \\[default: the spec's name].", show_default=False)
    ] = None,
    storage: Storage = None,
    seed: Annotated[
        int | None,
        typer.Option(
            help="Seed of the sampler and the trials \\[default: the spec's sampler.seed, else random].",
            show_default=False,
        ),
    ] = None,
    baselines: Annotated[
        bool, typer.Option(help="Run the spec's baselines (no dropout; Srivastava et al.'s recommendation) first.")
    ] = True,
    code_dir: CodeDir = None,
    cluster: ClusterAddress = None,
    check: Annotated[
        bool,
        typer.Option(help="With --cluster: build your model and train it on one batch here before submitting."),
    ] = True,
    *,
    execution: Any = None,
    tracking: Any = None,
) -> None:
    """Create a study from a search space and run it until its trial budget is spent."""
    from hpo import api

    if cluster:
        from hpo.cluster.jobs import Cluster, client_version_warning

        jobs = Cluster(cluster)
        if warning := client_version_warning(jobs):
            _warn(warning)
        args = _driver_args(execution, tracking, trials=trials, timeout=timeout, seed=seed)
        job = api.submit_to_cluster(
            space,
            jobs,
            driver_args=args + ([] if baselines else ["--no-baselines"]),
            study_name=study_name,
            tracking=tracking.enabled,
            check=check,
            code_dir=code_dir,
            on_note=_note,
            on_warning=_warn,
        )
        _print_submitted(job, cluster)
        return
    _warn_of_job_version()
    with StudyProgress(console) as progress:

        def start(handle: StudyHandle) -> None:
            console.print(
                f"study [bold]{handle.name}[/] in {_shown(handle.storage)}: {handle.budget} trials, "
                f"sampler {handle.spec.sampler.name}, pruner {handle.spec.active_pruner.name}, seed {handle.seed}"
            )
            _print_tracking(handle, tracking)
            progress.begin(handle.name, handle.budget)

        handle, summary = api.submit(
            space,
            trials=trials,
            timeout=timeout,
            study_name=study_name,
            storage=storage,
            seed=seed,
            baselines=baselines,
            execution=execution,
            tracking=tracking,
            on_start=start,
            on_progress=progress,
            on_warning=_warn,
            on_note=_note,
            code_dir=code_dir,
        )
    _report_run(handle, summary)


@app.command()
@_user_errors
@_run_options
def resume(
    study: Annotated[str | None, typer.Argument(help="Study name (see `hpo list`).", show_default=False)] = None,
    storage: Storage = None,
    trials: Annotated[
        int | None,
        typer.Option(min=1, help="New total budget of finished trials \\[default: unchanged].", show_default=False),
    ] = None,
    timeout: Timeout = None,
    code_dir: Annotated[
        Path | None,
        typer.Option(
            help="Folder of your model's code \\[default: the folder the study was submitted with].", show_default=False
        ),
    ] = None,
    take_over: Annotated[
        bool,
        typer.Option(
            "--take-over",
            help=(
                "Run even if another driver holds the study (one known to be dead whose heartbeat is not yet 30 s old)."
            ),
        ),
    ] = False,
    cluster: ClusterAddress = None,
    interrupted: Annotated[
        bool,
        typer.Option(
            "--interrupted",
            help="With --cluster: resubmit every interrupted study (its driver died, its budget unmet).",
        ),
    ] = False,
    *,
    execution: Any = None,
    tracking: Any = None,
) -> None:
    """Continue a study: fail trials its stopped driver left RUNNING, re-queue them, and run
    until the budget of finished trials is reached."""
    from hpo import api

    if cluster:
        _resume_on_cluster(study, cluster, storage, interrupted, code_dir, trials, timeout, execution, tracking)
        return
    if study is None or interrupted:
        raise HpoError("name the study to resume (--interrupted resubmits studies to a --cluster)")
    _warn_of_job_version()
    with StudyProgress(console) as progress:

        def start(handle: StudyHandle, orphans: list[int]) -> None:
            if orphans:
                console.print(f"abandoned trials {', '.join(map(str, orphans))} (their driver stopped); re-queued")
            _print_tracking(handle, tracking)
            progress.begin(handle.name, handle.budget)

        handle, summary = api.resume(
            study,
            storage=storage,
            trials=trials,
            timeout=timeout,
            execution=execution,
            tracking=tracking,
            on_start=start,
            on_progress=progress,
            on_warning=_warn,
            on_note=_note,
            code_dir=code_dir,
            take_over=take_over,
        )
    _report_run(handle, summary)


@app.command()
@_user_errors
def sites(
    space: Annotated[Path, typer.Argument(help="Search-space YAML file.", show_default=False)],
    code_dir: CodeDir = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """The dropout sites of the space's model, built at the centre of the space: module path,
    kind, rate as built, the group that matches it, and warnings (functional dropout no site
    holds, LSTM dropout with one layer, rate-0 sites built as nn.Identity, patterns matching
    nothing)."""
    from hpo import api

    report = api.sites(space, code_dir)
    if as_json:
        console.print_json(
            data={
                "model": report.model,
                "sites": [s.to_dict() for s in report.settings],
                "max_norm": report.max_norm,
                "warnings": report.warnings,
            }
        )
        return
    grouped = sum(1 for s in report.settings if s.group)
    console.print(
        f"dropout sites of {report.model}: {len(report.settings)}, {grouped} of them in groups",
        highlight=False,
        soft_wrap=True,
    )
    rows = [("site", "kind", "rate", "group", "")] + [
        (
            s.site.path or "(model)",
            s.site.kind,
            f"{s.site.rate:g}",
            s.group or "-",
            f"(rate passed to {s.site.used_by})" if s.site.used_by else "",
        )
        for s in report.settings
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        console.print(
            ("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[4]).rstrip(),
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
    for name, layers in report.max_norm.items():
        console.print(
            f"max-norm {name}: {', '.join(layers) or 'no Linear or Conv layer'}", highlight=False, soft_wrap=True
        )
    for line in report.warnings:
        _warn(line)


def _mapping(option: str, text: str | None) -> dict[str, Any] | None:
    """A YAML (or JSON) mapping given on the command line."""
    import yaml

    if text is None:
        return None
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise HpoError(f"{option}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(value, dict):
        raise HpoError(f"{option}: expected a mapping such as '{{width: 128, dropout: 0.1}}', got {text!r}")
    return value


@app.command()
@_user_errors
def init(
    model: Annotated[
        str,
        typer.Argument(
            help="Your model's import path (my_models.Net, torchvision.models.VisionTransformer).", show_default=False
        ),
    ],
    init_args: Annotated[
        str | None,
        typer.Option(
            help="Its constructor arguments as a YAML mapping, e.g. '{num_classes: 10, dropout: 0.1}'.",
            show_default=False,
        ),
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(
            help=(
                "Your data's import path: a LightningDataModule, or a function returning (train, val[, test]) "
                "datasets \\[default: --dataset]."
            ),
            show_default=False,
        ),
    ] = None,
    data_args: Annotated[
        str | None, typer.Option(help="The data's arguments as a YAML mapping.", show_default=False)
    ] = None,
    dataset: Annotated[str, typer.Option(help="A built-in data set, when --data is not given.")] = "digits",
    out: Annotated[Path, typer.Option("--out", "-o", help="Search-space file to write.")] = Path("space.yaml"),
    code_dir: Annotated[
        Path | None, typer.Option(help="Folder of your code \\[default: the folder of --out].", show_default=False)
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite --out if it exists.")] = False,
) -> None:
    """Write a starter search space for your own model: its dropout sites found and grouped by
    repeated block, one searched rate per group, checked by building the model and training it
    on one batch."""
    from hpo.starter import init as write_starter

    _, groups = write_starter(
        model,
        out,
        init_args=_mapping("--init-args", init_args),
        data=data,
        data_args=_mapping("--data-args", data_args),
        dataset=dataset,
        code_dir=code_dir,
        overwrite=force,
        on_warning=_warn,
    )
    sites = sum(len(g.sites) for g in groups)
    console.print(
        f"wrote {out}: {_count(sites, 'dropout site')} in {_count(len(groups), 'group')} "
        f"({', '.join(g.name for g in groups)}); next: `hpo sites {out}`, then `hpo submit {out}`",
        highlight=False,
        soft_wrap=True,
    )


def _print_tracking(handle: StudyHandle, tracking: Any) -> None:
    if tracking.enabled:
        console.print(
            f"MLflow: experiment [bold]{tracking.experiment or handle.name}[/] in "
            f"{redact(tracking.resolved_uri)} (see it with `hpo ui`)",
            highlight=False,
            soft_wrap=True,
        )


def _auto_or(value: str, option: str, kind: type, what: str) -> int | float | str:
    """An option that takes ``auto`` or a number of ``kind`` (``what`` names it in the error);
    ranges are checked by :class:`hpo.api.Execution`."""
    if value.strip().lower() == "auto":
        return "auto"
    try:
        return kind(value)
    except ValueError:
        raise HpoError(f"{option} must be 'auto' or {what}, got {value!r}") from None


def _count(n: int, thing: str) -> str:
    return f"{n} {thing}{'' if n == 1 else 's'}"


def _note(message: str) -> None:
    console.print(message, markup=False, highlight=False, soft_wrap=True)


def _warn(message: str) -> None:
    errors.print(f"warning: {message}", markup=False, highlight=False, soft_wrap=True)


@app.command()
@_user_errors
def sync(
    study: StudyName,
    storage: Storage = None,
    tracking_uri: TrackingUri = None,
    experiment: Experiment = None,
    model: Annotated[
        bool,
        typer.Option(
            help=(
                "Also log the best trial's network when MLflow has none, training the trial again from its "
                "configuration and seed (as long as the trial took)."
            )
        ),
    ] = True,
    accelerator: AcceleratorOption = Accelerator.cpu,
) -> None:
    """Fill MLflow in from the study store: create missing trial runs, complete runs left open
    while the tracking server was down, remove duplicate runs, log a missing best model. Safe to
    run any time."""
    from hpo.tracking import Tracking
    from hpo.tracking import sync as sync_study

    handle = load_study(study, storage)
    settings = Tracking(uri=tracking_uri, experiment=experiment)
    report = sync_study(handle, settings, _rerun_for(handle, accelerator.value) if model else None)
    console.print(
        f"synced study {study!r} to {redact(settings.resolved_uri)} (experiment {report.experiment_id}, "
        f"run {report.parent_id}): {report.created} runs created, {report.completed} completed, "
        f"{report.removed} duplicates removed, {report.unchanged} already up to date",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    if report.model_trial is not None:
        trial = handle.study.trials[report.model_trial]
        measured = ", ".join(f"{o.metric} {v:.4f}" for o, v in zip(handle.spec.objective, report.model_values))
        stored = ", ".join(f"{v:.4f}" for v in trial.values)
        same = report.model_values == trial.values
        console.print(
            f"best trial {trial.number}'s network was not in MLflow: trained it again and logged it "
            f"({measured}; the trial measured {stored}"
            f"{'' if same else ': not the same, so this machine or its package versions compute differently'})",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )


def _rerun_for(handle: StudyHandle, accelerator: str) -> Callable[[Any], tuple[Any, Any, list[float]]]:
    """The ``rerun`` callback of :func:`hpo.tracking.sync`: the trial trained again on the
    study's data (loaded on first use), with a few validation inputs as the model's example."""

    def rerun(trial: Any) -> tuple[Any, Any, list[float]]:
        from hpo.analysis.best_model import rerun as rerun_trial
        from hpo.api import study_data
        from hpo.tracking.models import model_example

        data = study_data(handle)
        again = rerun_trial(handle, trial, data, accelerator)
        return again.net, model_example(data), again.values

    return rerun


class ReportFormat(str, Enum):
    md = "md"
    html = "html"


@app.command()
@_user_errors
def report(
    study: StudyName,
    storage: Storage = None,
    format: Annotated[ReportFormat, typer.Option("--format", "-f", help="Markdown or HTML.")] = ReportFormat.md,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Folder for the report and its PNG plots \\[default: reports/STUDY].",
            show_default=False,
        ),
    ] = None,
    tracking: TrackingSwitch = True,
    tracking_uri: TrackingUri = None,
) -> None:
    """Dropout tables and plots from the study's trials (rate vs accuracy, time and convergence
    per placement, train/test gap with and without dropout, variants, regularizers, max-norm,
    parameter importance, optimisation history); also attached to the study's MLflow run."""
    from hpo.analysis import report as reports
    from hpo.tracking import Tracking, log_report

    handle = load_study(study, storage)
    folder = out or Path("reports") / study
    command = f"hpo report {study}" + (f" --format {format.value}" if format != ReportFormat.md else "")
    built, path = reports.write(handle, folder, format.value, command)
    console.print(
        f"wrote {path} ({len(built.tables)} tables, {len(built.figures)} plots)", highlight=False, soft_wrap=True
    )
    if tracking:
        settings = Tracking(uri=tracking_uri)
        run_id = log_report(handle, settings, folder)
        console.print(
            f"attached to MLflow run {run_id} at {redact(settings.resolved_uri)}", highlight=False, soft_wrap=True
        )


@app.command()
@_user_errors
def compare(
    studies: Annotated[list[str], typer.Argument(help="Two or more study names (see `hpo list`).", show_default=False)],
    storage: Storage = None,
    format: Annotated[ReportFormat, typer.Option("--format", "-f", help="Markdown or HTML.")] = ReportFormat.md,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the comparison and its plot.")] = Path(
        "reports/compare"
    ),
) -> None:
    """One table across studies, e.g. MLP vs Conv1d vs LSTM on one data set: each study's best
    trial (test accuracy, train-test gap, time per epoch, its dropout) and the best test accuracy
    its trials reached with and without dropout."""
    from hpo.analysis import report as reports

    if len(studies) < 2:
        raise HpoError("compare needs two or more studies")
    if len(set(studies)) < len(studies):
        raise HpoError("a study is named twice")
    handles = [load_study(name, storage) for name in studies]
    command = "hpo compare " + " ".join(studies) + (f" --format {format.value}" if format != ReportFormat.md else "")
    built, path = reports.compare(handles, out, format.value, command)
    console.print(f"wrote {path} ({len(built.tables[0].rows)} studies)", highlight=False, soft_wrap=True)


@app.command("evaluate")
@_user_errors
def evaluate_uncertainty(
    study: StudyName,
    storage: Storage = None,
    mc_samples: Annotated[int, typer.Option(min=1, help="Stochastic forward passes with dropout on.")] = 50,
    trial: Annotated[
        int | None, typer.Option(help="Trial to evaluate \\[default: the best].", show_default=False)
    ] = None,
    tracking_uri: TrackingUri = None,
    seed: Annotated[int, typer.Option(help="Seed of the dropout masks.")] = 0,
) -> None:
    """Monte-Carlo dropout on the test split: accuracy, negative log-likelihood and expected
    calibration error of the averaged predictions, against the deterministic network."""
    from hpo.analysis.best_model import chosen_trial, network, schedule_note, test_set
    from hpo.analysis.uncertainty import compare
    from hpo.api import study_data
    from hpo.tracking import Tracking, model_uri

    handle = load_study(study, storage)
    chosen = chosen_trial(handle, trial)
    data = study_data(handle)
    test = test_set(data)
    net, source = network(handle, chosen, data, model_uri(handle, Tracking(uri=tracking_uri), chosen.number))
    result = compare(net, test, mc_samples, seed)
    console.print(
        f"trial {chosen.number}: {source}; test split ({len(test)} examples)", highlight=False, soft_wrap=True
    )
    if result.dropout_modules == 0:
        console.print("this configuration has no active dropout: MC dropout equals the deterministic network")
    else:
        console.print(
            f"MC dropout samples {len(result.switch.sampled)} dropout sites (training mode on "
            f"{result.dropout_modules} modules)",
            highlight=False,
            soft_wrap=True,
        )
    if note := schedule_note(chosen):
        console.print(note, highlight=False, soft_wrap=True)
    for line in result.switch.unsampled:
        _warn(f"MC dropout cannot sample {line}")
    printing.print_uncertainty(console, result)


@app.command()
@_user_errors
def retrain(
    study: StudyName,
    storage: Storage = None,
    trial: Annotated[
        int | None, typer.Option(help="Trial to re-train \\[default: the best].", show_default=False)
    ] = None,
    tracking: TrackingSwitch = True,
    tracking_uri: TrackingUri = None,
    accelerator: AcceleratorOption = Accelerator.cpu,
) -> None:
    """Train the best configuration on train + validation for the epochs it kept, test it once
    on the held-out test split, and log it to MLflow."""
    from hpo.analysis.best_model import chosen_trial
    from hpo.analysis.best_model import retrain as retrain_trial
    from hpo.api import study_data
    from hpo.tracking import Tracking, log_retrained

    handle = load_study(study, storage)
    chosen = chosen_trial(handle, trial)
    data = study_data(handle)
    retrained = retrain_trial(handle, chosen, data, accelerator.value)
    measured = ", ".join(
        f"{name} {value:.4f}"
        + (f" (the trial: {chosen.user_attrs[name]:.4f})" if isinstance(chosen.user_attrs.get(name), float) else "")
        for name, value in retrained.test.items()
    )
    console.print(
        f"trial {chosen.number} re-trained on {retrained.examples} examples for {retrained.epochs} epochs: "
        f"{measured or 'no test metric logged'}",
        highlight=False,
        soft_wrap=True,
    )
    if tracking:
        settings = Tracking(uri=tracking_uri)
        run_id = log_retrained(handle, settings, retrained, data)
        console.print(f"logged as MLflow run {run_id} with its model", highlight=False, soft_wrap=True)


@app.command()
@_user_errors
def doctor(
    storage: Storage = None,
    tracking_uri: TrackingUri = None,
    ray_address: RayAddress = None,
    cluster: ClusterAddress = None,
) -> None:
    """Check that the study store, the MLflow tracking URI and the Ray cluster configured here
    (options or HPO_STORAGE, MLFLOW_TRACKING_URI, RAY_ADDRESS, HPO_CLUSTER) can be reached; exit 1
    if one cannot, naming it."""
    from hpo.doctor import diagnose

    checks = diagnose(storage, tracking_uri, ray_address, cluster)
    for check in checks:
        mark = "[green]ok[/]" if check.ok else "[red]UNREACHABLE[/]"
        console.print(
            f"{mark}  {check.service}: {check.target} - {check.detail} ({check.seconds:.1f} s)",
            highlight=False,
            soft_wrap=True,
        )
    failed = [c.service for c in checks if not c.ok]
    if failed:
        errors.print(f"error: cannot reach the {' and the '.join(failed)}", markup=False, highlight=False)
        raise typer.Exit(1)


@app.command()
@_user_errors
def ui(
    tracking_uri: TrackingUri = None,
    viewer: Annotated[
        Viewer,
        typer.Option(
            help=(
                "mlflow: the MLflow dashboard on the tracking store; optuna: optuna-dashboard on the study store "
                "(pip install 'dropout-hpo[dashboard]')."
            )
        ),
    ] = Viewer.mlflow,
    storage: Storage = None,
    host: Annotated[
        str,
        typer.Option(
            help="Interface to bind; anything but loopback exposes the dashboard, which has no login, to the network."
        ),
    ] = "127.0.0.1",
    port: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=65535,
            help="Port to listen on \\[default: 5000 for MLflow, 8080 for optuna-dashboard].",
            show_default=False,
        ),
    ] = None,
    study: Annotated[
        str | None,
        typer.Option(help="Study whose trials the printed address shows \\[default: the latest].", show_default=False),
    ] = None,
    open_browser: Annotated[bool, typer.Option("--open", help="Open the address in your browser.")] = False,
) -> None:
    """Start a dashboard and print the address of a study: MLflow's on the tracking store (the
    embedded mlflow.db by default), its trials best first, or optuna-dashboard on the study store
    (history, parameter importances, every trial's curve). Ctrl-C stops it and every process it
    started."""
    from hpo.tracking.dashboard import DEFAULT_PORT, OPTUNA_PORT, serve, serve_optuna

    announce = functools.partial(console.print, markup=False, highlight=False, soft_wrap=True)
    if viewer == Viewer.optuna:
        serve_optuna(
            storage_url(storage),
            host=host,
            port=port or OPTUNA_PORT,
            study=study,
            open_browser=open_browser,
            announce=announce,
            warn=_warn,
        )
        return
    serve(
        tracking_uri,
        host=host,
        port=port or DEFAULT_PORT,
        study=study,
        open_browser=open_browser,
        announce=announce,
        warn=_warn,
    )


@app.command()
@_user_errors
def status(
    study: Annotated[
        str | None, typer.Argument(help="Study name \\[default: every study].", show_default=False)
    ] = None,
    storage: Storage = None,
    cluster: ClusterAddress = None,
) -> None:
    """A study's trial counts against the budget, best value and failed trials; without a study,
    every study's state (queued, running, finished, stopped, failed, interrupted), from the store
    and, with --cluster, the cluster's jobs."""
    if study is not None:
        printing.print_status(console, queries.status(study, storage))
        if cluster:
            from hpo.cluster.jobs import Cluster

            job = Cluster(cluster).latest(study)
            console.print(
                f"job {job.job_id}: {job.status}" + (f" ({job.reason})" if job.reason else ""),
                markup=False,
                highlight=False,
                soft_wrap=True,
            )
        return
    from hpo.cluster.jobs import Cluster

    printing.print_board(console, _board(storage, Cluster(cluster) if cluster else None), _shown(storage))


def _board(storage: str | None, cluster: Any) -> list[Any]:
    """Every study's row: the store's studies and leases, joined with ``cluster``'s jobs (a
    :class:`hpo.cluster.jobs.Cluster`, or ``None``)."""
    from hpo.cluster import board
    from hpo.running.lease import holders

    jobs = [] if cluster is None else cluster.jobs()
    try:
        studies, leases = queries.studies(storage), holders(storage_url(storage))
        addresses = {s.name: queries.mlflow_address(s.name, storage) for s in studies}
    except StoreError as exc:
        if not cluster:
            raise
        _warn(f"{exc}; showing the cluster's jobs only")
        studies, leases, addresses = [], {}, {}
    return board.rows(jobs, studies, leases, addresses={k: v for k, v in addresses.items() if v})


@app.command()
@_user_errors
def logs(
    study: StudyName,
    cluster: Annotated[
        str, typer.Option("--cluster", envvar="HPO_CLUSTER", help="The Ray cluster's Jobs API, http://HEAD:8265.")
    ],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing until the driver ends.")] = False,
) -> None:
    """The log of the study's driver on the cluster (its latest job)."""
    from hpo.cluster.jobs import Cluster

    jobs = Cluster(cluster)
    for text in jobs.follow(study) if follow else [jobs.logs(study)]:
        sys.stdout.write(text)
        sys.stdout.flush()


@app.command()
@_user_errors
def stop(
    study: StudyName,
    cluster: Annotated[
        str, typer.Option("--cluster", envvar="HPO_CLUSTER", help="The Ray cluster's Jobs API, http://HEAD:8265.")
    ],
    drain: Annotated[
        bool,
        typer.Option(
            "--drain",
            help="Start no trial, let the running ones finish, then end (asked through the study store: --storage).",
        ),
    ] = False,
    storage: Storage = None,
) -> None:
    """Stop the study's driver on the cluster: it fails and re-queues its running trials, closes
    its MLflow runs and releases the study (`hpo resume STUDY --cluster …` goes on)."""
    from hpo.cluster.jobs import RUNNING, STOP_GRACE_S, Cluster

    jobs = Cluster(cluster)
    if drain and jobs.latest(study).status == RUNNING:
        from hpo.running.study import request_drain

        request_drain(load_study(study, storage))
        console.print(
            f"study {study} drains: no new trial starts, the running ones finish, then its driver ends "
            f"(`hpo logs {study} -f --cluster {cluster}` shows it)",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        return
    job = jobs.stop(study)
    console.print(
        f"stopping job {job.job_id} of study {study} (its driver has {STOP_GRACE_S} s to clean up); "
        f"`hpo status --cluster {cluster}` shows it stopped, `hpo resume {study} --cluster {cluster}` goes on",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )


@app.command()
@_user_errors
def best(
    study: StudyName,
    storage: Storage = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """The best configuration found so far (multi-objective: the Pareto front)."""
    front = queries.best(study, storage)
    if not front:
        errors.print(f"error: study {study!r} has no complete trial yet")
        raise typer.Exit(1)
    printing.print_best(console, front, as_json)


@app.command("list")
@_user_errors
def list_studies(storage: Storage = None) -> None:
    """Every study in the store, with its trial counts and best value."""
    printing.print_studies(console, queries.studies(storage), _shown(storage))


@app.command()
@_user_errors
def delete(
    study: StudyName,
    storage: Storage = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete a study and all its trials from the store (refused while a driver runs it)."""

    def confirm(n: int) -> None:
        if not yes:
            if not sys.stdin.isatty():
                raise StoreError("refusing to delete without confirmation: pass --yes")
            typer.confirm(f"delete study {study!r} and its {n} trials?", abort=True)

    printing.print_deleted(console, study, queries.delete(study, storage, confirm=confirm))


@app.command()
@_user_errors
def export(
    study: StudyName,
    storage: Storage = None,
    format: Annotated[ExportFormat, typer.Option("--format", "-f", help="Output format.")] = ExportFormat.csv,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="File to write \\[default: stdout].", show_default=False)
    ] = None,
) -> None:
    """Every trial as CSV or JSON: state, objective values, parameters and metrics."""
    handle = load_study(study, storage)
    rows = trial_rows(handle.study, [o.metric for o in handle.spec.objective], handle.spec)
    text = to_csv(rows) if format == ExportFormat.csv else to_json(rows)
    if out is None:
        sys.stdout.write(text)
    else:
        out.write_text(text)
        console.print(f"wrote {len(rows)} trials to {out}")


def _driver_args(
    execution: Any, tracking: Any, *, trials: int | None, timeout: float | None, seed: int | None = None
) -> list[str]:
    """The options of the driver's own ``hpo submit``/``resume`` on the cluster: how trials run
    and are tracked. The store's and MLflow's addresses are the head's, so never passed."""
    args = [
        "--executor",
        execution.executor,
        "--workers",
        str(execution.workers),
        "--gpus-per-trial",
        str(execution.gpus_per_trial),
        "--group-size",
        str(execution.group_size),
        "--max-retries",
        str(execution.max_retries),
        "--accelerator",
        execution.accelerator,
        "--precision",
        execution.precision,
    ]
    for option, value in (
        ("--cpus-per-trial", execution.cpus_per_trial),
        ("--trials", trials),
        ("--timeout", timeout),
        ("--seed", seed),
        ("--experiment", tracking.experiment),
    ):
        if value is not None:
            args += [option, str(value)]
    return args + ([] if tracking.enabled else ["--no-tracking"])


def _warn_of_job_version() -> None:
    from hpo.cluster.jobs import driver_version_warning

    if warning := driver_version_warning():
        _warn(warning)


def _print_submitted(job: Any, cluster: str) -> None:
    from hpo.cluster.jobs import KIND_KEY

    resumed = " (resumed)" if job.metadata.get(KIND_KEY) == "resume" else ""
    console.print(
        f"submitted study {job.study}{resumed} to {cluster} as job {job.job_id}; it runs there, this terminal "
        "may close.\n"
        f"next: `hpo status --cluster {cluster}`, `hpo logs {job.study} -f --cluster {cluster}`, "
        f"`hpo stop {job.study} --cluster {cluster}`",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )


def _resume_on_cluster(
    study: str | None,
    cluster: str,
    storage: str | None,
    interrupted: bool,
    code_dir: Path | None,
    trials: int | None,
    timeout: float | None,
    execution: Any,
    tracking: Any,
) -> None:
    from hpo import api
    from hpo.cluster import board
    from hpo.cluster.jobs import Cluster

    if (study is None) == (not interrupted):
        raise HpoError("name one study to resume, or pass --interrupted for every interrupted one")
    jobs = Cluster(cluster)
    names = [study] if study is not None else board.interrupted(_board(storage, jobs))
    if not names:
        console.print("no interrupted study")
        return
    args = _driver_args(execution, tracking, trials=trials, timeout=timeout)
    for name in names:
        job = api.resume_on_cluster(name, jobs, driver_args=args, tracking=tracking.enabled, code_dir=code_dir)
        _print_submitted(job, cluster)


def _shown(url: str | None) -> str:
    return redact(storage_url(url))


_EXIT_CODES = {"budget": 0, "timeout": 0, "errors": 1, "interrupted": 130, "drained": 0}


def _report_run(handle: StudyHandle, summary: RunSummary) -> None:
    """Print how the run ended and the best configuration; exit 1 after a run of errors, 130
    after an interrupt."""
    c = summary.counts
    why = {
        "budget": "budget reached",
        "timeout": "timeout reached",
        "interrupted": f"interrupted; run `hpo resume {handle.name}` to continue",
        "drained": f"drained (hpo stop --drain); run `hpo resume {handle.name}` to continue",
        "errors": summary.message,
    }[summary.stopped]
    console.print(
        f"{why}: {c.finished}/{handle.budget} finished ({c.complete} complete, {c.pruned} pruned, {c.failed} failed)",
        markup=False,
        highlight=False,
    )
    best = best_trial(handle.study)
    if best is not None:
        console.print("best configuration:")
        printing.print_trial(console, StoredTrial.of(best, handle.spec))
        if not handle.spec.multi_objective:
            _compare_with_baseline(handle, best)
    if summary.stopped in ("budget", "timeout") and best is not None:
        storage = "" if handle.storage == storage_url(None) else f" --storage {redact(handle.storage)}"
        console.print(
            f"next: `hpo report {handle.name}{storage}` writes the dropout tables and plots",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        _print_address(handle)
    if _EXIT_CODES[summary.stopped]:
        raise typer.Exit(_EXIT_CODES[summary.stopped])


def _print_address(handle: StudyHandle) -> None:
    """Where the study's trials are in MLflow: the tracking server's page, or the one `hpo ui`
    serves by default."""
    from hpo.tracking.dashboard import planned_address

    planned = planned_address(handle)
    if planned is not None:
        printing.print_address(console, *planned)


def _compare_with_baseline(handle: StudyHandle, best: optuna.trial.FrozenTrial) -> None:
    baseline = next(
        (t for t in handle.study.get_trials(deepcopy=False) if t.user_attrs.get(BASELINE) == "no_dropout" and t.values),
        None,
    )
    if baseline is None:
        return
    objective = handle.spec.objective[0]
    delta = best.values[0] - baseline.values[0]
    better = delta > 0 if objective.direction == "maximize" else delta < 0
    console.print(
        f"no-dropout baseline (trial {baseline.number}): {objective.metric} "
        f"{baseline.values[0]:.4f}; the best trial is {delta:+.4f} "
        f"({'better' if better else 'not better'})"
    )
    kept = baseline.user_attrs.get(DROPOUT_KEPT)
    if kept:
        _warn(f"the no-dropout baseline still dropped where no site holds the rate: {', '.join(kept)}")
